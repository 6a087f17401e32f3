"""What every embedlab LightningModule shares, whatever its model family.

A family's module (bi-encoder, cross-encoder, distillation) subclasses :class:`EmbedlabModule` and gets:

- **its own evaluation.** In ``setup`` it builds one evaluator per stage from the data's tasks
  (``datamodule.val_task`` / ``test_task``) and the ``eval`` options; the DataModule's validation/test loaders
  are the module's (:meth:`val_dataloader`), because only the module knows what to encode or score for a task.
  A family overrides :meth:`build_evaluator` and :meth:`evaluation_dataloader`; nothing in ``train()`` or the
  data layer changes.
- **named, checked loss terms.** :meth:`log_train_terms` logs each term as ``train/<term>`` and stops the run
  with :class:`NonFiniteLossError` (the step and the term) when any term is NaN or infinite, before the
  optimizer step and before any checkpoint of that step.
- **the validation history.** Every complete validation's metrics are kept (and stored in checkpoints, so a
  resumed run still knows them): ``train()`` reports the values of the epoch the checkpoint selected.
- **its model's config in checkpoints** (``embedlab_model_cfg``: the model records how it was built), so
  ``model.path=run.ckpt`` rebuilds it; see :func:`embedlab.models.checkpoint.safe_load`.
- **Trainer flags it takes over** (:meth:`trainer_overrides`), e.g. gradient clipping under manual optimization.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Mapping

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from embedlab import distributed
from embedlab.errors import UserError

log = logging.getLogger(__name__)

STAGES = ("val", "test")


class NonFiniteLossError(UserError):
    """A loss term became NaN or infinite: the run stops before that step updates or checkpoints anything."""


class EmbedlabModule(L.LightningModule):
    """Base LightningModule: module-owned evaluation, checked loss terms, validation history (see module doc).

    Args:
        evaluation: the ``eval`` options handed to :meth:`build_evaluator` (``k_values``, ``similarity``, ...).
    """

    def __init__(self, evaluation: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        if isinstance(evaluation, DictConfig):
            evaluation = OmegaConf.to_container(evaluation, resolve=True)
        self.evaluation_options: dict[str, Any] = dict(evaluation or {})
        self.evaluators: dict[str, Any] = {}
        # metrics of every complete validation, in order: {"epoch": e, "step": s, "val/...": v}
        self.validation_history: list[dict[str, float]] = []

    # ------------------------------------------------------------------ the family's hooks
    def build_evaluator(self, task):
        """The evaluator of ``task`` (a record from the data layer) for this family."""
        raise NotImplementedError

    def evaluation_dataloader(self, evaluator):
        """The batches the evaluation steps of ``evaluator`` consume."""
        raise NotImplementedError

    def trainer_overrides(self, trainer_cfg: Mapping) -> dict:
        """Trainer arguments this module takes over (``{}``: none); ``train()`` passes them to the Trainer."""
        return {}

    # ------------------------------------------------------------------ evaluation ownership
    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        if datamodule is None:
            return
        wanted = {"fit": ("val",), "validate": ("val",), "test": ("test",)}.get(stage, ())
        for name in wanted:
            task = getattr(datamodule, f"{name}_task", None)
            # built once per task: a later trainer.test on another datamodule gets its own evaluator
            if task is not None and getattr(self.evaluators.get(name), "task", None) is not task:
                self.evaluators[name] = self.build_evaluator(task)

    @property
    def val_evaluator(self):
        return self.evaluators.get("val")

    @property
    def test_evaluator(self):
        return self.evaluators.get("test")

    def val_dataloader(self):
        return self.evaluation_dataloader(self.val_evaluator) if self.val_evaluator is not None else []

    def test_dataloader(self):
        return self.evaluation_dataloader(self.test_evaluator) if self.test_evaluator is not None else []

    def log_evaluation(self, stage: str, metrics: Mapping[str, float]) -> None:
        """Log one evaluation's metrics (the same values on every rank) and keep validation's in the history."""
        for name, value in metrics.items():
            # the same value on every rank: nothing to average (sync_dist off keeps it bit-identical)
            self.log(name, value, prog_bar=name.endswith(("ndcg@10", "spearman_cosine")), sync_dist=False)
        if stage == "val" and not self.trainer.sanity_checking:
            self.validation_history.append({"epoch": float(self.current_epoch), "step": float(self.global_step), **metrics})

    def best_validation(self, monitor: str, mode: str = "max") -> dict[str, float] | None:
        """The history entry with the best ``monitor`` value (the first of equal ones, as ModelCheckpoint keeps)."""
        rows = [r for r in self.validation_history if monitor in r and math.isfinite(r[monitor])]
        if not rows:
            return None
        pick = max if mode == "max" else min
        return pick(rows, key=lambda r: r[monitor])

    # ------------------------------------------------------------------ training terms
    def log_train_terms(self, terms: Mapping[str, torch.Tensor], batch_size: int, check: bool = True) -> None:
        """Log ``train/<term>`` for each named loss term; first stop at a non-finite one (``check``)."""
        if check:
            self.check_finite(terms)
        # under DDP each rank's term covers its local queries; their mean over ranks is the global batch's
        # value (with cross-device negatives: exactly the single-process loss of the global batch)
        sync = distributed.world_size() > 1
        for name, value in terms.items():
            self.log(f"train/{name}", value, prog_bar=name == "loss", batch_size=batch_size, sync_dist=sync)

    def check_finite(self, terms: Mapping[str, torch.Tensor]) -> None:
        """Raise :class:`NonFiniteLossError` on every rank when any rank's loss term is NaN or infinite."""
        names = list(terms)
        values = torch.stack([torch.as_tensor(terms[n]).detach().float().reshape(()) for n in names])  # (T,)
        bad = ~torch.isfinite(values)
        if distributed.world_size() > 1:
            # one rank's NaN must stop every rank, or the others wait forever in the next collective
            flags = bad.to(self.device).float()
            torch.distributed.all_reduce(flags)
            bad = flags.cpu() > 0
        if bool(bad.any()):
            found = ", ".join(f"{n}={float(v)}" for n, v, b in zip(names, values, bad) if b)
            raise NonFiniteLossError(
                f"step {self.global_step}: non-finite loss terms {found} (no update or checkpoint was made from "
                "this step; lower the learning rate or check the data)"
            )

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["embedlab_model_cfg"] = getattr(self.model, "config", None)
        checkpoint["embedlab_validation_history"] = list(self.validation_history)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.validation_history = list(checkpoint.get("embedlab_validation_history", []))

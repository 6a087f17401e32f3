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

import functools
import logging
import math
from pathlib import Path
from typing import Any, Callable, Mapping

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from embedlab import distributed
from embedlab.errors import ConfigError, UserError
from embedlab.evaluation.per_query import per_query_path, write_per_query
from embedlab.evaluation.runs import write_trec_runs

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
    def build_evaluator(self, task, stage: str = "test"):
        """The evaluator of ``task`` (a record from the data layer) for this family, for ``stage`` (val / test)."""
        raise NotImplementedError

    def evaluation_dataloader(self, evaluator):
        """The batches the evaluation steps of ``evaluator`` consume."""
        raise NotImplementedError

    def _eval_step(self, batch) -> None:
        """Compute one evaluation batch's rows (embeddings, scores) and keep them for :meth:`_finish_eval`."""
        raise NotImplementedError

    def _finish_eval(self, stage: str) -> None:
        """Gather the stage's rows (:meth:`collect_eval_rows`), compute the metrics once, log them."""
        raise NotImplementedError

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch)

    def test_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch)

    def on_validation_epoch_end(self) -> None:
        self._finish_eval("val")

    def on_test_epoch_end(self) -> None:
        self._finish_eval("test")

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
                self.evaluators[name] = self.build_evaluator(task, stage=name)

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

    def collect_eval_rows(
        self, stage: str, outputs: Mapping[str, list[tuple[torch.Tensor, torch.Tensor]]], sizes: Mapping[str, int],
        empty: torch.Tensor,
    ) -> dict[str, torch.Tensor] | None:
        """Every rank's evaluation rows, written by index into one tensor per request, on CPU.

        ``outputs``: this rank's ``{key: [(index (b,), values (b, ...)), ...]}``; ``sizes``: rows per key;
        ``empty``: a (0, ...) tensor of the rows' shape and dtype. ``None`` (with a warning) when some rows were
        never computed (``limit_val_batches`` / ``fast_dev_run``): metrics of part of a task would mislead.
        """
        result = {}
        done = total = 0
        for key, size in sizes.items():
            index, values = self._gather_eval_rows(outputs.get(key, []), empty)
            out = empty.new_zeros((size, *empty.shape[1:]))
            seen = torch.zeros(size, dtype=torch.bool)
            # DistributedSampler pads with repeated batches: writes by index are idempotent
            out[index] = values.to(out.dtype)
            seen[index] = True
            done, total = done + int(seen.sum()), total + size
            result[key] = out
        if done < total:
            log.warning(
                "%s: %d of %d rows were computed (limit_%s_batches / fast_dev_run): no %s metrics", stage, done, total, stage, stage
            )
            return None
        return result

    def _gather_eval_rows(self, rows: list[tuple[torch.Tensor, torch.Tensor]], empty: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's (index, values) rows of one request -> every rank's, on CPU."""
        index = torch.cat([i for i, _ in rows]) if rows else torch.zeros(0, dtype=torch.long)
        values = torch.cat([v for _, v in rows]) if rows else empty
        if distributed.world_size() == 1:
            return index, values
        # NCCL moves device tensors only: gather on the module's device, concatenated in rank order
        index = distributed.all_gather_variable(index.to(self.device)).cpu()
        values = distributed.all_gather_variable(values.to(self.device)).cpu()
        return index, values

    def log_evaluation(self, stage: str, metrics: Mapping[str, float]) -> None:
        """Log one evaluation's metrics (the same values on every rank) and keep validation's in the history."""
        for name, value in metrics.items():
            # the same value on every rank: nothing to average (sync_dist off keeps it bit-identical)
            self.log(name, value, prog_bar=name.endswith(("ndcg@10", "spearman_cosine", "/spearman")), sync_dist=False)
        if stage == "val" and not self.trainer.sanity_checking:
            self.validation_history.append({"epoch": float(self.current_epoch), "step": float(self.global_step), **metrics})

    def write_eval_files(self, stage: str, evaluator) -> list[Path]:
        """Write what the evaluator kept of its last evaluation under ``<run dir>/runs/``: its rankings
        (``last_runs``) as TREC run files (``test_run.trec``, ``test_first_stage.trec`` for two-stage evaluators,
        ``val_epoch003_run.trec``) and its per-query values (``last_per_query``) as ``test_per_query.jsonl`` /
        ``val_epoch003_per_query.jsonl`` (:mod:`embedlab.evaluation.per_query`), for paired tests without
        re-encoding."""
        stem = stage if stage == "test" else f"{stage}_epoch{self.current_epoch:03d}"
        folder = Path(self.trainer.default_root_dir) / "runs"
        paths = write_trec_runs(getattr(evaluator, "last_runs", None) or {}, folder, stem)
        units = getattr(evaluator, "last_per_query", None)
        if units:
            paths.append(write_per_query(units, per_query_path(folder, stem)))
        return paths

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

    # ------------------------------------------------------------------ optimizers
    def configure_optimization(
        self,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        lr_multipliers: Mapping[str, float] | None = None,
    ) -> None:
        """Keep the partial optimizer / scheduler (completed in :meth:`configure_optimizers`) and the
        ``{parameter-name prefix: factor}`` lr multipliers, checked."""
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        # parameter-name prefix -> factor on the optimizer's lr, e.g. {"model.dense": 50}: a new projection
        # or scoring head learns at a higher rate than the pretrained backbone
        self.lr_multipliers = {str(k): float(v) for k, v in (lr_multipliers or {}).items()}
        for prefix, factor in self.lr_multipliers.items():
            if not factor >= 0:
                raise ConfigError(f"lr_multipliers[{prefix!r}] must be >= 0, got {factor}")

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params=self._param_groups(), **self._fused_default(params))
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer=optimizer, num_training_steps=self._optimizer_steps())
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _param_groups(self) -> list[torch.Tensor] | list[dict]:
        """The trainable parameters, split by ``lr_multipliers`` into groups with ``lr = factor * base lr``
        (the first matching prefix wins; the rest keep the base lr). Schedulers scale every group alike."""
        named = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        if not self.lr_multipliers:
            return [p for _, p in named]
        base_lr = getattr(self.optimizer_factory, "keywords", {}).get("lr")
        if base_lr is None:
            raise ConfigError("lr_multipliers needs the optimizer's lr in its config (module.optimizer.lr)")
        groups: dict[str, list[torch.Tensor]] = {prefix: [] for prefix in self.lr_multipliers}
        rest = []
        for name, param in named:
            prefix = next((q for q in self.lr_multipliers if name == q or name.startswith(q + ".")), None)
            (groups[prefix] if prefix is not None else rest).append(param)
        empty = [q for q, ps in groups.items() if not ps]
        if empty:
            tops = sorted({".".join(n.split(".")[:2]) for n, _ in named})
            raise ConfigError(
                f"lr_multipliers: no trainable parameter under {', '.join(map(repr, empty))}; "
                f"parameter names start with {', '.join(tops)}"
            )
        out = [{"params": ps, "lr": base_lr * self.lr_multipliers[q]} for q, ps in groups.items()]
        return out + ([{"params": rest}] if rest else [])

    def _fused_default(self, params: list[torch.Tensor]) -> dict:
        """``{"fused": True}`` for ``torch.optim.Adam``/``AdamW`` left without ``fused``/``foreach``, when every
        parameter is a float tensor on CPU or CUDA and the precision plugin does no mixed-precision step.

        The fused kernel is one pass over all parameters instead of torch's per-tensor loop (the CPU default):
        a cheaper optimizer step, the same update up to float rounding; the Hugging Face Trainer uses it by
        default too. Lightning refuses to
        clip the gradients of a fused optimizer under ``16-mixed``/``bf16-mixed`` (it unscales inside ``step``),
        so those runs keep the loop. ``++module.optimizer.fused=false`` opts out.
        """
        factory = self.optimizer_factory
        if not isinstance(factory, functools.partial) or factory.func not in (torch.optim.Adam, torch.optim.AdamW):
            return {}
        if {"fused", "foreach"} & set(factory.keywords):
            return {}
        if self._trainer is not None and isinstance(self.trainer.precision_plugin, L.pytorch.plugins.MixedPrecision):
            return {}
        if not params or not all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params):
            return {}
        return {"fused": True}

    def _optimizer_steps(self) -> int:
        """Optimizer steps of the run (the schedule's length)."""
        return self.trainer.estimated_stepping_batches  # Trainer-level accumulation already counted

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["embedlab_model_cfg"] = getattr(self.model, "config", None)
        checkpoint["embedlab_validation_history"] = list(self.validation_history)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.validation_history = list(checkpoint.get("embedlab_validation_history", []))

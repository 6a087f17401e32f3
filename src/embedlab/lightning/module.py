"""The bi-encoder LightningModule: training steps, its evaluators' encoding steps, optimizers, logging.

Model components (``embedlab.models``) and losses (``embedlab.losses``) are plain modules; this class only
wires them: embed a batch once into an :class:`EmbeddedBatch`, hand it to the loss, log each named term
as ``train/<term>``; during validation/test, embed the texts its evaluator asks for (the evaluator is built
here from the data's task and the ``eval`` options: :class:`~embedlab.lightning.base.EmbedlabModule`) step by
step and compute the metrics once at epoch end (``val/ndcg@10``, ``test/spearman_cosine``, ...).

Two training paths:
- plain (default): automatic optimization; Lightning runs backward, accumulation, clipping, the step.
- GradCache (``grad_cache_mini_batch_size``, or a ``GradCacheLoss`` such as ``loss=cached_mnrl``): manual
  optimization. The batch is embedded in mini-batches (``embedlab.lightning.grad_cache``); the replayed
  per-mini-batch backward passes run inside DDP's ``no_sync()`` and the gradients are averaged over ranks
  once per optimizer step (``distributed.all_reduce_mean_gradients``), then clipped and stepped here.

Under DDP, validation/test batches are sharded by Lightning's DistributedSampler; ``_finish_eval`` gathers
the (index, embedding) rows of every rank, computes the metrics once on rank 0 and logs the same values
on every rank.
"""

from __future__ import annotations

import functools
import logging
import math
import warnings
from contextlib import nullcontext
from typing import Any, Callable, Mapping

import lightning as L
import torch
from torch.utils.data import DataLoader

from embedlab import distributed
from embedlab.data.collate import EncodeBatches, identity_collate
from embedlab.errors import ConfigError
from embedlab.evaluation.evaluators import build_evaluator, with_model_similarity
from embedlab.evaluation.grid import report_grid
from embedlab.lightning.base import EmbedlabModule
from embedlab.lightning.grad_cache import find_mini_batch_size, grad_cache_backward
from embedlab.losses.base import EmbeddedBatch
from embedlab.models.bi_encoder import BiEncoder

log = logging.getLogger(__name__)

# evaluation metrics are computed once (rank 0) and logged with the same value on every rank, so there is
# nothing to reduce; Lightning still suggests sync_dist for every epoch-level value under DDP
warnings.filterwarnings("ignore", message=r"It is recommended to use `self.log\('(val|test)/")
# DistributedSampler repeats a few evaluation batches to even out ranks; _finish_eval writes rows by index,
# so a repeated batch changes nothing
warnings.filterwarnings("ignore", message=r"Using `DistributedSampler` with the dataloaders. During `trainer.test\(\)`")


class BiEncoderModule(EmbedlabModule):
    """Train a :class:`BiEncoder` with any embedding loss.

    Args:
        model: the bi-encoder.
        loss: a loss taking an :class:`EmbeddedBatch` and returning ``{"loss": ..., <term>: ...}``.
        optimizer: partial optimizer (``_partial_: true``), completed with the parameters here.
        scheduler: partial ``(optimizer, num_training_steps) -> LR scheduler`` or ``None``; stepped per step.
        grad_cache_mini_batch_size: embed training batches in mini-batches of this many texts with
            GradCache (any loss; exact same loss and gradients as the plain step, activation memory of
            one mini-batch). ``None``: the mini-batch size of a ``GradCacheLoss`` in ``loss``
            (``loss=cached_mnrl``), else off.
        gradient_clip_val / gradient_clip_algorithm / accumulate_grad_batches: used by the GradCache path
            only (manual optimization, where Lightning refuses the Trainer's own flags); ``train`` moves
            the Trainer config's values here (:meth:`trainer_overrides`). Accumulation sums the gradients
            of ``accumulate_grad_batches`` batches (each loss divided by it) before one optimizer step,
            exactly as automatic optimization does; it adds no in-batch negatives.
        lr_multipliers: ``{parameter-name prefix: factor}`` on the optimizer's lr (:meth:`_param_groups`).
        evaluation: the ``eval`` options of the evaluators built from the data's validation/test tasks;
            ``similarity: null`` there means the model's own similarity.
    """

    def __init__(
        self,
        model: BiEncoder,
        loss: torch.nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        grad_cache_mini_batch_size: int | None = None,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str = "norm",
        accumulate_grad_batches: int = 1,
        lr_multipliers: Mapping[str, float] | None = None,
        evaluation: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(evaluation)
        self.model = model.train()  # from_pretrained leaves HF models in eval mode: dropout off
        self.loss = loss
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self._eval_outputs: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.grad_cache_mini_batch_size = grad_cache_mini_batch_size or find_mini_batch_size(loss)
        if self.grad_cache_mini_batch_size is not None and self.grad_cache_mini_batch_size < 1:
            raise ConfigError(f"grad_cache_mini_batch_size must be >= 1, got {self.grad_cache_mini_batch_size}")
        # GradCache backpropagates mini-batch by mini-batch inside the step: manual optimization
        self.automatic_optimization = self.grad_cache_mini_batch_size is None
        self.gradient_clip_val = gradient_clip_val
        self.gradient_clip_algorithm = gradient_clip_algorithm
        if int(accumulate_grad_batches) < 1:
            raise ConfigError(f"accumulate_grad_batches must be >= 1, got {accumulate_grad_batches}")
        self.accumulate_grad_batches = int(accumulate_grad_batches)
        # parameter-name prefix -> factor on the optimizer's lr, e.g. {"model.dense": 50}: a new projection
        # learns at a higher rate than the pretrained backbone
        self.lr_multipliers = {str(k): float(v) for k, v in (lr_multipliers or {}).items()}
        for prefix, factor in self.lr_multipliers.items():
            if not factor >= 0:
                raise ConfigError(f"lr_multipliers[{prefix!r}] must be >= 0, got {factor}")

    def trainer_overrides(self, trainer_cfg: Mapping) -> dict:
        """Trainer arguments to replace for this module: with GradCache (manual optimization) the module takes
        over ``gradient_clip_val`` / ``gradient_clip_algorithm`` / ``accumulate_grad_batches`` from
        ``trainer_cfg`` and the Trainer gets the neutral values; ``{}`` otherwise."""
        if self.automatic_optimization:
            return {}
        self.gradient_clip_val = trainer_cfg.get("gradient_clip_val")
        self.gradient_clip_algorithm = trainer_cfg.get("gradient_clip_algorithm") or "norm"
        self.accumulate_grad_batches = int(trainer_cfg.get("accumulate_grad_batches") or 1)
        return {"gradient_clip_val": None, "accumulate_grad_batches": 1}

    # ------------------------------------------------------------------ training
    def embed(self, texts: list[str], kind: str) -> torch.Tensor:
        return self.model(self.tokenize(texts, kind))

    def tokenize(self, texts: list[str], kind: str) -> dict[str, torch.Tensor]:
        features = self.model.tokenize(texts, kind)
        return {k: v.to(self.device) for k, v in features.items()}

    @staticmethod
    def batch_texts(batch: dict) -> tuple[list[str], list[str]]:
        """The two encoder calls of a training batch: queries; documents = positives + hard negatives."""
        return batch["query"], batch["positive"] + (batch["negatives"] or [])

    def assemble(self, batch: dict, query: torch.Tensor, docs: torch.Tensor) -> EmbeddedBatch:
        """Query (B, D) and document (B + B*n, D) embeddings of ``batch`` -> the loss's :class:`EmbeddedBatch`."""
        return EmbeddedBatch.from_collated(batch, query, docs, normalized=self.model.normalize is not None)

    def embed_batch(self, batch: dict) -> EmbeddedBatch:
        """Embed a collated training batch (queries with query settings, candidates with document settings)."""
        queries, docs = self.batch_texts(batch)
        return self.assemble(batch, self.embed(queries, "query"), self.embed(docs, "document"))  # (B, D), (B + B*n, D)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        if self.automatic_optimization:
            terms = self.loss(self.embed_batch(batch))
        else:
            terms = self._grad_cache_step(batch, batch_idx)
        # the GradCache step checked its terms before stepping the optimizer
        self.log_train_terms(terms, len(batch["query"]), check=self.automatic_optimization)
        return terms["loss"]

    # ------------------------------------------------------------------ GradCache (manual optimization)
    def _grad_cache_step(self, batch: dict, batch_idx: int) -> dict[str, torch.Tensor]:
        optimizer = self.optimizers()
        queries, docs = self.batch_texts(batch)
        with self._no_backward_sync():
            terms = grad_cache_backward(
                encode=self.model,
                sides=[self.tokenize(queries, "query"), self.tokenize(docs, "document")],
                assemble=lambda embs: self.assemble(batch, *embs),
                loss=self.loss,
                mini_batch_size=self.grad_cache_mini_batch_size,
                backward=self.manual_backward,
                loss_scale=1.0 / self.accumulate_grad_batches,
            )
        self.check_finite(terms)  # before the optimizer step: a NaN must not reach the weights
        if self._ends_accumulation(batch_idx):
            # the one gradient all-reduce of this optimizer step (DDP's, done by hand after no_sync)
            distributed.all_reduce_mean_gradients(self.parameters())
            optimizer.step()  # clipping: on_before_optimizer_step (after AMP unscaling)
            optimizer.zero_grad()
            scheduler = self.lr_schedulers()
            if scheduler is not None:
                scheduler.step()
        return terms

    def _ends_accumulation(self, batch_idx: int) -> bool:
        last = self.trainer.num_training_batches if self._trainer is not None else math.inf
        return (batch_idx + 1) % self.accumulate_grad_batches == 0 or batch_idx + 1 == last

    def _no_backward_sync(self):
        """DDP's ``no_sync()`` around the replayed backward passes (gradients are all-reduced once, by hand)."""
        from torch.nn.parallel import DistributedDataParallel

        wrapper = self.trainer.strategy.model if self._trainer is not None else None
        if isinstance(wrapper, DistributedDataParallel):
            return wrapper.no_sync()
        if distributed.world_size() > 1 and wrapper is not None and wrapper is not self:
            raise NotImplementedError(
                f"GradCache supports single-device and DDP training, not {type(self.trainer.strategy).__name__}"
            )
        return nullcontext()

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # automatic optimization clips from the Trainer's flags; the GradCache path clips here, where
        # precision plugins have already unscaled the gradients
        if not self.automatic_optimization and self.gradient_clip_val:
            self.clip_gradients(
                optimizer, gradient_clip_val=self.gradient_clip_val, gradient_clip_algorithm=self.gradient_clip_algorithm
            )

    # ------------------------------------------------------------------ evaluation
    def build_evaluator(self, task):
        return build_evaluator(task, **with_model_similarity(self.evaluation_options, self.model))

    def evaluation_dataloader(self, evaluator) -> DataLoader:
        """The evaluator's texts in encoding batches ({key, kind, index, texts}); Lightning shards them under DDP."""
        batches = EncodeBatches(evaluator.encode_plan(), evaluator.batch_size)
        return DataLoader(batches, batch_size=None, shuffle=False, collate_fn=identity_collate, num_workers=0)

    def _eval_step(self, batch: dict) -> None:
        emb = self.embed(batch["texts"], batch["kind"]).float()
        self._eval_outputs.setdefault(batch["key"], []).append((batch["index"].cpu(), emb.cpu()))

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch)

    def on_validation_epoch_end(self) -> None:
        self._finish_eval("val")

    def on_test_epoch_end(self) -> None:
        self._finish_eval("test")

    def _finish_eval(self, stage: str) -> None:
        outputs, self._eval_outputs = self._eval_outputs, {}
        evaluator = self.evaluators.get(stage)
        # every decision before the gather must be the same on all ranks (a rank may hold no batch at all)
        if self.trainer.sanity_checking or evaluator is None:
            return
        if distributed.world_size() == 1 and not outputs:
            return
        embeddings = {}
        seen_texts = total_texts = 0
        for req in evaluator.encode_plan():
            index, emb = self._gather_eval_rows(outputs.get(req.key, []))
            out = torch.zeros(len(req.texts), self.model.embedding_dim)
            seen = torch.zeros(len(req.texts), dtype=torch.bool)
            # DistributedSampler pads with repeated batches: writes by index are idempotent
            out[index] = emb
            seen[index] = True
            seen_texts, total_texts = seen_texts + int(seen.sum()), total_texts + len(req.texts)
            embeddings[req.key] = out
        if seen_texts < total_texts:
            # limit_val_batches / fast_dev_run cut the epoch short: metrics of part of a corpus would mislead
            log.warning(
                "%s: %d of %d texts were encoded (limit_%s_batches / fast_dev_run): no %s metrics", stage, seen_texts, total_texts,
                stage, stage,
            )
            return
        metrics = None
        if self.trainer.is_global_zero:
            metrics = {name: float(value) for name, value in evaluator.compute(embeddings, prefix=f"{stage}/").items()}
            if evaluator.last_grid:
                stem = f"{stage}_grid" if stage == "test" else f"{stage}_grid_epoch{self.current_epoch:03d}"
                report_grid(evaluator.last_grid, self.trainer.default_root_dir, stem, self.trainer.loggers)
        metrics = distributed.broadcast_object(metrics, src=0)
        self.log_evaluation(stage, metrics)

    def _gather_eval_rows(self, rows: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's (index, embedding) rows of one request -> every rank's, on CPU."""
        dim = self.model.embedding_dim
        index = torch.cat([i for i, _ in rows]) if rows else torch.zeros(0, dtype=torch.long)
        emb = torch.cat([e for _, e in rows]) if rows else torch.zeros(0, dim)
        if distributed.world_size() == 1:
            return index, emb
        # NCCL moves device tensors only: gather on the module's device, concatenated in rank order
        index = distributed.all_gather_variable(index.to(self.device)).cpu()
        emb = distributed.all_gather_variable(emb.to(self.device)).cpu()
        return index, emb

    # ------------------------------------------------------------------ optimizers
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
        on all-MiniLM-L6-v2 (22.7 M parameters, 2 CPU cores) about 0.04 s instead of 0.1-0.2 s per step, the
        same update up to float rounding; the Hugging Face Trainer uses it by default too. Lightning refuses to
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
        """Optimizer steps of the run (the schedule's length); GradCache accumulates in the module."""
        steps = self.trainer.estimated_stepping_batches  # Trainer-level accumulation already counted
        if self.automatic_optimization or self.accumulate_grad_batches == 1:
            return steps
        epochs = self.trainer.max_epochs if self.trainer.max_epochs and self.trainer.max_epochs > 0 else math.inf
        total = math.ceil(self.trainer.num_training_batches / self.accumulate_grad_batches) * epochs
        if self.trainer.max_steps != -1:
            total = min(total, self.trainer.max_steps)
        return int(total) if math.isfinite(total) else steps

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
the (index, embedding) rows of every rank (``EmbedlabModule.collect_eval_rows``), computes the metrics once on rank 0 and logs the same values
on every rank.

With ``eval.cache_dir`` (:class:`~embedlab.cache.EmbeddingCache`, docs/cache.md) an evaluation step reads the rows
the cache holds for the model's current fingerprint (hashed once per evaluation epoch, at its first step, so it
sees the step's autocast) and embeds only the others; at epoch end rank 0 stores the rows the cache lacked. A
test after a validation with the same weights, or a second validation without a training step between, then
encodes nothing.
"""

from __future__ import annotations

import logging
import math
import warnings
from contextlib import nullcontext
from typing import Any, Callable, Mapping

import torch
from torch.utils.data import DataLoader

from embedlab import distributed
from embedlab.cache import EmbeddingCache, cache_from_options, model_fingerprint, weights_digest
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
            ``similarity: null`` there means the model's own similarity; ``cache_dir`` turns on the embedding
            cache for validation/test (see the module doc).
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
        if getattr(loss, "consumes", None) == "scores":
            raise ConfigError(
                f"loss {type(loss).__name__} scores (query, document) pairs: it trains cross-encoders "
                "(module=cross_encoder model=cross_encoder_minilm_l6); a bi-encoder needs an embedding loss (loss=mnrl, cosent, ...)"
            )
        self.model = model.train()  # from_pretrained leaves HF models in eval mode: dropout off
        self.loss = loss
        self._eval_outputs: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.eval_cache: EmbeddingCache | None = cache_from_options(self.evaluation_options)[0]
        # {kind: fingerprint} of the evaluation epoch in progress (None: not hashed yet this epoch)
        self._eval_fingerprints: dict[str, str] | None = None
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
        self.configure_optimization(optimizer, scheduler, lr_multipliers)

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
                # trainable parameters outside the encoder (e.g. the distillation projection)
                loss_parameters=[p for n, p in self.named_parameters() if not n.startswith("model.")],
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
    def build_evaluator(self, task, stage: str = "test"):
        _, options = cache_from_options(self.evaluation_options)  # cache_dir is no evaluator option
        return build_evaluator(task, **with_model_similarity(options, self.model))

    def evaluation_dataloader(self, evaluator) -> DataLoader:
        """The evaluator's texts in encoding batches ({key, kind, index, texts}); Lightning shards them under DDP."""
        batches = EncodeBatches(evaluator.encode_plan(), evaluator.batch_size)
        return DataLoader(batches, batch_size=None, shuffle=False, collate_fn=identity_collate, num_workers=0)

    def on_validation_epoch_start(self) -> None:
        self._eval_fingerprints = None  # the weights may have changed since the last evaluation: hash them again

    def on_test_epoch_start(self) -> None:
        self._eval_fingerprints = None

    def _eval_step(self, batch: dict) -> None:
        if self.eval_cache is None:
            emb = self.embed(batch["texts"], batch["kind"]).float()
        else:
            emb = self._cached_embed(batch["texts"], batch["kind"])
        self._eval_outputs.setdefault(batch["key"], []).append((batch["index"].cpu(), emb.cpu()))

    def _cached_embed(self, texts: list[str], kind: str) -> torch.Tensor:
        """(B, D) float32 CPU: the cache's rows for ``texts``, the texts it lacks embedded now."""
        if self._eval_fingerprints is None:
            # first step of the epoch: one pass over the weights, inside the step's precision context
            weights = weights_digest(self.model)
            self._eval_fingerprints = {k: model_fingerprint(self.model, k, weights) for k in ("query", "document")}
        found, missing = self.eval_cache.lookup(self._eval_fingerprints[kind], texts)
        if not missing:
            return found
        new = self.embed([texts[i] for i in missing], kind).float().cpu()  # (M, D)
        out = found if found is not None else new.new_zeros(len(texts), new.shape[1])
        out[missing] = new
        return out

    def _store_eval_rows(self, evaluator, embeddings: dict[str, torch.Tensor], fingerprints: dict[str, str] | None) -> None:
        """Rank 0 at epoch end: store each request's rows the cache lacks (``store`` skips the cached ones).

        Every rank's rows are gathered by then, so rows computed on any rank are stored once. ``fingerprints``
        is ``None`` when this rank ran no step (nothing hashed): nothing is stored then.
        """
        if self.eval_cache is None or fingerprints is None:
            return
        for req in evaluator.encode_plan():
            try:
                self.eval_cache.store(fingerprints[req.kind], req.texts, embeddings[req.key])
            except (OSError, ValueError) as err:  # never raise here: the other ranks wait in the broadcast
                log.warning("embedding cache: %s rows not stored (%s)", req.key, err)

    def _finish_eval(self, stage: str) -> None:
        outputs, self._eval_outputs = self._eval_outputs, {}
        fingerprints, self._eval_fingerprints = self._eval_fingerprints, None
        evaluator = self.evaluators.get(stage)
        # every decision before the gather must be the same on all ranks (a rank may hold no batch at all)
        if self.trainer.sanity_checking or evaluator is None:
            return
        if distributed.world_size() == 1 and not outputs:
            return
        sizes = {req.key: len(req.texts) for req in evaluator.encode_plan()}
        embeddings = self.collect_eval_rows(stage, outputs, sizes, torch.zeros(0, self.model.embedding_dim))
        if embeddings is None:
            return
        metrics = None
        if self.trainer.is_global_zero:
            metrics = {name: float(value) for name, value in evaluator.compute(embeddings, prefix=f"{stage}/").items()}
            self._store_eval_rows(evaluator, embeddings, fingerprints)
            self.write_eval_files(stage, evaluator)
            if evaluator.last_grid:
                stem = f"{stage}_grid" if stage == "test" else f"{stage}_grid_epoch{self.current_epoch:03d}"
                report_grid(evaluator.last_grid, self.trainer.default_root_dir, stem, self.trainer.loggers)
        metrics = distributed.broadcast_object(metrics, src=0)
        self.log_evaluation(stage, metrics)

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

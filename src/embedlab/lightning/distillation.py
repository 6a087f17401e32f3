"""The distillation LightningModule: a student bi-encoder learns from a teacher's embeddings and/or scores.

Two recipes (:class:`~embedlab.losses.distillation.DistillationLoss` weighs their terms):

- **embedding distillation**: the student embeds each training text where the teacher does (MSE), e.g. a
  layer-reduced student (:func:`embedlab.models.student.layer_reduced`) on a text collection
  (``data=distill_texts``). The teacher embeds every training text **once**, before the first step
  (through the :class:`~embedlab.cache.EmbeddingCache` when ``teacher_cache_dir`` is set, so later runs and
  sweep jobs read them); the steps read rows of that table. ``teacher_per_step=true`` runs the teacher in
  every step instead (for data too large to embed ahead, or augmented text).
- **score distillation**: the student's scores of each query's candidates (positive + hard negatives) match a
  teacher's stored scores (``python score.py``: margin-MSE or KL), usually next to MNRL on the same pairs.

A student narrower than its teacher (384-d vs 768-d) is compared through a learned linear projection to the
teacher's width (``projection``, trained with the student, not saved with it: the saved student is a plain
sentence-transformers folder of its own width). Everything else (evaluation, GradCache, DDP, checkpoints) is the
bi-encoder's: this module only changes what a batch's embeddings are turned into before the loss.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Callable, Mapping

import torch
from torch import nn

from embedlab import distributed
from embedlab.errors import ConfigError
from embedlab.lightning.module import BiEncoderModule
from embedlab.losses.distillation import DistillationBatch, DistillationLoss
from embedlab.models.bi_encoder import BiEncoder
from embedlab.models.st_format import KINDS

log = logging.getLogger(__name__)



class DistillationModule(BiEncoderModule):
    """Train a student :class:`BiEncoder` (``model``) from a teacher with a :class:`DistillationLoss`.

    Args:
        model: the student.
        loss: the weighted distillation terms (and optional contrastive term).
        teacher: the teacher bi-encoder whose embeddings the student imitates (needed when ``loss.embedding > 0``;
            score distillation reads stored scores and needs none). Frozen; not saved in checkpoints.
        teacher_cache_dir: a folder for the teacher's embeddings (:class:`~embedlab.cache.EmbeddingCache`), shared
            by runs, sweep jobs and DDP ranks; ``None``: embed them in memory at the start of every fit.
        teacher_batch_size: the teacher's encoding batch size.
        teacher_per_step: run the teacher inside each training step instead of once ahead.
        projection: map the student's embeddings to the teacher's width with a learned bias-free linear layer:
            ``None`` (auto) when the widths differ, ``True`` always, ``False`` never (widths must then agree).
        optimizer, scheduler, bi_encoder_options: as :class:`BiEncoderModule` (``grad_cache_mini_batch_size``,
            ``lr_multipliers``, ``evaluation``, ...).
    """

    def __init__(
        self,
        model: BiEncoder,
        loss: DistillationLoss,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        teacher: BiEncoder | None = None,
        teacher_cache_dir: str | None = None,
        teacher_batch_size: int = 64,
        teacher_per_step: bool = False,
        projection: bool | None = None,
        **bi_encoder_options: Any,
    ) -> None:
        if not isinstance(loss, DistillationLoss):
            raise ConfigError(
                f"module=distillation trains with a distillation loss (loss=distill_mse, distill_kl, distill_margin_mse), "
                f"got {type(loss).__name__}"
            )
        if loss.needs_teacher_embeddings and teacher is None:
            raise ConfigError("loss.embedding > 0 needs a teacher model: set module.teacher (a bi-encoder config)")
        super().__init__(model, loss, optimizer, scheduler, **bi_encoder_options)
        self.projection: nn.Linear | None = None
        # the teacher is held outside the module's parameters: not trained, not in checkpoints or the optimizer
        self._teacher = {"model": teacher.eval().requires_grad_(False) if teacher is not None else None}
        self.teacher_cache_dir = teacher_cache_dir
        self.teacher_batch_size = int(teacher_batch_size)
        self.teacher_per_step = bool(teacher_per_step)
        self._teacher_rows: dict[tuple[str, str], int] = {}
        self._teacher_table: torch.Tensor | None = None  # (T, D_t) every training text's teacher embedding, CPU
        if teacher is not None and loss.needs_teacher_embeddings:
            widths = (model.embedding_dim, teacher.embedding_dim)
            if projection is None:
                projection = widths[0] != widths[1]
            if not projection and widths[0] != widths[1]:
                raise ConfigError(
                    f"the student embeds in {widths[0]} dimensions, the teacher in {widths[1]}: "
                    "set module.projection=true (or null) to learn a projection to the teacher's width"
                )
            if projection:
                self.projection = nn.Linear(widths[0], widths[1], bias=False)

    @property
    def teacher(self) -> BiEncoder | None:
        return self._teacher["model"]

    # ------------------------------------------------------------------ the teacher's embeddings, once
    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self.teacher is None or not self.loss.needs_teacher_embeddings:
            return
        if self.teacher_per_step:
            self.teacher.to(self.device)
            return
        examples = self.trainer.datamodule.train_examples
        self.prepare_teacher_embeddings(teacher_texts(examples))

    def prepare_teacher_embeddings(self, texts: Mapping[str, list[str]]) -> None:
        """Embed ``texts`` (``{kind: [text, ...]}``, each text once) with the teacher into the lookup table the
        steps read. With a cache under DDP, rank 0 encodes and stores first; the other ranks then read its rows."""
        from embedlab.cache import EmbeddingCache

        device = self.device if self._trainer is not None else torch.device("cpu")
        teacher = self.teacher.to(device)
        cache = EmbeddingCache(self.teacher_cache_dir) if self.teacher_cache_dir else None
        encode = functools.partial(cache.encode, teacher) if cache is not None else teacher.encode
        shared = cache is not None and distributed.world_size() > 1
        if shared and distributed.rank() != 0:
            torch.distributed.barrier()  # wait for rank 0 to store every row
        rows: dict[tuple[str, str], int] = {}
        tables = []
        for kind in KINDS:
            batch = list(texts.get(kind) or [])
            if batch:
                emb = encode(batch, kind=kind, batch_size=self.teacher_batch_size, show_progress_bar=True, desc=f"teacher ({kind})")
                start = len(rows)
                rows.update({(kind, t): start + i for i, t in enumerate(batch)})
                tables.append(emb.float())  # (n_kind, D_t)
        if shared and distributed.rank() == 0:
            torch.distributed.barrier()
        teacher.to("cpu")  # the table is all the steps need
        self._teacher_rows = rows
        self._teacher_table = torch.cat(tables) if tables else None  # (T, D_t)
        log.info("teacher embeddings: %d texts", len(rows))

    def teacher_embeddings(self, queries: list[str], docs: list[str]) -> torch.Tensor:
        """(len(queries) + len(docs), D_t) the teacher's embeddings of a batch's texts, on the module's device."""
        if self.teacher_per_step:
            with torch.no_grad():
                parts = [self.teacher(self._tokenize_with(self.teacher, t, k)) for t, k in ((queries, "query"), (docs, "document")) if t]
            return torch.cat(parts).float() if parts else torch.zeros(0, self.teacher.embedding_dim, device=self.device)
        if self._teacher_table is None:
            raise ConfigError("teacher embeddings were not prepared (the module's fit did not start: call prepare_teacher_embeddings)")
        try:
            index = [self._teacher_rows[("query", t)] for t in queries] + [self._teacher_rows[("document", t)] for t in docs]
        except KeyError as err:
            raise ConfigError(
                f"a training text has no teacher embedding ({str(err)[:80]}...): the table covers the datamodule's "
                "train_examples at fit start; set module.teacher_per_step=true for texts made during training"
            ) from None
        return self._teacher_table[index].to(self.device)

    def _tokenize_with(self, model: BiEncoder, texts: list[str], kind: str) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device) for k, v in model.tokenize(texts, kind).items()}

    # ------------------------------------------------------------------ training
    def embed(self, texts: list[str], kind: str) -> torch.Tensor:
        if not texts:  # a batch of unlabelled texts may hold no query or no document
            return torch.zeros(0, self.model.embedding_dim, device=self.device)
        return super().embed(texts, kind)

    def assemble(self, batch: dict, query: torch.Tensor, docs: torch.Tensor) -> DistillationBatch:
        """The student's query (Bq, D) and document (Bd, D) embeddings of ``batch`` -> the loss's
        :class:`DistillationBatch` (pairs for score/contrastive terms, every text for the embedding term)."""
        paired = batch.get("paired", True)
        embedded = super().assemble(batch, query, docs) if paired else None
        student = teacher = None
        if self.loss.needs_teacher_embeddings:
            queries, documents = self.batch_texts(batch)
            student = torch.cat([query, docs])  # (Bq + Bd, D)
            if self.projection is not None:
                student = self.projection(student)  # (Bq + Bd, D_t)
            teacher = self.teacher_embeddings(queries, documents)  # (Bq + Bd, D_t)
        return DistillationBatch(embedded=embedded, student=student, teacher=teacher, teacher_scores=batch.get("teacher_scores"))


def teacher_texts(examples) -> dict[str, list[str]]:
    """``{kind: [text, ...]}``: every text the training examples embed (queries as queries; positives and hard
    negatives as documents), each once, in first-seen order."""
    seen = {kind: {} for kind in KINDS}
    for e in examples:
        if e.query is not None:
            seen["query"].setdefault(e.query, None)
        for doc in ([e.positive] if e.positive is not None else []) + list(e.negatives):
            seen["document"].setdefault(doc, None)
    return {kind: list(texts) for kind, texts in seen.items()}

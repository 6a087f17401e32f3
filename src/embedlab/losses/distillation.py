"""Distillation losses: a student learns from a teacher's embeddings or from a teacher's scores.

Two recipes, both pure functions of tensors the module computed once per batch (no model call here):

| loss | inputs | the student learns |
|---|---|---|
| :class:`EmbeddingMSELoss` | student embeddings (N, D_t) (projected if widths differ), teacher embeddings (N, D_t) | to put every text where the teacher puts it (Reimers & Gurevych 2020, "Making Monolingual Sentence Embeddings Multilingual using Knowledge Distillation"; sentence-transformers' ``MSELoss``) |
| :class:`~embedlab.losses.ranking.MarginMSELoss` | :class:`ScoredCandidates` with teacher scores | the teacher's positive-negative score margins (Hofstätter et al. 2020) |
| :class:`KLDivergenceLoss` | :class:`ScoredCandidates` with teacher scores | the teacher's distribution over each query's candidate list (Hinton et al. 2015; the listwise "KL" of RocketQAv2 / ColBERTv2 training) |

A bi-encoder's candidate scores come from its embeddings through :func:`candidate_scores`, so the score losses of
cross-encoders (margin-MSE, KL) serve bi-encoders unchanged. :class:`DistillationLoss` sums the terms a recipe
uses with weights, optionally with a contrastive loss (MNRL) on the same batch's labelled pairs, and returns
every term by name (``train/embedding_mse``, ``train/kl``, ``train/mnrl``...).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from embedlab.errors import ConfigError
from embedlab.losses.base import EmbeddedBatch, pairwise_similarity
from embedlab.losses.ranking import MarginMSELoss, ScoredCandidates

__all__ = [
    "DistillationBatch",
    "DistillationLoss",
    "EmbeddingMSELoss",
    "KLDivergenceLoss",
    "candidate_scores",
    "kl_divergence",
]


def kl_divergence(teacher: torch.Tensor, student: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher / T) || softmax(student / T))``, mean over rows.

    ``teacher`` / ``student``: (B, C) logits of the same candidates. ``-inf`` (masked) teacher columns have
    probability 0 and contribute nothing. The ``T^2`` factor keeps gradient magnitudes comparable across
    temperatures (Hinton et al. 2015, "Distilling the Knowledge in a Neural Network").
    """
    t = F.log_softmax(teacher / temperature, dim=-1)  # (B, C)
    s = F.log_softmax(student / temperature, dim=-1)
    kept = torch.isfinite(t)  # masked candidates: probability 0 in both, no contribution
    per_row = (t.exp() * (t - s).masked_fill(~kept, 0.0)).sum(-1)  # (B,)
    return per_row.mean() * temperature**2


class EmbeddingMSELoss(nn.Module):
    """Mean squared error between student and teacher embeddings of the same texts.

    ``loss = mean over texts and dimensions of (s - t)^2`` (``nn.MSELoss``, as sentence-transformers'
    ``MSELoss``). Inputs: ``student`` (N, D) and ``teacher`` (N, D); a student narrower than its teacher is
    projected to the teacher's width before this (the distillation module's learned projection).
    """

    consumes = "teacher_embeddings"

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> dict[str, torch.Tensor]:
        if student.shape != teacher.shape:
            raise ConfigError(
                f"EmbeddingMSELoss: student embeddings {tuple(student.shape)} and teacher embeddings "
                f"{tuple(teacher.shape)} differ in shape (a width mismatch needs the module's projection)"
            )
        loss = F.mse_loss(student, teacher.to(student.dtype))
        return {"loss": loss, "embedding_mse": loss}


class KLDivergenceLoss(nn.Module):
    """KL divergence from the teacher's to the student's softmax over each query's candidates.

    ``loss = T^2 * mean over queries of KL(softmax(t / T) || softmax(s / T))`` with ``s`` the student's scores
    and ``t`` the teacher's (both (B, L), column 0 the positive); masked candidates are left out of both
    softmaxes. Unlike :class:`~embedlab.losses.ranking.MarginMSELoss`, only the teacher's *relative* preferences
    within a list matter, not its scale; ``temperature`` sets how soft the teacher's distribution is.
    """

    consumes = "scores"

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        if not temperature > 0:
            raise ConfigError(f"KLDivergenceLoss temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)

    def forward(self, batch: ScoredCandidates) -> dict[str, torch.Tensor]:
        if batch.teacher_scores is None:
            raise ConfigError(
                "KLDivergenceLoss needs teacher scores for every candidate (batch.teacher_scores is None): "
                "score the training file first (python score.py, docs/distillation.md)"
            )
        scores = batch.scores
        teacher = batch.teacher_scores.to(device=scores.device, dtype=scores.dtype)
        valid = batch.valid
        # masked candidates: -inf in both, so they get probability 0 and no gradient
        teacher = teacher.masked_fill(~valid, float("-inf"))
        student = scores.masked_fill(~valid, float("-inf"))
        loss = kl_divergence(teacher, student, self.temperature)
        return {"loss": loss, "kl": loss}


def candidate_scores(
    batch: EmbeddedBatch, similarity: str = "cos", scale: float = 1.0, teacher_scores: torch.Tensor | None = None
) -> ScoredCandidates:
    """A bi-encoder's scores of each query's own candidates: ``scale * sim(q_b, [p_b, n_b1 .. n_bn])``.

    ``batch``: query (B, D), positive (B, D), negatives (B, n, D) or ``None``; returns (B, 1 + n) scores with
    labels 1 for the positive and 0 for the negatives, and ``teacher_scores`` (B, 1 + n) attached, so the
    cross-encoders' score losses apply to a bi-encoder student. ``scale`` (e.g. 20, MNRL's) puts cosine
    similarities in [-scale, scale], a range comparable with a teacher's logits.
    """
    query, docs = batch.query, batch.positive.unsqueeze(1)  # (B, D), (B, 1, D)
    if batch.negatives is not None:
        docs = torch.cat([docs, batch.negatives], dim=1)  # (B, 1 + n, D)
    scores = pairwise_similarity(query.unsqueeze(1).expand_as(docs), docs, similarity) * scale  # (B, 1 + n)
    labels = torch.zeros_like(scores)
    labels[:, 0] = 1.0
    if teacher_scores is not None and teacher_scores.shape != scores.shape:
        raise ConfigError(
            f"teacher scores have shape {tuple(teacher_scores.shape)}, the batch's candidates {tuple(scores.shape)}: "
            "score the same negatives the training file gives (data.train.num_negatives <= the scored ones)"
        )
    return ScoredCandidates(scores=scores, labels=labels, teacher_scores=teacher_scores)


@dataclass
class DistillationBatch:
    """What the distillation losses of one batch read, computed once by the module.

    Attributes:
        embedded: the student's :class:`EmbeddedBatch` of labelled pairs (query, positive, negatives), or ``None``
            for a batch of unlabelled texts.
        student: (N, D_t) the student's embeddings of every text of the batch (projected to the teacher's width
            when they differ), or ``None`` when no embedding term is used.
        teacher: (N, D_t) the teacher's embeddings of the same texts, or ``None``.
        teacher_scores: (B, 1 + n) the teacher's scores of each query's candidates, or ``None``.
    """

    embedded: EmbeddedBatch | None = None
    student: torch.Tensor | None = None
    teacher: torch.Tensor | None = None
    teacher_scores: torch.Tensor | None = None


class DistillationLoss(nn.Module):
    """A weighted sum of distillation terms and an optional contrastive term, each returned by name.

    ``loss = embedding * embedding_mse + margin_mse * margin_mse + kl * kl + contrastive_weight * contrastive``;
    a term with weight 0 is not computed. Terms that need what a batch lacks are skipped for that batch:
    the score terms and the contrastive term need labelled pairs (a batch of unlabelled texts only has an
    embedding term); a batch without any applicable term is an error.

    Args:
        embedding: weight of :class:`EmbeddingMSELoss` (needs the teacher's embeddings: ``module.teacher``).
        margin_mse / kl: weights of margin-MSE and :class:`KLDivergenceLoss` on the student's candidate scores
            (:func:`candidate_scores`) against the teacher's scores stored with the training file.
        contrastive: an embedding loss on the labelled pairs (e.g. :class:`MultipleNegativesRankingLoss`), or ``None``.
        contrastive_weight: its weight.
        contrastive_negatives: give the contrastive term the batch's hard negatives too (``False``: in-batch
            negatives only, so the scored hard negatives reach the student only through the teacher's scores).
        temperature: the KL term's temperature.
        score_scale: the factor on the student's similarities before the score terms (MNRL's 20 by default).
        similarity: ``cos`` or ``dot`` for the student's candidate scores.
    """

    def __init__(
        self,
        embedding: float = 0.0,
        margin_mse: float = 0.0,
        kl: float = 0.0,
        contrastive: nn.Module | None = None,
        contrastive_weight: float = 1.0,
        contrastive_negatives: bool = True,
        temperature: float = 1.0,
        score_scale: float = 20.0,
        similarity: str = "cos",
    ) -> None:
        super().__init__()
        weights = {"embedding": embedding, "margin_mse": margin_mse, "kl": kl, "contrastive_weight": contrastive_weight}
        for name, value in weights.items():
            if not float(value) >= 0:
                raise ConfigError(f"DistillationLoss {name} must be >= 0, got {value}")
        self.weights = {"embedding_mse": float(embedding), "margin_mse": float(margin_mse), "kl": float(kl)}
        self.contrastive = contrastive
        self.contrastive_weight = float(contrastive_weight) if contrastive is not None else 0.0
        self.contrastive_negatives = bool(contrastive_negatives)
        if not any(self.weights.values()) and not self.contrastive_weight:
            raise ConfigError("DistillationLoss: every term has weight 0 (set embedding, margin_mse, kl or a contrastive loss)")
        self.embedding_mse = EmbeddingMSELoss()
        self.margin = MarginMSELoss()
        self.kl_loss = KLDivergenceLoss(temperature)
        self.score_scale = float(score_scale)
        self.similarity = similarity

    @property
    def needs_teacher_embeddings(self) -> bool:
        return self.weights["embedding_mse"] > 0

    @property
    def needs_teacher_scores(self) -> bool:
        return self.weights["margin_mse"] > 0 or self.weights["kl"] > 0

    def forward(self, batch: DistillationBatch) -> dict[str, torch.Tensor]:
        terms: dict[str, torch.Tensor] = {}
        total = None

        def add(name: str, weight: float, value: torch.Tensor) -> None:
            nonlocal total
            terms[name] = value
            total = weight * value if total is None else total + weight * value

        if self.weights["embedding_mse"]:
            if batch.student is None or batch.teacher is None:
                raise ConfigError("DistillationLoss: embedding > 0 needs the teacher's embeddings (module.teacher)")
            add("embedding_mse", self.weights["embedding_mse"], self.embedding_mse(batch.student, batch.teacher)["loss"])
        if batch.embedded is not None and (self.weights["margin_mse"] or self.weights["kl"]):
            if batch.teacher_scores is None:
                raise ConfigError(
                    "DistillationLoss: margin_mse / kl need the teacher's score of every candidate: train on a file "
                    "scored by `python score.py` (data.train.hard_negatives=<scored file>)"
                )
            scored = candidate_scores(batch.embedded, self.similarity, self.score_scale, batch.teacher_scores)
            if self.weights["margin_mse"]:
                add("margin_mse", self.weights["margin_mse"], self.margin(scored)["loss"])
            if self.weights["kl"]:
                add("kl", self.weights["kl"], self.kl_loss(scored)["loss"])
        if batch.embedded is not None and self.contrastive_weight:
            pairs = batch.embedded if self.contrastive_negatives else replace(batch.embedded, negatives=None, negative_ids=None)
            inner = self.contrastive(pairs)
            named = {k: v for k, v in inner.items() if k != "loss"}  # e.g. {"mnrl"}, {"mnrl", "mnrl_backward"}
            # one named term is the contrastive loss itself; several are parts of it, logged beside "contrastive"
            name = next(iter(named)) if len(named) == 1 else "contrastive"
            terms.update(named)
            add(name, self.contrastive_weight, inner["loss"])
        if total is None:
            raise ConfigError(
                "DistillationLoss: no term applies to this batch (unlabelled texts need embedding > 0; "
                "score and contrastive terms need (query, positive) pairs)"
            )
        terms["loss"] = total
        return terms

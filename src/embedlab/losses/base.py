"""What every bi-encoder loss consumes: the embeddings of one batch, computed once by the module.

Losses never call the model. The LightningModule embeds a batch into an :class:`EmbeddedBatch` and calls the
loss on it, so wrappers compose by transforming embeddings (Matryoshka truncates them, GradCache computes them
in chunks, cross-device negatives gather them) instead of patching the model's forward.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

import torch
import torch.nn.functional as F

from embedlab.errors import ConfigError


@dataclass
class EmbeddedBatch:
    """Embeddings of one training batch.

    Attributes:
        query: (B, D) anchors / first texts.
        positive: (B, D) positives / second texts.
        negatives: (B, n, D) hard negatives per query, or ``None``.
        scores: (B,) gold similarity in [0, 1] or 0/1 labels for scored-pair losses, or ``None``.
        query_ids / positive_ids / negative_ids: text ids for false-negative masking (``None`` = unknown).
    """

    query: torch.Tensor
    positive: torch.Tensor
    negatives: torch.Tensor | None = None
    scores: torch.Tensor | None = None
    query_ids: list | None = None
    positive_ids: list | None = None
    negative_ids: list | None = None
    extras: dict = field(default_factory=dict)

    @classmethod
    def from_collated(cls, batch: dict, query: torch.Tensor, docs: torch.Tensor, normalized: bool) -> "EmbeddedBatch":
        """A collated training batch (:func:`embedlab.data.collate.collate_examples`) with its query ``(B, D)`` and
        document ``(B + B*n, D)`` embeddings (positives, then each example's ``n`` negatives in order);
        ``normalized``: the embeddings come L2-normalized from the model (Matryoshka re-normalizes its slices)."""
        b = len(batch["query"])
        n = batch["num_negatives"]
        return cls(
            query=query,
            positive=docs[:b],
            negatives=docs[b:].view(b, n, -1) if n else None,  # (B, n, D)
            scores=batch["scores"].to(query.device) if batch["scores"] is not None else None,
            query_ids=batch["query_ids"],
            positive_ids=batch["positive_ids"],
            negative_ids=batch["negative_ids"],
            extras={
                "normalized": normalized,
                "dataset": batch.get("dataset"),
                "known_positive_ids": batch.get("known_positive_ids"),
            },
        )

    def map_embeddings(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "EmbeddedBatch":
        """The same batch with ``fn`` applied to every embedding tensor (e.g. Matryoshka truncation)."""
        return replace(
            self,
            query=fn(self.query),
            positive=fn(self.positive),
            negatives=None if self.negatives is None else fn(self.negatives),
        )


def similarity_matrix(a: torch.Tensor, b: torch.Tensor, similarity: str = "cos") -> torch.Tensor:
    """(N, D) x (M, D) -> (N, M) pairwise ``cos`` or ``dot`` similarity."""
    if similarity == "cos":
        a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    elif similarity != "dot":
        raise ConfigError(f"similarity must be 'cos' or 'dot', got {similarity!r}")
    return a @ b.T


def pairwise_similarity(a: torch.Tensor, b: torch.Tensor, similarity: str = "cos") -> torch.Tensor:
    """(N, D) x (N, D) -> (N,) row-wise ``cos`` or ``dot`` similarity."""
    if similarity == "cos":
        return F.cosine_similarity(a, b, dim=-1)
    if similarity == "dot":
        return (a * b).sum(-1)
    raise ConfigError(f"similarity must be 'cos' or 'dot', got {similarity!r}")


def require(batch: EmbeddedBatch, loss_name: str, negatives: bool = False, scores: bool = False) -> None:
    """Fail early, with the loss's name, when the data does not carry what the loss needs."""
    if negatives and batch.negatives is None:
        raise ConfigError(f"{loss_name} needs a negative per example: use triplet data (query, positive, negative)")
    if scores and batch.scores is None:
        raise ConfigError(f"{loss_name} needs a score per pair: use scored-pair data (text1, text2, score)")

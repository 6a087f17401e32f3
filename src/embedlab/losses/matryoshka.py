"""Matryoshka Representation Learning as a wrapper around any embedding loss."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from embedlab.losses.base import EmbeddedBatch


class MatryoshkaLoss(nn.Module):
    """Weighted sum of an inner loss applied to the first ``d`` dimensions, for every ``d`` in ``dims``.

    Kusupati et al. 2022, "Matryoshka Representation Learning": training every prefix of the embedding to
    work on its own lets users truncate vectors (e.g. 384 -> 64 dims) at inference at little cost.

    The batch is embedded once; each dimension only slices it (``EmbeddedBatch.map_embeddings``), so the
    wrapper composes with GradCache and cross-device negatives (they act on the full embeddings, the slices
    follow). When the model L2-normalizes its output (``batch.extras["normalized"]``), each slice is
    re-normalized, as a user truncating normalized vectors would do.

    Args:
        loss: the inner loss (mnrl, cosent, triplet, ...).
        dims: prefix sizes, e.g. ``[384, 256, 128, 64, 32]``.
        weights: one weight per dim (default 1 each).

    Returns ``{"loss": sum_d w_d * inner_d, "<term>@dim<d>": ...}`` for each term of the inner loss.
    """

    def __init__(self, loss: nn.Module, dims: Sequence[int], weights: Sequence[float] | None = None) -> None:
        super().__init__()
        if not dims:
            raise ValueError("matryoshka dims must list at least one dimension")
        weights = list(weights) if weights is not None else [1.0] * len(dims)
        if len(weights) != len(dims):
            raise ValueError(f"matryoshka weights ({len(weights)}) must match dims ({len(dims)})")
        self.loss = loss
        self.dims = [int(d) for d in dims]
        self.weights = [float(w) for w in weights]

    def forward(self, batch: EmbeddedBatch) -> dict[str, torch.Tensor]:
        full = batch.query.shape[-1]
        too_big = [d for d in self.dims if d > full or d < 1]
        if too_big:
            raise ValueError(f"matryoshka dims {too_big} are not in 1..{full} (the model's embedding size)")
        renormalize = batch.extras.get("normalized", True)
        terms: dict[str, torch.Tensor] = {}
        total = None
        for dim, weight in zip(self.dims, self.weights):

            def truncate(t: torch.Tensor, dim: int = dim) -> torch.Tensor:
                t = t[..., :dim]  # (..., d)
                return F.normalize(t, dim=-1) if renormalize else t

            inner = self.loss(batch.map_embeddings(truncate))
            for name, value in inner.items():
                if name != "loss":
                    terms[f"{name}@dim{dim}"] = value
            total = weight * inner["loss"] if total is None else total + weight * inner["loss"]
        terms["loss"] = total
        return terms

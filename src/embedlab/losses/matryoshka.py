"""Matryoshka Representation Learning as a wrapper around any embedding loss."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from embedlab.errors import ConfigError
from embedlab.losses.base import EmbeddedBatch
from embedlab.losses.distillation import kl_divergence


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
        distill_weight: self-distillation from the largest dim to the others (0 = off). Each smaller dim d
            adds ``distill_weight * w_d * T^2 * KL(softmax(z_max / T) || softmax(z_d / T))`` per query,
            averaged over queries, where z are the inner loss's query -> candidate logits
            (``forward_with_logits(batch)``, so mnrl / cached mnrl; the ones its loss term already computed)
            and z_max is detached: the truncated embedding learns the full one's ranking of every in-batch
            candidate, not only the target. The idea is that of 2D Matryoshka
            Sentence Embeddings (Li et al. 2024) and of Hinton et al. 2015's temperature-scaled KD.
        distill_temperature: T above.

    Returns ``{"loss": sum_d w_d * inner_d [+ distill terms], "<term>@dim<d>": ..., "distill@dim<d>": ...}``.
    """

    def __init__(
        self,
        loss: nn.Module,
        dims: Sequence[int],
        weights: Sequence[float] | None = None,
        distill_weight: float = 0.0,
        distill_temperature: float = 1.0,
    ) -> None:
        super().__init__()
        if not dims:
            raise ConfigError("matryoshka dims must list at least one dimension")
        weights = list(weights) if weights is not None else [1.0] * len(dims)
        if len(weights) != len(dims):
            raise ConfigError(f"matryoshka weights ({len(weights)}) must match dims ({len(dims)})")
        self.loss = loss
        self.dims = [int(d) for d in dims]
        self.weights = [float(w) for w in weights]
        self.distill_weight = float(distill_weight)
        self.distill_temperature = float(distill_temperature)
        if self.distill_weight < 0 or self.distill_temperature <= 0:
            raise ConfigError(
                f"matryoshka distill_weight must be >= 0 and distill_temperature > 0, "
                f"got {distill_weight} and {distill_temperature}"
            )
        if self.distill_weight > 0 and not callable(getattr(loss, "forward_with_logits", None)):
            raise ConfigError(
                f"matryoshka distill_weight needs an inner loss with query -> candidate logits (mnrl, cached_mnrl); "
                f"{type(loss).__name__} has no forward_with_logits(batch)"
            )

    def forward(self, batch: EmbeddedBatch) -> dict[str, torch.Tensor]:
        full = batch.query.shape[-1]
        too_big = [d for d in self.dims if d > full or d < 1]
        if too_big:
            raise ConfigError(f"matryoshka dims {too_big} are not in 1..{full} (the model's embedding size)")
        renormalize = batch.extras.get("normalized", True)
        terms: dict[str, torch.Tensor] = {}
        total = None
        logits = {}  # dim -> (B, C) inner logits, kept only for distillation
        for dim, weight in zip(self.dims, self.weights):

            def truncate(t: torch.Tensor, dim: int = dim) -> torch.Tensor:
                t = t[..., :dim]  # (..., d)
                return F.normalize(t, dim=-1) if renormalize else t

            if self.distill_weight > 0:
                inner, logits[dim] = self.loss.forward_with_logits(batch.map_embeddings(truncate))
            else:
                inner = self.loss(batch.map_embeddings(truncate))
            for name, value in inner.items():
                if name != "loss":
                    terms[f"{name}@dim{dim}"] = value
            total = weight * inner["loss"] if total is None else total + weight * inner["loss"]
        if self.distill_weight > 0:
            teacher_dim = max(self.dims)
            teacher = logits[teacher_dim].detach()  # (B, C)
            for dim, weight in zip(self.dims, self.weights):
                if dim == teacher_dim:
                    continue
                kl = kl_divergence(teacher, logits[dim], self.distill_temperature)
                terms[f"distill@dim{dim}"] = kl
                total = total + self.distill_weight * weight * kl
        terms["loss"] = total
        return terms

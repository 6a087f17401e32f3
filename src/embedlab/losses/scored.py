"""Losses on scored pairs (text1, text2, gold similarity)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from embedlab.losses.base import EmbeddedBatch, pairwise_similarity, require


class CoSENTLoss(nn.Module):
    """CoSENT (Su 2022; used by sentence-transformers' CoSENTLoss): a ranking loss over pair similarities.

    For every two pairs (i, j) in the batch with gold ``score_i > score_j`` it penalises
    ``cos_j > cos_i``: ``log(1 + sum exp(scale * (cos_j - cos_i)))``. Only the order of the gold scores
    matters, which is what Spearman correlation measures, so it trains STS models better than MSE on cosine.
    """

    def __init__(self, scale: float = 20.0, similarity: str = "cos") -> None:
        super().__init__()
        self.scale = scale
        self.similarity = similarity

    def forward(self, batch: EmbeddedBatch) -> dict[str, torch.Tensor]:
        require(batch, "CoSENT loss", scores=True)
        sims = self.scale * pairwise_similarity(batch.query, batch.positive, self.similarity)  # (B,)
        diff = sims[None, :] - sims[:, None]  # (B, B): diff[i, j] = s_j - s_i
        scores = batch.scores.to(sims.dtype)
        keep = scores[:, None] > scores[None, :]  # pairs where i should score above j
        diff = diff.masked_fill(~keep, float("-inf"))
        # the leading 0 is the "1 +" inside the log
        loss = torch.logsumexp(torch.cat([diff.new_zeros(1), diff.flatten()]), dim=0)
        return {"loss": loss, "cosent": loss}


class CosineSimilarityLoss(nn.Module):
    """Mean squared error between ``cos(text1, text2)`` and the gold score in [0, 1] (SBERT's STS loss)."""

    def forward(self, batch: EmbeddedBatch) -> dict[str, torch.Tensor]:
        require(batch, "cosine similarity loss", scores=True)
        cos = pairwise_similarity(batch.query, batch.positive)  # (B,)
        loss = F.mse_loss(cos, batch.scores.to(cos.dtype))
        return {"loss": loss, "cosine_mse": loss}

"""Contrastive losses on (query, positive[, negatives]) embeddings."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from embedlab import distributed
from embedlab.losses.base import EmbeddedBatch, pairwise_similarity, require, similarity_matrix


class MultipleNegativesRankingLoss(nn.Module):
    """In-batch-negative contrastive loss (InfoNCE; MultipleNegativesRanking in sentence-transformers).

    For query i the candidates are every positive in the batch plus every hard negative; the loss is the
    cross-entropy of ``scale * sim(q_i, candidates)`` with the target at positive i. Other queries'
    positives act as negatives for free (Henderson et al. 2017, "Efficient Natural Language Response
    Suggestion for Smart Reply"; van den Oord et al. 2018, InfoNCE). ``scale`` is 1 / temperature.

    Args:
        scale: logit multiplier (20 = temperature 0.05, the sentence-transformers default).
        similarity: ``cos`` or ``dot``.
        symmetric: also the positive -> query direction over the batch's queries, averaged with the
            forward term (MultipleNegativesSymmetricRankingLoss; CLIP's loss).
        gather_across_devices: under DDP, score local queries against the candidates of every rank
            (gathered with gradients, labels offset by rank x local batch). No effect in one process.
        mask_duplicates: a candidate whose id equals query i's positive id (the same document appearing
            twice in the global batch) is removed from query i's softmax instead of counted as a negative.

    Returns ``{"loss", "mnrl"}`` (and ``"mnrl_backward"`` when symmetric).
    """

    def __init__(
        self,
        scale: float = 20.0,
        similarity: str = "cos",
        symmetric: bool = False,
        gather_across_devices: bool = False,
        mask_duplicates: bool = False,
    ) -> None:
        super().__init__()
        self.scale = scale
        self.similarity = similarity
        self.symmetric = symmetric
        self.gather_across_devices = gather_across_devices
        self.mask_duplicates = mask_duplicates

    def forward(self, batch: EmbeddedBatch) -> dict[str, torch.Tensor]:
        query, positive = batch.query, batch.positive  # (B, D) each
        b = query.shape[0]
        negatives = None if batch.negatives is None else batch.negatives.reshape(-1, query.shape[-1])  # (B*n, D)
        positive_ids = list(batch.positive_ids or [None] * b)
        negative_ids = list(batch.negative_ids or [None] * (0 if negatives is None else negatives.shape[0]))
        offset = 0
        if self.gather_across_devices and distributed.world_size() > 1:
            positive = distributed.all_gather_with_grad(positive)  # (W*B, D)
            if negatives is not None:
                negatives = distributed.all_gather_with_grad(negatives)  # (W*B*n, D)
            offset = distributed.rank() * b
            if self.mask_duplicates:
                positive_ids = distributed.all_gather_object_list(positive_ids)
                negative_ids = distributed.all_gather_object_list(negative_ids)
        candidates = positive if negatives is None else torch.cat([positive, negatives])  # (C, D)
        logits = self.scale * similarity_matrix(query, candidates, self.similarity)  # (B, C)
        labels = torch.arange(b, device=query.device) + offset
        if self.mask_duplicates:
            logits = logits.masked_fill(
                duplicate_mask(batch.positive_ids, positive_ids + negative_ids, labels, logits.device), float("-inf")
            )
        terms = {"mnrl": F.cross_entropy(logits, labels)}
        if self.symmetric:
            # positive i against the batch's queries (local positives only: their labels are local)
            local_pos_logits = self.scale * similarity_matrix(batch.positive, query, self.similarity)  # (B, B)
            terms["mnrl_backward"] = F.cross_entropy(local_pos_logits, torch.arange(b, device=query.device))
            terms["loss"] = (terms["mnrl"] + terms["mnrl_backward"]) / 2
        else:
            terms["loss"] = terms["mnrl"]
        return terms


def duplicate_mask(query_positive_ids, candidate_ids, labels: torch.Tensor, device) -> torch.Tensor:
    """(B, C) bool: candidate j carries query i's positive id but is not its target column."""
    b, c = len(labels), len(candidate_ids)
    mask = torch.zeros(b, c, dtype=torch.bool)
    if query_positive_ids is None:
        return mask.to(device)
    positions: dict = {}
    for j, cid in enumerate(candidate_ids):
        if cid is not None:
            positions.setdefault(cid, []).append(j)
    for i, pid in enumerate(query_positive_ids):
        for j in positions.get(pid, ()) if pid is not None else ():
            if j != int(labels[i]):
                mask[i, j] = True
    return mask.to(device)


class TripletLoss(nn.Module):
    """Triplet margin loss: ``relu(d(q, p) - d(q, n) + margin)`` averaged over the batch.

    Schroff et al. 2015 (FaceNet); Reimers & Gurevych 2019 use it for SBERT. The first hard negative of
    each example is its ``n``.

    Args:
        distance: ``euclidean`` (default, margin 5 as in sentence-transformers), ``cosine`` (1 - cos) or
            ``manhattan``.
        margin: how much closer the positive must be than the negative.
    """

    DISTANCES = ("euclidean", "cosine", "manhattan")

    def __init__(self, distance: str = "euclidean", margin: float = 5.0) -> None:
        super().__init__()
        if distance not in self.DISTANCES:
            raise ValueError(f"triplet distance must be one of {', '.join(self.DISTANCES)}, got {distance!r}")
        self.distance = distance
        self.margin = margin

    def _dist(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self.distance == "euclidean":
            return F.pairwise_distance(a, b, p=2)
        if self.distance == "manhattan":
            return F.pairwise_distance(a, b, p=1)
        return 1 - F.cosine_similarity(a, b)

    def forward(self, batch: EmbeddedBatch) -> dict[str, torch.Tensor]:
        require(batch, "triplet loss", negatives=True)
        negative = batch.negatives[:, 0]  # (B, D)
        loss = F.relu(self._dist(batch.query, batch.positive) - self._dist(batch.query, negative) + self.margin).mean()
        return {"loss": loss, "triplet": loss}


class ContrastiveLoss(nn.Module):
    """Contrastive loss on labelled pairs (Hadsell, Chopra & LeCun 2006).

    ``score`` is 1 for similar, 0 for dissimilar pairs; with ``d`` the cosine distance
    ``0.5 * (y * d^2 + (1 - y) * relu(margin - d)^2)``: similar pairs are pulled together, dissimilar
    pairs pushed beyond ``margin``.
    """

    def __init__(self, margin: float = 0.5) -> None:
        super().__init__()
        self.margin = margin

    def forward(self, batch: EmbeddedBatch) -> dict[str, torch.Tensor]:
        require(batch, "contrastive loss", scores=True)
        d = 1 - pairwise_similarity(batch.query, batch.positive)  # (B,)
        y = batch.scores.to(d.dtype)
        loss = 0.5 * (y * d.pow(2) + (1 - y) * F.relu(self.margin - d).pow(2)).mean()
        return {"loss": loss, "contrastive": loss}

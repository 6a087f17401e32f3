"""Contrastive losses on (query, positive[, negatives]) embeddings."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from embedlab import distributed
from embedlab.errors import ConfigError
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
        gather_across_devices: under DDP, score the local queries against the candidates of every rank,
            gathered with gradients: ``[all ranks' positives; all ranks' hard negatives]`` (the order a
            single process holding the global batch uses), labels offset by the positives of the ranks
            before this one; the symmetric term scores local positives against every rank's queries.
            Rank r's loss is then the cross-entropy of its queries over the global candidates, and the
            mean over ranks of those losses (what DDP's gradient averaging optimizes) equals the
            single-process loss of the global batch when local batches have equal size. No effect in
            one process.
        mask_duplicates: false-negative masking by id. Candidate j leaves query i's softmax (it is not
            counted as a negative; the target column is never masked) when j is the same document as
            query i's positive, one of query i's known positives (``extras["known_positive_ids"]``, from
            the qrels), or the positive of another pair of the same query. With ``symmetric`` the
            backward direction masks the same pairs the other way round. Works after the gather.

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

    def _forward_logits(self, batch: EmbeddedBatch):
        query, positive = batch.query, batch.positive  # (B, D) each
        b, dim = query.shape
        negatives = query.new_zeros(0, dim) if batch.negatives is None else batch.negatives.reshape(-1, dim)  # (B*n, D)
        ids = _PairIds.of(batch, negatives.shape[0]) if self.mask_duplicates else None
        offset = 0
        all_query, all_positive, all_negatives, all_ids = query, positive, negatives, ids
        if self.gather_across_devices and distributed.world_size() > 1:
            # every rank calls the same collectives, whatever its batch holds (no negatives, fewer rows)
            sizes = distributed.gather_sizes(b, negatives.shape[0], device=query.device)
            offset = sum(s[0] for s in sizes[: distributed.rank()])
            all_positive = distributed.all_gather_with_grad(positive, [s[0] for s in sizes])  # (sum B, D)
            all_negatives = distributed.all_gather_with_grad(negatives, [s[1] for s in sizes])  # (sum B*n, D)
            if self.symmetric:
                all_query = distributed.all_gather_with_grad(query, [s[0] for s in sizes])  # (sum B, D)
            if ids is not None:
                all_ids = _PairIds.concat(distributed.all_gather_objects(ids))
        candidates = torch.cat([all_positive, all_negatives])  # (C, D): [all positives; all negatives]
        logits = self.scale * similarity_matrix(query, candidates, self.similarity)  # (B, C)
        labels = torch.arange(b, device=query.device) + offset
        if ids is not None:
            mask = false_negative_mask(
                row_query_ids=ids.query,
                row_doc_ids=ids.positive,
                row_known_ids=ids.known,
                col_doc_ids=all_ids.positive + all_ids.negative,
                col_query_ids=all_ids.query + [None] * len(all_ids.negative),
                col_known_ids=None,
                labels=labels,
            )
            logits = logits.masked_fill(mask.to(logits.device), float("-inf"))
        return logits, labels, all_query, ids, all_ids

    def forward(self, batch: EmbeddedBatch) -> dict[str, torch.Tensor]:
        return self.forward_with_logits(batch)[0]

    def forward_with_logits(self, batch: EmbeddedBatch) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """``forward``'s terms and the query -> candidate logits (B, C) they came from (gathered and masked as
        above; masked = -inf), so Matryoshka self-distillation reuses them instead of scoring twice."""
        logits, labels, all_query, ids, all_ids = self._forward_logits(batch)
        positive = batch.positive
        terms = {"mnrl": F.cross_entropy(logits, labels)}
        if self.symmetric:
            # positive i against the queries (of every rank under the gather); its own query is the target
            back = self.scale * similarity_matrix(positive, all_query, self.similarity)  # (B, sum B)
            if ids is not None:
                # query j also matches positive i: the same query, or positive i is (a known positive of) j's
                mask = false_negative_mask(
                    row_query_ids=ids.query,
                    row_doc_ids=ids.positive,
                    row_known_ids=None,
                    col_doc_ids=all_ids.positive,
                    col_query_ids=all_ids.query,
                    col_known_ids=all_ids.known,
                    labels=labels,
                )
                back = back.masked_fill(mask.to(back.device), float("-inf"))
            terms["mnrl_backward"] = F.cross_entropy(back, labels)
            terms["loss"] = (terms["mnrl"] + terms["mnrl_backward"]) / 2
        else:
            terms["loss"] = terms["mnrl"]
        return terms, logits


class _PairIds:
    """The ids masking needs, per pair: query id, positive id, known positive ids; per hard negative: its id."""

    def __init__(self, query: list, positive: list, known: list, negative: list) -> None:
        self.query, self.positive, self.known, self.negative = query, positive, known, negative

    @classmethod
    def of(cls, batch: EmbeddedBatch, num_negatives: int) -> "_PairIds":
        b = batch.query.shape[0]
        known = batch.extras.get("known_positive_ids") if batch.extras else None
        return cls(
            list(batch.query_ids or [None] * b),
            list(batch.positive_ids or [None] * b),
            [list(k or ()) for k in known] if known is not None else [[] for _ in range(b)],
            list(batch.negative_ids or [None] * num_negatives),
        )

    @classmethod
    def concat(cls, parts: list["_PairIds"]) -> "_PairIds":
        return cls(*([x for p in parts for x in getattr(p, f)] for f in ("query", "positive", "known", "negative")))


def _codes(ids: list, table: dict) -> torch.Tensor:
    """Ids -> int codes (equal ids, equal codes); ``None`` (unknown) -> -1, which matches nothing."""
    return torch.tensor([-1 if i is None else table.setdefault(i, len(table)) for i in ids], dtype=torch.long)


def _known_codes(known: list[list], table: dict) -> torch.Tensor:
    """Per row a list of ids -> (rows, K) codes padded with -1."""
    width = max((len(k) for k in known), default=0)
    out = torch.full((len(known), max(width, 1)), -1, dtype=torch.long)
    for i, ks in enumerate(known):
        if ks:
            out[i, : len(ks)] = _codes(ks, table)
    return out


def _equal(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N,) x (M,) codes -> (N, M) bool: equal and known."""
    return (a[:, None] == b[None, :]) & (a[:, None] >= 0)


def false_negative_mask(
    row_query_ids: list,
    row_doc_ids: list,
    row_known_ids: list[list] | None,
    col_doc_ids: list,
    col_query_ids: list,
    col_known_ids: list[list] | None,
    labels: torch.Tensor,
) -> torch.Tensor:
    """(rows, cols) bool: column j is a true match of row i's pair but not row i's target column.

    Row i is a pair (query id, doc id, known positive ids of the query); column j is a text with a doc id
    and, when it belongs to a pair, that pair's query id (and known positives). j matches i when: the same
    doc as i's doc; j's doc is a known positive of i's query; j's pair has i's query; or i's doc is a known
    positive of j's query. Vectorized over integer codes of the ids (no Python loop over rows x columns).
    """
    table: dict = {}
    rq, rd, cd, cq = (_codes(x, table) for x in (row_query_ids, row_doc_ids, col_doc_ids, col_query_ids))
    mask = _equal(rd, cd) | _equal(rq, cq)
    if row_known_ids is not None:
        known = _known_codes(row_known_ids, table)  # (rows, K)
        mask |= ((known[:, :, None] == cd[None, None, :]) & (known[:, :, None] >= 0)).any(1)
    if col_known_ids is not None:
        known = _known_codes(col_known_ids, table)  # (cols, K)
        mask |= ((known.T[:, None, :] == rd[None, :, None]) & (known.T[:, None, :] >= 0)).any(0)
    mask[torch.arange(len(labels)), labels.cpu()] = False
    return mask


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
            raise ConfigError(f"triplet distance must be one of {', '.join(self.DISTANCES)}, got {distance!r}")
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

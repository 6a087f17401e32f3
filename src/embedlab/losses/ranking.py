"""Score losses for cross-encoders: pure functions of each query's candidate scores.

A cross-encoder reads a (query, document) pair together and outputs one raw logit. The cross-encoder module
scores every candidate of a query, lays the logits out as a ``(B, L)`` matrix (row = query, column 0 = its
positive for grouped data) and calls the loss on a :class:`ScoredCandidates`; the loss never calls the model.
Each loss declares ``consumes = "scores"`` so the module can refuse a bi-encoder loss (which has no such
attribute) with a clear error.

| loss | needs | trains the model to |
|---|---|---|
| :class:`BinaryCrossEntropyLoss` | labels (0/1 or soft) | output calibrated relevance probabilities, pointwise |
| :class:`ListwiseSoftmaxLoss` | L >= 2 | put the positive above its negatives (softmax CE, LCE) |
| :class:`RankNetLoss` | graded labels | order every pair of candidates by label |
| :class:`LambdaLoss` | graded labels | the same, pairs weighted by their effect on nDCG |
| :class:`MarginMSELoss` | teacher scores, L >= 2 | copy a teacher's positive-negative margins |

All of them equal sentence-transformers' cross-encoder losses of the same name on the same logits and labels
(with ``activation_fn=Identity``, their default except in ST's MultipleNegativesRankingLoss); the class
docstrings say how and where a convention had to be chosen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from embedlab.errors import ConfigError

# Score given to masked candidates in the pairwise losses: sorts them below every real logit and keeps
# score differences finite (an -inf would turn -inf - -inf into NaN). Same value as sentence-transformers.
_PAD_SCORE = -1e16

_NEGATIVES_HINT = (
    "give each query negatives with data.train.num_negatives >= 1 "
    "(taken from data.train.hard_negatives or data.train.random_negatives)"
)


@dataclass
class ScoredCandidates:
    """The scores of one batch of queries' candidates, computed once by the cross-encoder module.

    Attributes:
        scores: (B, L) raw logits of each query's L candidates; column 0 is the positive for grouped data
            (query, positive, negatives...); L = 1 for scored pairs (query, document, label).
        labels: (B, L) float relevance in [0, 1]: 1 for positives, 0 for negatives, soft for graded data
            (e.g. an STS gold score / 5).
        teacher_scores: (B, L) a teacher's scores of the same candidates (distillation), or ``None``.
        mask: (B, L) bool, ``True`` for real candidates (``False`` pads queries with fewer candidates), or
            ``None`` when every candidate is real.
        extras: anything else the module wants to pass along (not read by these losses).
    """

    scores: torch.Tensor
    labels: torch.Tensor
    teacher_scores: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    extras: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.scores.dim() != 2:
            raise ValueError(f"ScoredCandidates.scores must be (B, L), got shape {tuple(self.scores.shape)}")
        for name in ("labels", "teacher_scores", "mask"):
            value = getattr(self, name)
            if value is not None and value.shape != self.scores.shape:
                raise ValueError(
                    f"ScoredCandidates.{name} has shape {tuple(value.shape)}, "
                    f"but scores has shape {tuple(self.scores.shape)}"
                )

    @property
    def valid(self) -> torch.Tensor:
        """(B, L) bool: the real candidates (all of them when ``mask`` is ``None``)."""
        if self.mask is None:
            return torch.ones_like(self.scores, dtype=torch.bool)
        return self.mask.to(device=self.scores.device, dtype=torch.bool)


def _require_negatives(batch: ScoredCandidates, loss_name: str) -> None:
    """Listwise and margin losses compare a positive with negatives: one candidate per query is not enough."""
    if batch.scores.shape[1] < 2:
        raise ConfigError(
            f"{loss_name} needs at least 2 candidates per query (a positive and a negative), "
            f"got {batch.scores.shape[1]}: {_NEGATIVES_HINT}"
        )


def _masked_mean(values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Mean of ``values[keep]``; 0 (still attached to the graph) when nothing is kept."""
    kept = values[keep]
    return kept.sum() / max(kept.numel(), 1)


class BinaryCrossEntropyLoss(nn.Module):
    """Pointwise binary cross-entropy on each candidate's logit (the classic monoBERT reranker loss).

    ``loss = mean over valid candidates of BCE(sigmoid(score), label)``, computed stably from the logit
    (``binary_cross_entropy_with_logits``). Labels may be soft (e.g. STS gold / 5): the target is then a
    probability. Candidates are independent, so this works for scored pairs (L = 1) and for grouped data,
    where the positive (label 1) and each negative (label 0) are separate examples.

    ``pos_weight`` multiplies the positive part of the loss (``-pos_weight * y * log sigmoid(s)``); set it to
    about #negatives / #positives when negatives dominate the data (e.g. 1 positive + 7 negatives -> 7).

    Equals sentence-transformers' ``cross_encoder.losses.BinaryCrossEntropyLoss`` (``nn.BCEWithLogitsLoss``,
    mean reduction, default ``activation_fn=Identity``) on the flattened valid (query, document) pairs.
    """

    consumes = "scores"

    def __init__(self, pos_weight: float | None = None) -> None:
        super().__init__()
        self.pos_weight = pos_weight

    def forward(self, batch: ScoredCandidates) -> dict[str, torch.Tensor]:
        scores = batch.scores
        labels = batch.labels.to(device=scores.device, dtype=scores.dtype)
        pos_weight = None if self.pos_weight is None else scores.new_tensor(self.pos_weight)
        per_candidate = F.binary_cross_entropy_with_logits(
            scores, labels, pos_weight=pos_weight, reduction="none"
        )  # (B, L)
        loss = _masked_mean(per_candidate, batch.valid)
        return {"loss": loss, "bce": loss}


class ListwiseSoftmaxLoss(nn.Module):
    """Softmax cross-entropy of each query's positive against its negatives (localized contrastive estimation).

    For query i with valid candidates j: ``loss_i = -log softmax_j(scores[i, j] / temperature)[target_i]``,
    where ``target_i`` is the valid candidate with the highest label (column 0, the positive, for grouped
    data; the first one on ties). ``loss`` is the mean over queries. It is the reranker loss of Gao, Dai and
    Callan 2021, "Rethink Training of BERT Rerankers in Multi-Stage Retrieval Pipeline" (LCE), and the
    cross-encoder form of InfoNCE; its negatives are the query's own candidates, not other queries'
    (a cross-encoder would need an extra forward pass per in-batch pair). Hard negatives from the first
    stage are what make it work: with random negatives only, the task is too easy.

    ``temperature`` < 1 sharpens the softmax (like ``scale`` = 1 / temperature in contrastive losses).
    Needs L >= 2 (ConfigError otherwise). Masked candidates leave the softmax.

    Equals sentence-transformers' cross-encoder ``MultipleNegativesRankingLoss`` computation with
    ``activation_fn=None``, ``scale=1/temperature`` and no in-batch negatives (ST defaults to a sigmoid
    on the logits, ``scale=10`` and in-batch negatives), and ST's ``ListNetLoss`` when its labels are
    one-hot after ST's softmax of the labels (e.g. labels ``[0, -inf, ...]``): ListNet's target is
    ``softmax(labels)``, so plain 0/1 labels give it a soft target, not the positive alone.
    """

    consumes = "scores"

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        if temperature <= 0:
            raise ConfigError(f"ListwiseSoftmaxLoss temperature must be > 0, got {temperature}")
        self.temperature = temperature

    def forward(self, batch: ScoredCandidates) -> dict[str, torch.Tensor]:
        _require_negatives(batch, "ListwiseSoftmaxLoss")
        valid = batch.valid
        logits = (batch.scores / self.temperature).masked_fill(~valid, float("-inf"))  # (B, L)
        labels = batch.labels.to(logits.device).masked_fill(~valid, float("-inf"))
        target = labels.argmax(dim=1)  # (B,) first maximal label: column 0 for grouped data
        rows = valid.any(dim=1)  # queries without any valid candidate have no loss
        log_probs = logits[rows].log_softmax(dim=1)  # (B', L)
        nll = -log_probs.gather(1, target[rows, None]).squeeze(1)  # (B',)
        loss = nll.sum() / max(nll.numel(), 1)
        return {"loss": loss, "listwise_ce": loss}


# ------------------------------------------------------------------------------------- pairwise (LambdaLoss)
# Each scheme weighs the pair of predicted ranks (i, j) (0-based, after sorting by score). Arguments:
# gain (B, L) = (2^label - 1) / maxDCG in predicted order; discount (L,) = log2(2 + rank); mu (NDCG-Loss2++).
def _no_weights(gain: torch.Tensor, discount: torch.Tensor, mu: float) -> torch.Tensor:
    return gain.new_ones(())


def _ndcg1_weights(gain: torch.Tensor, discount: torch.Tensor, mu: float) -> torch.Tensor:
    return (gain / discount)[:, :, None]  # (B, L, 1): G_i / D_i


def _ndcg2_weights(gain: torch.Tensor, discount: torch.Tensor, mu: float) -> torch.Tensor:
    # delta_ij = |1 / D(|i-j|) - 1 / D(|i-j| + 1)| with D(r) = log2(1 + r); zero on the diagonal
    rank = torch.arange(gain.shape[1], device=gain.device)
    d = (rank[:, None] - rank[None, :]).abs().to(gain.dtype)  # (L, L)
    delta = (1 / torch.log2(1 + d) - 1 / torch.log2(2 + d)).abs().fill_diagonal_(0)
    return delta[None] * (gain[:, :, None] - gain[:, None, :]).abs()  # (B, L, L)


def _lambdarank_weights(gain: torch.Tensor, discount: torch.Tensor, mu: float) -> torch.Tensor:
    inv = 1 / discount  # (L,)
    return (inv[:, None] - inv[None, :]).abs()[None] * (gain[:, :, None] - gain[:, None, :]).abs()


def _ndcg2pp_weights(gain: torch.Tensor, discount: torch.Tensor, mu: float) -> torch.Tensor:
    return mu * _ndcg2_weights(gain, discount, mu) + _lambdarank_weights(gain, discount, mu)


WEIGHTING_SCHEMES = {
    "none": _no_weights,  # RankNet
    "ndcg1": _ndcg1_weights,  # NDCG-Loss1
    "ndcg2": _ndcg2_weights,  # NDCG-Loss2
    "lambdarank": _lambdarank_weights,  # LambdaRank's |delta nDCG|
    "ndcg2pp": _ndcg2pp_weights,  # NDCG-Loss2++ = mu * NDCG-Loss2 + LambdaRank (the paper's best)
}


class LambdaLoss(nn.Module):
    """LambdaLoss (Wang, Li, Golbandi, Bendersky and Najork 2018, "The LambdaLoss Framework for Ranking
    Metric Optimization"): pairwise logistic losses weighted by how much each pair matters to nDCG.

    Per query, the valid candidates are sorted by score (predicted ranks i = 0, 1, ...). For every pair of
    ranks (i, j) with ``label_i > label_j`` and i or j in the top ``k``::

        term_ij = weight_ij * log2(sigmoid(sigma * (s_i - s_j)))

    and ``loss = -sum(term) / (number of such pairs in the whole batch)`` (a mean over pairs, not over
    queries). Gains are ``(2^label - 1) / maxDCG@k`` (maxDCG from the ideal order, at least 1e-10) and
    discounts ``D_i = log2(2 + i)``. ``weighting`` picks ``weight_ij``:

    - ``"none"``: 1 (RankNet, see :class:`RankNetLoss`);
    - ``"ndcg1"``: ``G_i / D_i`` (NDCG-Loss1; it keeps every finite pair, also equal labels and i = j);
    - ``"ndcg2"``: ``|1/D(|i-j|) - 1/D(|i-j|+1)| * |G_i - G_j|`` with ``D(r) = log2(1 + r)`` (NDCG-Loss2);
    - ``"lambdarank"``: ``|1/D_i - 1/D_j| * |G_i - G_j|`` (the |delta nDCG| of LambdaRank);
    - ``"ndcg2pp"`` (default): ``mu * ndcg2 + lambdarank`` (NDCG-Loss2++, the paper's best).

    Inputs: ``scores`` (B, L) logits, ``labels`` (B, L) graded relevance (0/1 for grouped data), optional
    ``mask``; masked candidates take no part in any pair or in maxDCG. Works with any L >= 1 (a query whose
    candidates all share a label gives no pairs). ``reduction_log="natural"`` uses ``ln`` instead of
    ``log2``. The weights depend on the current ranking but are constants of the gradient, as in the paper.

    Equals sentence-transformers' cross-encoder ``LambdaLoss`` with the matching weighting scheme
    (``NoWeightingScheme``, ``NDCGLoss1Scheme``, ``NDCGLoss2Scheme``, ``LambdaRankScheme``,
    ``NDCGLoss2PPScheme(mu)``), the same ``k``, ``sigma``, ``reduction_log`` and its default
    ``activation_fn=Identity``; ST's ragged per-query document lists are our ``mask``. ST casts the logits
    to float32; here float64 inputs stay float64 (half precision is computed in float32).
    """

    consumes = "scores"
    term = "lambda"

    def __init__(
        self,
        weighting: str = "ndcg2pp",
        k: int | None = None,
        sigma: float = 1.0,
        mu: float = 10.0,
        reduction_log: str = "binary",
    ) -> None:
        super().__init__()
        if weighting not in WEIGHTING_SCHEMES:
            raise ConfigError(f"LambdaLoss weighting must be one of {sorted(WEIGHTING_SCHEMES)}, got {weighting!r}")
        if reduction_log not in ("binary", "natural"):
            raise ConfigError(f"reduction_log must be 'binary' or 'natural', got {reduction_log!r}")
        if k is not None and k < 1:
            raise ConfigError(f"LambdaLoss k must be >= 1 or null (all candidates), got {k}")
        self.weighting = weighting
        self.k = k
        self.sigma = sigma
        self.mu = mu
        self.reduction_log = reduction_log

    def forward(self, batch: ScoredCandidates) -> dict[str, torch.Tensor]:
        valid = batch.valid
        dtype = torch.promote_types(batch.scores.dtype, torch.float32)
        n = batch.scores.shape[1]
        k = min(self.k or n, n)
        scores = batch.scores.to(dtype).masked_fill(~valid, _PAD_SCORE)  # padding sorts last
        labels = batch.labels.to(device=scores.device, dtype=dtype).masked_fill(~valid, float("-inf"))

        scores_sorted, order = scores.sort(dim=1, descending=True)  # (B, L) predicted order
        labels_by_pred = labels.gather(1, order)  # (B, L) labels in predicted order
        labels_ideal = labels.sort(dim=1, descending=True).values  # (B, L) ideal order

        # pairs (i, j) of predicted ranks: both real (finite label difference), label_i > label_j, and
        # i or j in the top k (the paper's Eq. 18)
        label_diff = labels_by_pred[:, :, None] - labels_by_pred[:, None, :]  # (B, L, L)
        pairs = torch.isfinite(label_diff)
        if self.weighting != "ndcg1":
            pairs &= label_diff > 0
        rank = torch.arange(n, device=scores.device)
        pairs &= ((rank[:, None] < k) | (rank[None, :] < k))[None]

        discount = torch.log2(2 + rank.to(dtype))  # (L,) log2(1 + position), position from 1
        ideal_dcg = ((2 ** labels_ideal.clamp(min=0) - 1) / discount)[:, :k].sum(1).clamp(min=1e-10)  # (B,)
        gain = (2 ** labels_by_pred.clamp(min=0) - 1) / ideal_dcg[:, None]  # (B, L)
        weights = WEIGHTING_SCHEMES[self.weighting](gain, discount, self.mu)

        score_diff = (scores_sorted[:, :, None] - scores_sorted[:, None, :]).clamp(min=-1e8, max=1e8)
        log_prob = F.logsigmoid(self.sigma * score_diff)  # log P(i above j), stable for large margins
        if self.reduction_log == "binary":
            log_prob = log_prob / math.log(2)
        loss = -_masked_mean(weights * log_prob, pairs)
        return {"loss": loss, self.term: loss}


class RankNetLoss(LambdaLoss):
    """RankNet (Burges et al. 2005, "Learning to Rank using Gradient Descent"): pairwise logistic loss.

    For every pair of valid candidates (i, j) of the same query with ``label_i > label_j``, the model's
    probability that i ranks above j is ``sigmoid(sigma * (s_i - s_j))``; the loss is the mean over all such
    pairs of the batch of ``-log2`` of it (``reduction_log="natural"``: ``-ln``, Burges' cross-entropy).
    Every misordered pair counts the same, wherever it sits in the ranking; :class:`LambdaLoss` weighs pairs
    by their effect on nDCG instead. ``k`` keeps only pairs with a candidate in the predicted top k.

    Inputs as :class:`LambdaLoss` (this is LambdaLoss with ``weighting="none"``). Equals
    sentence-transformers' cross-encoder ``RankNetLoss`` (same ``k``, ``sigma``, ``reduction_log``; its
    default base-2 log).
    """

    term = "ranknet"

    def __init__(self, sigma: float = 1.0, k: int | None = None, reduction_log: str = "binary") -> None:
        super().__init__(weighting="none", k=k, sigma=sigma, reduction_log=reduction_log)


class MarginMSELoss(nn.Module):
    """Margin-MSE distillation (Hofstätter et al. 2020, "Improving Efficient Neural Ranking Models with
    Cross-Architecture Knowledge Distillation").

    For each query and each valid negative j >= 1 (column 0 is the positive):
    ``((s_0 - s_j) - (t_0 - t_j))^2``, where s are the student's logits and t the teacher's scores;
    ``loss`` is the mean over all (query, negative) pairs. Only margins are matched, so the student's scores
    may sit on a different scale offset than the teacher's (e.g. a cross-encoder teacher's logits).

    Inputs: ``scores`` (B, L), ``teacher_scores`` (B, L) (required: ConfigError otherwise), L >= 2,
    optional ``mask`` (a masked negative, or a masked positive for its whole row, is skipped); labels unused.

    Equals sentence-transformers' cross-encoder ``MarginMSELoss`` given labels of shape (B, 1 + n) =
    the teacher's scores of (positive, negatives), which it turns into margins ``t_0 - t_j`` itself
    (``nn.MSELoss``, mean over B x n; default ``activation_fn=Identity``).
    """

    consumes = "scores"

    def forward(self, batch: ScoredCandidates) -> dict[str, torch.Tensor]:
        if batch.teacher_scores is None:
            raise ConfigError(
                "MarginMSELoss needs teacher scores for every candidate (batch.teacher_scores is None): "
                "train on data that carries a teacher's score per candidate, or pick another loss (e.g. loss=listwise)"
            )
        _require_negatives(batch, "MarginMSELoss")
        scores = batch.scores
        teacher = batch.teacher_scores.to(device=scores.device, dtype=scores.dtype)
        student_margin = scores[:, :1] - scores[:, 1:]  # (B, L-1)
        teacher_margin = teacher[:, :1] - teacher[:, 1:]  # (B, L-1)
        valid = batch.valid
        keep = valid[:, :1] & valid[:, 1:]  # (B, L-1)
        loss = _masked_mean((student_margin - teacher_margin) ** 2, keep)
        return {"loss": loss, "margin_mse": loss}

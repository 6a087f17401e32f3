"""embedlab.losses.ranking (cross-encoder score losses) against independent references.

Each loss is compared with (a) a hand computation written here with explicit Python loops over queries,
candidates and pairs in float64 (not the vectorised formula of the module), masks included, and (b)
sentence-transformers' cross-encoder loss of the same name, driven through its public ``forward(inputs,
labels)`` with a stub CrossEncoder whose scores are fixed numbers (ragged per-query document lists there are
the ``mask`` here); losses and gradients must agree.
"""

from __future__ import annotations

import math
from pathlib import Path

import hydra
import pytest
import torch
from omegaconf import OmegaConf
from sentence_transformers.cross_encoder import CrossEncoder as STCrossEncoder
from sentence_transformers.cross_encoder import losses as st_losses
from torch import nn

from embedlab.errors import ConfigError
from embedlab.losses import (
    BinaryCrossEntropyLoss,
    LambdaLoss,
    ListwiseSoftmaxLoss,
    MarginMSELoss,
    RankNetLoss,
    ScoredCandidates,
)

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "loss"
B, L = 4, 5
SCHEMES = {  # embedlab weighting -> sentence-transformers scheme
    "none": st_losses.NoWeightingScheme,
    "ndcg1": st_losses.NDCGLoss1Scheme,
    "ndcg2": st_losses.NDCGLoss2Scheme,
    "lambdarank": st_losses.LambdaRankScheme,
    "ndcg2pp": st_losses.NDCGLoss2PPScheme,
}


def _batch(
    seed: int = 0,
    dtype=torch.float64,
    mask: str | None = "scattered",
    teacher: bool = True,
) -> ScoredCandidates:
    """B queries x L candidates: random logits, graded labels in {0, 1/3, 2/3, 1} with column 0 = 1.

    ``mask``: None (all valid), "prefix" (query i keeps its first L - i candidates, as ragged lists), or
    "scattered" (holes anywhere except column 0).
    """
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(B, L, generator=g, dtype=dtype) * 2
    labels = torch.randint(0, 4, (B, L), generator=g).to(dtype) / 3
    labels[:, 0] = 1.0
    teacher_scores = torch.randn(B, L, generator=g, dtype=dtype) * 3 if teacher else None
    valid = None
    if mask == "prefix":
        valid = torch.arange(L)[None, :] < torch.tensor([L, L - 1, 2, L - 2])[:, None]
    elif mask == "scattered":
        valid = torch.rand(B, L, generator=g) > 0.3
        valid[:, 0] = True
        valid[1, 1:] = True
    return ScoredCandidates(scores=scores, labels=labels, teacher_scores=teacher_scores, mask=valid)


def _rows(batch: ScoredCandidates, field: str = "scores") -> list[list[tuple[int, float]]]:
    """Per query, the (column, value) of its valid candidates, as plain Python floats."""
    values = getattr(batch, field).tolist()
    valid = batch.valid.tolist()
    return [[(j, v) for j, (v, ok) in enumerate(zip(row, keep)) if ok] for row, keep in zip(values, valid)]


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# ---------------------------------------------------------------------------------------- hand computations
def hand_bce(batch: ScoredCandidates, pos_weight: float | None) -> float:
    pw = 1.0 if pos_weight is None else pos_weight
    labels = batch.labels.tolist()
    total, count = 0.0, 0
    for i, row in enumerate(_rows(batch)):
        for j, s in row:
            y = labels[i][j]
            total += -(pw * y * math.log(_sigmoid(s)) + (1 - y) * math.log(1 - _sigmoid(s)))
            count += 1
    return total / count


def hand_listwise(batch: ScoredCandidates, temperature: float) -> float:
    labels = batch.labels.tolist()
    total = 0.0
    for i, row in enumerate(_rows(batch)):
        best = max(labels[i][j] for j, _ in row)
        target = next(s for j, s in row if labels[i][j] == best)  # first candidate with the top label
        denominator = sum(math.exp(s / temperature) for _, s in row)
        total += -math.log(math.exp(target / temperature) / denominator)
    return total / len(labels)


def hand_lambda(batch, weighting="ndcg2pp", k=None, sigma=1.0, mu=10.0, natural=False) -> float:
    """LambdaLoss per the paper, one query at a time: rank its valid candidates by score, then loop over
    pairs of ranks (a, b) (1-based positions)."""
    labels = batch.labels.tolist()
    log = math.log if natural else math.log2
    total, count = 0.0, 0
    for i, row in enumerate(_rows(batch)):
        ranked = sorted(row, key=lambda c: -c[1])  # [(column, score)] best first
        n = len(ranked)
        kk = min(k or n, n)
        ideal = sorted((labels[i][j] for j, _ in row), reverse=True)
        max_dcg = max(sum((2 ** ideal[p] - 1) / math.log2(2 + p) for p in range(kk)), 1e-10)
        gain = [(2 ** labels[i][j] - 1) / max_dcg for j, _ in ranked]
        disc = [math.log2(2 + p) for p in range(n)]  # D at 0-based rank p = log2(1 + position)
        for a in range(n):
            for b in range(n):
                if a >= kk and b >= kk:
                    continue
                ya, yb = labels[i][ranked[a][0]], labels[i][ranked[b][0]]
                if weighting != "ndcg1" and not ya > yb:
                    continue
                if weighting == "none":
                    w = 1.0
                elif weighting == "ndcg1":
                    w = gain[a] / disc[a]
                else:
                    d = abs(a - b)
                    ndcg2 = abs(1 / math.log2(1 + d) - 1 / math.log2(2 + d)) * abs(gain[a] - gain[b]) if d else 0.0
                    lrank = abs(1 / disc[a] - 1 / disc[b]) * abs(gain[a] - gain[b])
                    w = {
                        "ndcg2": ndcg2,
                        "lambdarank": lrank,
                        "ndcg2pp": mu * ndcg2 + lrank,
                    }[weighting]
                total += w * log(_sigmoid(sigma * (ranked[a][1] - ranked[b][1])))
                count += 1
    return -total / max(count, 1)


def hand_ranknet(batch: ScoredCandidates, sigma: float = 1.0) -> float:
    """RankNet straight from Burges: every pair with label_a > label_b, no sorting needed."""
    labels = batch.labels.tolist()
    total, count = 0.0, 0
    for i, row in enumerate(_rows(batch)):
        for a, sa in row:
            for b, sb in row:
                if labels[i][a] > labels[i][b]:
                    total += -math.log2(_sigmoid(sigma * (sa - sb)))
                    count += 1
    return total / count


def hand_margin_mse(batch: ScoredCandidates) -> float:
    teacher = batch.teacher_scores.tolist()
    total, count = 0.0, 0
    for i, row in enumerate(_rows(batch)):
        s = dict(row)
        for j, sj in row:
            if j == 0:
                continue
            total += ((s[0] - sj) - (teacher[i][0] - teacher[i][j])) ** 2
            count += 1
    return total / count


@pytest.mark.parametrize("mask", [None, "scattered"])
@pytest.mark.parametrize("pos_weight", [None, 3.0])
def test_bce_matches_hand_computation_with_soft_labels(mask, pos_weight):
    batch = _batch(1, mask=mask)  # labels include 1/3, 2/3: soft targets
    out = BinaryCrossEntropyLoss(pos_weight)(batch)
    assert set(out) == {"loss", "bce"}
    assert out["loss"].item() == pytest.approx(hand_bce(batch, pos_weight), rel=1e-12)


@pytest.mark.parametrize("mask", [None, "scattered"])
@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_listwise_matches_hand_computation(mask, temperature):
    batch = _batch(2, mask=mask)
    batch.labels[2, 0] = 0.0  # the top label is elsewhere in row 2: the target is its first maximal label
    batch.labels[2, 1:] = torch.tensor([0.0, 2 / 3, 2 / 3, 0.0], dtype=torch.float64)
    if batch.mask is not None:
        batch.mask[2] = torch.tensor([True, False, True, True, True])
    out = ListwiseSoftmaxLoss(temperature)(batch)
    assert set(out) == {"loss", "listwise_ce"}
    assert out["loss"].item() == pytest.approx(hand_listwise(batch, temperature), rel=1e-12)


@pytest.mark.parametrize("mask", [None, "scattered"])
@pytest.mark.parametrize("weighting", list(SCHEMES))
@pytest.mark.parametrize("k", [None, 2])
def test_lambda_matches_hand_computation(mask, weighting, k):
    batch = _batch(3, mask=mask)
    out = LambdaLoss(weighting=weighting, k=k, sigma=1.5, mu=7.0)(batch)
    assert set(out) == {"loss", "lambda"}
    expected = hand_lambda(batch, weighting, k=k, sigma=1.5, mu=7.0)
    assert out["loss"].item() == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("mask", [None, "scattered"])
def test_ranknet_matches_hand_computation(mask):
    batch = _batch(4, mask=mask)
    out = RankNetLoss(sigma=2.0)(batch)
    assert set(out) == {"loss", "ranknet"}
    assert out["loss"].item() == pytest.approx(hand_ranknet(batch, sigma=2.0), rel=1e-12)
    natural = RankNetLoss(sigma=2.0, reduction_log="natural")(batch)["loss"]
    assert natural.item() == pytest.approx(hand_ranknet(batch, sigma=2.0) * math.log(2), rel=1e-12)


@pytest.mark.parametrize("mask", [None, "scattered"])
def test_margin_mse_matches_hand_computation(mask):
    batch = _batch(5, mask=mask)
    out = MarginMSELoss()(batch)
    assert set(out) == {"loss", "margin_mse"}
    assert out["loss"].item() == pytest.approx(hand_margin_mse(batch), rel=1e-12)


# ------------------------------------------------------------------------------------ sentence-transformers
class FixedScoreCrossEncoder(STCrossEncoder):
    """A sentence-transformers CrossEncoder whose score for the pair ("q{i}", "d{i}_{j}") is ``scores[i, j]``.

    Skips CrossEncoder.__init__ (no transformer): ``preprocess`` turns pairs into flat indices and
    ``forward`` looks the scores up, so the ST loss sees exactly our logits and gradients flow back to them.
    """

    def __init__(self, scores: torch.Tensor) -> None:
        nn.Module.__init__(self)
        self.flat = scores.reshape(-1)
        self.width = scores.shape[1]

    num_labels = property(lambda self: 1)
    device = property(lambda self: torch.device("cpu"))

    def preprocess(self, pairs, prompt=None, task=None):
        index = [int(q[1:]) * self.width + int(d.split("_")[1]) for q, d in pairs]
        return {"index": torch.tensor(index)}

    def forward(self, features):
        return {"scores": self.flat[features["index"]].unsqueeze(1)}


def _st_inputs(
    batch: ScoredCandidates,
) -> tuple[list[str], list[list[str]], list[torch.Tensor]]:
    """Queries, ragged document lists and per-query label tensors (sentence-transformers' listwise format)."""
    valid = batch.valid.tolist()
    queries = [f"q{i}" for i in range(B)]
    docs = [[f"d{i}_{j}" for j in range(L) if valid[i][j]] for i in range(B)]
    labels = [batch.labels[i][batch.valid[i]].float() for i in range(B)]
    return queries, docs, labels


def _leaf(batch: ScoredCandidates) -> ScoredCandidates:
    """The batch in float32 with scores as a fresh leaf that collects gradients."""
    return ScoredCandidates(
        scores=batch.scores.float().detach().requires_grad_(True),
        labels=batch.labels.float(),
        teacher_scores=None if batch.teacher_scores is None else batch.teacher_scores.float(),
        mask=batch.mask,
    )


def _assert_same_loss_and_grad(ours_loss_fn, st_loss_fn, batch: ScoredCandidates) -> None:
    """Our loss on ``batch`` and ST's loss on the same fixed logits: equal values and d loss / d scores."""
    ours_batch, st_batch = _leaf(batch), _leaf(batch)
    ours = ours_loss_fn(ours_batch)["loss"]
    theirs = st_loss_fn(FixedScoreCrossEncoder(st_batch.scores), st_batch)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5, abs=1e-7)
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(ours_batch.scores.grad, st_batch.scores.grad, rtol=1e-4, atol=1e-6)
    assert ours_batch.scores.grad.abs().sum() > 0


@pytest.mark.parametrize("mask", [None, "prefix"])
@pytest.mark.parametrize("pos_weight", [None, 3.0])
def test_bce_equals_sentence_transformers(mask, pos_weight):
    def st(model, batch):
        queries, docs, labels = _st_inputs(batch)
        pairs = [(q, d) for q, ds in zip(queries, docs) for d in ds]
        pw = None if pos_weight is None else torch.tensor(pos_weight)
        loss = st_losses.BinaryCrossEntropyLoss(model, pos_weight=pw)
        return loss([[p[0] for p in pairs], [p[1] for p in pairs]], torch.cat(labels))

    _assert_same_loss_and_grad(BinaryCrossEntropyLoss(pos_weight), st, _batch(6, mask=mask))


@pytest.mark.parametrize("mask", [None, "prefix"])
def test_listwise_equals_sentence_transformers_listnet_with_one_hot_targets(mask):
    """ST's ListNet target is softmax(labels): labels 0 for the positive and -inf elsewhere make it one-hot."""

    def st(model, batch):
        queries, docs, _ = _st_inputs(batch)
        one_hot = [torch.tensor([0.0] + [float("-inf")] * (len(ds) - 1)) for ds in docs]
        return st_losses.ListNetLoss(model)([queries, docs], one_hot)

    _assert_same_loss_and_grad(ListwiseSoftmaxLoss(), st, _batch(7, mask=mask))


@pytest.mark.parametrize("temperature", [1.0, 0.25])
def test_listwise_equals_sentence_transformers_mnrl_without_in_batch_negatives(
    temperature,
):
    """ST's cross-encoder MNRL computation on (positive, hard negatives) columns, no sigmoid, scale = 1/T."""

    def st(model, batch):
        loss = st_losses.MultipleNegativesRankingLoss(model, scale=1 / temperature, activation_fn=None)
        columns = [batch.scores[:, j] for j in range(L)]  # ST's list of (B,) logits, positive first
        return loss.calculate_loss(columns, B)

    _assert_same_loss_and_grad(ListwiseSoftmaxLoss(temperature), st, _batch(8, mask=None))


@pytest.mark.parametrize("mask", [None, "prefix"])
@pytest.mark.parametrize("sigma", [1.0, 2.5])
def test_ranknet_equals_sentence_transformers(mask, sigma):
    def st(model, batch):
        queries, docs, labels = _st_inputs(batch)
        return st_losses.RankNetLoss(model, sigma=sigma)([queries, docs], labels)

    _assert_same_loss_and_grad(RankNetLoss(sigma=sigma), st, _batch(9, mask=mask))


@pytest.mark.parametrize("mask", [None, "prefix"])
@pytest.mark.parametrize("weighting", list(SCHEMES))
@pytest.mark.parametrize("k", [None, 2])
def test_lambda_equals_sentence_transformers(mask, weighting, k):
    def st(model, batch):
        queries, docs, labels = _st_inputs(batch)
        scheme = SCHEMES[weighting](mu=4.0) if weighting == "ndcg2pp" else SCHEMES[weighting]()
        loss = st_losses.LambdaLoss(model, weighting_scheme=scheme, k=k, sigma=1.5)
        return loss([queries, docs], labels)

    ours = LambdaLoss(weighting=weighting, k=k, sigma=1.5, mu=4.0)
    _assert_same_loss_and_grad(ours, st, _batch(10, mask=mask))


def test_lambda_default_is_sentence_transformers_default():
    batch = _leaf(_batch(11, mask="prefix"))
    queries, docs, labels = _st_inputs(batch)
    theirs = st_losses.LambdaLoss(FixedScoreCrossEncoder(batch.scores))([queries, docs], labels)
    assert LambdaLoss()(batch)["loss"].item() == pytest.approx(theirs.item(), rel=1e-5)


def test_margin_mse_equals_sentence_transformers():
    """ST takes (anchor, positive, negative...) columns and labels (B, 1 + n) of teacher scores."""

    def st(model, batch):
        columns = [[f"q{i}" for i in range(B)]] + [[f"d{i}_{j}" for i in range(B)] for j in range(L)]
        return st_losses.MarginMSELoss(model)(columns, batch.teacher_scores)

    _assert_same_loss_and_grad(MarginMSELoss(), st, _batch(12, mask=None))


# ------------------------------------------------------------------------------------------- gradients
@pytest.mark.parametrize(
    "loss",
    [
        BinaryCrossEntropyLoss(2.0),
        ListwiseSoftmaxLoss(0.5),
        RankNetLoss(sigma=1.5),
        LambdaLoss(),
        LambdaLoss(weighting="ndcg1", k=2),
        MarginMSELoss(),
    ],
    ids=["bce", "listwise", "ranknet", "lambda", "lambda_ndcg1_k2", "margin_mse"],
)
def test_gradcheck(loss):
    batch = _batch(13, mask="scattered")
    labels, teacher, mask = batch.labels, batch.teacher_scores, batch.mask

    def fn(scores):
        return loss(ScoredCandidates(scores=scores, labels=labels, teacher_scores=teacher, mask=mask))["loss"]

    scores = batch.scores.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(fn, (scores,), eps=1e-6, atol=1e-7)
    fn(scores).backward()
    assert torch.all(scores.grad[~mask] == 0)  # padding gets no gradient


# ------------------------------------------------------------------------------------------- errors, configs
@pytest.mark.parametrize(
    "loss, name",
    [
        (ListwiseSoftmaxLoss(), "ListwiseSoftmaxLoss"),
        (MarginMSELoss(), "MarginMSELoss"),
    ],
)
def test_one_candidate_per_query_is_a_config_error(loss, name):
    batch = ScoredCandidates(
        scores=torch.zeros(3, 1),
        labels=torch.ones(3, 1),
        teacher_scores=torch.zeros(3, 1),
    )
    with pytest.raises(ConfigError) as error:
        loss(batch)
    assert str(error.value) == (
        f"{name} needs at least 2 candidates per query (a positive and a negative), got 1: "
        "give each query negatives with data.train.num_negatives >= 1 "
        "(taken from data.train.hard_negatives or data.train.random_negatives)"
    )


def test_margin_mse_without_teacher_scores_is_a_config_error():
    with pytest.raises(ConfigError) as error:
        MarginMSELoss()(_batch(14, teacher=False))
    assert str(error.value) == (
        "MarginMSELoss needs teacher scores for every candidate (batch.teacher_scores is None): "
        "train on data that carries a teacher's score per candidate, or pick another loss (e.g. loss=listwise)"
    )


def test_bad_options_and_shapes_are_rejected():
    with pytest.raises(
        ConfigError,
        match=r"LambdaLoss weighting must be one of \['lambdarank', 'ndcg1', 'ndcg2', "
        r"'ndcg2pp', 'none'\], got 'ndcg3'",
    ):
        LambdaLoss(weighting="ndcg3")
    with pytest.raises(ConfigError, match=r"^ListwiseSoftmaxLoss temperature must be > 0, got 0$"):
        ListwiseSoftmaxLoss(temperature=0)
    with pytest.raises(
        ValueError,
        match=r"^ScoredCandidates.labels has shape \(4,\), but scores has shape \(4, 2\)$",
    ):
        ScoredCandidates(scores=torch.zeros(4, 2), labels=torch.zeros(4))


def test_bce_and_ranking_losses_accept_scored_pairs():
    """L = 1 (scored pairs): BCE is defined; pairwise losses have no pair, hence a zero loss, not NaN."""
    batch = ScoredCandidates(scores=torch.tensor([[0.3], [-1.2]]), labels=torch.tensor([[0.8], [0.2]]))
    assert BinaryCrossEntropyLoss()(batch)["loss"].item() == pytest.approx(hand_bce(batch, None), rel=1e-6)
    assert LambdaLoss()(batch)["loss"].item() == 0.0
    assert RankNetLoss()(batch)["loss"].item() == 0.0


@pytest.mark.parametrize(
    "name, cls, kwargs",
    [
        ("bce", BinaryCrossEntropyLoss, {}),
        ("listwise", ListwiseSoftmaxLoss, {}),
        ("ranknet", RankNetLoss, {}),
        ("lambdaloss", LambdaLoss, {}),
        ("margin_mse", MarginMSELoss, {}),
    ],
)
def test_config_file_instantiates_the_loss_with_its_defaults(name, cls, kwargs):
    loss = hydra.utils.instantiate(OmegaConf.load(CONFIG_DIR / f"{name}.yaml"))
    assert type(loss) is cls and loss.consumes == "scores"
    batch = _batch(15, mask="scattered")
    out = loss(batch)
    assert torch.isfinite(out["loss"]) and out["loss"].item() > 0
    assert out["loss"].item() == cls(**kwargs)(batch)["loss"].item()

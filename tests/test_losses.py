"""embedlab.losses against independent references.

Each loss is compared with (a) a naive, explicitly looped re-implementation of its formula written here,
and, where the loss exists there, (b) sentence-transformers' own loss, driven through its public
``forward(sentence_features, labels)`` with a fake model that returns precomputed embeddings.
"""

from __future__ import annotations


import pytest
import torch
from torch import nn

from embedlab.losses import (
    CoSENTLoss,
    ContrastiveLoss,
    CosineSimilarityLoss,
    EmbeddedBatch,
    MultipleNegativesRankingLoss,
    TripletLoss,
)

try:  # sentence-transformers >= 6: losses live under sentence_transformer.losses
    from sentence_transformers.sentence_transformer import losses as st_losses
except ImportError:  # older layout
    from sentence_transformers import losses as st_losses
from sentence_transformers import util as st_util

B, N_NEG, D = 5, 2, 8


def _embeddings(seed: int, *shape: int, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype)


# ---------------------------------------------------------------------------------------- naive references
def _sim(a: torch.Tensor, b: torch.Tensor, similarity: str) -> torch.Tensor:
    """One similarity between two vectors, written out: dot, or dot / (|a| |b|)."""
    dot = sum(a[k] * b[k] for k in range(a.shape[0]))
    if similarity == "dot":
        return dot
    return dot / (torch.sqrt(sum(a[k] ** 2 for k in range(a.shape[0]))) * torch.sqrt(sum(b[k] ** 2 for k in range(b.shape[0]))))


def _naive_ce(logits: list[torch.Tensor], target: int, drop: set[int] = frozenset()) -> torch.Tensor:
    """-log softmax(logits)[target] with an explicit softmax over the columns not in ``drop``."""
    denominator = sum(torch.exp(logit) for j, logit in enumerate(logits) if j not in drop)
    return -torch.log(torch.exp(logits[target]) / denominator)


def naive_mnrl(query, positive, negatives=None, scale=20.0, similarity="cos", drop=None) -> torch.Tensor:
    """Mean over queries of the cross-entropy over [all positives] + [every query's hard negatives, flattened].

    ``drop[i]`` lists candidate columns removed from query i's softmax (false-negative masking).
    """
    b = query.shape[0]
    candidates = [positive[j] for j in range(b)]
    if negatives is not None:
        candidates += [negatives[i, k] for i in range(negatives.shape[0]) for k in range(negatives.shape[1])]
    total = 0
    for i in range(b):
        logits = [scale * _sim(query[i], c, similarity) for c in candidates]
        total = total + _naive_ce(logits, i, set((drop or {}).get(i, ())))
    return total / b


def naive_mnrl_backward(query, positive, scale=20.0, similarity="cos") -> torch.Tensor:
    """Mean over positives of the cross-entropy of positive i against the batch's queries."""
    b = query.shape[0]
    total = 0
    for i in range(b):
        logits = [scale * _sim(positive[i], query[j], similarity) for j in range(b)]
        total = total + _naive_ce(logits, i)
    return total / b


def _distance(a, b, distance: str) -> torch.Tensor:
    if distance == "euclidean":
        return torch.sqrt(sum((a[k] - b[k]) ** 2 for k in range(a.shape[0])))
    if distance == "manhattan":
        return sum(abs(a[k] - b[k]) for k in range(a.shape[0]))
    return 1 - _sim(a, b, "cos")


def naive_triplet(query, positive, negative, distance, margin) -> torch.Tensor:
    terms = [
        max(_distance(query[i], positive[i], distance) - _distance(query[i], negative[i], distance) + margin, 0.0)
        for i in range(query.shape[0])
    ]
    return sum(terms) / len(terms)


def naive_contrastive(query, positive, labels, margin) -> torch.Tensor:
    terms = []
    for i in range(query.shape[0]):
        d = 1 - _sim(query[i], positive[i], "cos")
        y = float(labels[i])
        terms.append(0.5 * (y * d**2 + (1 - y) * max(margin - d, 0.0) ** 2))
    return sum(terms) / len(terms)


def naive_cosent(text1, text2, scores, scale=20.0, similarity="cos") -> torch.Tensor:
    """log(1 + sum over pairs (i, j) with score_i > score_j of exp(scale * (cos_j - cos_i))), an O(B^2) loop."""
    sims = [_sim(text1[i], text2[i], similarity) for i in range(text1.shape[0])]
    total = 1.0
    for i in range(len(sims)):
        for j in range(len(sims)):
            if float(scores[i]) > float(scores[j]):
                total = total + torch.exp(scale * (sims[j] - sims[i]))
    return torch.log(torch.as_tensor(total, dtype=text1.dtype))


def naive_cosine_mse(text1, text2, scores) -> torch.Tensor:
    terms = [(_sim(text1[i], text2[i], "cos") - float(scores[i])) ** 2 for i in range(text1.shape[0])]
    return sum(terms) / len(terms)


# ---------------------------------------------------------------------------------------- sentence-transformers harness
class FakeModel(nn.Module):
    """Stands in for a SentenceTransformer: each feature dict already carries its column's embeddings."""

    def forward(self, features: dict) -> dict:
        return {"sentence_embedding": features["embedding"]}


def st_loss_value(st_loss: nn.Module, columns: list[torch.Tensor], labels: torch.Tensor | None = None) -> torch.Tensor:
    """Run a sentence-transformers loss through its public forward on precomputed column embeddings."""
    features = [{"embedding": column} for column in columns]
    if labels is None:
        labels = torch.zeros(columns[0].shape[0])
    return st_loss(features, labels)


# ---------------------------------------------------------------------------------------- MultipleNegativesRankingLoss
@pytest.mark.parametrize("similarity", ["cos", "dot"])
@pytest.mark.parametrize("scale", [1.0, 20.0])
@pytest.mark.parametrize("with_negatives", [False, True])
def test_mnrl_matches_naive_softmax_loop(similarity, scale, with_negatives):
    """MNRL == explicit per-query softmax over all positives + flattened (B, n, D) hard negatives."""
    q, p = _embeddings(0, B, D), _embeddings(1, B, D)
    n = _embeddings(2, B, N_NEG, D) if with_negatives else None
    out = MultipleNegativesRankingLoss(scale=scale, similarity=similarity)(EmbeddedBatch(q, p, n))
    expected = naive_mnrl(q, p, n, scale=scale, similarity=similarity)
    torch.testing.assert_close(out["loss"], expected)
    torch.testing.assert_close(out["mnrl"], expected)
    assert set(out) == {"loss", "mnrl"}


@pytest.mark.parametrize("similarity", ["cos", "dot"])
@pytest.mark.parametrize("with_negatives", [False, True])
def test_mnrl_matches_sentence_transformers(similarity, with_negatives):
    """MNRL == sentence-transformers MultipleNegativesRankingLoss (forward through a fake model).

    sentence-transformers takes hard negatives as extra columns (negative_1, ..., negative_n); the
    candidate order differs from embedlab's flattening but a softmax does not depend on order.
    """
    q, p = _embeddings(10, B, D), _embeddings(11, B, D)
    n = _embeddings(12, B, N_NEG, D) if with_negatives else None
    scale = 20.0 if similarity == "cos" else 1.0
    fct = st_util.cos_sim if similarity == "cos" else st_util.dot_score
    st = st_losses.MultipleNegativesRankingLoss(FakeModel(), scale=scale, similarity_fct=fct)
    columns = [q, p] + ([] if n is None else [n[:, k] for k in range(N_NEG)])
    ours = MultipleNegativesRankingLoss(scale=scale, similarity=similarity)(EmbeddedBatch(q, p, n))["loss"]
    torch.testing.assert_close(ours, st_loss_value(st, columns))


@pytest.mark.parametrize("similarity", ["cos", "dot"])
def test_mnrl_symmetric_matches_naive_and_sentence_transformers(similarity):
    """symmetric=True == (forward CE + positive->queries CE) / 2, computed naively and by
    sentence-transformers MNRL(directions=(query_to_doc, doc_to_query), partition_mode=per_direction)."""
    q, p, n = _embeddings(20, B, D), _embeddings(21, B, D), _embeddings(22, B, N_NEG, D)
    scale = 20.0 if similarity == "cos" else 1.0
    out = MultipleNegativesRankingLoss(scale=scale, similarity=similarity, symmetric=True)(EmbeddedBatch(q, p, n))
    forward = naive_mnrl(q, p, n, scale=scale, similarity=similarity)
    backward = naive_mnrl_backward(q, p, scale=scale, similarity=similarity)
    torch.testing.assert_close(out["mnrl"], forward)
    torch.testing.assert_close(out["mnrl_backward"], backward)
    torch.testing.assert_close(out["loss"], (forward + backward) / 2)

    fct = st_util.cos_sim if similarity == "cos" else st_util.dot_score
    st = st_losses.MultipleNegativesRankingLoss(
        FakeModel(), scale=scale, similarity_fct=fct, directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction"
    )
    torch.testing.assert_close(out["loss"], st_loss_value(st, [q, p] + [n[:, k] for k in range(N_NEG)]))


def test_mnrl_mask_duplicates_removes_the_duplicate_column():
    """mask_duplicates: doc "d0" is the positive of queries 0 and 2 -> column 2 leaves query 0's softmax and
    column 0 leaves query 2's; a hard negative that is query 1's own positive doc leaves query 1's softmax.
    Reference: the naive loop with exactly those columns dropped."""
    q, p, n = _embeddings(30, 4, D), _embeddings(31, 4, D), _embeddings(32, 4, 1, D)
    p[2] = p[0]  # the same document embeds the same
    positive_ids = ["d0", "d1", "d0", "d3"]
    negative_ids = ["n0", "n1", "d1", "n3"]  # negative of query 2 (flattened column 4 + 2 = 6) is query 1's positive
    n[2, 0] = p[1]
    batch = EmbeddedBatch(q, p, n, positive_ids=positive_ids, negative_ids=negative_ids)
    masked = MultipleNegativesRankingLoss(mask_duplicates=True)(batch)["loss"]
    drop = {0: {2}, 1: {6}, 2: {0}}
    torch.testing.assert_close(masked, naive_mnrl(q, p, n, drop=drop))
    # without masking the duplicates are counted as negatives: a different, larger loss
    unmasked = MultipleNegativesRankingLoss(mask_duplicates=False)(batch)["loss"]
    torch.testing.assert_close(unmasked, naive_mnrl(q, p, n))
    assert unmasked > masked


def test_mnrl_mask_duplicates_is_a_no_op_without_ids_or_duplicates():
    """mask_duplicates with unknown ids, or with all-distinct ids, equals the plain naive loss."""
    q, p, n = _embeddings(33, B, D), _embeddings(34, B, D), _embeddings(35, B, N_NEG, D)
    expected = naive_mnrl(q, p, n)
    loss = MultipleNegativesRankingLoss(mask_duplicates=True)
    torch.testing.assert_close(loss(EmbeddedBatch(q, p, n))["loss"], expected)
    ids = EmbeddedBatch(q, p, n, positive_ids=[f"p{i}" for i in range(B)], negative_ids=[f"n{i}" for i in range(B * N_NEG)])
    torch.testing.assert_close(loss(ids)["loss"], expected)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"similarity": "cos"},
        {"similarity": "dot", "scale": 1.0},
        {"symmetric": True},
        {"mask_duplicates": True},
    ],
    ids=["cos", "dot", "symmetric", "mask_duplicates"],
)
def test_mnrl_gradients_match_naive_and_finite_differences(kwargs):
    """float64: d loss / d (query, positive, negatives) == gradients of the naive loop, and torch.autograd.gradcheck
    (finite differences) passes on the loss as a function of the embeddings."""
    q, p, n = (t.requires_grad_() for t in (_embeddings(40, 4, 3), _embeddings(41, 4, 3), _embeddings(42, 4, 2, 3)))
    ids = {"positive_ids": ["a", "b", "a", "c"], "negative_ids": [None] * 8} if kwargs.get("mask_duplicates") else {}
    loss_fn = MultipleNegativesRankingLoss(**kwargs)

    def ours(q, p, n):
        return loss_fn(EmbeddedBatch(q, p, n, **ids))["loss"]

    def naive(q, p, n):
        scale = kwargs.get("scale", 20.0)
        sim = kwargs.get("similarity", "cos")
        drop = {0: {2}, 2: {0}} if kwargs.get("mask_duplicates") else None
        value = naive_mnrl(q, p, n, scale=scale, similarity=sim, drop=drop)
        if kwargs.get("symmetric"):
            value = (value + naive_mnrl_backward(q, p, scale=scale, similarity=sim)) / 2
        return value

    got = torch.autograd.grad(ours(q, p, n), (q, p, n))
    want = torch.autograd.grad(naive(q, p, n), (q, p, n))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    assert torch.autograd.gradcheck(ours, (q, p, n), fast_mode=True)


# ---------------------------------------------------------------------------------------- TripletLoss / ContrastiveLoss
@pytest.mark.parametrize("distance", ["euclidean", "cosine", "manhattan"])
@pytest.mark.parametrize("margin", [0.1, 5.0])
def test_triplet_matches_naive_and_sentence_transformers(distance, margin):
    """TripletLoss == mean relu(d(q, p) - d(q, n_first) + margin) written out per example, and ==
    sentence-transformers TripletLoss with the same distance metric."""
    q, p, n = _embeddings(50, B, D), _embeddings(51, B, D), _embeddings(52, B, N_NEG, D)
    out = TripletLoss(distance=distance, margin=margin)(EmbeddedBatch(q, p, n))
    expected = naive_triplet(q, p, n[:, 0], distance, margin)  # the first hard negative is the triplet's
    # F.pairwise_distance computes |a - b + 1e-6|, a bias of ~D * 1e-6 against the exact formula
    torch.testing.assert_close(out["loss"], torch.as_tensor(expected, dtype=q.dtype), rtol=0, atol=1e-5)
    torch.testing.assert_close(out["triplet"], out["loss"])

    metric = getattr(st_losses.TripletDistanceMetric, distance.upper())
    st = st_losses.TripletLoss(FakeModel(), distance_metric=metric, triplet_margin=margin)
    # sentence-transformers' distances are exact (no eps): same ~1e-6 tolerance
    torch.testing.assert_close(out["loss"], st_loss_value(st, [q, p, n[:, 0]]), rtol=0, atol=1e-5)


def test_triplet_margin_zero_when_negatives_are_far():
    """Hand value: negatives far beyond the margin -> loss exactly 0; negative == positive -> loss == margin."""
    q = _embeddings(53, B, D)
    far = EmbeddedBatch(q, q.clone(), (q + 100).unsqueeze(1))
    assert TripletLoss(margin=1.0)(far)["loss"].item() == 0.0
    same = EmbeddedBatch(q, q + 1, (q + 1).unsqueeze(1))
    assert TripletLoss(margin=1.0)(same)["loss"].item() == pytest.approx(1.0)


@pytest.mark.parametrize("margin", [0.2, 0.5, 1.5])
def test_contrastive_matches_naive_and_sentence_transformers(margin):
    """ContrastiveLoss == mean 0.5 * (y d^2 + (1 - y) relu(margin - d)^2), d = 1 - cos, written out; and ==
    sentence-transformers ContrastiveLoss (cosine distance)."""
    q, p = _embeddings(60, 6, D), _embeddings(61, 6, D)
    p[:3] = q[:3] + 0.3 * p[:3]  # some close pairs so both branches are active
    labels = torch.tensor([1, 0, 1, 0, 1, 0])
    out = ContrastiveLoss(margin=margin)(EmbeddedBatch(q, p, scores=labels))
    torch.testing.assert_close(out["loss"], naive_contrastive(q, p, labels, margin))
    torch.testing.assert_close(out["contrastive"], out["loss"])
    st = st_losses.ContrastiveLoss(FakeModel(), margin=margin)
    torch.testing.assert_close(out["loss"], st_loss_value(st, [q, p], labels).to(q.dtype))


# ---------------------------------------------------------------------------------------- scored-pair losses
@pytest.mark.parametrize("similarity", ["cos", "dot"])
@pytest.mark.parametrize("scale", [1.0, 20.0])
def test_cosent_matches_naive_pair_loop(similarity, scale):
    """CoSENT == log(1 + sum_{score_i > score_j} exp(scale (sim_j - sim_i))) as an O(B^2) python loop; ties
    in the gold scores contribute no pair."""
    q, p = _embeddings(70, 7, D), _embeddings(71, 7, D)
    scores = torch.tensor([0.0, 0.2, 0.2, 0.5, 0.9, 1.0, 0.5], dtype=torch.float64)
    out = CoSENTLoss(scale=scale, similarity=similarity)(EmbeddedBatch(q, p, scores=scores))
    torch.testing.assert_close(out["loss"], naive_cosent(q, p, scores, scale=scale, similarity=similarity))
    torch.testing.assert_close(out["cosent"], out["loss"])


def test_cosent_matches_sentence_transformers_and_gradients():
    """CoSENT value == sentence-transformers CoSENTLoss (fake model), gradients == the naive loop's (float64)."""
    q, p = _embeddings(72, 6, D).requires_grad_(), _embeddings(73, 6, D).requires_grad_()
    scores = torch.tensor([0.1, 0.7, 0.3, 0.3, 1.0, 0.0], dtype=torch.float64)
    ours = CoSENTLoss()(EmbeddedBatch(q, p, scores=scores))["loss"]
    st = st_loss_value(st_losses.CoSENTLoss(FakeModel()), [q, p], scores)
    torch.testing.assert_close(ours, st)
    got = torch.autograd.grad(ours, (q, p))
    want = torch.autograd.grad(naive_cosent(q, p, scores), (q, p))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_cosent_is_zero_when_all_scores_tie():
    """No pair has score_i > score_j -> log(1 + empty sum) == 0 (and it is finite, not nan)."""
    q, p = _embeddings(74, 4, D), _embeddings(75, 4, D)
    loss = CoSENTLoss()(EmbeddedBatch(q, p, scores=torch.full((4,), 0.5, dtype=torch.float64)))["loss"]
    assert loss.item() == 0.0


def test_cosine_similarity_loss_is_mse_on_cosine():
    """CosineSimilarityLoss == mean (cos_i - score_i)^2 written out, == sentence-transformers CosineSimilarityLoss."""
    q, p = _embeddings(80, 6, D), _embeddings(81, 6, D)
    scores = torch.tensor([0.0, 0.1, 0.5, 0.5, 0.9, 1.0], dtype=torch.float64)
    out = CosineSimilarityLoss()(EmbeddedBatch(q, p, scores=scores))
    torch.testing.assert_close(out["loss"], naive_cosine_mse(q, p, scores))
    torch.testing.assert_close(out["cosine_mse"], out["loss"])
    st = st_loss_value(st_losses.CosineSimilarityLoss(FakeModel()), [q.float(), p.float()], scores.float())
    torch.testing.assert_close(out["loss"].float(), st)


def test_losses_accept_float32_and_integer_labels():
    """float32 embeddings with integer/boolean labels: same value as float64 references (to float32 precision)."""
    q, p = _embeddings(82, 4, D, dtype=torch.float32), _embeddings(83, 4, D, dtype=torch.float32)
    labels = torch.tensor([1, 0, 1, 0])
    got = ContrastiveLoss()(EmbeddedBatch(q, p, scores=labels))["loss"]
    torch.testing.assert_close(got.double(), naive_contrastive(q.double(), p.double(), labels, 0.5), rtol=1e-5, atol=1e-6)
    got = CoSENTLoss()(EmbeddedBatch(q, p, scores=labels.bool()))["loss"]
    torch.testing.assert_close(got.double(), naive_cosent(q.double(), p.double(), labels), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------- errors
def test_triplet_without_negatives_names_the_data_it_needs():
    q = _embeddings(90, 2, D)
    with pytest.raises(ValueError, match=r"triplet loss needs a negative per example: use triplet data"):
        TripletLoss()(EmbeddedBatch(q, q))


@pytest.mark.parametrize("loss_cls,name", [(CoSENTLoss, "CoSENT loss"), (ContrastiveLoss, "contrastive loss"), (CosineSimilarityLoss, "cosine similarity loss")])
def test_scored_losses_without_scores_name_the_data_they_need(loss_cls, name):
    q = _embeddings(91, 2, D)
    with pytest.raises(ValueError, match=rf"{name} needs a score per pair: use scored-pair data"):
        loss_cls()(EmbeddedBatch(q, q))


@pytest.mark.parametrize("loss_cls", [MultipleNegativesRankingLoss, CoSENTLoss])
def test_bad_similarity_name(loss_cls):
    q = _embeddings(92, 3, D)
    batch = EmbeddedBatch(q, q, scores=torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"similarity must be 'cos' or 'dot', got 'euclid'"):
        loss_cls(similarity="euclid")(batch)


def test_bad_triplet_distance():
    with pytest.raises(ValueError, match=r"triplet distance must be one of euclidean, cosine, manhattan, got 'l2'"):
        TripletLoss(distance="l2")


# ---------------------------------------------------------------------------------------- EmbeddedBatch
def test_map_embeddings_truncates_every_embedding_and_keeps_the_rest():
    """Matryoshka-style truncation reaches query, positive and negatives; scores/ids/extras pass through unchanged,
    and the original batch is not modified."""
    q, p, n = _embeddings(95, 3, D), _embeddings(96, 3, D), _embeddings(97, 3, 2, D)
    scores = torch.tensor([0.1, 0.2, 0.3])
    batch = EmbeddedBatch(q, p, n, scores=scores, query_ids=["q0", "q1", "q2"], positive_ids=["a", "b", "c"], extras={"k": 1})
    small = batch.map_embeddings(lambda t: t[..., :4])
    assert small.query.shape == (3, 4) and small.positive.shape == (3, 4) and small.negatives.shape == (3, 2, 4)
    torch.testing.assert_close(small.query, q[:, :4])
    torch.testing.assert_close(small.positive, p[:, :4])
    torch.testing.assert_close(small.negatives, n[..., :4])
    assert small.scores is scores and small.query_ids == ["q0", "q1", "q2"] and small.positive_ids == ["a", "b", "c"]
    assert small.extras == {"k": 1}
    assert batch.query.shape == (3, D) and batch.negatives.shape == (3, 2, D)
    # truncation then the loss == the naive loss on truncated vectors
    torch.testing.assert_close(MultipleNegativesRankingLoss()(small)["loss"], naive_mnrl(q[:, :4], p[:, :4], n[..., :4]))
    assert EmbeddedBatch(q, p).map_embeddings(lambda t: t[..., :4]).negatives is None

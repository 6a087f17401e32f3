"""MatryoshkaLoss equals the weighted sum of the inner loss on truncated (re-normalized) embeddings."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from embedlab.losses import CoSENTLoss, EmbeddedBatch, MatryoshkaLoss, MultipleNegativesRankingLoss, TripletLoss


def _batch(normalized: bool = True, seed: int = 0) -> EmbeddedBatch:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(6, 16, generator=g, dtype=torch.float64)
    p = torch.randn(6, 16, generator=g, dtype=torch.float64)
    n = torch.randn(6, 2, 16, generator=g, dtype=torch.float64)
    if normalized:
        q, p, n = F.normalize(q, dim=-1), F.normalize(p, dim=-1), F.normalize(n, dim=-1)
    return EmbeddedBatch(
        query=q.requires_grad_(), positive=p.requires_grad_(), negatives=n.requires_grad_(),
        scores=torch.rand(6, generator=g, dtype=torch.float64), extras={"normalized": normalized},
    )


def _by_hand(inner, batch: EmbeddedBatch, dims, weights, renormalize: bool) -> torch.Tensor:
    total = 0
    for d, w in zip(dims, weights):
        cut = [t[..., :d] for t in (batch.query, batch.positive, batch.negatives)]
        if renormalize:
            cut = [F.normalize(t, dim=-1) for t in cut]
        total = total + w * inner(EmbeddedBatch(query=cut[0], positive=cut[1], negatives=cut[2], scores=batch.scores))["loss"]
    return total


@pytest.mark.parametrize("inner", [MultipleNegativesRankingLoss(similarity="dot"), CoSENTLoss(), TripletLoss()], ids=["mnrl-dot", "cosent", "triplet"])
@pytest.mark.parametrize("normalized", [True, False])
def test_matryoshka_equals_weighted_sum_by_hand(inner, normalized):
    dims, weights = [16, 8, 4], [1.0, 0.5, 2.0]
    batch = _batch(normalized)
    loss = MatryoshkaLoss(inner, dims=dims, weights=weights)
    ours = loss(batch)
    grads = torch.autograd.grad(ours["loss"], [batch.query, batch.positive, batch.negatives], allow_unused=True)
    reference = _by_hand(inner, batch, dims, weights, renormalize=normalized)
    ref_grads = torch.autograd.grad(reference, [batch.query, batch.positive, batch.negatives], allow_unused=True)
    assert ours["loss"].item() == pytest.approx(reference.item(), rel=1e-12)
    for a, b in zip(grads, ref_grads):
        assert (a is None) == (b is None)  # cosent never looks at negatives
        assert a is None or torch.allclose(a, b, rtol=1e-10, atol=1e-12)
    inner_name = next(k for k in inner(batch) if k != "loss")
    assert {f"{inner_name}@dim{d}" for d in dims} <= set(ours)


def test_matryoshka_errors():
    with pytest.raises(ValueError, match=r"matryoshka weights \(2\) must match dims \(3\)"):
        MatryoshkaLoss(MultipleNegativesRankingLoss(), dims=[8, 4, 2], weights=[1, 1])
    with pytest.raises(ValueError, match="at least one dimension"):
        MatryoshkaLoss(MultipleNegativesRankingLoss(), dims=[])
    with pytest.raises(ValueError, match=r"matryoshka dims \[32\] are not in 1..16"):
        MatryoshkaLoss(MultipleNegativesRankingLoss(), dims=[32, 8])(_batch())

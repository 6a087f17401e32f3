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


def _softmax_kl_by_hand(teacher: torch.Tensor, student: torch.Tensor, temperature: float) -> torch.Tensor:
    """sum_j p_j (log p_j - log q_j) per row with explicit loops over finite columns, mean over rows, * T^2."""
    rows = []
    for t_row, s_row in zip(teacher, student):
        keep = torch.isfinite(t_row)
        p = torch.softmax(t_row[keep] / temperature, -1)
        log_q = torch.log_softmax(s_row[keep] / temperature, -1)
        rows.append((p * (p.log() - log_q)).sum())
    return torch.stack(rows).mean() * temperature**2


@pytest.mark.parametrize("mask", [False, True], ids=["no_mask", "duplicates_masked"])
def test_matryoshka_self_distillation_equals_hand_computation(mask):
    """distill_weight > 0 adds w_d * weight * T^2 * KL(teacher || student) per smaller dim, with the largest dim's
    logits as a constant teacher; masked candidates (-inf) do not count. Loss and gradients match by hand."""
    dims, weights, distill, temperature = [16, 8, 4], [1.0, 0.5, 2.0], 0.7, 2.0
    inner = MultipleNegativesRankingLoss(scale=10.0, mask_duplicates=mask)
    batch = _batch(True)
    if mask:  # pair 1 has pair 0's positive: it leaves query 0's softmax (and the other way round)
        batch.query_ids = list(range(6))
        batch.positive_ids = ["d0", "d0", "d2", "d3", "d4", "d5"]
        batch.negative_ids = [f"n{i}{j}" for i in range(6) for j in "ab"]
    ours = MatryoshkaLoss(inner, dims=dims, weights=weights, distill_weight=distill, distill_temperature=temperature)(batch)
    tensors = [batch.query, batch.positive, batch.negatives]
    grads = torch.autograd.grad(ours["loss"], tensors)

    def cut(d):
        return EmbeddedBatch(
            query=F.normalize(batch.query[:, :d], dim=-1), positive=F.normalize(batch.positive[:, :d], dim=-1),
            negatives=F.normalize(batch.negatives[..., :d], dim=-1), query_ids=batch.query_ids,
            positive_ids=batch.positive_ids, negative_ids=batch.negative_ids, extras=batch.extras,
        )

    teacher = inner.forward_with_logits(cut(16))[1].detach()
    if mask:
        assert torch.isinf(teacher).any()
    reference = sum(w * inner(cut(d))["loss"] for d, w in zip(dims, weights))
    for d, w in zip(dims[1:], weights[1:]):
        kl = _softmax_kl_by_hand(teacher, inner.forward_with_logits(cut(d))[1], temperature)
        assert ours[f"distill@dim{d}"].item() == pytest.approx(kl.item(), rel=1e-10)
        reference = reference + distill * w * kl
    ref_grads = torch.autograd.grad(reference, tensors)
    assert "distill@dim16" not in ours
    assert ours["loss"].item() == pytest.approx(reference.item(), rel=1e-10)
    for a, b in zip(grads, ref_grads):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)


def test_matryoshka_self_distillation_errors():
    with pytest.raises(ValueError, match="matryoshka distill_weight needs an inner loss with query -> candidate logits"):
        MatryoshkaLoss(CoSENTLoss(), dims=[8, 4], distill_weight=1.0)
    with pytest.raises(ValueError, match="distill_weight must be >= 0 and distill_temperature > 0"):
        MatryoshkaLoss(MultipleNegativesRankingLoss(), dims=[8, 4], distill_weight=1.0, distill_temperature=0.0)
    # off by default: no distill terms, and CoSENT is fine
    assert not any(k.startswith("distill") for k in MatryoshkaLoss(CoSENTLoss(), dims=[16, 8])(_batch()))


def test_matryoshka_self_distillation_through_cached_mnrl():
    """loss=cached_mnrl inside Matryoshka: the GradCache wrapper exposes the inner mnrl's logits, same values."""
    from embedlab.lightning.grad_cache import cached_mnrl

    batch = _batch(True)
    plain = MatryoshkaLoss(MultipleNegativesRankingLoss(), dims=[16, 4], distill_weight=1.0)(batch)
    cached = MatryoshkaLoss(cached_mnrl(mini_batch_size=2), dims=[16, 4], distill_weight=1.0)(batch)
    assert set(cached) == set(plain) and "distill@dim4" in cached
    for k in plain:
        assert cached[k].item() == pytest.approx(plain[k].item(), rel=1e-12)

"""Compression (quantize, quantized_search, reduction, storage) against naive numpy / full-matrix implementations
on seeded random data."""

from __future__ import annotations

import gc
import math
import os
import re

import numpy as np
import pytest
import torch

from embedlab.evaluation import quantized_search as QS
from embedlab.evaluation import search as S
from embedlab.evaluation.quantize import ScalarQuantizer, binary_quantize, fit_scalar_quantizer
from embedlab.evaluation.quantized_search import binary_rescore_search, hamming_search, scalar_search
from embedlab.evaluation.reduction import fit_pca, truncate
from embedlab.evaluation.search import exact_search
from embedlab.evaluation.storage import PRECISIONS, index_bytes, rescore_bytes
from embedlab.peak_memory import reset_peak_rss, status_kb


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))


# ------------------------------------------------------------------------------------------------------------
# naive references (full matrices, numpy)
# ------------------------------------------------------------------------------------------------------------
def _naive_topk(scores: np.ndarray, k: int, largest: bool) -> tuple[np.ndarray, np.ndarray]:
    """Full sort of each row: by score (desc if largest), ties by lower column."""
    cols = np.arange(scores.shape[1])
    order = np.stack([np.lexsort((cols, -row if largest else row)) for row in scores])[:, :k]
    return np.take_along_axis(scores, order, axis=1), order


def _naive_hamming(query_bits: np.ndarray, corpus_bits: np.ndarray) -> np.ndarray:
    """(Q, N) bit counts of the XOR, from unpacked bits."""
    qu = np.unpackbits(query_bits, axis=1).astype(np.int64)
    cu = np.unpackbits(corpus_bits, axis=1).astype(np.int64)
    return (qu[:, None, :] != cu[None, :, :]).sum(-1)


def _st_scalar_codes(cal: np.ndarray, x: np.ndarray, precision: str, rounding=np.round) -> np.ndarray:
    """sentence-transformers' quantize_embeddings formula by hand: steps = (max - min) / 255 (1 if zero)."""
    starts = cal.min(axis=0)
    steps = (cal.max(axis=0) - starts) / 255
    steps = np.where(steps == 0, np.float32(1), steps)
    levels = np.clip(rounding((x - starts) / steps), 0, 255)
    return levels.astype(np.uint8) if precision == "uint8" else (levels - 128).astype(np.int8)


# ------------------------------------------------------------------------------------------------------------
# 1. truncation
# ------------------------------------------------------------------------------------------------------------
def test_truncate_matches_naive():
    emb = _randn(50, 32)
    x = emb.numpy()
    for dim in (1, 8, 32):
        expected = x[:, :dim] / np.linalg.norm(x[:, :dim], axis=1, keepdims=True)
        np.testing.assert_allclose(truncate(emb, dim).numpy(), expected, rtol=1e-5, atol=1e-6)
        assert torch.equal(truncate(emb, dim, renormalize=False), emb[:, :dim])


def test_truncate_rejects_bad_dim():
    emb = _randn(4, 16)
    with pytest.raises(ValueError, match=re.escape("dim must satisfy 1 <= dim <= 16 (the embedding width), got 17")):
        truncate(emb, 17)
    with pytest.raises(ValueError, match=re.escape("dim must satisfy 1 <= dim <= 16 (the embedding width), got 0")):
        truncate(emb, 0)


# ------------------------------------------------------------------------------------------------------------
# 2. scalar quantization
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("precision", ["int8", "uint8"])
@pytest.mark.parametrize("rounding", ["nearest", "floor"])
def test_scalar_codes_equal_hand_formula(precision, rounding):
    cal = _randn(300, 24, seed=1)
    cal[:, 5] = 0.25  # constant dimension: step 1, code 0
    x = _randn(200, 24, seed=2) * 1.5  # wider than the calibration range: exercises the clamp
    x[:, 5] = 0.25
    quantizer = fit_scalar_quantizer(cal, precision=precision, rounding=rounding)
    codes = quantizer.quantize(x, chunk_size=37)
    expected = _st_scalar_codes(cal.numpy(), x.numpy(), precision, np.round if rounding == "nearest" else np.floor)
    assert codes.dtype == (torch.int8 if precision == "int8" else torch.uint8)
    np.testing.assert_array_equal(codes.numpy(), expected)
    assert (codes.numpy() == codes.numpy().min()).any() and codes.numpy().max() == (127 if precision == "int8" else 255)


def test_int8_is_uint8_shifted_by_128():
    cal, x = _randn(100, 8, seed=3), _randn(30, 8, seed=4)
    u = fit_scalar_quantizer(cal, "uint8").quantize(x).numpy().astype(np.int16)
    s = fit_scalar_quantizer(cal, "int8").quantize(x).numpy().astype(np.int16)
    np.testing.assert_array_equal(s, u - 128)


@pytest.mark.parametrize("precision", ["int8", "uint8"])
def test_scalar_roundtrip_error_at_most_half_step(precision):
    cal = _randn(500, 64, seed=5)
    quantizer = fit_scalar_quantizer(cal, precision=precision)
    restored = quantizer.dequantize(quantizer.quantize(cal), chunk_size=77)
    assert restored.dtype == torch.float32
    steps = quantizer.steps.numpy()
    err = np.abs(restored.numpy() - cal.numpy())
    assert (err <= steps / 2 + 1e-6).all(), float((err - steps / 2).max())
    # dequantized levels by hand: min + uint8_code * step
    codes = quantizer.quantize(cal).numpy().astype(np.float64) + (128 if precision == "int8" else 0)
    np.testing.assert_allclose(restored.numpy(), cal.numpy().min(0) + codes * steps, rtol=0, atol=1e-5)


def test_out_of_range_values_clamp_to_end_levels():
    cal = torch.tensor([[0.0, 0.0], [255.0, 510.0]])  # steps 1 and 2, exact in float32
    q = fit_scalar_quantizer(cal, "int8").quantize(torch.tensor([[-5.0, 600.0], [127.6, 3.2], [2.5, 5.0]]))
    # uint8 levels [[0 (clamped), 255 (clamped)], [128, 2], [2 (half to even), 2 (half to even)]], minus 128
    np.testing.assert_array_equal(q.numpy(), [[-128, 127], [0, -126], [-126, -126]])


def test_scalar_quantizer_errors():
    with pytest.raises(ValueError, match=re.escape("precision must be one of ('int8', 'uint8'), got 'int4'")):
        fit_scalar_quantizer(_randn(10, 4), precision="int4")
    with pytest.raises(ValueError, match=re.escape("rounding must be one of ('nearest', 'floor'), got 'ceil'")):
        fit_scalar_quantizer(_randn(10, 4), rounding="ceil")
    with pytest.raises(ValueError, match="at least 2 rows"):
        fit_scalar_quantizer(_randn(1, 4))
    quantizer = fit_scalar_quantizer(_randn(10, 4), "int8")
    with pytest.raises(ValueError, match=re.escape("expected torch.int8 codes for a int8 quantizer, got torch.uint8")):
        quantizer.dequantize(torch.zeros(2, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match="the quantizer was fitted on width 4"):
        quantizer.quantize(_randn(3, 5))


# ------------------------------------------------------------------------------------------------------------
# 3. binary quantization and Hamming search
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dim", [1, 7, 8, 13, 64, 385])
def test_binary_quantize_matches_packbits(dim):
    emb = _randn(41, dim, seed=dim)
    emb[::3, 0] = 0.0  # zero is not > 0
    bits = binary_quantize(emb, chunk_size=10)
    assert bits.dtype == torch.uint8 and bits.shape == (41, math.ceil(dim / 8))
    np.testing.assert_array_equal(bits.numpy(), np.packbits(emb.numpy() > 0, axis=1))


@pytest.mark.parametrize("chunks", [(4, 37), (1000, 1000), (50, 10)])
def test_hamming_search_matches_naive_with_ties(chunks):
    # 12 dims -> distances 0..12 over 300 docs: ties everywhere, plus exact duplicate rows
    corpus = _randn(300, 12, seed=6)
    corpus[100:150] = corpus[:50]
    query = torch.cat([_randn(17, 12, seed=7), corpus[[0, 120]]])
    qb, cb = binary_quantize(query), binary_quantize(corpus)
    dist, idx = hamming_search(qb, cb, top_k=25, query_chunk_size=chunks[0], corpus_chunk_size=chunks[1])
    expected_dist, expected_idx = _naive_topk(_naive_hamming(qb.numpy(), cb.numpy()), 25, largest=False)
    assert dist.dtype == torch.int64 and idx.dtype == torch.int64
    np.testing.assert_array_equal(dist.numpy(), expected_dist)
    np.testing.assert_array_equal(idx.numpy(), expected_idx)
    assert idx[-2, 0] == 0 and idx[-2, 1] == 100 and dist[-2, 1] == 0  # duplicate: tie broken by lower index


def test_hamming_search_top_k_larger_than_corpus_returns_whole_corpus():
    cb = binary_quantize(_randn(5, 20, seed=8))
    qb = binary_quantize(_randn(2, 20, seed=9))
    dist, idx = hamming_search(qb, cb, top_k=50, corpus_chunk_size=2)
    expected_dist, expected_idx = _naive_topk(_naive_hamming(qb.numpy(), cb.numpy()), 5, largest=False)
    assert idx.shape == (2, 5)
    np.testing.assert_array_equal(dist.numpy(), expected_dist)
    np.testing.assert_array_equal(idx.numpy(), expected_idx)


# ------------------------------------------------------------------------------------------------------------
# 4./5. int8 and rescored binary search (float search: tests/test_search.py)
# ------------------------------------------------------------------------------------------------------------
def test_scalar_search_matches_naive_dequantized_scoring():
    corpus, query = _randn(400, 32, seed=11), _randn(13, 32, seed=12)
    quantizer = fit_scalar_quantizer(corpus, "int8")
    codes = quantizer.quantize(corpus)
    steps = quantizer.steps.numpy().astype(np.float64)
    dequantized = corpus.numpy().min(0).astype(np.float64) + (codes.numpy().astype(np.float64) + 128) * steps
    expected_scores, expected_idx = _naive_topk(query.numpy().astype(np.float64) @ dequantized.T, 15, largest=True)
    scores, idx = scalar_search(query, quantizer, codes, 15, query_chunk_size=5, corpus_chunk_size=64)
    np.testing.assert_array_equal(idx.numpy(), expected_idx)
    np.testing.assert_allclose(scores.numpy(), expected_scores, rtol=1e-5, atol=1e-4)


def _naive_rescore(query: np.ndarray, corpus_bits: np.ndarray, top_k: int, multiplier: int, docs: np.ndarray):
    """Full Hamming matrix -> top_k * multiplier candidates -> float query . docs[candidate] -> top_k."""
    _, candidates = _naive_topk(
        _naive_hamming(np.packbits(query > 0, axis=1), corpus_bits), top_k * multiplier, largest=False
    )
    scores = np.einsum("qd,qkd->qk", query.astype(np.float64), docs[candidates])
    order = np.stack([np.lexsort((c, -s)) for c, s in zip(candidates, scores)])[:, :top_k]
    return np.take_along_axis(scores, order, 1), np.take_along_axis(candidates, order, 1)


@pytest.mark.parametrize("mode", ["signs", "int8", "float"])
def test_binary_rescore_matches_naive(mode):
    dim = 45  # not a multiple of 8: padding bits must not be scored
    corpus, query = _randn(600, dim, seed=13), _randn(11, dim, seed=14)
    bits = binary_quantize(corpus)
    if mode == "signs":
        rescore, docs = None, np.where(corpus.numpy() > 0, 1.0, -1.0)
    elif mode == "int8":
        quantizer = fit_scalar_quantizer(corpus, "int8")
        codes = quantizer.quantize(corpus)
        rescore, docs = (quantizer, codes), quantizer.dequantize(codes).numpy().astype(np.float64)
    else:
        rescore, docs = corpus, corpus.numpy().astype(np.float64)
    scores, idx = binary_rescore_search(
        query, bits, top_k=10, rescore_multiplier=3, corpus_rescore=rescore, query_chunk_size=4, corpus_chunk_size=50
    )
    expected_scores, expected_idx = _naive_rescore(query.numpy(), bits.numpy(), 10, 3, docs)
    np.testing.assert_array_equal(idx.numpy(), expected_idx)
    np.testing.assert_allclose(scores.numpy(), expected_scores, rtol=1e-5, atol=1e-4)


def test_signs_rescoring_ranks_like_sentence_transformers_zero_one_unpacking():
    # sentence-transformers rescores with bits in {0, 1}; q.(2b - 1) = 2 q.b - sum(q) gives the same order
    corpus, query = _randn(500, 40, seed=15), _randn(8, 40, seed=16)
    bits = binary_quantize(corpus)
    _, idx = binary_rescore_search(query, bits, top_k=10, rescore_multiplier=4)
    _, expected_idx = _naive_rescore(query.numpy(), bits.numpy(), 10, 4, (corpus.numpy() > 0).astype(np.float64))
    np.testing.assert_array_equal(idx.numpy(), expected_idx)


def test_search_argument_errors():
    q, c = _randn(2, 16), _randn(10, 16)
    bits = binary_quantize(c)
    with pytest.raises(ValueError, match=re.escape("top_k must be >= 1, got 0")):
        hamming_search(binary_quantize(q), bits, 0)
    with pytest.raises(ValueError, match="chunk sizes must be >= 1"):
        exact_search(q, c, 3, "dot", corpus_chunk_size=0)
    with pytest.raises(ValueError, match=re.escape("rescore_multiplier must be >= 1, got 0")):
        binary_rescore_search(q, bits, 3, rescore_multiplier=0)
    with pytest.raises(ValueError, match=re.escape("corpus_bits has 2 bytes per row, queries of width 24 need 3")):
        binary_rescore_search(_randn(2, 24), bits, 3)
    with pytest.raises(ValueError, match="float rescore corpus must be"):
        binary_rescore_search(q, bits, 3, corpus_rescore=_randn(9, 16))
    with pytest.raises(ValueError, match="packed bits must be uint8"):
        hamming_search(q, bits, 3)
    quantizer = fit_scalar_quantizer(c, "int8")
    with pytest.raises(ValueError, match=re.escape("expected torch.int8 corpus codes for a int8 quantizer")):
        scalar_search(q, quantizer, torch.zeros(10, 16, dtype=torch.uint8), 3)


def test_searches_are_chunked(monkeypatch):
    """Structural: no score block, dequantized chunk or Hamming block exceeds query_chunk x corpus_chunk."""
    corpus, query = _randn(257, 24, seed=17), _randn(23, 24, seed=18)
    quantizer = fit_scalar_quantizer(corpus, "int8")
    codes, bits = quantizer.quantize(corpus), binary_quantize(corpus)
    unchunked = {
        "dense": exact_search(query, corpus, 7, "dot", 10**6, 10**6),
        "int8": scalar_search(query, quantizer, codes, 7, 10**6, 10**6),
        "rescore": binary_rescore_search(query, bits, 7, 2, None, 10**6, 10**6),
    }
    matmul_shapes, hamming_shapes, dequantized_rows = [], [], []
    real_matmul, real_hamming, real_dequantize = S.dot_block, QS._hamming_block, ScalarQuantizer.dequantize

    def matmul(a, b):
        matmul_shapes.append((a.shape[0], b.shape[0]))
        return real_matmul(a, b)

    def hamming(table, chunk):
        out = real_hamming(table, chunk)
        hamming_shapes.append(tuple(out.shape))
        return out

    def dequantize(self, q, *args, **kwargs):
        dequantized_rows.append(q.shape[0])
        return real_dequantize(self, q, *args, **kwargs)

    monkeypatch.setattr(S, "dot_block", matmul)
    monkeypatch.setattr(QS, "dot_block", matmul)
    monkeypatch.setattr(QS, "_hamming_block", hamming)
    monkeypatch.setattr(ScalarQuantizer, "dequantize", dequantize)
    chunked = {
        "dense": exact_search(query, corpus, 7, "dot", query_chunk_size=5, corpus_chunk_size=40),
        "int8": scalar_search(query, quantizer, codes, 7, query_chunk_size=5, corpus_chunk_size=40),
        "rescore": binary_rescore_search(query, bits, 7, 2, None, query_chunk_size=5, corpus_chunk_size=40),
    }
    assert max(matmul_shapes) <= (5, 40) and max(s[1] for s in matmul_shapes) == 40
    assert len(matmul_shapes) == 2 * math.ceil(23 / 5) * math.ceil(257 / 40)
    assert max(s[0] for s in hamming_shapes) == 5 and max(s[1] for s in hamming_shapes) == 40
    assert max(dequantized_rows) == 40
    for name, (scores, idx) in chunked.items():
        assert torch.equal(idx, unchunked[name][1]), name
        torch.testing.assert_close(scores, unchunked[name][0], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------------------
# 6. PCA
# ------------------------------------------------------------------------------------------------------------
def _pca_data(n: int = 600, d: int = 20) -> torch.Tensor:
    rng = np.random.default_rng(19)
    rotation, _ = np.linalg.qr(rng.standard_normal((d, d)))
    scales = np.linspace(5.0, 0.5, d)  # distinct variances: components are unique up to sign
    return torch.from_numpy((rng.standard_normal((n, d)) * scales @ rotation.T + 3.0).astype(np.float32))


def test_pca_matches_numpy_svd():
    emb = _pca_data()
    pca = fit_pca(emb, 6, chunk_size=128)
    x = emb.numpy().astype(np.float64)
    centred = x - x.mean(0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    np.testing.assert_allclose(pca.mean.numpy(), x.mean(0), rtol=1e-6, atol=1e-5)
    signs = np.sign(np.sum(pca.components.numpy() * vt[:6], axis=1))
    np.testing.assert_allclose(pca.components.numpy(), vt[:6] * signs[:, None], atol=1e-4)
    np.testing.assert_allclose(pca.explained_variance.numpy(), s[:6] ** 2 / (len(x) - 1), rtol=1e-4)
    np.testing.assert_allclose(pca.explained_variance_ratio.numpy(), s[:6] ** 2 / (s**2).sum(), rtol=1e-4)
    # sign convention: the largest-|coefficient| of each component is positive
    comps = pca.components.numpy()
    assert (comps[np.arange(6), np.abs(comps).argmax(1)] > 0).all()
    np.testing.assert_allclose(comps @ comps.T, np.eye(6), atol=1e-5)


def test_pca_transform_equals_naive_centred_projection():
    emb = _pca_data()
    pca = fit_pca(emb, 5)
    other = _randn(70, 20, seed=20)
    mean, comps = pca.mean.numpy().astype(np.float64), pca.components.numpy().astype(np.float64)
    expected = (other.numpy() - mean) @ comps.T
    np.testing.assert_allclose(pca.transform(other, chunk_size=16).numpy(), expected, rtol=1e-5, atol=1e-4)
    normed = pca.transform(other, renormalize=True).numpy()
    np.testing.assert_allclose(normed, expected / np.linalg.norm(expected, axis=1, keepdims=True), atol=1e-5)
    # full-rank projection is an isometry of the centred data
    full = fit_pca(emb, 20).transform(emb).numpy()
    centred = emb.numpy() - emb.numpy().mean(0)
    np.testing.assert_allclose(np.linalg.norm(full, axis=1), np.linalg.norm(centred, axis=1), rtol=1e-4)


def test_pca_errors():
    with pytest.raises(ValueError, match=re.escape("dim must satisfy 1 <= dim <= 20 (the embedding width), got 21")):
        fit_pca(_pca_data(), 21)
    with pytest.raises(ValueError, match="PCA needs at least 2 rows"):
        fit_pca(_randn(1, 4), 2)
    with pytest.raises(ValueError, match="the PCA was fitted on width 20"):
        fit_pca(_pca_data(), 3).transform(_randn(2, 8))


# ------------------------------------------------------------------------------------------------------------
# 7. storage: index and rescoring bytes
# ------------------------------------------------------------------------------------------------------------
def test_index_and_rescore_bytes_by_hand():
    # 384 dims: float32 4 * 384, float16 2 * 384, one byte per dim, 384 bits = 48 bytes
    expected = {"float32": 1536, "float16": 768, "int8": 384, "uint8": 384, "binary": 48, "binary_rescore": 48}
    assert {p: index_bytes(384, p) for p in PRECISIONS} == expected
    assert index_bytes(45, "binary") == 6 and index_bytes(1, "binary_rescore") == 1  # ceil(45 / 8), ceil(1 / 8)
    # only binary_rescore keeps a rescoring copy: int8 one byte per dim, float32 four, binary its own bits
    assert {p: rescore_bytes(384, p, "int8") for p in PRECISIONS} == {p: 0 for p in PRECISIONS} | {"binary_rescore": 384}
    assert rescore_bytes(45, "binary_rescore", "float32") == 180 and rescore_bytes(45, "binary_rescore", "binary") == 0
    msg = "unknown precision 'int4'; valid precisions: float32, float16, int8, uint8, binary, binary_rescore"
    with pytest.raises(ValueError, match=re.escape(msg)):
        index_bytes(384, "int4")
    with pytest.raises(ValueError, match=re.escape("rescore_with must be one of int8, float32, binary, got 'int4'")):
        rescore_bytes(384, "binary_rescore", "int4")


# ------------------------------------------------------------------------------------------------------------
# memory bound
# ------------------------------------------------------------------------------------------------------------
MEMORY_BOUND_MB = 150


def test_searches_stay_memory_bounded(monkeypatch):
    """200_000 x 384 float32 corpus (307 MB; int8 copy 77 MB; bits 9.6 MB), 100 queries, corpus_chunk_size=20_000.

    Bound: the peak-RSS growth (``VmHWM`` after the call, reset to the current RSS before it, minus that RSS)
    of each search -- float (``exact_search``), int8 (``scalar_search``) and ``binary_rescore_search`` --
    stays below 150 MB, i.e. under half the float corpus, so no dequantized or float copy of the whole corpus
    (307 MB) can exist. By construction one 20_000 x 384 float chunk is 31 MB and a (100, 20_000) score block 8 MB.
    The full 100 x 200_000 score matrix would be only 80 MB, so chunking is also checked structurally: the largest
    score block seen by the matmul and the Hamming kernel is (100, 20_000).
    """
    if not os.path.exists("/proc/self/status") or not reset_peak_rss():
        pytest.skip("needs Linux /proc/self/status and a writable /proc/self/clear_refs")
    n, d, chunk = 200_000, 384, 20_000
    gen = torch.Generator().manual_seed(0)
    corpus = torch.randn(n, d, generator=gen)
    targets = torch.arange(0, n, n // 100)  # (100,) each query is a noisy copy of one corpus row
    query = corpus[targets] + 0.1 * torch.randn(100, d, generator=gen)
    quantizer = fit_scalar_quantizer(corpus, "int8")
    codes = quantizer.quantize(corpus)
    bits = binary_quantize(corpus)

    blocks: list[tuple[int, int]] = []
    real_matmul, real_hamming = S.dot_block, QS._hamming_block

    def matmul(a, b):
        blocks.append((a.shape[0], b.shape[0]))
        return real_matmul(a, b)

    monkeypatch.setattr(S, "dot_block", matmul)
    monkeypatch.setattr(QS, "dot_block", matmul)
    monkeypatch.setattr(
        QS, "_hamming_block", lambda t, c: (blocks.append((t.shape[1], c.shape[0])), real_hamming(t, c))[1]
    )
    runs = {
        "float": lambda: exact_search(query, corpus, 10, "dot", query_chunk_size=100, corpus_chunk_size=chunk),
        "int8": lambda: scalar_search(query, quantizer, codes, 10, query_chunk_size=100, corpus_chunk_size=chunk),
        "binary_rescore": lambda: binary_rescore_search(
            query, bits, 10, rescore_multiplier=4, query_chunk_size=100, corpus_chunk_size=chunk
        ),
    }
    growth_mb = {}
    for name, run in runs.items():
        # the smaller of two calls: the allocator's state left by earlier tests can add to one call's peak;
        # a whole-corpus copy would exceed the bound in both calls
        growth_mb[name] = float("inf")
        for _ in range(2):
            gc.collect()
            reset_peak_rss()
            before = status_kb("VmRSS")
            _, idx = run()
            growth_mb[name] = min(growth_mb[name], (status_kb("VmHWM") - before) / 1024)
            assert idx.shape == (100, 10)
            assert torch.equal(idx[:, 0], targets), name  # the noisy copy finds its source row first
    assert max(blocks) == (100, chunk)
    assert all(g < MEMORY_BOUND_MB for g in growth_mb.values()), growth_mb


# ------------------------------------------------------------------------------------------------------------
# cross-check against sentence-transformers itself (slow: its import is heavy)
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_matches_sentence_transformers():
    st_quant = pytest.importorskip("sentence_transformers.util.quantization")
    corpus, query = _randn(1000, 64, seed=21), _randn(20, 64, seed=22)
    x, cal = query.numpy(), corpus.numpy()
    for precision in ("int8", "uint8"):
        ours = fit_scalar_quantizer(corpus, precision, rounding="floor").quantize(query).numpy()
        np.testing.assert_array_equal(ours, st_quant.quantize_embeddings(x, precision, calibration_embeddings=cal))
    np.testing.assert_array_equal(binary_quantize(corpus).numpy(), st_quant.quantize_embeddings(cal, "ubinary"))
    pytest.importorskip("faiss")
    results, _ = st_quant.semantic_search_faiss(
        x, corpus_embeddings=st_quant.quantize_embeddings(cal, "ubinary"), corpus_precision="ubinary",
        top_k=10, rescore=True, rescore_multiplier=4, exact=True,
    )
    _, idx = binary_rescore_search(query, binary_quantize(corpus), 10, rescore_multiplier=4)
    np.testing.assert_array_equal(idx.numpy(), [[hit["corpus_id"] for hit in hits] for hits in results])

"""embedlab.evaluation.search: the chunked top-k engine equals a full-matrix top-k (ties by lower index), within
bounded memory; faiss_search equals exact_search."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from embedlab.evaluation import search as S
from embedlab.evaluation.metrics import retrieval_metrics
from embedlab.evaluation.search import exact_search, faiss_search, search_to_run


def _full_scores(queries: torch.Tensor, corpus: torch.Tensor, similarity: str) -> torch.Tensor:
    if similarity == "cos":
        queries, corpus = F.normalize(queries, dim=-1), F.normalize(corpus, dim=-1)
    return queries @ corpus.T  # (Q, N), fine at test sizes


def _assert_valid_topk(scores, indices, full, k, atol):
    """A correct top-k: sorted, distinct indices, scores are those of the indices and as good as the best k."""
    assert scores.shape == indices.shape == (full.shape[0], k)
    assert indices.dtype == torch.long
    assert torch.all(scores[:, :-1] >= scores[:, 1:])
    assert all(len(set(row)) == k for row in indices.tolist())
    torch.testing.assert_close(scores.double(), full.double().gather(1, indices), atol=atol, rtol=0)
    torch.testing.assert_close(scores.double(), torch.topk(full.double(), k, dim=1).values, atol=atol, rtol=0)


@pytest.mark.parametrize("similarity", ["cos", "dot"])
@pytest.mark.parametrize(
    ("top_k", "query_chunk_size", "corpus_chunk_size"),
    [(10, 8, 50), (30, 7, 13), (5, 1000, 1000), (1, 3, 1)],  # chunks not dividing Q=37/N=211; k > chunk
)
def test_exact_search_matches_full_topk(similarity, top_k, query_chunk_size, corpus_chunk_size):
    gen = torch.Generator().manual_seed(0)
    queries = torch.randn(37, 16, generator=gen, dtype=torch.float64)
    corpus = torch.randn(211, 16, generator=gen, dtype=torch.float64) * 3  # non-unit norms: cos != dot
    scores, indices = exact_search(
        queries, corpus, top_k, similarity, query_chunk_size=query_chunk_size, corpus_chunk_size=corpus_chunk_size
    )
    reference = torch.topk(_full_scores(queries, corpus, similarity), top_k, dim=1)
    # float64 random data has no near-ties, so the order is unique and must match exactly
    assert torch.equal(indices, reference.indices)
    torch.testing.assert_close(scores, reference.values, atol=1e-12, rtol=0)


def _naive_topk_lower_index_first(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Full sort of each row by score descending, equal scores by lower column (numpy lexsort)."""
    cols = np.arange(scores.shape[1])
    order = np.stack([np.lexsort((cols, -row)) for row in scores])[:, :k]
    return np.take_along_axis(scores, order, axis=1), order


@pytest.mark.parametrize("chunks", [(4, 13), (100, 1000), (1, 3)])
def test_exact_search_breaks_ties_by_lower_index(chunks):
    # small integers: dot products are exact, so scores tie everywhere, across chunk borders too
    rng = np.random.default_rng(10)
    corpus = torch.from_numpy(rng.integers(-2, 3, size=(200, 6)).astype(np.float32))
    query = torch.from_numpy(rng.integers(-2, 3, size=(9, 6)).astype(np.float32))
    expected_scores, expected_idx = _naive_topk_lower_index_first(query.numpy() @ corpus.numpy().T, 20)
    scores, idx = exact_search(query, corpus, 20, "dot", query_chunk_size=chunks[0], corpus_chunk_size=chunks[1])
    np.testing.assert_array_equal(scores.numpy(), expected_scores)
    np.testing.assert_array_equal(idx.numpy(), expected_idx)


def test_top_k_larger_than_corpus():
    gen = torch.Generator().manual_seed(1)
    queries, corpus = torch.randn(5, 8, generator=gen), torch.randn(7, 8, generator=gen)
    scores, indices = exact_search(queries, corpus, top_k=20, query_chunk_size=2, corpus_chunk_size=3)
    _assert_valid_topk(scores, indices, _full_scores(queries, corpus, "cos"), k=7, atol=1e-6)
    assert all(sorted(row) == list(range(7)) for row in indices.tolist())


def test_unknown_similarity_message():
    x = torch.randn(2, 4)
    with pytest.raises(ValueError, match=re.escape("similarity must be one of 'cos', 'dot', got 'l2'")):
        exact_search(x, x, 1, similarity="l2")


def test_input_errors():
    with pytest.raises(ValueError, match="embedding dims differ"):
        exact_search(torch.randn(2, 4), torch.randn(3, 5), 1)
    with pytest.raises(ValueError, match="top_k must be >= 1"):
        exact_search(torch.randn(2, 4), torch.randn(3, 4), 0)


def test_mixed_dtype_and_grad_inputs():
    queries = torch.randn(4, 8, requires_grad=True)
    corpus = torch.randn(20, 8, dtype=torch.float64)  # chunks are cast to the queries' dtype
    scores, indices = exact_search(queries, corpus, 3, corpus_chunk_size=6)
    assert scores.dtype == torch.float32 and not scores.requires_grad
    _assert_valid_topk(scores, indices, _full_scores(queries.detach(), corpus.float(), "cos"), k=3, atol=1e-6)


def test_memory_bound(monkeypatch):
    """Every score block the search creates is at most query_chunk_size x corpus_chunk_size, every merge at most
    query_chunk_size x 2k.

    The matmul site (``dot_block``) and the merge (``merge_topk``) are wrapped to record the shapes they see; the
    call counts prove the wrappers saw every block of the 3 x 20 chunk grid.
    """
    gen = torch.Generator().manual_seed(2)
    num_queries, num_docs, k = 150, 20_000, 10
    queries, corpus = torch.randn(num_queries, 64, generator=gen), torch.randn(num_docs, 64, generator=gen)
    block_shapes, merge_shapes = [], []
    real_dot_block, real_merge = S.dot_block, S.merge_topk

    def dot_block(a, b):
        out = real_dot_block(a, b)
        block_shapes.append(tuple(out.shape))
        return out

    def merge(best, new, *args, **kwargs):
        merge_shapes.append((best[0].shape[0], best[0].shape[1] + new[0].shape[1]))
        return real_merge(best, new, *args, **kwargs)

    monkeypatch.setattr(S, "dot_block", dot_block)
    monkeypatch.setattr(S, "merge_topk", merge)
    scores, indices = exact_search(queries, corpus, k, query_chunk_size=64, corpus_chunk_size=1000)
    monkeypatch.undo()

    assert len(block_shapes) == 3 * 20  # ceil(150 / 64) query chunks x 20 corpus chunks
    assert len(merge_shapes) == 3 * 19  # every block after a query chunk's first is merged
    assert max(rows * cols for rows, cols in block_shapes) <= 64 * 1000
    assert max(cols for _, cols in merge_shapes) <= 2 * k
    assert max(rows for rows, _ in block_shapes + merge_shapes) <= 64
    _assert_valid_topk(scores, indices, _full_scores(queries, corpus, "cos"), k, atol=1e-5)


@pytest.mark.parametrize("similarity", ["cos", "dot"])
@pytest.mark.parametrize(("query_chunk_size", "corpus_chunk_size"), [(16, 100), (1000, 10_000), (20, 11)])
def test_faiss_search_equals_exact_search(similarity, query_chunk_size, corpus_chunk_size):
    """Same ids in the same order and the same scores (float32 round-off) as exact search on tie-free data.

    float64 random data has no float32 near-ties at this size, so the top-12 order is unique; chunk sizes that
    do not divide Q=45 / N=503, and a corpus chunk smaller than k (11 < 12), exercise the per-chunk merge.
    """
    pytest.importorskip("faiss")
    gen = torch.Generator().manual_seed(3)
    queries = torch.randn(45, 32, generator=gen, dtype=torch.float64)
    corpus = torch.randn(503, 32, generator=gen, dtype=torch.float64) * 2
    chunks = {"query_chunk_size": query_chunk_size, "corpus_chunk_size": corpus_chunk_size}
    exact_scores, exact_indices = exact_search(queries, corpus, 12, similarity, **chunks)
    scores, indices = faiss_search(queries, corpus, 12, similarity, **chunks)
    assert scores.dtype == torch.float32 and indices.dtype == torch.long
    assert torch.equal(indices, exact_indices)
    torch.testing.assert_close(scores.double(), exact_scores, atol=1e-4, rtol=1e-5)
    scores, indices = faiss_search(queries, corpus[:5], 12)  # k > N: the whole corpus, best first
    assert torch.equal(indices, exact_search(queries, corpus[:5], 12)[1])


def test_search_to_run():
    scores = torch.tensor([[0.9, 0.5], [0.7, -1.0]])
    indices = torch.tensor([[2, 0], [1, -1]])  # -1: "no result"
    run = search_to_run(scores, indices, ["qa", "qb"], ["d0", "d1", "d2"])
    assert run == {"qa": {"d2": pytest.approx(0.9), "d0": 0.5}, "qb": {"d1": pytest.approx(0.7)}}
    with pytest.raises(ValueError, match="2 query ids for 3 rows"):
        search_to_run(torch.zeros(3, 1), torch.zeros(3, 1, dtype=torch.long), ["a", "b"], ["d"])


def test_search_then_metrics_end_to_end():
    # each query is a noisy copy of its own corpus entry -> perfect retrieval
    gen = torch.Generator().manual_seed(4)
    corpus = torch.randn(50, 16, generator=gen)
    queries = corpus[:20] + 0.01 * torch.randn(20, 16, generator=gen)
    run = search_to_run(*exact_search(queries, corpus, 10, corpus_chunk_size=7), [f"q{i}" for i in range(20)],
                        [f"d{i}" for i in range(50)])
    qrels = {f"q{i}": {f"d{i}": 1} for i in range(20)}
    metrics = retrieval_metrics(run, qrels, (1, 10))
    assert metrics["test/ndcg@10"] == pytest.approx(1.0) and metrics["test/mrr@1"] == pytest.approx(1.0)
    assert metrics["test/precision@10"] == pytest.approx(0.1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_queries_with_cpu_corpus():
    gen = torch.Generator().manual_seed(5)
    queries, corpus = torch.randn(30, 16, generator=gen), torch.randn(300, 16, generator=gen)
    scores, indices = exact_search(queries.cuda(), corpus, 8, query_chunk_size=16, corpus_chunk_size=64)
    assert scores.device.type == indices.device.type == "cuda"
    _assert_valid_topk(scores.cpu(), indices.cpu(), _full_scores(queries, corpus, "cos"), k=8, atol=1e-4)

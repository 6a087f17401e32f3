"""embedlab.evaluation.search: chunked exact top-k equals a full-matrix top-k, within bounded memory."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from embedlab.evaluation.metrics import retrieval_metrics
from embedlab.evaluation.search import exact_search, faiss_search, search_to_run


def _full_scores(queries: torch.Tensor, corpus: torch.Tensor, score_function: str) -> torch.Tensor:
    if score_function == "cos":
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


@pytest.mark.parametrize("score_function", ["cos", "dot"])
@pytest.mark.parametrize(
    ("top_k", "query_chunk_size", "corpus_chunk_size"),
    [(10, 8, 50), (30, 7, 13), (5, 1000, 1000), (1, 3, 1)],  # chunks not dividing Q=37/N=211; k > chunk
)
def test_exact_search_matches_full_topk(score_function, top_k, query_chunk_size, corpus_chunk_size):
    gen = torch.Generator().manual_seed(0)
    queries = torch.randn(37, 16, generator=gen, dtype=torch.float64)
    corpus = torch.randn(211, 16, generator=gen, dtype=torch.float64) * 3  # non-unit norms: cos != dot
    scores, indices = exact_search(
        queries, corpus, top_k, score_function, query_chunk_size=query_chunk_size, corpus_chunk_size=corpus_chunk_size
    )
    reference = torch.topk(_full_scores(queries, corpus, score_function), top_k, dim=1)
    # float64 random data has no near-ties, so the order is unique and must match exactly
    assert torch.equal(indices, reference.indices)
    torch.testing.assert_close(scores, reference.values, atol=1e-12, rtol=0)


def test_top_k_larger_than_corpus():
    gen = torch.Generator().manual_seed(1)
    queries, corpus = torch.randn(5, 8, generator=gen), torch.randn(7, 8, generator=gen)
    scores, indices = exact_search(queries, corpus, top_k=20, query_chunk_size=2, corpus_chunk_size=3)
    _assert_valid_topk(scores, indices, _full_scores(queries, corpus, "cos"), k=7, atol=1e-6)
    assert all(sorted(row) == list(range(7)) for row in indices.tolist())


def test_unknown_score_function_message():
    x = torch.randn(2, 4)
    with pytest.raises(ValueError, match=re.escape("score_function must be one of 'cos', 'dot', got 'l2'")):
        exact_search(x, x, 1, score_function="l2")


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
    """Every score block the search creates is at most query_chunk_size x (corpus_chunk_size + k).

    torch.matmul (the score blocks) and torch.topk (chunk and merge selections) are wrapped to record the
    shapes they see; the call count proves the wrappers saw every block of the 3 x 20 chunk grid.
    """
    gen = torch.Generator().manual_seed(2)
    num_queries, num_docs, k = 150, 20_000, 10
    queries, corpus = torch.randn(num_queries, 64, generator=gen), torch.randn(num_docs, 64, generator=gen)
    matmul_shapes, topk_shapes = [], []
    real_matmul, real_topk = torch.matmul, torch.topk

    def matmul(a, b, *args, **kwargs):
        out = real_matmul(a, b, *args, **kwargs)
        matmul_shapes.append(tuple(out.shape))
        return out

    def topk(x, *args, **kwargs):
        topk_shapes.append(tuple(x.shape))
        return real_topk(x, *args, **kwargs)

    monkeypatch.setattr(torch, "matmul", matmul)
    monkeypatch.setattr(torch, "topk", topk)
    scores, indices = exact_search(queries, corpus, k, query_chunk_size=64, corpus_chunk_size=1000)
    monkeypatch.undo()

    assert len(matmul_shapes) == 3 * 20  # ceil(150 / 64) query chunks x 20 corpus chunks
    assert max(rows * cols for rows, cols in matmul_shapes) <= 64 * 1000
    assert max(rows * cols for rows, cols in topk_shapes) <= 64 * (1000 + k)
    assert max(rows for rows, _ in matmul_shapes + topk_shapes) <= 64
    _assert_valid_topk(scores, indices, _full_scores(queries, corpus, "cos"), k, atol=1e-5)


@pytest.mark.parametrize("score_function", ["cos", "dot"])
def test_faiss_search_agrees_with_exact_search(score_function):
    pytest.importorskip("faiss")
    gen = torch.Generator().manual_seed(3)
    queries, corpus = torch.randn(45, 32, generator=gen), torch.randn(503, 32, generator=gen) * 2
    exact = exact_search(queries, corpus, 12, score_function, query_chunk_size=16, corpus_chunk_size=100)
    via_faiss = faiss_search(queries, corpus, 12, score_function, query_chunk_size=16, corpus_chunk_size=100)
    full = _full_scores(queries, corpus, score_function)
    _assert_valid_topk(*via_faiss, full, k=12, atol=1e-4)
    torch.testing.assert_close(via_faiss[0], exact[0], atol=1e-4, rtol=0)
    assert (via_faiss[1] == exact[1]).float().mean() > 0.99  # differ only at float32 near-ties, if anywhere
    scores, indices = faiss_search(queries, corpus[:5], 12)  # k > N
    assert scores.shape == indices.shape == (45, 5) and indices.min() >= 0


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

"""Exact (brute-force) top-k nearest-neighbour search over embeddings with bounded memory.

A full query x corpus score matrix does not fit for real corpora (e.g. 10k queries x 8.8M MS MARCO passages
= 350 GB in float32), so :func:`exact_search` walks query chunks x corpus chunks and keeps a running top-k per
query. Per query chunk it holds one ``(query_chunk_size, corpus_chunk_size)`` score block plus the running
``(query_chunk_size, k)`` best scores/indices, and the output is ``(Q, k)``: peak extra memory is
``O(query_chunk_size * corpus_chunk_size + Q * k)``. The result is exact: chunking changes which scores are
compared when, never which scores exist.

Score functions: ``"cos"`` (cosine similarity: both sides L2-normalised, chunk by chunk, so no normalised copy
of the corpus is made) and ``"dot"`` (raw inner product, for models trained with a dot-product loss).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

SCORE_FUNCTIONS = ("cos", "dot")


def check_search_args(top_k: int, query_chunk_size: int, corpus_chunk_size: int) -> None:
    """The checks every chunked top-k search shares (float, int8, Hamming)."""
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if query_chunk_size < 1 or corpus_chunk_size < 1:
        raise ValueError(
            f"chunk sizes must be >= 1, got query_chunk_size={query_chunk_size}, "
            f"corpus_chunk_size={corpus_chunk_size}"
        )


def _check_inputs(query_embeddings: torch.Tensor, corpus_embeddings: torch.Tensor, top_k: int,
                  score_function: str, query_chunk_size: int, corpus_chunk_size: int) -> None:
    if score_function not in SCORE_FUNCTIONS:
        raise ValueError(
            f"score_function must be one of {', '.join(map(repr, SCORE_FUNCTIONS))}, got {score_function!r}"
        )
    if query_embeddings.dim() != 2 or corpus_embeddings.dim() != 2:
        raise ValueError(
            "query_embeddings and corpus_embeddings must be 2-D (num_texts, dim), got shapes "
            f"{tuple(query_embeddings.shape)} and {tuple(corpus_embeddings.shape)}"
        )
    if query_embeddings.shape[1] != corpus_embeddings.shape[1]:
        raise ValueError(
            f"embedding dims differ: queries {query_embeddings.shape[1]}, corpus {corpus_embeddings.shape[1]}"
        )
    check_search_args(top_k, query_chunk_size, corpus_chunk_size)


def prepare_embeddings(x: torch.Tensor, score_function: str) -> torch.Tensor:
    """``x`` ready for a plain inner product under ``score_function`` (L2-normalised rows for ``"cos"``)."""
    return F.normalize(x, p=2, dim=-1) if score_function == "cos" else x


@torch.no_grad()
def exact_search(
    query_embeddings: torch.Tensor,
    corpus_embeddings: torch.Tensor,
    top_k: int,
    score_function: str = "cos",
    query_chunk_size: int = 1024,
    corpus_chunk_size: int = 50_000,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k corpus entries for every query, by exact score, without materialising the ``Q x N`` matrix.

    Args:
        query_embeddings: ``(Q, D)``.
        corpus_embeddings: ``(N, D)``; may live on another device than the queries (e.g. a large corpus kept in
            CPU memory while queries are on the GPU): each chunk is moved to the queries' device and dtype.
        top_k: number of results per query; ``k = min(top_k, N)`` are returned.
        score_function: ``"cos"`` or ``"dot"``.
        query_chunk_size: queries scored at once.
        corpus_chunk_size: corpus rows scored at once.

    Returns:
        ``(scores, indices)``, both ``(Q, k)`` on the queries' device, each row sorted by descending score;
        ``indices`` are int64 row numbers into ``corpus_embeddings``. The order of exactly tied scores is
        unspecified (``torch.topk``).

    Raises:
        ValueError: unknown ``score_function``, bad shapes, ``top_k < 1`` or a chunk size ``< 1``.
    """
    _check_inputs(query_embeddings, corpus_embeddings, top_k, score_function, query_chunk_size, corpus_chunk_size)
    device, dtype = query_embeddings.device, query_embeddings.dtype
    num_queries, num_docs = query_embeddings.shape[0], corpus_embeddings.shape[0]
    k = min(top_k, num_docs)
    out_scores = torch.empty((num_queries, k), dtype=dtype, device=device)
    out_indices = torch.empty((num_queries, k), dtype=torch.long, device=device)
    if k == 0 or num_queries == 0:
        return out_scores, out_indices

    for q_start in range(0, num_queries, query_chunk_size):
        q_end = min(q_start + query_chunk_size, num_queries)
        queries = prepare_embeddings(query_embeddings[q_start:q_end], score_function)  # (qc, D)
        best_scores: torch.Tensor | None = None  # running top-k of this query chunk: (qc, <=k)
        best_indices: torch.Tensor | None = None
        for c_start in range(0, num_docs, corpus_chunk_size):
            c_end = min(c_start + corpus_chunk_size, num_docs)
            docs = corpus_embeddings[c_start:c_end].to(device=device, dtype=dtype)
            docs = prepare_embeddings(docs, score_function)  # (cc, D)
            block = torch.matmul(queries, docs.T)  # (qc, cc): the only large temporary
            chunk_scores, chunk_indices = torch.topk(block, min(k, c_end - c_start), dim=1)  # (qc, <=k)
            del block
            chunk_indices += c_start
            if best_scores is None:
                best_scores, best_indices = chunk_scores, chunk_indices
            else:
                # merge: top-k of the union of the running best and this chunk's best, (qc, <=2k) -> (qc, k)
                merged_scores = torch.cat([best_scores, chunk_scores], dim=1)
                merged_indices = torch.cat([best_indices, chunk_indices], dim=1)
                best_scores, position = torch.topk(merged_scores, min(k, merged_scores.shape[1]), dim=1)
                best_indices = torch.gather(merged_indices, 1, position)
        # topk returns sorted rows, and after all chunks each row holds exactly k entries
        out_scores[q_start:q_end] = best_scores
        out_indices[q_start:q_end] = best_indices
    return out_scores, out_indices


def search_to_run(
    scores: torch.Tensor,
    indices: torch.Tensor,
    query_ids: Sequence[str],
    corpus_ids: Sequence[str],
) -> dict[str, dict[str, float]]:
    """Convert ``(scores, indices)`` from a search into a pytrec_eval-style run ``{query_id: {doc_id: score}}``.

    Row ``i`` belongs to ``query_ids[i]``; index ``j`` maps to ``corpus_ids[j]``. Negative indices (a "no result"
    marker some ANN libraries use) are skipped. Scores become Python floats (exact for every float dtype), so
    ties survive for :mod:`embedlab.evaluation.metrics`' trec_eval tie-breaking.

    Raises:
        ValueError: shapes of ``scores`` and ``indices`` differ, or ``len(query_ids)`` is not their row count.
    """
    if scores.shape != indices.shape or scores.dim() != 2:
        raise ValueError(
            f"scores and indices must be 2-D with one shape, got {tuple(scores.shape)} and {tuple(indices.shape)}"
        )
    if len(query_ids) != scores.shape[0]:
        raise ValueError(f"{len(query_ids)} query ids for {scores.shape[0]} rows of results")
    score_rows = scores.detach().cpu().tolist()
    index_rows = indices.detach().cpu().tolist()
    run: dict[str, dict[str, float]] = {}
    for qid, row_scores, row_indices in zip(query_ids, score_rows, index_rows):
        run[qid] = {corpus_ids[j]: s for s, j in zip(row_scores, row_indices) if j >= 0}
    return run


def faiss_search(
    query_embeddings: torch.Tensor,
    corpus_embeddings: torch.Tensor,
    top_k: int,
    score_function: str = "cos",
    query_chunk_size: int = 1024,
    corpus_chunk_size: int = 50_000,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as :func:`exact_search`, computed by a FAISS ``IndexFlatIP`` (exact inner product, CPU).

    Useful for very large corpora: FAISS's blocked BLAS search is fast on many CPU cores. The index holds a
    float32 copy of the (normalised, for ``"cos"``) corpus, added ``corpus_chunk_size`` rows at a time so no second
    full-size temporary exists; queries are searched ``query_chunk_size`` at a time. Scores are float32 and the
    results come back on the queries' device. Requires ``faiss-cpu`` (``pip install embedlab[faiss]``).
    """
    _check_inputs(query_embeddings, corpus_embeddings, top_k, score_function, query_chunk_size, corpus_chunk_size)
    try:
        import faiss
    except ImportError as err:  # optional dependency
        raise ImportError("faiss_search needs faiss: pip install faiss-cpu (or embedlab[faiss])") from err

    def to_numpy(x: torch.Tensor):
        return prepare_embeddings(x.detach().to(device="cpu", dtype=torch.float32), score_function).contiguous().numpy()

    device = query_embeddings.device
    num_queries, num_docs = query_embeddings.shape[0], corpus_embeddings.shape[0]
    k = min(top_k, num_docs)
    out_scores = torch.empty((num_queries, k), dtype=torch.float32)
    out_indices = torch.empty((num_queries, k), dtype=torch.long)
    if k > 0 and num_queries > 0:
        index = faiss.IndexFlatIP(query_embeddings.shape[1])
        for c_start in range(0, num_docs, corpus_chunk_size):
            index.add(to_numpy(corpus_embeddings[c_start : c_start + corpus_chunk_size]))
        for q_start in range(0, num_queries, query_chunk_size):
            q_end = min(q_start + query_chunk_size, num_queries)
            distances, labels = index.search(to_numpy(query_embeddings[q_start:q_end]), k)  # (qc, k) each
            out_scores[q_start:q_end] = torch.from_numpy(distances)
            out_indices[q_start:q_end] = torch.from_numpy(labels)
    return out_scores.to(device), out_indices.to(device)

"""Top-k nearest-neighbour search over embeddings with bounded memory: the one chunked top-k engine.

A full query x corpus score matrix does not fit for real corpora (10k queries x 8.8M MS MARCO passages would be
350 GB in float32), so every search in embedlab walks ``query_chunk_size x corpus_chunk_size`` blocks and keeps a
running top-k per query (:func:`chunked_topk`). Per query chunk it holds one score block plus the running
``(query_chunk_size, k)`` best, and the output is ``(Q, k)``. The float search here (:func:`exact_search`), and the
searches over quantized corpora (:mod:`embedlab.evaluation.quantized_search`: int8, Hamming, binary + rescoring)
differ only in how a block is scored; :func:`faiss_search` lets FAISS score and select each corpus chunk and merges
the chunks with the same :func:`merge_topk`.

One tie rule everywhere: rows come back sorted by score (descending; Hamming distance ascending), and equal scores
are ordered by the lower corpus index, exactly as a stable full-matrix sort would. Chunking changes which scores
are compared when, never which scores exist or which of them are kept. Inputs must be finite (a NaN score has no
place in that order).

Memory per query chunk: the score block (``q * c`` elements of the block's dtype) and, only when a tie straddles
the k-th score, a few ``q * c`` boolean / int32 masks; Hamming blocks are ranked through one ``q * c`` integer key.
The corpus may live on another device than the queries (e.g. a large corpus in CPU memory, queries on the GPU):
each chunk is moved to the queries' device on its own.

Similarities: ``"cos"`` (both sides L2-normalised chunk by chunk, so no normalised copy of the corpus is made) and
``"dot"`` (raw inner product, for models trained with a dot-product loss).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from embedlab.errors import ConfigError

SIMILARITIES = ("cos", "dot")

#: Default chunk sizes of every search (and of the evaluator): one float32 score block is 1024 x 50_000 x 4 bytes.
DEFAULT_QUERY_CHUNK_SIZE = 1024
DEFAULT_CORPUS_CHUNK_SIZE = 50_000
#: Rows processed at once by the elementwise passes over a corpus (quantize, pack, PCA statistics).
ROW_CHUNK_SIZE = 65_536

#: ``score(start, end)``: the ``(q, end - start)`` scores of one query chunk against corpus rows ``start:end``.
BlockScorer = Callable[[int, int], torch.Tensor]


# ----------------------------------------------------------------------------------------------------------------
# input checks shared by every search and every pass over an embedding matrix
# ----------------------------------------------------------------------------------------------------------------
def check_2d(name: str, x: torch.Tensor) -> None:
    """Raise ``ValueError`` unless ``x`` is a 2-D tensor ``(N, D)``."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a 2-D tensor (N, D), got {shape}")


def check_search_args(top_k: int, query_chunk_size: int, corpus_chunk_size: int) -> None:
    """The checks every chunked top-k search shares (float, int8, Hamming, FAISS)."""
    if top_k < 1:
        raise ConfigError(f"top_k must be >= 1, got {top_k}")
    if query_chunk_size < 1 or corpus_chunk_size < 1:
        raise ConfigError(
            f"chunk sizes must be >= 1, got query_chunk_size={query_chunk_size}, "
            f"corpus_chunk_size={corpus_chunk_size}"
        )


def check_similarity(similarity: str) -> None:
    if similarity not in SIMILARITIES:
        raise ConfigError(f"similarity must be one of {', '.join(map(repr, SIMILARITIES))}, got {similarity!r}")


def _check_inputs(query_embeddings: torch.Tensor, corpus_embeddings: torch.Tensor, top_k: int,
                  similarity: str, query_chunk_size: int, corpus_chunk_size: int) -> None:
    check_similarity(similarity)
    if query_embeddings.dim() != 2 or corpus_embeddings.dim() != 2:
        raise ConfigError(
            "query_embeddings and corpus_embeddings must be 2-D (num_texts, dim), got shapes "
            f"{tuple(query_embeddings.shape)} and {tuple(corpus_embeddings.shape)}"
        )
    if query_embeddings.shape[1] != corpus_embeddings.shape[1]:
        raise ConfigError(
            f"embedding dims differ: queries {query_embeddings.shape[1]}, corpus {corpus_embeddings.shape[1]}"
        )
    check_search_args(top_k, query_chunk_size, corpus_chunk_size)


def prepare_embeddings(x: torch.Tensor, similarity: str) -> torch.Tensor:
    """``x`` ready for a plain inner product under ``similarity`` (L2-normalised rows for ``"cos"``)."""
    return F.normalize(x, p=2, dim=-1) if similarity == "cos" else x


# ----------------------------------------------------------------------------------------------------------------
# the chunked, tie-exact top-k engine
# ----------------------------------------------------------------------------------------------------------------
def sort_by_score_then_index(
    values: torch.Tensor, indices: torch.Tensor, descending: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort each row of ``(q, m)`` (value, index) pairs by value (descending or ascending), ties by lower index."""
    indices, perm = indices.sort(dim=1)
    values = values.gather(1, perm)
    order = values.sort(dim=1, descending=descending, stable=True).indices  # stable keeps index order on ties
    return values.gather(1, order), indices.gather(1, order)


def _block_topk(
    block: torch.Tensor, k: int, largest: bool, integral: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of each row of a ``(q, c)`` score block, ties at the k-th value resolved to the lowest columns.

    ``torch.topk`` picks arbitrarily among equal values at the cut, so:

    * ``integral`` blocks (Hamming distances: small non-negative whole numbers, almost always tied at the cut) are
      ranked by the unique integer key ``value * c -/+ column`` in one ``topk``; int32 while it cannot overflow,
      else int64;
    * float blocks take ``topk`` as is when no tie straddles the cut (the usual case: the ``(k+1)``-th best value
      differs from the k-th); otherwise the set is rebuilt as "strictly better than the k-th value" + "the first
      ``k - #better`` equal ones".

    Returns ``(values, columns)`` ``(q, k)`` sorted by value, ties by column.
    """
    num_rows, num_cols = block.shape
    if integral:
        bound = (int(block.max().item()) + 1) * num_cols if block.numel() else 0
        key_dtype = torch.int32 if bound < 2**31 else torch.int64
        columns = torch.arange(num_cols, dtype=key_dtype, device=block.device)
        key = block.to(key_dtype).mul_(num_cols)  # (q, c)
        key = key.sub_(columns) if largest else key.add_(columns)
        columns = key.topk(k, dim=1, largest=largest, sorted=True).indices  # (q, k) sorted by (value, column)
        return block.gather(1, columns), columns
    # one more than k: a tie straddles the cut exactly when the (k+1)-th best value equals the k-th
    values, columns = block.topk(min(k + 1, num_cols), dim=1, largest=largest, sorted=True)  # (q, k+1)
    if values.shape[1] == k or not bool((values[:, k - 1] == values[:, k]).any()):  # the whole block, or no tie
        return sort_by_score_then_index(values[:, :k], columns[:, :k], descending=largest)
    kth = values[:, k - 1 : k]  # (q, 1)
    ties = block == kth  # (q, c)
    take = block > kth if largest else block < kth  # (q, c) strictly better than the k-th value
    need = k - take.count_nonzero(dim=1).unsqueeze(1).to(torch.int32)  # (q, 1) >= 1
    ties &= ties.cumsum(dim=1, dtype=torch.int32) <= need  # first `need` ties of each row
    take |= ties  # exactly k True per row
    columns = take.nonzero()[:, 1].view(num_rows, k)  # (q, k), row-major so ascending per row
    values = block.gather(1, columns)
    order = values.sort(dim=1, descending=largest, stable=True).indices
    return values.gather(1, order), columns.gather(1, order)


def merge_topk(
    best: tuple[torch.Tensor, torch.Tensor], new: tuple[torch.Tensor, torch.Tensor], k: int, largest: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of the union of two ``(q, <=k)`` (values, indices) results, each sorted by value then index.

    Every index in ``best`` must be lower than every index in ``new`` (corpus chunks are walked in order), so a
    stable sort of the concatenation orders ties by index: ``(q, <=2k) -> (q, min(k, total))``.
    """
    values = torch.cat([best[0], new[0]], dim=1)
    indices = torch.cat([best[1], new[1]], dim=1)
    order = values.sort(dim=1, descending=largest, stable=True).indices[:, :k]
    return values.gather(1, order), indices.gather(1, order)


def chunked_topk(
    queries: torch.Tensor,
    num_docs: int,
    make_scorer: Callable[[torch.Tensor], BlockScorer],
    top_k: int,
    largest: bool = True,
    query_chunk_size: int = DEFAULT_QUERY_CHUNK_SIZE,
    corpus_chunk_size: int = DEFAULT_CORPUS_CHUNK_SIZE,
    integral: bool = False,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k over ``num_docs`` corpus rows without a ``(Q, N)`` matrix.

    Args:
        queries: ``(Q, ...)``, cut into chunks of ``query_chunk_size`` rows.
        num_docs: corpus size ``N``.
        make_scorer: ``make_scorer(query_chunk)`` returns ``score(start, end) -> (q, end - start)`` scores of that
            chunk against corpus rows ``start:end`` (per-query-chunk work, e.g. normalising the queries or building
            the Hamming table, happens once).
        largest: ``True`` for similarities, ``False`` for distances.
        integral: blocks hold whole numbers (Hamming distances); see :func:`_block_topk`.
        dtype: dtype of the returned values (the blocks' dtype).

    Returns:
        ``(values, indices)``, both ``(Q, min(top_k, num_docs))`` on the queries' device, best first, ties by lower
        index; ``indices`` are int64 corpus row numbers.
    """
    num_queries = queries.shape[0]
    k = min(top_k, num_docs)
    out_values = torch.empty((num_queries, k), dtype=dtype, device=queries.device)
    out_indices = torch.empty((num_queries, k), dtype=torch.long, device=queries.device)
    if k == 0 or num_queries == 0:
        return out_values, out_indices
    for q_start in range(0, num_queries, query_chunk_size):
        q_end = min(q_start + query_chunk_size, num_queries)
        score = make_scorer(queries[q_start:q_end])
        best: tuple[torch.Tensor, torch.Tensor] | None = None  # running (values, indices), (q, <=k)
        for c_start in range(0, num_docs, corpus_chunk_size):
            c_end = min(c_start + corpus_chunk_size, num_docs)
            values, columns = _block_topk(score(c_start, c_end), min(k, c_end - c_start), largest, integral)
            new = (values, columns + c_start)
            best = new if best is None else merge_topk(best, new, k, largest)
        out_values[q_start:q_end] = best[0]
        out_indices[q_start:q_end] = best[1]
    return out_values, out_indices


# ----------------------------------------------------------------------------------------------------------------
# float searches
# ----------------------------------------------------------------------------------------------------------------
def dot_block(queries: torch.Tensor, docs: torch.Tensor) -> torch.Tensor:
    """Dot-product block ``(q, D) x (c, D) -> (q, c)``; the one matmul site of the float and int8 searches."""
    return queries @ docs.t()


@torch.no_grad()
def exact_search(
    query_embeddings: torch.Tensor,
    corpus_embeddings: torch.Tensor,
    top_k: int,
    similarity: str = "cos",
    query_chunk_size: int = DEFAULT_QUERY_CHUNK_SIZE,
    corpus_chunk_size: int = DEFAULT_CORPUS_CHUNK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k corpus entries for every query, by exact score, without materialising the ``Q x N`` matrix.

    Args:
        query_embeddings: ``(Q, D)``.
        corpus_embeddings: ``(N, D)``; may live on another device or dtype than the queries (e.g. a float16 corpus
            in CPU memory): each chunk is moved to the queries' device and dtype before its matmul.
        top_k: number of results per query; ``k = min(top_k, N)`` are returned.
        similarity: ``"cos"`` or ``"dot"``.
        query_chunk_size: queries scored at once.
        corpus_chunk_size: corpus rows scored at once.

    Returns:
        ``(scores, indices)``, both ``(Q, k)`` on the queries' device, scores in the queries' dtype, each row sorted
        by descending score, ties by lower corpus index; ``indices`` are int64 row numbers into
        ``corpus_embeddings``.

    Raises:
        ValueError: unknown ``similarity``, bad shapes, ``top_k < 1`` or a chunk size ``< 1``.
    """
    _check_inputs(query_embeddings, corpus_embeddings, top_k, similarity, query_chunk_size, corpus_chunk_size)
    device, dtype = query_embeddings.device, query_embeddings.dtype

    def make_scorer(query_chunk: torch.Tensor) -> BlockScorer:
        queries = prepare_embeddings(query_chunk, similarity)  # (q, D)
        return lambda start, end: dot_block(
            queries, prepare_embeddings(corpus_embeddings[start:end].to(device=device, dtype=dtype), similarity)
        )

    return chunked_topk(
        query_embeddings.detach(), corpus_embeddings.shape[0], make_scorer, top_k, True, query_chunk_size,
        corpus_chunk_size, dtype=dtype,
    )


def require_faiss():
    """The ``faiss`` module, or an ImportError that says how to install it."""
    try:
        import faiss
    except ImportError as err:  # optional dependency
        raise ConfigError("search=faiss needs faiss: pip install faiss-cpu (or embedlab[faiss])") from err
    return faiss


@torch.no_grad()
def faiss_search(
    query_embeddings: torch.Tensor,
    corpus_embeddings: torch.Tensor,
    top_k: int,
    similarity: str = "cos",
    query_chunk_size: int = DEFAULT_QUERY_CHUNK_SIZE,
    corpus_chunk_size: int = DEFAULT_CORPUS_CHUNK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as :func:`exact_search`, each corpus chunk searched by a FAISS flat inner-product index (CPU).

    What it does: for each ``corpus_chunk_size`` rows of the corpus (walked in order), a ``faiss.IndexFlatIP`` is
    filled with a float32 copy of those rows (L2-normalised for ``"cos"``) and searched by the queries,
    ``query_chunk_size`` at a time; FAISS's exact blocked search returns each chunk's top-k, which
    :func:`merge_topk` folds into the running top-k exactly as :func:`chunked_topk` does. Besides the inputs, memory
    holds one float32 corpus chunk, FAISS's internal blocks and the ``(Q, k)`` results, never a copy of the whole
    corpus; FAISS's multi-threaded kernels do the scoring on CPU.

    Results equal :func:`exact_search`'s except among scores tied at the k-th place inside a chunk (FAISS picks
    among them in its own order) and for float32 rounding (FAISS computes in float32 whatever the input dtype).
    Scores are float32, on the queries' device. Requires ``faiss-cpu`` (``pip install embedlab[faiss]``).
    """
    _check_inputs(query_embeddings, corpus_embeddings, top_k, similarity, query_chunk_size, corpus_chunk_size)
    faiss = require_faiss()

    def to_numpy(x: torch.Tensor):
        return prepare_embeddings(x.detach().to(device="cpu", dtype=torch.float32), similarity).contiguous().numpy()

    device = query_embeddings.device
    num_queries, num_docs = query_embeddings.shape[0], corpus_embeddings.shape[0]
    k = min(top_k, num_docs)
    if k == 0 or num_queries == 0:
        return (torch.empty((num_queries, k), dtype=torch.float32, device=device),
                torch.empty((num_queries, k), dtype=torch.long, device=device))
    queries = to_numpy(query_embeddings)  # (Q, D) float32, normalised once
    index = faiss.IndexFlatIP(query_embeddings.shape[1])
    best: tuple[torch.Tensor, torch.Tensor] | None = None  # running (scores, indices), (Q, <=k) on CPU
    for c_start in range(0, num_docs, corpus_chunk_size):
        c_end = min(c_start + corpus_chunk_size, num_docs)
        chunk_k = min(k, c_end - c_start)
        index.reset()
        index.add(to_numpy(corpus_embeddings[c_start:c_end]))
        scores = torch.empty((num_queries, chunk_k), dtype=torch.float32)
        columns = torch.empty((num_queries, chunk_k), dtype=torch.long)
        for q_start in range(0, num_queries, query_chunk_size):
            q_end = min(q_start + query_chunk_size, num_queries)
            distances, labels = index.search(queries[q_start:q_end], chunk_k)  # (qc, chunk_k)
            scores[q_start:q_end] = torch.from_numpy(distances)
            columns[q_start:q_end] = torch.from_numpy(labels)
        new = sort_by_score_then_index(scores, columns + c_start)
        best = new if best is None else merge_topk(best, new, k)
    return best[0].to(device), best[1].to(device)


#: ``eval.search`` values -> search function (same signature as :func:`exact_search`).
SEARCHES: dict[str, Callable[..., tuple[torch.Tensor, torch.Tensor]]] = {"exact": exact_search, "faiss": faiss_search}


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

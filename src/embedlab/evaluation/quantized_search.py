"""Exact top-k search over quantized corpora: int8/uint8 codes, packed sign bits, and binary search with rescoring.

Each search scores one ``query_chunk_size x corpus_chunk_size`` block at a time and hands it to the one chunked
top-k engine, :func:`embedlab.evaluation.search.chunked_topk`, so results follow its tie rule (scores descending,
distances ascending, ties by lower corpus index) and its memory bound; on top of the engine's block, a search
holds one float32 corpus chunk (``4 * corpus_chunk_size * D`` bytes, dequantized) or the Hamming lookup table.
The codes come from :mod:`embedlab.evaluation.quantize`.
"""

from __future__ import annotations

import torch

from embedlab.evaluation.quantize import ScalarQuantizer, binary_quantize, num_packed_bytes, unpack_signs
from embedlab.evaluation.search import (
    DEFAULT_CORPUS_CHUNK_SIZE,
    DEFAULT_QUERY_CHUNK_SIZE,
    BlockScorer,
    check_2d,
    check_search_args,
    chunked_topk,
    dot_block,
    sort_by_score_then_index,
)

#: Upper bound on elements of the (q, n_candidates, D) candidate tensor built while rescoring (64 MB float32).
_RESCORE_BLOCK_ELEMENTS = 1 << 24

# popcount of every byte value; Hamming distance = sum over bytes of _POPCOUNT[a ^ b].
_POPCOUNT = torch.tensor([bin(v).count("1") for v in range(256)], dtype=torch.uint8)


# ----------------------------------------------------------------------------------------------------------------
# Hamming search over packed bits
# ----------------------------------------------------------------------------------------------------------------
def _hamming_table(query_bits: torch.Tensor) -> torch.Tensor:
    """``(q, B)`` query bytes -> ``(B * 256, q)`` float32 table, row ``b * 256 + v`` = ``popcount(query_byte_b XOR v)``.

    This is the 256-entry popcount lookup on XOR'd bytes, evaluated once per query chunk against all 256 possible
    corpus byte values (``B * 256 * q`` entries), so a corpus chunk is scored by summing ``B`` table rows per
    corpus vector instead of XOR + lookup over a ``(q, c, B)`` cube.
    """
    values = torch.arange(256, dtype=torch.uint8, device=query_bits.device)
    xor = query_bits.t().unsqueeze(1) ^ values.view(1, 256, 1)  # (B, 256, q)
    table = _POPCOUNT.to(query_bits.device)[xor.long()].float()  # (B, 256, q)
    return table.reshape(-1, query_bits.shape[0]).contiguous()


def _hamming_block(table: torch.Tensor, corpus_bits: torch.Tensor) -> torch.Tensor:
    """Hamming distances ``(q, c)`` (float32, exact integers) from a query chunk's table and corpus bytes ``(c, B)``.

    ``embedding_bag(mode="sum")`` adds, for each corpus vector, the ``B`` table rows selected by its bytes (offset
    by ``256 * b``) in one fused gather-sum, with no per-byte temporaries.
    """
    offsets = torch.arange(corpus_bits.shape[1], device=corpus_bits.device) * 256  # (B,)
    rows = corpus_bits.long() + offsets  # (c, B) row of each byte in the table
    return torch.nn.functional.embedding_bag(rows, table, mode="sum").t()  # (c, q) -> (q, c) view


def hamming_search(
    query_bits: torch.Tensor,
    corpus_bits: torch.Tensor,
    top_k: int,
    query_chunk_size: int = DEFAULT_QUERY_CHUNK_SIZE,
    corpus_chunk_size: int = DEFAULT_CORPUS_CHUNK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact Hamming top-k over packed binary codes (from :func:`~embedlab.evaluation.quantize.binary_quantize`).

    Args:
        query_bits: ``(Q, B)`` uint8.
        corpus_bits: ``(N, B)`` uint8; may live on another device than the queries (chunks are moved).
        top_k: neighbours per query (``min(top_k, N)`` are returned).

    Returns:
        ``(distances, indices)``, both ``(Q, min(top_k, N))`` int64, distance ascending, ties by lower index.
    """
    check_2d("query_bits", query_bits)
    check_2d("corpus_bits", corpus_bits)
    check_search_args(top_k, query_chunk_size, corpus_chunk_size)
    if query_bits.dtype != torch.uint8 or corpus_bits.dtype != torch.uint8:
        raise ValueError(f"packed bits must be uint8, got {query_bits.dtype} and {corpus_bits.dtype}")
    if query_bits.shape[1] != corpus_bits.shape[1]:
        raise ValueError(f"query and corpus codes differ in bytes: {query_bits.shape[1]} vs {corpus_bits.shape[1]}")
    device = query_bits.device

    def make_scorer(query_chunk: torch.Tensor) -> BlockScorer:
        table = _hamming_table(query_chunk)
        return lambda start, end: _hamming_block(table, corpus_bits[start:end].to(device))

    dist, idx = chunked_topk(
        query_bits, corpus_bits.shape[0], make_scorer, top_k, False, query_chunk_size, corpus_chunk_size,
        integral=True,
    )
    return dist.long(), idx


# ----------------------------------------------------------------------------------------------------------------
# int8 / uint8 search
# ----------------------------------------------------------------------------------------------------------------
def scalar_search(
    query_float: torch.Tensor,
    quantizer: ScalarQuantizer,
    corpus_q: torch.Tensor,
    top_k: int,
    query_chunk_size: int = DEFAULT_QUERY_CHUNK_SIZE,
    corpus_chunk_size: int = DEFAULT_CORPUS_CHUNK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k of float32 queries against an int8/uint8 corpus, scored as ``query . dequantize(corpus)``.

    Only the corpus is quantized (asymmetric scoring, the usual int8 setup): the query keeps full precision and
    each ``corpus_chunk_size`` chunk is dequantized right before its matmul, so the float corpus is never rebuilt.

    Returns:
        ``(scores, indices)``, ``(Q, min(top_k, N))`` float32 / int64, scores descending, ties by lower index.
    """
    check_2d("query_float", query_float)
    check_2d("corpus_q", corpus_q)
    check_search_args(top_k, query_chunk_size, corpus_chunk_size)
    if query_float.shape[1] != quantizer.dim or corpus_q.shape[1] != quantizer.dim:
        raise ValueError(
            f"widths differ: query {query_float.shape[1]}, corpus {corpus_q.shape[1]}, quantizer {quantizer.dim}"
        )
    if corpus_q.dtype != quantizer.dtype:
        raise ValueError(
            f"expected {quantizer.dtype} corpus codes for a {quantizer.precision} quantizer, got {corpus_q.dtype}"
        )

    def make_scorer(query_chunk: torch.Tensor) -> BlockScorer:
        return lambda start, end: dot_block(
            query_chunk, quantizer.dequantize(corpus_q[start:end].to(query_chunk.device))
        )

    return chunked_topk(
        query_float.float(), corpus_q.shape[0], make_scorer, top_k, True, query_chunk_size, corpus_chunk_size
    )


# ----------------------------------------------------------------------------------------------------------------
# binary search with rescoring
# ----------------------------------------------------------------------------------------------------------------
def binary_rescore_search(
    query_float: torch.Tensor,
    corpus_bits: torch.Tensor,
    top_k: int,
    rescore_multiplier: int = 4,
    corpus_rescore: torch.Tensor | tuple[ScalarQuantizer, torch.Tensor] | None = None,
    query_chunk_size: int = DEFAULT_QUERY_CHUNK_SIZE,
    corpus_chunk_size: int = DEFAULT_CORPUS_CHUNK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Binary retrieval with float-query rescoring (Shakir et al. 2024; sentence-transformers
    ``semantic_search_usearch(..., corpus_precision="ubinary", rescore=True)``).

    1. Binarize the queries and take the ``top_k * rescore_multiplier`` nearest corpus codes by Hamming distance
       (exact, chunked: :func:`hamming_search`).
    2. Rescore only those candidates with the **float** query, which recovers much of the quality binary loses.
       What is rescored against decides what must be stored besides the ``ceil(D / 8)``-byte index
       (:func:`embedlab.evaluation.storage.rescore_bytes`):

       * ``corpus_rescore=None``: ``query . s`` with ``s`` the candidate's bits unpacked to ``{-1, +1}`` (nothing
         more stored). sentence-transformers unpacks to ``{0, 1}``; ``query . (2b - 1) = 2 query . b - sum(query)``
         is the same ranking per query, the ``+-1`` form just keeps the scale of a sign agreement.
       * ``corpus_rescore=(quantizer, corpus_q)``: ``query . dequantize(corpus_q[candidate])`` (the int8
         corpus kept on disk in the paper's recipe: ``D`` more bytes per document).
       * ``corpus_rescore=<float (N, D) tensor>``: ``query . corpus[candidate]`` (``4 * D`` more bytes).

    Args:
        query_float: ``(Q, D)`` float queries; their sign bits drive step 1.
        corpus_bits: ``(N, ceil(D / 8))`` uint8 from :func:`~embedlab.evaluation.quantize.binary_quantize`.
        top_k: results per query (``min(top_k, N)`` are returned).
        rescore_multiplier: oversampling factor ``>= 1`` of step 1.
        corpus_rescore: see above; row ``i`` must be corpus item ``i``.

    Returns:
        ``(scores, indices)``, ``(Q, min(top_k, N))`` float32 / int64, scores descending, ties by lower index.
    """
    check_2d("query_float", query_float)
    check_2d("corpus_bits", corpus_bits)
    check_search_args(top_k, query_chunk_size, corpus_chunk_size)
    if rescore_multiplier < 1:
        raise ValueError(f"rescore_multiplier must be >= 1, got {rescore_multiplier}")
    width = query_float.shape[1]
    if corpus_bits.shape[1] != num_packed_bytes(width):
        raise ValueError(
            f"corpus_bits has {corpus_bits.shape[1]} bytes per row, queries of width {width} need "
            f"{num_packed_bytes(width)}"
        )
    num_docs = corpus_bits.shape[0]
    device = query_float.device
    query_float = query_float.float()

    if corpus_rescore is None:
        def fetch(ids: torch.Tensor) -> torch.Tensor:
            return unpack_signs(corpus_bits[ids.to(corpus_bits.device)].to(device), width)
    elif isinstance(corpus_rescore, tuple):
        quantizer, corpus_q = corpus_rescore
        if corpus_q.shape != (num_docs, width) or quantizer.dim != width:
            raise ValueError(
                f"rescore corpus must be ({num_docs}, {width}) codes from a width-{width} quantizer, "
                f"got {tuple(corpus_q.shape)} and width {quantizer.dim}"
            )

        def fetch(ids: torch.Tensor) -> torch.Tensor:
            return quantizer.dequantize(corpus_q[ids.to(corpus_q.device)].to(device))
    else:
        if corpus_rescore.shape != (num_docs, width) or not corpus_rescore.is_floating_point():
            raise ValueError(
                f"float rescore corpus must be ({num_docs}, {width}) floating point, "
                f"got {tuple(corpus_rescore.shape)} {corpus_rescore.dtype}"
            )

        def fetch(ids: torch.Tensor) -> torch.Tensor:
            return corpus_rescore[ids.to(corpus_rescore.device)].to(device, torch.float32)

    num_candidates = min(top_k * rescore_multiplier, num_docs)
    _, candidates = hamming_search(
        binary_quantize(query_float), corpus_bits, num_candidates, query_chunk_size, corpus_chunk_size
    )  # (Q, n_cand)
    k = min(top_k, num_docs)
    num_queries = query_float.shape[0]
    scores_out = torch.empty((num_queries, k), dtype=torch.float32, device=device)
    indices_out = torch.empty((num_queries, k), dtype=torch.long, device=device)
    # rows per step so the (rows, n_cand, D) candidate tensor stays under _RESCORE_BLOCK_ELEMENTS
    rows = max(1, min(query_chunk_size, _RESCORE_BLOCK_ELEMENTS // max(1, num_candidates * width)))
    for start in range(0, num_queries, rows):
        cand = candidates[start : start + rows]  # (r, n_cand)
        docs = fetch(cand.reshape(-1)).view(cand.shape[0], num_candidates, width)  # (r, n_cand, D)
        scores = torch.bmm(docs, query_float[start : start + rows].unsqueeze(-1)).squeeze(-1)  # (r, n_cand)
        scores, cand = sort_by_score_then_index(scores, cand, descending=True)
        scores_out[start : start + rows] = scores[:, :k]
        indices_out[start : start + rows] = cand[:, :k]
    return scores_out, indices_out

"""Embedding compression for the evaluation grid: Matryoshka truncation, scalar (int8/uint8) and binary quantization,
binary search with rescoring, and PCA.

The evaluation grid encodes the corpus **once** in float32 and then derives every cell
``dims x precision x PCA`` from that one matrix, so all functions here take float32 ``(N, D)`` torch tensors
(CPU or GPU) and never hold more than a chunk-sized temporary.

What each compression keeps, per vector of width ``D`` (see :func:`bytes_per_vector`):

=================  ==================  ===================================================================
precision          bytes per vector    what is stored
=================  ==================  ===================================================================
``float32``        ``4 * D``           the embedding as encoded
``float16``        ``2 * D``           half precision (2x smaller; retrieval is practically unchanged)
``int8``/``uint8`` ``D``               one byte per dimension on a per-dimension calibrated grid (4x)
``binary``         ``ceil(D / 8)``     one bit per dimension, the sign (32x); searched by Hamming distance
``binary_rescore`` ``ceil(D / 8)``     binary index; the top ``top_k * rescore_multiplier`` hits are
                                       rescored with the float query (no extra index memory)
=================  ==================  ===================================================================

Dimension reduction composes with all of them: :func:`truncate` keeps the first ``dim`` coordinates (only
meaningful for Matryoshka-trained models, Kusupati et al. 2022, "Matryoshka Representation Learning"), and
:func:`fit_pca` learns a ``dim``-dimensional projection on the corpus itself.

References:
    * sentence-transformers, "Embedding Quantization" documentation; ``quantize_embeddings`` and
      ``semantic_search_usearch`` / ``semantic_search_faiss`` in ``sentence_transformers.util.quantization``
      (``sentence_transformers.quantization`` in older releases).
    * Shakir, Aarsen and Lee (2024), "Binary and Scalar Embedding Quantization for Significantly Faster & Cheaper
      Retrieval" (Hugging Face blog): rescored binary retrieval keeps roughly 96% of float32 retrieval performance
      at 32x less memory, int8 up to ~99% (with rescoring) at 4x.

Search functions return ``(scores_or_distances, indices)`` of shape ``(Q, min(top_k, N))``: scores sorted
descending (distances ascending), ties broken by the lower corpus index, exactly as a full-matrix sort would.
They walk ``query_chunk_size x corpus_chunk_size`` blocks and keep a running top-k, so peak extra memory is at most
about ``16 * query_chunk_size * corpus_chunk_size`` bytes (the float32 score block plus the float64 key or masks
used for exact tie-breaking) plus one float32 corpus chunk (``4 * corpus_chunk_size * D``, dequantized or
upcast); the ``Q x N`` matrix never exists. Inputs must be finite (NaN scores
would break the tie-exact selection).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from embedlab.evaluation.search import check_search_args

__all__ = [
    "PRECISIONS",
    "PCA",
    "ScalarQuantizer",
    "binary_quantize",
    "binary_rescore_search",
    "bytes_per_vector",
    "fit_pca",
    "fit_scalar_quantizer",
    "hamming_search",
    "scalar_search",
    "truncate",
]

#: Precisions understood by :func:`bytes_per_vector`, in grid order.
PRECISIONS: tuple[str, ...] = ("float32", "float16", "int8", "uint8", "binary", "binary_rescore")
_SCALAR_PRECISIONS: tuple[str, ...] = ("int8", "uint8")
_ROUNDINGS: tuple[str, ...] = ("nearest", "floor")

#: Default chunk sizes: a 512 x 16_384 block is <= ~130 MB of temporaries (see module docstring).
DEFAULT_QUERY_CHUNK_SIZE = 512
DEFAULT_CORPUS_CHUNK_SIZE = 16_384
#: Rows processed at once by elementwise passes (quantize, pack, PCA statistics).
DEFAULT_ROW_CHUNK_SIZE = 65_536
#: Upper bound on elements of the (q, n_candidates, D) candidate tensor built while rescoring (64 MB float32).
_RESCORE_BLOCK_ELEMENTS = 1 << 24

# popcount of every byte value; Hamming distance = sum over bytes of _POPCOUNT[a ^ b].
_POPCOUNT = torch.tensor([bin(v).count("1") for v in range(256)], dtype=torch.uint8)


# ----------------------------------------------------------------------------------------------------------------
# small shared checks
# ----------------------------------------------------------------------------------------------------------------
def _check_2d(name: str, x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a 2-D tensor (N, D), got {shape}")


def _num_bytes(dim: int) -> int:
    return (dim + 7) // 8


# ----------------------------------------------------------------------------------------------------------------
# 1. Matryoshka truncation
# ----------------------------------------------------------------------------------------------------------------
def truncate(emb: torch.Tensor, dim: int, renormalize: bool = True) -> torch.Tensor:
    """Keep the first ``dim`` coordinates of each embedding (Matryoshka truncation).

    Matryoshka-trained models put the most information in the leading coordinates, so ``emb[:, :dim]`` is a
    usable ``dim``-dimensional embedding and storage shrinks by ``D / dim``. Truncation breaks unit norm, so
    with ``renormalize=True`` (the default) rows are L2-normalised again, making dot product = cosine.

    Args:
        emb: ``(N, D)`` float embeddings.
        dim: number of leading coordinates to keep, ``1 <= dim <= D``.
        renormalize: L2-normalise the truncated rows (returns a new ``(N, dim)`` tensor); when ``False`` the
            result is a view of ``emb`` (no copy).

    Raises:
        ValueError: ``"dim must satisfy 1 <= dim <= {D} (the embedding width), got {dim}"``.
    """
    _check_2d("emb", emb)
    width = emb.shape[1]
    if not 1 <= dim <= width:
        raise ValueError(f"dim must satisfy 1 <= dim <= {width} (the embedding width), got {dim}")
    out = emb[:, :dim]
    if renormalize:
        out = torch.nn.functional.normalize(out, p=2.0, dim=1)
    return out


# ----------------------------------------------------------------------------------------------------------------
# 2. scalar (int8 / uint8) quantization
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class ScalarQuantizer:
    """Per-dimension linear quantizer to 256 levels (int8 or uint8): 1 byte per dimension, 4x smaller than float32.

    Each dimension ``j`` gets its own grid from a calibration set: ``step_j = (max_j - min_j) / 255`` and::

        uint8 = clamp(round((x - min_j) / step_j), 0, 255)
        int8  = uint8 - 128
        dequantized = min_j + uint8 * step_j

    This is sentence-transformers' ``quantize_embeddings`` mapping (including ``step = 1`` for a constant
    dimension, which then quantizes to 0 and dequantizes to ``min_j``), with two choices made explicit:

    * ``rounding="nearest"`` (default) rounds to the nearest level (half to even), so the quantize/dequantize
      error is at most ``step_j / 2`` inside the calibration range. ``rounding="floor"`` reproduces current
      sentence-transformers bit-for-bit (checked against 6.2, which floors and clamps; older releases truncated
      with ``astype`` and did not clamp, so out-of-range values wrapped around); its error is up to one ``step_j``.
    * values outside ``[min_j, max_j]`` (queries, or corpus rows outside the calibration sample) clamp to the
      end levels instead of wrapping.

    Attributes:
        mins: ``(D,)`` float32 per-dimension minimum of the calibration set.
        maxs: ``(D,)`` float32 per-dimension maximum.
        precision: ``"int8"`` (codes ``-128..127``) or ``"uint8"`` (codes ``0..255``); the same grid, offset by 128.
        rounding: ``"nearest"`` or ``"floor"``.
    """

    mins: torch.Tensor
    maxs: torch.Tensor
    precision: str = "int8"
    rounding: str = "nearest"

    def __post_init__(self) -> None:
        if self.precision not in _SCALAR_PRECISIONS:
            raise ValueError(f"precision must be one of {_SCALAR_PRECISIONS}, got {self.precision!r}")
        if self.rounding not in _ROUNDINGS:
            raise ValueError(f"rounding must be one of {_ROUNDINGS}, got {self.rounding!r}")
        if self.mins.dim() != 1 or self.mins.shape != self.maxs.shape:
            raise ValueError(
                f"mins and maxs must be 1-D of equal shape, got {tuple(self.mins.shape)} and {tuple(self.maxs.shape)}"
            )
        self.mins = self.mins.float()
        self.maxs = self.maxs.float()

    @property
    def dim(self) -> int:
        return self.mins.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return torch.int8 if self.precision == "int8" else torch.uint8

    @property
    def steps(self) -> torch.Tensor:
        """``(D,)`` float32 level spacing; ``1`` where ``max == min`` (as in sentence-transformers)."""
        steps = (self.maxs - self.mins) / 255
        return torch.where(steps == 0, torch.ones_like(steps), steps)

    def _params(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mins.to(device), self.steps.to(device)

    def quantize(self, emb: torch.Tensor, chunk_size: int = DEFAULT_ROW_CHUNK_SIZE) -> torch.Tensor:
        """``(N, D)`` float -> ``(N, D)`` int8/uint8 codes, ``chunk_size`` rows at a time (float temporaries are
        ``chunk_size x D``)."""
        _check_2d("emb", emb)
        if emb.shape[1] != self.dim:
            raise ValueError(f"emb has width {emb.shape[1]}, the quantizer was fitted on width {self.dim}")
        mins, steps = self._params(emb.device)
        out = torch.empty(emb.shape, dtype=self.dtype, device=emb.device)
        for start in range(0, emb.shape[0], chunk_size):
            levels = (emb[start : start + chunk_size].float() - mins).div_(steps)  # (n, D) float32, same ops as ST
            levels = levels.round_() if self.rounding == "nearest" else levels.floor_()
            levels.clamp_(0, 255)
            if self.precision == "int8":
                levels -= 128
            out[start : start + chunk_size] = levels.to(self.dtype)
        return out

    def dequantize(self, q: torch.Tensor, chunk_size: int = DEFAULT_ROW_CHUNK_SIZE) -> torch.Tensor:
        """``(N, D)`` codes -> ``(N, D)`` float32 level values ``min + uint8_code * step``."""
        _check_2d("q", q)
        if q.dtype != self.dtype:
            raise ValueError(f"expected {self.dtype} codes for a {self.precision} quantizer, got {q.dtype}")
        if q.shape[1] != self.dim:
            raise ValueError(f"codes have width {q.shape[1]}, the quantizer was fitted on width {self.dim}")
        mins, steps = self._params(q.device)
        offset = 128.0 if self.precision == "int8" else 0.0

        def levels_of(codes: torch.Tensor) -> torch.Tensor:  # (n, D) float32, computed in place
            levels = codes.float()  # float before +128: int8 would overflow
            if offset:
                levels += offset
            return levels.mul_(steps).add_(mins)

        if q.shape[0] <= chunk_size:
            return levels_of(q)  # one chunk: no separate output buffer (scalar_search's per-chunk call)
        out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
        for start in range(0, q.shape[0], chunk_size):
            out[start : start + chunk_size] = levels_of(q[start : start + chunk_size])
        return out


def fit_scalar_quantizer(
    calibration_emb: torch.Tensor, precision: str = "int8", rounding: str = "nearest"
) -> ScalarQuantizer:
    """Calibrate a :class:`ScalarQuantizer` from per-dimension min/max of ``calibration_emb`` ``(N, D)``.

    Calibrate on the corpus (or a representative sample of it); queries are then quantized with the same grid,
    or, better, kept in float32 and scored against the dequantized corpus (:func:`scalar_search`).

    Raises:
        ValueError: fewer than 2 calibration rows (the range would be empty), unknown precision or rounding.
    """
    _check_2d("calibration_emb", calibration_emb)
    if calibration_emb.shape[0] < 2:
        raise ValueError(
            f"calibration_emb needs at least 2 rows to estimate per-dimension ranges, got {calibration_emb.shape[0]}"
        )
    return ScalarQuantizer(
        mins=calibration_emb.amin(dim=0).float(),
        maxs=calibration_emb.amax(dim=0).float(),
        precision=precision,
        rounding=rounding,
    )


# ----------------------------------------------------------------------------------------------------------------
# 3. binary quantization and Hamming search
# ----------------------------------------------------------------------------------------------------------------
def _bit_shifts(device: torch.device) -> torch.Tensor:
    return torch.arange(7, -1, -1, dtype=torch.uint8, device=device)  # (8,) MSB first, like numpy.packbits


def binary_quantize(emb: torch.Tensor, chunk_size: int = DEFAULT_ROW_CHUNK_SIZE) -> torch.Tensor:
    """Sign-binarize and pack: ``(N, D)`` float -> ``(N, ceil(D / 8))`` uint8, 32x smaller than float32.

    Bit ``j`` is ``emb[:, j] > 0`` (zero maps to 0), packed 8 per byte most-significant bit first and zero-padded
    at the end, i.e. ``numpy.packbits(emb > 0, axis=1)`` (sentence-transformers' ``"ubinary"`` precision).
    Similarity becomes Hamming distance (number of differing bits), computed with XOR + popcount.
    """
    _check_2d("emb", emb)
    num, width = emb.shape
    num_bytes = _num_bytes(width)
    pad = 8 * num_bytes - width
    shifts = _bit_shifts(emb.device)
    out = torch.empty((num, num_bytes), dtype=torch.uint8, device=emb.device)
    for start in range(0, num, chunk_size):
        bits = (emb[start : start + chunk_size] > 0).to(torch.uint8)  # (n, D) in {0, 1}
        if pad:
            bits = torch.nn.functional.pad(bits, (0, pad))  # (n, 8 * num_bytes)
        # distinct powers of two never carry, so the uint8 sum is the packed byte
        out[start : start + chunk_size] = (bits.view(-1, num_bytes, 8) << shifts).sum(dim=-1, dtype=torch.uint8)
    return out


def _unpack_signs(bits: torch.Tensor, dim: int) -> torch.Tensor:
    """``(n, ceil(dim / 8))`` packed uint8 -> ``(n, dim)`` float32 in ``{-1, +1}`` (padding bits dropped)."""
    ones = (bits.unsqueeze(-1) >> _bit_shifts(bits.device)) & 1  # (n, B, 8) in {0, 1}
    return ones.reshape(bits.shape[0], -1)[:, :dim].float().mul_(2).sub_(1)


def _hamming_table(query_bits: torch.Tensor) -> torch.Tensor:
    """``(q, B)`` query bytes -> ``(B * 256, q)`` float32 table, row ``b * 256 + v`` = ``popcount(query_byte_b XOR v)``.

    This is the 256-entry popcount lookup on XOR'd bytes, evaluated once per query chunk against all 256 possible
    corpus byte values (``B * 256 * q`` entries, e.g. 5 MB for B=48, q=100), so a corpus chunk is scored by
    summing ``B`` table rows per corpus vector instead of XOR + lookup over a ``(q, c, B)`` cube.
    """
    values = torch.arange(256, dtype=torch.uint8, device=query_bits.device)
    xor = query_bits.t().unsqueeze(1) ^ values.view(1, 256, 1)  # (B, 256, q)
    table = _POPCOUNT.to(query_bits.device)[xor.long()].float()  # (B, 256, q)
    return table.reshape(-1, query_bits.shape[0]).contiguous()


def _hamming_block(table: torch.Tensor, corpus_bits: torch.Tensor) -> torch.Tensor:
    """Hamming distances ``(q, c)`` (float32, exact integers) from a query chunk's table and corpus bytes ``(c, B)``.

    ``embedding_bag(mode="sum")`` adds, for each corpus vector, the ``B`` table rows selected by its bytes (offset
    by ``256 * b``) in one fused gather-sum: no per-byte temporaries (measured ~4x faster than a per-byte gather loop on
    one CPU thread, ~20x with two threads on a busy machine).
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
    """Exact Hamming top-k over packed binary codes (from :func:`binary_quantize`).

    Args:
        query_bits: ``(Q, B)`` uint8.
        corpus_bits: ``(N, B)`` uint8; may live on another device than the queries (chunks are moved).
        top_k: neighbours per query (``min(top_k, N)`` are returned).

    Returns:
        ``(distances, indices)``, both ``(Q, min(top_k, N))`` int64, distance ascending, ties by lower index.
    """
    _check_2d("query_bits", query_bits)
    _check_2d("corpus_bits", corpus_bits)
    check_search_args(top_k, query_chunk_size, corpus_chunk_size)
    if query_bits.dtype != torch.uint8 or corpus_bits.dtype != torch.uint8:
        raise ValueError(f"packed bits must be uint8, got {query_bits.dtype} and {corpus_bits.dtype}")
    if query_bits.shape[1] != corpus_bits.shape[1]:
        raise ValueError(f"query and corpus codes differ in bytes: {query_bits.shape[1]} vs {corpus_bits.shape[1]}")
    device = query_bits.device

    def make_scorer(q_chunk: torch.Tensor) -> Callable[[int, int], torch.Tensor]:
        table = _hamming_table(q_chunk)
        return lambda start, end: _hamming_block(table, corpus_bits[start:end].to(device))

    dist, idx = _chunked_topk(
        query_bits, corpus_bits.shape[0], make_scorer, top_k, False, query_chunk_size, corpus_chunk_size, integral=True
    )
    return dist.long(), idx


# ----------------------------------------------------------------------------------------------------------------
# 4./5. searches on compressed corpora
# ----------------------------------------------------------------------------------------------------------------
def _matmul(queries: torch.Tensor, docs: torch.Tensor) -> torch.Tensor:
    """Dot-product block ``(q, D) x (c, D) -> (q, c)``; the single matmul site of the float searches."""
    return queries @ docs.t()


def _dense_search(
    query: torch.Tensor,
    corpus: torch.Tensor,
    top_k: int,
    query_chunk_size: int = DEFAULT_QUERY_CHUNK_SIZE,
    corpus_chunk_size: int = DEFAULT_CORPUS_CHUNK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked exact dot-product top-k of float queries ``(Q, D)`` against a float corpus ``(N, D)`` (float16 or
    float32; chunks are upcast to float32 on the queries' device). Scores descending, ties by lower index."""
    _check_2d("query", query)
    _check_2d("corpus", corpus)
    check_search_args(top_k, query_chunk_size, corpus_chunk_size)
    if query.shape[1] != corpus.shape[1]:
        raise ValueError(f"query width {query.shape[1]} != corpus width {corpus.shape[1]}")
    query = query.float()

    def make_scorer(q_chunk: torch.Tensor) -> Callable[[int, int], torch.Tensor]:
        return lambda start, end: _matmul(q_chunk, corpus[start:end].to(q_chunk.device, torch.float32))

    return _chunked_topk(query, corpus.shape[0], make_scorer, top_k, True, query_chunk_size, corpus_chunk_size)


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
    _check_2d("query_float", query_float)
    _check_2d("corpus_q", corpus_q)
    check_search_args(top_k, query_chunk_size, corpus_chunk_size)
    if query_float.shape[1] != quantizer.dim or corpus_q.shape[1] != quantizer.dim:
        raise ValueError(
            f"widths differ: query {query_float.shape[1]}, corpus {corpus_q.shape[1]}, quantizer {quantizer.dim}"
        )
    if corpus_q.dtype != quantizer.dtype:
        raise ValueError(
            f"expected {quantizer.dtype} corpus codes for a {quantizer.precision} quantizer, got {corpus_q.dtype}"
        )
    query_float = query_float.float()

    def make_scorer(q_chunk: torch.Tensor) -> Callable[[int, int], torch.Tensor]:
        return lambda start, end: _matmul(q_chunk, quantizer.dequantize(corpus_q[start:end].to(q_chunk.device)))

    return _chunked_topk(
        query_float, corpus_q.shape[0], make_scorer, top_k, True, query_chunk_size, corpus_chunk_size
    )


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
    2. Rescore only those candidates with the **float** query, which recovers most of the quality binary loses
       while the index stays at ``ceil(D / 8)`` bytes per vector:

       * ``corpus_rescore=None``: ``query . s`` with ``s`` the candidate's bits unpacked to ``{-1, +1}``.
         sentence-transformers unpacks to ``{0, 1}``; ``query . (2b - 1) = 2 query . b - sum(query)`` is the
         same ranking per query, the ``+-1`` form just keeps the scale of a sign agreement.
       * ``corpus_rescore=(quantizer, corpus_q)``: ``query . dequantize(corpus_q[candidate])`` (the int8
         corpus kept on disk in the paper's recipe).
       * ``corpus_rescore=<float (N, D) tensor>``: ``query . corpus[candidate]``.

    Args:
        query_float: ``(Q, D)`` float queries; their sign bits drive step 1.
        corpus_bits: ``(N, ceil(D / 8))`` uint8 from :func:`binary_quantize`.
        top_k: results per query (``min(top_k, N)`` are returned).
        rescore_multiplier: oversampling factor ``>= 1`` of step 1.
        corpus_rescore: see above; row ``i`` must be corpus item ``i``.

    Returns:
        ``(scores, indices)``, ``(Q, min(top_k, N))`` float32 / int64, scores descending, ties by lower index.
    """
    _check_2d("query_float", query_float)
    _check_2d("corpus_bits", corpus_bits)
    check_search_args(top_k, query_chunk_size, corpus_chunk_size)
    if rescore_multiplier < 1:
        raise ValueError(f"rescore_multiplier must be >= 1, got {rescore_multiplier}")
    width = query_float.shape[1]
    if corpus_bits.shape[1] != _num_bytes(width):
        raise ValueError(
            f"corpus_bits has {corpus_bits.shape[1]} bytes per row, queries of width {width} need {_num_bytes(width)}"
        )
    num_docs = corpus_bits.shape[0]
    device = query_float.device
    query_float = query_float.float()

    if corpus_rescore is None:
        def fetch(ids: torch.Tensor) -> torch.Tensor:
            return _unpack_signs(corpus_bits[ids.to(corpus_bits.device)].to(device), width)
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
        scores, cand = _sort_by_score_then_index(scores, cand, descending=True)
        scores_out[start : start + rows] = scores[:, :k]
        indices_out[start : start + rows] = cand[:, :k]
    return scores_out, indices_out


# ----------------------------------------------------------------------------------------------------------------
# chunked, tie-exact top-k (shared by every search above)
# ----------------------------------------------------------------------------------------------------------------
def _sort_by_score_then_index(
    values: torch.Tensor, indices: torch.Tensor, descending: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort each row of ``(q, m)`` pairs by value (desc/asc), ties by ascending index."""
    indices, perm = indices.sort(dim=1)
    values = values.gather(1, perm)
    order = values.sort(dim=1, descending=descending, stable=True).indices  # stable keeps index order on ties
    return values.gather(1, order), indices.gather(1, order)


def _block_topk(
    block: torch.Tensor, k: int, largest: bool, integral: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of each row of a ``(q, c)`` score block, ties at the k-th value resolved to the lowest columns.

    ``torch.topk`` picks arbitrarily among equal values at the cut, so:

    * ``integral`` blocks (Hamming distances, exact small integers) are ranked by the unique float64 key
      ``value * c -/+ column`` (exact while ``|value| * c < 2**53``), which orders ties by column in one ``topk``;
    * float blocks take ``topk`` as is when no tie straddles the cut (the usual case, checked with one compare);
      otherwise the set is rebuilt as "strictly better than the k-th value" + "the first ``k - #better`` equal".

    Returns ``(values, columns)`` ``(q, k)`` sorted by value, ties by column.
    """
    num_rows, num_cols = block.shape
    if integral:
        columns = torch.arange(num_cols, dtype=torch.float64, device=block.device)
        key = block.double().mul_(num_cols)  # (q, c) float64
        key = key.sub_(columns) if largest else key.add_(columns)
        columns = key.topk(k, dim=1, largest=largest, sorted=True).indices  # (q, k) sorted by (value, column)
        return block.gather(1, columns), columns
    values, columns = block.topk(k, dim=1, largest=largest, sorted=True)  # (q, k)
    kth = values[:, -1:]  # (q, 1)
    ties = block == kth  # (q, c)
    n_ties = ties.count_nonzero(dim=1)  # (q,)
    if torch.equal(n_ties, (values == kth).count_nonzero(dim=1)):
        return _sort_by_score_then_index(values, columns, descending=largest)
    take = block > kth if largest else block < kth  # (q, c) strictly better than the k-th value
    need = k - take.count_nonzero(dim=1).unsqueeze(1).to(torch.int32)  # (q, 1) >= 1
    ties &= ties.cumsum(dim=1, dtype=torch.int32) <= need  # first `need` ties of each row
    take |= ties  # exactly k True per row
    columns = take.nonzero()[:, 1].view(num_rows, k)  # (q, k), row-major so ascending per row
    values = block.gather(1, columns)
    order = values.sort(dim=1, descending=largest, stable=True).indices
    return values.gather(1, order), columns.gather(1, order)


def _chunked_topk(
    queries: torch.Tensor,
    num_docs: int,
    make_scorer: Callable[[torch.Tensor], Callable[[int, int], torch.Tensor]],
    top_k: int,
    largest: bool,
    query_chunk_size: int,
    corpus_chunk_size: int,
    integral: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k over ``num_docs`` corpus rows without a ``(Q, N)`` matrix.

    ``make_scorer(query_chunk)`` returns ``score(start, end) -> (q, end - start)`` scores for that query chunk
    (per-query-chunk precomputation, e.g. the Hamming table, happens once). Per query chunk the running best
    ``(q, <=k)`` is merged with each block's best; returns ``(values float32, indices int64)`` of shape
    ``(Q, min(top_k, num_docs))``, best first, ties by lower index.
    """
    num_queries = queries.shape[0]
    k = min(top_k, num_docs)
    out_values = torch.empty((num_queries, k), dtype=torch.float32, device=queries.device)
    out_indices = torch.empty((num_queries, k), dtype=torch.long, device=queries.device)
    if k == 0:
        return out_values, out_indices
    for q_start in range(0, num_queries, query_chunk_size):
        q_end = min(q_start + query_chunk_size, num_queries)
        score = make_scorer(queries[q_start:q_end])
        best_values: torch.Tensor | None = None  # (q, <=k)
        best_indices: torch.Tensor | None = None
        for c_start in range(0, num_docs, corpus_chunk_size):
            c_end = min(c_start + corpus_chunk_size, num_docs)
            values, columns = _block_topk(
                score(c_start, c_end).float(), min(k, c_end - c_start), largest, integral
            )
            indices = columns + c_start
            if best_values is None:
                best_values, best_indices = values, indices
            else:
                # both parts are sorted (value, index) and every running index < c_start, so a stable sort of the
                # concatenation orders ties by index: (q, <=2k) -> (q, k)
                merged_values = torch.cat([best_values, values], dim=1)
                merged_indices = torch.cat([best_indices, indices], dim=1)
                order = merged_values.sort(dim=1, descending=largest, stable=True).indices[:, :k]
                best_values, best_indices = merged_values.gather(1, order), merged_indices.gather(1, order)
        out_values[q_start:q_end] = best_values
        out_indices[q_start:q_end] = best_indices
    return out_values, out_indices


# ----------------------------------------------------------------------------------------------------------------
# 6. PCA
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class PCA:
    """A fitted ``dim``-component PCA: ``transform(x) = (x - mean) @ components.T``.

    Unlike truncation, PCA works for any model: it rotates the corpus onto its directions of largest variance
    and keeps the top ``dim``, so ``4 * dim`` bytes (float32) remain, and composes with the quantizers.

    Attributes:
        mean: ``(D,)`` float32 corpus mean.
        components: ``(dim, D)`` float32 orthonormal principal axes, by decreasing variance; each is signed so its
            largest-magnitude coefficient is positive (deterministic across runs and devices).
        explained_variance: ``(dim,)`` float32 variance along each axis (sample covariance, ``N - 1``).
        explained_variance_ratio: ``(dim,)`` float32 share of the total variance kept by each axis.
    """

    mean: torch.Tensor
    components: torch.Tensor
    explained_variance: torch.Tensor
    explained_variance_ratio: torch.Tensor

    @property
    def dim(self) -> int:
        return self.components.shape[0]

    def transform(
        self, emb: torch.Tensor, renormalize: bool = False, chunk_size: int = DEFAULT_ROW_CHUNK_SIZE
    ) -> torch.Tensor:
        """``(N, D)`` -> ``(N, dim)`` centred projection, ``chunk_size`` rows at a time (no centred ``(N, D)`` copy).
        With ``renormalize=True`` rows are L2-normalised afterwards (dot product = cosine)."""
        _check_2d("emb", emb)
        if emb.shape[1] != self.components.shape[1]:
            raise ValueError(f"emb has width {emb.shape[1]}, the PCA was fitted on width {self.components.shape[1]}")
        mean = self.mean.to(emb.device)
        components = self.components.to(emb.device)
        out = torch.empty((emb.shape[0], self.dim), dtype=torch.float32, device=emb.device)
        for start in range(0, emb.shape[0], chunk_size):
            projected = (emb[start : start + chunk_size].float() - mean) @ components.t()  # (n, dim)
            if renormalize:
                projected = torch.nn.functional.normalize(projected, p=2.0, dim=1)
            out[start : start + chunk_size] = projected
        return out


def fit_pca(emb: torch.Tensor, dim: int, chunk_size: int = DEFAULT_ROW_CHUNK_SIZE) -> PCA:
    """Fit a ``dim``-component PCA on ``emb`` ``(N, D)`` (usually the corpus embeddings).

    The ``(D, D)`` covariance is accumulated in float64, ``chunk_size`` centred rows at a time (two passes: mean,
    then scatter), and diagonalised with ``torch.linalg.eigh``. This equals the SVD of the centred data
    (right singular vectors = eigenvectors, ``S**2 / (N - 1)`` = eigenvalues) without the ``(N, D)`` centred copy
    or ``U`` factor a data SVD needs; float64 accumulation keeps the precision a float32 SVD would have.

    Raises:
        ValueError: ``dim`` outside ``[1, D]`` or fewer than 2 rows.
    """
    _check_2d("emb", emb)
    num, width = emb.shape
    if not 1 <= dim <= width:
        raise ValueError(f"dim must satisfy 1 <= dim <= {width} (the embedding width), got {dim}")
    if num < 2:
        raise ValueError(f"PCA needs at least 2 rows, got {num}")
    total = torch.zeros(width, dtype=torch.float64, device=emb.device)
    for start in range(0, num, chunk_size):
        total += emb[start : start + chunk_size].double().sum(dim=0)
    mean = total / num  # (D,) float64
    scatter = torch.zeros((width, width), dtype=torch.float64, device=emb.device)
    for start in range(0, num, chunk_size):
        centred = emb[start : start + chunk_size].double() - mean  # (n, D)
        scatter += centred.t() @ centred
    covariance = scatter / (num - 1)
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)  # ascending, columns are eigenvectors
    eigenvalues = eigenvalues.flip(0).clamp_min(0)  # descending; round-off can make null ones slightly negative
    components = eigenvectors.flip(1)[:, :dim].t()  # (dim, D)
    # sign convention: the largest-|coefficient| of each component is positive
    pivots = components.abs().argmax(dim=1, keepdim=True)  # (dim, 1)
    components = components * torch.sign(components.gather(1, pivots))
    total_variance = eigenvalues.sum()
    ratio = eigenvalues[:dim] / total_variance if total_variance > 0 else torch.zeros_like(eigenvalues[:dim])
    return PCA(
        mean=mean.float(),
        components=components.float().contiguous(),
        explained_variance=eigenvalues[:dim].float(),
        explained_variance_ratio=ratio.float(),
    )


# ----------------------------------------------------------------------------------------------------------------
# 7. storage accounting
# ----------------------------------------------------------------------------------------------------------------
def bytes_per_vector(dim: int, precision: str) -> int:
    """Index bytes for one ``dim``-wide vector: float32 ``4 * dim``, float16 ``2 * dim``, int8/uint8 ``dim``,
    binary/binary_rescore ``ceil(dim / 8)`` (rescoring against the unpacked bits needs nothing more; an int8 or
    float rescoring corpus is extra, usually on-disk, storage).

    Raises:
        ValueError: unknown precision (the message lists the valid ones) or ``dim < 1``.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; valid precisions: {', '.join(PRECISIONS)}")
    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    if precision == "float32":
        return 4 * dim
    if precision == "float16":
        return 2 * dim
    if precision in _SCALAR_PRECISIONS:
        return dim
    return math.ceil(dim / 8)

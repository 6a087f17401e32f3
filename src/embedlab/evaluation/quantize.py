"""Quantizers: float embeddings to int8 / uint8 codes (and back) and to packed sign bits.

The evaluation grid quantizes the corpus it encoded once in float32; every function takes float ``(N, D)``
torch tensors (CPU or GPU) and walks them ``chunk_size`` rows at a time, so no temporary is larger than a chunk.
Searching the codes is :mod:`embedlab.evaluation.quantized_search`; what each code costs in bytes is
:mod:`embedlab.evaluation.storage`.

References:
    * sentence-transformers, "Embedding Quantization" documentation; ``quantize_embeddings`` in
      ``sentence_transformers.util.quantization``.
    * Shakir, Aarsen and Lee (2024), "Binary and Scalar Embedding Quantization for Significantly Faster & Cheaper
      Retrieval" (Hugging Face blog).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from embedlab.evaluation.search import ROW_CHUNK_SIZE, check_2d

SCALAR_PRECISIONS: tuple[str, ...] = ("int8", "uint8")
ROUNDINGS: tuple[str, ...] = ("nearest", "floor")


# ----------------------------------------------------------------------------------------------------------------
# scalar (int8 / uint8) quantization
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
      error is at most ``step_j / 2`` inside the calibration range. ``rounding="floor"`` is sentence-transformers'
      own rule (floor, then clamp), reproduced bit for bit (``tests/test_compression.py`` checks it); its error
      is up to one ``step_j``.
    * values outside ``[min_j, max_j]`` (queries, or corpus rows outside the calibration sample) clamp to the
      end levels instead of wrapping around.

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
        if self.precision not in SCALAR_PRECISIONS:
            raise ValueError(f"precision must be one of {SCALAR_PRECISIONS}, got {self.precision!r}")
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"rounding must be one of {ROUNDINGS}, got {self.rounding!r}")
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

    def quantize(self, emb: torch.Tensor, chunk_size: int = ROW_CHUNK_SIZE) -> torch.Tensor:
        """``(N, D)`` float -> ``(N, D)`` int8/uint8 codes, ``chunk_size`` rows at a time (float temporaries are
        ``chunk_size x D``)."""
        check_2d("emb", emb)
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

    def dequantize(self, q: torch.Tensor, chunk_size: int = ROW_CHUNK_SIZE) -> torch.Tensor:
        """``(N, D)`` codes -> ``(N, D)`` float32 level values ``min + uint8_code * step``."""
        check_2d("q", q)
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
    or, better, kept in float32 and scored against the dequantized corpus
    (:func:`embedlab.evaluation.quantized_search.scalar_search`).

    Raises:
        ValueError: fewer than 2 calibration rows (the range would be empty), unknown precision or rounding.
    """
    check_2d("calibration_emb", calibration_emb)
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
# binary quantization
# ----------------------------------------------------------------------------------------------------------------
def num_packed_bytes(dim: int) -> int:
    """Bytes of one packed ``dim``-bit code: ``ceil(dim / 8)``."""
    return (dim + 7) // 8


def _bit_shifts(device: torch.device) -> torch.Tensor:
    return torch.arange(7, -1, -1, dtype=torch.uint8, device=device)  # (8,) MSB first, like numpy.packbits


def binary_quantize(emb: torch.Tensor, chunk_size: int = ROW_CHUNK_SIZE) -> torch.Tensor:
    """Sign-binarize and pack: ``(N, D)`` float -> ``(N, ceil(D / 8))`` uint8, 32x smaller than float32.

    Bit ``j`` is ``emb[:, j] > 0`` (zero maps to 0), packed 8 per byte most-significant bit first and zero-padded
    at the end, i.e. ``numpy.packbits(emb > 0, axis=1)`` (sentence-transformers' ``"ubinary"`` precision).
    Similarity becomes Hamming distance (number of differing bits).
    """
    check_2d("emb", emb)
    num, width = emb.shape
    num_bytes = num_packed_bytes(width)
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


def unpack_signs(bits: torch.Tensor, dim: int) -> torch.Tensor:
    """``(n, ceil(dim / 8))`` packed uint8 -> ``(n, dim)`` float32 in ``{-1, +1}`` (padding bits dropped)."""
    ones = (bits.unsqueeze(-1) >> _bit_shifts(bits.device)) & 1  # (n, B, 8) in {0, 1}
    return ones.reshape(bits.shape[0], -1)[:, :dim].float().mul_(2).sub_(1)

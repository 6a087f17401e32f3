"""Storage accounting: the bytes each compressed corpus vector actually keeps.

A grid cell stores two things per document: the **index** that is searched, and, for ``binary_rescore`` only, the
**rescoring** copy its candidates are rescored against. Both count: ``bytes_per_vector = index + rescore``.

=================  ==================  ======================================================================
precision          index bytes         rescore bytes (``rescore_with``)
=================  ==================  ======================================================================
``float32``        ``4 * D``           0
``float16``        ``2 * D``           0
``int8``/``uint8`` ``D``               0 (one byte per dimension on a per-dimension calibrated grid)
``binary``         ``ceil(D / 8)``     0 (one bit per dimension, the sign; searched by Hamming distance)
``binary_rescore`` ``ceil(D / 8)``     ``int8``: ``D``; ``float32``: ``4 * D``; ``binary``: 0 (the index's own
                                       bits, unpacked to +-1)
=================  ==================  ======================================================================
"""

from __future__ import annotations

from embedlab.evaluation.quantize import SCALAR_PRECISIONS, num_packed_bytes

#: Precisions of the compression grid, in grid order.
PRECISIONS: tuple[str, ...] = ("float32", "float16", "int8", "uint8", "binary", "binary_rescore")
#: What ``binary_rescore`` rescores its candidates against.
RESCORE_WITH: tuple[str, ...] = ("int8", "float32", "binary")


def _check(dim: int, precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; valid precisions: {', '.join(PRECISIONS)}")
    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")


def index_bytes(dim: int, precision: str) -> int:
    """Bytes of the searched index for one ``dim``-wide vector: float32 ``4 * dim``, float16 ``2 * dim``,
    int8/uint8 ``dim``, binary/binary_rescore ``ceil(dim / 8)``.

    Raises:
        ValueError: unknown precision (the message lists the valid ones) or ``dim < 1``.
    """
    _check(dim, precision)
    if precision == "float32":
        return 4 * dim
    if precision == "float16":
        return 2 * dim
    if precision in SCALAR_PRECISIONS:
        return dim
    return num_packed_bytes(dim)


def rescore_bytes(dim: int, precision: str, rescore_with: str = "int8") -> int:
    """Bytes stored per vector besides the index, for rescoring: non-zero only for ``binary_rescore``
    (``rescore_with`` int8: ``dim``, float32: ``4 * dim``, binary: 0).

    Raises:
        ValueError: unknown precision, ``dim < 1`` or unknown ``rescore_with``.
    """
    _check(dim, precision)
    if rescore_with not in RESCORE_WITH:
        raise ValueError(f"rescore_with must be one of {', '.join(RESCORE_WITH)}, got {rescore_with!r}")
    if precision != "binary_rescore" or rescore_with == "binary":
        return 0
    return index_bytes(dim, rescore_with)

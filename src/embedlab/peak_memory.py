"""Peak resident memory of a block of code on Linux, read from ``/proc/self``.

The measurement behind embedlab's memory-bound tests and ``benchmarks/grad_cache_memory.py``: reset the
high-water mark (``VmHWM``) to the current resident set, run the block, and read ``VmHWM`` minus the resident set
before it. Elsewhere (no ``/proc``, or ``clear_refs`` not writable) :func:`reset_peak_rss` returns False and
callers fall back or skip.
"""

from __future__ import annotations

import ctypes


def status_kb(field: str) -> int | None:
    """A ``/proc/self/status`` field in KiB (e.g. ``VmRSS``, ``VmHWM``); None where the file or field is missing."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Return freed heap pages to the OS (glibc ``malloc_trim``, best effort), so that reusing memory freed earlier
    does not hide new allocations, then reset ``VmHWM`` to the current RSS (Linux >= 4.0: write 5 to
    ``/proc/self/clear_refs``). False where that file is not writable."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False

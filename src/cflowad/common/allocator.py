"""Keep freed memory in the process instead of returning it to the OS after every image.

glibc serves allocations above a threshold (128 KiB at first) with fresh ``mmap``
pages and unmaps them on free, so every image's activations fault in and zero
their pages again. Raising the thresholds keeps those pages for reuse: measured
with ``cflowad bench`` on magnetic_tile (2 cores), batch 1 went from 20.1 to 24.0
images/s and the encoder alone from 35 to 46 images/s, for about 70 MiB more
resident memory. The command line calls this at start; library users may set
``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_`` and ``MALLOC_ARENA_MAX``
themselves.

Each glibc arena keeps up to the trim threshold of freed memory, and glibc opens up
to 8 arenas per core for threads that allocate at once. So the number of arenas is
capped too: a server scoring two batches at once beside its HTTP threads grew from
1,387 to 1,453 MB over two minutes of steady load with glibc's arenas, and held at
1,293 to 1,302 MB with two (magnetic_tile ONNX file, 16 clients, 2 cores).
"""

from __future__ import annotations

import ctypes
import sys
from typing import Any

__all__ = ["keep_freed_memory", "release_freed_memory"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8


def keep_freed_memory(
    mmap_threshold: int = 32 << 20, trim_threshold: int = 256 << 20, arenas: int = 2
) -> bool:
    """Raise glibc's mmap and trim thresholds and cap its arenas (call before starting
    threads); False where the C library has no ``mallopt``."""
    mallopt = _glibc("mallopt", ctypes.c_int, ctypes.c_int)
    if mallopt is None:
        return False
    return all(
        mallopt(option, value)
        for option, value in (
            (_M_MMAP_THRESHOLD, mmap_threshold),
            (_M_TRIM_THRESHOLD, trim_threshold),
            (_M_ARENA_MAX, arenas),
        )
    )


def release_freed_memory() -> bool:
    """Return freed heap memory to the OS now (glibc ``malloc_trim``); False where absent.

    With :func:`keep_freed_memory` a retired model's memory stays in the process: the
    server calls this after a reload so that resident memory does not grow by a model
    per reload.
    """
    malloc_trim = _glibc("malloc_trim", ctypes.c_size_t)
    return malloc_trim is not None and bool(malloc_trim(0))


def _glibc(name: str, *argtypes: Any) -> Any:
    """The C library's function ``name`` with its argument types, or None off Linux or
    where the library lacks it."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):
        return None
    function.argtypes = argtypes
    return function

"""Threads: how torch and ONNX Runtime share the cores of one process.

Every command and server sets them through :func:`share_threads`, once, before it
scores; ONNX Runtime sessions opened afterwards take :func:`onnx_threads`.
"""

from __future__ import annotations

import torch

from cflowad.common.errors import UserError

__all__ = ["onnx_threads", "scorers", "set_num_threads", "share_threads"]

_threads: list[int] = []  # ONNX Runtime's intra-op threads once set; torch's count until then
_scorers: list[int] = []  # batches scored at once (serve --workers) once set; 1 until then
# torch's count before any command changed it: all cores unless the user set it
_DEFAULT_THREADS = torch.get_num_threads()


def set_num_threads(threads: int) -> None:
    """ONNX Runtime's intra-op threads for the sessions opened from now on (like torch's)."""
    if threads < 1:
        raise ValueError(f"threads={threads} must be at least 1")
    _threads[:] = [threads]


def share_threads(threads: int | None, onnx_only: bool, workers: int = 1) -> None:
    """Share ``threads`` (default: torch's count at import, all cores) between torch and
    ONNX Runtime.

    Both keep a pool of threads that spin while they wait for work, and two spinning
    pools on the same cores slow each other: the magnetic_tile ONNX file scoring one
    image at a time with short pauses between (as a server does) took 53 ms per image
    with torch on 2 threads beside ONNX Runtime's 2, and 33 ms with torch on one
    (2 cores, docs/benchmarks.md). So a process that scores only ONNX files keeps
    torch, which only resizes there, on one thread. ``workers`` batches scored at
    once share the threads evenly.
    """
    total = _DEFAULT_THREADS if threads is None else threads
    if total < 1:
        raise UserError(f"option --threads={total} must be at least 1")
    if workers > total:
        raise UserError(
            f"option --workers={workers}: more workers than the {total} threads "
            "(each worker needs a thread of its own)"
        )
    each = total // workers
    set_num_threads(each)
    _scorers[:] = [workers]
    torch.set_num_threads(1 if onnx_only else each)


def onnx_threads() -> int:
    """ONNX Runtime's intra-op threads for a new session: as set, else torch's count."""
    return _threads[0] if _threads else torch.get_num_threads()


def scorers() -> int:
    """How many batches are scored at once (``serve --workers``), each on
    :func:`onnx_threads` threads: OpenVINO needs as many streams to run them side by side."""
    return _scorers[0] if _scorers else 1

"""Progress reporting: rich bars with ETA on a terminal, plain lines elsewhere, or nothing."""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

__all__ = ["Reporter"]


class Reporter:
    """Where long-running steps report to; ``Reporter(enabled=False)`` is silent.

    Bars go to stderr, and only when both stdout and stderr are terminals;
    otherwise each step prints one start line and one summary line, no colour codes.
    With ``progress_file``, the current step is also written there as JSON (step,
    done, total, per_second, eta_seconds, status), replaced atomically as it advances,
    for a dashboard in another process (``cflowad studio``) to read.
    """

    def __init__(self, enabled: bool = True, progress_file: Path | None = None) -> None:
        self.enabled = enabled
        self.console = Console(stderr=True, highlight=False, soft_wrap=True)
        self.interactive = enabled and self.console.is_terminal and sys.stdout.isatty()
        self.progress_file = progress_file
        self.show_warnings = True  # off for steps whose warnings a later step repeats

    def log(self, message: str) -> None:
        """One line of what is happening."""
        if self.enabled:
            self.console.print(message, markup=False, highlight=False)

    def warn(self, message: str) -> None:
        """A warning: one stderr line when enabled, a Python ``UserWarning`` when silent."""
        if not self.show_warnings:
            return
        if self.enabled:
            self.console.print(f"cflowad: warning: {message}", markup=False, highlight=False)
        else:
            warnings.warn(message, UserWarning, stacklevel=5)

    @contextmanager
    def task(self, description: str, total: int) -> Iterator[_Task]:
        """A step of ``total`` units; advance the yielded handle as work completes."""
        start = time.perf_counter()
        shown = (
            _ProgressFile(self.progress_file, description, total) if self.progress_file else None
        )
        if not self.interactive:
            self.log(f"{description} ({total}) ...")
            handle = _Task(None, None, shown)
            yield handle
            if shown is not None:
                shown.write(handle.status, final=True)
            status = f" {handle.status}" if handle.status else ""
            self.log(f"{description}: done in {time.perf_counter() - start:.1f} s{status}")
            return
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[status]}"),
        )
        with Progress(*columns, console=self.console, transient=False) as progress:
            task_id = progress.add_task(description, total=total, status="")
            handle = _Task(progress, task_id, shown)
            yield handle
            if shown is not None:
                shown.write(handle.status, final=True)


class _Task:
    def __init__(
        self, progress: Progress | None, task_id: TaskID | None, shown: _ProgressFile | None
    ) -> None:
        self.progress = progress
        self.task_id = task_id
        self.shown = shown
        self.status = ""

    def advance(self, amount: int = 1, status: str | None = None) -> None:
        if status is not None:
            self.status = status
        if self.progress is not None and self.task_id is not None:
            self.progress.update(self.task_id, advance=amount, status=self.status)
        if self.shown is not None:
            self.shown.advance(amount, self.status)


class _ProgressFile:
    """One step's progress as a JSON file, rewritten at most every 0.2 s (and at the end)."""

    def __init__(self, path: Path, step: str, total: int) -> None:
        self.path, self.step, self.total = path, step, total
        self.done = 0
        self.start = self.last = time.monotonic()
        self.write("")

    def advance(self, amount: int, status: str) -> None:
        self.done += amount
        if time.monotonic() - self.last >= 0.2 or self.done >= self.total:
            self.write(status)

    def write(self, status: str, final: bool = False) -> None:
        self.last = time.monotonic()
        seconds = self.last - self.start
        rate = self.done / seconds if seconds > 0 and self.done else None
        eta = (self.total - self.done) / rate if rate else None
        record = {
            "step": self.step,
            "done": self.done,
            "total": self.total,
            "per_second": round(rate, 3) if rate else None,
            "eta_seconds": round(eta, 1) if eta is not None else None,
            "elapsed_seconds": round(seconds, 1),
            "status": status,
            "finished": final,
        }
        staging = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        staging.write_text(json.dumps(record))
        os.replace(staging, self.path)

"""Progress reporting: rich bars with ETA on a terminal, plain lines elsewhere, or nothing."""

from __future__ import annotations

import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

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
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.console = Console(stderr=True, highlight=False, soft_wrap=True)
        self.interactive = enabled and self.console.is_terminal and sys.stdout.isatty()

    def log(self, message: str) -> None:
        """One line of what is happening."""
        if self.enabled:
            self.console.print(message, markup=False, highlight=False)

    def warn(self, message: str) -> None:
        """A warning: one stderr line when enabled, a Python ``UserWarning`` when silent."""
        if self.enabled:
            self.console.print(f"cflowad: warning: {message}", markup=False, highlight=False)
        else:
            warnings.warn(message, UserWarning, stacklevel=5)

    @contextmanager
    def task(self, description: str, total: int) -> Iterator[_Task]:
        """A step of ``total`` units; advance the yielded handle as work completes."""
        start = time.perf_counter()
        if not self.interactive:
            self.log(f"{description} ({total}) ...")
            handle = _Task(None, None)
            yield handle
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
            yield _Task(progress, task_id)


class _Task:
    def __init__(self, progress: Progress | None, task_id: TaskID | None) -> None:
        self.progress = progress
        self.task_id = task_id
        self.status = ""

    def advance(self, amount: int = 1, status: str | None = None) -> None:
        if status is not None:
            self.status = status
        if self.progress is not None and self.task_id is not None:
            self.progress.update(self.task_id, advance=amount, status=self.status)

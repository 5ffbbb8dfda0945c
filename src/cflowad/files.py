"""Writing output folders so that a failed run never destroys what a user made."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from cflowad.errors import UserError

__all__ = ["refuse_foreign", "staged_directory"]


def refuse_foreign(target: Path, is_ours: Callable[[Path], bool], option: str) -> None:
    """Refuse ``target`` unless it is missing or ``is_ours(target)`` says cflowad wrote it.

    Commands call this before long work too, so a wrong ``option`` fails at once.
    """
    if target.exists() and not (target.is_dir() and is_ours(target)):
        raise UserError(f"{target}: exists and was not written by cflowad; choose another {option}")


@contextmanager
def staged_directory(target: Path, is_ours: Callable[[Path], bool], option: str) -> Iterator[Path]:
    """Yield an empty staging folder that replaces ``target`` only if the block succeeds.

    ``target`` may be replaced only as :func:`refuse_foreign` allows.
    """
    refuse_foreign(target, is_ours, option)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield staging
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            target.rename(old)
            staging.rename(target)
            shutil.rmtree(old)
        else:
            staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)

"""Writing output folders so that a failed run never destroys what a user made, and
JSON files and JSON-lines records that a kill never leaves half written.

An output folder (``predict --out``, ``test --out``, ``demo --out``) may be missing,
empty, or one that cflowad wrote before: cflowad marks its folders with a file it
owns, :data:`MARKER`, and replaces a marked folder as a whole only when the new run
succeeds. Anything else is refused before any work starts, and no code path
deletes a file that cflowad did not write.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cflowad.common.errors import UserError

__all__ = [
    "MARKER",
    "append_record",
    "is_output_dir",
    "read_json",
    "read_records",
    "refuse_foreign",
    "replace_file",
    "staged_directory",
    "write_json",
]

MARKER = ".cflowad-output"
MARKER_HEADER = "# written by cflowad: these files; the folder is replaced on re-runs"


def is_output_dir(path: Path) -> bool:
    """Whether ``path`` is an output folder that cflowad wrote and nobody added to.

    :data:`MARKER` lists every file cflowad wrote there; a file it does not list
    (a user's) makes the folder foreign, so it is never replaced.
    """
    marker = path / MARKER
    if not marker.is_file():
        return False
    written = set(marker.read_text().splitlines()[1:])
    return all(
        p.relative_to(path).as_posix() in written
        for p in path.rglob("*")
        if not p.is_dir() and p != marker
    )


def refuse_foreign(
    target: Path, is_ours: Callable[[Path], bool] = is_output_dir, option: str = "--out"
) -> None:
    """Refuse ``target`` unless it is missing, an empty folder, or ``is_ours(target)``.

    Commands call this before long work too, so a wrong ``option`` fails at once.
    """
    if not target.exists():
        return
    if target.is_dir() and (not any(target.iterdir()) or is_ours(target)):
        return
    raise UserError(f"{target}: exists and was not written by cflowad; choose another {option}")


@contextmanager
def staged_directory(
    target: Path,
    is_ours: Callable[[Path], bool] = is_output_dir,
    option: str = "--out",
    keep_partial: bool = False,
) -> Iterator[Path]:
    """Yield an empty staging folder that replaces ``target`` only if the block succeeds.

    ``target`` may be replaced only as :func:`refuse_foreign` allows. With the default
    ``is_ours`` the folder gets :data:`MARKER`, so a later run may replace it. With
    ``keep_partial``, a run that fails or is interrupted keeps what it wrote as
    ``<target>.partial`` (``target`` itself stays as it was).
    """
    refuse_foreign(target, is_ours, option)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    marked = is_ours is is_output_dir
    try:
        yield staging
    except BaseException:
        if keep_partial and marked and any(staging.iterdir()):
            partial = target.with_name(f"{target.name}.partial")
            if not partial.exists() or is_output_dir(partial):
                _mark(staging)
                _swap(staging, partial)
        raise
    else:
        if marked:
            _mark(staging)
        refuse_foreign(target, is_ours, option)  # nothing foreign appeared meanwhile
        _swap(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def _mark(folder: Path) -> None:
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if not p.is_dir())
    (folder / MARKER).write_text("\n".join([MARKER_HEADER, *files]) + "\n")


def _swap(staging: Path, target: Path) -> None:
    """Move ``staging`` to ``target``, removing an earlier ``target`` only once it is replaced."""
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        target.rename(old)
        staging.rename(target)
        shutil.rmtree(old)
    else:
        staging.rename(target)


def replace_file(target: Path, text: str) -> None:
    """Write ``text`` to ``target`` atomically; refuses a folder (``--json FILE``)."""
    if target.is_dir():
        raise UserError(f"{target}: is a folder; --json takes a file name")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        staging.write_text(text)
        os.replace(staging, target)
    finally:
        staging.unlink(missing_ok=True)


def append_record(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON line and sync it to disk before returning."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        handle.write(json.dumps(record) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def read_records(path: Path) -> list[dict[str, Any]]:
    """The JSON lines of ``path``; a line cut short by a crash is skipped, not an error."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def write_json(path: Path, value: Any) -> None:
    """Replace ``path`` with ``value`` as JSON, atomically."""
    replace_file(path, json.dumps(value, indent=2))


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object file, or {} if it is missing or unreadable."""
    try:
        value = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return value if isinstance(value, dict) else {}

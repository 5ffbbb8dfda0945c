"""An append-only queue on disk: messages waiting for one destination, in order, bounded.

Every message is appended (written, flushed and synced) before the caller goes on, so
a ``kill -9`` loses nothing that was spooled; a line torn by the kill is cut at the
next start (the caller had not been told it was spooled). The sender reads from a
cursor and moves it only after the destination confirmed, so delivery is at least
once: a message confirmed but not yet marked is sent again after a crash, with the
same id. Messages live in numbered segment files; a segment that is fully sent is
deleted, and when the spool passes its size bound the oldest segment is dropped
(whole, with a count of its unsent messages), so a destination that is gone for days
cannot fill the disk.

Written here rather than taken from a library: the queues on PyPI (persist-queue,
diskcache) keep one SQLite row per message and a global lock; a segment append with
one fsync is what the line's rates need, and the format stays plain JSON lines that
a person can read.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

from cflowad.data.files import replace_file

__all__ = ["Spool"]

_CURSOR = "cursor.json"
_SUFFIX = ".jsonl"


class Spool:
    """Messages (one JSON line each) waiting for one destination.

    Thread-safe: the scoring side calls :meth:`append`, the sender :meth:`peek` and
    :meth:`ack`.
    """

    def __init__(self, folder: Path, max_bytes: int) -> None:
        self.folder = folder
        self.max_bytes = max_bytes
        # segments small enough that dropping one loses little, large enough to be few
        self.segment_bytes = max(64 * 1024, min(4 * 2**20, max_bytes // 8))
        self._lock = threading.Lock()
        folder.mkdir(parents=True, exist_ok=True)
        self._segments = sorted(int(p.stem) for p in folder.glob(f"*{_SUFFIX}") if p.stem.isdigit())
        self._cursor = self._read_cursor()
        if self._segments:
            _cut_torn_tail(self._path(self._segments[-1]))
        self._sizes = {n: self._path(n).stat().st_size for n in self._segments}
        self.pending = self._count_pending()

    # -- the scoring side
    def append(self, lines: list[bytes]) -> int:
        """Append ``lines`` (each one JSON document, no newline) durably; how many older
        messages were dropped to stay within the bound."""
        if not lines:
            return 0
        data = b"".join(line + b"\n" for line in lines)
        with self._lock:
            if not self._segments or self._sizes[self._segments[-1]] >= self.segment_bytes:
                self._start_segment()
            last = self._segments[-1]
            with self._path(last).open("ab") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            self._sizes[last] += len(data)
            self.pending += len(lines)
            return self._enforce_bound()

    # -- the sending side
    def peek(self, limit: int) -> list[tuple[bytes, tuple[int, int]]]:
        """Up to ``limit`` messages from the cursor, in order, each with the position after
        it (what :meth:`ack` takes once it is delivered)."""
        with self._lock:
            segment, offset = self._cursor
            found: list[tuple[bytes, tuple[int, int]]] = []
            for number in self._segments:
                if number < segment:
                    continue
                if number > segment:
                    segment, offset = number, 0
                with self._path(number).open("rb") as handle:
                    handle.seek(offset)
                    while len(found) < limit:
                        line = handle.readline()
                        if not line.endswith(b"\n"):  # end of what is written
                            break
                        offset += len(line)
                        found.append((line[:-1], (segment, offset)))
                if len(found) >= limit:
                    break
            return found

    def ack(self, position: tuple[int, int], count: int) -> None:
        """Mark everything before ``position`` (``count`` messages) as delivered."""
        with self._lock:
            if position < self._cursor:  # the segment was dropped meanwhile
                return
            self._cursor = position
            replace_file(
                self.folder / _CURSOR, json.dumps({"segment": position[0], "offset": position[1]})
            )
            self.pending = max(0, self.pending - count)
            for number in [n for n in self._segments if n < position[0]]:
                self._remove(number)

    @property
    def size(self) -> int:
        """Bytes on disk in segments."""
        with self._lock:
            return sum(self._sizes.values())

    # -- inside
    def _path(self, number: int) -> Path:
        return self.folder / f"{number:012d}{_SUFFIX}"

    def _start_segment(self) -> None:
        number = self._segments[-1] + 1 if self._segments else self._cursor[0] + 1
        self._path(number).touch()
        self._segments.append(number)
        self._sizes[number] = 0

    def _remove(self, number: int) -> None:
        self._path(number).unlink(missing_ok=True)
        self._segments.remove(number)
        del self._sizes[number]

    def _enforce_bound(self) -> int:
        """Drop the oldest segments (never the one being written) while over the bound."""
        dropped = 0
        while sum(self._sizes.values()) > self.max_bytes and len(self._segments) > 1:
            oldest = self._segments[0]
            start = self._cursor[1] if self._cursor[0] == oldest else 0
            if self._cursor[0] <= oldest:
                with self._path(oldest).open("rb") as handle:
                    handle.seek(start)
                    dropped += sum(1 for _ in handle)
            self._remove(oldest)
            if self._cursor[0] <= oldest:
                self._cursor = (self._segments[0], 0)
        self.pending -= dropped
        return dropped

    def _read_cursor(self) -> tuple[int, int]:
        try:
            saved = json.loads((self.folder / _CURSOR).read_text())
            return int(saved["segment"]), int(saved["offset"])
        except (OSError, ValueError, KeyError, TypeError):
            return (self._segments[0], 0) if self._segments else (1, 0)

    def _count_pending(self) -> int:
        count = 0
        for number in self._segments:
            if number < self._cursor[0]:
                continue
            with self._path(number).open("rb") as handle:
                if number == self._cursor[0]:
                    handle.seek(self._cursor[1])
                count += sum(1 for _ in handle)
        return count


def _cut_torn_tail(path: Path) -> None:
    """Cut a last line without its newline (a write that a kill interrupted)."""
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with path.open("r+b") as handle:
            handle.truncate(data.rfind(b"\n") + 1)
            handle.flush()
            os.fsync(handle.fileno())

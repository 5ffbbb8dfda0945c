"""``cflowad watch``: score every image dropped into a folder, exactly once, as it arrives.

The journal ``OUT/results.jsonl`` is the truth: a file is done when its record is
there (written and flushed before the file is moved with ``--move-done``), so a
restart, even after ``kill -9``, neither loses nor rescores a file. A file is read
once its writer has closed it (inotify's close-after-write event, where the platform
has it) or once its size and modification time have held still for ``settle``
seconds; a file renamed into place counts when it appears. A file that does not
decode then is taken as not finished yet (a writer on a slow share may pause for
seconds mid-file and append the rest later): it is read again when it changes, and
rejected only once it has stayed unchanged for ``reject_after`` seconds. Files are
keyed by name, size and modification time: a new image under an old name is a new
file. Events come from watchdog (inotify; polling where inotify is missing, or with
``poll=True`` for network shares), with a full scan every few seconds as a safety net.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from stat import S_ISREG
from typing import Any

import numpy as np

from cflowad.common.errors import UserError, missing_extra
from cflowad.common.progress import Reporter
from cflowad.data.files import refuse_foreign, replace_file
from cflowad.data.images import IMAGE_SUFFIXES, load_image
from cflowad.engine.inference import ImageResult, Predictor
from cflowad.line.decide import Decisions
from cflowad.line.drift import DriftSettings
from cflowad.line.publish import SPOOL, Publisher

__all__ = [
    "JOURNAL",
    "REJECT_AFTER",
    "SETTLE",
    "OnResult",
    "WatchSummary",
    "is_watch_output",
    "watch_folder",
]

OnResult = Callable[[np.ndarray, ImageResult, dict[str, Any]], None]

JOURNAL = "results.jsonl"
SETTLE = 0.5  # s a file must hold still before it is read, unless its writer closed it
# s an unreadable file must hold still before it is rejected: a writer on a slow share
# may pause for seconds mid-file
REJECT_AFTER = 10.0
_RESCAN_SECONDS = 5.0


def is_watch_output(folder: Path) -> bool:
    """An earlier watch's output folder (its journal), which a restart resumes, or one
    that holds only the spool of a watch stopped before its first record."""
    return (folder / JOURNAL).is_file() or (folder / SPOOL).is_dir()


@dataclass
class WatchSummary:
    """What one run of :func:`watch_folder` did."""

    scored: int = 0
    anomalous: int = 0
    rejected: int = 0
    delays: list[float] = field(default_factory=list)  # first seen -> record written, s


@dataclass
class _Candidate:
    size: int
    modified_ns: int
    first_seen: float  # monotonic; the arrival, for the delay figure
    first_seen_at: str  # the same as a timestamp, for the record
    changed_at: float  # when the size or time last changed
    closed: Key | None = None  # the file as its writer last closed it
    unreadable: Key | None = None  # the file as it last failed to decode


Key = tuple[str, int, int]  # name, bytes, modification time (ns)


def watch_folder(
    model: Predictor,
    inbox: Path,
    out: Path,
    *,
    move_done: bool = False,
    pictures: bool = False,
    settle: float = SETTLE,
    reject_after: float = REJECT_AFTER,
    batch_size: int = 8,
    poll: bool = False,
    once: bool = False,
    stop: threading.Event | None = None,
    reporter: Reporter | None = None,
    on_result: OnResult | None = None,
    calibrate_images: int = 0,
    drift: DriftSettings | None = None,
    publisher: Publisher | None = None,
    model_name: str = "model",
    confine: Callable[[Path], Path] | None = None,
) -> WatchSummary:
    """Score new images in ``inbox`` until ``stop`` is set (or, with ``once``, until the
    folder holds nothing new); records go to ``out/results.jsonl``.

    Args:
        model: a loaded model directory or ONNX file.
        inbox: the hot folder (images directly in it; names starting with '.' and
            other suffixes are ignored, so ``x.png.part`` renamed to ``x.png`` works).
        out: output folder: the journal, ``maps/``, ``rejected/``, ``done/``, ``pictures/``.
        move_done: move each scored file to ``out/done/`` once its record is written.
        pictures: write ``out/pictures/<name>.png``, the image beside its heat map.
        settle: seconds a file's size and time must hold still before it is read
            (a file its writer has closed is read at once, where inotify tells).
        reject_after: seconds a file that does not decode must stay unchanged before
            it is moved to ``rejected/`` (until then it may still be being written).
        batch_size: files that are ready together are scored together, up to this many.
        poll: watch by polling (network shares); inotify is used otherwise.
        once: score what is there (waiting for files still being written), then return.
        stop: set it to stop (the command sets it on Ctrl-C).
        reporter: progress lines.
        on_result: called with each image, its result and its record once the record is
            written (the studio's live view); it must return quickly.
        calibrate_images: the first N images are good: refit the thresholds on them
            (:mod:`cflowad.line.calibrate`) into ``out/model``, and decide the rest with
            it; after a restart the saved calibration is used.
        drift: the drift alarm's settings (:mod:`cflowad.line.drift`); trips and clears go
            to ``out/drift.jsonl``.
        publisher: where records, drift alarms and rejected files are published
            (:mod:`cflowad.line.publish`); a record is spooled before it is journaled,
            so a kill between the two scores the file again under the same message id.
        model_name: the model's name in published messages.
        confine: called with each file before it is read; a UserError rejects the file
            unread (the studio refuses symbolic links that lead outside its folders).
    """
    if not inbox.is_dir():
        raise UserError(f"INBOX {inbox}: folder not found")
    if out.resolve() == inbox.resolve() or inbox.resolve() in out.resolve().parents:
        raise UserError(f"--out {out}: must not be inside INBOX {inbox}")
    if settle < 0 or reject_after < 0 or batch_size < 1:
        raise UserError(
            "options --settle and --reject-after must be 0 or more and --batch-size at least 1"
        )
    refuse_foreign(out, is_watch_output)
    folder = _HotFolder(
        model,
        inbox,
        out,
        move_done,
        pictures,
        reporter,
        on_result,
        calibrate_images,
        drift,
        publisher,
        model_name,
        confine,
    )
    stop = stop or threading.Event()
    wake = threading.Event()
    observer = _start_observer(inbox, wake, folder.closed, poll, folder.reporter)
    last_report = time.monotonic()
    try:
        with folder.journal_path.open("a") as journal:
            while not stop.is_set():
                ready, waiting = folder.scan(settle, reject_after)
                for start in range(0, len(ready), batch_size):
                    folder.score(ready[start : start + batch_size], journal, reject_after)
                if time.monotonic() - last_report > 10 and folder.summary.scored:
                    folder.reporter.log(_progress(folder.summary))
                    last_report = time.monotonic()
                if once and not ready and not waiting:
                    break
                if not ready:
                    wake.wait(min(max(settle / 2, 0.02), 0.25) if waiting else _RESCAN_SECONDS)
                    wake.clear()
    finally:
        if observer is not None:
            observer.stop()
            observer.join(5)
    return folder.summary


class _HotFolder:
    """The state of one watch: what is done (the journal), what is arriving, counts."""

    def __init__(
        self,
        model: Predictor,
        inbox: Path,
        out: Path,
        move_done: bool,
        pictures: bool,
        reporter: Reporter | None,
        on_result: OnResult | None = None,
        calibrate_images: int = 0,
        drift: DriftSettings | None = None,
        publisher: Publisher | None = None,
        model_name: str = "model",
        confine: Callable[[Path], Path] | None = None,
    ) -> None:
        self.inbox, self.out = inbox, out
        self.confine = confine
        self.on_result = on_result
        self.decisions = Decisions(
            model,
            out,
            "--calibrate-images",
            calibrate_images,
            resume=True,  # calibrated before a restart: decide on with it
            drift=drift,
            reporter=reporter,
            publisher=publisher,
            model_name=model_name,
        )
        self.move_done, self.pictures = move_done, pictures
        self.reporter = reporter or Reporter(enabled=False)
        for name in (
            "maps",
            "rejected",
            "done" if move_done else "",
            "pictures" if pictures else "",
        ):
            if name:
                (out / name).mkdir(parents=True, exist_ok=True)
        self.journal_path = out / JOURNAL
        self.done = _read_journal(self.journal_path)
        self.arriving: dict[str, _Candidate] = {}
        self.closed = _ClosedNames()  # filled by the observer's close-after-write events
        self.summary = WatchSummary()

    def scan(
        self, settle: float, reject_after: float
    ) -> tuple[list[tuple[Path, Key, _Candidate]], int]:
        """Files ready to read, and how many are still being written (or may be).

        Ready: closed by its writer since it last changed, or unchanged for ``settle``
        s; a file that failed to decode only once it changes again, or once it has
        been unchanged for ``reject_after`` s (then it is read a last time).
        """
        ready, waiting, now = [], 0, time.monotonic()
        closed = self.closed.take()
        for path in sorted(self.inbox.iterdir()):
            if path.name.startswith(".") or path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                stat = path.stat()
            except FileNotFoundError:  # moved away between listing and looking
                continue
            if not S_ISREG(stat.st_mode):
                continue
            key = (path.name, stat.st_size, stat.st_mtime_ns)
            if key in self.done:
                if self.move_done:  # scored before a restart, not yet moved: finish the move
                    _move(path, self.out / "done")
                continue
            seen = self.arriving.get(path.name)
            if seen is None:
                stamp = datetime.now(UTC).isoformat(timespec="milliseconds")
                seen = _Candidate(stat.st_size, stat.st_mtime_ns, now, stamp, now)
                self.arriving[path.name] = seen
            elif (seen.size, seen.modified_ns) != key[1:]:
                seen.size, seen.modified_ns, seen.changed_at = stat.st_size, stat.st_mtime_ns, now
            if path.name in closed:
                seen.closed = key
            still = now - seen.changed_at
            if seen.unreadable == key:
                is_ready = still >= reject_after
            else:
                is_ready = seen.closed == key or still >= settle
            if not is_ready or stat.st_size == 0:
                waiting += 1
                continue
            ready.append((path, key, seen))
        return ready, waiting

    def score(
        self, batch: list[tuple[Path, Key, _Candidate]], journal: Any, reject_after: float
    ) -> None:
        """Score ``batch``; write each record (flushed, synced), then move the file.

        A file that does not decode is rejected only if it has stayed unchanged for
        ``reject_after`` s; before that it is taken as still being written.
        """
        images, kept = [], []
        for path, key, seen in batch:
            if self.confine is not None:
                try:
                    self.confine(path)
                except UserError as error:  # refused, never read
                    self._reject(path, str(error))
                    continue
            try:
                images.append(load_image(path))
            except UserError as error:
                unchanged = _key(path) == key
                if unchanged and time.monotonic() - seen.changed_at >= reject_after:
                    self._reject(path, str(error))
                elif unchanged:
                    seen.unreadable = key  # read again when it changes, or to reject it
                continue
            kept.append((path, key, seen))
        if not images:
            return
        decided = self.decisions.score(images)
        for (path, key, seen), image, (result, calibrating, drifted) in zip(
            kept, images, decided, strict=True
        ):
            record: dict[str, Any] = {
                "image": str(path),
                **result.record(),
                "map": f"maps/{path.name}.npy",
                "seen_at": seen.first_seen_at,
                "scored_at": datetime.now(UTC).isoformat(timespec="milliseconds"),
                "file": key[0],
                "bytes": key[1],
                "modified_ns": key[2],
            }
            if calibrating:  # a good image by the user's word: no decision
                for decision in ("score", "anomalous"):
                    del record[decision]
                record["calibration"] = True
            elif drifted is not None:
                self.decisions.publish(
                    "drift", drifted, f"drift {drifted['state']}", drifted["time"]
                )
            np.save(self.out / record["map"], result.anomaly_map)
            if self.pictures:
                from cflowad.results.pictures import save_overlay

                record["picture"] = f"pictures/{path.name}.png"
                save_overlay(self.out / record["picture"], image, result.anomaly_map, result.mask)
            if not record.get("calibration"):  # spooled first: a kill here scores it again
                self.decisions.publish("result", record, f"{key[0]} {key[1]}", str(key[2]))
            journal.write(json.dumps(record) + "\n")
            journal.flush()
            os.fsync(journal.fileno())  # the record first: then a crash never rescores
            self.done.add(key)
            self.arriving.pop(path.name, None)
            if self.move_done:
                _move(path, self.out / "done")
            self.summary.scored += 1
            self.summary.anomalous += result.anomalous and not record.get("calibration")
            self.summary.delays.append(time.monotonic() - seen.first_seen)
            if self.on_result is not None:
                self.on_result(image, result, record)

    def _reject(self, path: Path, reason: str) -> None:
        target = _move(path, self.out / "rejected")
        entry = {"file": path.name, "reason": reason, "moved_to": str(target)}
        with (self.out / "rejected" / "rejected.jsonl").open("a") as log:
            log.write(json.dumps(entry) + "\n")
        self.arriving.pop(path.name, None)
        self.decisions.publish("rejected", entry, path.name, datetime.now(UTC).isoformat())
        self.summary.rejected += 1
        self.reporter.warn(f"{reason}; moved to {target}")


def _key(path: Path) -> Key | None:
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return (path.name, stat.st_size, stat.st_mtime_ns)


def _move(path: Path, folder: Path) -> Path:
    """Move ``path`` into ``folder``, never over an existing file (a suffix is added)."""
    target = folder / path.name
    counter = 1
    while target.exists():
        target = folder / f"{path.stem}.{counter}{path.suffix}"
        counter += 1
    shutil.move(str(path), str(target))
    return target


def _progress(summary: WatchSummary) -> str:
    return f"{summary.scored} scored, {summary.anomalous} anomalous, {summary.rejected} rejected"


def _read_journal(path: Path) -> set[Key]:
    """Keys of the files already scored.

    Records are appended a line at a time, so only the last line can be torn (kill -9
    mid-write): then, and only then, the journal is rewritten (atomically) without it.
    """
    done: set[Key] = set()
    if not path.is_file():
        return done
    data = path.read_bytes()
    for line in data.splitlines():
        key = _journal_key(line)
        if key is not None:
            done.add(key)
    if data and not data.endswith(b"\n"):
        whole, _, tail = data.rpartition(b"\n")
        if _journal_key(tail) is not None:  # the record is whole, only its newline is missing
            whole = data
        replace_file(path, (whole + b"\n").decode() if whole else "")
    return done


def _journal_key(line: bytes) -> Key | None:
    """The key a journal line records; None for a torn or foreign line (its file was
    not moved, so it is scored again)."""
    try:
        record = json.loads(line)
        return (record["file"], record["bytes"], record["modified_ns"])
    except (json.JSONDecodeError, KeyError, TypeError):
        return None


class _ClosedNames:
    """Names of the files that a writer closed since the last scan (thread-safe)."""

    def __init__(self) -> None:
        self._names: set[str] = set()
        self._lock = threading.Lock()

    def add(self, name: str) -> None:
        with self._lock:
            self._names.add(name)

    def take(self) -> set[str]:
        with self._lock:
            names, self._names = self._names, set()
        return names


def _start_observer(
    inbox: Path, wake: threading.Event, closed: _ClosedNames, poll: bool, reporter: Reporter
) -> Any:
    """A watchdog observer that sets ``wake`` on any change and records close-after-write
    events (inotify's IN_CLOSE_WRITE) in ``closed``; polling where inotify fails."""
    try:
        from watchdog.events import EVENT_TYPE_CLOSED, FileSystemEvent, FileSystemEventHandler
        from watchdog.observers import Observer
        from watchdog.observers.polling import PollingObserver
    except ImportError:
        raise missing_extra("cflowad watch", "watchdog", "stream") from None

    class Wake(FileSystemEventHandler):
        def on_any_event(self, event: FileSystemEvent) -> None:
            if event.event_type == EVENT_TYPE_CLOSED and not event.is_directory:
                closed.add(os.path.basename(os.fsdecode(event.src_path)))
            wake.set()

    kinds: list[Any] = [PollingObserver] if poll else [Observer, PollingObserver]
    for kind in kinds:
        observer = kind(timeout=0.5) if kind is PollingObserver else kind()
        try:
            observer.schedule(Wake(), str(inbox), recursive=False)
            observer.start()
        except OSError as error:
            reporter.warn(f"inotify unavailable ({error.strerror}); watching {inbox} by polling")
            continue
        return observer
    return None

"""Decisions and events to the line's systems: at least once, in order, never blocking scoring.

``serve``, ``watch``, ``stream`` and the studio hand every record to a
:class:`Publisher`. It keeps what ``--publish-what`` asks for, gives each message a
stable id (a hash of model, model version, origin, kind, the image or frame, and its
time: a message sent twice, or an image scored again after a crash, carries the same
id, so receivers drop duplicates), and appends it durably to one
:class:`cflowad.line.spool.Spool` per destination before the caller goes on. A thread
per destination sends from the spool in order and moves its cursor only once the
broker or receiver confirmed. A destination that is down or slow therefore never
holds up scoring: messages wait on disk (bounded by ``--spool-max-mb``) and drain in
order when it is back, after a restart of cflowad too.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cflowad.common.errors import reason
from cflowad.line.sinks import Destination, PublishSettings, open_destination
from cflowad.line.spool import Spool

__all__ = ["DRAIN_SECONDS", "SPOOL", "Publisher", "model_version"]

SPOOL = "spool"  # the spool's folder in the output of watch and stream

DRAIN_SECONDS = 10.0  # how long stopping waits for spools to empty; the rest waits on disk
_BATCH = 100  # messages per delivery attempt
_BACKOFF = (0.5, 30.0)  # first and longest wait between attempts, s


def model_version(model: Any) -> str:
    """A short fingerprint of a model's weights and thresholds: what a receiver needs to
    tell two revisions of one model apart (a recalibration is a new version)."""
    summary = json.dumps(model.describe(), sort_keys=True, default=str)
    return hashlib.sha256(summary.encode()).hexdigest()[:12]


@dataclass
class Counts:
    """One destination's messages since start."""

    spooled: int = 0  # appended to its spool
    published: int = 0  # confirmed by the broker or receiver
    retried: int = 0  # sent again after a failed attempt
    dropped: int = 0  # oldest dropped to keep the spool within --spool-max-mb
    refused: int = 0  # refused for good by a webhook (HTTP 400, 413, 415, 422)


class Publisher:
    """Every ``--publish`` destination of one process, each behind its own spool.

    Args:
        settings: the destinations and what to send.
        spool: the folder for the spools (one subfolder per destination).
        origin: ``serve``, ``watch``, ``stream`` or ``studio``: in every message.
        warn: where warnings go (a reporter's ``warn`` or a logger's).
    """

    def __init__(
        self, settings: PublishSettings, spool: Path, origin: str, warn: Callable[[str], None]
    ) -> None:
        self.settings, self.origin, self.spool = settings, origin, spool
        share = int(settings.spool_max_mb * 2**20 / max(1, len(settings.urls)))
        self.outlets = [
            _Outlet(open_destination(url, settings), Spool(spool / _slug(url), share), warn)
            for url in settings.urls
        ]
        for outlet in self.outlets:
            outlet.start()

    def wants(self, kind: str, anomalous: bool = False) -> bool:
        """Whether ``--publish-what`` sends a message of this kind."""
        if kind != "result":
            return True  # events, drift alarms and rejected files go with every choice
        return self.settings.what == "all" or (self.settings.what == "anomalous" and anomalous)

    def publish(
        self,
        kind: str,
        record: dict[str, Any],
        *,
        model: str,
        version: str,
        subject: str,
        at: str,
    ) -> None:
        """Spool one message for every destination (durably) if ``--publish-what`` wants it.

        ``subject`` and ``at`` name what was scored and when (the file and its
        modification time, the frame and the stream's start, the request and its
        arrival): with model, version, origin and kind they make the message's id.
        """
        if not self.outlets or not self.wants(kind, bool(record.get("anomalous"))):
            return
        identity = "\x1f".join((model, version, self.origin, kind, subject, at))
        envelope = {
            "id": hashlib.sha256(identity.encode()).hexdigest()[:32],
            "kind": kind,
            "origin": self.origin,
            "model": model,
            "model_version": version,
            "published_at": datetime.now(UTC).isoformat(timespec="milliseconds"),
        }
        message = envelope | {k: v for k, v in record.items() if k not in envelope}
        line = json.dumps(message, default=str).encode()
        for outlet in self.outlets:
            outlet.add(line)

    def stats(self) -> list[dict[str, Any]]:
        """Per destination: its counts and how many messages wait in its spool."""
        return [
            {"destination": o.destination.name, "pending": o.spool.pending, **vars(o.counts)}
            for o in self.outlets
        ]

    def close(self, wait: float = DRAIN_SECONDS) -> int:
        """Give the destinations up to ``wait`` s to take what is spooled, then stop; the
        messages still waiting (they go out when a process next uses this spool)."""
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and any(o.spool.pending for o in self.outlets):
            time.sleep(0.05)
        for outlet in self.outlets:
            outlet.stop()
        return sum(o.spool.pending for o in self.outlets)


class _Outlet:
    """One destination, its spool, and the thread that sends from it."""

    def __init__(self, destination: Destination, spool: Spool, warn: Callable[[str], None]) -> None:
        self.destination, self.spool, self.warn = destination, spool, warn
        self.counts = Counts()
        self._lock = threading.Lock()  # scoring threads add at once (serve)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._backoff, self._failing = _BACKOFF[0], False
        self._thread = threading.Thread(
            target=self._run, name=f"cflowad-publish-{_slug(destination.name)}", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def add(self, line: bytes) -> None:
        dropped = self.spool.append([line])
        with self._lock:
            self.counts.spooled += 1
            self.counts.dropped += dropped
        if dropped:
            self.warn(
                f"spool for {self.destination.name} is over --spool-max-mb: dropped the "
                f"{dropped} oldest messages ({self.counts.dropped} so far)"
            )
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(15)
        self.destination.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                pause = self._step()
            except Exception as error:  # a full disk, a bug: say so and go on, never die
                self.warn(f"publishing to {self.destination.name} failed: {reason(error)}")
                pause = _BACKOFF[1]
            if pause:
                self._stop.wait(pause)

    def _step(self) -> float:
        """One delivery attempt from the spool; how long to wait before the next."""
        batch = self.spool.peek(_BATCH)
        if not batch:
            self._wake.wait(1.0)
            self._wake.clear()
            return 0.0
        delivery = self.destination.deliver([line for line, _ in batch])
        if delivery.settled:
            self.spool.ack(batch[delivery.settled - 1][1], delivery.settled)
            self.counts.published += delivery.settled - delivery.refused
            self.counts.refused += delivery.refused
            if delivery.refused:
                self.warn(
                    f"{self.destination.name} refused {delivery.refused} messages "
                    "(HTTP 4xx: it will never take them); skipped"
                )
        if delivery.error is None:
            if self._failing:
                self.warn(f"delivering to {self.destination.name} again")
            self._backoff, self._failing = _BACKOFF[0], False
            return 0.0
        self.counts.retried += len(batch) - delivery.settled
        if not self._failing:
            self.warn(
                f"cannot deliver to {self.destination.name} ({delivery.error}); "
                f"{self.spool.pending} messages wait in {self.spool.folder}, retrying"
            )
        self._failing = True
        pause = delivery.retry_after or self._backoff * random.uniform(0.8, 1.2)
        self._backoff = min(self._backoff * 2, _BACKOFF[1])
        return min(pause, _BACKOFF[1])


def _slug(url: str) -> str:
    """A folder name for a destination: readable, and unique by a hash of its URL."""
    readable = re.sub(r"[^A-Za-z0-9.]+", "-", url.split("://", 1)[-1]).strip("-")[:48]
    return f"{readable}-{hashlib.sha256(url.encode()).hexdigest()[:8]}"

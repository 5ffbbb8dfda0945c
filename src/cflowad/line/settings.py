"""The settings of ``cflowad serve``, one source for the command's defaults and the server.

Kept apart from :mod:`cflowad.line.server` so that the command line can read the defaults
without importing FastAPI (an optional extra).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from cflowad.common.errors import UserError
from cflowad.line.drift import DriftSettings
from cflowad.line.sinks import PublishSettings

__all__ = ["ServeSettings"]


@dataclass(frozen=True)
class ServeSettings:
    """How the server batches, what it accepts, and who may call it.

    ``workers`` batches are scored at once, each on its share of the threads
    (:func:`cflowad.engine.threads.share_threads`): one batch on every thread answers a lone
    request soonest; two or more keep every core busy under load, since a batch on
    one thread never waits for a thread that the HTTP side has taken (docs/design.md).
    """

    max_batch: int = 8
    max_wait_ms: float = 5.0
    max_image_mb: float = 50.0
    workers: int = 1
    api_key: str | None = None
    device: str = "auto"
    follow_seconds: float = 2.0  # how often model files are checked for changes; 0: never
    drift: DriftSettings = field(default_factory=DriftSettings)  # window 0: no alarm
    publish: PublishSettings = field(default_factory=PublishSettings)
    spool: Path | None = None  # where --publish messages wait (needed with --publish)

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise UserError(f"option --max-batch={self.max_batch} must be at least 1")
        if self.max_wait_ms < 0:
            raise UserError(f"option --max-wait-ms={self.max_wait_ms} must be 0 or more")
        if self.max_image_mb <= 0:
            raise UserError(f"option --max-image-mb={self.max_image_mb} must be positive")
        if self.follow_seconds < 0:
            raise UserError(f"option --reload-every={self.follow_seconds} must be 0 or more")
        if self.workers < 1:
            raise UserError(f"option --workers={self.workers} must be at least 1")
        if self.publish.urls and self.spool is None:
            raise UserError(
                "option --publish needs --spool DIR: messages wait there while a broker or "
                "receiver is away, and survive a restart"
            )

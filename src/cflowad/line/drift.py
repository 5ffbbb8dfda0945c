"""Drift alarms: has the line's stream of good parts stopped looking like the held-out ones?

When the light, the camera or the material changes, a model quietly flags everything,
or nothing. The test: keep the raw scores of the last ``window`` images and place
their median among the model's held-out good raw scores (the images that set its
thresholds), as a rank q in [0, 1]. On a stable line q stays near 0.5. It tolerates
the real defects in the stream: they raise only the scores above the median, and with
a share d of defects the median of the good scores moves to their 0.5 / (1 - d)
quantile, 0.625 at d = 20 %, far from the alarm at ``high`` (0.95). A change of light
that moves every good image's score moves the median at once, after half a window.
The alarm trips when q leaves [``low``, ``high``] and clears when it is back within
[``low`` + ``margin``, ``high`` - ``margin``] (hysteresis: no flapping at the edge).

Models trained before 0.9 did not keep their held-out scores: they get no monitor.
"""

from __future__ import annotations

import bisect
import json
import os
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from cflowad.common.errors import UserError
from cflowad.engine.catalog import Calibration

__all__ = ["DRIFT_FILE", "DriftLog", "DriftMonitor", "DriftSettings"]

DRIFT_FILE = "drift.jsonl"


@dataclass(frozen=True)
class DriftSettings:
    """The window and the alarm's bounds (ranks of the window's median score)."""

    window: int = 100  # 0: no alarm
    low: float = 0.02
    high: float = 0.95
    margin: float = 0.1

    def __post_init__(self) -> None:
        if self.window != 0 and self.window < 10:
            raise UserError(f"option --drift-window={self.window}: 0 (off) or at least 10")
        if not 0 <= self.low < self.high <= 1:
            raise UserError("drift bounds need 0 <= low < high <= 1")


class DriftMonitor:
    """The rank of the recent median score among the held-out ones, and its alarm."""

    def __init__(self, holdout: Sequence[float], settings: DriftSettings | None = None) -> None:
        if not holdout:
            raise ValueError("no held-out scores to compare with")
        self.settings = settings or DriftSettings()
        self.reference = sorted(float(v) for v in holdout)
        self.recent: deque[float] = deque(maxlen=self.settings.window)
        self.tripped = False
        self.quantile: float | None = None

    @classmethod
    def for_model(
        cls, calibration: Calibration | None, settings: DriftSettings | None = None
    ) -> DriftMonitor | None:
        """A monitor for a model's calibration, or None when it kept no held-out scores."""
        held = calibration.holdout_raw_scores if calibration is not None else ()
        return cls(held, settings) if held else None

    def add(self, raw_score: float) -> dict[str, Any] | None:
        """Count one image; a ``drift`` record when the alarm trips or clears."""
        self.recent.append(float(raw_score))
        if len(self.recent) < self.settings.window:
            return None
        median = float(np.median(self.recent))
        below = bisect.bisect_left(self.reference, median)
        above = bisect.bisect_right(self.reference, median)
        self.quantile = (below + above) / 2 / len(self.reference)  # mid-rank: ties count half
        s = self.settings
        if not self.tripped and not s.low <= self.quantile <= s.high:
            self.tripped = True
            return self._record("tripped", median)
        if self.tripped and s.low + s.margin <= self.quantile <= s.high - s.margin:
            self.tripped = False
            return self._record("cleared", median)
        return None

    def _record(self, state: str, median: float) -> dict[str, Any]:
        direction = "higher" if (self.quantile or 0) > 0.5 else "lower"
        return {
            "event": "drift",
            "state": state,
            "quantile": round(self.quantile or 0.0, 4),
            "median_raw_score": round(median, 6),
            "window": len(self.recent),
            "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "message": (
                f"the last {len(self.recent)} images score {direction} than the held-out good "
                f"ones: their median is at the {self.quantile:.0%} rank of them"
                if state == "tripped"
                else f"the last {len(self.recent)} images score like the held-out good ones again"
            ),
        }


class DriftLog:
    """The alarm of a source: each trip and clear is a warning and, with an output folder
    (``watch``, ``stream``), a line in ``OUT/drift.jsonl`` (synced); the server, which
    has none, counts them in its metrics instead."""

    def __init__(self, out: Path | None, settings: DriftSettings, reporter: Any) -> None:
        self.path = None if out is None else out / DRIFT_FILE
        self.settings, self.reporter = settings, reporter
        self.monitor: DriftMonitor | None = None

    def reset(self, calibration: Calibration | None) -> None:
        """Compare with this calibration's held-out scores from now on (a new model)."""
        self.monitor = (
            DriftMonitor.for_model(calibration, self.settings) if self.settings.window else None
        )

    def observe(self, raw_score: float) -> dict[str, Any] | None:
        """Count one image; the ``drift`` record when the alarm trips or clears."""
        if self.monitor is None:
            return None
        event = self.monitor.add(raw_score)
        if event is None:
            return None
        if self.path is not None:
            with self.path.open("a") as handle:
                handle.write(json.dumps(event) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
        self.reporter.warn(f"drift {event['state']}: {event['message']}")
        return event

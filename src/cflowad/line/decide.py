"""What follows every score on the line, whatever produced the image (a hot folder, a
stream, the studio's live sources, a request to the server): the first N results
calibrate the source (no decision; the model is refitted on them, and the rest of their
batch is scored again with it), the drift alarm, and what is published. The sources
only produce images and write their own records.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from cflowad.common.progress import Reporter
from cflowad.engine.inference import ImageResult, Predictor
from cflowad.line.calibrate import SourceCalibration, calibrated_before
from cflowad.line.drift import DriftLog, DriftSettings
from cflowad.line.publish import Publisher, model_version

__all__ = ["Decisions"]


class Decisions:
    """The model a source decides with, and what happens after each of its scores.

    Args:
        model: the loaded model directory or export.
        out: the source's output folder (``OUT/model`` and ``OUT/calibration.json``
            after a calibration, ``OUT/drift.jsonl``); None for the server, which
            neither calibrates nor writes files.
        option: the calibrating option's name, for messages (``--calibrate-images``).
        calibrate: the first this many images are good: refit the thresholds on them.
        resume: decide with the calibration an earlier run saved in ``out`` (a hot
            folder restarted; a stream starts afresh).
        drift: the drift alarm's settings.
        reporter: progress lines and warnings.
        publisher: the ``--publish`` destinations, if any; ``model_name`` names the model.
    """

    def __init__(
        self,
        model: Predictor,
        out: Path | None,
        option: str = "",
        calibrate: int = 0,
        resume: bool = False,
        drift: DriftSettings | None = None,
        reporter: Reporter | None = None,
        publisher: Publisher | None = None,
        model_name: str = "model",
    ) -> None:
        reporter = reporter or Reporter(enabled=False)
        self.model = model
        self.calibration: SourceCalibration | None = None
        before = calibrated_before(model, out) if resume and out is not None else None
        if before is not None:  # calibrated before a restart: decide on with it
            self.model = before
        elif calibrate and out is not None:
            self.calibration = SourceCalibration(model, calibrate, out, option, reporter)
        self.drift = DriftLog(out, drift or DriftSettings(), reporter)
        self.drift.reset(getattr(self.model, "calibration", None))
        self.publisher, self.model_name = publisher, model_name

    def score(
        self, images: list[np.ndarray]
    ) -> Iterator[tuple[ImageResult, bool, dict[str, Any] | None]]:
        """Score a batch; for each image in order: its result, whether it calibrated
        (then it has no decision), and the drift alarm's record if it tripped or
        cleared on it."""
        results = list(self.model.predict_iter(images, batch_size=len(images)))
        for k in range(len(images)):
            result = results[k]
            if self.calibration is not None and not self.calibration.done:
                # a good image by the user's word: it calibrates, no decision yet
                calibrated = self.calibration.add(result)
                if calibrated is not None:  # the rest of the batch, decided anew
                    self.model = calibrated
                    self.drift.reset(getattr(calibrated, "calibration", None))
                    if images[k + 1 :]:
                        results[k + 1 :] = self.model.predict_iter(images[k + 1 :])
                yield result, True, None
                continue
            yield result, False, self.observe(result)

    def observe(self, result: ImageResult) -> dict[str, Any] | None:
        """Feed the drift alarm one decided result: its record if it tripped or cleared."""
        return self.drift.observe(result.raw_score)

    def publish(self, kind: str, record: dict[str, Any], subject: str, at: str) -> None:
        """Spool ``record`` for the ``--publish`` destinations (if any), under the model
        that decides now."""
        if self.publisher is None:
            return
        self.publisher.publish(
            kind,
            record,
            model=self.model_name,
            version=model_version(self.model),  # 30 us; a served revision may change
            subject=subject,
            at=at,
        )

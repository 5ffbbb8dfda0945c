"""Thresholds refitted on a source's first images, which the user states are good.

A camera's codec, light and optics differ from the lossless photos a model was trained
and calibrated on: good frames of an H.264 stream can score above a threshold set on a
dozen PNGs. ``stream --calibrate-frames N`` (and ``watch --calibrate-images N``) score
the first N images as they are, refit both thresholds on them at the model's
false-positive targets (:meth:`cflowad.engine.model.CFlowAD.calibrate_thresholds`,
the same order statistics as training), save the result as a new model revision in
``OUT/model`` with ``OUT/calibration.json``, and score the rest with it. The weights
and references are unchanged: only what counts as unusual for this source moves.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np

from cflowad.common.errors import UserError
from cflowad.common.progress import Reporter
from cflowad.data.files import replace_file
from cflowad.engine.inference import ImageResult, Predictor, map_sample
from cflowad.engine.loading import load
from cflowad.engine.model import CFlowAD

__all__ = ["SourceCalibration", "calibrated_before"]

MODEL_FOLDER = "model"
RECORD = "calibration.json"


def calibrated_before(model: Predictor, out: Path) -> Predictor | None:
    """The model a source refitted into ``out`` before a restart, on the device ``model``
    runs on (``--device``); None when it has not calibrated yet."""
    if not (out / RECORD).is_file():
        return None
    return load(out / MODEL_FOLDER, str(model.device) if isinstance(model, CFlowAD) else "cpu")


class SourceCalibration:
    """Collects the first ``count`` results, then gives the model recalibrated on them."""

    def __init__(
        self, model: Predictor, count: int, out: Path, option: str, reporter: Reporter
    ) -> None:
        if count < 2:
            raise UserError(f"option {option}={count}: at least 2 images are needed")
        if not isinstance(model, CFlowAD):
            raise UserError(
                f"option {option} needs a model directory (it writes a new one); calibrate "
                "the directory, then export OUT/model to ONNX"
            )
        self.model, self.count, self.out = model, count, out
        self.option, self.reporter = option, reporter
        self.raw_scores: list[float] = []
        self.map_values: list[np.ndarray] = []

    @property
    def done(self) -> bool:
        return len(self.raw_scores) >= self.count

    def add(self, result: ImageResult) -> Predictor | None:
        """Take one good image's result; after the last one, the recalibrated model."""
        self.raw_scores.append(result.raw_score)
        self.map_values.append(
            map_sample(result.anomaly_map, self.model.region_at(result.anomaly_map.shape))
        )
        if not self.done:
            return None
        return self._refit()

    def _refit(self) -> Predictor:
        before = self.model.fitted_calibration()
        self.model = copy.deepcopy(self.model)  # the caller's model stays as it was
        image, pixel = self.model.calibrate_thresholds(
            np.array(self.raw_scores),
            np.concatenate(self.map_values),
            f"{self.option} {self.count}",
        )
        target = self.out / MODEL_FOLDER
        self.model.save(target)
        record: dict[str, Any] = {
            "images": self.count,
            "option": self.option,
            "model": str(target),
            "image_threshold_raw": image.value,
            "image_threshold_raw_before": before.image_threshold_raw,
            "image_fpr": image.requested_fpr,
            "image_fpr_achievable": image.achievable_fpr,
            "pixel_threshold_raw": pixel.value,
            "pixel_threshold_raw_before": before.pixel_threshold_raw,
            "weights_sha256": self.model.weights_sha256,
        }
        replace_file(self.out / RECORD, json.dumps(record, indent=2))
        self.reporter.log(
            f"thresholds refitted on the first {self.count} images: image "
            f"{before.image_threshold_raw:.4f} -> {image.value:.4f} (raw), "
            f"false-positive rate {image.achievable_fpr:.2%} achievable; model in {target}"
        )
        if not image.enough_images:
            self.reporter.warn(
                f"{self.count} images cannot show a {image.requested_fpr:.2%} false-positive "
                f"rate; {image.images_needed()} are needed ({self.option})"
            )
        return self.model

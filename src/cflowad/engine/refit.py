"""Thresholds fitted again for an export that computes in reduced precision.

int8 (:mod:`cflowad.engine.quantize`) and bfloat16 (:mod:`cflowad.engine.bfloat16`)
move the raw scores a little. So the thresholds are fitted again on the exported
graph's own raw scores for the training's held-out images (the same seeded split as
training), and the promised false-positive rate holds for the file as shipped. The
same pass measures how far the export is from float: the maps' median Pearson
correlation and the raw scores' correlation.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import numpy as np

from cflowad.common.errors import UserError
from cflowad.data.images import ImageInput
from cflowad.engine.inference import ImageResult, Predictor, map_sample
from cflowad.engine.model import CFlowAD, training_items

__all__ = ["held_out", "refit_thresholds"]


def held_out(model: CFlowAD, data: Any, purpose: str) -> tuple[list[Any], list[Any]]:
    """The training and held-out images of ``data``, split as training split them."""
    train, held = model.split_holdout(training_items(data))
    if len(held) < 2:
        raise UserError(f"{data}: {purpose} needs held-out images to refit the thresholds")
    return train, held


def refit_thresholds(
    model: CFlowAD,
    exported: Predictor,
    held: Sequence[ImageInput],
    name: str,
    float_model: CFlowAD | None = None,
) -> tuple[CFlowAD, dict[str, Any]]:
    """A copy of ``model`` whose thresholds fit ``exported``'s scores on ``held``.

    ``exported`` is compared with ``float_model`` (``model`` itself by default; the
    int8 export's flows are trained again, so its float model is another).

    Returns the copy (its weights and references are the model's) and what the export
    changed: ``held_out_images``, ``map_correlation_median``, ``raw_score_correlation``,
    ``image_threshold_raw`` and ``pixel_threshold_raw`` (``float`` and ``name``) and
    ``image_fpr_achievable``.
    """
    float_model = float_model or model
    reference: list[ImageResult] = list(float_model.predict_iter(held, batch_size=8))
    results: list[ImageResult] = list(exported.predict_iter(held, batch_size=8))
    refitted = copy.deepcopy(model)
    raw = np.array([r.raw_score for r in results])
    pixels = [map_sample(r.anomaly_map, model.region_at(r.anomaly_map.shape)) for r in results]
    image, pixel = refitted.calibrate_thresholds(
        raw, np.concatenate(pixels), f"{name} export, held-out images"
    )
    maps = [
        float(np.corrcoef(a.anomaly_map.ravel(), b.anomaly_map.ravel())[0, 1])
        for a, b in zip(reference, results, strict=True)
        if a.anomaly_map.std() > 0 and b.anomaly_map.std() > 0
    ]
    before = float_model.fitted_calibration()
    raw_float = np.array([r.raw_score for r in reference])
    return refitted, {
        "held_out_images": len(held),
        "map_correlation_median": round(float(np.median(maps)), 4) if maps else float("nan"),
        "raw_score_correlation": round(float(np.corrcoef(raw_float, raw)[0, 1]), 4),
        "image_threshold_raw": {"float": before.image_threshold_raw, name: image.value},
        "pixel_threshold_raw": {"float": before.pixel_threshold_raw, name: pixel.value},
        "image_fpr_achievable": image.achievable_fpr,
    }

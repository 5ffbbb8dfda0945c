"""Scoring a test set and computing every metric the literature reports, per defect type too."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from cflowad.common.errors import UserError
from cflowad.common.progress import Reporter
from cflowad.data.datasets import TestSet, load_mask
from cflowad.engine.inference import Prediction, Predictor
from cflowad.results.metrics import aupro, f1_max, image_auroc, pixel_auroc

__all__ = ["HEADLINE_METRICS", "Evaluation", "evaluate"]

# The figures a comparison quotes from a `cflowad test` report (benchmarks, docs tables).
HEADLINE_METRICS = (
    "image_auroc",
    "pixel_auroc",
    "aupro",
    "false_positive_rate_at_threshold",
    "true_positive_rate_at_threshold",
)


@dataclass(frozen=True)
class Evaluation:
    """Metrics (JSON-ready), the predictions, and the maps and masks the metrics compared.

    ``maps`` and ``masks`` are at the metric resolution: each image's own size for
    ``"mask"``, the model's input size for ``"model"``.
    """

    metrics: dict[str, Any]
    prediction: Prediction
    maps: list[np.ndarray]
    masks: list[np.ndarray] | None


def evaluate(
    model: Predictor,
    test: TestSet,
    batch_size: int = 16,
    resolution: str = "mask",
    reporter: Reporter | None = None,
) -> Evaluation:
    """Predict every test image, then image AUROC, F1-max, pixel AUROC and AUPRO.

    ``resolution="mask"`` compares maps and masks at the ground truth's size, as
    MVTec AD's official evaluation does; ``"model"`` resizes both to the model input.
    """
    if resolution not in ("mask", "model"):
        raise UserError(f"option --metric-resolution={resolution!r} must be mask or model")
    reporter = reporter or Reporter(enabled=False)
    start = time.perf_counter()
    prediction = model.predict(test.images, batch_size=batch_size, reporter=reporter)
    seconds = time.perf_counter() - start
    masks = None
    if test.has_masks:
        masks = [
            np.zeros(m.shape, bool) if path is None else load_mask(path, m.shape)
            for m, path in zip(prediction.maps, test.masks, strict=True)
        ]
    maps = prediction.maps
    if masks is not None and resolution == "model":
        maps = [_resize(m, model.image_size, "bilinear") for m in maps]
        masks = [_resize(k.astype(np.float32), model.image_size, "nearest") > 0.5 for k in masks]
    labels = test.labels
    # raw scores: the readable scale is strictly increasing, but float32 could tie them
    scores = prediction.raw_scores
    metrics: dict[str, Any] = _metrics(scores, labels, maps, masks)
    flagged = prediction.anomalous
    metrics.update(
        {
            "n_images": len(labels),
            "n_defective": int(labels.sum()),
            "seconds": round(seconds, 3),
            "images_per_second": round(len(labels) / seconds, 2),
            "true_positive_rate_at_threshold": _rate(flagged, labels == 1),
            "false_positive_rate_at_threshold": _rate(flagged, labels == 0),
            "metric_resolution": resolution,
        }
    )
    types = np.asarray(test.defect_types)
    per_defect = {}
    for defect in sorted(set(test.defect_types) - {"good"}):
        keep = (types == "good") | (types == defect)
        index = np.flatnonzero(keep)
        subset_maps = [maps[i] for i in index]
        subset_masks = None if masks is None else [masks[i] for i in index]
        per_defect[defect] = {
            **_metrics(scores[keep], labels[keep], subset_maps, subset_masks),
            "n_images": int(keep.sum()),
            "n_defective": int((types == defect).sum()),
        }
    metrics["per_defect"] = per_defect
    return Evaluation(metrics, prediction, maps, masks)


def _metrics(
    scores: np.ndarray,
    labels: np.ndarray,
    maps: list[np.ndarray],
    masks: list[np.ndarray] | None,
) -> dict[str, Any]:
    if labels.all() or not labels.any():
        raise UserError("the test set needs both good and defective images")
    f1, f1_threshold = f1_max(scores, labels)
    result: dict[str, Any] = {
        "image_auroc": image_auroc(scores, labels),
        "image_f1_max": f1,
        "image_f1_threshold": f1_threshold,
        "pixel_auroc": None,
        "aupro": None,
    }
    if masks is not None and any(k.any() for k in masks):
        start = time.perf_counter()
        result["pixel_auroc"] = pixel_auroc(maps, masks)
        result["aupro"] = aupro(maps, masks)
        result["pixel_metrics_seconds"] = round(time.perf_counter() - start, 3)
    return result


def _rate(flagged: np.ndarray, subset: np.ndarray) -> float | None:
    return float(flagged[subset].mean()) if subset.any() else None


def _resize(array: np.ndarray, size: tuple[int, int], mode: str) -> np.ndarray:
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None]
    kwargs = {"align_corners": False} if mode == "bilinear" else {}
    return F.interpolate(tensor, size=size, mode=mode, **kwargs)[0, 0].numpy()

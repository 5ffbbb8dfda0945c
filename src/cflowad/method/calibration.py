"""Thresholds from held-out good images, and the readable 0-1 scale they sit on.

A threshold is an exact order statistic of the held-out scores. If n good scores
are exchangeable with a new good image's, the new one exceeds the (m+1)-th largest
with probability (m+1)/(n+1) (the conformal-prediction bound), so the threshold
keeps m = floor(fpr (n+1)) - 1 held-out scores above it. When n + 1 < 1/fpr no
order statistic reaches the target: the largest score is used, the achievable rate
1/(n+1) is recorded, and the caller warns.

Raw anomaly values are bounded in [0, 1]; the readable scale
(:func:`cflowad.method.scoring.readable`, inside the exported graph) maps raw 0 -> 0, the
threshold -> 0.5 and raw 1 -> 1, linearly in between.
It is strictly increasing (no ties, so every metric is the raw value's) and exactly
invertible, so the raw value can always be recovered.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np

__all__ = [
    "Calibration",
    "Threshold",
    "false_positive_rate",
    "order_statistic_threshold",
    "raw_from_readable",
]


@dataclass(frozen=True)
class Threshold:
    """An order-statistic threshold and the false-positive rate it actually achieves."""

    value: float
    requested_fpr: float
    achievable_fpr: float
    n: int

    @property
    def enough_images(self) -> bool:
        """Whether the held-out set was large enough for the requested rate."""
        return self.achievable_fpr <= self.requested_fpr + 1e-12

    def images_needed(self) -> int:
        """Held-out values needed for the requested rate: n + 1 >= 1 / fpr."""
        return max(1, math.ceil(1 / self.requested_fpr) - 1)


@dataclass(frozen=True)
class Calibration:
    """What a model's held-out good images fixed: each scale's reference, both thresholds
    (raw), the false-positive rates asked for and reached, and the held-out scores.

    One record for every runtime: ``model.json``'s ``calibration`` entry and an export's
    metadata are its :meth:`to_dict`. Frozen: a threshold moved later is a new record
    (:meth:`with_image_threshold`, :meth:`refitted`), never an edit in place.
    """

    reference: tuple[float, ...]
    image_threshold_raw: float
    pixel_threshold_raw: float
    image_fpr: float | None = None
    image_fpr_achievable: float | None = None
    pixel_fpr: float | None = None
    pixel_fpr_achievable: float | None = None
    n_images: int | None = None
    raw_score_median: float | None = None
    # every held-out score, so that a threshold moved later (cflowad studio) knows its
    # false-positive rate; empty in models before 0.9
    holdout_raw_scores: tuple[float, ...] = ()
    image_threshold_source: str | None = None  # what set the threshold, if not training

    @classmethod
    def fitted(
        cls,
        reference: list[float],
        image: Threshold,
        pixel: Threshold,
        raw_scores: np.ndarray,
        source: str | None = None,
    ) -> Calibration:
        """The record of thresholds fitted on held-out good images (scores ``raw_scores``)."""
        return cls(
            reference=tuple(float(v) for v in reference),
            image_threshold_raw=image.value,
            pixel_threshold_raw=pixel.value,
            image_fpr=image.requested_fpr,
            image_fpr_achievable=image.achievable_fpr,
            pixel_fpr=pixel.requested_fpr,
            pixel_fpr_achievable=pixel.achievable_fpr,
            n_images=image.n,
            raw_score_median=float(np.median(raw_scores)),
            holdout_raw_scores=tuple(round(float(v), 9) for v in np.ravel(raw_scores)),
            image_threshold_source=source,
        )

    @classmethod
    def from_dict(cls, entry: Mapping[str, Any]) -> Calibration:
        """Read ``model.json``'s entry (or an export's); a missing threshold or reference
        is a KeyError naming it, keys of other versions are ignored."""
        missing = [
            k for k in ("reference", "image_threshold_raw", "pixel_threshold_raw") if k not in entry
        ]
        if missing:
            raise KeyError(", ".join(missing))
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in entry.items() if k in known and v is not None}
        values["reference"] = tuple(float(v) for v in values["reference"])
        values["holdout_raw_scores"] = tuple(values.get("holdout_raw_scores") or ())
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """The JSON entry, keys in the order model files have always had them."""
        entry = {f.name: getattr(self, f.name) for f in fields(self)}
        entry["reference"] = list(self.reference)
        entry["holdout_raw_scores"] = list(self.holdout_raw_scores)
        if self.image_threshold_source is None:
            del entry["image_threshold_source"]
        return entry

    def with_image_threshold(self, raw: float, source: str) -> Calibration:
        """The image threshold moved by hand to ``raw``: its rate on the held-out scores
        (none without them), no requested rate."""
        held = self.holdout_raw_scores
        return replace(
            self,
            image_threshold_raw=float(raw),
            image_fpr=None,
            image_fpr_achievable=false_positive_rate(list(held), raw) if held else None,
            image_threshold_source=source,
        )

    def refitted(
        self, image: Threshold, pixel: Threshold, raw_scores: np.ndarray, source: str
    ) -> Calibration:
        """Both thresholds fitted again on other good images; the references stay."""
        return Calibration.fitted(list(self.reference), image, pixel, raw_scores, source)


def order_statistic_threshold(values: np.ndarray, fpr: float) -> Threshold:
    """The smallest order statistic of ``values`` whose expected false-positive rate <= fpr.

    Decisions are ``value > threshold``.

    Example:
        >>> t = order_statistic_threshold(np.arange(199.0), 0.01)
        >>> t.value, t.achievable_fpr, t.enough_images
        (197.0, 0.01, True)
        >>> order_statistic_threshold(np.arange(20.0), 0.01).achievable_fpr
        0.047619047619047616
    """
    flat = np.asarray(values, dtype=np.float64).ravel()
    n = flat.size
    if n == 0:
        raise ValueError("no held-out values to set a threshold on")
    above = max(0, math.floor(fpr * (n + 1) + 1e-9) - 1)
    above = min(above, n - 1)
    value = float(np.partition(flat, n - 1 - above)[n - 1 - above])
    return Threshold(value, fpr, (above + 1) / (n + 1), n)


def false_positive_rate(values: np.ndarray | list[float], threshold: float) -> float:
    """The conformal false-positive rate of ``value > threshold`` on held-out good values.

    ``(m + 1) / (n + 1)`` with m of the n values above: the rate that
    :func:`order_statistic_threshold` reports as achievable, for any threshold (the
    studio's slider).

    Example:
        >>> false_positive_rate(np.arange(199.0), 197.0)
        0.01
    """
    flat = np.asarray(values, dtype=np.float64).ravel()
    if flat.size == 0:
        raise ValueError("no held-out values")
    return (int((flat > threshold).sum()) + 1) / (flat.size + 1)


def raw_from_readable(value: np.ndarray | float, threshold: float) -> np.ndarray:
    """Inverse of :func:`cflowad.method.scoring.readable` (which runs inside the model).

    Example:
        >>> raw_from_readable(np.array([0.0, 0.5, 0.75, 1.0]), 0.25).tolist()
        [0.0, 0.25, 0.625, 1.0]
    """
    t = min(max(threshold, 1e-6), 1 - 1e-6)
    y = np.asarray(value, dtype=np.float64)
    return np.where(y <= 0.5, 2 * y * t, t + (2 * y - 1) * (1 - t))

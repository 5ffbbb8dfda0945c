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
from dataclasses import dataclass

import numpy as np

__all__ = [
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

"""Pictures a person looks at: heat-map overlays with outlines, ROC and PRO curves, histograms."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import numpy as np
from matplotlib import colormaps
from matplotlib import pyplot as plt
from PIL import Image
from scipy import ndimage
from sklearn.metrics import roc_curve

from cflowad.results.metrics import pro_curve

__all__ = ["blend", "jpeg", "overlay", "save_curves", "save_histogram", "save_overlay"]


def overlay(
    image: np.ndarray,
    anomaly_map: np.ndarray,
    predicted: np.ndarray | None = None,
    truth: np.ndarray | None = None,
) -> np.ndarray:
    """RGB uint8: the image beside its :func:`blend` (heat map and outlines)."""
    gap = np.full((image.shape[0], max(4, image.shape[1] // 50), 3), 255, np.uint8)
    plain = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
    return np.concatenate([plain, gap, blend(image, anomaly_map, predicted, truth)], axis=1)


def blend(
    image: np.ndarray,
    anomaly_map: np.ndarray,
    predicted: np.ndarray | None = None,
    truth: np.ndarray | None = None,
) -> np.ndarray:
    """RGB uint8 at the image's size (``image``: float in [0, 1] or uint8): heat map over
    the image, predicted outline white, true outline green.

    Maps are on the readable 0-1 scale with the pixel threshold at 0.5, so one colour
    scale fits every image and every model: blue is normal, green the threshold, red
    the most anomalous; a picture's colours never depend on the other images.
    """
    if image.dtype == np.uint8:  # an upload as decode_image gives it
        image = image / 255.0
    heat = colormaps["jet"](np.clip(anomaly_map, 0, 1))[..., :3]
    blended = 0.55 * image + 0.45 * heat
    for mask, colour in ((truth, (0.0, 1.0, 0.0)), (predicted, (1.0, 1.0, 1.0))):
        if mask is not None and mask.any():
            edge = mask & ~ndimage.binary_erosion(mask, iterations=max(1, image.shape[0] // 200))
            blended[edge] = colour
    return (blended * 255).round().astype(np.uint8)


def jpeg(image: np.ndarray, side: int, quality: int = 85) -> bytes:
    """A JPEG of ``image`` (RGB uint8, or float in [0, 1]) that fits in ``side`` x ``side``:
    what a browser is sent to look at (the studio's cards, samples and live frames)."""
    if image.dtype != np.uint8:
        image = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
    picture = Image.fromarray(image)
    picture.thumbnail((side, side), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def save_overlay(
    path: Path,
    image: np.ndarray,
    anomaly_map: np.ndarray,
    predicted: np.ndarray | None = None,
    truth: np.ndarray | None = None,
) -> None:
    """Write :func:`overlay` as a PNG."""
    Image.fromarray(overlay(image, anomaly_map, predicted, truth)).save(path)


def save_histogram(
    path: Path, scores: np.ndarray, labels: np.ndarray, threshold: float | None = None
) -> None:
    """Image scores of good vs defective images, with the calibrated threshold."""
    figure, axes = plt.subplots(figsize=(6, 3.5), dpi=100)
    bins = np.histogram_bin_edges(scores, bins=30).tolist()
    axes.hist(scores[labels == 0], bins=bins, alpha=0.6, label="good", color="tab:blue")
    if (labels == 1).any():
        axes.hist(scores[labels == 1], bins=bins, alpha=0.6, label="defective", color="tab:red")
    if threshold is not None:
        axes.axvline(threshold, color="black", linestyle="--", label="threshold")
    axes.set_xlabel("image anomaly score")
    axes.set_ylabel("images")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def save_curves(
    directory: Path,
    scores: np.ndarray,
    labels: np.ndarray,
    maps: Sequence[np.ndarray] | None,
    masks: Sequence[np.ndarray] | None,
    fpr_limit: float = 0.3,
) -> list[Path]:
    """Image ROC curve, and the PRO curve when masks exist; returns the files written."""
    written = []
    fpr, tpr, _ = roc_curve(labels, scores)
    figure, axes = plt.subplots(figsize=(4, 4), dpi=100)
    axes.plot(fpr, tpr)
    axes.plot([0, 1], [0, 1], color="grey", linestyle=":")
    axes.set(xlabel="false positive rate", ylabel="true positive rate", title="image ROC")
    figure.tight_layout()
    figure.savefig(directory / "roc_curve.png")
    plt.close(figure)
    written.append(directory / "roc_curve.png")
    if maps is not None and masks is not None:
        fpr, pro = pro_curve(maps, masks)
        figure, axes = plt.subplots(figsize=(4, 4), dpi=100)
        axes.plot(fpr, pro)
        axes.axvline(fpr_limit, color="grey", linestyle=":")
        axes.set(
            xlabel="false positive rate (pixels)", ylabel="per-region overlap", title="PRO curve"
        )
        figure.tight_layout()
        figure.savefig(directory / "pro_curve.png")
        plt.close(figure)
        written.append(directory / "pro_curve.png")
    return written

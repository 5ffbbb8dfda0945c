"""The one inference engine: images in, one result per image out, as they are scored.

:class:`CFlowAD` (PyTorch) and :class:`cflowad.engine.onnx.OnnxModel` (ONNX Runtime)
differ only in how a batch resized to the model's input becomes scores and maps;
everything around that (what counts as one image, decoding ahead in bounded
memory, resizing maps back to each image's size, thresholds) lives here, once.
This module may import data loading and progress, never the trainer or the encoder.

Scores and maps are on the readable scale of :mod:`cflowad.method.calibration`: 0 to 1,
with both calibrated thresholds at :data:`THRESHOLD` = 0.5.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from cflowad.common.errors import UserError
from cflowad.common.progress import Reporter
from cflowad.data.images import ImageInput, batches, list_images
from cflowad.method.calibration import Calibration
from cflowad.method.region import region_at

__all__ = [
    "THRESHOLD",
    "ImageResult",
    "InferenceEngine",
    "Prediction",
    "Predictor",
    "as_images",
    "describe",
    "map_sample",
]

THRESHOLD = 0.5
Images = str | Path | np.ndarray | Sequence[ImageInput]


@dataclass(frozen=True)
class ImageResult:
    """One scored image.

    Attributes:
        index: position in the input.
        image: the file's path, or ``"array <index>"``.
        score: image score on the readable scale (0 to 1; anomalous above 0.5).
        raw_score: the same before the readable scale (see :mod:`cflowad.method.scoring`).
        anomalous: ``score > 0.5``.
        anomaly_map: float32 (H, W) at the image's own size, readable scale.
        mask: boolean (H, W), ``anomaly_map > 0.5``.
    """

    index: int
    image: str
    score: float
    raw_score: float
    anomalous: bool
    anomaly_map: np.ndarray
    mask: np.ndarray

    def record(self, area: bool = False) -> dict[str, Any]:
        """The decision as every output writes it (predictions.jsonl, the server, hot
        folders, streams, archives, the studio): the score to 6 digits, the raw score
        and the decision; with ``area``, the share of the image over the pixel threshold.

        Example:
            >>> mask = np.array([[True, False, False, False]])
            >>> ImageResult(0, "a.png", 0.71234567, 0.6, True, mask * 1.0, mask).record(True)
            {'score': 0.712346, 'raw_score': 0.6, 'anomalous': True, 'anomalous_area': 0.25}
        """
        decided: dict[str, Any] = {
            "score": round(self.score, 6),
            "raw_score": self.raw_score,
            "anomalous": self.anomalous,
        }
        if area:
            decided["anomalous_area"] = round(float(self.mask.mean()), 6)
        return decided


@dataclass(frozen=True)
class Prediction:
    """Predictions for N images, in input order (what :meth:`InferenceEngine.predict` returns).

    Attributes:
        scores: (N,) image scores, readable scale (0 to 1; anomalous above 0.5).
        raw_scores: (N,) the same before the readable scale.
        anomalous: (N,) image decisions, ``scores > 0.5``.
        maps: N float32 anomaly maps, each at its image's original (H, W).
        masks: N boolean masks, ``map > 0.5``.
    """

    scores: np.ndarray
    raw_scores: np.ndarray
    anomalous: np.ndarray
    maps: list[np.ndarray]
    masks: list[np.ndarray]

    def __len__(self) -> int:
        return len(self.scores)

    @classmethod
    def collect(cls, results: Iterable[ImageResult]) -> Prediction:
        """Gather streamed results (keeps every map in memory)."""
        items = list(results)
        return cls(
            scores=np.array([r.score for r in items], np.float32),
            raw_scores=np.array([r.raw_score for r in items], np.float64),
            anomalous=np.array([r.anomalous for r in items], bool),
            maps=[r.anomaly_map for r in items],
            masks=[r.mask for r in items],
        )


class Predictor(Protocol):
    """What every model that scores images offers (a model directory or an ONNX file)."""

    @property
    def image_size(self) -> tuple[int, int]:
        """Model input (height, width)."""
        ...

    def predict(
        self, images: Images, batch_size: int = 16, reporter: Reporter | None = None
    ) -> Prediction: ...

    def predict_iter(
        self, images: Images, batch_size: int = 16, reporter: Reporter | None = None
    ) -> Iterator[ImageResult]: ...

    def describe(self) -> dict[str, Any]:
        """What a person needs to know about the model (see :func:`describe`)."""
        ...


class InferenceEngine:
    """Shared ``predict`` and ``predict_iter``; a subclass gives :meth:`score_batch`.

    Every result is a pure function of its image and the saved model: batch size and
    batch companions change nothing.
    """

    image_size: tuple[int, int]
    #: the inspection region at :attr:`image_size` (:mod:`cflowad.method.region`), or None
    region: np.ndarray | None = None

    def region_at(self, size: tuple[int, int]) -> np.ndarray | None:
        """The inspection region at an image's (height, width), None without one."""
        if self.region is None:
            return None
        cache: dict[tuple[int, int], np.ndarray] = self.__dict__.setdefault("_regions", {})
        if size not in cache:
            if len(cache) > 8:  # sizes seen on a line are few; a bound all the same
                cache.clear()
            cache[size] = region_at(self.region, size)
        return cache[size]

    def score_batch(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(B, 3, H, W) in [0, 1] at ``image_size`` -> scores (B,), maps (B, H, W), raw (B,)."""
        raise NotImplementedError

    def predict_iter(
        self, images: Images, batch_size: int = 16, reporter: Reporter | None = None
    ) -> Iterator[ImageResult]:
        """Yield one :class:`ImageResult` per image, in order, as soon as it is scored.

        Memory stays bounded however many images there are: decoding runs at most two
        batches ahead, and nothing is kept once yielded.
        """
        items = as_images(images)
        if batch_size < 1:
            raise UserError(f"option batch_size={batch_size} must be at least 1")
        reporter = reporter or Reporter(enabled=False)
        index = 0
        with reporter.task("scoring", len(items)) as task:
            for batch, sizes in batches(items, self.image_size, batch_size):
                scores, maps, raw = self.score_batch(batch)
                for score, anomaly_map, raw_score, size in zip(
                    scores.tolist(), maps, raw.tolist(), sizes, strict=True
                ):
                    resized = _resize(anomaly_map, size)
                    inside = self.region_at(size)
                    if inside is not None:  # the graph zeroed the outside at the input
                        # size; resizing blurs that edge by under an input pixel
                        resized = np.where(inside, resized, np.float32(0))
                    item = items[index]
                    yield ImageResult(
                        index=index,
                        image=f"array {index}" if isinstance(item, np.ndarray) else str(item),
                        score=score,
                        raw_score=raw_score,
                        anomalous=score > THRESHOLD,
                        anomaly_map=resized,
                        mask=resized > THRESHOLD,
                    )
                    index += 1
                task.advance(len(batch))

    def predict(
        self, images: Images, batch_size: int = 16, reporter: Reporter | None = None
    ) -> Prediction:
        """Score images: decisions, maps and masks at each image's original size.

        Args:
            images: one image (a file path or an (H, W[, C]) array), a folder (the
                images directly in it, not its subfolders), an (N, H, W, C) array, or
                a list of paths, folders and arrays.
            batch_size: images per forward pass; results do not depend on it.
            reporter: progress output.

        Returns:
            A :class:`Prediction` in input order (every map kept: for many images use
            :meth:`predict_iter`).
        """
        return Prediction.collect(self.predict_iter(images, batch_size, reporter))


def describe(
    backbone: str,
    decoder: str,
    image_size: tuple[int, int],
    calibration: Calibration,
    training: Mapping[str, Any],
    weights_sha256: str | None,
) -> dict[str, Any]:
    """A model's summary, the same for a model directory and its ONNX file.

    Thresholds are 0.5 on the readable scale in every model; the raw values and
    the held-out false-positive rates say what 0.5 means for this one.
    """
    return {
        "backbone": backbone,
        "decoder": decoder,
        "input_size": {"height": image_size[0], "width": image_size[1]},
        "image_threshold": THRESHOLD,
        "pixel_threshold": THRESHOLD,
        **{
            key: getattr(calibration, key)
            for key in (
                "image_threshold_raw",
                "pixel_threshold_raw",
                "image_fpr",
                "image_fpr_achievable",
                "pixel_fpr",
                "pixel_fpr_achievable",
            )
        },
        "weights_sha256": weights_sha256,
        "training": {k: v for k, v in training.items() if k != "loss_history"},
    }


def as_images(images: Images) -> list[ImageInput]:
    """The list of single images that ``images`` stands for; ambiguity is a UserError.

    Example:
        >>> len(as_images(np.zeros((32, 48, 3)))), len(as_images(np.zeros((5, 32, 48, 3))))
        (1, 5)
    """
    if isinstance(images, np.ndarray):
        if images.ndim in (2, 3):
            return [images]
        if images.ndim == 4:
            return list(images)
        raise UserError(
            f"an image array must be (H, W), (H, W, C) or (N, H, W, C); got {images.shape}"
        )
    if isinstance(images, (str, Path)):
        return _expand_path(Path(images))
    if isinstance(images, torch.Tensor):
        raise UserError("give images as NumPy arrays (H, W, C) or file paths, not tensors")
    items: list[ImageInput] = []
    for item in images:
        if isinstance(item, np.ndarray):
            if item.ndim not in (2, 3):
                raise UserError(
                    f"array {len(items)} in the list is {item.shape}: each must be one "
                    "image, (H, W) or (H, W, C)"
                )
            items.append(item)
        elif isinstance(item, (str, Path)):
            items.extend(_expand_path(Path(item)))
        else:
            raise UserError(f"cannot score a {type(item).__name__}: give paths or arrays")
    if not items:
        raise UserError("no images given")
    return items


def _expand_path(path: Path) -> list[ImageInput]:
    if path.is_dir():
        return list(list_images(path))
    if not path.exists():
        raise UserError(f"{path}: not found")
    return [path]


def _resize(anomaly_map: Tensor, size: tuple[int, int]) -> np.ndarray:
    if tuple(anomaly_map.shape) != tuple(size):
        anomaly_map = F.interpolate(
            anomaly_map[None, None], size=size, mode="bilinear", align_corners=False
        )[0, 0]
    return anomaly_map.numpy().astype(np.float32, copy=False)


def map_sample(
    anomaly_map: np.ndarray, inside: np.ndarray | None = None, size: int = 20_000
) -> np.ndarray:
    """About ``size`` evenly spaced pixels of one map (those ``inside`` the inspection
    region, if given): what refitting a pixel threshold on new images needs of each, in
    bounded memory."""
    flat = anomaly_map.ravel() if inside is None else anomaly_map[inside]
    return flat[:: max(1, flat.size // size)].astype(np.float32)

"""The façade: ``CFlowAD(...).fit(data)``, ``.predict(images)``, ``.save()``, ``.load()``.

A model is a directory: ``model.safetensors`` (encoder and decoder weights, so a model
directory runs on a machine without internet) and ``model.json`` (format version,
configuration, normalization constants, thresholds, training summary). Loading
never unpickles.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.nn import functional as F

from cflowad import __version__
from cflowad.config import Config
from cflowad.data import ImageInput, batches, find_training_images, median_aspect_ratio
from cflowad.errors import UserError
from cflowad.files import staged_directory
from cflowad.progress import Reporter
from cflowad.scoring import CFlowNet
from cflowad.train import encode, fit_decoders

__all__ = ["CFlowAD", "Prediction", "is_model_dir", "predict_batches"]

FORMAT = "cflowad-model"
FORMAT_VERSION = 2
WEIGHTS_FILE = "model.safetensors"
META_FILE = "model.json"


@dataclass(frozen=True)
class Prediction:
    """Predictions for N images, in input order.

    Attributes:
        scores: (N,) image anomaly scores (higher is more anomalous).
        anomalous: (N,) image decisions, ``scores > image_threshold``.
        maps: N float32 anomaly maps, each at its image's original (H, W).
        masks: N boolean masks, ``map > pixel_threshold``.
    """

    scores: np.ndarray
    anomalous: np.ndarray
    maps: list[np.ndarray]
    masks: list[np.ndarray]

    def __len__(self) -> int:
        return len(self.scores)


class CFlowAD:
    """CFLOW-AD with per-image calibrated scores.

    Args:
        config: a :class:`Config`; or give its fields as keyword arguments.

    Example:
        >>> model = CFlowAD(encoder_weights="random", image_size=64, steps=2, min_holdout=2)
        >>> rng = np.random.default_rng(0)
        >>> images = [rng.random((80, 60, 3), dtype=np.float32) for _ in range(6)]
        >>> prediction = model.fit(images).predict(images[:2])
        >>> prediction.maps[0].shape, prediction.anomalous.dtype
        ((80, 60), dtype('bool'))
    """

    def __init__(self, config: Config | None = None, **fields: Any) -> None:
        if config is not None and fields:
            raise TypeError("give either a Config or keyword fields, not both")
        self.config = config if config is not None else Config(**fields)
        self.net = CFlowNet.build(
            self.config, pretrained=self.config.encoder_weights == "pretrained"
        )
        self.net.eval()
        self.calibration: dict[str, Any] | None = None
        self.training: dict[str, Any] = {}

    def fit(
        self, data: str | Path | Sequence[ImageInput], reporter: Reporter | None = None
    ) -> CFlowAD:
        """Train on defect-free images and calibrate thresholds on held-out ones.

        ``data`` is an MVTec category (its ``train/good`` is used), a folder of
        images, or a list of paths or arrays. A seeded ``holdout_fraction`` of the
        images (at least ``min_holdout``) never trains the flows: it fits the
        score normalization and the image and pixel thresholds at the target
        false-positive rates. With ``calibrate_on_train`` all images train and
        calibrate (optimistic thresholds).
        """
        reporter = reporter or Reporter(enabled=False)
        items = _as_items(data)
        resolved = self.config.resolve_size(median_aspect_ratio(items))
        if resolved != self.config:
            reporter.log(
                f"input size {resolved.image_size[1]}x{resolved.image_size[0]} "
                "(width x height) keeps the training images' median aspect ratio"
            )
            self.config = resolved
            self.net = CFlowNet(resolved, self.net.encoder).eval()
        train_items, calibration_items = self._split(items)
        reporter.log(
            f"{len(train_items)} training images, {len(calibration_items)} for calibration"
            + (" (the same images)" if self.config.calibrate_on_train else "")
        )
        start = time.perf_counter()
        cache = encode(
            self.net, train_items, budget_mb=self.config.feature_cache_budget_mb, reporter=reporter
        )
        encode_seconds = time.perf_counter() - start
        summary = fit_decoders(self.net, cache, self.config, reporter)
        self.calibration = self._calibrate(calibration_items, reporter)
        self.training = {
            "n_train": len(train_items),
            "n_calibration": len(calibration_items),
            "encode_seconds": round(encode_seconds, 2),
            "feature_cache_mb": round(cache.nbytes / 2**20, 1),
            "feature_cache_on_disk": cache.on_disk,
            **summary,
            "total_seconds": round(time.perf_counter() - start, 2),
        }
        return self

    @torch.inference_mode()
    def predict(
        self,
        images: str | Path | Sequence[ImageInput],
        batch_size: int = 16,
        reporter: Reporter | None = None,
    ) -> Prediction:
        """Score images: decisions, maps and masks at each image's original size.

        A pure function of each image and the saved model: batch size and batch
        companions do not change any result.
        """
        calibration = self._require_fitted()
        return predict_batches(
            self.net,
            images,
            self.config.image_size,
            batch_size,
            (calibration["image_threshold"], calibration["pixel_threshold"]),
            reporter,
        )

    @property
    def image_size(self) -> tuple[int, int]:
        """Model input (height, width): every image is resized to it for scoring."""
        return self.config.image_size

    @property
    def image_threshold(self) -> float:
        """Image score above which an image is flagged anomalous."""
        return float(self._require_fitted()["image_threshold"])

    @property
    def pixel_threshold(self) -> float:
        """Map value above which a pixel is flagged anomalous."""
        return float(self._require_fitted()["pixel_threshold"])

    def save(self, directory: str | Path) -> Path:
        """Write the model directory atomically; replaces only an earlier cflowad model."""
        self._require_fitted()
        target = Path(directory)
        with staged_directory(target, is_model_dir, "--out") as staging:
            weights = staging / WEIGHTS_FILE
            save_file(
                {k: v.contiguous() for k, v in self.net.state_dict().items()},
                str(weights),
                metadata={"format": FORMAT},
            )
            meta = {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "cflowad_version": __version__,
                "weights_sha256": _sha256(weights),
                "config": self.config.to_dict(),
                "calibration": self.calibration,
                "training": self.training,
            }
            (staging / META_FILE).write_text(json.dumps(meta, indent=2))
        return target

    def export_onnx(self, path: str | Path) -> dict[str, Any]:
        """Write the scoring network with its thresholds as ONNX (see :mod:`cflowad.export`)."""
        from cflowad.export import export_onnx

        return export_onnx(self, Path(path))

    @classmethod
    def load(cls, directory: str | Path) -> CFlowAD:
        """Rebuild a saved model; errors name the file that is missing or broken."""
        root = Path(directory)
        meta_path, weights_path = root / META_FILE, root / WEIGHTS_FILE
        if not root.is_dir():
            raise UserError(f"{root}: model directory not found")
        for path in (meta_path, weights_path):
            if not path.is_file():
                raise UserError(f"{path}: missing (not a cflowad model directory?)")
        try:
            meta = json.loads(meta_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise UserError(f"{meta_path}: not valid JSON ({error})") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise UserError(f"{meta_path}: not a cflowad model file")
        if meta.get("format_version") != FORMAT_VERSION:
            raise UserError(
                f"{meta_path}: format version {meta.get('format_version')} is not "
                f"supported (this cflowad reads {FORMAT_VERSION})"
            )
        if _sha256(weights_path) != meta.get("weights_sha256"):
            raise UserError(f"{weights_path}: checksum mismatch (truncated or modified file)")
        try:
            config = Config.from_dict(meta["config"])
            state = load_file(str(weights_path))
        except (KeyError, TypeError) as error:
            raise UserError(f"{meta_path}: incomplete model description ({error})") from None
        except SafetensorError as error:
            raise UserError(f"{weights_path}: unreadable weights ({error})") from None
        model = cls.__new__(cls)
        model.config = config
        model.net = CFlowNet.build(config, pretrained=False)
        try:
            model.net.load_state_dict(state, strict=True)
        except RuntimeError as error:
            raise UserError(
                f"{weights_path}: weights do not match the model ({str(error).splitlines()[0]})"
            ) from None
        model.net.eval()
        model.net.refresh_conditions()
        model.calibration = meta["calibration"]
        model.training = meta.get("training", {})
        return model

    def _split(self, items: list[ImageInput]) -> tuple[list[ImageInput], list[ImageInput]]:
        config = self.config
        if config.calibrate_on_train:
            if len(items) < 2:
                raise UserError("need at least 2 training images")
            return items, items
        holdout = max(config.min_holdout, round(config.holdout_fraction * len(items)))
        if len(items) < holdout + 2:
            raise UserError(
                f"need at least {holdout + 2} training images ({holdout} are held out to "
                f"calibrate thresholds), got {len(items)}; or use --calibrate-on-train"
            )
        order = torch.randperm(len(items), generator=torch.Generator().manual_seed(config.seed))
        held = set(order[:holdout].tolist())
        return (
            [x for i, x in enumerate(items) if i not in held],
            [x for i, x in enumerate(items) if i in held],
        )

    @torch.inference_mode()
    def _calibrate(self, items: list[ImageInput], reporter: Reporter) -> dict[str, Any]:
        """Fit per-scale normalization, then thresholds, on defect-free images."""
        per_batch: list[list[torch.Tensor]] = []
        with reporter.task("calibrating", len(items)) as task:
            for batch, _ in batches(items, self.config.image_size, 16):
                per_batch.append(self.net.log_likelihoods(batch))
                task.advance(len(batch))
        nll = [
            -torch.cat([b[k].flatten() for b in per_batch]).double()
            for k in range(len(self.net.decoders))
        ]
        medians = torch.stack([v.median() for v in nll])
        deviations = torch.stack(
            [(v - m).abs().median() for v, m in zip(nll, medians, strict=True)]
        )
        self.net.nll_median.copy_(medians)
        self.net.nll_scale.copy_((1.4826 * deviations).clamp_min(1e-6))
        maps = [self.net.anomaly_map(log_likelihoods) for log_likelihoods in per_batch]
        scores = [self.net.image_score(m) for m in maps]
        pixels = [m.flatten() for m in maps]
        all_scores = torch.cat(scores).double()
        all_pixels = torch.cat(pixels).double().numpy()
        return {
            "nll_median": self.net.nll_median.tolist(),
            "nll_scale": self.net.nll_scale.tolist(),
            "image_threshold": float(torch.quantile(all_scores, 1 - self.config.image_fpr)),
            "pixel_threshold": float(np.quantile(all_pixels, 1 - self.config.pixel_fpr)),
            "image_fpr": self.config.image_fpr,
            "pixel_fpr": self.config.pixel_fpr,
            "n_images": len(items),
            "score_median": float(all_scores.median()),
        }

    def _require_fitted(self) -> dict[str, Any]:
        if self.calibration is None:
            raise UserError("the model is not fitted: call fit() or CFlowAD.load() first")
        return self.calibration

    def __repr__(self) -> str:
        fields = ", ".join(
            f"{f.name}={getattr(self.config, f.name)!r}"
            for f in dataclasses.fields(self.config)
            if getattr(self.config, f.name) != f.default
        )
        return f"CFlowAD({fields})"


def predict_batches(
    score: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    images: str | Path | Sequence[ImageInput],
    image_size: tuple[int, int],
    batch_size: int,
    thresholds: tuple[float, float],
    reporter: Reporter | None = None,
) -> Prediction:
    """Score images (a folder, or a list of paths or arrays) with ``score`` in batches.

    ``score`` maps a batch resized to ``image_size`` to scores and maps; maps go
    back to each image's own size before the pixel threshold applies, so every
    runtime behind ``score`` (PyTorch, ONNX Runtime) gives the same Prediction.
    """
    items = _as_items(images) if isinstance(images, (str, Path)) else list(images)
    if batch_size < 1:
        raise UserError(f"option batch_size={batch_size} must be at least 1")
    reporter = reporter or Reporter(enabled=False)
    image_threshold, pixel_threshold = thresholds
    scores, maps = [], []
    with reporter.task("scoring", len(items)) as task:
        for batch, sizes in batches(items, image_size, batch_size):
            batch_scores, batch_maps = score(batch)
            scores.append(batch_scores.numpy())
            maps.extend(_resize(m, size) for m, size in zip(batch_maps, sizes, strict=True))
            task.advance(len(batch))
    score_array = np.concatenate(scores) if scores else np.zeros(0, np.float32)
    return Prediction(
        scores=score_array,
        anomalous=score_array > image_threshold,
        maps=maps,
        masks=[m > pixel_threshold for m in maps],
    )


def _as_items(data: str | Path | Sequence[ImageInput]) -> list[ImageInput]:
    if isinstance(data, (str, Path)):
        return list(find_training_images(Path(data)))
    items = list(data)
    if not items:
        raise UserError("no images given")
    return items


def _resize(anomaly_map: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    if tuple(anomaly_map.shape) != tuple(size):
        anomaly_map = F.interpolate(
            anomaly_map[None, None], size=size, mode="bilinear", align_corners=False
        )[0, 0]
    return anomaly_map.numpy().astype(np.float32, copy=False)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def is_model_dir(path: Path) -> bool:
    """Whether ``path`` holds a cflowad model and nothing else (so saving may replace it)."""
    return path.is_dir() and {p.name for p in path.iterdir()} <= {WEIGHTS_FILE, META_FILE}

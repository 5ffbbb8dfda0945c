"""The façade: ``CFlowAD(...).fit(data)``, ``.predict(images)``, ``.save()``, ``.load()``.

A model is a directory: ``model.safetensors`` (encoder and decoder weights, so a model
directory runs on a machine without internet) and ``model.json`` (format version,
configuration, scale references, thresholds, training summary). Loading never
unpickles. Scoring is :class:`cflowad.engine.inference.InferenceEngine`'s, shared with the
ONNX runtime; this module adds fitting, calibration and the file format.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from cflowad.common.errors import UserError
from cflowad.common.progress import Reporter
from cflowad.common.version import __version__
from cflowad.data.datasets import find_training_images
from cflowad.data.files import staged_directory
from cflowad.data.images import ImageInput, batches, image_sizes
from cflowad.engine.catalog import (
    FORMAT,
    FORMAT_VERSION,
    META_FILE,
    REGION_FORMAT_VERSION,
    WEIGHTS_FILE,
    file_sha256,
    read_meta,
)
from cflowad.engine.device import resolve_device
from cflowad.engine.export import export_onnx, export_openvino
from cflowad.engine.inference import InferenceEngine, describe
from cflowad.method.calibration import (
    Calibration,
    Threshold,
    order_statistic_threshold,
    raw_from_readable,
)
from cflowad.method.config import Config
from cflowad.method.region import decode_region, encode_region, read_region, region_at
from cflowad.method.scoring import CFlowNet
from cflowad.method.train import encode, fit_decoders, fit_gaussians, training_features

__all__ = ["CFlowAD", "is_model_dir", "training_items"]

_Item = TypeVar("_Item")  # what split_holdout splits: images, or their indices


class CFlowAD(InferenceEngine):
    """CFLOW-AD with per-image calibrated scores.

    Args:
        config: a :class:`Config`; or give its fields as keyword arguments.
        device: ``"auto"`` (CUDA when present), ``"cpu"`` or ``"cuda[:N]"``.

    Example:
        >>> model = CFlowAD(encoder_weights="random", image_size=64, steps=2, min_holdout=2,
        ...                 compile_training=False, device="cpu")
        >>> rng = np.random.default_rng(0)
        >>> images = [rng.random((80, 60, 3), dtype=np.float32) for _ in range(6)]
        >>> prediction = model.fit(images).predict(images[:2])
        >>> prediction.maps[0].shape, prediction.anomalous.dtype
        ((80, 60), dtype('bool'))
    """

    def __init__(
        self, config: Config | None = None, device: str | torch.device = "auto", **fields: Any
    ) -> None:
        if config is not None and fields:
            raise TypeError("give either a Config or keyword fields, not both")
        self.config = config if config is not None else Config(**fields)
        self.device = resolve_device(device)
        self.net = CFlowNet.build(
            self.config, pretrained=self.config.encoder_weights == "pretrained"
        )
        self.net.eval().to(self.device)
        self.calibration: Calibration | None = None
        self.region: np.ndarray | None = None
        self.training: dict[str, Any] = {}
        self.weights_sha256: str | None = None  # of the saved weights file, once saved or loaded

    def fit(
        self,
        data: str | Path | Sequence[ImageInput],
        reporter: Reporter | None = None,
        region: str | Path | np.ndarray | None = None,
    ) -> CFlowAD:
        """Train on defect-free images and calibrate thresholds on held-out ones.

        A seeded ``holdout_fraction`` of the images (at least ``min_holdout``) never
        trains the flows: it fits each scale's reference and the image and pixel
        thresholds at the target false-positive rates (a warning says when it is too
        small for them). With ``calibrate_on_train`` all images train and calibrate
        (optimistic thresholds).

        Args:
            data: an MVTec category (its ``train/good`` is used), a folder of images,
                or a list of paths or (H, W[, C]) arrays.
            reporter: progress output.
            region: inspect only here (:mod:`cflowad.method.region`): ``"x,y,w,h"`` in
                pixels of the training images, a mask image of their shape (white:
                inspect) or a boolean array. Maps are zero outside it, and the score
                and thresholds do not see there.

        Returns:
            This model, fitted (so that ``CFlowAD().fit(data).predict(...)`` reads).
        """
        items = training_items(data)
        train_items, calibration_items = self.split_holdout(items)
        return self.fit_split(train_items, calibration_items, reporter, region)

    def fit_split(
        self,
        train_items: Sequence[ImageInput],
        calibration_items: Sequence[ImageInput],
        reporter: Reporter | None = None,
        region: str | Path | np.ndarray | None = None,
        sizes: Sequence[tuple[int, int]] | None = None,
    ) -> CFlowAD:
        """:meth:`fit` on a split already made: train the decoders on ``train_items``,
        calibrate on ``calibration_items`` (``train --tune`` keeps some held-out images
        back for its validation). ``sizes``: the (height, width) of both lists' images in
        that order, if known (``--tune`` reads the headers once for all its candidates)."""
        reporter = reporter or Reporter(enabled=False)
        if sizes is None:
            sizes = image_sizes([*train_items, *calibration_items])
        resolved = self.config.fit_to(sizes)
        if resolved != self.config:
            reporter.log(
                f"input size {resolved.image_size[1]}x{resolved.image_size[0]} "
                "(width x height): "
                + (
                    "the training images' own size"
                    if self.config.aspect == "native"
                    else "keeps the training images' median aspect ratio"
                )
            )
            self.config = resolved
            self.net = CFlowNet(resolved, self.net.encoder).eval().to(self.device)
        if region is not None:  # read before any training, so that a mistake costs nothing
            mask = read_region(region, sizes)
            self.region = region_at(mask, self.config.image_size)
            reporter.log(f"inspecting {self.region.mean():.1%} of the image (--region)")
        else:
            self.region = None
        self.net.set_region(self.region)
        return self.train_decoders(train_items, calibration_items, reporter)

    def train_decoders(
        self,
        train_items: Sequence[ImageInput],
        calibration_items: Sequence[ImageInput],
        reporter: Reporter | None = None,
    ) -> CFlowAD:
        """Train the decoders on what ``self.net``'s encoder makes of ``train_items`` and
        calibrate on ``calibration_items``, size and region as they are (:meth:`fit_split`
        sets them). ``export --int8`` calls it with the int8 encoder in place."""
        reporter = reporter or Reporter(enabled=False)
        reporter.log(
            f"{len(train_items)} training images, {len(calibration_items)} for calibration"
            + (" (the same images)" if self.config.calibrate_on_train else "")
        )
        start = time.perf_counter()
        cache = encode(
            self.net,
            train_items,
            budget_mb=self.config.feature_cache_budget_mb,
            reporter=reporter,
            cache_dir=self.config.feature_cache_dir,
        )
        encode_seconds = time.perf_counter() - start
        if self.config.decoder == "gaussian":
            summary = fit_gaussians(self.net, cache, reporter)
        else:
            summary = fit_decoders(self.net, cache, self.config, reporter)
        self.calibration = self.calibrate(calibration_items, reporter)
        self.training = {
            "n_train": len(train_items),
            "n_calibration": len(calibration_items),
            "encode_seconds": round(encode_seconds, 2),
            "feature_cache_mb": round(cache.nbytes / 2**20, 1),
            "feature_cache_on_disk": cache.on_disk,
            **summary,
            "total_seconds": round(time.perf_counter() - start, 2),
        }
        if self.region is not None:
            self.training["region_inside"] = round(float(self.region.mean()), 4)
        return self

    @property
    def image_size(self) -> tuple[int, int]:  # type: ignore[override]
        """Model input (height, width): every image is resized to it for scoring."""
        return self.config.image_size

    @torch.inference_mode()
    def score_batch(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(B, 3, H, W) at :attr:`image_size` -> readable scores, readable maps, raw scores."""
        self.fitted_calibration()
        scores, maps, raw = self.net(images.to(self.device))
        return scores.cpu(), maps.cpu(), raw.cpu()

    def save(self, directory: str | Path) -> Path:
        """Write the model directory atomically; replaces only an earlier cflowad model.

        Args:
            directory: the folder to write; missing, empty, or a cflowad model.

        Returns:
            ``directory`` as a Path.
        """
        self.fitted_calibration()
        target = Path(directory)
        with staged_directory(target, is_model_dir, "--out") as staging:
            weights = staging / WEIGHTS_FILE
            save_file(
                {k: v.contiguous() for k, v in self.net.state_dict().items()},
                str(weights),
                metadata={"format": FORMAT},
            )
            self.weights_sha256 = file_sha256(weights)
            meta = {
                "format": FORMAT,
                "format_version": FORMAT_VERSION if self.region is None else REGION_FORMAT_VERSION,
                "cflowad_version": __version__,
                "weights_sha256": self.weights_sha256,
                "config": self.config.to_dict(),
                "calibration": self.fitted_calibration().to_dict(),
                "training": self.training,
            }
            if self.region is not None:
                meta["region"] = encode_region(self.region)
            (staging / META_FILE).write_text(json.dumps(meta, indent=2))
        return target

    def export_onnx(self, path: str | Path) -> dict[str, Any]:
        """Write the scoring network with its thresholds as ONNX (see :mod:`cflowad.engine.export`).

        Args:
            path: the ``.onnx`` file; an existing file is replaced only if cflowad wrote it.

        Returns:
            What was written and checked: ``onnx``, ``megabytes``, ``seconds`` and
            ``max_relative_difference`` from PyTorch in ONNX Runtime (None without it).
        """
        calibration = self.fitted_calibration()
        try:
            return export_onnx(
                self.net.to("cpu"),
                self.config,
                calibration,
                self.training,
                self.weights_sha256,
                Path(path),
            )
        finally:
            self.net.to(self.device)

    def export_openvino(
        self,
        folder: str | Path,
        onnx_file: str | Path | None = None,
        precision: str = "f32",
        quantize: Callable[[Any], Any] | None = None,
    ) -> dict[str, Any]:
        """Write the scoring network as an OpenVINO IR folder (:func:`export_openvino`),
        or convert ``onnx_file``, this model's export with its metadata; ``quantize``
        makes it int8 (:mod:`cflowad.engine.quantize`); ``precision`` bf16 marks it to
        run in bfloat16 (:mod:`cflowad.engine.bfloat16`).

        Returns:
            ``openvino``, ``megabytes``, ``seconds`` and ``max_relative_difference``
            from PyTorch in OpenVINO (None when converting ``onnx_file``).
        """
        calibration = self.fitted_calibration()
        try:
            return export_openvino(
                self.net.to("cpu"),
                self.config,
                calibration,
                self.training,
                self.weights_sha256,
                Path(folder),
                None if onnx_file is None else Path(onnx_file),
                precision,
                quantize,
            )
        finally:
            self.net.to(self.device)

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "auto") -> CFlowAD:
        """Rebuild a saved model; errors name the file that is missing or broken.

        Args:
            directory: a model directory from :meth:`save` or ``cflowad train``.
            device: ``"auto"`` (CUDA when present), ``"cpu"`` or ``"cuda[:N]"``.

        Returns:
            The fitted model, scoring exactly as when it was saved.
        """
        root = Path(directory)
        meta_path, weights_path = root / META_FILE, root / WEIGHTS_FILE
        meta = read_meta(root)
        try:
            # models written before 0.6 trained every scale on equal fiber batches
            config = Config.from_dict({"finest_batch_factor": 1, **meta["config"]})
            calibration = Calibration.from_dict(meta["calibration"])
            state = load_file(str(weights_path))
            region = decode_region(meta["region"]) if "region" in meta else None
            if region is not None and region.shape != config.image_size:
                raise TypeError(f"region {region.shape} is not the input size")
        except (KeyError, TypeError, ValueError) as error:
            raise UserError(f"{meta_path}: incomplete model description ({error})") from None
        except SafetensorError as error:
            raise UserError(f"{weights_path}: unreadable weights ({error})") from None
        model = cls.__new__(cls)
        model.config = config
        model.device = resolve_device(device)
        model.net = CFlowNet.build(config, pretrained=False)
        try:
            model.net.load_state_dict(state, strict=True)
        except RuntimeError as error:
            raise UserError(
                f"{weights_path}: weights do not match the model ({str(error).splitlines()[0]})"
            ) from None
        _check_thresholds(model.net, calibration, meta_path)
        model.net.eval().to(model.device)
        model.net.refresh_conditions()
        model.region = region
        model.net.set_region(region)
        model.calibration = calibration
        model.training = meta.get("training", {})
        model.weights_sha256 = meta["weights_sha256"]
        return model

    def set_image_threshold(self, raw: float, source: str = "set by hand") -> None:
        """Move the image threshold to ``raw`` (the readable scale follows: it is 0.5 again).

        The achievable false-positive rate is recomputed on the held-out scores when the
        model has them (models from 0.9 on); save the model to keep the change.
        """
        calibration = self.fitted_calibration()
        if not 0 < raw < 1:
            raise UserError(f"image threshold {raw}: a raw score strictly between 0 and 1")
        self.net.image_threshold.fill_(raw)
        self.calibration = calibration.with_image_threshold(raw, source)

    def calibrate_thresholds(
        self, raw_scores: np.ndarray, map_values: np.ndarray, source: str
    ) -> tuple[Threshold, Threshold]:
        """Refit both thresholds on new good images (a camera's first frames), at the
        model's false-positive targets; the references and weights stay as trained.

        Args:
            raw_scores: the images' raw scores.
            map_values: values of their readable maps (any sample of the pixels), as
                ``predict`` gives them.
            source: what set the thresholds, recorded in the calibration.

        Returns the image and pixel thresholds (with the rates they can achieve).
        """
        calibration = self.fitted_calibration()
        raw_pixels = raw_from_readable(map_values, calibration.pixel_threshold_raw)
        image = order_statistic_threshold(raw_scores, self.config.image_fpr)
        pixel = order_statistic_threshold(raw_pixels, self.config.pixel_fpr)
        self.net.image_threshold.fill_(image.value)
        self.net.pixel_threshold.fill_(pixel.value)
        self.calibration = calibration.refitted(image, pixel, raw_scores, source)
        return image, pixel

    def describe(self) -> dict[str, Any]:
        """Backbone, decoder, input size, thresholds, weights checksum, training summary."""
        return describe(
            self.config.backbone,
            self.config.decoder,
            self.image_size,
            self.fitted_calibration(),
            self.training,
            self.weights_sha256,
        )

    def split_holdout(self, items: list[_Item]) -> tuple[list[_Item], list[_Item]]:
        """The training images and the held-out ones, as :meth:`fit` splits them (seeded:
        the same list gives the same split, so an int8 export refits on the same images).
        Only the count matters: indices split as their images would."""
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
    def calibrate(self, items: Sequence[ImageInput], reporter: Reporter) -> Calibration:
        """Fit the scales' references, then both thresholds, on defect-free images.

        The reference of each scale is a high quantile of its held-out log-likelihoods
        per dimension (:meth:`CFlowNet.fit_reference`); the thresholds are order statistics of the
        held-out raw scores and map values (:mod:`cflowad.method.calibration`).
        """
        per_batch: list[list[Tensor]] = []
        with reporter.task("calibrating", len(items)) as task:
            for batch, _ in batches(items, self.config.image_size, 16):
                features = training_features(self.net, batch.to(self.device))
                per_batch.append(
                    [self.net.scale_log_likelihood(k, f) for k, f in enumerate(features)]
                )
                task.advance(len(batch))
        scales = range(len(self.net.decoders))
        good = [torch.cat([b[k] for b in per_batch]) for k in scales]
        cells = [self.net.region_cells(k) for k in scales]
        self.net.fit_reference(
            [g if c is None else g[:, c] for g, c in zip(good, cells, strict=True)]
        )
        raw_maps = [self.net.raw_map(log_likelihoods).cpu() for log_likelihoods in per_batch]
        raw_scores = torch.cat([self.net.raw_score(m) for m in raw_maps]).double().numpy()
        inside = None if self.region is None else torch.from_numpy(self.region)
        inside_values = [m.flatten(1) if inside is None else m[:, inside] for m in raw_maps]
        pixels = torch.cat(inside_values).flatten().double().numpy()
        image = order_statistic_threshold(raw_scores, self.config.image_fpr)
        pixel = order_statistic_threshold(pixels, self.config.pixel_fpr)
        if not image.enough_images:
            reporter.warn(
                f"{image.n} held-out images cannot show a {self.config.image_fpr:.2%} "
                f"false-positive rate: the image threshold is their highest score, which "
                f"achieves about {image.achievable_fpr:.2%}; {image.images_needed()} "
                "held-out images are needed (more training images, --holdout-fraction, "
                "or a larger --image-fpr)"
            )
        self.net.image_threshold.fill_(image.value)
        self.net.pixel_threshold.fill_(pixel.value)
        return Calibration.fitted(self.net.reference.tolist(), image, pixel, raw_scores)

    def fitted_calibration(self) -> Calibration:
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


def training_items(data: str | Path | Sequence[ImageInput]) -> list[ImageInput]:
    """The training images ``fit`` takes from ``data`` (a folder, an MVTec category, a list)."""
    if isinstance(data, (str, Path)):
        return list(find_training_images(Path(data)))
    items = list(data)
    if not items:
        raise UserError("no images given")
    return items


def _check_thresholds(net: CFlowNet, calibration: Calibration, meta_path: Path) -> None:
    """The weights file holds the thresholds and references as buffers, model.json as
    numbers: one model, so a load refuses copies that disagree (an edited file)."""
    for name, value in (
        ("image_threshold", calibration.image_threshold_raw),
        ("pixel_threshold", calibration.pixel_threshold_raw),
        ("reference", calibration.reference),
    ):
        buffer = getattr(net, name)
        expected = torch.tensor(value, dtype=buffer.dtype).reshape(buffer.shape)
        if not torch.equal(buffer.cpu(), expected):
            raise UserError(
                f"{meta_path}: calibration.{name}{'_raw' if name != 'reference' else ''} "
                "disagrees with the weights file (edited by hand?); save thresholds with "
                "the studio or CFlowAD.set_image_threshold"
            )


def is_model_dir(path: Path) -> bool:
    """Whether ``path`` holds a cflowad model and nothing else (so saving may replace it)."""
    return path.is_dir() and {p.name for p in path.iterdir()} <= {WEIGHTS_FILE, META_FILE}

"""int8: the encoder's convolutions quantized after training, on the model's own images.

ONNX Runtime's static quantization (QDQ, int8 weights per channel, uint8 activations
calibrated on training images) is applied to the encoder only: its convolutions are
most of the work of a lone image, and EfficientNet-Lite was designed for int8 (ReLU6,
no squeeze-excitation). The flows stay float: their coupling scales pass through
exp, and a log-likelihood summed over hundreds of dimensions magnifies every
rounding step (ONNX Runtime's dynamic int8 over the whole graph gave maps correlated
0.77 with float).

The flows learned a sharp density around the float features, and int8 moves the
features (a relative error of 0.2-0.3 on magnetic_tile). So :func:`fit_on_int8_encoder`
can train them again, from the model's configuration and seed, on the int8 encoder's
own features: the encoder is frozen, so this is one more training of the flows, not
quantization-aware training. Which flows an int8 file keeps is chosen on synthetic
defects (:mod:`cflowad.results.int8`), and its thresholds are fitted on the int8
graph itself (:mod:`cflowad.engine.refit`). OpenVINO runs the same QDQ graph as int8
(``export --openvino DIR --int8`` converts it).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import Tensor, nn

from cflowad.common.progress import Reporter
from cflowad.data.images import batches
from cflowad.engine.export import refuse_foreign_onnx, write_onnx
from cflowad.engine.model import CFlowAD
from cflowad.engine.onnx import INPUT_NAME, cpu_session, require_onnxruntime
from cflowad.method.encoder import Encoder
from cflowad.method.scoring import CFlowNet

__all__ = [
    "QUANTIZED_OPS",
    "calibration_images",
    "fit_on_int8_encoder",
    "quantize_file",
    "quantize_model",
]

# The encoder's convolutions and its ReLU6 (Clip; the flows have none): with the Clip
# quantized, a convolution's output takes the Clip's [0, 6] range instead of its own
# (-70 to 84 in the first depthwise layer), and the features' relative error fell from
# 0.64 to 0.20-0.28 (magnetic_tile, docs/benchmarks.md). The flows' MatMul, Exp and Log
# stay float.
QUANTIZED_OPS = ("Conv", "Clip")
_CALIBRATION_IMAGES = 64  # training images whose activations set the int8 ranges


def calibration_images(model: CFlowAD, train: Sequence[Any]) -> Tensor:
    """Up to 64 training images spread over ``train``, at the model's input size: their
    activations set the int8 ranges."""
    sample = train[:: max(1, len(train) // _CALIBRATION_IMAGES)][:_CALIBRATION_IMAGES]
    return torch.cat([b for b, _ in batches(sample, model.config.image_size, 16)])


def fit_on_int8_encoder(
    model: CFlowAD,
    train: Sequence[Any],
    held: Sequence[Any],
    calibration: Tensor,
    folder: Path,
    reporter: Reporter,
) -> CFlowAD:
    """A copy of ``model`` whose decoders are trained afresh (same configuration and
    seed) on the int8 encoder's features of ``train`` and calibrated on ``held``.

    The encoder is quantized alone, on the very inputs ``calibration`` gives it in the
    whole graph, so its int8 features are the ones the whole int8 file computes. The
    float encoder is put back: the copy exports, and quantizes, as one graph.
    """
    require_onnxruntime("int8 export")
    encoder_file = _quantize_encoder(model, calibration, folder)
    fitted = copy.copy(model)
    encoder = model.net.encoder
    fitted.net = CFlowNet(model.config, encoder).eval().to(model.device)
    fitted.net.set_region(model.region)
    fitted.net.encoder = cast(Encoder, _OnnxEncoder(encoder, encoder_file).to(model.device))
    try:
        fitted.train_decoders(train, held, reporter)
    finally:
        fitted.net.encoder = encoder
    return fitted


class _OnnxEncoder(nn.Module):
    """An encoder file run by ONNX Runtime where :class:`CFlowNet` expects its encoder:
    the flows then train, and the thresholds calibrate, on exactly what it computes."""

    mean: Tensor
    std: Tensor

    def __init__(self, encoder: Encoder, path: Path) -> None:
        super().__init__()
        self.session = cpu_session(path)
        self.channels, self.strides = encoder.channels, encoder.strides
        self.register_buffer("mean", encoder.mean.detach().clone())
        self.register_buffer("std", encoder.std.detach().clone())

    def forward(self, images: Tensor) -> list[Tensor]:
        """(B, 3, H, W) in [0, 1] -> list of (B, D_k, H_k, W_k), as :class:`Encoder`."""
        outputs = self.session.run(None, {INPUT_NAME: images.detach().float().cpu().numpy()})
        return [torch.from_numpy(o).to(images.device) for o in outputs]


def _quantize_encoder(model: CFlowAD, calibration: Tensor, folder: Path) -> Path:
    """The model's encoder alone as an int8 file, calibrated on the very inputs it gets
    from ``calibration`` in the whole graph (inside the region, tile by tile): the
    same activation ranges, so the same int8 features as the whole file computes."""
    inputs: list[Tensor] = []
    hook = model.net.encoder.register_forward_pre_hook(lambda _, args: inputs.append(args[0]))
    try:
        with torch.inference_mode():
            for batch in torch.split(calibration, 1):  # the whole file: an image at a time
                model.net.features(batch.to(model.device))
    finally:
        hook.remove()
    float_file, int8_file = folder / "encoder.onnx", folder / "encoder.int8.onnx"
    encoder = model.net.encoder.cpu()
    try:
        write_onnx(encoder, torch.cat(inputs[:2]).cpu(), float_file)
    finally:
        encoder.to(model.device)
    quantize_file(float_file, int8_file, torch.cat(inputs).cpu().numpy(), folder)
    return int8_file


def quantize_model(
    model: CFlowAD,
    path: Path,
    calibration: np.ndarray,
    folder: Path,
    metadata: dict[str, str] | None = None,
) -> None:
    """Export ``model`` in float, quantize its encoder, add ``metadata``; ``path`` is
    replaced only if cflowad wrote it, and only once the file is whole."""
    import onnx

    float_file, staging = folder / "float.onnx", folder / "int8.onnx"
    float_file.unlink(missing_ok=True)
    model.export_onnx(float_file)
    quantize_file(float_file, staging, calibration, folder)
    quantized = onnx.load(str(staging))
    for key, value in (metadata or {}).items():
        quantized.metadata_props.add(key=key, value=value)
    refuse_foreign_onnx(path)  # again: the file may have appeared while quantizing
    target = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # same file system: atomic
    try:
        onnx.save(quantized, str(target))
        os.replace(target, path)
    finally:
        target.unlink(missing_ok=True)


def quantize_file(source: Path, target: Path, calibration: np.ndarray, folder: Path) -> None:
    """Quantize the convolutions of the float ONNX file ``source`` into ``target``, the
    activations' ranges calibrated on ``calibration`` (N, 3, H, W) fed one image at a time
    as ``images``; ``folder`` holds the intermediate file."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Images(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self.batches: Iterator[np.ndarray] = iter(np.split(calibration, len(calibration)))

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.batches, None)
            return None if batch is None else {INPUT_NAME: batch}

    prepared = folder / f"{source.stem}.prepared.onnx"
    # ONNX Runtime's recommended first step: shapes inferred, the graph optimized
    quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
    quantize_static(
        str(prepared),
        str(target),
        Images(),
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=list(QUANTIZED_OPS),
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )

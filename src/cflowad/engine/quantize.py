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
defects (:mod:`cflowad.selection.int8`), and its thresholds are fitted on the int8
graph itself (:mod:`cflowad.engine.refit`). For OpenVINO the encoder is quantized by
NNCF instead (:func:`nncf_quantize`: its fast bias correction keeps the features
closer to float than ONNX Runtime's quantizer, docs/benchmarks.md, "int8").
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import Tensor, nn

from cflowad.common.errors import missing_extra
from cflowad.common.progress import Reporter
from cflowad.data.images import batches
from cflowad.engine.export import refuse_foreign_onnx, write_onnx
from cflowad.engine.model import CFlowAD
from cflowad.engine.onnx import INPUT_NAME, cpu_session
from cflowad.engine.openvino import cpu_config, require_openvino
from cflowad.method.encoder import Encoder
from cflowad.method.scoring import CFlowNet

__all__ = [
    "NNCF_FLOAT_OPS",
    "QUANTIZED_OPS",
    "calibration_images",
    "fit_on_int8_encoder",
    "nncf_quantize",
    "quantize_file",
    "quantize_model",
    "require_nncf",
]

# The encoder's convolutions and its ReLU6 (Clip; the flows have none): with the Clip
# quantized, a convolution's output takes the Clip's [0, 6] range instead of its own
# (-70 to 84 in the first depthwise layer), and the features' relative error fell from
# 0.64 to 0.20-0.28 (magnetic_tile, docs/benchmarks.md). The flows' MatMul, Exp and Log
# stay float.
QUANTIZED_OPS = ("Conv", "Clip")
# What NNCF would otherwise quantize besides the convolutions: the flows' products and
# sums (ReduceSum adds up log-scales and squared latents), the normalization, the fusion.
NNCF_FLOAT_OPS = (
    "MatMul",
    "Add",
    "Multiply",
    "Subtract",
    "Divide",
    "Concat",
    "ReduceSum",
    "ReduceMax",
    "ReduceMean",
    "Interpolate",
)
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
    runtime: str = "onnx",
) -> CFlowAD:
    """A copy of ``model`` whose decoders are trained afresh (same configuration and
    seed) on the int8 encoder's features of ``train`` and calibrated on ``held``, the
    encoder quantized for ``runtime`` (onnx: ONNX Runtime's quantizer; openvino: NNCF).

    The encoder is quantized alone, on the very inputs ``calibration`` gives it in the
    whole graph, so its int8 features are the ones the whole int8 file computes. The
    float encoder is put back: the copy exports, and quantizes, as one graph.
    """
    int8 = _quantize_encoder(model, calibration, folder, runtime)
    fitted = copy.copy(model)
    encoder = model.net.encoder
    fitted.net = CFlowNet(model.config, encoder).eval().to(model.device)
    fitted.net.set_region(model.region)
    fitted.net.encoder = cast(Encoder, int8.to(model.device))
    try:
        fitted.train_decoders(train, held, reporter)
    finally:
        fitted.net.encoder = encoder
    return fitted


class _Int8Encoder(nn.Module):
    """An int8 encoder run by ONNX Runtime or OpenVINO where :class:`CFlowNet` expects
    its encoder: the flows then train, and the thresholds calibrate, on exactly what
    it computes. ``run`` takes (B, 3, H, W) float32 and returns the scales' arrays."""

    mean: Tensor
    std: Tensor

    def __init__(self, encoder: Encoder, run: Callable[[np.ndarray], list[np.ndarray]]) -> None:
        super().__init__()
        self.run = run
        self.channels, self.strides = encoder.channels, encoder.strides
        self.register_buffer("mean", encoder.mean.detach().clone())
        self.register_buffer("std", encoder.std.detach().clone())

    def forward(self, images: Tensor) -> list[Tensor]:
        """(B, 3, H, W) in [0, 1] -> list of (B, D_k, H_k, W_k), as :class:`Encoder`."""
        outputs = self.run(images.detach().float().cpu().numpy())
        return [torch.from_numpy(np.array(o)).to(images.device) for o in outputs]


def _quantize_encoder(
    model: CFlowAD, calibration: Tensor, folder: Path, runtime: str
) -> _Int8Encoder:
    """The model's encoder alone in int8, calibrated on the very inputs it gets from
    ``calibration`` in the whole graph (inside the region, tile by tile): the same
    activation ranges, so the same int8 features as the whole file computes."""
    inputs: list[Tensor] = []
    hook = model.net.encoder.register_forward_pre_hook(lambda _, args: inputs.append(args[0]))
    try:
        with torch.inference_mode():
            for batch in torch.split(calibration, 1):  # the whole file: an image at a time
                model.net.features(batch.to(model.device))
    finally:
        hook.remove()
    float_file = folder / "encoder.onnx"
    encoder = model.net.encoder.cpu()
    try:
        write_onnx(encoder, torch.cat(inputs[:2]).cpu(), float_file)
    finally:
        encoder.to(model.device)
    samples = torch.cat(inputs).cpu().numpy()
    if runtime == "openvino":
        openvino = require_openvino("int8 export")
        quantized = nncf_quantize(openvino.convert_model(str(float_file)), samples)
        compiled = openvino.Core().compile_model(quantized, "CPU", cpu_config("f32"))
        request = compiled.create_infer_request()

        def run(images: np.ndarray) -> list[np.ndarray]:
            result = request.infer(images)
            return [result[output] for output in compiled.outputs]

        return _Int8Encoder(encoder, run)
    int8_file = folder / "encoder.int8.onnx"
    quantize_file(float_file, int8_file, samples, folder)
    session = cpu_session(int8_file)
    return _Int8Encoder(encoder, lambda images: session.run(None, {INPUT_NAME: images}))


def quantize_model(
    model: CFlowAD,
    path: Path,
    calibration: np.ndarray,
    folder: Path,
    metadata: dict[str, str] | None = None,
    runtime: str = "onnx",
) -> None:
    """Export ``model`` in float, quantize its encoder, add ``metadata``: an ONNX file
    (ONNX Runtime's quantizer) or, with ``runtime`` openvino, an IR folder (NNCF).
    ``path`` is replaced only if cflowad wrote it, and only once it is whole."""
    import onnx

    float_file, staging = folder / "float.onnx", folder / "int8.onnx"
    float_file.unlink(missing_ok=True)
    model.export_onnx(float_file)
    if runtime == "onnx":
        quantize_file(float_file, staging, calibration, folder)
    marked = onnx.load(str(staging if runtime == "onnx" else float_file))
    for key, value in (metadata or {}).items():
        marked.metadata_props.add(key=key, value=value)
    if runtime == "openvino":  # NNCF quantizes the converted model; metadata travels along
        onnx.save(marked, str(float_file))
        model.export_openvino(
            path, float_file, quantize=partial(nncf_quantize, samples=calibration)
        )
        return
    refuse_foreign_onnx(path)  # again: the file may have appeared while quantizing
    target = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # same file system: atomic
    try:
        onnx.save(marked, str(target))
        os.replace(target, path)
    finally:
        target.unlink(missing_ok=True)


def require_nncf() -> None:
    """A one-line user error when NNCF, which makes OpenVINO's int8, is missing."""
    try:
        import nncf  # noqa: F401
    except ImportError:
        raise missing_extra("int8 for OpenVINO", "nncf", "openvino") from None


def nncf_quantize(model: Any, samples: np.ndarray) -> Any:
    """An OpenVINO model with its convolutions in int8 by NNCF's post-training
    quantization (range estimation and fast bias correction), calibrated on ``samples``
    (N, 3, H, W) fed one at a time; every other operation stays float."""
    # importing NNCF beside torch imports torch's extension builder, which warns that
    # it found no CUDA: a line about nothing cflowad uses
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    import nncf

    nncf.set_log_level(logging.ERROR)  # not its list of every operation left in float
    images = list(np.split(samples, len(samples)))
    with contextlib.redirect_stdout(io.StringIO()):  # its progress bars: ours are the caller's
        return nncf.quantize(
            model,
            nncf.Dataset(images),
            subset_size=len(images),
            ignored_scope=nncf.IgnoredScope(types=list(NNCF_FLOAT_OPS), validate=False),
        )


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

"""int8: the encoder's convolutions quantized after training, on the model's own good images.

ONNX Runtime's static quantization (QDQ, int8 weights per channel, uint8 activations
calibrated on training images) is applied to the convolutions only. They are most of
the work of a lone image, and EfficientNet-Lite was designed for int8 (ReLU6, no
squeeze-excitation). The flows stay float: their coupling scales pass through exp,
and a log-likelihood summed over hundreds of dimensions magnifies every rounding
step (ONNX Runtime's dynamic int8 over the whole graph gave maps correlated 0.77
with float). Quantization moves the scores, so the thresholds are fitted again on
the int8 graph, on the same held-out images the training used: the promised
false-positive rate holds for the file as shipped. OpenVINO runs the same QDQ
graph as int8 (``export --openvino DIR --int8`` converts it).

Measured on magnetic_tile (docs/benchmarks.md, "Runtimes"), the flows are more
sensitive to the encoder's rounding than a classifier is: the maps' median
correlation with float fell to 0.49 and the image AUROC from 0.909 to 0.771, and
no calibration method or exclusion tried kept it within 0.005. The export says so
when it happens (a warning below 0.99).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cflowad.common.progress import Reporter
from cflowad.data.images import batches
from cflowad.engine.export import refuse_foreign_onnx
from cflowad.engine.model import CFlowAD
from cflowad.engine.onnx import INPUT_NAME, OnnxModel, require_onnxruntime
from cflowad.engine.refit import held_out, refit_thresholds

__all__ = ["QUANTIZED_OPS", "export_int8", "quantize_file"]

QUANTIZED_OPS = ("Conv",)  # the encoder's; the flows' MatMul, Exp and Log stay float
_CALIBRATION_IMAGES = 64  # training images whose activations set the int8 ranges
_FAITHFUL = 0.99  # median map correlation with float below which int8 is said to hurt


def export_int8(
    model: CFlowAD, path: Path, data: Any, reporter: Reporter | None = None
) -> dict[str, Any]:
    """Write ``model`` as an int8 ONNX file, thresholds refitted on the int8 graph.

    Args:
        model: a trained model.
        path: the ``.onnx`` file to write (replaced only if cflowad wrote it).
        data: what the model was trained on (a folder, an MVTec category, a list):
            training images calibrate the activations, the held-out ones (the same
            seeded split as training) the thresholds.
        reporter: progress lines.

    Returns:
        What was written and how far int8 is from float on the held-out images.
    """
    require_onnxruntime("int8 export")
    reporter = reporter or Reporter(enabled=False)
    start = time.perf_counter()
    refuse_foreign_onnx(path)
    train, held = held_out(model, data, "int8")
    size = model.config.image_size
    sample = train[:: max(1, len(train) // _CALIBRATION_IMAGES)][:_CALIBRATION_IMAGES]
    calibration = torch.cat([b for b, _ in batches(sample, size, 16)]).numpy()
    with tempfile.TemporaryDirectory() as folder:
        first = Path(folder) / "first.onnx"
        with reporter.task("quantizing to int8", 2) as task:
            _quantize(model, first, calibration, Path(folder))
            task.advance()
            refitted, changes = refit_thresholds(model, OnnxModel(first), held, "int8")
            metadata = {
                "quantization": json.dumps(
                    {
                        "format": "QDQ int8 (ONNX Runtime static quantization)",
                        "quantized": list(QUANTIZED_OPS),
                        "float": "the flows, the fusion, the maps",
                        "calibration_images": len(sample),
                        "threshold_images": len(held),
                    }
                )
            }
            _quantize(refitted, path, calibration, Path(folder), metadata)
            task.advance()
    correlation = changes["map_correlation_median"]
    if not correlation >= _FAITHFUL:
        reporter.warn(
            f"int8 moved the maps: their median correlation with float is {correlation:.2f} on "
            f"{len(held)} held-out images (the thresholds still hold the false-positive rate, "
            "but defects are found less well); keep the float export where accuracy matters "
            "(docs/benchmarks.md, 'Runtimes')"
        )
    return {
        "onnx": str(path),
        "megabytes": round(path.stat().st_size / 2**20, 1),
        "seconds": round(time.perf_counter() - start, 1),
        "quantized": list(QUANTIZED_OPS),
        **changes,
    }


def _quantize(
    model: CFlowAD,
    path: Path,
    calibration: np.ndarray,
    folder: Path,
    metadata: dict[str, str] | None = None,
) -> None:
    """Export ``model`` in float, quantize its convolutions, add ``metadata``."""
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

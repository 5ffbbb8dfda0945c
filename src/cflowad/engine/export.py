"""ONNX export: the whole scoring network and its thresholds in one file.

Production lines often run models in ONNX Runtime or another engine, without
Python or PyTorch. The exported graph takes images already resized to the model's
input size and returns, per image, the score, the decision, the anomaly map and
the mask, exactly as :meth:`CFlowAD.predict` computes them before maps are resized
back to each image's own size. Thresholds and normalization constants are in the
graph; the input contract is in the file's metadata. When ONNX Runtime is
installed the file is checked against PyTorch before it replaces anything.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from cflowad.common.errors import UserError, missing_extra
from cflowad.common.version import __version__
from cflowad.engine.inference import THRESHOLD
from cflowad.engine.onnx import INPUT_NAME, MARK, OUTPUT_NAMES, cpu_session
from cflowad.method.calibration import Calibration
from cflowad.method.config import Config
from cflowad.method.region import encode_region
from cflowad.method.scoring import CFlowNet

__all__ = [
    "export_onnx",
    "export_openvino",
    "is_cflowad_onnx",
    "refuse_foreign_onnx",
    "refuse_foreign_openvino",
    "write_onnx",
]


class _Decisions(nn.Module):
    """CFlowNet plus its decisions: images -> scores, decisions, maps, masks, raw scores."""

    def __init__(self, net: CFlowNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        scores, maps, raw = self.net(images)
        return scores, scores > THRESHOLD, maps, maps > THRESHOLD, raw


def write_onnx(
    module: nn.Module, example: Tensor, path: Path, output_names: Sequence[str] | None = None
) -> None:
    """Export ``module`` (images -> outputs) to ``path`` with a dynamic batch dimension."""
    # torch.onnx prints its stages to stdout; progress is the caller's to show.
    with contextlib.redirect_stdout(io.StringIO()):
        program = torch.onnx.export(
            module,
            (example,),
            dynamo=True,
            input_names=[INPUT_NAME],
            output_names=None if output_names is None else list(output_names),
            dynamic_shapes={INPUT_NAME: {0: torch.export.Dim("batch")}},
        )
    if program is None:
        raise RuntimeError("torch.onnx.export returned no program")
    program.save(str(path))


def is_cflowad_onnx(path: Path) -> bool:
    """Whether ``path`` is an ONNX file that cflowad wrote (so exporting may replace it)."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # any unreadable or foreign file is simply not ours
        return False
    return any(p.key == MARK for p in model.metadata_props)


def refuse_foreign_onnx(path: Path) -> None:
    """A one-line error unless ``path`` is missing or an ONNX file that cflowad wrote."""
    if path.exists() and not (path.is_file() and is_cflowad_onnx(path)):
        raise UserError(f"{path}: exists and was not written by cflowad; choose another --onnx")


def refuse_foreign_openvino(folder: Path) -> None:
    """A one-line error unless ``folder`` is missing, empty or an IR that cflowad wrote."""
    from cflowad.engine.openvino import IR_FILE

    ours = {IR_FILE, IR_FILE.replace(".xml", ".bin")}
    if folder.exists() and not (folder.is_dir() and {p.name for p in folder.iterdir()} <= ours):
        raise UserError(
            f"{folder}: exists and was not written by cflowad; choose another --openvino"
        )


def export_onnx(
    net: CFlowNet,
    config: Config,
    calibration: Calibration,
    training: dict[str, Any],
    weights_sha256: str | None,
    path: Path,
) -> dict[str, Any]:
    """Write a fitted network (on the CPU) as an ONNX file with a dynamic batch.

    Takes the parts of a model rather than the :class:`CFlowAD` facade, which calls
    it: the exporter needs no trainer. The file is written next to ``path`` and moved
    into place only after the check, so a failed export leaves an existing file
    untouched.

    Returns:
        What was written and checked (see :meth:`CFlowAD.export_onnx`).
    """
    try:
        import onnx
        import onnxscript  # noqa: F401  (torch.onnx's exporter needs it)
    except ImportError:
        raise missing_extra("ONNX export", "the onnx and onnxscript packages", "onnx") from None
    path = Path(path)
    refuse_foreign_onnx(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    height, width = config.image_size
    wrapper = _Decisions(net).eval()
    example = _example(config)
    staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    start = time.perf_counter()
    try:
        write_onnx(wrapper, example, staging, OUTPUT_NAMES)
        onnx_model = onnx.load(str(staging))
        metadata = {
            MARK: __version__,
            "backbone": config.backbone,
            "decoder": config.decoder,
            "input": (
                f"{INPUT_NAME}: float32 (N, 3, {height}, {width}), RGB in [0, 1], each image "
                "resized to that size by antialiased bilinear interpolation"
            ),
            "outputs": (
                "scores (N,) and maps (N, H, W) from 0 to 1 with both thresholds at 0.5; "
                "anomalous (N,) = scores > 0.5; masks (N, H, W) = maps > 0.5; raw_scores (N,)"
            ),
            "image_size": f"{height},{width}",
            "image_threshold_raw": repr(calibration.image_threshold_raw),
            "pixel_threshold_raw": repr(calibration.pixel_threshold_raw),
            # what cflowad serve's model list shows, the same as for the model directory
            "weights_sha256": weights_sha256 or "",
            "calibration": json.dumps(calibration.to_dict()),
            "training": json.dumps(training),
        }
        if net.region is not None:  # in the graph; for maps at each image's own size too
            metadata["region"] = json.dumps(encode_region(net.region.cpu().numpy() > 0.5))
        for key, value in metadata.items():
            onnx_model.metadata_props.add(key=key, value=value)
        _keep_unfolded(onnx_model, [f"net.{name}" for name in net.computed_codes()])
        onnx.save(onnx_model, str(staging))
        difference = _check_with_onnxruntime(staging, wrapper, example)
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)
    return {
        "onnx": str(path),
        "megabytes": round(path.stat().st_size / 2**20, 1),
        "seconds": round(time.perf_counter() - start, 1),
        "max_relative_difference": difference,
    }


def _keep_unfolded(model: Any, names: Sequence[str]) -> None:
    """Declare the initializers ``names`` graph inputs too, their values the defaults.

    ONNX Runtime never constant-folds what an overridable initializer feeds. Those are
    the positional codes of flows that compute their condition terms as they go
    (:data:`cflowad.method.scoring.CONDITION_BUDGET`): folded at load, the terms of a
    20-megapixel model took 72 s and 18 GB; left to the graph, loading took 2 s and
    scoring peaked at 3 GB (docs/benchmarks.md, "Tiles"). Scoring passes images alone.
    """
    import onnx

    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    for name in names:
        tensor = initializers.get(name)
        if tensor is None:  # a small code, folded by onnxscript's optimizer already
            continue
        info = onnx.helper.make_tensor_value_info(name, tensor.data_type, list(tensor.dims))
        model.graph.input.append(info)


def _check_with_onnxruntime(file: Path, wrapper: _Decisions, example: Tensor) -> float | None:
    """:func:`_worst_difference` of ONNX Runtime's outputs, or None without ONNX Runtime."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return None
    session = cpu_session(file)
    return _worst_difference(
        "ONNX Runtime",
        wrapper,
        lambda images: [
            torch.from_numpy(o) for o in session.run(None, {INPUT_NAME: images.numpy()})
        ],
        OUTPUT_NAMES,
        example,
    )


@torch.inference_mode()
def _worst_difference(
    runtime: str,
    eager: Callable[[Tensor], Sequence[Tensor]],
    exported: Callable[[Tensor], Sequence[Tensor]],
    names: Sequence[str],
    example: Tensor,
) -> float:
    """Max relative difference of an exported runtime's outputs from PyTorch's.

    Runs batches of 2 and 1, which also proves the batch dimension dynamic. Scores
    and maps lie in [0, 1], so the bound 1e-3 of the largest value catches any real
    mismatch (a missing constant is order 1) while float32 rounding stays far below.
    Decisions (booleans) follow from the scores and are not compared.
    """
    worst = 0.0
    for images in (example, example[:1]):
        for name, expected, got in zip(names, eager(images), exported(images), strict=True):
            if expected.dtype == torch.bool:
                continue
            scale = max(float(expected.abs().max()), 1e-12)
            worst = max(worst, float((got - expected).abs().max()) / scale)
            if worst > 1e-3:
                raise RuntimeError(f"{runtime}'s {name} differ from PyTorch's by {worst:.2e}")
    return worst


def _example(config: Config) -> Tensor:
    """The seeded batch of two images an export is traced and checked with."""
    height, width = config.image_size
    return torch.rand(2, 3, height, width, generator=torch.Generator().manual_seed(0))


def export_openvino(
    net: CFlowNet,
    config: Config,
    calibration: Calibration,
    training: dict[str, Any],
    weights_sha256: str | None,
    folder: Path,
    onnx_file: Path | None = None,
    precision: str = "f32",
    quantize: Callable[[Any], Any] | None = None,
) -> dict[str, Any]:
    """Write a fitted network as an OpenVINO IR folder (``model.xml`` + ``model.bin``).

    The ONNX export is converted by OpenVINO's own converter and saved in float32 with
    the ONNX file's metadata; the IR is checked against PyTorch before it replaces
    ``folder``, which may be missing, empty, or an earlier export of cflowad's. With
    ``onnx_file`` (this network's export, with its metadata) that file is converted
    instead; ``quantize`` (NNCF's int8, :mod:`cflowad.engine.quantize`) transforms the
    converted model. Neither is held to float's tolerance, nor is an IR to run in
    ``precision`` bf16 (the weights stay float32: OpenVINO rounds as it computes).

    Returns:
        ``openvino`` (the folder), ``megabytes``, ``seconds``, ``max_relative_difference``
        (None for ``onnx_file``).
    """
    from cflowad.engine.openvino import IR_FILE, METADATA_KEY, OpenVinoModel, require_openvino

    openvino = require_openvino("OpenVINO export")
    import onnx

    folder = Path(folder)
    refuse_foreign_openvino(folder)
    start = time.perf_counter()
    staging = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    staging.mkdir(parents=True)
    try:
        source = onnx_file or staging / "model.onnx"
        if onnx_file is None:
            export_onnx(net, config, calibration, training, weights_sha256, source)
        written = onnx.load(str(source), load_external_data=False)
        metadata = {p.key: p.value for p in written.metadata_props}
        if precision != "f32":
            metadata["inference_precision"] = precision
        model = openvino.convert_model(str(source))
        if quantize is not None:
            model = quantize(model)
        model.set_rt_info(json.dumps(metadata), METADATA_KEY)
        openvino.save_model(model, str(staging / IR_FILE), compress_to_fp16=False)
        (staging / "model.onnx").unlink(missing_ok=True)
        converted = OpenVinoModel(staging)
        difference = (
            None
            if onnx_file or quantize or precision != "f32"
            else _worst_difference(
                "OpenVINO",
                net,
                converted.score_batch,
                ("scores", "maps", "raw_scores"),
                _example(config),
            )
        )
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    size = sum(p.stat().st_size for p in folder.iterdir())
    return {
        "openvino": str(folder),
        "megabytes": round(size / 2**20, 1),
        "seconds": round(time.perf_counter() - start, 1),
        "max_relative_difference": difference,
    }

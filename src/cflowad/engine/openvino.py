"""An exported model scored by OpenVINO, through the same engine as :class:`CFlowAD`.

Intel's runtime, and the way anomaly detection is usually deployed on Intel
hardware. ``cflowad export MODEL --openvino DIR`` writes ``DIR/model.xml`` and
``DIR/model.bin`` (an OpenVINO IR in float32) with the ONNX file's inputs, outputs and
metadata; ``cflowad.load(DIR)`` and every command that takes a model accept the
folder. Inference runs in float32 (``INFERENCE_PRECISION_HINT``): on CPUs with
bfloat16 OpenVINO would otherwise switch to it by itself and move the maps. An export
made with ``--bf16`` (:mod:`cflowad.engine.bfloat16`) says so in its metadata
(``inference_precision``), and only then does OpenVINO compute in bfloat16.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from cflowad.common.errors import UserError, missing_extra
from cflowad.engine.onnx import INPUT_NAME, ExportedModel
from cflowad.engine.threads import onnx_threads, scorers

__all__ = [
    "IR_FILE",
    "METADATA_KEY",
    "PRECISIONS",
    "OpenVinoModel",
    "cpu_config",
    "host_has_bf16",
    "is_openvino_folder",
    "require_openvino",
]

log = logging.getLogger("cflowad")

IR_FILE = "model.xml"  # with model.bin beside it
METADATA_KEY = "cflowad_metadata"  # the ONNX file's metadata, as JSON in the IR's rt_info
PRECISIONS = ("f32", "bf16")  # OpenVINO's names; metadata key inference_precision


def require_openvino(purpose: str) -> Any:
    """The ``openvino`` module, or a one-line user error naming ``purpose`` and the extra."""
    try:
        import openvino
    except ImportError:
        raise missing_extra(purpose, "openvino", "openvino") from None
    return openvino


def host_has_bf16() -> bool:
    """Whether OpenVINO can compute in bfloat16 on this CPU (AMX or AVX-512 BF16)."""
    core = require_openvino("bfloat16").Core()
    return "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def cpu_config(precision: str = "f32") -> dict[str, Any]:
    """How every OpenVINO model is compiled here: float32 (or the ``precision`` its
    export chose), in the threads that ONNX
    Runtime would get (no oversubscription beside torch), and one stream per batch scored
    at once. A compiled model runs one request per stream: with one stream, the two
    batches of ``serve --workers 2`` took turns on one worker's threads (23 against
    ONNX Runtime's 43 requests/s at concurrency 16, measured)."""
    streams = scorers()
    return {
        "INFERENCE_NUM_THREADS": onnx_threads() * streams,
        "NUM_STREAMS": streams,
        "INFERENCE_PRECISION_HINT": precision,
    }


def is_openvino_folder(path: Path) -> bool:
    """A folder that ``cflowad export --openvino`` wrote (it holds ``model.xml``)."""
    return path.is_dir() and (path / IR_FILE).is_file()


class OpenVinoModel(ExportedModel):
    """A folder written by ``cflowad export --openvino``, run by OpenVINO on the CPU in the
    threads :func:`cflowad.engine.threads.onnx_threads` gives (as ONNX Runtime)."""

    def __init__(self, path: str | Path) -> None:
        openvino = require_openvino(f"{path}: scoring an OpenVINO model")
        self.path = Path(path)
        xml = self.path / IR_FILE if self.path.is_dir() else self.path
        if not xml.is_file():
            raise UserError(f"{self.path}: no {IR_FILE} (an OpenVINO folder from cflowad export)")
        core = openvino.Core()
        try:
            model = core.read_model(str(xml))
        except Exception as error:  # OpenVINO's own errors for a broken or foreign file
            first = str(error).splitlines()[0][:120] if str(error) else type(error).__name__
            raise UserError(f"{xml}: not a readable OpenVINO model ({first})") from None
        if not model.has_rt_info(METADATA_KEY):
            raise UserError(f"{xml}: not written by cflowad export")
        meta = json.loads(model.get_rt_info(METADATA_KEY).astype(str))
        self._take_metadata(meta, tuple(output.get_any_name() for output in model.outputs))
        self.precision = meta.get("inference_precision", "f32")
        if self.precision not in PRECISIONS:
            raise UserError(f"{xml}: unknown inference_precision {self.precision!r}")
        if self.precision == "bf16" and not host_has_bf16():
            log.warning(
                "%s: exported for bfloat16, but this CPU has none: OpenVINO computes in "
                "float32, and the thresholds (fitted in bfloat16) are off by a little",
                self.path,
            )
        self._compiled = core.compile_model(model, "CPU", cpu_config(self.precision))
        self._requests = threading.local()  # a request is not to be shared between threads

    def score_batch(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(B, 3, H, W) at :attr:`image_size` -> readable scores, readable maps, raw scores."""
        request = getattr(self._requests, "request", None)
        if request is None:
            request = self._requests.request = self._compiled.create_infer_request()
        request.infer({INPUT_NAME: images.numpy()})
        scores, maps, raw = (request.get_output_tensor(i).data.copy() for i in (0, 2, 4))
        return torch.from_numpy(scores), torch.from_numpy(maps), torch.from_numpy(raw)

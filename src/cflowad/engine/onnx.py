"""An exported model scored by ONNX Runtime, through the same engine as :class:`CFlowAD`.

ONNX Runtime fuses what PyTorch runs op by op: the magnetic_tile model scored 59
images/s at batch 1 in it against 36 in PyTorch on 2 cores (docs/benchmarks.md).
``cflowad export`` once, then give the ``.onnx`` file wherever a model directory
goes. This module imports neither the trainer nor timm: a line that only scores
needs onnxruntime, torch and Pillow.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from cflowad.common.errors import UserError, missing_extra
from cflowad.engine.inference import InferenceEngine, describe
from cflowad.engine.threads import onnx_threads
from cflowad.method.calibration import Calibration
from cflowad.method.region import decode_region

__all__ = [
    "INPUT_NAME",
    "MARK",
    "OUTPUT_NAMES",
    "ExportedModel",
    "OnnxModel",
    "cpu_session",
    "require_onnxruntime",
]

# The exported file's contract, shared with cflowad.engine.export which writes it.
INPUT_NAME = "images"
OUTPUT_NAMES = ("scores", "anomalous", "maps", "masks", "raw_scores")
MARK = "cflowad_version"


def require_onnxruntime(purpose: str) -> None:
    """A one-line user error naming ``purpose`` and the extra to install, if it is missing."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        raise missing_extra(purpose, "onnxruntime", "onnx") from None


def cpu_session(path: Path) -> Any:
    """An ONNX Runtime CPU session on ``path`` in the threads that
    :func:`cflowad.engine.threads.set_num_threads` gave (torch's count until then).

    Every session of the process allocates from one shared memory arena: each session's
    own arena grows to its largest batch and keeps it, so four models in one process
    (a fleet's archive, a server) peaked at 2.4 GB with their own arenas and 1.4 GB with
    the shared one, at the same speed (measured; allocating per call without an arena:
    1.2 GB, but 20 to 40 % slower).
    """
    import onnxruntime

    _register_shared_arena(onnxruntime)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = onnx_threads()
    options.add_session_config_entry("session.use_env_allocators", "1")
    # errors only: ONNX Runtime warns at every load that the codes an export declares
    # overridable (cflowad.engine.export._keep_unfolded) will not be folded: the point
    options.log_severity_level = 3
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


_shared_arena = threading.Lock()
_shared_arena_registered: list[bool] = []


def _register_shared_arena(onnxruntime: Any) -> None:
    with _shared_arena:
        if _shared_arena_registered:
            return
        memory = onnxruntime.OrtMemoryInfo(
            "Cpu",
            onnxruntime.OrtAllocatorType.ORT_ARENA_ALLOCATOR,
            0,
            onnxruntime.OrtMemType.DEFAULT,
        )
        # 0, -1, -1, -1: ONNX Runtime's defaults (extend by powers of two)
        onnxruntime.create_and_register_allocator(memory, onnxruntime.OrtArenaCfg(0, -1, -1, -1))
        _shared_arena_registered.append(True)


class ExportedModel(InferenceEngine):
    """What ``cflowad export`` wrote, whatever runtime scores it: the contract of its
    metadata (input size, thresholds, calibration, training summary) and outputs.

    Attributes (from the file's metadata):
        image_size: model input (height, width).
        image_threshold_raw: the image threshold before the readable scale.
        pixel_threshold_raw: the pixel threshold before the readable scale.
    """

    path: Path
    _metadata: dict[str, str]

    def _take_metadata(self, meta: dict[str, str], outputs: tuple[str, ...]) -> None:
        """Check the export's mark and layout, and keep what it says about the model."""
        if MARK not in meta:
            raise UserError(f"{self.path}: not written by cflowad export")
        if outputs != OUTPUT_NAMES or "image_threshold_raw" not in meta:
            raise UserError(
                f"{self.path}: exported by cflowad {meta[MARK]} in an older layout; "
                "export the model again with this cflowad (cflowad export)"
            )
        height, width = (int(v) for v in meta["image_size"].split(","))
        self.image_size = (height, width)
        self.image_threshold_raw = float(meta["image_threshold_raw"])
        self.pixel_threshold_raw = float(meta["pixel_threshold_raw"])
        self.region = decode_region(json.loads(meta["region"])) if "region" in meta else None
        self._metadata = dict(meta)

    @property
    def calibration(self) -> Calibration:
        """The calibration the model directory had (held-out scores too, from 0.9 on), with
        the thresholds this file decides by (an int8 or bf16 export refits them)."""
        entry: dict[str, Any] = {
            "reference": [],
            **json.loads(self._metadata.get("calibration", "{}")),
            "image_threshold_raw": self.image_threshold_raw,
            "pixel_threshold_raw": self.pixel_threshold_raw,
        }
        return Calibration.from_dict(entry)

    def describe(self) -> dict[str, Any]:
        """The summary the model directory gives, from the file's metadata.

        ``weights_sha256`` is the source model's weights; files exported before
        cflowad 0.3 lack it and the training summary (``None`` and ``{}``).
        """
        meta = self._metadata
        return describe(
            meta.get("backbone", ""),
            meta.get("decoder", "flow"),
            self.image_size,
            self.calibration,
            json.loads(meta.get("training", "{}")),
            meta.get("weights_sha256") or None,
        )


class OnnxModel(ExportedModel):
    """A file written by ``cflowad export``, run by ONNX Runtime (threads: :func:`cpu_session`)."""

    def __init__(self, path: str | Path) -> None:
        require_onnxruntime(f"{path}: scoring an ONNX file")
        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"{self.path}: ONNX file not found")
        try:
            self._session = cpu_session(self.path)
        except Exception as error:  # ONNX Runtime's own errors for a broken or foreign file
            first = str(error).splitlines()[0][:120] if str(error) else type(error).__name__
            raise UserError(f"{self.path}: not a readable ONNX model ({first})") from None
        meta = self._session.get_modelmeta().custom_metadata_map
        self._take_metadata(meta, tuple(o.name for o in self._session.get_outputs()))

    def score_batch(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(B, 3, H, W) at :attr:`image_size` -> readable scores, readable maps, raw scores."""
        scores, _, maps, _, raw = self._session.run(None, {INPUT_NAME: images.numpy()})
        return torch.from_numpy(scores), torch.from_numpy(maps), torch.from_numpy(raw)

"""An exported model scored by ONNX Runtime, behind the same ``predict`` as :class:`CFlowAD`.

ONNX Runtime fuses what PyTorch runs op by op: the magnetic_tile model scored 59
images/s at batch 1 in it against 36 in PyTorch on 2 cores (README, Benchmarks).
``cflowad export`` once, then give the ``.onnx`` file wherever a model directory
goes in ``predict`` and ``test``. Images are resized in and maps resized back
exactly as :meth:`CFlowAD.predict` does, with the thresholds from the file.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from cflowad.data import ImageInput
from cflowad.errors import UserError
from cflowad.export import INPUT_NAME, MARK
from cflowad.model import CFlowAD, Prediction, predict_batches
from cflowad.progress import Reporter

__all__ = ["OnnxModel", "cpu_session", "load_model", "require_onnxruntime"]


def require_onnxruntime(purpose: str) -> None:
    """A one-line user error naming ``purpose`` and the extra to install, if it is missing."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        raise UserError(f"{purpose} needs onnxruntime: pip install 'cflowad[onnx]'") from None


def cpu_session(path: Path) -> Any:
    """An ONNX Runtime CPU session on ``path`` in torch's thread count (as --threads sets it)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class OnnxModel:
    """A file written by ``cflowad export``, run by ONNX Runtime in torch's thread count.

    Attributes (from the file's metadata):
        image_size: model input (height, width).
        image_threshold: image score above which an image is flagged anomalous.
        pixel_threshold: map value above which a pixel is flagged anomalous.
    """

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
        if MARK not in meta:
            raise UserError(f"{self.path}: not written by cflowad export")
        height, width = (int(v) for v in meta["image_size"].split(","))
        self.image_size = (height, width)
        self.image_threshold = float(meta["image_threshold"])
        self.pixel_threshold = float(meta["pixel_threshold"])

    def predict(
        self,
        images: str | Path | Sequence[ImageInput],
        batch_size: int = 16,
        reporter: Reporter | None = None,
    ) -> Prediction:
        """Score images as :meth:`CFlowAD.predict` does: a folder, or paths or arrays."""
        thresholds = (self.image_threshold, self.pixel_threshold)
        return predict_batches(
            self._score, images, self.image_size, batch_size, thresholds, reporter
        )

    def _score(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores, _, maps, _ = self._session.run(None, {INPUT_NAME: batch.numpy()})
        return torch.from_numpy(scores), torch.from_numpy(maps)


def load_model(path: Path) -> CFlowAD | OnnxModel:
    """A model directory from ``cflowad train``, or an ONNX file from ``cflowad export``."""
    if path.suffix == ".onnx" and not path.is_dir():
        return OnnxModel(path)
    return CFlowAD.load(path)

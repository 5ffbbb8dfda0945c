"""Opening what ``cflowad train`` or ``cflowad export`` wrote, as the engine that scores it."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from cflowad.common.errors import UserError

if TYPE_CHECKING:
    from cflowad.engine.model import CFlowAD
    from cflowad.engine.onnx import OnnxModel

__all__ = ["load"]


def load(path: str | Path, device: str = "auto") -> CFlowAD | OnnxModel:
    """A model directory from ``cflowad train``, or an ONNX file from ``cflowad export``.

    The ONNX path never imports the trainer or timm.

    Args:
        path: a model directory, or a ``.onnx`` file.
        device: ``"auto"``, ``"cpu"`` or ``"cuda[:N]"``; ONNX files run on the CPU,
            so a CUDA device with one is a UserError.

    Returns:
        A :class:`CFlowAD` or an :class:`OnnxModel`; both satisfy
        :class:`cflowad.engine.inference.Predictor`.
    """
    path = Path(path)
    if path.suffix == ".onnx" and not path.is_dir():
        from cflowad.engine.onnx import OnnxModel

        if device not in ("auto", "cpu"):
            raise UserError(f"option --device={device}: ONNX files run on the CPU here")
        return OnnxModel(path)
    from cflowad.engine.model import CFlowAD

    return CFlowAD.load(path, device=device)

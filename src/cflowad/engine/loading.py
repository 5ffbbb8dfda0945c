"""Opening what ``cflowad train`` or ``cflowad export`` wrote, as the engine that scores it."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from cflowad.common.errors import UserError
from cflowad.engine.catalog import model_kind

if TYPE_CHECKING:
    from cflowad.engine.model import CFlowAD
    from cflowad.engine.onnx import OnnxModel
    from cflowad.engine.openvino import OpenVinoModel

__all__ = ["load"]


def load(path: str | Path, device: str = "auto") -> CFlowAD | OnnxModel | OpenVinoModel:
    """A model directory from ``cflowad train``, or what ``cflowad export`` wrote: an
    ONNX file, or an OpenVINO folder (``model.xml``).

    The exported paths never import the trainer or timm.

    Args:
        path: a model directory, a ``.onnx`` file, or an OpenVINO folder.
        device: ``"auto"``, ``"cpu"`` or ``"cuda[:N]"``; exported models run on the CPU,
            so a CUDA device with one is a UserError.

    Returns:
        A :class:`CFlowAD`, :class:`OnnxModel` or :class:`OpenVinoModel`; all satisfy
        :class:`cflowad.engine.inference.Predictor`.
    """
    path = Path(path)
    # an .onnx path that is not there goes to OnnxModel, which says so (in any case: X.ONNX)
    kind = "onnx" if path.suffix.lower() == ".onnx" and not path.is_dir() else model_kind(path)
    if kind in ("onnx", "openvino"):
        if device not in ("auto", "cpu"):
            raise UserError(f"option --device={device}: exported models run on the CPU here")
        if kind == "onnx":
            from cflowad.engine.onnx import OnnxModel

            return OnnxModel(path)
        from cflowad.engine.openvino import OpenVinoModel

        return OpenVinoModel(path)
    from cflowad.engine.model import CFlowAD

    return CFlowAD.load(path, device=device)

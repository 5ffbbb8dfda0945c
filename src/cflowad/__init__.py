"""cflowad: CFLOW-AD unsupervised anomaly detection with localization.

``load(path)`` opens what ``cflowad train`` or ``cflowad export`` wrote: a model
directory as :class:`CFlowAD`, an ONNX file as :class:`OnnxModel`; both score
through the same engine (:mod:`cflowad.inference`).
"""

from __future__ import annotations

__version__ = "0.7.0"

from pathlib import Path
from typing import TYPE_CHECKING, Any

from cflowad.config import Config as Config
from cflowad.errors import UserError as UserError
from cflowad.inference import ImageResult as ImageResult
from cflowad.inference import Prediction as Prediction
from cflowad.inference import Predictor as Predictor

if TYPE_CHECKING:
    from cflowad.model import CFlowAD
    from cflowad.runtime import OnnxModel

__all__ = [
    "CFlowAD",
    "Config",
    "ImageResult",
    "OnnxModel",
    "Prediction",
    "Predictor",
    "UserError",
    "__version__",
    "load",
]


def load(path: str | Path, device: str = "auto") -> CFlowAD | OnnxModel:
    """A model directory from ``cflowad train``, or an ONNX file from ``cflowad export``.

    The ONNX path never imports the trainer or timm.

    Args:
        path: a model directory, or a ``.onnx`` file.
        device: ``"auto"``, ``"cpu"`` or ``"cuda[:N]"``; ONNX files run on the CPU,
            so a CUDA device with one is a UserError.

    Returns:
        A :class:`CFlowAD` or an :class:`OnnxModel`; both satisfy :class:`Predictor`.
    """
    path = Path(path)
    if path.suffix == ".onnx" and not path.is_dir():
        from cflowad.runtime import OnnxModel

        if device not in ("auto", "cpu"):
            raise UserError(f"option --device={device}: ONNX files run on the CPU here")
        return OnnxModel(path)
    from cflowad.model import CFlowAD

    return CFlowAD.load(path, device=device)


def __getattr__(name: str) -> Any:
    # CFlowAD pulls in torch's trainer and timm; OnnxModel needs neither: import on use.
    if name == "CFlowAD":
        from cflowad.model import CFlowAD

        return CFlowAD
    if name == "OnnxModel":
        from cflowad.runtime import OnnxModel

        return OnnxModel
    raise AttributeError(f"module 'cflowad' has no attribute {name!r}")

"""cflowad: CFLOW-AD unsupervised anomaly detection with localization.

``load(path)`` opens what ``cflowad train`` or ``cflowad export`` wrote: a model
directory as :class:`CFlowAD`, an ONNX file as :class:`OnnxModel`; both score
through the same engine (:mod:`cflowad.engine.inference`). The packages, from
images to the line, are mapped in docs/architecture.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cflowad.common.errors import UserError as UserError
from cflowad.common.version import __version__ as __version__
from cflowad.engine.inference import ImageResult as ImageResult
from cflowad.engine.inference import Prediction as Prediction
from cflowad.engine.inference import Predictor as Predictor
from cflowad.engine.loading import load as load
from cflowad.method.config import Config as Config

if TYPE_CHECKING:
    from cflowad.engine.model import CFlowAD
    from cflowad.engine.onnx import OnnxModel

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


def __getattr__(name: str) -> Any:
    # CFlowAD pulls in torch's trainer and timm; OnnxModel needs neither: import on use.
    if name == "CFlowAD":
        from cflowad.engine.model import CFlowAD

        return CFlowAD
    if name == "OnnxModel":
        from cflowad.engine.onnx import OnnxModel

        return OnnxModel
    raise AttributeError(f"module 'cflowad' has no attribute {name!r}")

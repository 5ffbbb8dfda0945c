"""Old import path of the inference engine, kept for users' code: see
:mod:`cflowad.engine.inference`."""

import warnings

from cflowad.engine.inference import THRESHOLD as THRESHOLD
from cflowad.engine.inference import ImageResult as ImageResult
from cflowad.engine.inference import InferenceEngine as InferenceEngine
from cflowad.engine.inference import Prediction as Prediction
from cflowad.engine.inference import Predictor as Predictor
from cflowad.engine.inference import as_images as as_images
from cflowad.engine.inference import describe as describe

__all__ = [
    "THRESHOLD",
    "ImageResult",
    "InferenceEngine",
    "Prediction",
    "Predictor",
    "as_images",
    "describe",
]

warnings.warn(
    "cflowad.inference is deprecated and goes in cflowad 0.17: import from cflowad or "
    "cflowad.engine.inference",
    DeprecationWarning,
    stacklevel=2,
)

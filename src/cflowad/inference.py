"""Old import path of the inference engine, kept for users' code: see
:mod:`cflowad.engine.inference`."""

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

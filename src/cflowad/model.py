"""Old import path of the model facade, kept for users' code: see :mod:`cflowad.engine.model`."""

import warnings

from cflowad.engine.model import CFlowAD as CFlowAD
from cflowad.engine.model import is_model_dir as is_model_dir

__all__ = ["CFlowAD", "is_model_dir"]

warnings.warn(
    "cflowad.model is deprecated and goes in cflowad 0.17: import from cflowad or "
    "cflowad.engine.model",
    DeprecationWarning,
    stacklevel=2,
)

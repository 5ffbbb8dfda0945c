"""Old import path of the ONNX Runtime engine and the thread settings, kept for users'
code: see :mod:`cflowad.engine.onnx` and :mod:`cflowad.engine.threads`."""

import warnings

from cflowad.engine.onnx import INPUT_NAME as INPUT_NAME
from cflowad.engine.onnx import MARK as MARK
from cflowad.engine.onnx import OUTPUT_NAMES as OUTPUT_NAMES
from cflowad.engine.onnx import OnnxModel as OnnxModel
from cflowad.engine.onnx import cpu_session as cpu_session
from cflowad.engine.onnx import require_onnxruntime as require_onnxruntime
from cflowad.engine.threads import set_num_threads as set_num_threads
from cflowad.engine.threads import share_threads as share_threads

__all__ = [
    "INPUT_NAME",
    "MARK",
    "OUTPUT_NAMES",
    "OnnxModel",
    "cpu_session",
    "require_onnxruntime",
    "set_num_threads",
    "share_threads",
]

warnings.warn(
    "cflowad.runtime is deprecated and goes in cflowad 0.17: import from cflowad or "
    "cflowad.engine.onnx and cflowad.engine.threads",
    DeprecationWarning,
    stacklevel=2,
)

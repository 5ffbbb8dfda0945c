"""Which torch device runs the model: ``auto`` (CUDA when present), ``cpu`` or ``cuda[:N]``."""

from __future__ import annotations

import torch

from cflowad.common.errors import UserError

__all__ = ["DEVICES", "resolve_device"]

DEVICES = "auto|cpu|cuda"


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """The device for ``name``; asking for CUDA where there is none is a UserError.

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    text = str(name).strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if text == "cpu":
        return torch.device("cpu")
    if text == "cuda" or text.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise UserError(
                f"option --device={name}: no CUDA device is available here "
                "(use --device cpu or auto)"
            )
        device = torch.device(text)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(
                f"option --device={name}: only {torch.cuda.device_count()} CUDA devices"
            )
        return device
    raise UserError(f"option --device={name!r} must be auto, cpu, cuda or cuda:N")

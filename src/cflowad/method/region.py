"""The inspection region: where a part lies in every image, and so where to look.

A camera on a line sees the part and its surroundings (a fixture, a belt, a dusty
cloth). Specks on the background score like small defects, and the image score, the
map's maximum, then reports them. A region is a fixed mask of the image: the model
keeps it at its input size and, inside the scoring graph (so in every runtime and
export), paints the image outside it in the encoder's input mean before encoding (a
speck there reaches no feature) and multiplies the raw map by it (maps are zero
outside, and the score, the map's maximum, cannot see there). Its pixel threshold is
calibrated on the pixels inside only.

A region is given as a box ``x,y,w,h`` in pixels of the training images, or as a mask
image the training images' shape (white: inspect). In the model file it is the mask
at the model's input size, bits packed (8 KiB at 256 x 256).
"""

from __future__ import annotations

import base64
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cflowad.common.errors import UserError

__all__ = ["decode_region", "encode_region", "read_region", "region_at"]


def read_region(spec: str | Path | np.ndarray, sizes: Sequence[tuple[int, int]]) -> np.ndarray:
    """The boolean mask (H, W) that ``spec`` gives, in the frame of images of ``sizes``.

    Args:
        spec: ``"x,y,w,h"`` (pixels of the training images), a mask image file (white,
            above half brightness, is inspected) or a boolean/0-1 array.
        sizes: the training images' (height, width); the most common one is the frame.

    Example:
        >>> mask = read_region("2,1,3,2", [(4, 6)])
        >>> mask.astype(int).tolist()
        [[0, 0, 0, 0, 0, 0], [0, 0, 1, 1, 1, 0], [0, 0, 1, 1, 1, 0], [0, 0, 0, 0, 0, 0]]
    """
    height, width = Counter(sizes).most_common(1)[0][0]
    if isinstance(spec, np.ndarray):
        mask, name = spec.astype(bool), "the region array"
    elif isinstance(spec, str) and spec.count(",") == 3 and not Path(spec).exists():
        mask, name = _box(spec, height, width), f"--region {spec}"
    else:
        path = Path(spec)
        if not path.is_file():
            raise UserError(f"{path}: region mask not found (a mask image, or --region x,y,w,h)")
        try:
            with Image.open(path) as image:
                mask = np.asarray(image.convert("L")) > 127
        except OSError as error:
            raise UserError(f"{path}: not a readable mask image ({error})") from None
        name = str(path)
    if mask.ndim != 2:
        raise UserError(f"{name}: a region is one mask (H, W), got shape {mask.shape}")
    if abs(mask.shape[1] / mask.shape[0] - width / height) > 0.01 * width / height:
        raise UserError(
            f"{name}: the mask is {mask.shape[1]}x{mask.shape[0]} but the training images are "
            f"{width}x{height} (width x height); a region must have their shape"
        )
    if not mask.any():
        raise UserError(f"{name}: the region is empty (white marks where to inspect)")
    return mask


def region_at(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``mask`` at ``size`` (height, width): a pixel is inside when at least half of it is.

    The box filter makes each pixel the share of the original mask it covers, so a
    region survives any resize in either direction without shifting.
    """
    if mask.shape == tuple(size):
        return mask.astype(bool, copy=False)
    image = Image.fromarray(mask.astype(np.uint8) * 255)
    resized = image.resize((size[1], size[0]), Image.Resampling.BOX)
    return np.asarray(resized) >= 128


def encode_region(mask: np.ndarray) -> dict[str, Any]:
    """A mask as JSON: its shape, the share inside, and its bits packed in base64."""
    return {
        "height": int(mask.shape[0]),
        "width": int(mask.shape[1]),
        "inside": round(float(mask.mean()), 6),
        "bits": base64.b64encode(np.packbits(mask.astype(bool)).tobytes()).decode(),
    }


def decode_region(data: dict[str, Any]) -> np.ndarray:
    """The mask that :func:`encode_region` wrote."""
    height, width = int(data["height"]), int(data["width"])
    bits = np.frombuffer(base64.b64decode(data["bits"]), np.uint8)
    return np.unpackbits(bits, count=height * width).reshape(height, width).astype(bool)


def _box(spec: str, height: int, width: int) -> np.ndarray:
    try:
        x, y, w, h = (int(v) for v in spec.split(","))
    except ValueError:
        raise UserError(f"--region {spec}: a box is x,y,w,h in whole pixels") from None
    if w < 1 or h < 1 or x < 0 or y < 0 or x + w > width or y + h > height:
        raise UserError(
            f"--region {spec}: the box must lie inside the training images ({width}x{height}, "
            "width x height) and have a positive width and height"
        )
    mask = np.zeros((height, width), bool)
    mask[y : y + h, x : x + w] = True
    return mask

"""Synthetic defects pasted into good images: a labelled validation set for any data.

Choosing a default on a test set's labels tunes it to that set. Pasting defects
with known masks into held-out good images gives a validation set that needs no
labels at all. Five kinds, each drawn with equal probability:

- ``cutpaste``: a rectangle copied from elsewhere in the image, flipped or
  rotated by 90 degrees and brightened or darkened by 20-50 %;
- ``noise``: an ellipse whose pixels are mixed with Gaussian noise;
- ``scratch``: a line 2-6 px wide, darker or brighter than the surface;
- ``spot``: a disc 4-12 px across at the image's own resolution, dark on a bright
  surface or bright on a dark one: on a 5-megapixel photo a speck that a 256-pixel
  input shrinks below one pixel, so a choice of input size or tiles is not biased
  to large defects;
- ``faint``: a large ellipse (a sixth to a third of the image's side) whose texture
  is smoothed and brightness moved by 8-15 %: a region of changed texture, as a
  stain or an uneven coat.

Every defect changes its pixels (the faint ones subtly, the others clearly); the
mask is exactly the set of pixels that changed. Apart from the faint kind, defects
are a few percent of the image's area or less, like most real ones.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["DEFECT_KINDS", "paste_defect", "paste_defects"]

DEFECT_KINDS = ("cutpaste", "noise", "scratch", "spot", "faint")


def paste_defects(
    images: Sequence[np.ndarray], seed: int = 0, kinds: Sequence[str] = DEFECT_KINDS
) -> tuple[list[np.ndarray], list[np.ndarray], list[str]]:
    """One synthetic defect per image: (defective images, boolean masks, kinds).

    Args:
        images: float RGB images (H, W, 3) in [0, 1], as
            :func:`cflowad.data.images.load_image` gives.
        seed: the defects are a pure function of the images and the seed.
        kinds: the kinds drawn from, with equal probability.

    Example:
        >>> image = np.full((64, 48, 3), 0.5, np.float32)
        >>> defective, masks, kinds = paste_defects([image], seed=1)
        >>> bool(masks[0].any()), bool((defective[0] != image).any(axis=2)[~masks[0]].any())
        (True, False)
    """
    rng = np.random.default_rng(seed)
    out, masks, drawn = [], [], []
    for image in images:
        kind = kinds[int(rng.integers(len(kinds)))]
        defective, mask = paste_defect(image, kind, rng)
        out.append(defective)
        masks.append(mask)
        drawn.append(kind)
    return out, masks, drawn


def paste_defect(
    image: np.ndarray, kind: str, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """``image`` (H, W, 3) with one defect of ``kind``; returns (image, mask (H, W))."""
    height, width = image.shape[:2]
    result = image.astype(np.float32, copy=True)
    region = np.zeros((height, width), bool)
    if kind == "cutpaste":
        h = int(rng.integers(max(2, height // 12), max(3, height // 5)))
        w = int(rng.integers(max(2, width // 12), max(3, width // 5)))
        y0, x0 = _corner(rng, height, h), _corner(rng, width, w)
        patch = image[_corner(rng, height, h) :][:h, _corner(rng, width, w) :][:, :w]
        patch = patch[::-1] if rng.random() < 0.5 else patch[:, ::-1]
        if h == w and rng.random() < 0.5:
            patch = np.rot90(patch)
        gain = rng.choice([-1.0, 1.0]) * rng.uniform(0.2, 0.5)
        result[y0 : y0 + h, x0 : x0 + w] = np.clip(patch * (1 + gain) + 0.1 * gain, 0, 1)
        region[y0 : y0 + h, x0 : x0 + w] = True
    elif kind == "noise":
        region = _ellipse(rng, height, width, 30, 10)
        noise = rng.normal(0.0, rng.uniform(0.15, 0.35), (int(region.sum()), 1))
        result[region] = np.clip(result[region] * 0.5 + 0.25 + noise, 0, 1)
    elif kind == "scratch":
        length = rng.uniform(0.15, 0.4) * min(height, width)
        angle = rng.uniform(0, np.pi)
        cy, cx = rng.uniform(0.2, 0.8) * height, rng.uniform(0.2, 0.8) * width
        dy, dx = np.sin(angle), np.cos(angle)
        yy, xx = np.mgrid[:height, :width]
        along = (yy - cy) * dy + (xx - cx) * dx
        across = np.abs((yy - cy) * dx - (xx - cx) * dy)
        region = (np.abs(along) <= length / 2) & (across <= rng.uniform(1.0, 3.0))
        level = 0.05 if image[region].mean() > 0.5 else 0.95
        result[region] = level
    elif kind == "spot":
        radius = rng.uniform(2.0, 6.0)
        cy, cx = rng.uniform(radius, height - radius), rng.uniform(radius, width - radius)
        yy, xx = np.mgrid[:height, :width]
        region = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
        result[region] = 0.05 if image[region].mean() > 0.5 else 0.95
    elif kind == "faint":
        region = _ellipse(rng, height, width, 12, 6)
        smooth = _box_blur(image, max(1, round(min(height, width) / 100)))
        gain = 1 + rng.choice([-1.0, 1.0]) * rng.uniform(0.08, 0.15)
        result[region] = np.clip(smooth[region] * gain, 0, 1)
    else:
        raise ValueError(f"unknown defect kind {kind!r}; one of {', '.join(DEFECT_KINDS)}")
    changed = np.abs(result - image).max(axis=2) > 1e-3
    return np.where(changed[..., None], result, image).astype(np.float32), changed


def _ellipse(
    rng: np.random.Generator, height: int, width: int, smallest: int, largest: int
) -> np.ndarray:
    """A random ellipse inside the image, semi-axes between 1/``smallest`` and
    1/``largest`` of the image's side."""
    ry = rng.uniform(height / smallest, height / largest)
    rx = rng.uniform(width / smallest, width / largest)
    cy, cx = rng.uniform(ry, height - ry), rng.uniform(rx, width - rx)
    yy, xx = np.mgrid[:height, :width]
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1


def _box_blur(image: np.ndarray, radius: int) -> np.ndarray:
    """A (2r+1)-pixel box blur of each channel, edges repeated (separable cumulative sums)."""
    out = image.astype(np.float32)
    for axis in (0, 1):
        padded = np.concatenate(
            [
                np.repeat(out.take([0], axis), radius + 1, axis),
                out,
                np.repeat(out.take([-1], axis), radius, axis),
            ],
            axis,
        )
        total = np.cumsum(padded, axis=axis, dtype=np.float64)
        size = out.shape[axis]
        upper = total.take(np.arange(2 * radius + 1, 2 * radius + 1 + size), axis)
        lower = total.take(np.arange(size), axis)
        out = ((upper - lower) / (2 * radius + 1)).astype(np.float32)
    return out


def _corner(rng: np.random.Generator, side: int, extent: int) -> int:
    return int(rng.integers(0, max(1, side - extent + 1)))

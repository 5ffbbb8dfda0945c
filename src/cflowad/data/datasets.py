"""Data set layouts: which files train, which test, and where their masks are.

An MVTec AD category (``train/good``, ``test/<defect>``,
``ground_truth/<defect>/<stem>_mask.png``) or plain folders of images. A missing
folder, image or mask is a :class:`UserError` naming it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cflowad.common.errors import UserError
from cflowad.data.images import IMAGE_SUFFIXES, list_images, open_image

__all__ = ["TestSet", "find_test_set", "find_training_images", "load_mask"]


@dataclass(frozen=True)
class TestSet:
    """Test images with labels (0 good, 1 defective), defect types and optional masks."""

    images: list[Path]
    labels: np.ndarray
    defect_types: list[str]
    masks: list[Path | None]

    @property
    def has_masks(self) -> bool:
        """True when the set comes with ground-truth masks."""
        return any(m is not None for m in self.masks)


def load_mask(path: Path, expected_size: tuple[int, int] | None = None) -> np.ndarray:
    """A boolean (H, W) mask: any non-zero value is a defect."""
    with open_image(path) as image:
        values = np.asarray(image)
    if values.ndim == 3:
        values = np.asarray(values.any(axis=2))
    mask: np.ndarray = values != 0
    if expected_size is not None and mask.shape != expected_size:
        raise UserError(
            f"{path}: mask is {mask.shape[1]}x{mask.shape[0]}, its image is "
            f"{expected_size[1]}x{expected_size[0]}"
        )
    return mask


def find_training_images(data: Path) -> list[Path]:
    """train/good of an MVTec category, or the images of a plain folder."""
    if not data.exists():
        raise UserError(f"{data}: not found")
    if data.is_file():
        raise UserError(f"{data}: expected a folder (MVTec category or folder of images)")
    good = data / "train" / "good"
    return list_images(good if good.is_dir() else data)


def find_test_set(
    data: Path | None = None,
    good: Path | None = None,
    defective: Sequence[Path] = (),
    masks: Path | None = None,
    mask_suffix: str = "_mask",
) -> TestSet:
    """The test split of an MVTec category, or plain good/defective folders.

    MVTec: ``test/good`` is normal, every other ``test/<defect>`` is defective with
    masks in ``ground_truth/<defect>``. A set without a ``ground_truth`` folder
    has no masks; a defective image without its mask where masks exist is an error.
    """
    groups: list[tuple[str, list[Path], Path | None]] = []
    if data is not None:
        test = data / "test"
        if not test.is_dir():
            raise UserError(f"{data}: no test/ folder (expected an MVTec AD category)")
        truth = data / "ground_truth"
        for folder in sorted(p for p in test.iterdir() if p.is_dir()):
            mask_dir = None if folder.name == "good" or not truth.is_dir() else truth / folder.name
            groups.append((folder.name, list_images(folder), mask_dir))
    else:
        if good is None and not defective:
            raise UserError("give DATA (an MVTec category) or --good / --defective folders")
        if good is not None:
            groups.append(("good", list_images(good), None))
        for folder in defective:
            groups.append((folder.name, list_images(folder), masks))
    if not any(name == "good" for name, _, _ in groups):
        raise UserError(f"{data or good}: no good (defect-free) test images")
    images, labels, types, mask_paths = [], [], [], []
    for name, files, mask_dir in groups:
        for file in files:
            images.append(file)
            labels.append(0 if name == "good" else 1)
            types.append(name)
            mask_paths.append(None if mask_dir is None else _find_mask(file, mask_dir, mask_suffix))
    return TestSet(images, np.asarray(labels), types, mask_paths)


def _find_mask(image: Path, mask_dir: Path, suffix: str) -> Path:
    for extension in IMAGE_SUFFIXES:
        for candidate in (
            mask_dir / f"{image.stem}{suffix}{extension}",
            mask_dir / f"{image.stem}{extension}",
        ):
            if candidate.is_file():
                return candidate
    raise UserError(
        f"{image}: defective image without a mask in {mask_dir} "
        f"(looked for {image.stem}{suffix}.png)"
    )

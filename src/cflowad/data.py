"""Images in, tensors out: decoding every common format and finding data set layouts.

Layouts: an MVTec AD category (``train/good``, ``test/<defect>``,
``ground_truth/<defect>/<stem>_mask.png``) or plain folders of images. Every
problem with a file is a :class:`UserError` naming it; nothing is skipped silently.
"""

from __future__ import annotations

import io
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor
from torch.nn import functional as F

from cflowad.errors import UserError

__all__ = [
    "IMAGE_SUFFIXES",
    "ImageInput",
    "TestSet",
    "batches",
    "decode_image",
    "find_test_set",
    "find_training_images",
    "list_images",
    "load_image",
    "load_mask",
    "median_aspect_ratio",
    "readable",
    "to_model_input",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
ImageInput = str | Path | np.ndarray


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


def load_image(item: ImageInput) -> np.ndarray:
    """Decode a file or take an array; returns float32 RGB (H, W, 3) in [0, 1].

    Honours EXIF orientation; 16-bit images keep their precision; grayscale is
    repeated to three channels and alpha is dropped.
    """
    return _as_float(_load(item))


def decode_image(data: bytes, name: str) -> np.ndarray:
    """Bytes in memory (an upload) -> RGB (H, W, 3); errors start with ``name``.

    The same decoder as for files, and like a file waiting for its batch an 8-bit
    image stays uint8 (:func:`to_model_input` divides by 255 exactly as
    :func:`load_image` does): a server skips a float copy and its range check for
    every upload (0.2 ms of a 494 x 361 JPEG's 0.7) and holds a quarter of the
    memory per waiting image. Other depths give float32 in [0, 1].
    """
    if not data:
        raise UserError(f"{name}: empty (0 bytes)")
    with _decode(io.BytesIO(data), name) as image:
        return _image_to_rgb(image, name)


def _load(item: ImageInput) -> np.ndarray:
    """RGB (H, W, 3): uint8 for 8-bit images (a quarter of float32's memory while images
    wait for a batch), float32 in [0, 1] otherwise."""
    if isinstance(item, np.ndarray):
        return _array_to_rgb(item, "array")
    path = Path(item)
    with _open(path) as image:
        return _image_to_rgb(image, str(path))


def _image_to_rgb(image: Image.Image, name: str) -> np.ndarray:
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        array = np.asarray(image).astype(np.float32) / 65535.0
        return _array_to_rgb(np.clip(array, 0.0, 1.0), name)
    if image.mode == "F":
        return _array_to_rgb(np.asarray(image, dtype=np.float32), name)
    return np.array(image.convert("RGB"))  # writable: torch.from_numpy needs it


def _as_float(image: np.ndarray) -> np.ndarray:
    if image.dtype == np.uint8:
        return image.astype(np.float32) / 255.0
    return image


def load_mask(path: Path, expected_size: tuple[int, int] | None = None) -> np.ndarray:
    """A boolean (H, W) mask: any non-zero value is a defect."""
    with _open(path) as image:
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


def to_model_input(image: np.ndarray, size: tuple[int, int]) -> Tensor:
    """(H, W, 3) image, float in [0, 1] or uint8 -> (3, height, width) float tensor,
    antialiased bilinear resize."""
    tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None]
    if tensor.dtype == torch.uint8:
        tensor = tensor.float() / 255.0  # the same float32 division as load_image's
    if tuple(tensor.shape[-2:]) != tuple(size):
        tensor = F.interpolate(
            tensor, size=size, mode="bilinear", antialias=True, align_corners=False
        )
    return tensor[0].clamp_(0.0, 1.0)


def batches(
    items: Iterable[ImageInput], size: tuple[int, int], batch_size: int, workers: int = 2
) -> Iterator[tuple[Tensor, list[tuple[int, int]]]]:
    """Yield (images (B, 3, H, W), original (height, width) of each) in input order.

    Files decode in a thread pool (PIL releases the GIL) while the model scores the
    previous batch, at most one batch ahead: memory stays the same for ten images
    or a million. The decoding threads never run torch: a torch op in another thread
    starts a second OpenMP team, and with more OpenMP threads than cores every
    team slows down (the model's forward pass took 3.5x longer on 2 cores, measured
    in docs/design.md); resizing runs here, in the caller's thread. Arrays have
    nothing to decode and skip the pool (a server's lone image: 2 ms less).
    """
    source = iter(items)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        pending: deque[Future[np.ndarray]] = deque()

        def top_up() -> None:
            while len(pending) < batch_size + workers:
                item = next(source, None)
                if item is None:
                    return
                if isinstance(item, np.ndarray):  # nothing to decode: no thread hand-off
                    done: Future[np.ndarray] = Future()
                    try:
                        done.set_result(_load(item))
                    except UserError as error:  # raised in its turn, as a file's would be
                        done.set_exception(error)
                    pending.append(done)
                else:
                    pending.append(pool.submit(_load, item))

        top_up()
        batch: list[Tensor] = []
        sizes: list[tuple[int, int]] = []
        try:
            while pending:
                image = pending.popleft().result()
                top_up()
                batch.append(to_model_input(image, size))
                sizes.append((image.shape[0], image.shape[1]))
                del image
                if len(batch) == batch_size or not pending:
                    yield torch.stack(batch), sizes
                    batch, sizes = [], []
        finally:
            for future in pending:
                future.cancel()


def readable(files: Sequence[Path], workers: int = 2) -> tuple[list[int], list[str]]:
    """Indices of the files that decode, and one message per file that does not.

    The ``--skip-bad`` check: it decodes every file once before the run, so that
    an unreadable file becomes a warning instead of stopping the run midway.
    """

    def error(file: Path) -> str | None:
        try:
            load_image(file)
        except UserError as problem:
            return str(problem)
        return None

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        errors = list(pool.map(error, files))
    return [i for i, e in enumerate(errors) if e is None], [e for e in errors if e is not None]


def median_aspect_ratio(items: Sequence[ImageInput]) -> float:
    """Median width / height of the images, read from file headers (no decoding)."""
    ratios = []
    for item in items:
        if isinstance(item, np.ndarray):
            ratios.append(item.shape[1] / item.shape[0])
            continue
        with _open(Path(item), decode=False) as image:
            width, height = image.size
            if image.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # EXIF says: rotate 90 degrees
                width, height = height, width
        ratios.append(width / height)
    return float(np.median(ratios))


def list_images(folder: Path) -> list[Path]:
    """Image files of a folder (not recursive), sorted; an error if there are none."""
    if not folder.is_dir():
        raise UserError(f"{folder}: folder not found")
    files = sorted(
        p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )
    if not files:
        raise UserError(
            f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) directly in this folder "
            "(subfolders are not searched)"
        )
    return files


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


def _open(path: Path, decode: bool = True) -> Image.Image:
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise UserError(f"{path}: empty file (0 bytes)")
    return _decode(path, str(path), decode)


def _decode(source: Path | io.BytesIO, name: str, decode: bool = True) -> Image.Image:
    try:
        image = Image.open(source)
        width, height = image.size
        if Image.MAX_IMAGE_PIXELS is not None and width * height > Image.MAX_IMAGE_PIXELS:
            raise UserError(f"{name}: {width}x{height} pixels is too large to decode safely")
        if decode:
            image.load()
    except UserError:
        raise
    except Image.DecompressionBombError:
        raise UserError(f"{name}: too large to decode safely (decompression bomb)") from None
    except UnidentifiedImageError:
        raise UserError(f"{name}: not an image file") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise UserError(f"{name}: unreadable image ({error})") from None
    return image


def _array_to_rgb(array: np.ndarray, name: str) -> np.ndarray:
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] not in (3, 4):
        raise UserError(f"{name}: expected (H, W), (H, W, 3) or (H, W, 4), got {array.shape}")
    array = array[:, :, :3]
    if array.dtype == np.uint8:  # as a decoded 8-bit file: to_model_input divides
        return array
    if array.dtype == np.uint16:
        return array.astype(np.float32) / 65535.0
    array = array.astype(np.float32)
    if not np.isfinite(array).all() or array.min() < 0.0 or array.max() > 1.0:
        raise UserError(f"{name}: float images must hold finite values in [0, 1]")
    return array

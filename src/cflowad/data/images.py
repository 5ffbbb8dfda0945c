"""Images in, tensors out: decoding every common format, resizing, batching ahead.

Every problem with a file is a :class:`UserError` naming it; nothing is skipped
silently. Data set layouts (which files are training, test and mask images) are
:mod:`cflowad.data.datasets`.
"""

from __future__ import annotations

import io
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor
from torch.nn import functional as F

from cflowad.common.errors import UserError

__all__ = [
    "BATCH_PIXELS",
    "IMAGE_SUFFIXES",
    "ImageInput",
    "batches",
    "decode_image",
    "image_sizes",
    "list_images",
    "load_image",
    "open_image",
    "readable",
    "to_model_input",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
ImageInput = str | Path | np.ndarray


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
    with open_image(path) as image:
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


def to_model_input(image: np.ndarray, size: tuple[int, int]) -> Tensor:
    """(H, W, 3) image, float in [0, 1] or uint8 -> (3, height, width) float tensor,
    antialiased bilinear resize."""
    if not image.flags.writeable:  # np.asarray of a PIL image: torch wants its own copy
        image = image.copy()
    tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None]
    if tensor.dtype == torch.uint8:
        tensor = tensor.float() / 255.0  # the same float32 division as load_image's
    if tuple(tensor.shape[-2:]) != tuple(size):
        tensor = F.interpolate(
            tensor, size=size, mode="bilinear", antialias=True, align_corners=False
        )
    return tensor[0].clamp_(0.0, 1.0)


# 16 inputs of 512 x 512: models of the usual sizes batch as asked
BATCH_PIXELS = 2**22


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
    nothing to decode and skip the pool (a server's lone image: 2 ms less). Batches
    hold at most :data:`BATCH_PIXELS` input pixels (fewer images than ``batch_size``
    for inputs of megapixels: a tiled model's memory must not grow with the batch).
    """
    batch_size = max(1, min(batch_size, BATCH_PIXELS // (size[0] * size[1])))
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


def image_sizes(items: Sequence[ImageInput]) -> list[tuple[int, int]]:
    """(height, width) of each image as it is scored, from file headers (no decoding)."""
    sizes = []
    for item in items:
        if isinstance(item, np.ndarray):
            sizes.append((int(item.shape[0]), int(item.shape[1])))
            continue
        with open_image(Path(item), decode=False) as image:
            width, height = image.size
            if image.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # EXIF says: rotate 90 degrees
                width, height = height, width
        sizes.append((height, width))
    return sizes


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


def open_image(path: Path, decode: bool = True) -> Image.Image:
    """The file opened by Pillow (pixels decoded unless ``decode`` is False), or a UserError."""
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

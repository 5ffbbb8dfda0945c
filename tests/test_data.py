"""Every image a user may have, and every bad file, named in a clear error."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from cflowad.common.errors import UserError
from cflowad.data.datasets import find_test_set, find_training_images, load_mask
from cflowad.data.images import batches, decode_image, load_image, to_model_input

RNG = np.random.default_rng(0)
RGB = (RNG.random((30, 40, 3)) * 255).astype(np.uint8)


@pytest.mark.parametrize(
    ("mode", "suffix"),
    [
        ("RGB", ".png"),
        ("RGB", ".jpg"),
        ("L", ".bmp"),
        ("RGB", ".tiff"),
        ("RGBA", ".png"),
        ("P", ".png"),
    ],
)
def test_common_formats_decode_to_rgb_floats(tmp_path, mode, suffix):
    path = tmp_path / f"image{suffix}"
    Image.fromarray(RGB).convert(mode).save(path)
    image = load_image(path)
    assert image.shape == (30, 40, 3) and image.dtype == np.float32
    assert image.min() >= 0 and image.max() <= 1
    expected = np.asarray(Image.fromarray(RGB).convert(mode).convert("RGB")) / 255
    tolerance = 0.2 if suffix == ".jpg" else 1e-6
    assert np.abs(image - expected).mean() < tolerance


def test_sixteen_bit_keeps_precision(tmp_path):
    values = np.array([[0, 1, 65535, 40000]], dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    image = load_image(path)
    np.testing.assert_allclose(image[0, :, 0], values[0] / 65535, rtol=1e-6)


def test_exif_orientation_is_honoured(tmp_path):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.fromarray(RGB).save(path, exif=exif)
    assert load_image(path).shape == (40, 30, 3)


@pytest.mark.parametrize(
    ("content", "message"), [(b"", "empty file"), (b"plain text", "not an image")]
)
def test_bad_files_are_named(tmp_path, content, message):
    path = tmp_path / "bad.png"
    path.write_bytes(content)
    with pytest.raises(UserError, match=f"bad.png: {message}"):
        load_image(path)


def test_truncated_image_is_named(tmp_path):
    path = tmp_path / "cut.png"
    Image.fromarray(RGB).save(path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(UserError, match=r"cut.png: unreadable"):
        load_image(path)


def test_decompression_bomb_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.fromarray(RGB).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(UserError, match=r"big.png: .*too large"):
        load_image(path)


def test_arrays_are_accepted_and_checked():
    assert load_image(RGB[:, :, 0]).shape == (30, 40, 3)
    with pytest.raises(UserError, match=r"finite values in"):
        load_image(np.full((4, 4), 3.0))


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".bmp", ".tiff"])
def test_bytes_decode_exactly_as_the_file(tmp_path, suffix):
    path = tmp_path / f"image{suffix}"
    Image.fromarray(RGB).save(path)
    decoded = decode_image(path.read_bytes(), "upload")
    assert decoded.dtype == np.uint8  # 8-bit stays 8-bit until it is resized
    np.testing.assert_array_equal(decoded / np.float32(255), load_image(path))
    expected = to_model_input(load_image(path), (24, 32))
    assert torch.equal(to_model_input(decoded, (24, 32)), expected)


def test_sixteen_bit_bytes_decode_to_float_exactly_as_the_file(tmp_path):
    path = tmp_path / "deep.png"
    Image.fromarray((RNG.random((30, 40)) * 65535).astype(np.uint16)).save(path)
    decoded = decode_image(path.read_bytes(), "upload")
    assert decoded.dtype == np.float32
    np.testing.assert_array_equal(decoded, load_image(path))


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"", "upload: empty"), (b"plain text", "upload: not an image"), (b"\x89PNG\r\n", "upload")],
)
def test_bad_bytes_are_named(content, message):
    with pytest.raises(UserError, match=message):
        decode_image(content, "upload")


def test_batches_equal_one_image_at_a_time(tmp_path):
    """Batches resize 8-bit images from uint8 in the calling thread; the tensors must be
    those of load_image's floats, bit for bit."""
    files = []
    for i in range(5):
        files.append(tmp_path / f"{i}.png")
        Image.fromarray(np.roll(RGB, i, axis=1)).save(files[-1])
    files.append(tmp_path / "deep.png")
    Image.fromarray((RNG.random((30, 40)) * 65535).astype(np.uint16)).save(files[-1])
    expected = torch.stack([to_model_input(load_image(f), (32, 64)) for f in files])
    got = [(b, s) for b, s in batches(files, (32, 64), batch_size=4)]
    assert [len(b) for b, _ in got] == [4, 2]
    assert torch.equal(torch.cat([b for b, _ in got]), expected)
    assert [s for _, sizes in got for s in sizes] == [(30, 40)] * 6


def _mvtec(root, with_mask=True, mask_size=(20, 20)):
    for folder in ("train/good", "test/good", "test/crack", "ground_truth/crack"):
        (root / folder).mkdir(parents=True)
    for folder in ("train/good", "test/good", "test/crack"):
        Image.fromarray(RGB[:20, :20]).save(root / folder / "a.png")
    if with_mask:
        mask = np.zeros(mask_size, np.uint8)
        mask[2:5, 2:5] = 7
        Image.fromarray(mask).save(root / "ground_truth/crack/a_mask.png")
    return root


def test_mvtec_layout(tmp_path):
    root = _mvtec(tmp_path / "cat")
    assert find_training_images(root) == [root / "train/good/a.png"]
    test = find_test_set(root)
    assert list(test.labels) == [1, 0] and test.defect_types == ["crack", "good"]
    mask = load_mask(test.masks[0], (20, 20))
    assert mask.dtype == bool and mask.sum() == 9


def test_missing_and_mismatched_masks_are_errors(tmp_path):
    with pytest.raises(UserError, match=r"a.png: defective image without a mask"):
        find_test_set(_mvtec(tmp_path / "one", with_mask=False))
    root = _mvtec(tmp_path / "two", mask_size=(20, 21))
    with pytest.raises(UserError, match=r"a_mask.png: mask is 21x20, its image is 20x20"):
        load_mask(find_test_set(root).masks[0], (20, 20))


def test_empty_folder_is_an_error(tmp_path):
    with pytest.raises(UserError, match=r"no images"):
        find_training_images(tmp_path)

"""The inspection region: maps zero and scores blind outside it, in every runtime."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from matplotlib.path import Path as MplPath
from PIL import Image, ImageFilter

import cflowad
from cflowad import CFlowAD
from cflowad.cli import main
from cflowad.common.errors import UserError
from cflowad.data.images import batches, load_image
from cflowad.data.synthetic import paste_defects
from cflowad.method.region import (
    decode_region,
    draw_region,
    encode_region,
    read_region,
    region_at,
)
from cflowad.method.scoring import readable
from cflowad.selection.int8 import on_synthetic_defects

FAST = ["--image-size", "64", "--steps", "20", "--no-compile", "--quiet"]
CENTRE, RADIUS = (64, 64), 40  # a disc in the 128 x 128 texture images


def disc(size: int = 128) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size] * (128 / size) + 64 / size
    return (yy - CENTRE[0]) ** 2 + (xx - CENTRE[1]) ** 2 <= RADIUS**2


def test_a_box_and_a_mask_image_give_the_same_region(tmp_path):
    file = tmp_path / "region.png"
    box = np.zeros((120, 160), bool)
    box[30:90, 40:140] = True
    Image.fromarray(box.astype(np.uint8) * 255).save(file)
    assert np.array_equal(read_region("40,30,100,60", [(120, 160)]), box)
    assert np.array_equal(read_region(str(file), [(120, 160)] * 3 + [(50, 50)]), box)
    # a mask at another resolution of the same shape is the same region
    half = tmp_path / "half.png"
    Image.fromarray(box[::2, ::2].astype(np.uint8) * 255).save(half)
    assert np.array_equal(read_region(str(half), [(120, 160)]), box[::2, ::2])
    assert np.array_equal(decode_region(encode_region(box)), box)
    # resizing keeps the share inside and its place
    small = region_at(box, (60, 80))
    assert small.mean() == pytest.approx(box.mean(), abs=0.01)
    assert np.array_equal(small, box[::2, ::2])


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("0,0,0,10", "positive width"),
        ("100,0,100,10", "inside the training images"),
        ("a,b,c,d", "x,y,w,h"),
        ("missing.png", "not found"),
    ],
)
def test_a_wrong_region_is_a_one_line_error(spec, message):
    with pytest.raises(UserError, match=message):
        read_region(spec, [(120, 160)])


def test_a_mask_of_another_shape_or_empty_is_refused(tmp_path):
    wrong, empty = tmp_path / "wrong.png", tmp_path / "empty.png"
    Image.fromarray(np.full((100, 100), 255, np.uint8)).save(wrong)
    Image.fromarray(np.zeros((120, 160), np.uint8)).save(empty)
    with pytest.raises(UserError, match="100x100 but the training images are 160x120"):
        read_region(str(wrong), [(120, 160)])
    with pytest.raises(UserError, match="empty"):
        read_region(str(empty), [(120, 160)])


def test_a_drawn_polygon_holds_the_pixels_whose_centre_it_holds():
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:120, :160] + 0.5
    centres = np.stack([xx.ravel(), yy.ravel()], 1)
    for _ in range(5):  # concave polygons, checked against matplotlib's point-in-polygon
        angles = np.sort(rng.uniform(0, 2 * np.pi, 9))
        radii = rng.uniform(10, 55, 9)
        points = np.stack([80 + radii * np.cos(angles), 60 + radii * np.sin(angles)], 1)
        reference = MplPath(points).contains_points(centres).reshape(120, 160)
        drawn = draw_region({"shapes": [{"points": points.tolist()}]}, 120, 160)
        assert np.array_equal(drawn, reference)
    # the polygon of a box is the box's region, pixel for pixel
    corners = [[40, 30], [140, 30], [140, 90], [40, 90]]
    box = read_region("40,30,100,60", [(120, 160)])
    assert np.array_equal(draw_region({"shapes": [{"points": corners}]}, 120, 160), box)
    # drawn on a half-size sample: the same region in the training images' pixels
    half = {"shapes": [{"points": (np.array(corners) / 2).tolist()}], "width": 80, "height": 60}
    assert np.array_equal(draw_region(half, 120, 160), box)


def test_the_region_is_the_drawn_shapes_less_the_cut_out_ones(tmp_path):
    outer = [[0, 0], [160, 0], [160, 120], [0, 120]]
    hole = [[40, 30], [140, 30], [140, 90], [40, 90]]
    box = read_region("40,30,100,60", [(120, 160)])
    file = tmp_path / "drawn.json"
    file.write_text(json.dumps({"shapes": [{"points": outer}, {"points": hole, "exclude": True}]}))
    assert np.array_equal(read_region(str(file), [(120, 160)]), ~box)
    # cut-outs alone are cut from the whole image
    only_cut = {"shapes": [{"points": hole, "exclude": True}]}
    assert np.array_equal(draw_region(only_cut, 120, 160), ~box)
    # two shapes that overlap are their union, not their even-odd difference
    left, right = (
        read_region("0,0,100,120", [(120, 160)]),
        read_region("60,0,100,120", [(120, 160)]),
    )
    both = {
        "shapes": [
            {"points": [[0, 0], [100, 0], [100, 120], [0, 120]]},
            {"points": [[60, 0], [160, 0], [160, 120], [60, 120]]},
        ]
    }
    assert np.array_equal(draw_region(both, 120, 160), left | right)


@pytest.mark.parametrize(
    ("drawn", "message"),
    [
        ({"shapes": []}, "shapes"),
        ([[0, 0], [1, 1]], "shapes"),
        ({"shapes": [{"points": [[0, 0], [10, 10]]}]}, "shape 1 needs three"),
        ({"shapes": [{"points": [[0, 0], [10, "a"], [5, 5]]}]}, "shape 1 needs three"),
        (
            {
                "shapes": [
                    {"points": [[0, 0], [10, 0], [5, 5]]},
                    {"points": [[0, 0], [999, 0], [5, 5]]},
                ]
            },
            "shape 2 leaves the image",
        ),
        (
            {"shapes": [{"points": [[0, 0], [10, 0], [5, 5]]}], "width": 100, "height": 100},
            "drawn on a 100x100 image",
        ),
        (
            {
                "shapes": [
                    {"points": [[0, 0], [10, 0], [10, 10], [0, 10]], "exclude": True},
                    {"points": [[0, 0], [10, 0], [10, 10], [0, 10]]},
                ]
            },
            "empty",
        ),
    ],
)
def test_a_wrong_drawing_is_a_one_line_error(drawn, message, tmp_path):
    file = tmp_path / "drawn.json"
    file.write_text(json.dumps(drawn))
    with pytest.raises(UserError, match=message):
        read_region(str(file), [(120, 160)])


@pytest.fixture(scope="module")
def region_model(texture_dataset, tmp_path_factory):
    root = tmp_path_factory.mktemp("region")
    mask = root / "region.png"
    Image.fromarray(disc().astype(np.uint8) * 255).save(mask)
    out = root / "model"
    assert (
        main(["train", str(texture_dataset), "--out", str(out), "--region", str(mask), *FAST]) == 0
    )
    return out


def test_the_score_is_the_maximum_of_the_map_inside_the_region(region_model, texture_dataset):
    """Brute force: the same network without its region, on the images with the outside
    painted in the encoder's input mean; its map's maximum inside the region."""
    model = CFlowAD.load(region_model, device="cpu")
    meta = json.loads((region_model / "model.json").read_text())
    assert meta["format_version"] == 4 and meta["training"]["region_inside"] > 0
    inside = torch.from_numpy(decode_region(meta["region"]))
    assert tuple(inside.shape) == (64, 64)
    assert inside.float().mean() == pytest.approx(np.pi * 20**2 / 64**2, abs=0.02)
    images = sorted((texture_dataset / "test").glob("*/*.png"))
    batch = torch.cat([b for b, _ in batches(images, (64, 64), 64)])
    mean = model.net.encoder.mean
    with torch.inference_mode():
        scores, maps, raw = model.net(batch)
        model.net.set_region(None)
        painted = torch.where(inside, batch, mean.expand_as(batch))
        full = model.net.raw_map(model.net.log_likelihoods(painted))
    assert (maps[:, ~inside] == 0).all() and (maps[:, inside] > 0).all()
    expected = full[:, inside].amax(dim=1)
    torch.testing.assert_close(raw, expected)
    torch.testing.assert_close(scores, readable(expected, model.net.image_threshold))


def test_specks_outside_the_region_change_nothing(region_model, texture_dataset):
    model = CFlowAD.load(region_model, device="cpu")
    clean = np.asarray(Image.open(sorted((texture_dataset / "test" / "good").glob("*.png"))[0]))
    dusty = clean.copy()
    rng = np.random.default_rng(0)
    # dark and bright specks in the corners, at least 4 pixels from the disc
    far = ~np.asarray(
        Image.fromarray(disc().astype(np.uint8) * 255).filter(ImageFilter.MaxFilter(9))
    ).astype(bool)
    ys, xs = np.nonzero(far)
    for i in rng.choice(len(ys), 300, replace=False):
        dusty[ys[i], xs[i]] = 0 if i % 2 else 255
    before, after = model.predict([clean, dusty]).maps
    scores = model.predict([clean, dusty]).scores
    assert scores[0] == scores[1]
    np.testing.assert_array_equal(before, after)
    model.net.set_region(None)  # the network without its region sees the specks
    model.region = None
    assert model.predict(dusty).raw_scores[0] != model.predict(clean).raw_scores[0]


def test_maps_are_zero_outside_the_region_in_every_runtime(region_model, texture_dataset, tmp_path):
    onnx_file, folder = tmp_path / "model.onnx", tmp_path / "openvino"
    assert main(["export", str(region_model), "--onnx", str(onnx_file), "--quiet"]) == 0
    assert main(["export", str(region_model), "--openvino", str(folder), "--quiet"]) == 0
    images = [str(p) for p in sorted((texture_dataset / "test").glob("*/*.png"))]
    outside = ~disc()
    # further than one input pixel (2 image pixels) outside the drawn disc
    eroded = Image.fromarray(outside.astype(np.uint8) * 255).filter(ImageFilter.MinFilter(5))
    far = np.asarray(eroded).astype(bool)
    results = {}
    for name, model in (("torch", region_model), ("onnx", onnx_file), ("openvino", folder)):
        out = tmp_path / f"out-{name}"
        assert main(["predict", str(model), *images, "--out", str(out), "-q"]) == 0
        records = json.loads((out / "predictions.json").read_text())
        maps = [np.load(out / r["map"]) for r in records]
        assert all(m.shape == (128, 128) and (m[far] == 0).all() for m in maps)
        assert all(m[disc()].max() > 0 for m in maps)
        results[name] = (np.array([r["score"] for r in records]), np.stack(maps))
        assert cflowad.load(model).region_at((128, 128)) is not None
    for name in ("onnx", "openvino"):
        np.testing.assert_allclose(results[name][0], results["torch"][0], atol=1e-5)
        np.testing.assert_allclose(results[name][1], results["torch"][1], atol=1e-4)


def test_region_errors_stop_before_training(texture_dataset, tmp_path, capsys):
    out = tmp_path / "model"
    command = ["train", str(texture_dataset), "--out", str(out), *FAST]
    assert main([*command, "--region", "0,0,500,10"]) == 2
    assert "--region 0,0,500,10" in capsys.readouterr().err
    assert not out.exists()
    assert (
        main(["train", str(texture_dataset.parent), "--out", str(out), "--region", "0,0,5,5"]) == 2
    )
    assert "root of categories" in capsys.readouterr().err


def test_the_server_answers_with_the_region_applied(region_model, texture_dataset, served_map):
    image = sorted((texture_dataset / "test" / "patch").glob("*.png"))[0]
    model = cflowad.load(region_model)
    expected = model.predict(str(image))
    score, served = served_map(region_model, image)
    assert score == pytest.approx(float(expected.scores[0]), abs=1e-6)
    np.testing.assert_allclose(served, expected.maps[0], atol=1.5 / 65535)
    outside = ~model.region_at((128, 128))
    assert (served[outside] == 0).all() and outside.mean() > 0.5


def test_the_flows_train_and_calibrate_on_the_cells_that_touch_the_region():
    from cflowad.method.config import Config
    from cflowad.method.scoring import CFlowNet

    net = CFlowNet.build(Config(encoder_weights="random", image_size=64), pretrained=False)
    assert net.region_cells(0) is None
    mask = region_at(disc(), (64, 64))
    net.set_region(mask)
    for k, stride in enumerate((8, 16, 32)):
        cells = net.region_cells(k)
        assert cells is not None
        side = 64 // stride
        brute = mask.reshape(side, stride, side, stride).any(axis=(1, 3))
        np.testing.assert_array_equal(cells.numpy(), brute)


def test_int8_choice_counts_only_the_synthetic_defects_the_region_can_see(
    region_model, texture_dataset
):
    """As train --tune: a pasted defect wholly outside the region is not counted."""
    model = CFlowAD.load(region_model, device="cpu")
    held = sorted((texture_dataset / "train" / "good").glob("*.png"))[:8]
    figures = on_synthetic_defects({"float": model}, held, (0, 1))
    clean = [load_image(path) for path in held]
    pasted = [m for seed in (0, 1) for m in paste_defects(clean, seed=seed)[1]]
    seen = sum(bool((mask & disc()).any()) for mask in pasted)
    assert 0 < seen < len(pasted)
    assert figures["float"]["defects"] == seen

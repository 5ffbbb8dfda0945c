"""train --tune: candidates compared on synthetic defects, never on the test set."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from cflowad import CFlowAD
from cflowad.cli import main
from cflowad.data.synthetic import DEFECT_KINDS, paste_defect
from cflowad.method.config import Config
from cflowad.selection.tune import candidates

pytestmark = pytest.mark.slow  # trains several candidates


@pytest.mark.parametrize("kind", DEFECT_KINDS)
def test_each_synthetic_defect_changes_exactly_its_mask(kind):
    rng = np.random.default_rng(3)
    image = np.random.default_rng(0).uniform(0.3, 0.7, (300, 400, 3)).astype(np.float32)
    for _ in range(5):
        defective, mask = paste_defect(image, kind, rng)
        changed = np.abs(defective - image).max(axis=2) > 0
        assert np.array_equal(changed, mask) and mask.any()
        if kind == "spot":  # a speck at the image's own resolution: a few pixels across
            rows, cols = np.nonzero(mask)
            assert 3 <= np.ptp(rows) + 1 <= 13 and 3 <= np.ptp(cols) + 1 <= 13
        if kind == "faint":  # large and subtle
            assert mask.mean() > 0.02
            assert np.abs(defective - image).max() < 0.4


def test_candidates_are_the_configured_model_first_then_cheapest():
    found = candidates(Config(image_size=256))
    assert [(c.decoder, c.image_size) for c in found] == [
        ("flow", (256, 256)),
        ("gaussian", (256, 256)),
        ("gaussian", (224, 224)),
        ("gaussian", (320, 320)),
        ("flow", (224, 224)),
        ("flow", (320, 320)),
    ]
    # photos of more than twice the input's pixels: the flows at their own size in
    # tiles instead of the flows at 5/4
    photos = candidates(Config(image_size=256), [(427, 640)] * 5 + [(300, 300)])
    assert [(c.decoder, c.image_size, c.tile_size) for c in photos[-2:]] == [
        ("flow", (224, 224), None),
        ("flow", (416, 640), 256),
    ]
    assert candidates(Config(image_size=256), [(300, 300)] * 5) == found


def test_tune_keeps_the_best_candidate_on_synthetic_defects_without_reading_tests(
    make_textures, tmp_path, capsys
):
    data = make_textures(tmp_path / "brick", n_train=60)
    # the test set is unreadable: --tune must never open it
    for image in (data / "test").rglob("*.png"):
        image.write_bytes(b"not an image")
    shutil.rmtree(data / "ground_truth")
    out = tmp_path / "model"
    fast = ["--image-size", "64", "--steps", "20", "--no-compile"]
    assert main(["train", str(data), "--out", str(out), "--tune", *fast]) == 0
    printed = capsys.readouterr().out
    assert "--tune: mean of image AUROC and AUPRO" in printed
    meta = json.loads((out / "model.json").read_text())
    tune = meta["training"]["tune"]
    rows = tune["candidates"]
    # flows and Gaussian at 64 px (7/8 and 5/4 round to 64), and the flows at the images'
    # own 128 px (4x the pixels) in one tile of 128: 3 weightings each
    assert len(rows) == 9
    assert [r["tile_size"] for r in rows[::3]] == [None, None, 128]
    assert rows[-1]["size"] == "128x128" and " tile " in printed
    chosen = [r for r in rows if r["chosen"]]
    assert len(chosen) == 1
    assert chosen[0]["criterion"] == max(r["criterion"] for r in rows)
    for row in rows:
        assert row["criterion"] == pytest.approx((row["image_auroc"] + row["aupro"]) / 2, abs=1e-4)
    config = meta["config"]
    assert config["decoder"] == chosen[0]["decoder"]
    weights = {"equal": None, "finest x2": [2.0, 1.0, 1.0], "coarsest x2": [1.0, 1.0, 2.0]}
    assert config["scale_weights"] == weights[chosen[0]["scale_weights"]]
    assert tune["validation_images"] == {"clean": 3, "defective": 6}
    assert meta["training"]["n_calibration"] == 6  # recalibrated on every held-out image
    model = CFlowAD.load(out)
    assert model.net.scale_weights == list(weights[chosen[0]["scale_weights"]] or [1.0] * 3)


def test_tune_budget_skips_candidates_and_errors_are_one_line(make_textures, tmp_path, capsys):
    data = make_textures(tmp_path / "brick", n_train=60)
    out = tmp_path / "model"
    fast = ["--image-size", "64", "--steps", "20", "--no-compile", "--quiet"]
    assert (
        main(["train", str(data), "--out", str(out), "--tune", "--tune-budget", "1e-6", *fast]) == 0
    )
    rows = json.loads((out / "model.json").read_text())["training"]["tune"]["candidates"]
    assert [r["decoder"] for r in rows if r.get("skipped")] == ["gaussian", "flow"]
    assert len([r for r in rows if not r.get("skipped")]) == 3  # the configured flow only
    assert main(["train", str(data), "--out", str(tmp_path / "m2"), "--tune-budget", "5"]) == 2
    assert "--tune-budget" in capsys.readouterr().err
    few = make_textures(tmp_path / "few", n_train=20)
    assert main(["train", str(few), "--out", str(tmp_path / "m3"), "--tune", *fast]) == 2
    assert "--tune needs at least 6 held-out images" in capsys.readouterr().err
    assert not (tmp_path / "m3").exists()

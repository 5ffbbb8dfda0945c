"""The model's card (cflowad.engine.catalog): every kind of model path read into one typed
record, one identity per model, and a load that refuses thresholds whose two copies
(the weights file's buffers, model.json's numbers) disagree."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest

from cflowad import load
from cflowad.common.errors import UserError
from cflowad.engine.catalog import identity, model_format, model_kind, read_card
from cflowad.engine.model import CFlowAD
from cflowad.method.calibration import Calibration

RNG = np.random.default_rng(0)
IMAGES = [RNG.random((64, 64, 3), dtype=np.float32) for _ in range(12)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A Gaussian model on random images: fitted in a second, saved as train saves."""
    out = tmp_path_factory.mktemp("card") / "part"
    CFlowAD(decoder="gaussian", encoder_weights="random", image_size=64, min_holdout=4).fit(
        IMAGES
    ).save(out)
    return out


def test_the_card_of_a_model_directory_says_what_its_files_say(model_dir):
    card = read_card(model_dir)
    meta = json.loads((model_dir / "model.json").read_text())
    assert (card.name, card.kind, card.format) == ("part", "directory", "model directory")
    assert [p.name for p in card.files] == ["model.json", "model.safetensors"]
    # the identity is the weights' SHA-256, computed here independently
    weights = hashlib.sha256((model_dir / "model.safetensors").read_bytes()).hexdigest()
    assert card.identity == weights == identity(model_dir)
    assert card.config == meta["config"] and card.training == meta["training"]
    # the typed calibration is model.json's entry, and writes it back key for key
    assert card.calibration.to_dict() == meta["calibration"]
    assert list(card.calibration.to_dict()) == list(meta["calibration"])
    assert card.calibration == CFlowAD.load(model_dir).calibration


def test_the_card_of_an_onnx_file_any_case_of_its_suffix(model_dir, tmp_path):
    source = CFlowAD.load(model_dir)
    onnx = tmp_path / "PART.ONNX"
    source.export_onnx(onnx)
    assert model_kind(onnx) == "onnx" and model_format(onnx) == "onnx"
    card = read_card(onnx)
    assert card.identity == hashlib.sha256(onnx.read_bytes()).hexdigest() == identity(onnx)
    assert card.calibration == source.calibration  # the export carries the same record
    assert card.config["decoder"] == "gaussian" and card.config["image_size"] == [64, 64]
    # 0.14.2 listed X.ONNX as a model but sent it to the directory loader
    loaded = load(onnx)
    assert loaded.predict(IMAGES[:2]).scores == pytest.approx(
        source.predict(IMAGES[:2]).scores, abs=1e-5
    )


def test_a_path_that_holds_no_model_has_no_card(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    for path in (tmp_path, tmp_path / "notes.txt", tmp_path / "missing"):
        assert model_kind(path) is None and identity(path) is None
        with pytest.raises(UserError, match="not a model"):
            read_card(path)


def test_a_load_refuses_thresholds_whose_two_copies_disagree(model_dir, tmp_path):
    edited = tmp_path / "edited"
    shutil.copytree(model_dir, edited)
    meta_path = edited / "model.json"
    meta = json.loads(meta_path.read_text())
    meta["calibration"]["image_threshold_raw"] *= 0.9  # by hand, the weights untouched
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(UserError, match="image_threshold_raw disagrees with the weights"):
        CFlowAD.load(edited)
    meta["calibration"]["image_threshold_raw"] /= 0.9
    meta["calibration"]["reference"][0] += 1e-3
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(UserError, match="reference disagrees"):
        CFlowAD.load(edited)
    # a threshold moved through the model keeps both copies together
    model = CFlowAD.load(model_dir)
    model.set_image_threshold(0.42, source="test")
    model.save(tmp_path / "moved")
    assert CFlowAD.load(tmp_path / "moved").calibration.image_threshold_raw == 0.42


def test_calibration_records_round_trip_and_move_as_the_closed_form_says():
    held = [0.1, 0.2, 0.3, 0.4]
    entry = {
        "reference": [1.0, 2.0, 3.0],
        "image_threshold_raw": 0.35,
        "pixel_threshold_raw": 0.5,
        "holdout_raw_scores": held,
        "from_a_newer_cflowad": True,  # ignored
    }
    calibration = Calibration.from_dict(entry)
    assert calibration.reference == (1.0, 2.0, 3.0) and calibration.image_fpr is None
    moved = calibration.with_image_threshold(0.25, "by hand")
    # (m + 1) / (n + 1): two of four held-out scores above 0.25
    assert moved.image_fpr_achievable == pytest.approx(3 / 5)
    assert moved.image_threshold_source == "by hand" and calibration.image_threshold_raw == 0.35
    assert Calibration.from_dict(moved.to_dict()) == moved
    with pytest.raises(KeyError, match="pixel_threshold_raw"):
        Calibration.from_dict({"reference": [], "image_threshold_raw": 0.5})

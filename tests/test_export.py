"""ONNX export and bench: ONNX Runtime reproduces PyTorch on real images; the bench keys."""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

from cflowad import CFlowAD
from cflowad.cli import main
from cflowad.common.errors import UserError
from cflowad.data.datasets import find_test_set
from cflowad.data.images import batches
from cflowad.engine.onnx import OnnxModel

FAST = ["--image-size", "64", "--steps", "20", "--no-compile", "--quiet"]


@pytest.fixture(scope="module")
def model_dir(texture_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "model"
    assert main(["train", str(texture_dataset), "--out", str(out), *FAST]) == 0
    return out


@pytest.fixture(scope="module")
def exported(model_dir):
    file = model_dir.parent / "model.onnx"
    assert main(["export", str(model_dir), "--onnx", str(file), "--quiet"]) == 0
    return file


def test_onnx_runtime_gives_pytorchs_scores_maps_and_decisions(
    model_dir, exported, texture_dataset
):
    file = exported
    model = CFlowAD.load(model_dir)
    test = find_test_set(texture_dataset)
    images = torch.cat([b for b, _ in batches(test.images, model.config.image_size, 64)])
    with torch.inference_mode():
        scores, maps, raw = model.net(images)
    session = onnxruntime.InferenceSession(str(file), providers=["CPUExecutionProvider"])
    got = dict(
        zip(
            ("scores", "anomalous", "maps", "masks", "raw_scores"),
            session.run(None, {"images": images.numpy()}),
            strict=True,
        )
    )
    np.testing.assert_allclose(got["maps"], maps.numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(got["scores"], scores.numpy(), rtol=1e-5)
    np.testing.assert_allclose(got["raw_scores"], raw.numpy(), rtol=1e-5)
    clear = np.abs(scores.numpy() - 0.5) > 1e-5
    assert np.array_equal(got["anomalous"][clear], (scores.numpy() > 0.5)[clear])
    assert got["anomalous"].any() and not got["anomalous"].all()
    assert np.array_equal(got["masks"], got["maps"] > np.float32(0.5))
    metadata = {
        p.key: p.value for p in onnx.load(str(file), load_external_data=False).metadata_props
    }
    calibration = model.calibration
    assert float(metadata["image_threshold_raw"]) == calibration["image_threshold_raw"]
    assert float(metadata["pixel_threshold_raw"]) == calibration["pixel_threshold_raw"]
    assert metadata["image_size"] == "64,64"


def test_export_replaces_its_own_file_but_never_a_users(model_dir, exported, tmp_path, capsys):
    own = tmp_path / "model.onnx"
    shutil.copy(exported, own)
    assert main(["export", str(model_dir), "--onnx", str(own), "--quiet"]) == 0
    users = tmp_path / "notes.onnx"
    users.write_text("my notes")
    assert main(["export", str(model_dir), "--onnx", str(users), "--quiet"]) == 2
    assert "notes.onnx" in capsys.readouterr().err
    assert users.read_text() == "my notes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "notes.onnx"]


def test_export_without_the_onnx_packages_says_what_to_install(
    model_dir, tmp_path, monkeypatch, capsys
):
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    assert main(["export", str(model_dir), "--onnx", str(tmp_path / "m.onnx"), "--quiet"]) == 2
    assert "pip install 'cflowad[onnx]'" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_predict_and_test_on_the_onnx_file_equal_the_model_directory(
    model_dir, exported, texture_dataset, tmp_path
):
    images = [str(p) for p in sorted((texture_dataset / "test").glob("*/*.png"))]
    for name, model in (("torch", model_dir), ("onnx", exported)):
        out = tmp_path / name
        assert (
            main(["predict", str(model), *images, "--out", str(out), "--batch-size", "3", "-q"])
            == 0
        )
        assert (
            main(["test", str(model), str(texture_dataset), "--json", str(out / "m.json"), "-q"])
            == 0
        )
    torch_records = json.loads((tmp_path / "torch" / "predictions.json").read_text())
    onnx_records = json.loads((tmp_path / "onnx" / "predictions.json").read_text())
    for ours, theirs in zip(onnx_records, torch_records, strict=True):
        assert ours["score"] == pytest.approx(theirs["score"], rel=1e-4)
        expected = np.load(tmp_path / "torch" / theirs["map"])
        got = np.load(tmp_path / "onnx" / ours["map"])
        assert got.shape == expected.shape
        assert np.abs(got - expected).max() <= 1e-4
    assert [r["anomalous"] for r in onnx_records] == [r["anomalous"] for r in torch_records]
    torch_metrics = json.loads((tmp_path / "torch" / "m.json").read_text())
    onnx_metrics = json.loads((tmp_path / "onnx" / "m.json").read_text())
    for key in ("image_auroc", "pixel_auroc", "aupro"):
        assert onnx_metrics[key] == pytest.approx(torch_metrics[key], abs=1e-3)
    in_python = OnnxModel(exported).predict(str(texture_dataset / "test" / "patch"))
    patch_scores = [r["score"] for r in onnx_records if "/patch/" in r["image"]]
    np.testing.assert_allclose(in_python.scores, patch_scores, rtol=1e-5)
    streamed = list(OnnxModel(exported).predict_iter(texture_dataset / "test" / "patch", 3))
    assert [r.index for r in streamed] == list(range(len(patch_scores)))
    np.testing.assert_allclose([r.score for r in streamed], in_python.scores, rtol=1e-6)
    assert all(np.array_equal(r.mask, r.anomaly_map > 0.5) for r in streamed)


def test_scoring_an_onnx_file_that_is_not_ours_is_a_one_line_error(
    exported, texture_dataset, tmp_path, monkeypatch, capsys
):
    image = str(next((texture_dataset / "test" / "good").glob("*.png")))
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a model")
    values = [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, [1]) for n in "xy"]
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["x"], ["y"])], "other", values[:1], values[1:]
    )
    foreign = tmp_path / "foreign.onnx"
    onnx.save(onnx.helper.make_model(graph), str(foreign))
    for model in (garbage, foreign, tmp_path / "missing.onnx"):
        assert main(["predict", str(model), image, "--out", str(tmp_path / "o")]) == 2
        assert model.name in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    assert main(["predict", str(exported), image, "--out", str(tmp_path / "o")]) == 2
    assert "pip install 'cflowad[onnx]'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_bench_writes_the_documented_keys_with_onnxruntime(model_dir, texture_dataset, tmp_path):
    file = tmp_path / "bench.json"
    good = texture_dataset / "test" / "good"
    arguments = ["bench", str(model_dir), str(good), "--json", str(file), "--batch-size", "1,2"]
    assert main([*arguments, "--repeats", "1", "--onnx", "--quiet"]) == 0
    result = json.loads(file.read_text())
    assert [b["batch_size"] for b in result["batches"]] == [1, 2]
    for batch in result["batches"]:
        for key in ("images_per_second", "encoder_images_per_second", "ratio", "ms_per_image"):
            assert batch[key] > 0
            assert batch["onnxruntime"][key] > 0
        assert batch["ratio"] == pytest.approx(
            batch["images_per_second"] / batch["encoder_images_per_second"], rel=0.01
        )
    assert result["inputs"] == "files" and result["machine"]["threads"] >= 1
    assert result["peak_rss_mb"] > 0


def test_onnx_only_processes_give_onnx_runtime_the_threads_and_torch_one(exported, model_dir):
    import cflowad.engine.threads as threads

    threads.share_threads(3, onnx_only=True)  # conftest restores the threads afterwards
    options = OnnxModel(exported)._session.get_session_options()
    assert (torch.get_num_threads(), options.intra_op_num_threads) == (1, 3)
    threads.share_threads(4, onnx_only=False, workers=2)  # a model directory as well
    options = OnnxModel(exported)._session.get_session_options()
    assert (torch.get_num_threads(), options.intra_op_num_threads) == (2, 2)
    with pytest.raises(UserError, match="--workers=3"):
        threads.share_threads(2, onnx_only=True, workers=3)

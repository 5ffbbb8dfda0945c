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

import cflowad
from cflowad import CFlowAD
from cflowad.cli import main
from cflowad.common.errors import UserError
from cflowad.data.datasets import find_test_set
from cflowad.data.images import batches
from cflowad.engine.onnx import OnnxModel

pytestmark = pytest.mark.slow  # trains, exports and quantizes models

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
    graph = onnx.load(str(file), load_external_data=False)
    metadata = {p.key: p.value for p in graph.metadata_props}
    # an in-place op on a view exports as a write-back scatter over the whole map
    assert not {n.op_type for n in graph.graph.node} & {"ScatterElements", "ScatterND"}
    calibration = model.calibration
    assert float(metadata["image_threshold_raw"]) == calibration.image_threshold_raw
    assert float(metadata["pixel_threshold_raw"]) == calibration.pixel_threshold_raw
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


def test_bench_times_int8_and_bfloat16_beside_float(model_dir, texture_dataset, tmp_path, capsys):
    from cflowad.engine.openvino import host_has_bf16

    file = tmp_path / "bench.json"
    good = texture_dataset / "test" / "good"
    command = ["bench", str(model_dir), str(good), "--json", str(file), "--batch-size", "2"]
    command += ["--repeats", "1", "--quiet", "--runtimes"]
    if not host_has_bf16():
        assert main([*command, "torch,bf16"]) == 2
        assert "no bfloat16 units" in capsys.readouterr().err
    runtimes = {"onnxruntime_int8": "int8", "openvino_bf16": "bf16"}
    if not host_has_bf16():
        runtimes.pop("openvino_bf16")
    assert main([*command, ",".join(["torch", *runtimes.values()])]) == 0
    (batch,) = json.loads(file.read_text())["batches"]
    for key in runtimes:
        assert batch[key]["images_per_second"] > 0 and batch[key]["encoder_images_per_second"] > 0


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


@pytest.fixture(scope="module")
def openvino_folder(model_dir):
    folder = model_dir.parent / "model-openvino"
    assert main(["export", str(model_dir), "--openvino", str(folder), "--quiet"]) == 0
    return folder


def test_openvino_folder_scores_like_the_model_directory(
    model_dir, openvino_folder, texture_dataset, tmp_path
):
    from cflowad.engine.catalog import find_models
    from cflowad.engine.openvino import OpenVinoModel

    assert sorted(p.name for p in openvino_folder.iterdir()) == ["model.bin", "model.xml"]
    images = [str(p) for p in sorted((texture_dataset / "test").glob("*/*.png"))]
    for name, model in (("torch", model_dir), ("openvino", openvino_folder)):
        out = tmp_path / name
        command = ["predict", str(model), *images, "--out", str(out), "--batch-size", "3", "-q"]
        assert main(command) == 0
    expected = json.loads((tmp_path / "torch" / "predictions.json").read_text())
    got = json.loads((tmp_path / "openvino" / "predictions.json").read_text())
    for ours, theirs in zip(got, expected, strict=True):
        assert ours["score"] == pytest.approx(theirs["score"], rel=1e-4, abs=1e-6)
        difference = np.load(tmp_path / "openvino" / ours["map"]) - np.load(
            tmp_path / "torch" / theirs["map"]
        )
        assert np.abs(difference).max() <= 1e-4
    assert [r["anomalous"] for r in got] == [r["anomalous"] for r in expected]
    loaded = cflowad.load(openvino_folder)
    assert isinstance(loaded, OpenVinoModel)
    assert loaded.describe() == CFlowAD.load(model_dir).describe()
    assert loaded.calibration.holdout_raw_scores  # the drift alarm's reference came along
    assert find_models(openvino_folder.parent)["model-openvino"] == openvino_folder


def test_openvino_export_and_scoring_errors_are_one_line(
    model_dir, openvino_folder, texture_dataset, tmp_path, monkeypatch, capsys
):
    image = str(next((texture_dataset / "test" / "good").glob("*.png")))
    assert main(["export", str(model_dir)]) == 2
    assert "--onnx FILE, --openvino DIR" in capsys.readouterr().err
    users = tmp_path / "users"
    users.mkdir()
    (users / "notes.txt").write_text("mine")
    assert main(["export", str(model_dir), "--openvino", str(users), "-q"]) == 2
    assert (users / "notes.txt").read_text() == "mine"  # never touched
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.xml").write_text("<net/>")
    assert main(["predict", str(broken), image, "--out", str(tmp_path / "o")]) == 2
    assert "model.xml" in capsys.readouterr().err
    out = str(tmp_path / "o")
    assert main(["predict", str(openvino_folder), image, "--out", out, "--device", "cuda"]) == 2
    assert "run on the CPU" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "openvino", None)
    assert main(["predict", str(openvino_folder), image, "--out", str(tmp_path / "o")]) == 2
    assert "pip install 'cflowad[openvino]'" in capsys.readouterr().err


def test_int8_export_refits_the_thresholds_on_the_int8_graph(
    model_dir, texture_dataset, tmp_path, capsys, monkeypatch
):
    """The convolutions are int8 and nothing else is; the flows kept are those that did
    best on the synthetic defects; the image threshold is the order statistic of the int8
    file's own raw scores on the training's held-out images."""
    from cflowad.engine.model import training_items
    from cflowad.engine.openvino import OpenVinoModel
    from cflowad.method.calibration import order_statistic_threshold
    from cflowad.selection.int8 import FLOWS

    file, folder = tmp_path / "int8.onnx", tmp_path / "int8-openvino"
    command = ["export", str(model_dir), "--onnx", str(file), "--openvino", str(folder)]
    assert main([*command, "--int8", "--data", str(texture_dataset), "-q"]) == 0
    graph = onnx.load(str(file)).graph
    constants = {i.name for i in graph.initializer}
    dequantized = {  # outputs of DequantizeLinear: of int8 weights, or of int8 activations
        out: node.input[0] in constants
        for node in graph.node
        if node.op_type == "DequantizeLinear"
        for out in node.output
    }
    int8_weights = {n.op_type for n in graph.node if any(dequantized.get(i) for i in n.input)}
    assert int8_weights == {"Conv"}
    fed_by_int8 = {n.op_type for n in graph.node if any(i in dequantized for i in n.input)}
    assert not fed_by_int8 & {"MatMul", "Gemm", "Exp", "Log"}  # the flows stay float
    model = CFlowAD.load(model_dir)
    _, held = model.split_holdout(training_items(texture_dataset))
    int8 = OnnxModel(file)
    raw = np.array([r.raw_score for r in int8.predict_iter(held)])
    expected = order_statistic_threshold(raw, model.config.image_fpr).value
    assert int8.image_threshold_raw == pytest.approx(expected, rel=1e-6)
    assert int8.image_threshold_raw != model.calibration.image_threshold_raw
    quantization = json.loads(int8._metadata["quantization"])
    assert quantization["quantized"] == ["Conv", "Clip"]
    figures = quantization["synthetic_defects"]
    assert set(figures) == {"float", "as trained", "fitted"}
    kept = max(("as trained", "fitted"), key=lambda name: figures[name]["criterion"])
    assert quantization["flows"] == FLOWS[kept]  # the one that found the defects best
    images = sorted((texture_dataset / "test").glob("*/*.png"))
    float_maps = model.predict(images).maps
    ir = OpenVinoModel(folder)
    nncf_int8 = json.loads(ir._metadata["quantization"])
    assert nncf_int8["format"].startswith("FakeQuantize int8 (NNCF")
    assert nncf_int8["flows"] in FLOWS.values()
    import openvino

    fake_quantized = {
        target.get_node().get_type_name()
        for node in openvino.Core().read_model(str(folder / "model.xml")).get_ordered_ops()
        if node.get_type_name() == "FakeQuantize"
        for target in node.output(0).get_target_inputs()
    }
    assert fake_quantized == {"Convolution", "GroupConvolution"}  # the flows stay float
    for name, exported in (("onnx", int8), ("openvino", ir)):
        maps = exported.predict(images).maps
        pairs = zip(float_maps, maps, strict=True)
        correlation = np.median([np.corrcoef(a.ravel(), b.ravel())[0, 1] for a, b in pairs])
        assert correlation > 0.7, name  # int8 moves the maps a little, not their shape
    assert main(["export", str(model_dir), "--onnx", str(file), "--int8"]) == 2
    assert "--data" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "nncf", None)  # an OpenVINO install without NNCF
    elsewhere = tmp_path / "elsewhere"
    command = ["export", str(model_dir), "--openvino", str(elsewhere), "--int8"]
    assert main([*command, "--data", str(texture_dataset)]) == 2
    assert "pip install 'cflowad[openvino]'" in capsys.readouterr().err
    assert not elsewhere.exists()  # refused before any work


def test_bf16_export_refits_the_thresholds_in_bfloat16_or_refuses(
    model_dir, texture_dataset, tmp_path, capsys
):
    """On a CPU with bfloat16 units the IR is marked bf16, OpenVINO compiles it so, and
    the image threshold is the order statistic of its own raw scores on the held-out
    images; on another CPU the export refuses in one line and writes nothing."""
    import openvino

    from cflowad.engine.model import training_items
    from cflowad.engine.openvino import OpenVinoModel, host_has_bf16
    from cflowad.method.calibration import order_statistic_threshold

    folder = tmp_path / "bf16"
    command = ["export", str(model_dir), "--openvino", str(folder), "--bf16", "-q"]
    assert main([*command, "--data", str(texture_dataset), "--int8"]) == 2
    assert "not with --int8" in capsys.readouterr().err
    assert main(command) == 2
    assert "--data" in capsys.readouterr().err
    if not host_has_bf16():
        assert main([*command, "--data", str(texture_dataset)]) == 2
        assert "no bfloat16 units" in capsys.readouterr().err
        assert not folder.exists()
        return
    assert main([*command, "--data", str(texture_dataset)]) == 0
    loaded = OpenVinoModel(folder)
    hint = loaded._compiled.get_property("INFERENCE_PRECISION_HINT")
    assert loaded.precision == "bf16" and hint == openvino.Type.bf16
    model = CFlowAD.load(model_dir)
    _, held = model.split_holdout(training_items(texture_dataset))
    raw = np.array([r.raw_score for r in loaded.predict_iter(held)])
    expected = order_statistic_threshold(raw, model.config.image_fpr).value
    assert loaded.image_threshold_raw == pytest.approx(expected, rel=1e-6)
    images = sorted((texture_dataset / "test").glob("*/*.png"))
    float_maps, maps = model.predict(images).maps, loaded.predict(images).maps
    pairs = list(zip(float_maps, maps, strict=True))
    assert max(np.abs(a - b).max() for a, b in pairs) > 1e-4  # bfloat16 did the arithmetic
    correlation = np.median([np.corrcoef(a.ravel(), b.ravel())[0, 1] for a, b in pairs])
    assert correlation > 0.9  # and moved the maps a little, not their shape


def _relative_errors(a: list[torch.Tensor], b: list[torch.Tensor]) -> list[float]:
    return [float((x - y).norm() / y.norm()) for x, y in zip(a, b, strict=True)]


def test_int8_encoder_quantizes_each_relu6_with_its_convolution(
    trained_model, texture_dataset, tmp_path, monkeypatch
):
    """With the ReLU6 (Clip) quantized too, a convolution's int8 output takes the ReLU6's
    [0, 6] range rather than its own wide one: real ImageNet weights on real textures
    give features closer to float than with the convolutions alone."""
    from cflowad.engine import quantize

    model = trained_model
    train, held = model.split_holdout(sorted((texture_dataset / "train" / "good").glob("*")))
    calibration = quantize.calibration_images(model, train)
    images = torch.cat([b for b, _ in batches(held, model.image_size, 16)])
    with torch.inference_mode():
        truth = model.net.encoder(images)
    errors = {}
    for ops in (("Conv",), ("Conv", "Clip")):
        monkeypatch.setattr(quantize, "QUANTIZED_OPS", ops)
        folder = tmp_path / "-".join(ops)
        folder.mkdir()
        int8 = quantize._quantize_encoder(model, calibration, folder, "onnx")(images)
        errors[ops] = _relative_errors(int8, truth)
    pairs = zip(errors[("Conv",)], errors[("Conv", "Clip")], strict=True)
    for k, (alone, fused) in enumerate(pairs):
        assert fused < 0.8 * alone, (k, errors)


@pytest.mark.parametrize("runtime", ["onnx", "openvino"])
def test_flows_fitted_on_the_int8_encoder_see_what_the_int8_file_computes(
    model_dir, texture_dataset, tmp_path, runtime
):
    """The flows trained again learn the int8 encoder's features, and the encoder
    quantized alone computes exactly the features of the whole int8 file: the file's
    maps equal the fitted model's run with the int8 encoder in PyTorch (ONNX Runtime's
    quantizer and NNCF alike)."""
    from cflowad.common.progress import Reporter
    from cflowad.engine import quantize
    from cflowad.engine.openvino import OpenVinoModel

    model = CFlowAD.load(model_dir)
    train, held = model.split_holdout(sorted((texture_dataset / "train" / "good").glob("*")))
    calibration = quantize.calibration_images(model, train)
    folder = tmp_path / "work"
    folder.mkdir()
    fitted = quantize.fit_on_int8_encoder(
        model, train, held, calibration, folder, Reporter(enabled=False), runtime
    )
    assert fitted.net.encoder is model.net.encoder  # the float encoder is put back
    before, after = model.net.decoder(0).state_dict(), fitted.net.decoder(0).state_dict()
    assert any(not torch.equal(before[key], after[key]) for key in before)  # trained again
    assert fitted.training["n_train"] == len(train)
    path = tmp_path / ("fitted.onnx" if runtime == "onnx" else "fitted")
    quantize.quantize_model(fitted, path, calibration.numpy(), folder, runtime=runtime)
    exported = OnnxModel(path) if runtime == "onnx" else OpenVinoModel(path)
    test_images = sorted((texture_dataset / "test").glob("*/*.png"))
    images = torch.cat([b for b, _ in batches(test_images, model.image_size, 16)])
    again = tmp_path / "again"
    again.mkdir()
    fitted.net.encoder = quantize._quantize_encoder(model, calibration, again, runtime)
    try:
        expected = fitted.score_batch(images)[1].numpy()
    finally:
        fitted.net.encoder = model.net.encoder
    maps = exported.score_batch(images)[1].numpy()
    np.testing.assert_allclose(maps, expected, atol=2e-3)

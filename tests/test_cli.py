"""The command line: outputs users' scripts depend on, and the error contract."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cflowad.cli import main

FAST = ["--image-size", "64", "--steps", "20", "--no-compile", "--quiet"]


@pytest.fixture(scope="module")
def model_dir(texture_dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "model"
    assert main(["train", str(texture_dataset), "--out", str(out), *FAST]) == 0
    return out


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("cflowad: error: ")]
    assert len(errors) == 1, err
    return errors[0]


def test_predict_writes_the_documented_json(model_dir, texture_dataset, tmp_path):
    images = sorted((texture_dataset / "test" / "patch").glob("*.png"))[:3]
    out = tmp_path / "pred"
    assert (
        main(
            [
                "predict",
                str(model_dir),
                *map(str, images),
                "--out",
                str(out),
                "--batch-size",
                "2",
                "--quiet",
            ]
        )
        == 0
    )
    records = json.loads((out / "predictions.json").read_text())
    assert [r["image"] for r in records] == [str(p) for p in images]
    for record in records:
        assert set(record) == {"image", "category", "score", "anomalous", "raw_score", "map"}
        assert record["category"] == "model"  # the model's name
        anomaly_map = np.load(out / record["map"])
        assert anomaly_map.dtype == np.float32 and anomaly_map.shape == (128, 128)
        assert isinstance(record["anomalous"], bool) and isinstance(record["score"], float)
        assert 0 <= record["score"] <= 1 and record["anomalous"] == (record["score"] > 0.5)
        assert anomaly_map.min() >= 0 and anomaly_map.max() <= 1
    lines = (out / "predictions.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == records


def test_test_command_writes_metrics_and_pictures(model_dir, texture_dataset, tmp_path):
    report, pictures = tmp_path / "m.json", tmp_path / "pics"
    assert (
        main(
            [
                "test",
                str(model_dir),
                str(texture_dataset),
                "--json",
                str(report),
                "--out",
                str(pictures),
                "--quiet",
            ]
        )
        == 0
    )
    metrics = json.loads(report.read_text())
    for key in (
        "image_auroc",
        "pixel_auroc",
        "aupro",
        "image_f1_max",
        "n_images",
        "n_defective",
        "seconds",
        "images_per_second",
        "per_defect",
    ):
        assert key in metrics, key
    assert metrics["n_images"] == 16 and metrics["n_defective"] == 8
    assert set(metrics["per_defect"]) == {"patch"}
    assert 0 <= metrics["aupro"] <= 1
    for name in (
        "roc_curve.png",
        "pro_curve.png",
        "score_histogram.png",
        "patch/000.png",
        "good/000.png",
    ):
        assert (pictures / name).is_file(), name


def test_user_errors_are_one_line_and_exit_2(model_dir, tmp_path, capsys):
    assert (
        main(["predict", str(model_dir), str(tmp_path / "nope.png"), "--out", str(tmp_path / "o")])
        == 2
    )
    assert "nope.png" in _error_line(capsys)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    assert main(["predict", str(model_dir), str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "bad.png" in _error_line(capsys)
    assert main(["train", str(tmp_path), "--out", str(tmp_path / "m"), "--steps", "0"]) == 2
    assert "steps" in _error_line(capsys)
    assert main(["train", str(tmp_path), "--out", str(tmp_path / "m"), "--image-size", "100"]) == 2
    assert "image_size" in _error_line(capsys)
    assert main(["predict", str(tmp_path), str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "model.json" in _error_line(capsys)
    assert main(["train", "--bogus"]) == 2
    assert "--bogus" in _error_line(capsys)
    for weights, name in (("2,x,1", "--scale-weights"), ("2,1", "scale_weights")):
        args = ["train", str(tmp_path), "--out", str(tmp_path / "m"), "--scale-weights", weights]
        assert main(args) == 2
        assert name in _error_line(capsys)


def test_predict_pictures_show_each_image_beside_its_heat_map(model_dir, texture_dataset, tmp_path):
    images = sorted((texture_dataset / "test" / "patch").glob("*.png"))[:2]
    out = tmp_path / "pred"
    assert (
        main(["predict", str(model_dir), *map(str, images), "--out", str(out), "--pictures", "-q"])
        == 0
    )
    for path, record in zip(
        images, json.loads((out / "predictions.json").read_text()), strict=True
    ):
        assert set(record) == {
            "image",
            "category",
            "score",
            "anomalous",
            "raw_score",
            "map",
            "picture",
        }
        picture = np.asarray(Image.open(out / record["picture"]).convert("RGB"))
        original = np.asarray(Image.open(path).convert("RGB"))
        height, width = original.shape[:2]
        assert picture.shape[0] == height and picture.shape[1] > 2 * width
        np.testing.assert_allclose(picture[:, :width], original, atol=1)
        assert np.abs(picture[:, -width:].astype(int) - original).mean() > 10


def test_threads_option_sets_torch_threads_without_changing_maps(
    model_dir, texture_dataset, tmp_path, capsys
):
    images = [str(p) for p in sorted((texture_dataset / "test" / "patch").glob("*.png"))[:2]]
    before = torch.get_num_threads()
    try:
        assert main(["predict", str(model_dir), *images, "--out", str(tmp_path / "o"), "-q"]) == 0
        one = ["--out", str(tmp_path / "one"), "--threads", "1", "-q"]
        assert main(["predict", str(model_dir), *images, *one]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    for name in json.loads((tmp_path / "o" / "predictions.json").read_text()):
        default = np.load(tmp_path / "o" / name["map"])
        single = np.load(tmp_path / "one" / name["map"])
        np.testing.assert_allclose(single, default, rtol=0, atol=1e-5 * np.abs(default).max())
    zero = ["--out", str(tmp_path / "z"), "--threads", "0"]
    assert main(["predict", str(model_dir), *images, *zero]) == 2
    assert "--threads" in _error_line(capsys)
    assert not (tmp_path / "z").exists()


def test_failed_train_leaves_existing_model_untouched(model_dir, tmp_path, capsys):
    before = {p.name: p.read_bytes() for p in model_dir.iterdir()}
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["train", str(empty), "--out", str(model_dir), *FAST]) == 2
    assert "no images" in _error_line(capsys)
    assert {p.name: p.read_bytes() for p in model_dir.iterdir()} == before


@pytest.mark.slow  # a new Python process
def test_module_entry_point_and_version():
    done = subprocess.run(
        [sys.executable, "-m", "cflowad", "--version"], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0 and done.stdout.startswith("cflowad ")


def test_test_command_on_plain_folders(model_dir, texture_dataset, tmp_path):
    report = tmp_path / "plain.json"
    assert (
        main(
            [
                "test",
                str(model_dir),
                "--good",
                str(texture_dataset / "test" / "good"),
                "--defective",
                str(texture_dataset / "test" / "patch"),
                "--masks",
                str(texture_dataset / "ground_truth" / "patch"),
                "--json",
                str(report),
                "--quiet",
            ]
        )
        == 0
    )
    plain = json.loads(report.read_text())
    assert plain["n_images"] == 16 and plain["n_defective"] == 8
    assert plain["pixel_auroc"] is not None and set(plain["per_defect"]) == {"patch"}


def test_skip_bad_turns_unreadable_files_into_warnings_with_a_count(
    model_dir, texture_dataset, tmp_path, capsys
):
    data = tmp_path / "data"
    shutil.copytree(texture_dataset, data)
    n_test = sum(1 for _ in (data / "test").rglob("*.png"))
    n_train = sum(1 for _ in (data / "train" / "good").iterdir())
    for folder in (data / "test" / "good", data / "train" / "good"):
        (folder / "truncated.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"x" * 50)
        (folder / "empty.jpg").write_bytes(b"")
    good = data / "test" / "good"
    out = tmp_path / "predictions"
    assert main(["predict", str(model_dir), str(good), "--out", str(out), "--quiet"]) == 2
    assert "cflowad: error: " in capsys.readouterr().err and not out.exists()
    assert main(["predict", str(model_dir), str(good), "--out", str(out), "--skip-bad", "-q"]) == 0
    err = capsys.readouterr().err
    assert (
        "truncated.png" in err
        and "empty.jpg" in err
        and err.strip().endswith("skipped 2 unreadable image files (--skip-bad)")
    )
    records = json.loads((out / "predictions.json").read_text())
    assert len(records) == len(list(good.iterdir())) - 2
    metrics = tmp_path / "metrics.json"
    assert (
        main(["test", str(model_dir), str(data), "--json", str(metrics), "--skip-bad", "-q"]) == 0
    )
    assert json.loads(metrics.read_text())["n_images"] == n_test
    model = tmp_path / "model"
    assert main(["train", str(data), "--out", str(model), *FAST, "--skip-bad"]) == 0
    training = json.loads((model / "model.json").read_text())["training"]
    assert training["n_train"] + training["n_calibration"] == n_train
    assert "skipped 2 unreadable image files" in capsys.readouterr().err


def test_every_config_field_is_a_train_option_made_from_the_field():
    """One source of each training option: the flag, its help and its default come from
    the Config field (its metadata), and the studio offers the fields marked for it."""
    import dataclasses

    import typer

    from cflowad import Config
    from cflowad.cli import app
    from cflowad.method.config import option_default
    from cflowad.studio.jobs import SETTINGS

    command = typer.main.get_command(app).commands["train"]
    by_name = {parameter.name: parameter for parameter in command.params}
    for field in dataclasses.fields(Config):
        option = by_name[field.name]
        assert "--" + field.name.replace("_", "-") in [*option.opts, *option.secondary_opts]
        assert option.help == field.metadata["help"] and option.help
        if not option.is_flag:
            assert option.default == option_default(field.name), field.name
    offered = [f.name for f in dataclasses.fields(Config) if f.metadata["studio"]]
    assert list(SETTINGS) == [*offered, "region", "tune"] and "steps" in offered
    # --image-size native is the Config's own value, so a config file can say it too
    native = Config(image_size="native")
    assert native.aspect == "native" and native.fit_to([(100, 230)]).image_size == (96, 224)


@pytest.mark.slow  # trains
def test_train_reads_a_config_file_and_flags_override_it(texture_dataset, tmp_path, capsys):
    settings = tmp_path / "settings.toml"
    settings.write_text("image_size = [64, 64]\nsteps = 7\nfeature_pooling = 3\nseed = 4\n")
    out = tmp_path / "model"
    arguments = ["train", str(texture_dataset), "--out", str(out), "--config", str(settings)]
    assert main([*arguments, "--steps", "5", "--no-compile", "-q"]) == 0
    config = json.loads((out / "model.json").read_text())["config"]
    assert (config["steps"], config["feature_pooling"], config["seed"]) == (5, 3, 4)
    assert config["image_size"] == [64, 64] and config["compile_training"] is False
    settings.write_text("stepz = 3\n")
    assert main([*arguments, "-q"]) == 2
    assert "stepz" in _error_line(capsys)


def test_the_command_reference_in_docs_is_current():
    from cflowad.cli.docs import cli_reference

    written = (Path(__file__).resolve().parents[1] / "docs" / "cli.md").read_text()
    assert written == cli_reference(), "run: python -m cflowad.cli.docs > docs/cli.md"


@pytest.mark.slow  # a new Python process
def test_the_onnx_path_imports_neither_the_trainer_nor_timm():
    code = (
        "import sys, cflowad, cflowad.runtime, cflowad.engine.onnx, cflowad.engine.loading; "
        "print(sorted(m for m in ('cflowad.model', 'cflowad.engine.model', 'cflowad.method.train', "
        "'timm') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (
            ["bench", "model", "--batch-size", "1,x"],
            "--batch-size='1,x' must be integers, e.g. 1,16",
        ),
        (
            ["loadtest", "http://127.0.0.1:9", "a.png", "--model", "m", "--concurrency", "4,a"],
            "--concurrency='4,a' must be integers, e.g. 1,4,16",
        ),
        (["train", "data", "--out", "m", "--strides", "8,x"], "--strides='8,x' must be integers"),
    ],
)
def test_every_comma_separated_option_is_a_one_line_error(arguments, message, capsys):
    assert main(arguments) == 2
    assert message in _error_line(capsys)

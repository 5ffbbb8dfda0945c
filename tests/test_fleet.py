"""Fleets: many categories trained at once (process pool, Ray), archives scored into Parquet.

Ray runs here as CI runs it, a local cluster of 2 CPUs; the test extra installs Ray
and pyarrow, so these tests are never skipped.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import ray
import torch

from cflowad import CFlowAD
from cflowad.cli import main
from cflowad.fleet.archive import read_shards
from cflowad.fleet.training import FLEET_FILE

pytestmark = pytest.mark.slow  # fleets of models trained in processes and Ray tasks

FAST = ["--steps", "20", "--image-size", "64", "--encoder-weights", "random", "--no-compile"]
CATEGORIES = ("a", "b", "c")


@pytest.fixture(scope="module")
def root(tmp_path_factory, make_textures) -> Path:
    """Three small categories, each its own texture crops."""
    root = tmp_path_factory.mktemp("fleet") / "root"
    for seed, name in enumerate(CATEGORIES):
        make_textures(root / name, n_train=16, n_good=3, n_bad=3, size=96, seed=seed)
    return root


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray of 2 CPUs, as in CI; the commands join it instead of starting one."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def fleet(root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fleet") / "models"
    assert main(["train", str(root), "--out", str(out), *FAST, "-q"]) == 0
    return out


def _records(models: Path) -> dict[str, dict]:
    """fleet.json's records without what depends on the run (time, warnings)."""
    records = json.loads((models / FLEET_FILE).read_text())["categories"]
    return {
        name: {k: v for k, v in record.items() if k not in ("seconds", "warnings")}
        for name, record in records.items()
    }


def _sha(model: Path) -> str:
    return json.loads((model / "model.json").read_text())["weights_sha256"]


def test_training_gives_the_same_model_on_one_and_two_threads(root, tmp_path):
    before = torch.get_num_threads()
    shas = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            model = CFlowAD(
                steps=10, image_size=64, encoder_weights="random", compile_training=False
            ).fit(root / "a")
            shas.append(_sha(model.save(tmp_path / str(threads))))
    finally:
        torch.set_num_threads(before)
    assert shas[0] == shas[1]


def test_serial_jobs_and_ray_train_identical_fleets(root, fleet, tmp_path, local_ray):
    jobs, on_ray = tmp_path / "jobs", tmp_path / "ray"
    assert main(["train", str(root), "--out", str(jobs), "--jobs", "2", *FAST, "-q"]) == 0
    assert main(["train", str(root), "--out", str(on_ray), "--engine", "ray", *FAST, "-q"]) == 0
    serial = _records(fleet)
    assert sorted(serial) == list(CATEGORIES)
    assert all(r["status"] == "trained" for r in serial.values())
    assert _records(jobs) == serial and _records(on_ray) == serial
    for name, record in serial.items():
        for models in (fleet, jobs, on_ray):
            assert _sha(models / name) == record["weights_sha256"]
            assert (models / name / "model.safetensors").read_bytes() == (
                fleet / name / "model.safetensors"
            ).read_bytes()
        calibration = json.loads((fleet / name / "model.json").read_text())["calibration"]
        assert record["image_threshold_raw"] == calibration["image_threshold_raw"]
        assert record["held_out_fpr"] == calibration["image_fpr_achievable"]


def test_a_stopped_fleet_resumes_without_redoing_finished_categories(root, tmp_path, capsys):
    out = tmp_path / "models"
    command = [sys.executable, "-m", "cflowad", "train", str(root), "--out", str(out)]
    process = subprocess.Popen([*command, *FAST, "-q"], start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not (out / FLEET_FILE).is_file() and time.monotonic() < deadline:
            assert process.poll() is None, "finished before it could be stopped"
            time.sleep(0.05)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    finished = json.loads((out / FLEET_FILE).read_text())["categories"]
    assert list(finished) == ["a"]  # one at a time, in order
    weights = out / "a" / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    capsys.readouterr()
    assert main(["train", str(root), "--out", str(out), *FAST]) == 0
    assert "a: up to date" in capsys.readouterr().err
    assert weights.stat().st_mtime_ns == stamp
    assert [r["status"] for r in _records(out).values()] == ["trained"] * 3
    # a changed configuration is not up to date
    assert main(["train", str(root), "--out", str(out), *FAST, "--steps", "21", "-q"]) == 0
    assert weights.stat().st_mtime_ns != stamp


def test_a_category_with_a_corrupt_image_fails_alone(root, tmp_path, capsys):
    broken = tmp_path / "root"
    shutil.copytree(root, broken)
    bad = broken / "b" / "train" / "good" / "003.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    out = tmp_path / "models"
    assert main(["train", str(broken), "--out", str(out), *FAST, "-q"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("cflowad: error:")]
    assert len(errors) == 1 and "1 of 3 categories failed (b)" in errors[0]
    records = _records(out)
    assert records["b"]["status"] == "failed" and str(bad) in records["b"]["error"]
    assert records["a"]["status"] == records["c"]["status"] == "trained"
    assert not (out / "b").exists() and (out / "a" / "model.json").is_file()
    # --skip-bad trains it without the file, and says so
    assert main(["train", str(broken), "--out", str(out), *FAST, "--skip-bad", "-q"]) == 0
    assert _records(out)["b"]["skipped_images"] == [str(bad)]


def test_parquet_records_equal_the_json_records(fleet, root, tmp_path):
    folder = root / "a" / "test" / "patch"
    json_out, parquet_out = tmp_path / "json", tmp_path / "parquet"
    model = str(fleet / "a")
    assert main(["predict", model, str(folder), "--out", str(json_out), "-q"]) == 0
    assert (
        main(["predict", model, str(folder), "--out", str(parquet_out), "--format", "parquet"]) == 0
    )
    expected = json.loads((json_out / "predictions.json").read_text())
    got = read_shards(parquet_out)
    assert len(got) == len(expected) == 3
    for want, have in zip(expected, got, strict=True):
        assert {k: have[k] for k in want if k != "map"} == {
            k: v for k, v in want.items() if k != "map"
        }
        np.testing.assert_array_equal(
            np.load(json_out / want["map"]), np.load(parquet_out / have["map"])
        )


def _index(root: Path, path: Path) -> list[tuple[str, str]]:
    """An index of every test image of every category, interleaved across categories."""
    rows = [
        (p.relative_to(root).as_posix(), name)
        for name in CATEGORIES
        for p in sorted((root / name / "test").rglob("*.png"))
    ]
    rows = rows[::2] + rows[1::2]
    with path.open("w", newline="") as handle:
        csv.writer(handle).writerows([("path", "category"), *rows])
    return rows


def test_archives_score_the_same_on_both_engines_and_resume(fleet, root, tmp_path, local_ray):
    index = tmp_path / "index.csv"
    rows = _index(root, index)
    common = [str(fleet), str(root), "--index", str(index), "--shard-size", "7", "-q"]
    local, on_ray = tmp_path / "local", tmp_path / "ray"
    # one thread: PyTorch rounds a small batch's convolutions differently on one thread
    # than on several, and each Ray actor runs on one
    assert main(["predict", *common, "--out", str(local), "--threads", "1"]) == 0
    assert main(["predict", *common, "--out", str(on_ray), "--engine", "ray"]) == 0
    records = read_shards(local)
    assert [(Path(r["image"]).relative_to(root).as_posix(), r["category"]) for r in records] == rows
    assert read_shards(on_ray) == records
    for record in records:
        np.testing.assert_array_equal(
            np.load(local / record["map"]), np.load(on_ray / record["map"])
        )
    # each image was scored by its category's model
    for record in records[:4]:
        alone = CFlowAD.load(fleet / record["category"]).predict(record["image"])
        assert record["raw_score"] == pytest.approx(float(alone.raw_scores[0]), rel=1e-5)
    # a re-run scores only the missing shard
    shards = sorted((local / "shards").glob("*.parquet"))
    assert len(shards) == 3
    stamps = [p.stat().st_mtime_ns for p in shards]
    shards[1].unlink()
    assert main(["predict", *common, "--out", str(local), "--threads", "1"]) == 0
    assert [p.stat().st_mtime_ns == s for p, s in zip(shards, stamps, strict=True)] == [
        True,
        False,
        True,
    ]
    assert read_shards(local) == records


def test_an_archive_folder_is_not_mixed_with_other_scores(fleet, root, tmp_path, capsys):
    out = tmp_path / "scores"
    tree = [str(fleet), str(root), "--out", str(out), "-q"]
    assert main(["predict", *tree]) == 0
    records = read_shards(out)
    # a folder of models and a tree: each image goes to the model its folder names
    assert {r["category"] for r in records} == set(CATEGORIES)
    assert all(Path(r["image"]).relative_to(root).parts[0] == r["category"] for r in records)
    capsys.readouterr()
    assert main(["predict", *tree, "--shard-size", "5"]) == 2
    assert "holds the scores of other shard_size" in capsys.readouterr().err
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    assert main(["predict", str(fleet), str(root), "--out", str(tmp_path / "mine"), "-q"]) == 2
    assert (tmp_path / "mine" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--format", "json", "--engine", "ray"], "--engine: needs --format parquet"),
        (["--format", "parquet", "--pictures"], "--pictures: only with --format json"),
        (["--index", "missing.csv"], "missing.csv: file not found"),
        (["--engine", "spark"], "--engine='spark' must be one of local, ray"),
    ],
)
def test_archive_option_mistakes_are_one_line(fleet, root, tmp_path, capsys, extra, message):
    out = tmp_path / "o"
    assert main(["predict", str(fleet / "a"), str(root / "a"), "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and message in err

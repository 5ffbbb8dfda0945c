"""Nothing lost, nothing silent: output folders, streaming, inputs, thresholds, devices, format."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import cflowad
from cflowad import CFlowAD, UserError
from cflowad.cli import main
from cflowad.data.files import MARKER, is_output_dir, staged_directory
from cflowad.data.images import batches
from cflowad.engine.inference import as_images

FAST = ["--image-size", "64", "--steps", "20", "--no-compile", "--quiet"]
RNG = np.random.default_rng(1)
IMAGES = [RNG.random((60 + 4 * i, 50 + 2 * i, 3), dtype=np.float32) for i in range(12)]


@pytest.fixture(scope="module")
def model_dir(texture_dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("robust") / "model"
    assert main(["train", str(texture_dataset), "--out", str(out), *FAST]) == 0
    return out


@pytest.fixture(scope="module")
def small_model() -> CFlowAD:
    return CFlowAD(
        encoder_weights="random", image_size=64, steps=5, min_holdout=4, compile_training=False
    ).fit(IMAGES)


def _patch_images(texture_dataset: Path) -> list[str]:
    return [str(p) for p in sorted((texture_dataset / "test" / "patch").glob("*.png"))]


def test_an_empty_folder_the_user_made_is_accepted(model_dir, texture_dataset, tmp_path):
    for command in (
        ["predict", str(model_dir), *_patch_images(texture_dataset)[:2]],
        ["test", str(model_dir), str(texture_dataset), "--json", str(tmp_path / "m.json")],
    ):
        out = tmp_path / command[0]
        out.mkdir()
        assert main([*command, "--out", str(out), "-q"]) == 0
        assert is_output_dir(out)


def test_a_folder_with_a_users_file_is_refused_before_work_and_kept(
    model_dir, texture_dataset, tmp_path, capsys
):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "predictions.json").write_text("my own file")
    (out / "notes.txt").write_text("keep me")
    images = _patch_images(texture_dataset)[:2]
    assert main(["predict", str(model_dir), *images, "--out", str(out), "-q"]) == 2
    assert "not written by cflowad" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "keep me"
    assert (out / "predictions.json").read_text() == "my own file"
    report = tmp_path / "m.json"
    arguments = ["test", str(model_dir), str(texture_dataset), "--json", str(report)]
    assert main([*arguments, "--out", str(out), "-q"]) == 2
    assert not report.exists()  # refused before scoring, not after


def test_own_folder_is_replaced_but_not_once_a_user_adds_to_it(
    model_dir, texture_dataset, tmp_path, capsys
):
    out = tmp_path / "out"
    images = _patch_images(texture_dataset)
    assert main(["predict", str(model_dir), *images[:3], "--out", str(out), "-q"]) == 0
    assert main(["predict", str(model_dir), *images[:1], "--out", str(out), "-q"]) == 0
    assert len(json.loads((out / "predictions.json").read_text())) == 1
    assert len(list((out / "maps").iterdir())) == 1
    (out / "maps" / "my_notes.txt").write_text("added by the user")
    assert main(["predict", str(model_dir), *images[:2], "--out", str(out), "-q"]) == 2
    assert "not written by cflowad" in capsys.readouterr().err
    assert (out / "maps" / "my_notes.txt").read_text() == "added by the user"


def test_a_failed_run_keeps_what_it_scored_and_leaves_the_old_output(
    model_dir, texture_dataset, tmp_path, monkeypatch
):
    out = tmp_path / "out"
    images = _patch_images(texture_dataset)
    assert main(["predict", str(model_dir), images[0], "--out", str(out), "-q"]) == 0
    before = (out / "predictions.json").read_text()
    from cflowad.engine.model import CFlowAD as Model

    real = Model.score_batch
    calls = []

    def failing(self, batch):
        calls.append(len(batch))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, batch)

    monkeypatch.setattr(Model, "score_batch", failing)
    arguments = ["predict", str(model_dir), *images, "--out", str(out), "--batch-size", "3"]
    assert main([*arguments, "-q"]) == 130
    assert (out / "predictions.json").read_text() == before
    partial = tmp_path / "out.partial"
    records = [json.loads(x) for x in (partial / "predictions.jsonl").read_text().splitlines()]
    assert [r["image"] for r in records] == images[:3]
    assert all((partial / r["map"]).is_file() for r in records)
    assert (partial / MARKER).is_file()


def test_json_option_takes_a_file_not_a_folder(model_dir, texture_dataset, tmp_path, capsys):
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    assert main(["test", str(model_dir), str(texture_dataset), "--json", str(folder), "-q"]) == 2
    assert "--json" in capsys.readouterr().err and (folder / "keep.txt").is_file()


def test_model_resolution_metrics_with_pictures(model_dir, texture_dataset, tmp_path):
    report, pictures = tmp_path / "m.json", tmp_path / "pictures"
    arguments = ["test", str(model_dir), str(texture_dataset), "--json", str(report)]
    options = ["--metric-resolution", "model", "--out", str(pictures), "-q"]
    assert main([*arguments, *options]) == 0
    assert json.loads(report.read_text())["metric_resolution"] == "model"
    assert (pictures / "pro_curve.png").is_file()


def test_what_counts_as_one_image(small_model, texture_dataset, tmp_path):
    one = IMAGES[0]
    assert len(small_model.predict(one)) == 1
    assert len(small_model.predict(one[:, :, 0])) == 1
    assert len(small_model.predict(np.stack([IMAGES[0][:60, :50]] * 3))) == 3
    path = _patch_images(texture_dataset)[0]
    assert len(small_model.predict(path)) == 1
    assert len(small_model.predict(Path(path))) == 1
    folder = texture_dataset / "test" / "patch"
    assert len(small_model.predict(folder)) == len(list(folder.glob("*.png")))
    with pytest.raises(UserError, match="subfolders are not searched"):
        small_model.predict(texture_dataset)  # an MVTec category is not a folder of images
    with pytest.raises(UserError, match="not found"):
        small_model.predict(tmp_path / "missing.png")
    with pytest.raises(UserError, match=r"\(H, W\)"):
        small_model.predict(np.zeros((2, 2, 2, 2, 2)))
    with pytest.raises(UserError, match="no images"):
        small_model.predict([])
    assert len(as_images([path, one, folder])) == 2 + len(list(folder.glob("*.png")))


def test_predict_iter_streams_with_bounded_decoding(small_model, monkeypatch):
    import cflowad.data.images as data

    decoded = []
    real = data.load_image

    def counting(item):
        decoded.append(1)
        return real(item)

    monkeypatch.setattr(data, "load_image", counting)
    many = IMAGES * 20  # 240 images
    stream = small_model.predict_iter(many, batch_size=4)
    first = next(stream)
    assert first.index == 0 and first.anomaly_map.shape == IMAGES[0].shape[:2]
    assert len(decoded) <= 3 * 4  # the first batch plus at most two batches ahead
    stream.close()
    alone = small_model.predict(IMAGES[:5])
    for result in small_model.predict_iter(IMAGES[:5], batch_size=2):
        assert result.score == pytest.approx(alone.scores[result.index], rel=1e-5)
        assert result.anomalous == alone.anomalous[result.index]


def test_batches_never_run_far_ahead_of_the_consumer(monkeypatch):
    import cflowad.data.images as data

    decoded = []
    monkeypatch.setattr(data, "load_image", lambda item: decoded.append(1) or item)
    stream = batches((np.zeros((8, 8, 3), np.float32) for _ in range(1000)), (8, 8), 5)
    for _ in range(3):
        next(stream)
    assert len(decoded) <= 5 * 3 + 2 * 5
    stream.close()


def test_cache_dir_is_used_and_a_full_disk_is_one_line(small_model, tmp_path, monkeypatch):
    from cflowad.method.train import encode

    used = []
    real = np.memmap

    def recording(path, *args, **kwargs):
        used.append(Path(path).parent)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(np, "memmap", recording)
    cache = encode(small_model.net, IMAGES[:2], budget_mb=0, cache_dir=str(tmp_path))
    assert cache.on_disk and used and all(p == tmp_path for p in used)
    assert not list(tmp_path.iterdir())  # unlinked: freed with the process, never left behind

    def full(handle, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("os.posix_fallocate", full)
    with pytest.raises(UserError, match=r"--cache-dir=.*no room"):
        encode(small_model.net, IMAGES[:2], budget_mb=0, cache_dir=str(tmp_path))
    with pytest.raises(UserError, match="--cache-dir"):
        encode(small_model.net, IMAGES[:2], budget_mb=0, cache_dir=str(tmp_path / "nope"))


def test_thresholds_are_order_statistics_with_the_achievable_rate(small_model, tmp_path):
    calibration = small_model.calibration
    assert calibration.n_images == 4
    assert calibration.image_fpr_achievable == pytest.approx(1 / 5)
    held = small_model.split_holdout(IMAGES)[1]
    raw = small_model.predict(held).raw_scores
    assert calibration.image_threshold_raw == pytest.approx(raw.max(), rel=1e-5)
    with pytest.warns(UserWarning, match="99 held-out images are needed"):
        CFlowAD(
            encoder_weights="random", image_size=64, steps=2, min_holdout=4, compile_training=False
        ).fit(IMAGES)
    small_model.save(tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "model.json").read_text())
    assert meta["calibration"]["image_fpr_achievable"] == pytest.approx(0.2)


def test_broken_or_old_model_descriptions_are_one_line(small_model, tmp_path, capsys):
    path = small_model.save(tmp_path / "m")
    meta = json.loads((path / "model.json").read_text())
    del meta["calibration"]
    (path / "model.json").write_text(json.dumps(meta))
    assert main(["predict", str(path), str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "model.json: incomplete" in capsys.readouterr().err
    meta["format_version"] = 2
    (path / "model.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="format version 2 needs retraining"):
        CFlowAD.load(path)


def test_device_choice(small_model, tmp_path, capsys, monkeypatch):
    """auto is CUDA exactly where torch sees a CUDA device; asking for CUDA where there is
    none is a one-line error (both checked on any host: torch's answer is set here)."""
    from cflowad.engine.device import resolve_device

    assert CFlowAD.load(small_model.save(tmp_path / "m"), device="cpu").device.type == "cpu"
    for available, expected in ((True, "cuda"), (False, "cpu")):
        monkeypatch.setattr(torch.cuda, "is_available", lambda available=available: available)
        assert resolve_device("auto").type == expected
    with pytest.raises(UserError, match="no CUDA device"):
        CFlowAD(encoder_weights="random", image_size=64, device="cuda")
    arguments = ["predict", str(tmp_path / "m"), str(tmp_path), "--out", str(tmp_path / "o")]
    assert main([*arguments, "--device", "cuda"]) == 2
    assert "--device=cuda" in capsys.readouterr().err
    with pytest.raises(UserError, match="--device"):
        CFlowAD(encoder_weights="random", image_size=64, device="tpu")


def test_staged_directory_writes_a_manifest(tmp_path):
    with staged_directory(tmp_path / "out") as staging:
        (staging / "a.txt").write_text("x")
        (staging / "sub").mkdir()
        (staging / "sub" / "b.npy").write_text("y")
    listed = (tmp_path / "out" / MARKER).read_text().splitlines()[1:]
    assert listed == ["a.txt", "sub/b.npy"] and is_output_dir(tmp_path / "out")


def test_load_returns_the_right_model_and_packaging_files(small_model, tmp_path):
    path = small_model.save(tmp_path / "m")
    assert isinstance(cflowad.load(path, device="cpu"), CFlowAD)
    root = Path(__file__).resolve().parents[1]
    assert (root / "LICENSE").read_text().split()[:4] == ["Apache", "License", "Version", "2.0,"]
    assert (root / "src" / "cflowad" / "py.typed").is_file()

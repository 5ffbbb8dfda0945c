"""cflowad stream and cflowad watch: videos made here with PyAV, hot folders written slowly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

import cflowad
import cflowad.cli.streams
from cflowad.cli import main
from cflowad.common.errors import UserError
from cflowad.engine.inference import InferenceEngine
from cflowad.line.stream import stream_video
from cflowad.line.watch import watch_folder

FPS = 10
SIZE = (64, 96)  # height, width


class _Brightest(InferenceEngine):
    """Closed form: the map is the pixel brightness, the score its maximum.

    Good frames are kept below 0.4, defects are white patches (1.0): a frame is
    anomalous exactly when it holds a defect (in the region scored).
    """

    image_size = (32, 32)

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.images = 0

    def score_batch(self, images: torch.Tensor):
        time.sleep(self.delay * len(images))
        self.images += len(images)
        maps = images.mean(dim=1)
        scores = maps.amax(dim=(1, 2))
        return scores, maps, scores

    def describe(self):
        return {"backbone": "brightest pixel"}


def _frame(index: int, defect: tuple[int, int] | None = None) -> np.ndarray:
    rng = np.random.default_rng(index)
    frame = (rng.random((*SIZE, 3)) * 0.35 * 255).astype(np.uint8)
    if defect is not None:
        y, x = defect
        frame[y : y + 16, x : x + 16] = 255
    return frame


def _video(path: Path, frames: list[np.ndarray], fps: int = FPS) -> Path:
    """H.264, lossless (qp 0, 4:4:4), so decoded frames are the frames written (to +-2 levels)."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv444p"
        stream.options = {"qp": "0"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


DEFECTS = {5, 6, 7, 15, 22, 23, 24, 25}


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> Path:
    frames = [_frame(i, (20, 40) if i in DEFECTS else None) for i in range(30)]
    return _video(tmp_path_factory.mktemp("video") / "line.mp4", frames)


def test_exactly_the_defective_frames_are_flagged_with_one_event_per_run(video, tmp_path):
    summary = stream_video(_Brightest(), str(video), tmp_path / "out", debounce=2, batch_size=4)
    frames = _lines(tmp_path / "out" / "frames.jsonl")
    assert [f["frame"] for f in frames] == list(range(30))
    assert {f["frame"] for f in frames if f["anomalous"]} == DEFECTS
    assert [f["pts_seconds"] for f in frames] == pytest.approx([i / FPS for i in range(30)])
    events = _lines(tmp_path / "out" / "events.jsonl")
    # frame 15 alone is shorter than --debounce 2: no event
    assert [(e["first_frame"], e["last_frame"], e["frames"]) for e in events] == [
        (5, 7, 3),
        (22, 25, 4),
    ]
    assert all(e["peak_score"] > 0.99 for e in events)
    assert summary.scored == 30 and summary.events == 2 and summary.dropped == 0


def test_every_roi_pictures_and_video_out(video, tmp_path):
    out = tmp_path / "out"
    # the region misses the defects (at x 40..55): nothing is flagged
    stream_video(_Brightest(), str(video), out, roi=(60, 0, 36, 64), every=3)
    frames = _lines(out / "frames.jsonl")
    assert [f["frame"] for f in frames] == list(range(0, 30, 3))
    assert not any(f["anomalous"] for f in frames)
    # a region over the defects: flagged, the heat map drawn back in place, a video written
    stream_video(
        _Brightest(),
        str(video),
        out,
        roi=(32, 10, 40, 40),
        video_out=tmp_path / "annotated.mp4",
        save_anomalous=True,
    )
    frames = _lines(out / "frames.jsonl")
    assert {f["frame"] for f in frames if f["anomalous"]} == DEFECTS
    saved = sorted(p.name for p in (out / "anomalous").iterdir())
    assert saved == [f"frame_{i:06d}.png" for i in sorted(DEFECTS)]
    picture = np.asarray(Image.open(out / "anomalous" / "frame_000005.png"))
    assert picture.shape == (*SIZE, 3)
    assert not np.array_equal(picture[20:36, 40:56], _frame(5, (20, 40))[20:36, 40:56])
    with av.open(str(tmp_path / "annotated.mp4")) as written:
        decoded = list(written.decode(video=0))
    assert len(decoded) == 30 and decoded[0].width == SIZE[1]


@pytest.mark.slow  # waits for writers, retries or a killed process
def test_live_drops_frames_to_keep_latency_bounded(tmp_path):
    frames = [_frame(i) for i in range(60)]
    source = _video(tmp_path / "fast.mp4", frames, fps=30)  # 2 s at 30 frames/s
    slow = _Brightest(delay=0.15)  # scores about 7 frames/s
    summary = stream_video(slow, str(source), tmp_path / "out", live=True)
    records = _lines(tmp_path / "out" / "frames.jsonl")
    assert summary.decoded == 60
    assert summary.dropped > 30 and summary.scored + summary.dropped == 60
    assert max(r["latency_ms"] for r in records) < 600  # one frame's scoring, not a backlog
    assert [r["frame"] for r in records] == sorted(r["frame"] for r in records)


def test_stream_command_errors_are_one_line(video, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cflowad.cli.streams, "load", lambda path, device: _Brightest())
    text = tmp_path / "notes.mp4"
    text.write_text("not a video")
    truncated = tmp_path / "cut.mp4"
    truncated.write_bytes(video.read_bytes()[:400])
    cases = [
        ([str(tmp_path / "missing.mp4")], "not found"),
        ([str(text)], "not a video"),
        ([str(truncated)], "cut.mp4"),
        ([str(video), "--roi", "90,0,40,40"], "--roi"),
        ([str(video), "--roi", "a,b"], "--roi"),
        ([str(video), "--video-out", str(tmp_path / "x.txt")], "--video-out"),
    ]
    for arguments, words in cases:
        code = main(["stream", "model", *arguments, "--out", str(tmp_path / "o"), "-q"])
        err = capsys.readouterr().err
        assert code == 2, (arguments, err)
        lines = [line for line in err.splitlines() if line.startswith("cflowad: error: ")]
        assert len(lines) == 1 and words in lines[0], err
        assert "Traceback" not in err
    assert main(["stream", "model", str(video), "--out", str(tmp_path / "ok"), "-q"]) == 0


def _png(path: Path, value: int = 60, defect: bool = False) -> bytes:
    image = np.full((40, 40, 3), value, np.uint8)
    if defect:
        image[10:20, 10:20] = 255
    from io import BytesIO

    buffer = BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def _watch_in_thread(model, inbox, out, **options):
    stop = threading.Event()
    result = {}

    def run():
        result["summary"] = watch_folder(model, inbox, out, stop=stop, settle=0.3, **options)

    thread = threading.Thread(target=run)
    thread.start()
    return stop, thread, result


def _wait_for(condition, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.slow  # waits for writers, retries or a killed process
def test_hot_folder_waits_for_slow_writers_rejects_corrupt_files_and_resumes(tmp_path):
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    inbox.mkdir()
    model = _Brightest()
    stop, thread, _ = _watch_in_thread(model, inbox, out)
    try:
        # written slowly in three parts: a reader that did not wait would reject it
        data = _png(inbox / "slow.png", defect=True)
        with (inbox / "slow.png").open("wb") as handle:
            for part in (data[:30], data[30:60], data[60:]):
                handle.write(part)
                handle.flush()
                time.sleep(0.2)
        # written under a temporary name, then renamed into place
        (inbox / "renamed.png.part").write_bytes(_png(inbox / "x"))
        os.replace(inbox / "renamed.png.part", inbox / "renamed.png")
        (inbox / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
        journal = out / "results.jsonl"
        _wait_for(lambda: journal.is_file() and len(_lines(journal)) == 2)
        _wait_for(lambda: (out / "rejected" / "corrupt.png").exists())
    finally:
        stop.set()
        thread.join(30)
    records = {r["file"]: r for r in _lines(out / "results.jsonl")}
    assert set(records) == {"slow.png", "renamed.png"}
    assert records["slow.png"]["anomalous"] and not records["renamed.png"]["anomalous"]
    assert np.load(out / records["slow.png"]["map"]).shape == (40, 40)
    rejected = _lines(out / "rejected" / "rejected.jsonl")
    assert [r["file"] for r in rejected] == ["corrupt.png"]
    assert "corrupt.png" in rejected[0]["reason"]
    assert not (inbox / "corrupt.png").exists()
    # a restart: the two are not scored again; a new file is
    (inbox / "later.png").write_bytes(_png(inbox / "y", value=70))
    summary = watch_folder(model, inbox, out, settle=0.3, once=True)
    assert summary.scored == 1
    files = [r["file"] for r in _lines(out / "results.jsonl")]
    assert files == ["slow.png", "renamed.png", "later.png"]


@pytest.mark.parametrize("reopens", [True, False], ids=["closes-and-appends", "keeps-open"])
@pytest.mark.slow  # waits for writers, retries or a killed process
def test_a_writer_that_pauses_midway_is_waited_for_not_rejected(tmp_path, reopens):
    """A slow share: half the file, a 2 s pause (far past --settle), then the rest.

    Before 0.8 the half file was rejected as truncated after the settle time, and the
    rest landed as a second broken file: one good image, never scored.
    """
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    inbox.mkdir()
    stop, thread, _ = _watch_in_thread(_Brightest(), inbox, out, reject_after=6.0)
    try:
        data = _png(inbox, defect=True)
        target = inbox / "slow.png"
        with target.open("wb") as handle:
            handle.write(data[: len(data) // 2])
            handle.flush()
            if reopens:
                handle.close()
            time.sleep(2.0)
            if reopens:
                handle = target.open("ab")  # a second writer session
            handle.write(data[len(data) // 2 :])
            handle.close()
        journal = out / "results.jsonl"
        _wait_for(lambda: journal.is_file() and len(_lines(journal)) == 1)
    finally:
        stop.set()
        thread.join(30)
    (record,) = _lines(out / "results.jsonl")
    assert record["file"] == "slow.png" and record["anomalous"]
    assert record["bytes"] == len(data)
    assert not any((out / "rejected").iterdir())


@pytest.mark.slow  # waits for writers, retries or a killed process
def test_an_unreadable_file_is_rejected_only_after_reject_after(tmp_path):
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    inbox.mkdir()
    stop, thread, _ = _watch_in_thread(_Brightest(), inbox, out, reject_after=2.0)
    try:
        (inbox / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
        written = time.monotonic()
        _wait_for(lambda: (out / "rejected" / "corrupt.png").exists())
        waited = time.monotonic() - written
    finally:
        stop.set()
        thread.join(30)
    assert 2.0 <= waited < 10.0
    assert [r["file"] for r in _lines(out / "rejected" / "rejected.jsonl")] == ["corrupt.png"]


def test_move_done_finishes_a_move_that_a_crash_interrupted(tmp_path):
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    inbox.mkdir()
    for i in range(3):
        (inbox / f"{i}.png").write_bytes(_png(inbox, value=50 + i))
    watch_folder(_Brightest(), inbox, out, move_done=True, settle=0.1, once=True)
    assert sorted(p.name for p in (out / "done").iterdir()) == ["0.png", "1.png", "2.png"]
    # as if killed after writing the record of 1.png but before moving it
    os.replace(out / "done" / "1.png", inbox / "1.png")
    model = _Brightest()
    summary = watch_folder(model, inbox, out, move_done=True, settle=0.1, once=True)
    assert summary.scored == 0 and model.images == 0
    assert not any(inbox.iterdir()) and len(_lines(out / "results.jsonl")) == 3


@pytest.mark.slow  # waits for writers, retries or a killed process
def test_kill_9_midway_neither_loses_nor_rescores(tmp_path):
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    inbox.mkdir()
    for i in range(24):
        (inbox / f"{i:02d}.png").write_bytes(_png(inbox, value=40 + i))
    script = textwrap.dedent(
        f"""
        import sys, time, torch
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from pathlib import Path
        from test_streams import _Brightest
        from cflowad.line.watch import watch_folder
        watch_folder(_Brightest(delay=0.1), Path({str(inbox)!r}), Path({str(out)!r}),
                     settle=0.1, batch_size=2, once=True)
        """
    )
    process = subprocess.Popen([sys.executable, "-c", script])
    journal = out / "results.jsonl"
    _wait_for(lambda: journal.is_file() and len(journal.read_text().splitlines()) >= 6, 120)
    process.send_signal(signal.SIGKILL)
    process.wait(30)
    first = len(_lines(journal))
    assert 6 <= first < 24
    watch_folder(_Brightest(), inbox, out, settle=0.1, once=True)
    files = [r["file"] for r in _lines(journal)]
    assert sorted(files) == [f"{i:02d}.png" for i in range(24)]  # each once: none lost, none twice


def test_real_model_flags_the_defective_frames(trained_model, texture_dataset, tmp_path):
    """The default model on a video of real textures: the frames with pasted defects are
    flagged, and each frame's decision is the model's on that frame's pixels."""
    files = sorted((texture_dataset / "test").glob("*/*.png"))
    scores = trained_model.predict(files).scores
    ranked = [f for _, f in sorted(zip(scores, files, strict=True), key=lambda p: p[0])]
    good = [f for f in ranked if "good" in f.parts][:4]  # the clearest of each kind
    bad = [f for f in ranked if "patch" in f.parts][-3:]
    order = [good[0], good[1], bad[0], bad[1], good[2], good[3], bad[2], good[0]]
    frames = [np.asarray(Image.open(p).convert("RGB")) for p in order]
    source = _video(tmp_path / "textures.mp4", frames)
    stream_video(trained_model, str(source), tmp_path / "out", batch_size=4, debounce=2)
    flagged = {f["frame"] for f in _lines(tmp_path / "out" / "frames.jsonl") if f["anomalous"]}
    with av.open(str(source)) as container:
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert flagged == set(np.flatnonzero(trained_model.predict(decoded).anomalous).tolist())
    assert {2, 3, 6} <= flagged
    events = _lines(tmp_path / "out" / "events.jsonl")
    assert [(e["first_frame"], e["last_frame"]) for e in events][:1] == [(2, 3)]


@pytest.mark.slow  # waits for writers, retries or a killed process
def test_a_network_stream_that_stops_is_retried_then_ends_with_one_line(tmp_path):
    """An http:// source served here (MPEG-TS, as cameras stream): each time it ends it is
    reopened (frames numbered on), until the retries are spent; what was scored is kept."""
    import functools
    import http.server

    (tmp_path / "www").mkdir()
    video = _video(tmp_path / "www" / "camera.ts", [_frame(i) for i in range(30)])
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(video.parent))
    handler.log_message = lambda *args: None  # type: ignore[attr-defined]
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        url = f"http://127.0.0.1:{server.server_address[1]}/{video.name}"
        with pytest.raises(UserError, match=r"the stream ended after 60 frames; gave up after 1"):
            stream_video(_Brightest(), url, tmp_path / "out", retries=1, backoff=0.05)
        server.shutdown()
    frames = [f["frame"] for f in _lines(tmp_path / "out" / "frames.jsonl")]
    assert frames == list(range(60))


def test_the_journal_drops_only_a_torn_last_line(tmp_path):
    from cflowad.line.watch import _read_journal

    journal = tmp_path / "results.jsonl"

    def record(name: str) -> str:
        return json.dumps({"file": name, "bytes": 1, "modified_ns": 2})

    cases = [  # (journal on disk, files it says are done, journal afterwards)
        (record("a") + "\n" + record("b") + "\n", {"a", "b"}, None),  # whole: not rewritten
        (record("a") + "\n" + record("b")[:10], {"a"}, record("a") + "\n"),
        (record("a") + "\n" + record("b"), {"a", "b"}, record("a") + "\n" + record("b") + "\n"),
        (record("a")[:5], set(), ""),
    ]
    for text, done, after in cases:
        journal.write_text(text)
        assert {key[0] for key in _read_journal(journal)} == done
        assert journal.read_text() == (text if after is None else after)


def test_calibrate_frames_refits_the_thresholds_on_the_first_frames(
    trained_model, texture_dataset, tmp_path
):
    """A camera whose light and codec differ from the training photos: the first 12
    frames (good, by the user's word) set the thresholds, which are the order
    statistics of their raw scores; the rest is decided by the model saved in OUT/model."""
    trained = trained_model.calibration.image_threshold_raw

    def shifted(path: Path) -> np.ndarray:  # brighter, lower contrast: new lighting
        pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)
        return np.clip(0.85 * pixels + 40, 0, 255).astype(np.uint8)

    good = sorted((texture_dataset / "train" / "good").glob("*.png"))
    patches = sorted((texture_dataset / "test" / "patch").glob("*.png"))
    clearest = np.argsort(trained_model.predict(patches).scores)[-4:]
    frames = [shifted(p) for p in good[:20]] + [shifted(patches[i]) for i in clearest]
    source = tmp_path / "camera.mp4"
    with av.open(str(source), "w") as container:  # lossy, as a camera sends it
        stream = container.add_stream("libx264", rate=FPS)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    out = tmp_path / "out"
    stream_video(trained_model, str(source), out, batch_size=8, calibrate_frames=12)
    lines = _lines(out / "frames.jsonl")
    assert [line.get("calibration", False) for line in lines] == [True] * 12 + [False] * 12
    record = json.loads((out / "calibration.json").read_text())
    calibrated = cflowad.load(out / "model", "cpu")
    raw = [line["raw_score"] for line in lines[:12]]
    # 12 images reach a 1/13 rate at best: the threshold is their highest raw score
    assert record["image_threshold_raw"] == pytest.approx(max(raw))
    assert record["image_fpr_achievable"] == pytest.approx(1 / 13)
    assert calibrated.calibration.image_threshold_raw == pytest.approx(max(raw))
    assert trained_model.calibration.image_threshold_raw == trained  # not changed
    with av.open(str(source)) as container:
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    expected = calibrated.predict(decoded[12:]).anomalous.tolist()
    assert [line["anomalous"] for line in lines[12:]] == expected
    assert all(expected[-4:])  # the defects are still caught
    # the good frames after the first 12: flagged by the trained thresholds, fewer now
    before = trained_model.predict(decoded[12:20]).anomalous
    assert sum(expected[:8]) < before.sum()
    with pytest.raises(UserError, match="at least 2"):
        stream_video(trained_model, str(source), tmp_path / "o2", calibrate_frames=1)


def test_watch_calibrate_images_and_a_restart_keeps_it(
    trained_model, texture_dataset, tmp_path, monkeypatch
):
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    inbox.mkdir()
    good = sorted((texture_dataset / "train" / "good").glob("*.png"))
    for k, path in enumerate(good[:6]):
        (inbox / f"g{k:02d}.png").write_bytes(path.read_bytes())
    # the calibration ends with a batch: nothing is left of it to decide anew
    watch_folder(trained_model, inbox, out, once=True, settle=0, calibrate_images=4, batch_size=4)
    records = _lines(out / "results.jsonl")
    assert [r.get("calibration", False) for r in records] == [True] * 4 + [False] * 2
    assert all("score" not in r for r in records[:4]) and all("score" in r for r in records[4:])
    calibration = json.loads((out / "calibration.json").read_text())
    assert calibration["image_threshold_raw"] == pytest.approx(
        max(r["raw_score"] for r in records[:4])
    )
    calibrated = cflowad.load(out / "model", "cpu")
    expected = calibrated.predict([inbox / "g04.png", inbox / "g05.png"]).anomalous.tolist()
    assert [r["anomalous"] for r in records[4:]] == expected
    # a restart decides with the saved calibration, and does not calibrate again; it
    # loads it on the device the model runs on (--device), not on "auto"'s choice,
    # which is made CUDA here (0.14.2 reloaded it there)
    assert trained_model.device.type == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    bad = sorted((texture_dataset / "test" / "patch").glob("*.png"))[0]
    (inbox / "later.png").write_bytes(bad.read_bytes())
    watch_folder(trained_model, inbox, out, once=True, settle=0, calibrate_images=4)
    last = _lines(out / "results.jsonl")[-1]
    assert last["file"] == "later.png" and "calibration" not in last
    assert last["anomalous"] == bool(calibrated.predict([bad]).anomalous[0])

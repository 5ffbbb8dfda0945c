"""What sits behind the studio's page: workspace files, revisions, marks, thresholds,
the progress file, and the server following model files. The page itself is driven in
a real browser in tests/test_studio_browser.py."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from cflowad.common.errors import UserError
from cflowad.common.progress import Reporter
from cflowad.data.files import read_records
from cflowad.engine.catalog import identity
from cflowad.engine.model import CFlowAD
from cflowad.method.calibration import false_positive_rate, order_statistic_threshold
from cflowad.studio.workspace import Workspace


@pytest.fixture(scope="module")
def gaussian_model(texture_dataset, tmp_path_factory) -> Path:
    """A model directory fitted in seconds (the Gaussian decoder), as cflowad train writes."""
    out = tmp_path_factory.mktemp("gaussian") / "brick"
    CFlowAD(decoder="gaussian", image_size=64, image_fpr=0.2, seed=0).fit(texture_dataset).save(out)
    return out


def test_workspace_starts_and_resumes(tmp_path):
    root = tmp_path / "ws"
    Workspace(root).open()
    assert json.loads((root / "studio.json").read_text())["format"] == "cflowad-studio"
    secret = Workspace(root).open().secret
    assert secret == Workspace(root).open().secret  # CSRF tokens survive a restart
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="other files"):
        Workspace(tmp_path / "busy").open()
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"


def test_paths_stay_inside_the_allowed_folders(tmp_path):
    allowed = tmp_path / "data"
    (allowed / "parts").mkdir(parents=True)
    (tmp_path / "secret").mkdir()
    (allowed / "escape").symlink_to(tmp_path / "secret")
    workspace = Workspace(tmp_path / "ws", [allowed]).open()
    assert workspace.resolve("data", "parts") == (allowed / "parts").resolve()
    for relative in ("../secret", "parts/../../secret", "/etc", "escape", "escape/x"):
        with pytest.raises(UserError):
            workspace.resolve("data", relative)
    with pytest.raises(UserError, match="unknown folder"):
        workspace.resolve("etc", "")


@pytest.mark.slow  # trains
def test_a_file_linked_out_of_the_allowed_folders_is_never_read(tmp_path, texture_dataset):
    """A folder is resolved once, but each file in it may be a symbolic link: one that
    leads outside refuses the folder for scoring and training, and the hot folder
    rejects it unread; a link to a file inside an allowed folder is fine."""
    from cflowad.line.watch import watch_folder

    good = sorted((texture_dataset / "test" / "good").iterdir())
    allowed, secret = tmp_path / "data", tmp_path / "secret"
    (allowed / "parts").mkdir(parents=True)
    secret.mkdir()
    shutil.copy(good[0], secret / "private.png")
    shutil.copy(good[1], allowed / "parts" / "a.png")
    (allowed / "parts" / "b.png").symlink_to(allowed / "parts" / "a.png")  # inside: kept
    workspace = Workspace(tmp_path / "ws", [allowed]).open()
    folder = workspace.resolve("data", "parts")
    assert [p.name for p in workspace.images(folder)] == ["a.png", "b.png"]
    (allowed / "parts" / "c.png").symlink_to(secret / "private.png")
    for listing in (workspace.images, workspace.training_images):
        with pytest.raises(UserError, match=r"c\.png: a symbolic link that leads outside"):
            listing(folder)
    # the hot folder: the link is moved to rejected/ (the link, not what it points to)
    model = CFlowAD(decoder="gaussian", image_size=64, seed=0).fit(texture_dataset)
    read: list[str] = []
    summary = watch_folder(
        model,
        folder,
        tmp_path / "out",
        settle=0,
        once=True,
        on_result=lambda image, result, record: read.append(Path(record["image"]).name),
        confine=workspace.confine,
    )
    assert sorted(read) == ["a.png", "b.png"] and summary.rejected == 1
    rejected = read_records(tmp_path / "out" / "rejected" / "rejected.jsonl")
    assert rejected[0]["file"] == "c.png" and "symbolic link" in rejected[0]["reason"]
    assert (tmp_path / "out" / "rejected" / "c.png").is_symlink()
    assert (secret / "private.png").read_bytes() == good[0].read_bytes()


def test_revisions_promotion_and_outside_changes(tmp_path, gaussian_model):
    workspace = Workspace(tmp_path / "ws").open()
    shutil.copytree(gaussian_model, workspace.models / "brick")  # as a user copies a model in
    assert workspace.sync_models() == ["brick"]
    assert workspace.sync_models() == []  # nothing changed: no new revision
    first = workspace.served_revision("brick")
    assert first is not None and first.number == 1 and first.created["kind"] == "imported"
    # a threshold revision: a new model directory, its old one kept
    model = CFlowAD.load(first.path, device="cpu")
    model.set_image_threshold(0.99)
    model.save(workspace.revision_path("brick", 2))
    workspace.record_created(
        "brick", 2, "threshold", identity(workspace.revision_path("brick", 2)) or ""
    )
    workspace.promote("brick", 2)
    served = json.loads((workspace.models / "brick" / "model.json").read_text())
    assert served["calibration"]["image_threshold_raw"] == 0.99
    assert CFlowAD.load(workspace.models / "brick", device="cpu").net.image_threshold == 0.99
    workspace.promote("brick", 1)  # restored: the old threshold is served again
    restored = json.loads((workspace.models / "brick" / "model.json").read_text())
    assert restored["calibration"]["image_threshold_raw"] == first_threshold(first.path)
    assert [e["event"] for e in workspace.history("brick")] == [
        "created", "promoted", "created", "promoted", "promoted",
    ]  # fmt: skip
    # a model trained again by the CLI into models/ becomes revision 3
    model.set_image_threshold(0.98)
    shutil.rmtree(workspace.models / "brick")
    model.save(workspace.models / "brick")
    assert workspace.sync_models() == ["brick"]
    latest = workspace.served_revision("brick")
    assert latest is not None and latest.number == 3 and "outside" in latest.created["note"]


def test_the_review_steps_run_without_http(tmp_path, gaussian_model, texture_dataset):
    """ModelReview, as the page's views call it: the threshold view, a saved threshold, a
    promotion refused until the comparison is made, the comparison's counts against
    each revision's own predictions."""
    from cflowad.studio.jobs import TrainingQueue
    from cflowad.studio.review import ModelReview
    from cflowad.studio.runs import ScoringRuns

    workspace = Workspace(tmp_path / "ws").open()
    shutil.copytree(gaussian_model, workspace.models / "brick")
    workspace.sync_models()
    runs = ScoringRuns(workspace, lambda name, images: (1, []))
    review = ModelReview(workspace, runs, TrainingQueue(workspace, lambda *_: None), "cpu")
    trained = CFlowAD.load(gaussian_model, device="cpu").calibration
    view = review.threshold("brick")
    assert view["threshold_raw"] == trained.image_threshold_raw and view["can_save"]
    assert view["holdout"] == list(trained.holdout_raw_scores) and view["reviewed"] == []
    lowered = trained.image_threshold_raw * 0.8
    assert review.save_threshold("brick", lowered) == 2
    assert CFlowAD.load(workspace.models / "brick").calibration.image_threshold_raw == lowered
    # a candidate never served: refused until compared
    candidate = CFlowAD.load(gaussian_model, device="cpu")
    candidate.save(workspace.revision_path("brick", 3))
    workspace.record_created("brick", 3, "retrain", identity(workspace.revision_path("brick", 3)))
    with pytest.raises(UserError, match="has not been compared"):
        review.promote("brick", 3)
    good = sorted((texture_dataset / "test" / "good").iterdir())[:3]
    bad = sorted((texture_dataset / "test" / "patch").iterdir())[:3]
    for image, mark in [*((g, "good") for g in good), *((b, "defective") for b in bad)]:
        workspace.add_mark({"image": str(image), "mark": mark, "model": "brick", "score": 0})
    compared = review.compare("brick", 3)
    served, new = (
        CFlowAD.load(workspace.models / "brick"),
        CFlowAD.load(workspace.revision_path("brick", 3)),
    )
    assert compared["false_alarms_before"] == int(served.predict(good).anomalous.sum())
    assert compared["false_alarms_after"] == int(new.predict(good).anomalous.sum())
    assert compared["defects_caught_after"] == int(new.predict(bad).anomalous.sum())
    assert {r["name"] for r in compared["rows"]} == {p.name for p in good + bad}
    review.promote("brick", 3)
    assert workspace.served_revision("brick").number == 3
    assert review.compare("brick", 3)["served"] == 3  # a new pair, compared afresh


def first_threshold(path: Path) -> float:
    return float(
        json.loads((path / "model.json").read_text())["calibration"]["image_threshold_raw"]
    )


def test_marks_are_synced_files_and_the_last_one_counts(tmp_path):
    workspace = Workspace(tmp_path / "ws").open()
    base = {"model": "brick", "revision": 1, "score": 0.7}
    workspace.add_mark({**base, "image": "/a.png", "mark": "good"})
    workspace.add_mark({**base, "image": "/b.png", "mark": "defective"})
    workspace.add_mark({**base, "image": "/a.png", "mark": "none"})
    workspace.add_mark({**base, "image": "/c.png", "mark": "good", "model": "other"})
    assert set(workspace.marks("brick")) == {"/b.png"}
    assert set(workspace.marks()) == {"/b.png", "/c.png"}
    records = read_records(workspace.feedback_file)
    assert len(records) == 4 and all("time" in r for r in records)
    with workspace.feedback_file.open("a") as handle:
        handle.write('{"image": "/d.png", "mark": "go')  # a write cut short by kill -9
    assert set(workspace.marks("brick")) == {"/b.png"}
    with pytest.raises(UserError, match="mark"):
        workspace.add_mark({**base, "image": "/a.png", "mark": "maybe"})


def test_false_positive_rate_agrees_with_the_order_statistic_threshold():
    values = np.random.default_rng(0).random(199)
    for fpr in (0.01, 0.05, 0.2):
        threshold = order_statistic_threshold(values, fpr)
        assert false_positive_rate(values, threshold.value) == pytest.approx(
            threshold.achievable_fpr
        )
    # brute force: (m + 1) / (n + 1), m of n above
    assert false_positive_rate([0.1, 0.2, 0.3], 0.15) == pytest.approx(3 / 4)


def test_a_saved_threshold_scores_as_expected(gaussian_model, texture_dataset, tmp_path):
    model = CFlowAD.load(gaussian_model, device="cpu")
    held = model.calibration.holdout_raw_scores
    assert len(held) == model.calibration.n_images
    image = sorted((texture_dataset / "test" / "good").iterdir())[0]
    raw = model.predict([image]).raw_scores[0]
    model.set_image_threshold(raw * 0.5)
    model.save(tmp_path / "lower")
    lowered = CFlowAD.load(tmp_path / "lower", device="cpu")
    result = lowered.predict([image])
    assert result.anomalous[0] and result.raw_scores[0] == pytest.approx(raw, rel=1e-6)
    # the readable scale follows: the new threshold sits at 0.5
    assert lowered.calibration.image_fpr_achievable == pytest.approx(
        false_positive_rate(held, raw * 0.5)
    )
    with pytest.raises(UserError, match="between 0 and 1"):
        lowered.set_image_threshold(1.5)


def test_progress_file_follows_a_task(tmp_path):
    path = tmp_path / "progress.json"
    reporter = Reporter(enabled=False, progress_file=path)
    with reporter.task("training", 10) as task:
        for _ in range(10):
            task.advance(1, status="loss 1.0")
            time.sleep(0.03)
        middle = json.loads(path.read_text())
    final = json.loads(path.read_text())
    assert middle["step"] == "training" and middle["total"] == 10 and middle["done"] >= 6
    assert final["done"] == 10 and final["finished"] and final["eta_seconds"] == 0
    assert final["per_second"] > 0 and final["status"] == "loss 1.0"


def test_jpeg_fits_the_side_keeps_the_aspect_and_the_picture():
    import io

    from PIL import Image
    from skimage import data as skdata

    from cflowad.results.pictures import jpeg

    photo = skdata.astronaut()[:, 64:448]  # 512 x 384, uint8
    for image in (photo, photo / 255.0):
        sent = Image.open(io.BytesIO(jpeg(image, 128)))
        assert sent.format == "JPEG" and sent.size == (96, 128)
        small = np.asarray(Image.fromarray(photo).resize((96, 128), Image.Resampling.LANCZOS))
        assert np.abs(np.asarray(sent, float) - small).mean() < 6


def test_every_module_of_the_page_is_served_and_nothing_else():
    """The page is ES modules (one a view): the server's list of files it serves is the
    folder's, so a module added to static/ without it would break the page."""
    from importlib import resources

    from cflowad.studio.app import _STATIC

    shipped = {
        p.name
        for p in resources.files("cflowad.studio").joinpath("static").iterdir()
        if p.name.endswith((".js", ".css"))
    }
    assert set(_STATIC) == shipped
    assert all(kind == "text/javascript" for name, kind in _STATIC.items() if name.endswith(".js"))

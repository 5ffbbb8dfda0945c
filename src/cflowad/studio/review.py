"""The loop's decisions on a workspace, without HTTP: the threshold view and a saved
threshold, a retraining with the marks, the comparison of two revisions, a promotion.

:func:`cflowad.studio.app.create_studio` answers the page with these; a test or a
script calls them directly. Every change is a file in the workspace (a revision, a
history line, a comparison), so what the page shows survives a restart.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from cflowad.common.errors import UserError
from cflowad.data.files import read_json, write_json
from cflowad.data.images import load_image
from cflowad.engine.catalog import Calibration, identity, read_card
from cflowad.engine.inference import Predictor
from cflowad.engine.loading import load
from cflowad.engine.model import CFlowAD
from cflowad.studio.jobs import TrainingQueue
from cflowad.studio.runs import ScoringRuns
from cflowad.studio.workspace import Revision, Workspace

__all__ = ["ModelReview"]

_T = TypeVar("_T")


def _now(function: Callable[[], _T]) -> _T:
    return function()


class ModelReview:
    """Threshold, retrain, compare and promote for the models of one workspace.

    Args:
        workspace: the opened workspace.
        runs: its scored runs (the threshold view shows their images).
        queue: its trainings (a retraining is queued there).
        device: where revisions are loaded to be compared (the studio's ``--device``).
        compute: runs a scoring function and returns its result (the server's compute
            pool, so that a comparison takes turns with requests); in the caller's
            thread by default.
    """

    def __init__(
        self,
        workspace: Workspace,
        runs: ScoringRuns,
        queue: TrainingQueue,
        device: str = "auto",
        compute: Callable[[Callable[[], Any]], Any] = _now,
    ) -> None:
        self.workspace, self.runs, self.queue = workspace, runs, queue
        self.device, self.compute = device, compute

    def served(self, name: str) -> Revision:
        """The served revision of ``name``, or a UserError."""
        served = self.workspace.served_revision(name)
        if served is None:
            raise UserError(f"unknown model {name!r}")
        return served

    # -- threshold ---------------------------------------------------------------------

    def threshold(self, name: str) -> dict[str, Any]:
        """What the threshold view draws: the served threshold, the held-out scores and
        the reviewed images of this revision's training (their raw scores and marks)."""
        served = self.served(name)
        calibration = _calibration(served.path)
        marks = self.workspace.marks(name)
        reviewed: dict[str, dict[str, Any]] = {}
        lineage = {
            r.number for r in self.workspace.revision_list(name) if r.trained == served.trained
        }
        for run in self.runs.runs():
            if run.get("model") != name:
                continue
            for record in self.runs.records(run["id"]):
                if record.get("revision") in lineage and "raw_score" in record:
                    reviewed[record["image"]] = {
                        "raw": record["raw_score"],
                        "mark": marks.get(record["image"], {}).get("mark"),
                        "name": record["name"],
                    }
        return {
            "model": name,
            "revision": served.number,
            "threshold_raw": calibration.image_threshold_raw,
            "holdout": list(calibration.holdout_raw_scores),
            "image_fpr_achievable": calibration.image_fpr_achievable,
            "reviewed": list(reviewed.values()),
            "can_save": served.path.is_dir(),
        }

    def save_threshold(self, name: str, raw: float) -> int:
        """A new revision with the image threshold at ``raw``, served at once; its number."""
        served = self.served(name)
        if not served.path.is_dir():
            raise UserError(
                f"{name} is an ONNX file: save the threshold on its model directory, then "
                "export it again"
            )
        model = CFlowAD.load(served.path, device="cpu")
        model.set_image_threshold(raw, source="cflowad studio")
        number = self.workspace.next_revision(name)
        target = self.workspace.revision_path(name, number)
        model.save(target)
        self.workspace.record_created(
            name,
            number,
            "threshold",
            identity(target) or "",
            parent=served.number,
            trained_revision=served.trained,
            data=served.created.get("data"),
            settings=served.created.get("settings"),
            note=f"image threshold {raw:.6g}",
        )
        self.workspace.promote(name, number)
        return number

    # -- retrain, compare, promote ------------------------------------------------------

    def retrain(self, name: str) -> dict[str, Any]:
        """Queue a new revision trained on the served one's images plus those marked good."""
        served = self.served(name)
        trained = self.workspace.revision(name, served.trained)
        data = trained.created.get("data")
        if not data:
            raise UserError(
                f"model {name!r} came from outside the studio, so its training images are "
                "unknown: start a training with its folder and the same name"
            )
        good = sorted(k for k, m in self.workspace.marks(name).items() if m["mark"] == "good")
        if not good:
            raise UserError("no images are marked good for this model: mark false alarms first")
        settings = dict(trained.created.get("settings") or {})
        calibration = _calibration(served.path)
        if calibration.image_threshold_source and calibration.image_fpr_achievable:
            # a threshold set by hand carries over as its held-out rate: raw scores of
            # two trainings are not on one scale, their false-positive rates are
            settings["image_fpr"] = calibration.image_fpr_achievable
        return self.queue.submit(name, tuple(data), settings, "feedback", served.number, good)

    def compare(self, name: str, revision: int) -> dict[str, Any]:
        """The served revision and ``revision`` on every marked image: each one's scores
        and decisions, false alarms and defects caught before and after (kept on disk
        until the marks change)."""
        served = self.served(name)
        candidate = self.workspace.revision(name, revision)
        cache = self._comparison(name, served, candidate)
        marks = self.workspace.marks(name)
        cached = read_json(cache)
        if cached.get("marks") == sorted(marks):
            return cached
        images = [m for m in marks if Path(m).is_file()]
        old = self.compute(lambda: _score_files(load(served.path, self.device), images))
        new = self.compute(lambda: _score_files(load(candidate.path, self.device), images))
        rows = [
            {
                "image": image,
                "name": Path(image).name,
                "mark": marks[image]["mark"],
                "old_score": o[0],
                "old_anomalous": o[1],
                "new_score": n[0],
                "new_anomalous": n[1],
            }
            for image, o, n in zip(images, old, new, strict=True)
        ]
        good = [r for r in rows if r["mark"] == "good"]
        bad = [r for r in rows if r["mark"] == "defective"]
        result = {
            "model": name,
            "served": served.number,
            "candidate": candidate.number,
            "marks": sorted(marks),
            "rows": rows,
            "false_alarms_before": sum(r["old_anomalous"] for r in good),
            "false_alarms_after": sum(r["new_anomalous"] for r in good),
            "defects_caught_before": sum(r["old_anomalous"] for r in bad),
            "defects_caught_after": sum(r["new_anomalous"] for r in bad),
            "marked_good": len(good),
            "marked_defective": len(bad),
        }
        write_json(cache, result)
        return result

    def promote(self, name: str, revision: int) -> None:
        """Serve ``revision``: one served before (a restore), or a new one whose
        comparison with the served one has been made."""
        served = self.workspace.served_revision(name)
        candidate = self.workspace.revision(name, revision)
        compared = served is not None and self._comparison(name, served, candidate).is_file()
        if candidate.number not in self.workspace.promoted(name) and not compared:
            raise UserError(
                f"revision {candidate.number} has not been compared with the served one: "
                "open Compare first"
            )
        self.workspace.promote(name, candidate.number)

    def _comparison(self, name: str, served: Revision, candidate: Revision) -> Path:
        return (
            self.workspace.revisions / name / f"compare-r{served.number}-r{candidate.number}.json"
        )


def _score_files(model: Predictor, images: list[str]) -> list[tuple[float, bool]]:
    if not images:
        return []
    return [
        (round(r.score, 6), bool(r.anomalous))
        for r in model.predict_iter([load_image(Path(i)) for i in images], batch_size=8)
    ]


def _calibration(path: Path) -> Calibration:
    """A revision's calibration: model.json's, or the ONNX file's metadata."""
    return read_card(path).calibration

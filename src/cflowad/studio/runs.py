"""Folders scored by the studio: one record and a few pictures per image, made once.

A run is ``runs/ID/``: ``run.json`` (model, revision, folder, state, counts),
``results.jsonl`` (one record per image, appended as it is scored) and
``pictures/NNNNNN.{card,image,heat,overlay}.jpg``. Scoring runs in a thread of
its own, batch by batch on the server's compute pool (the same engine that answers
/v1), so it never blocks the page or a prediction for long. A run stopped by a
restart continues after the last record it wrote.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from cflowad.common.errors import UserError, reason
from cflowad.data.files import append_record, read_json, read_records, write_json
from cflowad.data.images import load_image
from cflowad.engine.inference import ImageResult
from cflowad.results.pictures import blend, jpeg
from cflowad.studio.workspace import Workspace, new_id, now

__all__ = ["PICTURES", "ScoringRuns", "save_pictures"]

log = logging.getLogger("cflowad.studio")

PICTURES = ("card", "image", "heat", "overlay")
CARD_SIDE, DETAIL_SIDE = 240, 800
_BATCH = 8

# (model name, images) -> their results, scored by the served revision of the model
Scorer = Callable[[str, list[np.ndarray]], tuple[int, list[ImageResult]]]


class ScoringRuns:
    """Scored folders: queued, scored one after the other by one thread, read by the page."""

    def __init__(self, workspace: Workspace, score: Scorer) -> None:
        self.workspace = workspace
        self.score = score
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._cache: dict[str, tuple[int, list[dict[str, Any]]]] = {}

    def submit(
        self, model: str, folder: tuple[str, str], label: str | None = None
    ) -> dict[str, Any]:
        """Queue scoring every image directly in ``folder`` (root, relative) with ``model``."""
        path = self.workspace.resolve(*folder)
        images = self.workspace.images(path)  # none, or a link out: the error now
        run_id = new_id(self.workspace.runs, "run-")
        run = {
            "id": run_id,
            "model": model,
            "folder": list(folder),
            "label": label or f"{folder[0]}/{folder[1]}".rstrip("/"),
            "total": len(images),
            "done": 0,
            "failed": 0,
            "state": "queued",
            "queued": now(),
        }
        (self.workspace.runs / run_id / "pictures").mkdir(parents=True, exist_ok=True)
        write_json(self.workspace.runs / run_id / "run.json", run)
        self._wake.set()
        return run

    def runs(self) -> list[dict[str, Any]]:
        """Every run, newest first."""
        return [r for f in self.workspace.iter_runs() if (r := read_json(f / "run.json"))]

    def run(self, run_id: str) -> dict[str, Any]:
        run = read_json(self.folder(run_id) / "run.json")
        if not run:
            raise UserError(f"unknown run {run_id!r}")
        return run

    def records(self, run_id: str) -> list[dict[str, Any]]:
        """The run's records, parsed once per change of the file (a gallery pages through
        thousands without reading them again)."""
        path = self.folder(run_id) / "results.jsonl"
        size = path.stat().st_size if path.is_file() else 0
        cached = self._cache.get(run_id)
        if cached is None or cached[0] != size:
            cached = (size, read_records(path))
            self._cache[run_id] = cached
        return cached[1]

    def folder(self, run_id: str) -> Path:
        if "/" in run_id or "\\" in run_id or run_id.startswith(".") or not run_id:
            raise UserError(f"unknown run {run_id!r}")
        return self.workspace.runs / run_id

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="cflowad-studio-runs", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            pending = [r for r in reversed(self.runs()) if r.get("state") in ("queued", "running")]
            if not pending:
                self._wake.wait(1.0)
                self._wake.clear()
                continue
            try:
                self._score_run(pending[0])
            except Exception as error:  # the run says why; the thread goes on
                log.exception("scoring run %s", pending[0]["id"])
                message = reason(error)
                self._update(pending[0]["id"], state="failed", error=message, finished=now())

    def _score_run(self, run: dict[str, Any]) -> None:
        folder = self.folder(run["id"])
        images = self.workspace.images(self.workspace.resolve(*run["folder"]))
        done = len(self.records(run["id"]))
        self._update(run["id"], state="running", started=run.get("started") or now())
        for start in range(done, len(images), _BATCH):
            if self._stop.is_set():
                return
            if self.run(run["id"]).get("state") == "cancelled":
                return
            self._score_batch(run, folder, images[start : start + _BATCH], start)
        self._update(run["id"], state="done", finished=now())

    def _score_batch(
        self, run: dict[str, Any], folder: Path, paths: list[Path], start: int
    ) -> None:
        loaded: list[tuple[int, Path, np.ndarray | None, str | None]] = []
        for offset, path in enumerate(paths):
            try:
                image = load_image(self.workspace.confine(path))  # a link swapped in since
                loaded.append((start + offset, path, image, None))
            except UserError as error:
                loaded.append((start + offset, path, None, str(error)))
        good = [(i, p, image) for i, p, image, _ in loaded if image is not None]
        revision, results = self.score(run["model"], [image for _, _, image in good])
        by_index = {i: (image, result) for (i, _, image), result in zip(good, results, strict=True)}
        failed = 0
        for index, path, _, problem in loaded:
            record: dict[str, Any] = {"index": index, "image": str(path), "name": path.name}
            if problem is not None:
                record.update(error=problem)
                failed += 1
            else:
                image, result = by_index[index]
                save_pictures(folder / "pictures" / f"{index:06d}", image, result)
                record.update(
                    **result.record(),
                    area=round(float(result.mask.mean()), 6),
                    revision=revision,
                    width=image.shape[1],
                    height=image.shape[0],
                )
            append_record(folder / "results.jsonl", record)
        current = self.run(run["id"])
        self._update(
            run["id"],
            done=current.get("done", 0) + len(paths),
            failed=current.get("failed", 0) + failed,
            revision=revision,
        )

    def cancel(self, run_id: str) -> dict[str, Any]:
        run = self.run(run_id)
        if run.get("state") not in ("queued", "running"):
            raise UserError(f"run {run_id} is {run.get('state')}, not queued or running")
        return self._update(run_id, state="cancelled", finished=now())

    def _update(self, run_id: str, **fields: Any) -> dict[str, Any]:
        path = self.folder(run_id) / "run.json"
        run = {**read_json(path), **fields}
        write_json(path, run)
        return run


def _jet(anomaly_map: np.ndarray) -> np.ndarray:
    """The readable map in the overlays' colours: blue normal, green the threshold, red."""
    from matplotlib import colormaps

    return (colormaps["jet"](np.clip(anomaly_map, 0, 1))[..., :3] * 255).round().astype(np.uint8)


def save_pictures(stem: Path, image: np.ndarray, result: ImageResult) -> None:
    """card (overlay thumbnail), image, heat and overlay (outline of the pixel threshold)."""
    overlay = blend(image, result.anomaly_map, result.mask)
    plain = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
    pictures: Iterable[tuple[str, np.ndarray, int]] = (
        ("card", overlay, CARD_SIDE),
        ("image", plain, DETAIL_SIDE),
        ("heat", _jet(result.anomaly_map), DETAIL_SIDE),
        ("overlay", overlay, DETAIL_SIDE),
    )
    for kind, array, side in pictures:
        stem.with_name(f"{stem.name}.{kind}.jpg").write_bytes(jpeg(array, side))

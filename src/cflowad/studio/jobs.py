"""Trainings queued by the studio, each ``cflowad train`` in a process of its own.

A job is a folder ``jobs/ID/``: ``job.json`` (what to train, its state), the
progress file that ``cflowad train --progress-file`` keeps current, and the log.
Jobs run one at a time (``parallel``), in the order they were queued. The trainer
writes its model straight into the revision folder (atomically: it appears only when
complete), so a studio killed mid-training finds, when it starts again, either the
trainer still running (it waits for it), its finished revision (it records it), or
neither (it queues the job again).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

from cflowad.common.errors import UserError
from cflowad.data.files import read_json, write_json
from cflowad.data.images import image_sizes
from cflowad.engine.catalog import identity, model_kind
from cflowad.method.config import CONFIG_FIELDS, Config, parse_field
from cflowad.method.region import draw_region
from cflowad.studio.workspace import Workspace, new_id, now

__all__ = ["SETTINGS", "TrainingQueue"]

log = logging.getLogger("cflowad.studio")

# The settings the page offers: the Config fields its metadata marks for the studio
# (written to the job's config file for train --config, which checks them), the region
# (a box x,y,w,h or shapes drawn: the page never names a file) and --tune (a switch).
SETTINGS = (*(f.name for f in fields(Config) if f.metadata["studio"]), "region", "tune")
_ACTIVE = ("queued", "running")


class TrainingQueue:
    """Queued trainings, run in order by one thread, each as a ``cflowad train`` process."""

    def __init__(
        self,
        workspace: Workspace,
        on_revision: Callable[[str, int, bool], None],
        parallel: int = 1,
        poll_seconds: float = 0.5,
    ) -> None:
        self.workspace = workspace
        self.on_revision = on_revision  # (model, revision, promoted) once a training ends
        self.parallel = parallel
        self.poll_seconds = poll_seconds
        self._processes: dict[str, subprocess.Popen[bytes]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def submit(
        self,
        name: str,
        data: tuple[str, str],
        settings: dict[str, Any],
        kind: str = "train",
        parent: int | None = None,
        extra_images: list[str] | None = None,
    ) -> dict[str, Any]:
        """Queue a training of ``data`` (root, relative folder) into a new model or revision."""
        folder = self.workspace.resolve(*data)
        images = self.workspace.training_images(folder)  # none, or a link out: fails here
        unknown = sorted(set(settings) - set(SETTINGS))
        if unknown:
            raise UserError(f"unknown settings {', '.join(unknown)}; known: {', '.join(SETTINGS)}")
        settings = {k: v for k, v in settings.items() if v not in (None, "")}
        _config_file_entries(settings)  # a value that is no number fails here, not in train
        region = settings.get("region") or ""
        if isinstance(region, dict):  # shapes drawn on the sample, the folder's first image
            if not draw_region(region, *image_sizes(images[:1])[0], name="the drawn region").any():
                raise UserError("the drawn region is empty: draw a shape that is not cut out")
        elif not re.fullmatch(r"(\d+,\d+,\d+,\d+)?", str(region).replace(" ", "")):
            raise UserError(
                f"region {region!r}: a box x,y,w,h in pixels of the images, or shapes drawn"
            )
        job_id = new_id(self.workspace.jobs, "train-")
        job = {
            "id": job_id,
            "kind": kind,
            "model": name,
            "data": list(data),
            "settings": settings,
            "parent": parent,
            "extra_images": extra_images or [],
            "state": "queued",
            "queued": now(),
        }
        write_json(self.workspace.jobs / job_id / "job.json", job)
        return job

    def jobs(self) -> list[dict[str, Any]]:
        """Every job with its progress, newest first."""
        found = []
        for folder in sorted(self.workspace.jobs.iterdir(), reverse=True):
            job = read_json(folder / "job.json")
            if not job:
                continue
            if job.get("state") == "running":
                job["progress"] = read_json(folder / "progress.json")
            if job.get("state") == "failed":
                job["log_tail"] = _tail(folder / "log.txt")
            found.append(job)
        return found

    def cancel(self, job_id: str) -> dict[str, Any]:
        """Cancel a queued job, or stop a running one (its trainer is interrupted)."""
        folder = self._folder(job_id)
        with self._lock:
            job = read_json(folder / "job.json")
            if job.get("state") not in _ACTIVE:
                raise UserError(f"training {job_id} is {job.get('state')}, not running or queued")
            if job["state"] == "running":
                _interrupt(int(job.get("pid", 0)))
            job.update(state="cancelled", finished=now())
            write_json(folder / "job.json", job)
        return job

    def start(self) -> None:
        """Resume what a stopped studio left, then run queued jobs in a thread."""
        for folder in sorted(self.workspace.jobs.iterdir()):
            job = read_json(folder / "job.json")
            if job.get("state") == "running" and not _alive(int(job.get("pid", 0)), job["id"]):
                self._finish(folder, job, returncode=None)
        self._thread = threading.Thread(target=self._run, name="cflowad-studio-jobs", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop taking jobs; trainers still running finish on their own (and are adopted
        by the next start)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._step()
            except Exception:  # never a silent dead thread
                log.exception("training queue")
            self._stop.wait(self.poll_seconds)

    def _step(self) -> None:
        jobs = [(f, read_json(f / "job.json")) for f in sorted(self.workspace.jobs.iterdir())]
        running = 0
        for folder, job in jobs:
            if job.get("state") != "running":
                continue
            process = self._processes.get(job["id"])
            if process is not None:
                code = process.poll()
                if code is not None:
                    self._processes.pop(job["id"])
                    self._finish(folder, job, code)
                    continue
            elif not _alive(int(job.get("pid", 0)), job["id"]):  # adopted after a restart
                self._finish(folder, job, returncode=None)
                continue
            running += 1
        queued = [job for _, job in jobs if job.get("state") == "queued"]
        if running < self.parallel and queued:
            self._launch(queued[0])

    def _launch(self, job: dict[str, Any]) -> None:
        folder = self._folder(job["id"])
        name = job["model"]
        try:
            data = self._training_folder(folder, job)
        except UserError as error:
            (folder / "log.txt").write_text(f"cflowad: error: {error}\n")
            job.update(state="failed", finished=now(), error=str(error))
            write_json(folder / "job.json", job)
            return
        number = job.get("revision") or self.workspace.next_revision(name)
        target = self.workspace.revision_path(name, number)
        command = [sys.executable, "-m", "cflowad", "train", str(data), "--out", str(target)]
        command += ["--progress-file", str(folder / "progress.json")]
        settings = job["settings"]
        write_json(folder / "config.json", _config_file_entries(settings))
        command += ["--config", str(folder / "config.json")]
        if str(settings.get("tune", "false")).lower() not in ("false", "0", "no", "off"):
            command.append("--tune")
        region = settings.get("region")
        if isinstance(region, dict):  # drawn: train reads the shapes
            write_json(folder / "region.json", region)
            command += ["--region", str(folder / "region.json")]
        elif region:
            command += ["--region", str(region).replace(" ", "")]
        target.parent.mkdir(parents=True, exist_ok=True)
        with self._lock:
            if read_json(folder / "job.json").get("state") != "queued":
                return  # cancelled meanwhile
            with (folder / "log.txt").open("ab") as output:
                process = subprocess.Popen(
                    command,
                    stdout=output,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,  # a studio that dies does not take it along
                    env={**os.environ, "CFLOWAD_JOB": job["id"]},
                )
            self._processes[job["id"]] = process
            job.update(state="running", started=now(), pid=process.pid, revision=number)
            write_json(folder / "job.json", job)
        log.info("training %s revision %d (job %s)", name, number, job["id"])

    def _training_folder(self, folder: Path, job: dict[str, Any]) -> Path:
        """The images to train on: the chosen folder, plus the images marked good
        (retraining with feedback), gathered in the job's folder."""
        data = self.workspace.resolve(*job["data"])
        if not job.get("extra_images"):
            return data
        images = folder / "images"
        if images.exists():
            shutil.rmtree(images)
        images.mkdir()
        sources = [*self.workspace.training_images(data), *map(Path, job["extra_images"])]
        for index, source in enumerate(sources):
            if source.is_file() and self.workspace.confine(source):
                target = images / f"{index:06d}{source.suffix.lower()}"
                try:
                    os.link(source, target)
                except OSError:
                    shutil.copy2(source, target)
        return images

    def _finish(self, folder: Path, job: dict[str, Any], returncode: int | None) -> None:
        """Record how a training ended: a new revision, a failure (log tail), or a requeue."""
        with self._lock:
            job = read_json(folder / "job.json")
            if job.get("state") == "cancelled":
                return
            name, number = job["model"], int(job.get("revision", 0))
            target = self.workspace.revision_path(name, number)
            content = identity(target) if model_kind(target) == "directory" else None
            if content is not None and returncode in (0, None):
                first = self.workspace.served_revision(name) is None
                data = job["data"]
                self.workspace.record_created(
                    name,
                    number,
                    job["kind"],
                    content,
                    parent=job.get("parent"),
                    data=data,
                    settings=job["settings"],
                    marked_good=len(job.get("extra_images", [])),
                    job=job["id"],
                )
                if first:
                    self.workspace.promote(name, number)
                job.update(state="done", finished=now())
                write_json(folder / "job.json", job)
                self.on_revision(name, number, first)
            elif returncode is None:
                job.update(
                    state="queued", requeued=now(), note="restarted after the studio stopped"
                )
                job.pop("pid", None)
                write_json(folder / "job.json", job)
            else:
                tail = _tail(folder / "log.txt")
                error = next(
                    (line for line in reversed(tail) if "error" in line.lower()),
                    f"cflowad train exited with code {returncode}",
                )
                job.update(state="failed", finished=now(), error=error, returncode=returncode)
                write_json(folder / "job.json", job)

    def _folder(self, job_id: str) -> Path:
        folder = self.workspace.jobs / job_id
        if "/" in job_id or job_id.startswith(".") or not (folder / "job.json").is_file():
            raise UserError(f"unknown training {job_id!r}")
        return folder


def _alive(pid: int, job_id: str) -> bool:
    """Whether ``pid`` is still this job's trainer (not a recycled process id)."""
    if pid <= 0:
        return False
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        try:
            os.kill(pid, 0)
        except OSError:
            return False
        return True  # no /proc (macOS): trust the id
    if f"CFLOWAD_JOB={job_id}".encode() not in environ.split(b"\0"):
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _interrupt(pid: int) -> None:
    """Ctrl-C for a trainer (it removes its partial output), then kill it after 10 s."""
    if pid <= 0:
        return
    try:
        os.killpg(pid, signal.SIGINT)
    except OSError:
        return

    def kill_later() -> None:
        time.sleep(10)
        with contextlib.suppress(OSError):
            os.killpg(pid, signal.SIGKILL)

    threading.Thread(target=kill_later, daemon=True).start()


def _tail(path: Path, lines: int = 12) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return []


def _config_file_entries(settings: dict[str, Any]) -> dict[str, Any]:
    """The Config fields among a job's settings, parsed from the page's text as the
    command line parses its options (train --config checks them all)."""
    return {k: parse_field(k, v) for k, v in settings.items() if k in CONFIG_FIELDS}

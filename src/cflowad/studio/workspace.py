"""The studio's workspace: ordinary files that the page, the CLI and a restart all read.

::

    WORKSPACE/
      studio.json                  marks the folder as a workspace
      models/NAME/ | NAME.onnx     the served revision of each model: what cflowad
                                   predict/serve/watch/stream read, and where a model
                                   from cflowad train or export is copied to appear
      revisions/NAME/rNNNN/        every revision of NAME, a complete model
      revisions/NAME/history.jsonl what happened to NAME: created and promoted events
      jobs/ runs/ live/            trainings, scored folders, attached sources
      feedback.jsonl               the marks: which image, good or defective, when

Every file is replaced atomically or appended with fsync before the page is told it
is saved, so ``kill -9`` at any moment leaves a workspace that resumes as it was.
Revisions are never changed once written; models/NAME is replaced as a whole by a
copy of the promoted revision (hard links: no second copy of the weights).
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cflowad.common.errors import UserError
from cflowad.data.datasets import find_training_images
from cflowad.data.files import append_record, read_json, read_records, replace_file, write_json
from cflowad.data.images import list_images
from cflowad.engine.catalog import NAME_PATTERN, identity, model_kind, scan_models

__all__ = [
    "MARKS",
    "Revision",
    "Workspace",
    "now",
]

FORMAT = "cflowad-studio"
MARKS = ("good", "defective")
_REVISION = re.compile(r"r(\d{4,})(\.onnx)?")


def now() -> str:
    """A UTC time stamp, as every workspace record carries it."""
    return datetime.now(UTC).isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class Revision:
    """One revision of a model: its number, files, and the event that created it."""

    number: int
    path: Path
    created: dict[str, Any]

    @property
    def trained(self) -> int:
        """The revision whose training produced the weights (a threshold change keeps them)."""
        return int(self.created.get("trained_revision", self.number))


class Workspace:
    """The files of one studio: models, their revisions, marks, and where paths may point."""

    def __init__(self, root: Path, allow: list[Path] | None = None) -> None:
        self.root = root.resolve()
        self.models = self.root / "models"
        self.revisions = self.root / "revisions"
        self.jobs = self.root / "jobs"
        self.runs = self.root / "runs"
        self.live = self.root / "live"
        self.uploads = self.root / "uploads"
        self.feedback_file = self.root / "feedback.jsonl"
        self._lock = threading.RLock()  # revisions and promotions, one at a time
        self.roots = {"workspace": self.root}
        for folder in allow or []:
            if not folder.is_dir():
                raise UserError(f"option --allow {folder}: folder not found")
            name = folder.resolve().name or "root"
            while name in self.roots:
                name += "_"
            self.roots[name] = folder.resolve()

    def open(self) -> Workspace:
        """Start a new workspace in an empty or missing folder, or resume an existing one."""
        marker = self.root / "studio.json"
        if self.root.exists() and not self.root.is_dir():
            raise UserError(f"WORKSPACE {self.root}: is a file, not a folder")
        if (
            self.root.is_dir()
            and not marker.is_file()
            and any(p.name != "models" for p in self.root.iterdir())
        ):
            raise UserError(
                f"WORKSPACE {self.root}: a folder with other files in it; give an empty or "
                "new folder (a studio workspace), or one with only models/ in it"
            )
        for folder in (self.models, self.revisions, self.jobs, self.runs, self.live):
            folder.mkdir(parents=True, exist_ok=True)
        if not marker.is_file():
            write_json(marker, {"format": FORMAT, "format_version": 1, "created": now()})
        elif read_json(marker).get("format") != FORMAT:
            raise UserError(f"{marker}: not a cflowad studio workspace file")
        secret = self.root / ".secret"
        if not secret.is_file():
            replace_file(secret, secrets.token_hex(32))
            secret.chmod(0o600)
        return self

    @property
    def secret(self) -> str:
        """A random key of this workspace (CSRF tokens), kept so that tabs survive a restart."""
        return (self.root / ".secret").read_text().strip()

    # -- paths the client names -------------------------------------------------------

    def resolve(self, root: str, relative: str) -> Path:
        """The folder or file ``relative`` inside the allowed folder ``root``, or a UserError.

        The client never gives an absolute path; ``..`` and a symbolic link that leads
        outside the allowed folder are refused.
        """
        base = self.roots.get(root)
        if base is None:
            raise UserError(f"unknown folder {root!r}; choose from {', '.join(self.roots)}")
        parts = Path(relative.replace("\\", "/")).parts if relative else ()
        if relative.startswith(("/", "\\")) or any(p in ("..", "") for p in parts):
            raise UserError(f"path {relative!r}: give a path inside {root!r}, without '..'")
        target = (base / Path(*parts)).resolve() if parts else base
        if target != base and base not in target.parents:
            raise UserError(f"path {relative!r}: leads outside {root!r} (a symbolic link?)")
        return target

    def images(self, folder: Path) -> list[Path]:
        """The images directly in ``folder`` (one :meth:`resolve` gave), or a UserError.

        A folder is checked once, but each file in it may be a symbolic link: one that
        leads outside every allowed folder refuses the whole folder, so that nothing
        outside is read, scored or shown (its picture would be served).
        """
        images = list_images(folder)
        for image in images:
            self.confine(image)
        return images

    def training_images(self, folder: Path) -> list[Path]:
        """What ``cflowad train`` reads from ``folder`` (its ``train/good`` in the MVTec
        layout), each checked as by :meth:`images`."""
        images = find_training_images(folder)
        for image in images:
            self.confine(image)
        return images

    def confine(self, path: Path) -> Path:
        """``path`` itself if it lies inside an allowed folder once its links are followed."""
        if self.name_of(path) is None:
            raise UserError(
                f"{path}: a symbolic link that leads outside the allowed folders; remove it, "
                "or start the studio with --allow for the folder it leads to"
            )
        return path

    def name_of(self, path: Path) -> tuple[str, str] | None:
        """(root, relative) for a path inside an allowed folder, as the client names it."""
        resolved = path.resolve()
        for name, base in self.roots.items():
            if resolved == base or base in resolved.parents:
                return name, resolved.relative_to(base).as_posix()
        return None

    # -- models and revisions ---------------------------------------------------------

    def model_names(self) -> list[str]:
        """The models in models/ (a directory from train or an ONNX file from export)."""
        return list(scan_models(self.models))

    def served_path(self, name: str) -> Path:
        """models/NAME or models/NAME.onnx: what is served, or a UserError."""
        found = scan_models(self.models).get(name)
        if found is None:
            raise UserError(f"unknown model {name!r}")
        return found

    def history(self, name: str) -> list[dict[str, Any]]:
        """The model's events, oldest first."""
        return read_records(self._folder(name) / "history.jsonl")

    def revision_list(self, name: str) -> list[Revision]:
        """Every revision of ``name`` that exists on disk, oldest first."""
        created = {int(e["revision"]): e for e in self.history(name) if e.get("event") == "created"}
        found = []
        folder = self._folder(name)
        if folder.is_dir():
            for child in folder.iterdir():
                match = _REVISION.fullmatch(child.name)
                if match and int(match[1]) in created:
                    found.append(Revision(int(match[1]), child, created[int(match[1])]))
        return sorted(found, key=lambda r: r.number)

    def revision(self, name: str, number: int) -> Revision:
        """One revision, or a UserError naming what exists."""
        for revision in self.revision_list(name):
            if revision.number == number:
                return revision
        raise UserError(f"model {name!r} has no revision {number}")

    def served_revision(self, name: str) -> Revision | None:
        """The revision promoted last (what models/NAME holds), None before any import."""
        promoted = self.promoted(name)
        return self.revision(name, promoted[-1]) if promoted else None

    def promoted(self, name: str) -> list[int]:
        """The revisions that were served, in the order they were promoted."""
        return [int(e["revision"]) for e in self.history(name) if e.get("event") == "promoted"]

    def next_revision(self, name: str) -> int:
        """The number the next revision of ``name`` gets (also past a failed training's)."""
        used = [int(e["revision"]) for e in self.history(name) if "revision" in e]
        folder = self._folder(name)
        if folder.is_dir():
            used += [int(m[1]) for c in folder.iterdir() if (m := _REVISION.fullmatch(c.name))]
        return max(used, default=0) + 1

    def revision_path(self, name: str, number: int, onnx: bool = False) -> Path:
        """Where revision ``number`` of ``name`` lives."""
        return self._folder(name) / (f"r{number:04d}" + (".onnx" if onnx else ""))

    def sync_models(self) -> list[str]:
        """Give every model in models/ a revision history; a model changed outside the
        studio (copied over by hand, trained again by the CLI) becomes a new revision.

        Returns the names whose served revision changed.
        """
        changed = []
        with self._lock:
            for name, path in scan_models(self.models).items():
                content = identity(path)
                # OpenVINO folders are served without revisions: a revision is a model
                # directory or an ONNX file
                if content is None or model_kind(path) == "openvino":
                    continue
                served = self.served_revision(name)
                if served is not None and served.created.get("fingerprint") == content:
                    continue
                number = self.next_revision(name)
                target = self.revision_path(name, number, onnx=path.is_file())
                _copy_model(path, target)
                note = "copied into models/" if served is None else "changed outside the studio"
                self.record_created(name, number, "imported", content, note=note)
                self.record_promoted(name, number)
                changed.append(name)
        return changed

    def record_created(
        self, name: str, number: int, kind: str, content: str, **fields: Any
    ) -> dict[str, Any]:
        """Append the event that revision ``number`` exists (after its files are written)."""
        event = {
            "event": "created",
            "revision": number,
            "kind": kind,
            "fingerprint": content,
            "time": now(),
            **fields,
        }
        append_record(self._folder(name) / "history.jsonl", event)
        return event

    def record_promoted(self, name: str, number: int) -> None:
        append_record(
            self._folder(name) / "history.jsonl",
            {"event": "promoted", "revision": number, "time": now()},
        )

    def promote(self, name: str, number: int) -> None:
        """Make revision ``number`` the served one: models/NAME is replaced as a whole.

        A server following the file (``cflowad serve``, the studio) reloads it; until
        the new one is warm the old one answers.
        """
        with self._lock:
            revision = self.revision(name, number)
            target = self.models / name
            staging = self.models / f".{name}.promote-{os.getpid()}"
            if staging.exists():
                _remove(staging)
            _copy_model(revision.path, staging)
            if revision.path.is_file():
                os.replace(staging, target)
            elif target.is_dir():
                old = self.models / f".{name}.old-{os.getpid()}"
                target.rename(old)
                staging.rename(target)
                shutil.rmtree(old)
            else:
                staging.rename(target)
            self.record_promoted(name, number)

    def new_model_name(self, name: str) -> str:
        """``name`` checked as the name of a new model (it becomes a folder and a URL)."""
        if not NAME_PATTERN.fullmatch(name) or name.endswith(".onnx"):
            raise UserError(
                f"model name {name!r}: use letters, digits, '.', '_' and '-' (at most 128)"
            )
        return name

    def _folder(self, name: str) -> Path:
        if not NAME_PATTERN.fullmatch(name):
            raise UserError(f"unknown model {name!r}")
        return self.revisions / name

    # -- feedback ---------------------------------------------------------------------

    def add_mark(self, record: dict[str, Any]) -> dict[str, Any]:
        """Append a mark (synced before returning): image, mark, model, revision, score."""
        if record.get("mark") not in (*MARKS, "none"):
            raise UserError(f"mark {record.get('mark')!r}: choose good, defective or none")
        entry = {**record, "time": now()}
        append_record(self.feedback_file, entry)
        return entry

    def marks(self, model: str | None = None) -> dict[str, dict[str, Any]]:
        """Image path -> its latest mark (for one model, or any); cleared marks left out."""
        latest: dict[str, dict[str, Any]] = {}
        for record in read_records(self.feedback_file):
            if model is None or record.get("model") == model:
                latest[str(record.get("image"))] = record
        return {k: v for k, v in latest.items() if v.get("mark") in MARKS}

    def iter_runs(self) -> Iterator[Path]:
        """Run folders, newest first."""
        return iter(sorted((p for p in self.runs.iterdir() if p.is_dir()), reverse=True))


def new_id(folder: Path, prefix: str) -> str:
    """A sortable id for a new job or run (time, then a counter against collisions)."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    for count in range(1000):
        candidate = f"{prefix}{stamp}-{count:03d}"
        try:
            (folder / candidate).mkdir(parents=True)
        except FileExistsError:
            continue
        return candidate
    raise UserError(f"{folder}: cannot make a new folder name")


def _copy_model(source: Path, target: Path) -> None:
    """Copy a model (directory or file) through a staging name; hard links where possible.

    Model files are never changed in place (always replaced), so sharing them is safe.
    """
    staging = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    if staging.exists():
        _remove(staging)
    if source.is_dir():
        staging.mkdir(parents=True)
        for file in source.iterdir():
            if file.is_file():
                _link_or_copy(file, staging / file.name)
    else:
        staging.parent.mkdir(parents=True, exist_ok=True)
        _link_or_copy(source, staging)
    os.replace(staging, target) if staging.is_file() else staging.rename(target)


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _remove(path: Path) -> None:
    shutil.rmtree(path) if path.is_dir() else path.unlink()

"""Sources attached to the studio: a hot folder (``watch``) or a video, camera or rtsp
stream (``stream``), scored by the same engines as the commands, in the background.

What is attached is listed in ``live/sources.json``, so a studio started again
attaches them again; each source writes its usual output (``live/ID/``). The page
sees the newest frame with its overlay and a bounded history of scores (memory stays
flat however long a source runs), pushed as server-sent events.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np

from cflowad.common.errors import UserError, reason
from cflowad.data.files import read_json, write_json
from cflowad.engine.inference import ImageResult, Predictor
from cflowad.line.publish import Publisher
from cflowad.line.stream import stream_video
from cflowad.line.watch import watch_folder
from cflowad.results.pictures import blend, jpeg
from cflowad.studio.workspace import Workspace, new_id, now

__all__ = ["HISTORY", "LiveSources"]

log = logging.getLogger("cflowad.studio")
HISTORY = 600  # scores kept per source for the timeline
STREAM_SCHEMES = ("rtsp", "rtsps", "rtmp", "http", "https", "udp", "tcp", "srt")
FRAME_SIDE = 640


class _Source:
    """One attached source: its thread, the newest picture, the recent scores."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.stop = threading.Event()
        self.history: deque[dict[str, Any]] = deque(maxlen=HISTORY)
        self.events: deque[dict[str, Any]] = deque(maxlen=50)
        self.frame: bytes | None = None
        self.count = 0
        self.state = "starting"  # then running (waiting for images or frames), then ended
        self.error: str | None = None
        self.changed = threading.Condition()
        self.thread: threading.Thread | None = None

    def on_result(self, image: np.ndarray, result: ImageResult, record: dict[str, Any]) -> None:
        frame = jpeg(blend(image, result.anomaly_map, result.mask), FRAME_SIDE, quality=80)
        entry = {
            "n": self.count,
            **result.record(),
            "time": now(),
            "name": Path(str(record.get("image", ""))).name or f"frame {record.get('frame')}",
        }
        with self.changed:
            self.frame = frame
            self.count += 1
            self.history.append(entry)
            if result.anomalous:
                self.events.append(entry)
            self.state = "running"
            self.changed.notify_all()

    def describe(self) -> dict[str, Any]:
        return {
            **self.spec,
            "state": self.state,
            "error": self.error,
            "scored": self.count,
            "history": list(self.history),
            "events": list(self.events),
        }


class LiveSources:
    """The attached sources of a workspace, each scored by its model's served revision."""

    def __init__(
        self, workspace: Workspace, model_for: Any, publisher: Publisher | None = None
    ) -> None:
        self.workspace = workspace
        self.model_for = model_for  # name -> Predictor that scores with the served revision
        self.publisher = publisher  # the studio's --publish destinations
        self.sources: dict[str, _Source] = {}
        self._lock = threading.Lock()

    @property
    def _list_file(self) -> Path:
        return self.workspace.live / "sources.json"

    def attach(self, kind: str, model: str, target: str, every: int = 1) -> dict[str, Any]:
        """Attach a hot folder (``target``: 'root/relative') or a video source."""
        if kind not in ("folder", "stream"):
            raise UserError(f"source kind {kind!r}: choose folder or stream")
        if kind == "folder" and not self._path(target).is_dir():
            raise UserError(f"{target}: not a folder")
        if kind == "stream":
            self._stream_source(target)  # refused here, not in the source's thread
        self.model_for(model)  # an unknown model fails here
        source_id = new_id(self.workspace.live, "src-")
        spec = {
            "id": source_id,
            "kind": kind,
            "model": model,
            "target": target,
            "every": max(1, int(every)),
            "attached": now(),
        }
        with self._lock:
            listed = read_json(self._list_file).get("sources", [])
            write_json(self._list_file, {"sources": [*listed, spec]})
        self._start(spec)
        return spec

    def detach(self, source_id: str) -> None:
        with self._lock:
            source = self.sources.pop(source_id, None)
            listed = read_json(self._list_file).get("sources", [])
            if source is None and all(s["id"] != source_id for s in listed):
                raise UserError(f"unknown source {source_id!r}")
            write_json(self._list_file, {"sources": [s for s in listed if s["id"] != source_id]})
        if source is not None:
            source.stop.set()

    def resume(self) -> None:
        """Attach again what was attached when the studio stopped."""
        for spec in read_json(self._list_file).get("sources", []):
            self._start(spec)

    def stop_all(self) -> None:
        for source in self.sources.values():
            source.stop.set()
        for source in self.sources.values():
            if source.thread is not None:
                source.thread.join(5)

    def get(self, source_id: str) -> _Source:
        source = self.sources.get(source_id)
        if source is None:
            raise UserError(f"unknown source {source_id!r}")
        return source

    def _path(self, target: str) -> Path:
        """A file or folder the client names 'root/relative', inside the allowed folders."""
        root, _, relative = target.partition("/")
        return self.workspace.resolve(root, relative)

    def _stream_source(self, target: str) -> str:
        """What ``stream`` opens: a URL of a stream scheme, a camera index, or a video file
        inside the allowed folders (never a path or a file:// URL from the client)."""
        if "://" in target:
            if target.split("://")[0].lower() not in STREAM_SCHEMES:
                raise UserError(
                    f"{target}: a stream URL starts with {', '.join(STREAM_SCHEMES)}:// "
                    "(files are named inside the workspace or an --allow folder)"
                )
            return target
        if target.isdigit():
            return target
        path = self._path(target)
        if not path.is_file():
            raise UserError(f"{target}: no such video file")
        return str(path)

    def _start(self, spec: dict[str, Any]) -> None:
        source = _Source(spec)
        self.sources[spec["id"]] = source
        source.thread = threading.Thread(
            target=self._run, args=(source,), name=f"cflowad-live-{spec['id']}", daemon=True
        )
        source.thread.start()

    def _run(self, source: _Source) -> None:
        spec = source.spec
        out = self.workspace.live / spec["id"]
        source.state = "running"
        try:
            model: Predictor = self.model_for(spec["model"])
            if spec["kind"] == "folder":
                watch_folder(
                    model,
                    self._path(spec["target"]),
                    out,
                    batch_size=1,
                    stop=source.stop,
                    on_result=source.on_result,
                    publisher=self.publisher,
                    model_name=spec["model"],
                    confine=self.workspace.confine,
                )
            else:
                stream_video(
                    model,
                    self._stream_source(spec["target"]),
                    out,
                    every=spec["every"],
                    live=True,
                    stop=source.stop,
                    on_result=source.on_result,
                    publisher=self.publisher,
                    model_name=spec["model"],
                )
            source.state = "stopped" if source.stop.is_set() else "ended"
        except Exception as error:  # shown on the page, not a dead thread
            source.error = reason(error)
            source.state = "failed"
            log.error("source %s: %s", spec["id"], source.error)
        with source.changed:
            source.changed.notify_all()

    def wait(self, source_id: str, seen: int, timeout: float) -> dict[str, Any] | None:
        """The next update of a source after ``seen`` results (None on timeout)."""
        source = self.get(source_id)
        deadline = time.monotonic() + timeout
        with source.changed:
            while source.count == seen and source.state in ("starting", "running"):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                source.changed.wait(remaining)
        return source.describe()

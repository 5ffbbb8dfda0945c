"""``cflowad studio``: the inspection loop on one local page, served with the /v1 API.

One FastAPI process: the page (``/studio``, plain HTML and a little JS shipped in the
wheel), its JSON API (``/studio/api``), and the serving API of ``cflowad serve``
(``/v1``, probes, metrics) for the workspace's models, on one engine
(:class:`cflowad.line.server.ServedModels`). Everything the page changes is a file
in the workspace (:mod:`cflowad.studio.workspace`).

Security: the page's state-changing requests carry a CSRF token (``X-CSRF-Token``,
derived from the workspace's secret); with an API key, the page needs a login (an
HttpOnly cookie) and the API takes ``Authorization: Bearer <key>``; files are read
only inside the workspace and the ``--allow`` folders.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import math
import re
from collections.abc import AsyncIterator
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from cflowad.common.errors import UserError
from cflowad.common.version import __version__
from cflowad.data.images import IMAGE_SUFFIXES, decode_image, load_image
from cflowad.engine.inference import ImageResult, Predictor
from cflowad.engine.loading import load
from cflowad.engine.model import CFlowAD
from cflowad.line.catalog import model_format
from cflowad.line.server import (
    ASGIApp,
    BodyLimit,
    Receive,
    Scope,
    Send,
    ServedModels,
    add_serving_routes,
    send_json,
    too_large_message,
)
from cflowad.line.settings import ServeSettings
from cflowad.results.pictures import jpeg
from cflowad.studio.jobs import SETTINGS, TrainingQueue
from cflowad.studio.live import LiveSources
from cflowad.studio.runs import PICTURES, ScoringRuns
from cflowad.studio.workspace import Workspace, fingerprint, new_id, read_json, write_json

try:
    from fastapi import FastAPI, Request
    from fastapi.responses import (
        FileResponse,
        HTMLResponse,
        JSONResponse,
        RedirectResponse,
        Response,
        StreamingResponse,
    )
    from pydantic import BaseModel, Field
    from starlette.concurrency import run_in_threadpool
except ImportError as missing:  # pragma: no cover - depends on the installed extras
    raise UserError(
        f"cflowad studio needs the studio extra ({missing.name} is missing): "
        "pip install 'cflowad[studio]'"
    ) from None

__all__ = ["COOKIE", "StudioSettings", "create_studio"]

log = logging.getLogger("cflowad.studio")
COOKIE = "cflowad_studio"
_STATIC = {"studio.js": "text/javascript", "studio.css": "text/css"}
_SAFE = ("GET", "HEAD", "OPTIONS")


class StudioSettings(BaseModel):
    """How the studio serves (the serving part is ``cflowad serve``'s)."""

    serve: ServeSettings = Field(default_factory=ServeSettings)
    parallel_trainings: int = 1
    model_config = {"arbitrary_types_allowed": True}


class _Training(BaseModel):
    name: str
    root: str
    path: str = ""
    settings: dict[str, Any] = Field(default_factory=dict)


class _Scoring(BaseModel):
    model: str
    root: str
    path: str = ""


class _Mark(BaseModel):
    run: str
    index: int
    mark: str


class _Threshold(BaseModel):
    raw: float


class _Revision(BaseModel):
    revision: int


class _Attach(BaseModel):
    kind: str
    model: str
    target: str
    every: int = 1


def create_studio(workspace: Workspace, settings: StudioSettings | None = None) -> FastAPI:
    """The studio app on an opened workspace."""
    settings = settings or StudioSettings()
    host = ServedModels({}, settings.serve, origin="studio")
    csrf = hmac.new(workspace.secret.encode(), b"csrf", hashlib.sha256).hexdigest()
    api_key = settings.serve.api_key
    session = (
        hmac.new(api_key.encode(), b"studio-session", hashlib.sha256).hexdigest()
        if api_key
        else None
    )

    loop: list[asyncio.AbstractEventLoop] = []  # the server's, once it runs

    def on_revision(name: str, number: int, promoted: bool) -> None:
        """A training ended (in the jobs thread): serve a new model now, not at the next poll."""
        log.info("model %s: revision %d%s", name, number, " (served)" if promoted else "")
        if promoted and loop:
            asyncio.run_coroutine_threadsafe(host.sync(workspace.models), loop[0])

    queue = TrainingQueue(workspace, on_revision, parallel=settings.parallel_trainings)

    async def compute(function: Any) -> Any:
        """Run on the server's compute pool (the cores are shared, not fought over)."""
        return await asyncio.wrap_future(host.compute(function))

    def score(name: str, images: list[np.ndarray]) -> tuple[int, list[ImageResult]]:
        revision = workspace.served_revision(name)
        results = list(_Current(host, name).predict_iter(images, batch_size=8))
        return (revision.number if revision else 0), results

    runs = ScoringRuns(workspace, score)
    live = LiveSources(workspace, lambda name: _Current(host, name), host.publisher)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loop.append(asyncio.get_running_loop())
        await run_in_threadpool(workspace.sync_models)
        await host.sync(workspace.models)
        following = asyncio.create_task(
            host.follow(
                workspace.models, settings.serve.follow_seconds or 2.0, workspace.sync_models
            )
        )
        queue.start()
        runs.start()
        live.resume()
        try:
            yield
        finally:
            following.cancel()
            live.stop_all()
            runs.stop()
            queue.stop()
            await host.close()

    app = FastAPI(
        title="cflowad studio",
        version=__version__,
        summary="Train, review, set the threshold and correct cflowad models in a browser.",
        lifespan=lifespan,
    )
    add_serving_routes(app, host)
    app.state.workspace = workspace

    @app.exception_handler(UserError)
    async def _user_error(request: Request, error: UserError) -> JSONResponse:
        return JSONResponse({"error": str(error)}, 400)

    # -- the page ---------------------------------------------------------------------

    @app.get("/", include_in_schema=False)
    async def root() -> RedirectResponse:
        return RedirectResponse("/studio", 303)

    @app.get("/studio", include_in_schema=False)
    async def page() -> HTMLResponse:
        html = _asset("index.html").replace("{{csrf}}", csrf).replace("{{version}}", __version__)
        return HTMLResponse(html, headers={"cache-control": "no-store"})

    @app.get("/studio/static/{name}", include_in_schema=False)
    async def static(name: str) -> Response:
        if name not in _STATIC:
            return JSONResponse({"error": "not found"}, 404)
        return Response(_asset(name), media_type=_STATIC[name])

    @app.get("/studio/login", include_in_schema=False)
    async def login_page() -> HTMLResponse:
        return HTMLResponse(_asset("login.html"))

    @app.post("/studio/login", include_in_schema=False)
    async def login(request: Request) -> Response:
        form = await request.form()
        given = str(form.get("key", ""))
        if api_key is None or not hmac.compare_digest(given.encode(), api_key.encode()):
            return HTMLResponse(_asset("login.html").replace("<!--error-->", "Wrong key."), 401)
        response = RedirectResponse("/studio", 303)
        response.set_cookie(COOKIE, session or "", httponly=True, samesite="strict")
        return response

    # -- state and folders ------------------------------------------------------------

    @app.get("/studio/api/state")
    async def state() -> dict[str, Any]:
        return await run_in_threadpool(_state)

    def _state() -> dict[str, Any]:
        return {
            "csrf": csrf,
            "roots": list(workspace.roots),
            "models": [_model_summary(name) for name in workspace.model_names()],
            "jobs": queue.jobs()[:50],
            "runs": runs.runs()[:200],
            "sources": [
                {k: v for k, v in s.describe().items() if k not in ("history", "events")}
                for s in live.sources.values()
            ],
            "settings": list(SETTINGS),
        }

    def _model_summary(name: str) -> dict[str, Any]:
        served = host.served.get(name)
        revision = workspace.served_revision(name)
        revisions = workspace.revision_list(name)
        promoted = set(workspace.promoted(name))
        return {
            "name": name,
            "info": served.info if served else None,
            "error": host.broken.get(name),
            "revision": revision.number if revision else None,
            "revisions": [
                {
                    "revision": r.number,
                    "promoted_before": r.number in promoted,
                    **{k: r.created.get(k) for k in ("kind", "time", "parent", "note", "job")},
                    "threshold_raw": read_json(r.path / "model.json")
                    .get("calibration", {})
                    .get("image_threshold_raw")
                    if r.path.is_dir()
                    else None,
                }
                for r in revisions
            ],
            "format": model_format(workspace.models / name),
        }

    @app.get("/studio/api/browse")
    async def browse(root: str = "workspace", path: str = "") -> dict[str, Any]:
        folder = workspace.resolve(root, path)
        if not folder.is_dir():
            raise UserError(f"{root}/{path}: not a folder")
        # a file that is a link out is neither listed nor counted (scoring refuses it)
        entries = [
            p
            for p in sorted(folder.iterdir(), key=lambda p: p.name.lower())
            if workspace.name_of(p) is not None
        ]
        return {
            "root": root,
            "path": path,
            "folders": [p.name for p in entries if p.is_dir() and not p.name.startswith(".")][:500],
            "images": sum(1 for p in entries if p.suffix.lower() in IMAGE_SUFFIXES),
            "files": [p.name for p in entries if p.is_file() and not p.name.startswith(".")][:200],
        }

    @app.get("/studio/api/sample")
    async def sample(root: str = "workspace", path: str = "") -> Response:
        """The first training image of a folder as JPEG, to draw a region on; its own
        size in X-Image-Width and X-Image-Height (the region is in its pixels)."""
        folder = workspace.resolve(root, path)
        first = workspace.training_images(folder)[0]
        image = await run_in_threadpool(load_image, first)
        height, width = image.shape[:2]
        return Response(
            jpeg(image, 1024),
            media_type="image/jpeg",
            headers={"x-image-width": str(width), "x-image-height": str(height)},
        )

    # -- training ---------------------------------------------------------------------

    @app.post("/studio/api/trainings")
    async def start_training(body: _Training) -> dict[str, Any]:
        name = workspace.new_model_name(body.name)
        parent = workspace.served_revision(name)
        kind = "train" if parent is None else "retrain"
        return await run_in_threadpool(
            queue.submit,
            name,
            (body.root, body.path),
            body.settings,
            kind,
            parent.number if parent else None,
        )

    @app.post("/studio/api/trainings/{job_id}/cancel")
    async def cancel_training(job_id: str) -> dict[str, Any]:
        return await run_in_threadpool(queue.cancel, job_id)

    @app.post("/studio/api/models/{name}/retrain")
    async def retrain(name: str) -> dict[str, Any]:
        """A new revision trained on the served one's images plus the images marked good."""
        served = workspace.served_revision(name)
        if served is None:
            raise UserError(f"unknown model {name!r}")
        trained = workspace.revision(name, served.trained)
        data = trained.created.get("data")
        if not data:
            raise UserError(
                f"model {name!r} came from outside the studio, so its training images are "
                "unknown: start a training with its folder and the same name"
            )
        good = sorted(k for k, m in workspace.marks(name).items() if m["mark"] == "good")
        if not good:
            raise UserError("no images are marked good for this model: mark false alarms first")
        settings = dict(trained.created.get("settings") or {})
        calibration = _calibration(served.path)
        if calibration.get("image_threshold_source") and calibration.get("image_fpr_achievable"):
            # a threshold set by hand carries over as its held-out rate: raw scores of
            # two trainings are not on one scale, their false-positive rates are
            settings["image_fpr"] = calibration["image_fpr_achievable"]
        return await run_in_threadpool(
            queue.submit, name, tuple(data), settings, "feedback", served.number, good
        )

    # -- review -----------------------------------------------------------------------

    @app.post("/studio/api/runs")
    async def score_folder(body: _Scoring) -> dict[str, Any]:
        host.get_or_error(body.model)
        return await run_in_threadpool(runs.submit, body.model, (body.root, body.path))

    @app.post("/studio/api/uploads")
    async def upload(request: Request, model: str, batch: str = "") -> dict[str, Any]:
        """One dropped image per request (the size limit of serve holds per image); the
        images of one drop go to uploads/BATCH and are scored as one run."""
        host.get_or_error(model)
        if not re.fullmatch(r"[A-Za-z0-9-]{1,64}", batch or "x"):
            raise UserError("batch: letters, digits and '-'")
        form = await request.form(max_files=1, max_fields=4)
        file = form.get("image")
        if file is None or isinstance(file, str):
            raise UserError("multipart body without a file field named 'image'")
        data = await file.read()
        name = Path(file.filename or "image.png").name
        if Path(name).suffix.lower() not in IMAGE_SUFFIXES:
            raise UserError(f"{name}: not an image file ({', '.join(IMAGE_SUFFIXES)})")
        await run_in_threadpool(decode_image, data, name)  # refuse what does not decode
        batch = batch or new_id(workspace.uploads, "drop-")
        folder = workspace.uploads / batch
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
        return {"batch": batch, "saved": name}

    @app.post("/studio/api/uploads/{batch}/score")
    async def score_upload(batch: str, model: str) -> dict[str, Any]:
        return await run_in_threadpool(
            runs.submit, model, ("workspace", f"uploads/{batch}"), f"dropped ({batch})"
        )

    @app.post("/studio/api/runs/{run_id}/cancel")
    async def cancel_run(run_id: str) -> dict[str, Any]:
        return await run_in_threadpool(runs.cancel, run_id)

    @app.get("/studio/api/runs/{run_id}/items")
    async def items(
        run_id: str,
        offset: int = 0,
        limit: int = 60,
        decision: str = "all",
        marked: str = "any",
        low: float | None = None,
        high: float | None = None,
    ) -> dict[str, Any]:
        return await run_in_threadpool(
            _items, run_id, offset, min(max(limit, 1), 500), decision, marked, low, high
        )

    def _items(
        run_id: str,
        offset: int,
        limit: int,
        decision: str,
        marked: str,
        low: float | None,
        high: float | None,
    ) -> dict[str, Any]:
        run = runs.run(run_id)
        marks = workspace.marks(run["model"])
        chosen = []
        for record in runs.records(run_id):
            mark = marks.get(record["image"], {}).get("mark")
            score = record.get("score")
            if decision == "anomalous" and not record.get("anomalous"):
                continue
            if decision == "normal" and (record.get("anomalous") or score is None):
                continue
            if (marked == "marked" and mark is None) or (marked == "unmarked" and mark is not None):
                continue
            if low is not None and (score is None or score < low):
                continue
            if high is not None and (score is None or score > high):
                continue
            chosen.append({**record, "mark": mark})
        chosen.sort(key=_by_score)
        return {
            "run": run,
            "total": len(chosen),
            "offset": offset,
            "items": chosen[offset:][:limit],
        }

    @app.get("/studio/api/runs/{run_id}/pictures/{index}/{kind}")
    async def picture(run_id: str, index: int, kind: str) -> Response:
        if kind not in PICTURES or index < 0:
            return JSONResponse({"error": f"picture kinds: {', '.join(PICTURES)}"}, 404)
        path = runs.folder(run_id) / "pictures" / f"{index:06d}.{kind}.jpg"
        if not path.is_file():
            return JSONResponse({"error": "no such picture"}, 404)
        return FileResponse(
            path, media_type="image/jpeg", headers={"cache-control": "max-age=3600"}
        )

    @app.post("/studio/api/marks")
    async def mark(body: _Mark) -> dict[str, Any]:
        """A mark is on disk (synced) before this answers."""
        run = runs.run(body.run)
        record = next((r for r in runs.records(body.run) if r["index"] == body.index), None)
        if record is None or "score" not in record:
            raise UserError(f"run {body.run} has no scored image {body.index}")
        return await run_in_threadpool(
            workspace.add_mark,
            {
                "image": record["image"],
                "mark": body.mark,
                "model": run["model"],
                "revision": record.get("revision"),
                "score": record["score"],
                "raw_score": record["raw_score"],
                "run": body.run,
                "index": body.index,
            },
        )

    # -- threshold --------------------------------------------------------------------

    @app.get("/studio/api/models/{name}/threshold")
    async def threshold(name: str) -> dict[str, Any]:
        return await run_in_threadpool(_threshold, name)

    def _threshold(name: str) -> dict[str, Any]:
        served = workspace.served_revision(name)
        if served is None:
            raise UserError(f"unknown model {name!r}")
        calibration = _calibration(served.path)
        marks = workspace.marks(name)
        reviewed: dict[str, dict[str, Any]] = {}
        lineage = {r.number for r in workspace.revision_list(name) if r.trained == served.trained}
        for run in runs.runs():
            if run.get("model") != name:
                continue
            for record in runs.records(run["id"]):
                if record.get("revision") in lineage and "raw_score" in record:
                    reviewed[record["image"]] = {
                        "raw": record["raw_score"],
                        "mark": marks.get(record["image"], {}).get("mark"),
                        "name": record["name"],
                    }
        return {
            "model": name,
            "revision": served.number,
            "threshold_raw": calibration.get("image_threshold_raw"),
            "holdout": calibration.get("holdout_raw_scores") or [],
            "image_fpr_achievable": calibration.get("image_fpr_achievable"),
            "reviewed": list(reviewed.values()),
            "can_save": served.path.is_dir(),
        }

    @app.post("/studio/api/models/{name}/threshold")
    async def save_threshold(name: str, body: _Threshold) -> dict[str, Any]:
        served = workspace.served_revision(name)
        if served is None:
            raise UserError(f"unknown model {name!r}")
        if not served.path.is_dir():
            raise UserError(
                f"{name} is an ONNX file: save the threshold on its model directory, then "
                "export it again"
            )
        number = await run_in_threadpool(_threshold_revision, name, served.number, body.raw)
        await host.sync(workspace.models)
        return {"model": name, "revision": number, "threshold_raw": body.raw}

    def _threshold_revision(name: str, parent: int, raw: float) -> int:
        source = workspace.revision(name, parent)
        model = CFlowAD.load(source.path, device="cpu")
        model.set_image_threshold(raw, source="cflowad studio")
        number = workspace.next_revision(name)
        target = workspace.revision_path(name, number)
        model.save(target)
        identity = fingerprint(target) or ""
        workspace.record_created(
            name,
            number,
            "threshold",
            identity,
            parent=parent,
            trained_revision=source.trained,
            data=source.created.get("data"),
            settings=source.created.get("settings"),
            note=f"image threshold {raw:.6g}",
        )
        workspace.promote(name, number)
        return number

    # -- compare and promote ----------------------------------------------------------

    @app.get("/studio/api/models/{name}/compare")
    async def compare(name: str, revision: int) -> dict[str, Any]:
        served = workspace.served_revision(name)
        if served is None:
            raise UserError(f"unknown model {name!r}")
        candidate = workspace.revision(name, revision)
        cache = workspace.revisions / name / f"compare-r{served.number}-r{candidate.number}.json"
        marks = workspace.marks(name)
        cached = read_json(cache)
        if cached.get("marks") == sorted(marks):
            return cached
        images = [m for m in marks if Path(m).is_file()]
        old = await compute(lambda: _score_files(load(served.path, "cpu"), images))
        new = await compute(lambda: _score_files(load(candidate.path, "cpu"), images))
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
        await run_in_threadpool(write_json, cache, result)
        return result

    @app.post("/studio/api/models/{name}/promote")
    async def promote(name: str, body: _Revision) -> dict[str, Any]:
        """Serve a revision: one served before (a restore), or a new one whose comparison
        with the served one has been shown."""
        served = workspace.served_revision(name)
        candidate = workspace.revision(name, body.revision)
        before = workspace.promoted(name)
        compared = (
            served is not None
            and (
                workspace.revisions / name / f"compare-r{served.number}-r{candidate.number}.json"
            ).is_file()
        )
        if candidate.number not in before and not compared:
            raise UserError(
                f"revision {candidate.number} has not been compared with the served one: "
                "open Compare first"
            )
        await run_in_threadpool(workspace.promote, name, candidate.number)
        await host.sync(workspace.models)
        return {"model": name, "revision": candidate.number}

    # -- live -------------------------------------------------------------------------

    @app.post("/studio/api/sources")
    async def attach(body: _Attach) -> dict[str, Any]:
        return await run_in_threadpool(live.attach, body.kind, body.model, body.target, body.every)

    @app.post("/studio/api/sources/{source_id}/detach")
    async def detach(source_id: str) -> dict[str, Any]:
        await run_in_threadpool(live.detach, source_id)
        return {"detached": source_id}

    @app.get("/studio/api/sources/{source_id}")
    async def source_state(source_id: str) -> dict[str, Any]:
        return live.get(source_id).describe()

    @app.get("/studio/api/sources/{source_id}/frame")
    async def frame(source_id: str) -> Response:
        picture = live.get(source_id).frame
        if picture is None:
            return JSONResponse({"error": "no frame scored yet"}, 404)
        return Response(picture, media_type="image/jpeg", headers={"cache-control": "no-store"})

    @app.get("/studio/api/sources/{source_id}/events")
    async def events(source_id: str, request: Request) -> StreamingResponse:
        """Server-sent events: the source's state after every scored frame (at most 10/s)."""
        live.get(source_id)

        async def updates() -> AsyncIterator[str]:
            seen = -1
            while not await request.is_disconnected():
                update = await run_in_threadpool(live.wait, source_id, seen, 10.0)
                if update is None:
                    yield ": keep-alive\n\n"
                    continue
                seen = update["scored"]
                yield f"data: {json.dumps(update)}\n\n"
                if update["state"] not in ("starting", "running"):
                    return
                await asyncio.sleep(0.1)

        return StreamingResponse(updates(), media_type="text/event-stream")

    app.add_middleware(_Csrf, token=csrf, api_key=api_key)
    app.add_middleware(
        BodyLimit,
        limit=int(settings.serve.max_image_mb * 2**20),
        message=too_large_message(settings.serve),
    )
    if api_key is not None:
        app.add_middleware(_Login, api_key=api_key, session=session or "")
    return app


class _Current:
    """The served revision of a model, looked up at every call: a live source follows a
    promotion; scoring runs on the server's compute pool."""

    def __init__(self, host: ServedModels, name: str) -> None:
        self.host, self.name = host, name
        host.get_or_error(name)

    @property
    def _model(self) -> Predictor:
        return self.host.get_or_error(self.name).model

    @property
    def image_size(self) -> tuple[int, int]:
        return self._model.image_size

    def predict(self, images: Any, batch_size: int = 8, reporter: Any = None) -> Any:
        model = self._model
        return self.host.compute(lambda: model.predict(images, batch_size=batch_size)).result()

    def predict_iter(self, images: Any, batch_size: int = 8, reporter: Any = None) -> Any:
        model = self._model
        return iter(
            self.host.compute(
                lambda: list(model.predict_iter(images, batch_size=batch_size))
            ).result()
        )

    def describe(self) -> dict[str, Any]:
        return self._model.describe()


def _by_score(record: dict[str, Any]) -> float:
    """Highest score first; images that did not decode last."""
    score = record.get("score")
    return -float(score) if score is not None else math.inf


def _score_files(model: Predictor, images: list[str]) -> list[tuple[float, bool]]:
    if not images:
        return []
    return [
        (round(r.score, 6), bool(r.anomalous))
        for r in model.predict_iter([load_image(Path(i)) for i in images], batch_size=8)
    ]


def _calibration(path: Path) -> dict[str, Any]:
    """A revision's calibration: model.json's, or the ONNX file's metadata."""
    if path.is_dir():
        return dict(read_json(path / "model.json").get("calibration", {}))
    model = load(path, "cpu")
    return dict(getattr(model, "calibration", {}) or {})


def _asset(name: str) -> str:
    return (resources.files("cflowad.studio") / "static" / name).read_text()


class _Csrf:
    """State-changing requests to /studio/api need the page's token in X-CSRF-Token
    (a script with the API key in Authorization needs none: a browser cannot send it
    cross-site)."""

    def __init__(self, app: ASGIApp, token: str, api_key: str | None) -> None:
        self.app, self.token = app, token.encode()
        self.bearer = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and scope["method"] not in _SAFE
            and scope["path"].startswith("/studio/api/")
        ):
            headers = dict(scope["headers"])
            bearer = self.bearer is not None and hmac.compare_digest(
                headers.get(b"authorization", b""), self.bearer
            )
            if not bearer and not hmac.compare_digest(
                headers.get(b"x-csrf-token", b""), self.token
            ):
                await send_json(
                    send, 403, {"error": "missing or stale CSRF token: reload the page"}
                )
                return
        await self.app(scope, receive, send)


class _Login:
    """With an API key: the page needs the login cookie, the API the cookie or the key."""

    def __init__(self, app: ASGIApp, api_key: str, session: str) -> None:
        self.app = app
        self.bearer = f"Bearer {api_key}".encode()
        self.session = session

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or path in ("/healthz", "/studio/login"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        cookies = _cookies(headers.get(b"cookie", b"").decode("latin-1"))
        if hmac.compare_digest(headers.get(b"authorization", b""), self.bearer) or (
            hmac.compare_digest(cookies.get(COOKIE, ""), self.session)
        ):
            await self.app(scope, receive, send)
            return
        if path in ("/", "/studio") and scope["method"] == "GET":
            await send(
                {
                    "type": "http.response.start",
                    "status": 303,
                    "headers": [(b"location", b"/studio/login")],
                }
            )
            await send({"type": "http.response.body", "body": b""})
            return
        await send_json(
            send,
            401,
            {"error": "log in at /studio/login, or send Authorization: Bearer <key>"},
            [(b"www-authenticate", b"Bearer")],
        )


def _cookies(header: str) -> dict[str, str]:
    found = {}
    for part in header.split(";"):
        key, _, value = part.strip().partition("=")
        if key:
            found[key] = value
    return found

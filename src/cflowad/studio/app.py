"""``cflowad studio``: the inspection loop on one local page, served with the /v1 API.

One FastAPI process: the page (``/studio``, plain HTML and a little JS shipped in the
wheel), its JSON API (``/studio/api``), and the serving API of ``cflowad serve``
(``/v1``, probes, metrics) for the workspace's models, on one engine
(:class:`cflowad.line.served.ServedModels`). Everything the page changes is a file
in the workspace (:mod:`cflowad.studio.workspace`).

Security: the page's state-changing requests carry a CSRF token (``X-CSRF-Token``,
derived from the workspace's secret); with an API key, the page needs a login (an
HttpOnly cookie) and the API takes ``Authorization: Bearer <key>``; files are read
only inside the workspace and the ``--allow`` folders.
"""

from __future__ import annotations

import asyncio
import contextlib
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

from cflowad.common.errors import UserError, missing_extra
from cflowad.common.version import __version__
from cflowad.data.images import IMAGE_SUFFIXES, decode_image, load_image
from cflowad.engine.catalog import model_format, read_card
from cflowad.engine.inference import ImageResult
from cflowad.line.served import ServedModels, ServedPredictor
from cflowad.line.server import (
    BodyLimit,
    add_serving_routes,
    too_large_message,
)
from cflowad.line.settings import ServeSettings
from cflowad.results.pictures import jpeg
from cflowad.studio.feed import StateFeed
from cflowad.studio.guards import COOKIE, CsrfGuard, LoginGuard, csrf_token, session_token
from cflowad.studio.jobs import SETTINGS, TrainingQueue
from cflowad.studio.live import LiveSources
from cflowad.studio.review import ModelReview
from cflowad.studio.runs import PICTURES, ScoringRuns
from cflowad.studio.workspace import Workspace, new_id

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
    raise missing_extra(
        "cflowad studio", f"the studio extra ({missing.name} is missing)", "studio"
    ) from None

__all__ = ["StudioSettings", "create_studio"]

log = logging.getLogger("cflowad.studio")
# the page's files: the style sheet, and its JS modules (the page, what every view uses,
# one module a view)
_MODULES = (
    *("studio", "common", "state", "pickers"),
    *("models", "training", "review", "threshold", "feedback", "live"),
)
_STATIC = {"studio.css": "text/css", **{f"{name}.js": "text/javascript" for name in _MODULES}}


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
    csrf = csrf_token(workspace.secret)
    api_key = settings.serve.api_key
    session = session_token(api_key) if api_key else None

    loop: list[asyncio.AbstractEventLoop] = []  # the server's, once it runs

    def on_revision(name: str, number: int, promoted: bool) -> None:
        """A training ended (in the jobs thread): serve a new model now, not at the next poll."""
        log.info("model %s: revision %d%s", name, number, " (served)" if promoted else "")
        if promoted and loop:
            asyncio.run_coroutine_threadsafe(host.sync(workspace.models), loop[0])

    queue = TrainingQueue(workspace, on_revision, parallel=settings.parallel_trainings)

    def score(name: str, images: list[np.ndarray]) -> tuple[int, list[ImageResult]]:
        revision = workspace.served_revision(name)
        results = list(ServedPredictor(host, name).predict_iter(images, batch_size=8))
        return (revision.number if revision else 0), results

    runs = ScoringRuns(workspace, score)
    # comparisons score on the server's compute pool: the cores are shared, not fought over
    review = ModelReview(
        workspace, runs, queue, settings.serve.device, lambda f: host.compute(f).result()
    )
    live = LiveSources(workspace, lambda name: ServedPredictor(host, name), host.publisher)

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

    @app.get("/studio/api/state/events")
    async def state_events(request: Request) -> StreamingResponse:
        """Server-sent events: the state now and after every change (one computation for
        every open tab, :mod:`cflowad.studio.feed`)."""
        return StreamingResponse(
            feed.events(request.is_disconnected),
            media_type="text/event-stream",
            headers={"cache-control": "no-store"},
        )

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

    feed = StateFeed(_state)

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
                    "threshold_raw": _threshold_raw(r.path),
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
            # what train would read here (its train/good in the MVTec layout): the page
            # asks for a sample to draw the region on only then
            "trainable": _has_training_images(workspace, folder),
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
        return await run_in_threadpool(review.retrain, name)

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
        return await run_in_threadpool(review.threshold, name)

    @app.post("/studio/api/models/{name}/threshold")
    async def save_threshold(name: str, body: _Threshold) -> dict[str, Any]:
        number = await run_in_threadpool(review.save_threshold, name, body.raw)
        await host.sync(workspace.models)
        return {"model": name, "revision": number, "threshold_raw": body.raw}

    # -- compare and promote ----------------------------------------------------------

    @app.get("/studio/api/models/{name}/compare")
    async def compare(name: str, revision: int) -> dict[str, Any]:
        return await run_in_threadpool(review.compare, name, revision)

    @app.post("/studio/api/models/{name}/promote")
    async def promote(name: str, body: _Revision) -> dict[str, Any]:
        """Serve a revision: one served before (a restore), or a new one whose comparison
        with the served one has been shown."""
        await run_in_threadpool(review.promote, name, body.revision)
        await host.sync(workspace.models)
        return {"model": name, "revision": body.revision}

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

    app.add_middleware(CsrfGuard, token=csrf, api_key=api_key)
    app.add_middleware(
        BodyLimit,
        limit=int(settings.serve.max_image_mb * 2**20),
        message=too_large_message(settings.serve),
    )
    if api_key is not None:
        app.add_middleware(LoginGuard, api_key=api_key, session=session or "")
    return app


def _by_score(record: dict[str, Any]) -> float:
    """Highest score first; images that did not decode last."""
    score = record.get("score")
    return -float(score) if score is not None else math.inf


def _has_training_images(workspace: Workspace, folder: Path) -> bool:
    try:
        return bool(workspace.training_images(folder))
    except UserError:
        return False


def _threshold_raw(path: Path) -> float | None:
    """A revision directory's image threshold for the model list (None for a file, which
    only its runtime reads, or a directory that does not read)."""
    try:
        return read_card(path).calibration.image_threshold_raw if path.is_dir() else None
    except UserError:
        return None


def _asset(name: str) -> str:
    return (resources.files("cflowad.studio") / "static" / name).read_text()

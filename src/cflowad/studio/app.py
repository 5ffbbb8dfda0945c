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
import logging
from collections.abc import AsyncIterator
from importlib import resources

import numpy as np

from cflowad.common.errors import UserError, missing_extra
from cflowad.common.version import __version__
from cflowad.engine.inference import ImageResult
from cflowad.line.served import ServedModels, ServedPredictor
from cflowad.line.server import (
    BodyLimit,
    add_serving_routes,
    too_large_message,
)
from cflowad.line.settings import ServeSettings
from cflowad.studio.guards import COOKIE, CsrfGuard, LoginGuard, csrf_token, session_token
from cflowad.studio.jobs import TrainingQueue
from cflowad.studio.live import LiveSources
from cflowad.studio.review import ModelReview
from cflowad.studio.runs import ScoringRuns
from cflowad.studio.workspace import Workspace

try:
    from fastapi import FastAPI, Request
    from fastapi.responses import (
        HTMLResponse,
        JSONResponse,
        RedirectResponse,
        Response,
    )
    from pydantic import BaseModel, Field
    from starlette.concurrency import run_in_threadpool
except ImportError as missing:  # pragma: no cover - depends on the installed extras
    raise missing_extra(
        "cflowad studio", f"the studio extra ({missing.name} is missing)", "studio"
    ) from None

# the routers import FastAPI: after the one-line error above, when it is missing
from cflowad.studio.routes import VIEWS
from cflowad.studio.routes.context import Studio

__all__ = ["StudioSettings", "create_studio"]

log = logging.getLogger("cflowad.studio")
# the page's files: the style sheet, and its JS modules (the page, what every view uses,
# one module a view)
_MODULES = (
    "studio",
    "common",
    "state",
    "pickers",
    "models",
    "training",
    "review",
    "threshold",
    "feedback",
    "live",
)
_STATIC = {"studio.css": "text/css", **{f"{name}.js": "text/javascript" for name in _MODULES}}


class StudioSettings(BaseModel):
    """How the studio serves (the serving part is ``cflowad serve``'s)."""

    serve: ServeSettings = Field(default_factory=ServeSettings)
    parallel_trainings: int = 1
    model_config = {"arbitrary_types_allowed": True}


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

    studio = Studio(workspace, host, queue, runs, review, live, csrf)
    for view in VIEWS:
        app.include_router(view.router(studio))

    app.add_middleware(CsrfGuard, token=csrf, api_key=api_key)
    app.add_middleware(
        BodyLimit,
        limit=int(settings.serve.max_image_mb * 2**20),
        message=too_large_message(settings.serve),
    )
    if api_key is not None:
        app.add_middleware(LoginGuard, api_key=api_key, session=session or "")
    return app


def _asset(name: str) -> str:
    return (resources.files("cflowad.studio") / "static" / name).read_text()

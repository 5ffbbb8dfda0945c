"""``cflowad serve``: score images over HTTP for many models, with batching, probes and metrics.

Every model is a :class:`cflowad.engine.inference.InferenceEngine` (a model directory or an
ONNX file) behind a :class:`cflowad.line.batching.DynamicBatcher`; all scoring runs on one
pool of ``--workers`` compute threads (one by default), so models share the cores
instead of fighting over them. The models are held by
:class:`cflowad.line.served.ServedModels`; this module adds only HTTP: reading and
checking uploads, answers, probes, metrics, reloads and the API key. Needs the
``serve`` extra (FastAPI, uvicorn, prometheus-client, python-multipart).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import io
import logging
import signal
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cflowad.common.errors import UserError, missing_extra
from cflowad.common.version import __version__
from cflowad.data.images import decode_image
from cflowad.engine.catalog import find_models
from cflowad.engine.inference import THRESHOLD, ImageResult
from cflowad.line.inference_protocol import add_inference_protocol
from cflowad.line.served import ServedModels
from cflowad.line.settings import ServeSettings

try:
    import uvicorn
    from fastapi import FastAPI, HTTPException, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ImportError as missing:  # pragma: no cover - depends on the installed extras
    raise missing_extra(
        "cflowad serve", f"the serve extra ({missing.name} is missing)", "serve"
    ) from None

__all__ = [
    "OUTPUTS",
    "BodyLimit",
    "ServeSettings",
    "add_serving_routes",
    "create_app",
    "run_server",
    "send_json",
    "too_large_message",
]

log = logging.getLogger("cflowad.serve")
OUTPUTS = ("map", "mask", "overlay")
Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class _ClientGone(Exception):
    """The client disconnected before its answer was ready."""


class _TooLarge(Exception):
    """The body is over --max-image-mb."""


def create_app(models: Path | dict[str, Path], settings: ServeSettings | None = None) -> FastAPI:
    """The FastAPI app serving ``models`` (a path as ``cflowad serve`` takes, or name -> path).

    Models load in the background once the app starts: /healthz answers at once,
    /readyz turns 200 when every model has scored a warm-up image. A model whose files
    change on disk is reloaded (the old one serves until the new one is warm), and a
    model copied into a MODELS folder is served too, without a restart.
    """
    settings = settings or ServeSettings()
    sources = find_models(models) if isinstance(models, Path) else dict(models)
    root = (
        models
        if isinstance(models, Path)
        and models.resolve() not in {p.resolve() for p in sources.values()}
        else None
    )
    host = ServedModels(sources, settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async def load_then_follow() -> None:
            await host.load_all()
            if host.failure is None and settings.follow_seconds > 0:
                await host.follow(root, settings.follow_seconds)

        loading = asyncio.create_task(load_then_follow())
        loop = asyncio.get_running_loop()
        hangup = threading.current_thread() is threading.main_thread() and hasattr(signal, "SIGHUP")
        if hangup:
            loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(host.reload_all()))
        try:
            yield
        finally:
            if hangup:
                loop.remove_signal_handler(signal.SIGHUP)
            loading.cancel()
            await host.close()

    app = FastAPI(
        title="cflowad",
        version=__version__,
        summary="CFLOW-AD anomaly detection: scores, decisions and heat maps per image.",
        lifespan=lifespan,
    )
    add_serving_routes(app, host)
    app.add_middleware(
        BodyLimit, limit=int(settings.max_image_mb * 2**20), message=too_large_message(settings)
    )
    if settings.api_key is not None:
        app.add_middleware(_ApiKey, key=settings.api_key)  # added last: runs first
    return app


def add_serving_routes(app: FastAPI, host: ServedModels) -> None:
    """The serving API on ``app``: probes, /metrics and /v1, with JSON errors.

    ``cflowad serve`` and ``cflowad studio`` both answer through it, on one engine.
    """
    settings = host.settings
    sources = host.sources
    app.state.models = host
    metrics = host.metrics

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": str(error.detail)}, error.status_code, error.headers)

    @app.exception_handler(RequestValidationError)
    async def _bad_request(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in error.errors()
        )
        return JSONResponse({"error": f"bad request: {problems}"}, 400)

    @app.exception_handler(_TooLarge)
    async def _too_large(request: Request, error: _TooLarge) -> JSONResponse:
        return JSONResponse({"error": too_large_message(settings)}, 413)

    @app.exception_handler(Exception)
    async def _internal(request: Request, error: Exception) -> JSONResponse:
        log.exception("internal error on %s", request.url.path)
        return JSONResponse({"error": f"internal error ({type(error).__name__}): {error}"}, 500)

    @app.get("/healthz", summary="Liveness: the process answers.")
    async def healthz() -> dict[str, str]:
        return {"status": "alive"}

    @app.get("/readyz", summary="Readiness: 200 once every model is loaded and warmed up.")
    async def readyz() -> JSONResponse:
        if host.ready:
            return JSONResponse({"status": "ready", "models": list(host.served)})
        message = host.failure or f"loading models: {len(host.served)} of {len(sources)} ready"
        return JSONResponse({"error": message}, 503)

    @app.get("/metrics", summary="Prometheus metrics.")
    async def prometheus() -> Response:
        for name, served in host.served.items():
            metrics.queued.labels(name).set(served.batcher.queued)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", summary="The served models: backbone, input size, thresholds, ...")
    async def list_models() -> dict[str, Any]:
        return {"models": [served.describe() for served in host.served.values()]}

    @app.get("/v1/models/{name}", summary="One served model.")
    async def show_model(name: str) -> dict[str, Any]:
        return host.get(name).describe()

    @app.post(
        "/v1/models/{name}/predict",
        summary="Score one image: the raw bytes as the body, or a multipart field 'image'.",
    )
    async def predict(name: str, request: Request, outputs: str = "") -> Response:
        start = time.perf_counter()
        label = name if name in sources else "(unknown)"
        status = 500
        try:
            answer = await _predict(host, name, request, _wanted(outputs), start)
            status = 200
            return JSONResponse(answer)
        except StarletteHTTPException as error:
            status = error.status_code
            raise
        except _TooLarge:
            status = 413
            raise
        except _ClientGone:
            status = 499  # as nginx logs it: the client closed the request
            return Response(status_code=499)
        finally:
            metrics.requests.labels(label, str(status)).inc()
            if status == 200:
                metrics.latency.labels(label).observe(time.perf_counter() - start)

    @app.post("/v1/models/{name}/reload", summary="Load the model from disk again.")
    async def reload(name: str) -> JSONResponse:
        try:
            served = await host.reload(name)
        except UserError as error:
            return JSONResponse(
                {"error": f"reload refused, still serving the old model: {error}"}, 422
            )
        return JSONResponse({"reloaded": True, **served.describe()})

    add_inference_protocol(app, host)


class BodyLimit:
    """413 for a Content-Length over ``limit`` before reading, or once the body passes it.

    Pure ASGI (not BaseHTTPMiddleware), so handlers keep the raw ``receive`` that
    disconnect detection needs.
    """

    def __init__(self, app: ASGIApp, limit: int, message: str) -> None:
        self.app, self.limit, self.message = app, limit, message

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limit:
            await send_json(send, 413, {"error": self.message})
            return
        received = 0

        async def limited() -> MutableMapping[str, Any]:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise _TooLarge
            return message

        await self.app(scope, limited, send)


class _ApiKey:
    """Every path but /healthz needs ``Authorization: Bearer <key>`` (compared in constant time)."""

    def __init__(self, app: ASGIApp, key: str) -> None:
        self.app, self.expected = app, f"Bearer {key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] != "/healthz":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                await send_json(
                    send,
                    401,
                    {"error": "missing or wrong API key: send Authorization: Bearer <key>"},
                    [(b"www-authenticate", b"Bearer")],
                )
                return
        await self.app(scope, receive, send)


async def send_json(
    send: Send, status: int, body: dict[str, Any], headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    response = JSONResponse(body, status)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": response.raw_headers + (headers or []),
        }
    )
    await send({"type": "http.response.body", "body": response.body})


def too_large_message(settings: ServeSettings) -> str:
    return f"image over the limit of {settings.max_image_mb:g} MB (cflowad serve --max-image-mb)"


def _wanted(outputs: str) -> list[str]:
    wanted = [o.strip() for o in outputs.split(",") if o.strip()]
    unknown = [o for o in wanted if o not in OUTPUTS]
    if unknown:
        raise HTTPException(
            400, f"unknown outputs {', '.join(unknown)}; choose from {', '.join(OUTPUTS)}"
        )
    return wanted


async def _predict(
    host: ServedModels, name: str, request: Request, wanted: list[str], start: float
) -> dict[str, Any]:
    arrived = datetime.now(UTC).isoformat(timespec="milliseconds")
    batcher = host.get(name).batcher
    with batcher.arriving():
        data, source = await _read_upload(request)
        try:
            image = await run_in_threadpool(decode_image, data, source)
        except UserError as error:
            raise HTTPException(400, str(error)) from None
        # look the model up again: a reload may have switched it while the body arrived
        served = host.get(name)
        future = served.batcher.submit(image)
    result = await _answer_or_disconnect(request, future)
    answer: dict[str, Any] = {
        "model": name,
        "revision": served.revision,
        **result.record(area=True),
        "image_threshold": THRESHOLD,
        "pixel_threshold": THRESHOLD,
        "width": image.shape[1],
        "height": image.shape[0],
    }
    await host.scored(served, result, dict(answer), arrived)
    if wanted:
        answer.update(await run_in_threadpool(_pictures, image, result, wanted))
    answer["latency_ms"] = round((time.perf_counter() - start) * 1000, 2)
    return answer


async def _read_upload(request: Request) -> tuple[bytes, str]:
    """The image bytes and how to name them in errors: a raw body or multipart field 'image'."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        form = await request.form(max_files=1, max_fields=16)
        upload = form.get("image")
        if upload is None or isinstance(upload, str):
            raise HTTPException(400, "multipart body without a file field named 'image'")
        data, source = await upload.read(), f"field 'image' ({upload.filename or 'no name'})"
    elif content_type in ("", "application/octet-stream") or content_type.startswith("image/"):
        data, source = await request.body(), "request body"
    else:
        raise HTTPException(
            415,
            f"unsupported content type {content_type!r}: send the image bytes (image/* or "
            "application/octet-stream) or a multipart/form-data field 'image'",
        )
    if not data:
        raise HTTPException(400, f"{source}: empty; send the image file's bytes")
    return data, source


async def _answer_or_disconnect(
    request: Request, future: asyncio.Future[ImageResult]
) -> ImageResult:
    """Wait for the result; if the client goes away first, give up its place in the batch."""

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher: asyncio.Future[Any] = asyncio.ensure_future(disconnected())
    waiting: set[asyncio.Future[Any]] = {future, watcher}
    try:
        await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if future.done():
        return future.result()
    future.cancel()
    raise _ClientGone


def _pictures(image: np.ndarray, result: ImageResult, wanted: list[str]) -> dict[str, str]:
    """Base64 PNGs at the image's size: map (16-bit, value / 65535 = readable score),
    mask (0 or 255), overlay (heat map and outline over the image)."""
    pictures: dict[str, np.ndarray] = {}
    if "map" in wanted:
        pictures["map"] = (np.clip(result.anomaly_map, 0, 1) * 65535).round().astype(np.uint16)
    if "mask" in wanted:
        pictures["mask"] = result.mask.astype(np.uint8) * 255
    if "overlay" in wanted:
        from cflowad.results.pictures import blend

        pictures["overlay"] = blend(image, result.anomaly_map, result.mask)
    encoded = {}
    for key, array in pictures.items():
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG")
        encoded[key] = base64.b64encode(buffer.getvalue()).decode("ascii")
    return encoded


def run_server(
    app: FastAPI, host: str = "127.0.0.1", port: int = 8000, graceful_seconds: int | None = None
) -> int:
    """Serve ``app`` until interrupted; 2 when a model failed to load at start-up.

    ``graceful_seconds``: how long a stop waits for open responses (the studio's event
    streams never end by themselves); unbounded by default, so a request finishes."""
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("cflowad: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="info",
        access_log=False,
        timeout_graceful_shutdown=graceful_seconds,
    )
    server = uvicorn.Server(config)
    models: ServedModels = app.state.models

    async def watch_failure() -> None:
        while not server.should_exit:
            if models.failure:
                server.should_exit = True
            await asyncio.sleep(0.1)

    async def main() -> None:
        watcher = asyncio.create_task(watch_failure())
        try:
            await server.serve()
        finally:
            watcher.cancel()

    # Ctrl-C and SIGTERM are how a server is stopped, not errors: uvicorn shuts down
    # gracefully, then raises the signal again, which lands here instead of killing us.
    stops = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.signal(s, lambda *_: None) for s in stops}
    try:
        asyncio.run(main())
    finally:
        for number, restore in previous.items():
            signal.signal(number, restore)
    if models.failure:
        raise UserError(models.failure)
    return 0

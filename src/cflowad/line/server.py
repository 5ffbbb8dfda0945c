"""``cflowad serve``: score images over HTTP for many models, with batching, probes and metrics.

Every model is a :class:`cflowad.engine.inference.InferenceEngine` (a model directory or an
ONNX file) behind a :class:`cflowad.line.batching.DynamicBatcher`; all scoring runs on one
pool of ``--workers`` compute threads (one by default), so models share the cores
instead of fighting over them. This module
adds only HTTP: reading and checking uploads, answers, probes, metrics, reloads and
the API key. Needs the ``serve`` extra (FastAPI, uvicorn, prometheus-client,
python-multipart).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import hmac
import io
import logging
import signal
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import uuid4

import numpy as np
from PIL import Image

from cflowad.common.allocator import release_freed_memory
from cflowad.common.errors import UserError, reason
from cflowad.common.version import __version__
from cflowad.data.images import decode_image
from cflowad.engine.inference import THRESHOLD, ImageResult, Predictor
from cflowad.engine.loading import load
from cflowad.line.batching import DynamicBatcher
from cflowad.line.catalog import find_models, model_files, model_format, scan_models
from cflowad.line.drift import DriftMonitor
from cflowad.line.inference_protocol import add_inference_protocol
from cflowad.line.publish import Publisher, model_version
from cflowad.line.settings import ServeSettings

try:
    import uvicorn
    from fastapi import FastAPI, HTTPException, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from prometheus_client import (
        CONTENT_TYPE_LATEST,
        CollectorRegistry,
        Counter,
        Gauge,
        Histogram,
        generate_latest,
    )
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ImportError as missing:  # pragma: no cover - depends on the installed extras
    raise UserError(
        f"cflowad serve needs the serve extra ({missing.name} is missing): "
        "pip install 'cflowad[serve]'"
    ) from None

__all__ = [
    "OUTPUTS",
    "BodyLimit",
    "ServeSettings",
    "ServedModels",
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


class _Metrics:
    """Prometheus metrics of one app (its own registry, so apps in one process do not mix)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "cflowad_requests",
            "Predict requests by model and HTTP status.",
            ["model", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "cflowad_request_seconds",
            "Predict latency, request to answer.",
            ["model"],
            buckets=(0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10),
            registry=r,
        )
        self.batch_size = Histogram(
            "cflowad_batch_size",
            "Images per forward pass.",
            ["model"],
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=r,
        )
        self.decisions = Counter(
            "cflowad_decisions", "Image decisions.", ["model", "decision"], registry=r
        )
        self.scores = Histogram(
            "cflowad_score",
            "Image scores (readable scale, threshold 0.5).",
            ["model"],
            buckets=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0),
            registry=r,
        )
        self.reloads = Counter(
            "cflowad_reloads", "Model reloads by result.", ["model", "result"], registry=r
        )
        self.queued = Gauge(
            "cflowad_queued_images", "Images waiting for a batch.", ["model"], registry=r
        )
        self.drift_quantile = Gauge(
            "cflowad_drift_quantile",
            "Rank of the recent images' median raw score among the held-out good ones "
            "(0.5 on a stable line).",
            ["model"],
            registry=r,
        )
        self.drift = Gauge(
            "cflowad_drift", "1 while the drift alarm is tripped.", ["model"], registry=r
        )
        self.drift_events = Counter(
            "cflowad_drift_events",
            "Drift alarms tripped and cleared.",
            ["model", "state"],
            registry=r,
        )


@dataclass
class _Served:
    """One model as served: what answers now, and what the model list says of it."""

    name: str
    path: Path
    model: Predictor
    batcher: DynamicBatcher
    revision: int
    loaded_at: str
    info: dict[str, Any] = field(default_factory=dict)
    drift: DriftMonitor | None = None
    version: str = ""  # the model's fingerprint in published messages

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "format": model_format(self.path),
            "revision": self.revision,
            "loaded_at": self.loaded_at,
            "drift": None
            if self.drift is None
            else {"quantile": self.drift.quantile, "tripped": self.drift.tripped},
            **self.info,
        }

    def observe(self, result: ImageResult, metrics: _Metrics) -> dict[str, Any] | None:
        """Feed the drift alarm one scored image; log and count when it trips or clears
        (the ``drift`` record then)."""
        if self.drift is None:
            return None
        event = self.drift.add(result.raw_score)
        if self.drift.quantile is not None:
            metrics.drift_quantile.labels(self.name).set(self.drift.quantile)
        metrics.drift.labels(self.name).set(int(self.drift.tripped))
        if event is not None:
            metrics.drift_events.labels(self.name, event["state"]).inc()
            log.warning("drift %s for %s: %s", event["state"], self.name, event["message"])
        return event


def _signature(path: Path) -> tuple[int, ...] | None:
    """What changes when a model's files are replaced: their sizes and modification times."""
    files = model_files(path)
    try:
        return tuple(v for f in files for v in (f.stat().st_mtime_ns, f.stat().st_size))
    except OSError:
        return None  # being replaced right now: look again next time


class ServedModels:
    """The models of one server: loading with warm-up, lookup, and reload without downtime.

    A reload loads and warms the new model beside the old one; only then does it
    take new requests, while the old one scores what was already queued and retires.
    A model that fails to load is refused and the old one keeps serving.
    """

    def __init__(
        self, sources: dict[str, Path], settings: ServeSettings, origin: str = "serve"
    ) -> None:
        self.sources = sources
        self.settings = settings
        self.metrics = _Metrics()
        self.publisher = (
            Publisher(settings.publish, settings.spool, origin, log.warning)
            if settings.publish.urls and settings.spool is not None
            else None
        )
        self.metrics.registry.register(_PublishingCollector(self))
        self.served: dict[str, _Served] = {}
        self.failure: str | None = None
        self._compute = ThreadPoolExecutor(
            max_workers=settings.workers, thread_name_prefix="cflowad-score"
        )
        self._reloading: dict[str, asyncio.Lock] = {name: asyncio.Lock() for name in sources}
        self._signatures: dict[str, tuple[int, ...] | None] = {}
        self.broken: dict[str, str] = {}  # name -> why it does not load (added while running)

    @property
    def ready(self) -> bool:
        """Every model loaded and warmed up (a model added while running may be broken)."""
        return len(self.served) + len(self.broken) == len(self.sources)

    def get(self, name: str) -> _Served:
        """The model serving ``name`` now; 404 for a name not in MODELS (names are never paths)."""
        if name not in self.sources:
            raise HTTPException(404, f"unknown model {name!r}; GET /v1/models lists them")
        served = self.served.get(name)
        if served is None:
            if name in self.broken:
                raise HTTPException(503, f"model {name!r} does not load: {self.broken[name]}")
            raise HTTPException(503, f"model {name!r} is still loading; see /readyz")
        return served

    def get_or_error(self, name: str) -> _Served:
        """:meth:`get` outside a request: a UserError that says why."""
        try:
            return self.get(name)
        except HTTPException as error:
            raise UserError(str(error.detail)) from None

    def compute(self, function: Callable[[], Any]) -> Future[Any]:
        """Run ``function`` on the compute pool that scores every model's batches: other
        work that scores (a folder, a live source) takes turns with requests."""
        return self._compute.submit(function)

    async def load_all(self) -> None:
        """Load and warm every model, one after the other (at start-up)."""
        for index, name in enumerate(self.sources, 1):
            log.info("loading model %d of %d: %s", index, len(self.sources), name)
            try:
                self.served[name] = await self._load(name, revision=1)
            except Exception as error:  # never a silent dead task: /readyz and the log say why
                self.failure = f"model {name!r} failed to load: {reason(error)}"
                log.error("%s", self.failure)
                return
        log.info("ready: %d model%s", len(self.served), "" if len(self.served) == 1 else "s")

    async def add(self, name: str, path: Path) -> None:
        """Serve a model that appeared while running; one that does not load is listed in
        :attr:`broken` (with why) instead of stopping the server."""
        self.sources[name] = path
        self._reloading[name] = asyncio.Lock()
        try:
            self.served[name] = await self._load(name, revision=1)
            self.broken.pop(name, None)
            log.info("serving new model %s", name)
        except Exception as error:
            self.broken[name] = reason(error)
            log.error("model %s does not load: %s", name, self.broken[name])

    async def sync(self, root: Path | None = None) -> None:
        """Reload every model whose files changed on disk, and serve the models that
        appeared in ``root``: a new threshold or a promoted revision is served without a
        restart. A change that does not load is refused (the old model serves on) and
        tried again only when the files change again."""
        if root is not None:
            for name, path in scan_models(root).items():
                if name not in self.sources:
                    await self.add(name, path)
        for name, path in list(self.sources.items()):
            signature = _signature(path)
            if signature is None or signature == self._signatures.get(name):
                continue
            self._signatures[name] = signature
            if name in self.broken:  # fixed on disk, perhaps: try it again
                await self.add(name, path)
                continue
            if name not in self.served:  # still loading for the first time
                continue
            try:
                await self.reload(name)
            except UserError as error:
                log.error(
                    "%s changed on disk but does not load, still serving the old one: %s",
                    name,
                    error,
                )

    async def follow(
        self,
        root: Path | None = None,
        interval: float = 2.0,
        prepare: Callable[[], Any] | None = None,
    ) -> None:
        """:meth:`sync` every ``interval`` seconds, until cancelled; ``prepare`` runs (in a
        thread) before each, to update what is on disk (the studio's revisions)."""
        while True:
            await asyncio.sleep(interval)
            try:
                if prepare is not None:
                    await run_in_threadpool(prepare)
                await self.sync(root)
            except Exception:  # never a silent dead task: keep following, say why
                log.exception("following model files")

    async def reload(self, name: str) -> _Served:
        """Load ``name`` from disk again and switch to it; on a UserError the old one serves on."""
        self.get(name)  # an unknown or loading model answers before waiting for the lock
        async with self._reloading[name]:
            old = self.get(name)
            try:
                new = await self._load(name, revision=old.revision + 1)
            except UserError:
                self.metrics.reloads.labels(name, "refused").inc()
                raise
            self.served[name] = new
            self.metrics.reloads.labels(name, "done").inc()
        await old.batcher.close()
        del old
        gc.collect()
        release_freed_memory()
        log.info("reloaded %s (revision %d)", name, new.revision)
        return new

    async def reload_all(self) -> None:
        """Reload every model (SIGHUP); failures are logged, the old models keep serving."""
        for name in list(self.served):
            try:
                await self.reload(name)
            except UserError as error:
                log.error("reload of %s refused: %s", name, error)

    async def scored(
        self, served: _Served, result: ImageResult, record: dict[str, Any], arrived: str
    ) -> None:
        """After each image a client had scored: decision metrics, the drift alarm, and the
        ``--publish`` destinations (spooled durably off the event loop)."""
        decision = "anomalous" if result.anomalous else "normal"
        self.metrics.decisions.labels(served.name, decision).inc()
        self.metrics.scores.labels(served.name).observe(result.score)
        drifted = served.observe(result, self.metrics)
        if self.publisher is None:
            return
        messages = [("result", record, f"request {uuid4().hex}", arrived)]
        if drifted is not None:
            messages.append(("drift", drifted, f"drift {drifted['state']}", drifted["time"]))
        publisher, name, version = self.publisher, served.name, served.version

        def publish() -> None:
            for kind, message, subject, at in messages:
                publisher.publish(
                    kind, message, model=name, version=version, subject=subject, at=at
                )

        await run_in_threadpool(publish)

    async def close(self) -> None:
        """Finish what is queued, then stop (the spool keeps what is not yet delivered)."""
        for served in list(self.served.values()):
            await served.batcher.close()
        self._compute.shutdown(wait=True)
        if self.publisher is not None:
            left = await run_in_threadpool(self.publisher.close)
            if left:
                log.warning("%d messages wait in %s for the next start", left, self.publisher.spool)

    async def _load(self, name: str, revision: int) -> _Served:
        path = self.sources[name]
        self._signatures.setdefault(name, _signature(path))
        loop = asyncio.get_running_loop()
        # A thread of its own that ends with the load: torch in a lasting second thread
        # keeps a second OpenMP team alive, and with more OpenMP threads than cores the
        # scoring thread ran 3x slower (see cflowad.data.images.batches).
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="cflowad-load") as loader:
            model = await loop.run_in_executor(loader, load, path, self.settings.device)
        height, width = model.image_size
        warm_up = np.full((height, width, 3), 0.5, np.float32)
        await loop.run_in_executor(self._compute, lambda: model.predict([warm_up], batch_size=1))
        batcher = DynamicBatcher(
            model,
            self._compute,
            max_batch=self.settings.max_batch,
            max_wait_ms=self.settings.max_wait_ms,
            in_flight=self.settings.workers,
            on_batch=self.metrics.batch_size.labels(name).observe,
        )
        batcher.start()
        return _Served(
            name=name,
            path=path,
            model=model,
            batcher=batcher,
            revision=revision,
            loaded_at=datetime.now(UTC).isoformat(timespec="seconds"),
            info=model.describe(),
            drift=DriftMonitor.for_model(getattr(model, "calibration", None), self.settings.drift)
            if self.settings.drift.window
            else None,
            version=model_version(model),
        )


class _PublishingCollector:
    """/metrics: what each ``--publish`` destination was sent, read at scrape time."""

    def __init__(self, host: ServedModels) -> None:
        self.host = host

    def collect(self) -> Any:
        publisher = self.host.publisher
        stats = publisher.stats() if publisher is not None else []
        for key, text in (
            ("spooled", "Messages appended to a destination's spool."),
            ("published", "Messages the broker or receiver confirmed."),
            ("retried", "Messages sent again after a failed attempt."),
            ("dropped", "Oldest messages dropped to keep the spool within --spool-max-mb."),
            ("refused", "Messages a webhook refused for good (HTTP 400, 413, 415, 422)."),
        ):
            family = CounterMetricFamily(f"cflowad_messages_{key}", text, labels=["destination"])
            for entry in stats:
                family.add_metric([entry["destination"]], entry[key])
            yield family
        pending = GaugeMetricFamily(
            "cflowad_messages_pending", "Messages waiting in the spool.", labels=["destination"]
        )
        for entry in stats:
            pending.add_metric([entry["destination"]], entry["pending"])
        yield pending


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
        "score": round(result.score, 6),
        "raw_score": result.raw_score,
        "anomalous": result.anomalous,
        "image_threshold": THRESHOLD,
        "pixel_threshold": THRESHOLD,
        "anomalous_area": round(float(result.mask.mean()), 6),
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


def run_server(app: FastAPI, host: str = "127.0.0.1", port: int = 8000) -> int:
    """Serve ``app`` until interrupted; 2 when a model failed to load at start-up."""
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("cflowad: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    config = uvicorn.Config(app, host=host, port=port, log_level="info", access_log=False)
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

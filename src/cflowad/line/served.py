"""The models a server holds (``cflowad serve``, the studio): loading with warm-up,
following their files on disk, reloading without downtime, one pool of compute threads,
and what happens after each score (metrics, the drift alarm, publishing).

Kept apart from :mod:`cflowad.line.server`, which adds only HTTP.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any
from uuid import uuid4

import numpy as np

from cflowad.common.allocator import release_freed_memory
from cflowad.common.errors import UserError, missing_extra, reason
from cflowad.common.progress import Reporter
from cflowad.data.images import ImageInput
from cflowad.engine.catalog import model_files, model_format, scan_models
from cflowad.engine.inference import ImageResult, Images, Prediction, Predictor, as_images
from cflowad.engine.loading import load
from cflowad.line.batching import DynamicBatcher
from cflowad.line.decide import Decisions
from cflowad.line.publish import Publisher
from cflowad.line.settings import ServeSettings

try:
    from fastapi import HTTPException
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
    from starlette.concurrency import run_in_threadpool
except ImportError as missing:  # pragma: no cover - depends on the installed extras
    raise missing_extra(
        "cflowad serve", f"the serve extra ({missing.name} is missing)", "serve"
    ) from None

__all__ = ["Metrics", "Served", "ServedModels", "ServedPredictor"]

log = logging.getLogger("cflowad.serve")


class Metrics:
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
class Served:
    """One model as served: what answers now, and what the model list says of it."""

    name: str
    path: Path
    model: Predictor
    batcher: DynamicBatcher
    revision: int
    loaded_at: str
    decisions: Decisions  # the drift alarm and publishing after each answer
    info: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "format": model_format(self.path),
            "revision": self.revision,
            "loaded_at": self.loaded_at,
            "drift": None
            if (drift := self.decisions.drift.monitor) is None
            else {"quantile": drift.quantile, "tripped": drift.tripped},
            **self.info,
        }

    def observe(self, result: ImageResult, metrics: Metrics) -> dict[str, Any] | None:
        """Feed the drift alarm one scored image (:class:`Decisions`, which logs a trip or
        a clear); count it in the metrics (the ``drift`` record then)."""
        event = self.decisions.observe(result)
        drift = self.decisions.drift.monitor
        if drift is None:
            return None
        if drift.quantile is not None:
            metrics.drift_quantile.labels(self.name).set(drift.quantile)
        metrics.drift.labels(self.name).set(int(drift.tripped))
        if event is not None:
            metrics.drift_events.labels(self.name, event["state"]).inc()
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
        self.metrics = Metrics()
        self.publisher = (
            Publisher(settings.publish, settings.spool, origin, log.warning)
            if settings.publish.urls and settings.spool is not None
            else None
        )
        self.metrics.registry.register(_PublishingCollector(self))
        self.served: dict[str, Served] = {}
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

    def get(self, name: str) -> Served:
        """The model serving ``name`` now; 404 for a name not in MODELS (names are never paths)."""
        if name not in self.sources:
            raise HTTPException(404, f"unknown model {name!r}; GET /v1/models lists them")
        served = self.served.get(name)
        if served is None:
            if name in self.broken:
                raise HTTPException(503, f"model {name!r} does not load: {self.broken[name]}")
            raise HTTPException(503, f"model {name!r} is still loading; see /readyz")
        return served

    def get_or_error(self, name: str) -> Served:
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

    async def reload(self, name: str) -> Served:
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
        self, served: Served, result: ImageResult, record: dict[str, Any], arrived: str
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

        def publish() -> None:
            for message in messages:
                served.decisions.publish(*message)

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

    async def _load(self, name: str, revision: int) -> Served:
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
        return Served(
            name=name,
            path=path,
            model=model,
            batcher=batcher,
            revision=revision,
            loaded_at=datetime.now(UTC).isoformat(timespec="seconds"),
            decisions=Decisions(
                model,
                None,  # a server neither calibrates nor writes files: it counts drift
                drift=self.settings.drift,
                reporter=_Warnings(name),
                publisher=self.publisher,
                model_name=name,
            ),
            info=model.describe(),
        )


class _Warnings(Reporter):
    """The drift alarm's warnings of one served model, in the server's log."""

    def __init__(self, name: str) -> None:
        super().__init__(enabled=False)
        self.name = name

    def warn(self, message: str) -> None:
        log.warning("%s for %s", message, self.name)


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


class ServedPredictor:
    """A :class:`~cflowad.engine.inference.Predictor` for the revision of ``name`` served
    now, for work beside the requests (the studio's scoring runs and live sources).

    Each batch runs on the server's compute pool, taking turns with requests, and
    looks the model up again, so a long run follows a promotion; results stream out
    batch by batch.
    """

    def __init__(self, host: ServedModels, name: str) -> None:
        self.host, self.name = host, name
        host.get_or_error(name)  # an unknown model fails here

    @property
    def model(self) -> Predictor:
        return self.host.get_or_error(self.name).model

    @property
    def image_size(self) -> tuple[int, int]:
        return self.model.image_size

    def predict_iter(
        self, images: Images, batch_size: int = 8, reporter: Reporter | None = None
    ) -> Iterator[ImageResult]:
        items = as_images(images)
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            scored: list[ImageResult] = self.host.compute(
                partial(_score, self.model, chunk)
            ).result()
            for result in scored:
                yield replace(result, index=start + result.index)

    def predict(
        self, images: Images, batch_size: int = 8, reporter: Reporter | None = None
    ) -> Prediction:
        return Prediction.collect(self.predict_iter(images, batch_size, reporter))

    def describe(self) -> dict[str, Any]:
        return self.model.describe()


def _score(model: Predictor, images: list[ImageInput]) -> list[ImageResult]:
    return list(model.predict_iter(images, batch_size=len(images)))

"""Dynamic batching: images that arrive together for one model are scored together.

A server (or a stream) submits single decoded images; one loop per model gathers
what is waiting into a batch (up to ``max_batch``) and scores it through the model's
:class:`cflowad.engine.inference.InferenceEngine` on a shared compute thread. Results never
depend on batch companions (the engine guarantees it), so batching only changes
throughput.

The wait rule (docs/design.md, "Batching rule"): a batch waits up to
``max_wait_ms`` for more images only while other requests are still arriving (being
read or decoded). A lone request never waits, so the latency at concurrency 1 is the
model's batch-1 latency; under load the batch fills while the previous one is scored.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np

from cflowad.engine.inference import ImageResult, Predictor

__all__ = ["DynamicBatcher"]


@dataclass
class _Pending:
    image: np.ndarray
    future: asyncio.Future[ImageResult] = field(repr=False)


class DynamicBatcher:
    """Gathers single images for one model into batches; one per model and event loop.

    Args:
        model: the engine that scores (a :class:`cflowad.CFlowAD` or an ``OnnxModel``).
        executor: where scoring runs; share one single-thread executor between models
            so that they do not fight over the cores.
        max_batch: at most this many images per forward pass.
        max_wait_ms: the longest a batch waits for images still arriving.
        in_flight: batches scored at once (the executor's workers: the server's
            ``--workers``); the next batch forms while they run.
        on_batch: called with each batch's size (metrics).
    """

    def __init__(
        self,
        model: Predictor,
        executor: Executor,
        max_batch: int = 8,
        max_wait_ms: float = 5.0,
        in_flight: int = 1,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        if max_batch < 1 or in_flight < 1:
            raise ValueError(f"max_batch={max_batch}, in_flight={in_flight}: each at least 1")
        self.model = model
        self._executor = executor
        self._max_batch = max_batch
        self._max_wait = max_wait_ms / 1000.0
        self._on_batch = on_batch
        self._queue: deque[_Pending] = deque()
        self._wakeup = asyncio.Event()
        self._arriving = 0
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self._slots = asyncio.Semaphore(in_flight)
        self._scoring: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        """Start the batching loop on the running event loop."""
        self._task = asyncio.get_running_loop().create_task(self._run())

    @contextlib.contextmanager
    def arriving(self) -> Iterator[None]:
        """Mark a request as being read or decoded, so that a forming batch may wait for it."""
        self._arriving += 1
        try:
            yield
        finally:
            self._arriving -= 1
            self._wakeup.set()

    def submit(self, image: np.ndarray) -> asyncio.Future[ImageResult]:
        """Queue one decoded image; cancel the future to give up its place."""
        if self._closing:
            raise RuntimeError("the batcher is closed")
        future: asyncio.Future[ImageResult] = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(image, future))
        self._wakeup.set()
        return future

    @property
    def queued(self) -> int:
        """Images waiting for a batch."""
        return len(self._queue)

    async def close(self) -> None:
        """Score everything already queued, then stop (a reload retires the old model so)."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            await self._task

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                if self._closing:
                    await asyncio.gather(*self._scoring)
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            await self._slots.acquire()  # a free worker: the batch forms for it now
            deadline = loop.time() + self._max_wait
            batch = self._take()
            while len(batch) < self._max_batch and self._arriving and not self._closing:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                self._wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                batch += self._take(self._max_batch - len(batch))
            if not batch:
                self._slots.release()
                continue
            task = loop.create_task(self._score(batch))
            self._scoring.add(task)
            task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._scoring.discard(task)
        self._slots.release()

    def _take(self, limit: int | None = None) -> list[_Pending]:
        """Up to ``limit`` queued images still awaited (disconnected requests are dropped)."""
        taken: list[_Pending] = []
        limit = self._max_batch if limit is None else limit
        while self._queue and len(taken) < limit:
            item = self._queue.popleft()
            if not item.future.done():
                taken.append(item)
        return taken

    async def _score(self, batch: list[_Pending]) -> None:
        images = [item.image for item in batch]
        if self._on_batch is not None:
            self._on_batch(len(batch))
        try:
            results = await asyncio.get_running_loop().run_in_executor(
                self._executor, self._predict, images
            )
        except Exception as error:  # the requests answer with it; the loop goes on
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(error)
            return
        for item, result in zip(batch, results, strict=True):
            if not item.future.done():
                item.future.set_result(result)

    def _predict(self, images: list[np.ndarray]) -> list[ImageResult]:
        return list(self.model.predict_iter(images, batch_size=len(images)))

"""The studio's state pushed to every open tab as server-sent events.

The page used to ask ``GET /studio/api/state`` every second, and every ask read every
run's and revision's JSON again. Now one task computes the state while a tab listens
(every ``interval`` seconds, however many tabs are open) and sends it only when it
changed: a tab that watches a quiet workspace costs no request at all.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.concurrency import run_in_threadpool

__all__ = ["StateFeed"]


class StateFeed:
    """The newest state, as JSON text with a version that grows when it changes."""

    def __init__(self, compute: Callable[[], dict[str, Any]], interval: float = 1.0) -> None:
        self.compute, self.interval = compute, interval
        self.text, self.version, self.listeners = "", 0, 0
        self._changed = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None

    async def _produce(self) -> None:
        """Compute the state while anyone listens; wake the listeners on a change."""
        while self.listeners:
            text = json.dumps(await run_in_threadpool(self.compute))
            if text != self.text:
                async with self._changed:
                    self.text, self.version = text, self.version + 1
                    self._changed.notify_all()
            await asyncio.sleep(self.interval)
        self._task = None

    async def events(self, disconnected: Callable[[], Any]) -> AsyncIterator[str]:
        """``data: <state>`` now and after every change; a comment now and then, so that a
        proxy keeps the connection open. Ends when the client goes."""
        self.listeners += 1
        if self._task is None:
            self._task = asyncio.create_task(self._produce())
        seen, quiet = 0, 0.0
        try:
            while not await disconnected():
                async with self._changed:
                    if self.version == seen:
                        try:
                            await asyncio.wait_for(self._changed.wait(), 1.0)
                        except TimeoutError:
                            quiet += 1.0
                            if quiet >= 15:
                                quiet = 0.0
                                yield ": keep-alive\n\n"
                            continue
                    seen, text = self.version, self.text
                quiet = 0.0
                yield f"data: {text}\n\n"
        finally:
            self.listeners -= 1

"""The Live view: hot folders and streams attached, their newest frame and their events."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from cflowad.studio.routes.context import Studio

__all__ = ["router"]


class _Attach(BaseModel):
    kind: str
    model: str
    target: str
    every: int = 1


def router(studio: Studio) -> APIRouter:
    """The view's routes, on the studio's parts."""
    api = APIRouter()
    live = studio.live

    @api.post("/studio/api/sources")
    async def attach(body: _Attach) -> dict[str, Any]:
        return await run_in_threadpool(live.attach, body.kind, body.model, body.target, body.every)

    @api.post("/studio/api/sources/{source_id}/detach")
    async def detach(source_id: str) -> dict[str, Any]:
        await run_in_threadpool(live.detach, source_id)
        return {"detached": source_id}

    @api.get("/studio/api/sources/{source_id}")
    async def source_state(source_id: str) -> dict[str, Any]:
        return live.get(source_id).describe()

    @api.get("/studio/api/sources/{source_id}/frame")
    async def frame(source_id: str) -> Response:
        picture = live.get(source_id).frame
        if picture is None:
            return JSONResponse({"error": "no frame scored yet"}, 404)
        return Response(picture, media_type="image/jpeg", headers={"cache-control": "no-store"})

    @api.get("/studio/api/sources/{source_id}/events")
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

    return api

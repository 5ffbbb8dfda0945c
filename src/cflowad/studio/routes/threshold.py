"""The Threshold view: the threshold shown against the held-out and reviewed scores, and saved."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from cflowad.studio.routes.context import Studio

__all__ = ["router"]


class _Threshold(BaseModel):
    raw: float


def router(studio: Studio) -> APIRouter:
    """The view's routes, on the studio's parts."""
    api = APIRouter()
    workspace, host, review = studio.workspace, studio.host, studio.review

    @api.get("/studio/api/models/{name}/threshold")
    async def threshold(name: str) -> dict[str, Any]:
        return await run_in_threadpool(review.threshold, name)

    @api.post("/studio/api/models/{name}/threshold")
    async def save_threshold(name: str, body: _Threshold) -> dict[str, Any]:
        number = await run_in_threadpool(review.save_threshold, name, body.raw)
        await host.sync(workspace.models)
        return {"model": name, "revision": number, "threshold_raw": body.raw}

    return api

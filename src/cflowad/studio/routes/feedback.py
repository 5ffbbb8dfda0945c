"""The Feedback view: a retraining with the marks, the comparison of two revisions, a promotion."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from cflowad.studio.routes.context import Studio

__all__ = ["router"]


class _Revision(BaseModel):
    revision: int


def router(studio: Studio) -> APIRouter:
    """The view's routes, on the studio's parts."""
    api = APIRouter()
    workspace, host, review = studio.workspace, studio.host, studio.review

    @api.post("/studio/api/models/{name}/retrain")
    async def retrain(name: str) -> dict[str, Any]:
        """A new revision trained on the served one's images plus the images marked good."""
        return await run_in_threadpool(review.retrain, name)

    # -- compare and promote ----------------------------------------------------------

    @api.get("/studio/api/models/{name}/compare")
    async def compare(name: str, revision: int) -> dict[str, Any]:
        return await run_in_threadpool(review.compare, name, revision)

    @api.post("/studio/api/models/{name}/promote")
    async def promote(name: str, body: _Revision) -> dict[str, Any]:
        """Serve a revision: one served before (a restore), or a new one whose comparison
        with the served one has been shown."""
        await run_in_threadpool(review.promote, name, body.revision)
        await host.sync(workspace.models)
        return {"model": name, "revision": body.revision}

    return api

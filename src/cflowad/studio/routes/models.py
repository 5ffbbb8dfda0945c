"""The Models view: trainings started and cancelled."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from cflowad.studio.routes.context import Studio

__all__ = ["router"]


class _Training(BaseModel):
    name: str
    root: str
    path: str = ""
    settings: dict[str, Any] = Field(default_factory=dict)


def router(studio: Studio) -> APIRouter:
    """The view's routes, on the studio's parts."""
    api = APIRouter()
    workspace, queue = studio.workspace, studio.queue

    @api.post("/studio/api/trainings")
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

    @api.post("/studio/api/trainings/{job_id}/cancel")
    async def cancel_training(job_id: str) -> dict[str, Any]:
        return await run_in_threadpool(queue.cancel, job_id)

    return api

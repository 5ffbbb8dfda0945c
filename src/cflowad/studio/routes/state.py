"""What every view reads: the state (asked, or pushed as server-sent events when it
changes), the allowed folders, a folder's sample image."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from cflowad.common.errors import UserError
from cflowad.data.images import IMAGE_SUFFIXES, load_image
from cflowad.engine.catalog import model_format, read_card
from cflowad.results.pictures import jpeg
from cflowad.studio.feed import StateFeed
from cflowad.studio.jobs import SETTINGS
from cflowad.studio.routes.context import Studio
from cflowad.studio.workspace import Workspace

__all__ = ["router"]


def router(studio: Studio) -> APIRouter:
    """The view's routes, on the studio's parts."""
    api = APIRouter()
    workspace, host, queue, runs, live, csrf = (
        studio.workspace,
        studio.host,
        studio.queue,
        studio.runs,
        studio.live,
        studio.csrf,
    )

    @api.get("/studio/api/state")
    async def state() -> dict[str, Any]:
        return await run_in_threadpool(_state)

    @api.get("/studio/api/state/events")
    async def state_events(request: Request) -> StreamingResponse:
        """Server-sent events: the state now and after every change (one computation for
        every open tab, :mod:`cflowad.studio.feed`)."""
        return StreamingResponse(
            feed.events(request.is_disconnected),
            media_type="text/event-stream",
            headers={"cache-control": "no-store"},
        )

    def _state() -> dict[str, Any]:
        return {
            "csrf": csrf,
            "roots": list(workspace.roots),
            "models": [_model_summary(name) for name in workspace.model_names()],
            "jobs": queue.jobs()[:50],
            "runs": runs.runs()[:200],
            "sources": [
                {k: v for k, v in s.describe().items() if k not in ("history", "events")}
                for s in live.sources.values()
            ],
            "settings": list(SETTINGS),
        }

    feed = StateFeed(_state)

    def _model_summary(name: str) -> dict[str, Any]:
        served = host.served.get(name)
        revision = workspace.served_revision(name)
        revisions = workspace.revision_list(name)
        promoted = set(workspace.promoted(name))
        return {
            "name": name,
            "info": served.info if served else None,
            "error": host.broken.get(name),
            "revision": revision.number if revision else None,
            "revisions": [
                {
                    "revision": r.number,
                    "promoted_before": r.number in promoted,
                    **{k: r.created.get(k) for k in ("kind", "time", "parent", "note", "job")},
                    "threshold_raw": _threshold_raw(r.path),
                }
                for r in revisions
            ],
            "format": model_format(workspace.models / name),
        }

    @api.get("/studio/api/browse")
    async def browse(root: str = "workspace", path: str = "") -> dict[str, Any]:
        folder = workspace.resolve(root, path)
        if not folder.is_dir():
            raise UserError(f"{root}/{path}: not a folder")
        # a file that is a link out is neither listed nor counted (scoring refuses it)
        entries = [
            p
            for p in sorted(folder.iterdir(), key=lambda p: p.name.lower())
            if workspace.name_of(p) is not None
        ]
        return {
            "root": root,
            "path": path,
            "folders": [p.name for p in entries if p.is_dir() and not p.name.startswith(".")][:500],
            "images": sum(1 for p in entries if p.suffix.lower() in IMAGE_SUFFIXES),
            "files": [p.name for p in entries if p.is_file() and not p.name.startswith(".")][:200],
            # what train would read here (its train/good in the MVTec layout): the page
            # asks for a sample to draw the region on only then
            "trainable": _has_training_images(workspace, folder),
        }

    @api.get("/studio/api/sample")
    async def sample(root: str = "workspace", path: str = "") -> Response:
        """The first training image of a folder as JPEG, to draw a region on; its own
        size in X-Image-Width and X-Image-Height (the region is in its pixels)."""
        folder = workspace.resolve(root, path)
        first = workspace.training_images(folder)[0]
        image = await run_in_threadpool(load_image, first)
        height, width = image.shape[:2]
        return Response(
            jpeg(image, 1024),
            media_type="image/jpeg",
            headers={"x-image-width": str(width), "x-image-height": str(height)},
        )

    return api


def _has_training_images(workspace: Workspace, folder: Path) -> bool:
    try:
        return bool(workspace.training_images(folder))
    except UserError:
        return False


def _threshold_raw(path: Path) -> float | None:
    """A revision directory's image threshold for the model list (None for a file, which
    only its runtime reads, or a directory that does not read)."""
    try:
        return read_card(path).calibration.image_threshold_raw if path.is_dir() else None
    except UserError:
        return None

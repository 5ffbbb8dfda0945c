"""The Review view: folders and dropped images scored, the gallery, pictures and marks."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from cflowad.common.errors import UserError
from cflowad.data.images import IMAGE_SUFFIXES, decode_image
from cflowad.studio.routes.context import Studio
from cflowad.studio.runs import PICTURES
from cflowad.studio.workspace import new_id

__all__ = ["router"]


class _Scoring(BaseModel):
    model: str
    root: str
    path: str = ""


class _Mark(BaseModel):
    run: str
    index: int
    mark: str


def router(studio: Studio) -> APIRouter:
    """The view's routes, on the studio's parts."""
    api = APIRouter()
    workspace, host, runs = studio.workspace, studio.host, studio.runs

    @api.post("/studio/api/runs")
    async def score_folder(body: _Scoring) -> dict[str, Any]:
        host.get_or_error(body.model)
        return await run_in_threadpool(runs.submit, body.model, (body.root, body.path))

    @api.post("/studio/api/uploads")
    async def upload(request: Request, model: str, batch: str = "") -> dict[str, Any]:
        """One dropped image per request (the size limit of serve holds per image); the
        images of one drop go to uploads/BATCH and are scored as one run."""
        host.get_or_error(model)
        if not re.fullmatch(r"[A-Za-z0-9-]{1,64}", batch or "x"):
            raise UserError("batch: letters, digits and '-'")
        form = await request.form(max_files=1, max_fields=4)
        file = form.get("image")
        if file is None or isinstance(file, str):
            raise UserError("multipart body without a file field named 'image'")
        data = await file.read()
        name = Path(file.filename or "image.png").name
        if Path(name).suffix.lower() not in IMAGE_SUFFIXES:
            raise UserError(f"{name}: not an image file ({', '.join(IMAGE_SUFFIXES)})")
        await run_in_threadpool(decode_image, data, name)  # refuse what does not decode
        batch = batch or new_id(workspace.uploads, "drop-")
        folder = workspace.uploads / batch
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
        return {"batch": batch, "saved": name}

    @api.post("/studio/api/uploads/{batch}/score")
    async def score_upload(batch: str, model: str) -> dict[str, Any]:
        return await run_in_threadpool(
            runs.submit, model, ("workspace", f"uploads/{batch}"), f"dropped ({batch})"
        )

    @api.post("/studio/api/runs/{run_id}/cancel")
    async def cancel_run(run_id: str) -> dict[str, Any]:
        return await run_in_threadpool(runs.cancel, run_id)

    @api.get("/studio/api/runs/{run_id}/items")
    async def items(
        run_id: str,
        offset: int = 0,
        limit: int = 60,
        decision: str = "all",
        marked: str = "any",
        low: float | None = None,
        high: float | None = None,
    ) -> dict[str, Any]:
        return await run_in_threadpool(
            _items, run_id, offset, min(max(limit, 1), 500), decision, marked, low, high
        )

    def _items(
        run_id: str,
        offset: int,
        limit: int,
        decision: str,
        marked: str,
        low: float | None,
        high: float | None,
    ) -> dict[str, Any]:
        run = runs.run(run_id)
        marks = workspace.marks(run["model"])
        chosen = []
        for record in runs.records(run_id):
            mark = marks.get(record["image"], {}).get("mark")
            score = record.get("score")
            if decision == "anomalous" and not record.get("anomalous"):
                continue
            if decision == "normal" and (record.get("anomalous") or score is None):
                continue
            if (marked == "marked" and mark is None) or (marked == "unmarked" and mark is not None):
                continue
            if low is not None and (score is None or score < low):
                continue
            if high is not None and (score is None or score > high):
                continue
            chosen.append({**record, "mark": mark})
        chosen.sort(key=_by_score)
        return {
            "run": run,
            "total": len(chosen),
            "offset": offset,
            "items": chosen[offset:][:limit],
        }

    @api.get("/studio/api/runs/{run_id}/pictures/{index}/{kind}")
    async def picture(run_id: str, index: int, kind: str) -> Response:
        if kind not in PICTURES or index < 0:
            return JSONResponse({"error": f"picture kinds: {', '.join(PICTURES)}"}, 404)
        path = runs.folder(run_id) / "pictures" / f"{index:06d}.{kind}.jpg"
        if not path.is_file():
            return JSONResponse({"error": "no such picture"}, 404)
        return FileResponse(
            path, media_type="image/jpeg", headers={"cache-control": "max-age=3600"}
        )

    @api.post("/studio/api/marks")
    async def mark(body: _Mark) -> dict[str, Any]:
        """A mark is on disk (synced) before this answers."""
        run = runs.run(body.run)
        record = next((r for r in runs.records(body.run) if r["index"] == body.index), None)
        if record is None or "score" not in record:
            raise UserError(f"run {body.run} has no scored image {body.index}")
        return await run_in_threadpool(
            workspace.add_mark,
            {
                "image": record["image"],
                "mark": body.mark,
                "model": run["model"],
                "revision": record.get("revision"),
                "score": record["score"],
                "raw_score": record["raw_score"],
                "run": body.run,
                "index": body.index,
            },
        )

    return api


def _by_score(record: dict[str, Any]) -> float:
    """Highest score first; images that did not decode last."""
    score = record.get("score")
    return -float(score) if score is not None else math.inf

"""The Open Inference Protocol (KServe v2, what Triton and OpenVINO Model Server speak)
on ``cflowad serve``: health, metadata and inference under ``/v2``.

Images come as a BYTES tensor of encoded files, one per batch row (shape [N]), or as a
UINT8 tensor of shape [N, H, W, 3]; in JSON or with the binary tensor data extension
(a JSON header of ``Inference-Header-Content-Length`` bytes, then the tensors). In JSON a
BYTES element is base64 text (or ``{"b64": ...}``), since raw image bytes are not text.
Answers: ``score`` (readable, threshold 0.5), ``anomalous``, ``raw_score`` and, when
asked for, ``map`` (FP32 [N, H, W], the readable map at the images' size, which must
then all be the same). Every row is scored through the model's dynamic batcher, the
same path as ``/v1``, so the numbers are the same.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import struct
import time
from datetime import UTC, datetime
from typing import Any

import numpy as np

from cflowad.common.errors import UserError, missing_extra
from cflowad.common.version import __version__
from cflowad.data.images import decode_image
from cflowad.engine.inference import THRESHOLD, ImageResult

try:
    from fastapi import FastAPI, HTTPException, Request
    from fastapi.responses import JSONResponse, Response
    from starlette.concurrency import run_in_threadpool
except ImportError as missing:  # pragma: no cover - depends on the installed extras
    raise missing_extra(
        "cflowad serve", f"the serve extra ({missing.name} is missing)", "serve"
    ) from None

__all__ = ["HEADER_LENGTH", "OUTPUTS", "add_inference_protocol"]

HEADER_LENGTH = "inference-header-content-length"
OUTPUTS = {"score": "FP32", "anomalous": "BOOL", "raw_score": "FP32", "map": "FP32"}
DEFAULT_OUTPUTS = ("score", "anomalous", "raw_score")
_DTYPES = {"FP32": np.dtype("<f4"), "BOOL": np.dtype("?"), "UINT8": np.dtype("u1")}


def add_inference_protocol(app: FastAPI, host: Any) -> None:
    """The /v2 routes on ``app``, answering for ``host``'s models (a ``ServedModels``)."""

    @app.get("/v2", summary="Open Inference Protocol: server metadata.")
    async def server_metadata() -> dict[str, Any]:
        return {"name": "cflowad", "version": __version__, "extensions": ["binary_tensor_data"]}

    @app.get("/v2/health/live", summary="Open Inference Protocol: liveness.")
    async def live() -> dict[str, bool]:
        return {"live": True}

    @app.get("/v2/health/ready", summary="Open Inference Protocol: every model is ready.")
    async def ready() -> JSONResponse:
        return JSONResponse({"ready": host.ready}, 200 if host.ready else 503)

    @app.get("/v2/models/{name}", summary="Open Inference Protocol: a model's inputs and outputs.")
    @app.get("/v2/models/{name}/versions/{version}", include_in_schema=False)
    async def model_metadata(name: str, version: str = "") -> dict[str, Any]:
        served = host.get(name)
        height, width = served.model.image_size
        return {
            "name": name,
            "versions": [str(served.revision)],
            "platform": "cflowad",
            "inputs": [{"name": "image", "datatype": "BYTES", "shape": [-1]}],
            "outputs": [
                {"name": "score", "datatype": "FP32", "shape": [-1]},
                {"name": "anomalous", "datatype": "BOOL", "shape": [-1]},
                {"name": "raw_score", "datatype": "FP32", "shape": [-1]},
                {"name": "map", "datatype": "FP32", "shape": [-1, -1, -1]},
            ],
            "parameters": {
                "image_input": "BYTES [N] encoded image files, or UINT8 [N, H, W, 3] pixels",
                "model_input_size": [height, width],
                "image_threshold": THRESHOLD,
                "map_output": "only when requested; the images must share one size",
            },
        }

    @app.get("/v2/models/{name}/ready", summary="Open Inference Protocol: model readiness.")
    @app.get("/v2/models/{name}/versions/{version}/ready", include_in_schema=False)
    async def model_ready(name: str, version: str = "") -> JSONResponse:
        try:
            host.get(name)
        except HTTPException as error:
            if error.status_code == 404:
                raise
            return JSONResponse({"name": name, "ready": False}, 503)
        return JSONResponse({"name": name, "ready": True})

    @app.post("/v2/models/{name}/infer", summary="Open Inference Protocol: score images.")
    @app.post("/v2/models/{name}/versions/{version}/infer", include_in_schema=False)
    async def infer(name: str, request: Request, version: str = "") -> Response:
        start = time.perf_counter()
        label = name if name in host.sources else "(unknown)"
        status = 500
        try:
            response = await _infer(host, name, request)
            status = 200
            return response
        except HTTPException as error:
            status = error.status_code
            raise
        finally:
            host.metrics.requests.labels(label, str(status)).inc()
            if status == 200:
                host.metrics.latency.labels(label).observe(time.perf_counter() - start)


async def _infer(host: Any, name: str, request: Request) -> Response:
    arrived = datetime.now(UTC).isoformat(timespec="milliseconds")
    served = host.get(name)
    body = await request.body()
    header, binary = _split(body, request.headers.get(HEADER_LENGTH))
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise HTTPException(
            400, "give exactly one input: the images (BYTES [N] or UINT8 [N,H,W,3])"
        )
    images = await run_in_threadpool(_images, inputs[0], binary)
    if not images:
        raise HTTPException(400, "the input holds no images")
    wanted = _wanted(header)
    if any(name == "map" for name, _ in wanted) and len({i.shape[:2] for i in images}) > 1:
        raise HTTPException(400, "the map output needs images of one size")  # before scoring
    futures = [served.batcher.submit(image) for image in images]
    results: list[ImageResult] = list(await asyncio.gather(*futures))
    tensors = await run_in_threadpool(_outputs, results, [w for w, _ in wanted])
    for result, image in zip(results, images, strict=True):
        record = {
            "model": name,
            "revision": served.revision,
            **result.record(),
            "width": image.shape[1],
            "height": image.shape[0],
        }
        await host.scored(served, result, record, arrived)
    answer: dict[str, Any] = {
        "model_name": name,
        "model_version": str(served.revision),
        "outputs": [],
    }
    if "id" in header:
        answer["id"] = header["id"]
    chunks: list[bytes] = []
    for (output, as_binary), tensor in zip(wanted, tensors, strict=True):
        entry: dict[str, Any] = {
            "name": output,
            "datatype": OUTPUTS[output],
            "shape": list(tensor.shape),
        }
        if as_binary:
            data = tensor.astype(_DTYPES[OUTPUTS[output]]).tobytes()
            entry["parameters"] = {"binary_data_size": len(data)}
            chunks.append(data)
        else:
            entry["data"] = tensor.ravel().tolist()
        answer["outputs"].append(entry)
    text = json.dumps(answer).encode()
    if not chunks:
        return Response(text, media_type="application/json")
    return Response(
        text + b"".join(chunks),
        media_type="application/octet-stream",
        headers={"Inference-Header-Content-Length": str(len(text))},
    )


def _split(body: bytes, length: str | None) -> tuple[dict[str, Any], bytes]:
    """The JSON header and the binary tensor data after it."""
    if length is not None:
        if not length.isdigit() or int(length) > len(body):
            raise HTTPException(400, f"bad Inference-Header-Content-Length {length!r}")
        text, binary = body[: int(length)], body[int(length) :]
    else:
        text, binary = body, b""
    try:
        header = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise HTTPException(400, f"the inference request is not JSON ({error})") from None
    if not isinstance(header, dict):
        raise HTTPException(400, "the inference request must be a JSON object")
    return header, binary


def _images(tensor: dict[str, Any], binary: bytes) -> list[np.ndarray]:
    """The input tensor as images: decoded files (BYTES) or pixel arrays (UINT8)."""
    datatype, shape = tensor.get("datatype"), tensor.get("shape")
    if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
        raise HTTPException(400, f"input {tensor.get('name')!r}: shape must be a list of sizes")
    size = (tensor.get("parameters") or {}).get("binary_data_size")
    raw = binary[:size] if size is not None else None
    if size is not None and len(raw or b"") != size:
        raise HTTPException(400, "the binary tensor data is shorter than binary_data_size")
    if datatype == "BYTES":
        files = _bytes_elements(raw) if raw is not None else _json_bytes(tensor.get("data"))
        if len(files) != int(np.prod(shape)):
            raise HTTPException(400, f"shape {shape} but {len(files)} BYTES elements")
        try:
            return [decode_image(f, f"image {i}") for i, f in enumerate(files)]
        except UserError as error:
            raise HTTPException(400, str(error)) from None
    if datatype == "UINT8":
        if len(shape) != 4 or shape[3] != 3:
            raise HTTPException(400, f"a UINT8 input has shape [N, H, W, 3], not {shape}")
        if raw is not None:
            pixels = np.frombuffer(raw, np.uint8).copy()  # writable, for torch
        else:
            pixels = np.asarray(tensor.get("data"), dtype=np.uint8).ravel()
        if pixels.size != int(np.prod(shape)):
            raise HTTPException(400, f"shape {shape} but {pixels.size} UINT8 values")
        return list(pixels.reshape(shape))
    raise HTTPException(400, f"input datatype {datatype!r}: use BYTES (image files) or UINT8")


def _bytes_elements(raw: bytes) -> list[bytes]:
    """BYTES in the binary extension: each element a 4-byte little-endian length, then it."""
    elements, at = [], 0
    while at < len(raw):
        if at + 4 > len(raw):
            raise HTTPException(400, "truncated BYTES tensor")
        (length,) = struct.unpack_from("<I", raw, at)
        elements.append(raw[at + 4 : at + 4 + length])
        at += 4 + length
    if at != len(raw):
        raise HTTPException(400, "truncated BYTES tensor")
    return elements


def _json_bytes(data: Any) -> list[bytes]:
    if not isinstance(data, list):
        raise HTTPException(400, "a BYTES input needs 'data' (base64 strings) or binary data")
    elements = []
    for item in np.asarray(data, dtype=object).ravel():
        text = item.get("b64") if isinstance(item, dict) else item
        try:
            elements.append(base64.b64decode(str(text), validate=True))
        except (binascii.Error, ValueError):
            raise HTTPException(
                400, "BYTES elements in JSON are base64 text: send files as binary data"
            ) from None
    return elements


def _wanted(header: dict[str, Any]) -> list[tuple[str, bool]]:
    """The outputs asked for, each with whether it goes back as binary data."""
    default_binary = bool((header.get("parameters") or {}).get("binary_data_output", False))
    requested = header.get("outputs")
    if not requested:
        return [(name, default_binary) for name in DEFAULT_OUTPUTS]
    wanted = []
    for output in requested:
        name = output.get("name") if isinstance(output, dict) else None
        if name not in OUTPUTS:
            raise HTTPException(400, f"unknown output {name!r}; outputs: {', '.join(OUTPUTS)}")
        binary = (output.get("parameters") or {}).get("binary_data", default_binary)
        wanted.append((name, bool(binary)))
    return wanted


def _outputs(results: list[ImageResult], names: list[str]) -> list[np.ndarray]:
    tensors = []
    for name in names:
        if name == "map":
            tensors.append(np.stack([r.anomaly_map.astype(np.float32) for r in results]))
        elif name == "anomalous":
            tensors.append(np.array([r.anomalous for r in results], dtype=bool))
        else:
            values = [r.score if name == "score" else r.raw_score for r in results]
            tensors.append(np.array(values, dtype=np.float32))
    return tensors

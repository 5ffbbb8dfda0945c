"""``cflowad loadtest``: a closed-loop load generator for ``cflowad serve``.

C clients each send one image, wait for the answer, and send the next, for a fixed
time (and at most a fixed number of requests): requests/s and latency percentiles at
each concurrency, and every error counted by kind. Needs httpx (the serve extra).

Latency is the client's clock. Beside it come the percentiles of the ``latency_ms``
the server reports in each answer (request read to answer ready): on a small
machine the generator shares the cores with the server, and the difference says
how much of the client's figure is the client and the connection (on 2 cores,
about 3 ms at concurrency 1, docs/benchmarks.md).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cflowad.common.errors import UserError, missing_extra

__all__ = ["CONTENT_TYPES", "run_loadtest"]

CONTENT_TYPES = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".bmp": "image/bmp",
    ".tif": "image/tiff",
    ".tiff": "image/tiff",
    ".webp": "image/webp",
}


def run_loadtest(
    url: str,
    model: str,
    images: Sequence[Path],
    concurrency: Sequence[int],
    duration: float,
    max_requests: int = 100_000,
    api_key: str | None = None,
    on_level: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """One result per concurrency: requests, ok, errors (by status or exception), requests/s,
    p50 / p95 / p99 latency in ms of the successful requests, and p50 / p99 of the
    server's own ``latency_ms`` for them.

    Args:
        url: the server, e.g. ``http://127.0.0.1:8000``.
        model: the served model's name.
        images: files sent in turn (their bytes, with a content type from the suffix).
        concurrency: client counts, run one after the other.
        duration: seconds per concurrency.
        max_requests: stop a level early after this many requests.
        api_key: sent as ``Authorization: Bearer``.
        on_level: called with each level's result as it finishes (progress).
    """
    try:
        import httpx
    except ImportError:
        raise missing_extra("cflowad loadtest", "httpx", "serve") from None
    if not images:
        raise UserError("loadtest: give at least one image file")
    if duration <= 0 or max_requests < 1 or any(c < 1 for c in concurrency):
        raise UserError("loadtest: --duration, --max-requests and --concurrency must be positive")
    bodies = []
    for image in images:
        if not image.is_file():
            raise UserError(f"{image}: file not found")
        content_type = CONTENT_TYPES.get(image.suffix.lower(), "application/octet-stream")
        bodies.append((image.read_bytes(), content_type))
    endpoint = f"{url.rstrip('/')}/v1/models/{model}/predict"
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}

    async def level(client: httpx.AsyncClient, clients: int) -> dict[str, Any]:
        latencies: list[float] = []
        server_ms: list[float] = []
        errors: Counter[str] = Counter()
        sent = 0
        deadline = time.perf_counter() + duration

        async def client_loop(first: int) -> None:
            nonlocal sent
            index = first
            while time.perf_counter() < deadline and sent < max_requests:
                sent += 1
                body, content_type = bodies[index % len(bodies)]
                index += clients
                start = time.perf_counter()
                try:
                    response = await client.post(
                        endpoint, content=body, headers={**headers, "content-type": content_type}
                    )
                except httpx.HTTPError as error:
                    errors[type(error).__name__] += 1
                    continue
                if response.status_code == 200:
                    latencies.append(time.perf_counter() - start)
                    served = response.json().get("latency_ms")
                    if isinstance(served, (int, float)):
                        server_ms.append(served)
                else:
                    errors[str(response.status_code)] += 1

        start, cpu = time.perf_counter(), time.process_time()
        await asyncio.gather(*(client_loop(i) for i in range(clients)))
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
        ms = np.array(latencies) * 1000 if latencies else np.array([np.nan])
        result = {
            "concurrency": clients,
            "seconds": round(elapsed, 2),
            "requests": sent,
            "ok": len(latencies),
            "errors": dict(errors),
            "requests_per_second": round(len(latencies) / elapsed, 2),
            **{f"p{q}_ms": round(float(np.percentile(ms, q)), 2) for q in (50, 95, 99)},
            # None from a server that does not report latency_ms (a proxy in between)
            **{
                f"server_p{q}_ms": round(float(np.percentile(server_ms, q)), 2)
                if server_ms
                else None
                for q in (50, 99)
            },
            # on a small machine the generator competes with the server: say how much
            "client_cpu_ms_per_request": round(1000 * cpu / max(sent, 1), 2),
        }
        if on_level is not None:
            on_level(result)
        return result

    async def main() -> list[dict[str, Any]]:
        limits = httpx.Limits(max_connections=max(concurrency))
        async with httpx.AsyncClient(limits=limits, timeout=60.0) as client:
            await _check(client, endpoint, bodies[0], headers)
            return [await level(client, clients) for clients in concurrency]

    return asyncio.run(main())


async def _check(
    client: Any, endpoint: str, body: tuple[bytes, str], headers: dict[str, str]
) -> None:
    """One request first: an unreachable server or a wrong model is one clear line."""
    import httpx

    try:
        response = await client.post(
            endpoint, content=body[0], headers={**headers, "content-type": body[1]}
        )
    except httpx.HTTPError as error:
        raise UserError(
            f"{endpoint}: cannot reach the server ({error or type(error).__name__})"
        ) from None
    if response.status_code != 200:
        try:
            message = response.json().get("error", response.text)
        except ValueError:
            message = response.text[:200]
        raise UserError(f"{endpoint}: HTTP {response.status_code}: {message}")

"""``cflowad serve`` and ``cflowad loadtest``: the HTTP server, and load on it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from cflowad.cli.options import (
    Device,
    DriftWindow,
    Publish,
    PublishCaFile,
    PublishCertFile,
    PublishHmacKeyFile,
    PublishPasswordFile,
    PublishWhat,
    Quiet,
    SpoolMaxMb,
    Threads,
    check_port,
    comma_separated,
    image_files,
    publish_settings,
    read_api_key,
    summary_table,
    use_threads,
)
from cflowad.common.progress import Reporter
from cflowad.data.files import replace_file
from cflowad.engine.catalog import find_models
from cflowad.line.drift import DriftSettings
from cflowad.line.settings import ServeSettings

__all__ = ["loadtest", "serve"]

_SERVE = ServeSettings()  # serve's defaults, one source for the command and the server


def serve(
    models: Annotated[
        Path,
        typer.Argument(
            help="A model directory, an ONNX file from cflowad export, or a folder of them; "
            "each is served under its folder or file name."
        ),
    ],
    host: Annotated[
        str, typer.Option(help="Address to listen on (0.0.0.0: every interface).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    max_batch: Annotated[
        int, typer.Option(help="Most images of one model scored in one forward pass.")
    ] = _SERVE.max_batch,
    max_wait_ms: Annotated[
        float,
        typer.Option(help="Longest a batch waits for requests still arriving, in ms."),
    ] = _SERVE.max_wait_ms,
    threads: Threads = None,
    workers: Annotated[
        int,
        typer.Option(
            help="Batches scored at once, sharing --threads: 1 answers a lone request "
            "soonest, 2 or more give more requests/s under load (docs/benchmarks.md)."
        ),
    ] = _SERVE.workers,
    api_key_file: Annotated[
        Path | None,
        typer.Option(
            help="File holding the API key: every endpoint but /healthz then needs "
            "'Authorization: Bearer <key>'."
        ),
    ] = None,
    max_image_mb: Annotated[
        float, typer.Option(help="Largest upload accepted, in MB.")
    ] = _SERVE.max_image_mb,
    device: Device = "auto",
    reload_every: Annotated[
        float,
        typer.Option(
            help="Seconds between checks of the model files: a model whose files changed is "
            "reloaded, and one copied into a MODELS folder is served (0: only on SIGHUP or "
            "POST /v1/models/NAME/reload)."
        ),
    ] = _SERVE.follow_seconds,
    drift_window: DriftWindow = _SERVE.drift.window,
    publish: Publish = None,
    publish_what: PublishWhat = _SERVE.publish.what,
    publish_password_file: PublishPasswordFile = None,
    publish_hmac_key_file: PublishHmacKeyFile = None,
    publish_ca_file: PublishCaFile = None,
    publish_cert_file: PublishCertFile = None,
    spool: Annotated[
        Path | None,
        typer.Option(
            help="Folder where --publish messages wait until delivered (kept across restarts)."
        ),
    ] = None,
    spool_max_mb: SpoolMaxMb = _SERVE.publish.spool_max_mb,
) -> None:
    """Score images over HTTP: POST /v1/models/NAME/predict, with probes, metrics and reloads.

    Needs the serve extra (pip install 'cflowad[serve]'). The OpenAPI page is at
    /docs. A model replaced on disk (a new threshold saved in cflowad studio, a new
    training) is served within --reload-every seconds; the old one answers until the
    new one is warm, and a broken file is refused with the old one serving on.
    """
    settings = ServeSettings(
        max_batch=max_batch,
        max_wait_ms=max_wait_ms,
        max_image_mb=max_image_mb,
        workers=workers,
        api_key=read_api_key(api_key_file),
        device=device,
        follow_seconds=reload_every,
        drift=DriftSettings(window=drift_window),
        publish=publish_settings(
            publish,
            publish_what,
            publish_password_file,
            publish_hmac_key_file,
            publish_ca_file,
            publish_cert_file,
            spool_max_mb,
        ),
        spool=spool,
    )
    sources = find_models(models)
    use_threads(threads, sources.values(), workers)
    from cflowad.line.server import create_app, run_server

    app_ = create_app(models, settings)
    check_port(host, port)
    run_server(app_, host, port)


def loadtest(
    url: Annotated[str, typer.Argument(help="The server, e.g. http://127.0.0.1:8000.")],
    images: Annotated[list[Path], typer.Argument(help="Image files, sent in turn.")],
    model: Annotated[str, typer.Option("--model", help="Name of the served model.")],
    concurrency: Annotated[
        str, typer.Option(help="Concurrent clients, comma-separated; run one after another.")
    ] = "1,4,16",
    duration: Annotated[float, typer.Option(help="Seconds per concurrency.")] = 20.0,
    max_requests: Annotated[
        int, typer.Option(help="Stop a concurrency early after this many requests.")
    ] = 100_000,
    json_file: Annotated[
        Path | None, typer.Option("--json", help="Write the results to this JSON file.")
    ] = None,
    api_key_file: Annotated[
        Path | None, typer.Option(help="File holding the server's API key.")
    ] = None,
    quiet: Quiet = False,
) -> None:
    """Closed-loop load on cflowad serve: requests/s, p50/p95/p99 latency and errors.

    Latency is the client's clock; the server's own (its answers' latency_ms) is
    beside it, so a client that shares the cores shows up as the difference.
    """
    from cflowad.line.loadtest import run_loadtest

    levels = list(comma_separated(concurrency, "concurrency", int, "1,4,16"))
    reporter = Reporter(enabled=not quiet)
    reporter.log(f"load on {url} model {model}: concurrency {levels}, {duration:g} s each")
    results = run_loadtest(
        url,
        model,
        image_files(images),
        levels,
        duration,
        max_requests=max_requests,
        api_key=read_api_key(api_key_file),
        on_level=lambda r: reporter.log(
            f"concurrency {r['concurrency']}: {r['requests_per_second']:.1f} requests/s, "
            f"p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms, "
            f"{sum(r['errors'].values())} errors"
        ),
    )
    if json_file is not None:
        replace_file(
            json_file, json.dumps({"url": url, "model": model, "levels": results}, indent=2)
        )
    summary_table(
        [
            (
                f"concurrency {r['concurrency']}",
                f"{r['requests_per_second']:.1f} req/s, p50 {r['p50_ms']:.1f} / p95 "
                f"{r['p95_ms']:.1f} / p99 {r['p99_ms']:.1f} ms{_server_part(r)}, {r['ok']} ok, "
                f"errors {r['errors'] or 0}",
            )
            for r in results
        ],
        quiet,
    )
    if any(r["errors"] for r in results):
        raise typer.Exit(1)


def _server_part(level: dict[str, Any]) -> str:
    served = level["server_p50_ms"]
    return "" if served is None else f" (server's own p50 {served:.1f} ms)"

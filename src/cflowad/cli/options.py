"""Options and helpers shared by several commands: one definition of each."""

from __future__ import annotations

import dataclasses
import inspect
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from cflowad.common.errors import UserError
from cflowad.data.images import list_images, readable
from cflowad.engine.catalog import is_exported
from cflowad.line.publish import Publisher
from cflowad.line.sinks import PublishSettings
from cflowad.method.config import (
    Config,
    comma_separated,
    field_type,
    option_default,
)

__all__ = [
    "DEFAULTS",
    "Device",
    "DriftWindow",
    "Publish",
    "PublishCaFile",
    "PublishCertFile",
    "PublishHmacKeyFile",
    "PublishPasswordFile",
    "PublishWhat",
    "Quiet",
    "RayAddress",
    "SkipBad",
    "SpoolMaxMb",
    "Threads",
    "check_port",
    "comma_separated",
    "image_files",
    "keep_readable",
    "publish_settings",
    "publishing_rows",
    "read_api_key",
    "skipped",
    "summary_table",
    "use_threads",
    "with_config_options",
]

DEFAULTS = Config()  # every option's default comes from Config


def with_config_options(command: Callable[..., None]) -> Callable[..., None]:
    """Give ``command`` an option for every :class:`Config` field, after its ``--config``
    option: flags, help and default from the field's metadata (the one source of each
    training option), taken by the command as ``**options``."""
    signature = inspect.signature(command, eval_str=True)
    params = [p for p in signature.parameters.values() if p.kind is not p.VAR_KEYWORD]
    at = [p.name for p in params].index("config_file") + 1
    generated = [_config_parameter(spec) for spec in dataclasses.fields(Config)]
    command.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[*params[:at], *generated, *params[at:]]
    )
    return command


def _config_parameter(spec: dataclasses.Field[Any]) -> inspect.Parameter:
    meta, default = spec.metadata, option_default(spec.name)
    kind = meta["kind"]
    text: type = Path if kind == "path" else str if kind != "plain" else field_type(spec.name)
    value: Any = text | None if default is None else text
    option = typer.Option(*meta["flags"], help=meta["help"])
    annotation = Annotated[value, option]
    return inspect.Parameter(
        spec.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default, annotation=annotation
    )


Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")]
SkipBad = Annotated[
    bool,
    typer.Option("--skip-bad", help="Warn about unreadable image files and go on without them."),
]
Device = Annotated[str, typer.Option(help="auto (CUDA when present), cpu, cuda or cuda:N.")]
Threads = Annotated[
    int | None,
    typer.Option(
        help="Threads (default: all cores); ONNX files run in ONNX Runtime on them. "
        "For throughput, run one process per core with --threads 1."
    ),
]
DriftWindow = Annotated[
    int,
    typer.Option(
        help="Drift alarm: compare the median raw score of the last N images with the "
        "model's held-out good ones; trips and clears are logged (and in /metrics or "
        "OUT/drift.jsonl). 0 turns it off."
    ),
]
Publish = Annotated[
    list[str] | None,
    typer.Option(
        help="Send decisions and events to mqtt://[user@]host[:port]/topic, mqtts://... "
        "(QoS 1; the topic may hold {model} and {kind}) or an http(s):// webhook (a JSON "
        "POST each). Repeatable. At least once, through a spool on disk.",
        show_default=False,
    ),
]
PublishWhat = Annotated[
    str,
    typer.Option(
        help="all: every decision and event; anomalous: anomalous decisions and events; "
        "events: drift alarms, stream events and rejected files only."
    ),
]
PublishPasswordFile = Annotated[
    Path | None,
    typer.Option(help="File with the password of the user in --publish URLs (MQTT or HTTP)."),
]
PublishHmacKeyFile = Annotated[
    Path | None,
    typer.Option(
        help="File with a key: webhooks get X-Cflowad-Signature: sha256=HMAC-SHA256(body)."
    ),
]
PublishCaFile = Annotated[
    Path | None,
    typer.Option(help="CA certificates (PEM) to check mqtts:// and https:// servers with."),
]
PublishCertFile = Annotated[
    Path | None,
    typer.Option(help="Client certificate with its key (PEM) for mqtts:// and https://."),
]
SpoolMaxMb = Annotated[
    float,
    typer.Option(
        help="Bound of the spool on disk (shared by the destinations): past it, the oldest "
        "messages are dropped, with a warning and a metric."
    ),
]
RayAddress = Annotated[
    str | None,
    typer.Option(help="Ray cluster to join with --engine ray (default: a local one)."),
]

skipped: list[str] = []  # files skipped by --skip-bad in this run; main() counts them at the end


def use_threads(threads: int | None, scoring: Iterable[Path] = (), workers: int = 1) -> None:
    """Set the threads (default: torch's count at start, all cores), shared with ONNX
    Runtime when every model the command scores is an ONNX file
    (:func:`cflowad.engine.threads.share_threads`, which checks --threads and --workers)."""
    from cflowad.engine.threads import share_threads

    models = list(scoring)
    share_threads(threads, bool(models) and all(is_exported(m) for m in models), workers)


def keep_readable(files: list[Path]) -> list[int]:
    """Indices of the files that decode; a warning per other file and a count (--skip-bad)."""
    keep, errors = readable(files)
    for error in errors:
        print(f"cflowad: warning: skipped {error}", file=sys.stderr)
    skipped.extend(errors)
    if not keep:
        raise UserError(f"none of the {len(files)} image files could be read")
    return keep


def image_files(items: list[Path]) -> list[Path]:
    """Files given, with folders expanded to their images; missing files are user errors."""
    files: list[Path] = []
    for item in items:
        files.extend(list_images(item) if item.is_dir() else [item])
    for file in files:
        if not file.is_file():
            raise UserError(f"{file}: file not found")
    return files


def summary_table(rows: list[tuple[str, str]], quiet: bool) -> None:
    """A command's closing summary: one row per (name, value), unless --quiet."""
    if quiet:
        return
    table = Table(show_header=False, box=None)
    for key, value in rows:
        table.add_row(key, value)
    Console(highlight=False).print(table)


def read_api_key(path: Path | None) -> str | None:
    """The key in --api-key-file: one word, or a one-line error naming the option."""
    if path is None:
        return None
    if not path.is_file():
        raise UserError(f"option --api-key-file={path}: file not found")
    key = path.read_text().strip()
    if not key or any(c.isspace() for c in key):
        raise UserError(f"option --api-key-file={path}: the key must be one word, not empty")
    return key


def check_port(host: str, port: int) -> None:
    """One clear line for a port that is taken or an address that is not ours."""
    import socket

    if not 0 <= port <= 65535:
        raise UserError(f"option --port={port} must be 0 to 65535")
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as error:
        raise UserError(
            f"options --host={host} --port={port}: cannot listen there ({error.strerror})"
        ) from None


def publish_settings(
    urls: list[str] | None,
    what: str,
    password_file: Path | None,
    hmac_key_file: Path | None,
    ca_file: Path | None,
    cert_file: Path | None,
    spool_max_mb: float,
) -> PublishSettings:
    """The ``--publish`` options, checked (a bad URL or missing file is a one-line error)."""
    return PublishSettings(
        urls=tuple(urls or ()),
        what=what,
        password_file=password_file,
        hmac_key_file=hmac_key_file,
        ca_file=ca_file,
        cert_file=cert_file,
        spool_max_mb=spool_max_mb,
    )


def publishing_rows(publisher: Publisher | None) -> list[tuple[str, str]]:
    """Stop publishing (waiting a few seconds for the spools to empty); the summary's rows."""
    if publisher is None:
        return []
    left = publisher.close()
    rows = [
        (
            f"published to {s['destination']}",
            f"{s['published']} of {s['spooled']} (retried {s['retried']}, dropped "
            f"{s['dropped']}, refused {s['refused']})",
        )
        for s in publisher.stats()
    ]
    if left:
        rows.append(("spool", f"{left} messages wait in {publisher.spool}: sent on the next start"))
    return rows

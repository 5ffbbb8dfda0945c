"""``cflowad studio``: the inspection loop on a local web page, over a workspace folder."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated

import typer

from cflowad.cli.options import (
    Device,
    Publish,
    PublishCaFile,
    PublishCertFile,
    PublishHmacKeyFile,
    PublishPasswordFile,
    PublishWhat,
    SpoolMaxMb,
    Threads,
    check_port,
    publish_settings,
    read_api_key,
    use_threads,
)
from cflowad.common.errors import UserError
from cflowad.line.settings import ServeSettings

__all__ = ["studio"]

_SERVE = ServeSettings()


def studio(
    workspace: Annotated[
        Path,
        typer.Argument(
            help="The studio's folder: models, revisions, scored runs and marks live there as "
            "files. A missing or empty folder starts a new workspace; an existing one resumes."
        ),
    ],
    host: Annotated[
        str,
        typer.Option(help="Address to listen on; any but loopback needs --api-key-file."),
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8080,
    api_key_file: Annotated[
        Path | None,
        typer.Option(
            help="File holding the API key: the page then asks for it once (a login cookie), "
            "the API takes 'Authorization: Bearer <key>'."
        ),
    ] = None,
    allow: Annotated[
        list[Path] | None,
        typer.Option(
            help="A folder the page may read images from (training, scoring, hot folders), "
            "besides WORKSPACE; repeat for more."
        ),
    ] = None,
    max_image_mb: Annotated[
        float, typer.Option(help="Largest image upload accepted, in MB.")
    ] = _SERVE.max_image_mb,
    threads: Threads = None,
    device: Device = "auto",
    publish: Publish = None,
    publish_what: PublishWhat = _SERVE.publish.what,
    publish_password_file: PublishPasswordFile = None,
    publish_hmac_key_file: PublishHmacKeyFile = None,
    publish_ca_file: PublishCaFile = None,
    publish_cert_file: PublishCertFile = None,
    spool_max_mb: SpoolMaxMb = _SERVE.publish.spool_max_mb,
) -> None:
    """Train, review, set the threshold, mark false alarms, retrain and promote, and watch
    live sources, on one local page (http://127.0.0.1:8080/studio).

    Needs the studio extra (pip install 'cflowad[studio]'). The same process answers
    cflowad serve's /v1 API for the workspace's models. With --publish, live sources
    and API answers go to MQTT or webhooks through WORKSPACE/spool.
    """
    key = read_api_key(api_key_file)
    if key is None and not _loopback(host):
        raise UserError(f"option --host={host}: listening beyond this machine needs --api-key-file")
    from cflowad.studio.workspace import Workspace

    opened = Workspace(workspace, allow or []).open()
    use_threads(threads)
    from cflowad.line.server import run_server
    from cflowad.studio.app import StudioSettings, create_studio

    sinks = publish_settings(
        publish,
        publish_what,
        publish_password_file,
        publish_hmac_key_file,
        publish_ca_file,
        publish_cert_file,
        spool_max_mb,
    )
    settings = StudioSettings(
        serve=ServeSettings(
            max_image_mb=max_image_mb,
            api_key=key,
            device=device,
            publish=sinks,
            spool=opened.root / "spool",
        )
    )
    app = create_studio(opened, settings)
    check_port(host, port)
    print(f"cflowad studio: http://{host}:{port}/studio  (workspace {opened.root})")
    run_server(app, host, port, graceful_seconds=5)  # an open tab's event streams


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False

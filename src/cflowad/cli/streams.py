"""``cflowad watch`` and ``cflowad stream``: hot folders and video, scored as they arrive."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import numpy as np
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
    publish_settings,
    publishing_rows,
    summary_table,
    use_threads,
)
from cflowad.common.progress import Reporter
from cflowad.data.files import refuse_foreign
from cflowad.engine.loading import load
from cflowad.line.drift import DriftSettings
from cflowad.line.publish import SPOOL, Publisher
from cflowad.line.sinks import PublishSettings
from cflowad.line.watch import REJECT_AFTER, SETTLE, is_watch_output, watch_folder

__all__ = ["stream", "watch"]

_DRIFT = DriftSettings()  # the alarm's defaults, one source
_PUBLISH = PublishSettings()


def watch(
    model_dir: Annotated[
        Path, typer.Argument(help="A model directory, or an ONNX file from cflowad export.")
    ],
    inbox: Annotated[Path, typer.Argument(help="The hot folder the camera writes images into.")],
    out: Annotated[
        Path, typer.Option("--out", help="Folder for results.jsonl, maps, rejected and done.")
    ],
    move_done: Annotated[
        bool, typer.Option("--move-done", help="Move each scored image to OUT/done.")
    ] = False,
    pictures: Annotated[
        bool, typer.Option("--pictures", help="Also write OUT/pictures/<name>.png.")
    ] = False,
    settle: Annotated[
        float,
        typer.Option(
            help="Seconds a file must stop changing before it is read (a file its writer "
            "closed is read at once where inotify tells)."
        ),
    ] = SETTLE,
    reject_after: Annotated[
        float,
        typer.Option(
            help="Seconds a file that does not decode must stay unchanged before it moves "
            "to OUT/rejected (until then it may still be being written, e.g. on a slow share)."
        ),
    ] = REJECT_AFTER,
    batch_size: Annotated[int, typer.Option(help="Files ready together, scored together.")] = 8,
    poll: Annotated[
        bool, typer.Option("--poll", help="Watch by polling (network shares; no inotify).")
    ] = False,
    once: Annotated[
        bool, typer.Option("--once", help="Score what is in INBOX now, then exit.")
    ] = False,
    calibrate_images: Annotated[
        int,
        typer.Option(
            help="The first N images to arrive are good: refit the thresholds on them (this "
            "camera's light and codec), save OUT/model with OUT/calibration.json, and decide "
            "the rest with it (a restart keeps it). A model directory only."
        ),
    ] = 0,
    drift_window: DriftWindow = _DRIFT.window,
    publish: Publish = None,
    publish_what: PublishWhat = _PUBLISH.what,
    publish_password_file: PublishPasswordFile = None,
    publish_hmac_key_file: PublishHmacKeyFile = None,
    publish_ca_file: PublishCaFile = None,
    publish_cert_file: PublishCertFile = None,
    spool_max_mb: SpoolMaxMb = _PUBLISH.spool_max_mb,
    device: Device = "auto",
    threads: Threads = None,
    quiet: Quiet = False,
) -> None:
    """Score every image that arrives in INBOX exactly once; Ctrl-C stops.

    OUT/results.jsonl is the journal: a restart (even after kill -9) neither loses
    nor rescores a file. Files that stay unreadable for --reject-after seconds move to
    OUT/rejected with the reason.
    Needs the stream extra (pip install 'cflowad[stream]').
    """
    import threading

    use_threads(threads, [model_dir])
    refuse_foreign(out, is_watch_output)  # before loading the model
    sinks = publish_settings(
        publish,
        publish_what,
        publish_password_file,
        publish_hmac_key_file,
        publish_ca_file,
        publish_cert_file,
        spool_max_mb,
    )
    reporter = Reporter(enabled=not quiet)
    model = load(model_dir, device)
    publisher = Publisher(sinks, out / SPOOL, "watch", reporter.warn) if sinks.urls else None
    reporter.log(f"watching {inbox} (Ctrl-C stops); records in {out / 'results.jsonl'}")
    stop = threading.Event()
    try:
        summary = watch_folder(
            model,
            inbox,
            out,
            move_done=move_done,
            pictures=pictures,
            settle=settle,
            reject_after=reject_after,
            batch_size=batch_size,
            poll=poll,
            once=once,
            calibrate_images=calibrate_images,
            drift=DriftSettings(window=drift_window),
            stop=stop,
            reporter=reporter,
            publisher=publisher,
            model_name=_name(model_dir),
        )
    except KeyboardInterrupt:
        publishing_rows(publisher)
        raise typer.Exit(0) from None
    delays = np.array(summary.delays or [np.nan]) * 1000
    summary_table(
        [
            ("scored", str(summary.scored)),
            ("anomalous", f"{summary.anomalous} (score above 0.5)"),
            ("rejected", f"{summary.rejected} (see {out / 'rejected'})"),
            (
                "arrival to record",
                f"p50 {np.percentile(delays, 50):.0f} ms, p99 {np.percentile(delays, 99):.0f} ms",
            ),
            *publishing_rows(publisher),
        ],
        quiet,
    )


def stream(
    model_dir: Annotated[
        Path, typer.Argument(help="A model directory, or an ONNX file from cflowad export.")
    ],
    source: Annotated[
        str,
        typer.Argument(
            help="A video file, a camera index (0 is /dev/video0), or an rtsp:// or http:// URL."
        ),
    ],
    out: Annotated[
        Path, typer.Option("--out", help="Folder for frames.jsonl, events.jsonl, pictures.")
    ],
    every: Annotated[int, typer.Option(help="Score every N-th frame.")] = 1,
    roi: Annotated[
        str | None,
        typer.Option(help="Score only this region, x,y,w,h in pixels; maps go back in place."),
    ] = None,
    debounce: Annotated[
        int, typer.Option(help="An event needs this many anomalous frames in a row.")
    ] = 1,
    live: Annotated[
        bool,
        typer.Option(
            "--live",
            help="When scoring falls behind, skip to the newest frame (dropped frames are "
            "counted), so latency stays bounded; files are then played at their frame rate.",
        ),
    ] = False,
    video_out: Annotated[
        Path | None,
        typer.Option(help="Write the scored frames with heat map, outline and score (.mp4)."),
    ] = None,
    save_anomalous: Annotated[
        bool, typer.Option("--save-anomalous", help="PNGs of anomalous frames in OUT/anomalous.")
    ] = False,
    batch_size: Annotated[int, typer.Option(help="Frames scored together (not with --live).")] = 8,
    retries: Annotated[
        int, typer.Option(help="Reconnects of a camera or network stream that breaks.")
    ] = 3,
    calibrate_frames: Annotated[
        int,
        typer.Option(
            help="The first N scored frames are good: refit the thresholds on them (the "
            "camera's codec and light, not the training photos'), save the model as "
            "OUT/model with OUT/calibration.json, and score the rest with it. A model "
            "directory only."
        ),
    ] = 0,
    drift_window: DriftWindow = _DRIFT.window,
    publish: Publish = None,
    publish_what: PublishWhat = _PUBLISH.what,
    publish_password_file: PublishPasswordFile = None,
    publish_hmac_key_file: PublishHmacKeyFile = None,
    publish_ca_file: PublishCaFile = None,
    publish_cert_file: PublishCertFile = None,
    spool_max_mb: SpoolMaxMb = _PUBLISH.spool_max_mb,
    device: Device = "auto",
    threads: Threads = None,
    quiet: Quiet = False,
) -> None:
    """Score a video, a camera or a network stream frame by frame: OUT/frames.jsonl as it goes.

    Needs the stream extra (pip install 'cflowad[stream]').
    """
    from cflowad.line.stream import is_stream_output, parse_roi, stream_video

    use_threads(threads, [model_dir])
    region = parse_roi(roi)
    refuse_foreign(out, is_stream_output)  # before loading the model
    sinks = publish_settings(
        publish,
        publish_what,
        publish_password_file,
        publish_hmac_key_file,
        publish_ca_file,
        publish_cert_file,
        spool_max_mb,
    )
    reporter = Reporter(enabled=not quiet)
    model = load(model_dir, device)
    publisher = Publisher(sinks, out / SPOOL, "stream", reporter.warn) if sinks.urls else None
    reporter.log(f"scoring {source}{' live' if live else ''}; frames in {out / 'frames.jsonl'}")
    try:
        summary = stream_video(
            model,
            source,
            out,
            every=every,
            roi=region,
            debounce=debounce,
            live=live,
            video_out=video_out,
            save_anomalous=save_anomalous,
            batch_size=batch_size,
            retries=retries,
            reporter=reporter,
            calibrate_frames=calibrate_frames,
            drift=DriftSettings(window=drift_window),
            publisher=publisher,
            model_name=_name(model_dir),
        )
    finally:
        rows = publishing_rows(publisher)
    latencies = np.percentile(np.array(summary.latencies_ms or [np.nan]), [50, 99])
    summary_table(
        [
            (
                "frames",
                f"{summary.scored} scored of {summary.decoded} decoded, "
                f"{summary.scored / max(summary.seconds, 1e-9):.1f}/s",
            ),
            ("dropped", f"{summary.dropped} (--live)"),
            ("anomalous", f"{summary.anomalous} frames, {summary.events} events"),
            (
                "latency",
                f"p50 {latencies[0]:.0f} ms, p99 {latencies[1]:.0f} ms",
            ),
            *rows,
        ],
        quiet,
    )


def _name(model: Path) -> str:
    """A model's name in published messages: its folder's name, or its ONNX file's stem."""
    return model.stem if model.suffix.lower() == ".onnx" else model.name

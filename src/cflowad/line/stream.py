"""``cflowad stream``: score the frames of a video file, a camera or a network stream.

Frames are decoded by PyAV (FFmpeg) and scored by the model's inference engine. A
file is scored frame by frame in batches (every frame unless ``every`` says
otherwise). With ``live``, a reader thread keeps only the newest frame: when
scoring falls behind, older frames are dropped and counted, so the delay from a
frame's arrival to its score stays bounded; a file played live is paced by its
timestamps, as a camera would deliver it.

Outputs in ``OUT``: ``frames.jsonl`` (one line per scored frame, flushed as it is
written), ``events.jsonl`` (runs of at least ``debounce`` anomalous frames),
``anomalous/`` (PNGs with ``save_anomalous``) and the annotated video.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from cflowad.common.errors import UserError, missing_extra
from cflowad.common.progress import Reporter
from cflowad.data.files import refuse_foreign
from cflowad.engine.inference import ImageResult, Predictor
from cflowad.line.decide import Decisions
from cflowad.line.drift import DriftSettings
from cflowad.line.publish import SPOOL, Publisher
from cflowad.line.watch import OnResult

__all__ = ["Frame", "StreamSummary", "is_stream_output", "parse_roi", "stream_video"]

Roi = tuple[int, int, int, int]  # x, y, width, height in pixels
HEALTHY_SECONDS = 60.0  # a source that ran this long after a reconnect gets fresh retries
NETWORK = ("rtsp://", "rtsps://", "http://", "https://", "rtmp://", "udp://", "tcp://")


@dataclass(frozen=True)
class Frame:
    """One decoded frame: its index in the source, timestamp, pixels and arrival time."""

    index: int
    pts_seconds: float | None
    rgb: np.ndarray  # uint8 (H, W, 3)
    arrived: float  # time.monotonic() when decoded


@dataclass
class StreamSummary:
    """What one run of :func:`stream_video` did."""

    decoded: int = 0
    scored: int = 0
    anomalous: int = 0
    dropped: int = 0
    events: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    seconds: float = 0.0


def is_stream_output(folder: Path) -> bool:
    """An earlier stream's output folder (so a new stream may write there), or one that
    holds only the spool of a stream stopped before its first frame."""
    return (folder / "frames.jsonl").is_file() or (folder / SPOOL).is_dir()


def parse_roi(text: str | None) -> Roi | None:
    """``"x,y,w,h"`` in pixels -> a tuple; None for None."""
    if text is None:
        return None
    try:
        x, y, w, h = (int(v) for v in text.split(","))
    except ValueError:
        raise UserError(
            f"option --roi={text!r} must be x,y,w,h in pixels, e.g. 0,0,320,240"
        ) from None
    if x < 0 or y < 0 or w < 8 or h < 8:
        raise UserError(f"option --roi={text!r}: x, y must be 0 or more and w, h at least 8")
    return x, y, w, h


def stream_video(
    model: Predictor,
    source: str,
    out: Path,
    *,
    every: int = 1,
    roi: Roi | None = None,
    debounce: int = 1,
    live: bool = False,
    video_out: Path | None = None,
    save_anomalous: bool = False,
    batch_size: int = 8,
    retries: int = 3,
    backoff: float = 1.0,
    reporter: Reporter | None = None,
    stop: threading.Event | None = None,
    on_result: OnResult | None = None,
    calibrate_frames: int = 0,
    drift: DriftSettings | None = None,
    publisher: Publisher | None = None,
    model_name: str = "model",
) -> StreamSummary:
    """Score ``source`` (a video file, a camera index, or an rtsp/http URL) into ``out``.

    Args:
        model: a loaded model directory or ONNX file.
        source: file path, camera index (``0`` is ``/dev/video0``) or URL.
        out: output folder (missing, empty, or an earlier stream's).
        every: score every N-th frame.
        roi: score only this region (x, y, w, h); maps are placed back in the frame.
        debounce: an event needs this many anomalous scored frames in a row.
        live: keep only the newest frame when scoring falls behind (dropped frames counted).
        video_out: write the scored frames with heat map, outline and score drawn on them.
        save_anomalous: write ``out/anomalous/frame_NNNNNN.png`` for anomalous frames.
        batch_size: frames scored together (files only; live scores one at a time).
        retries: reconnect attempts of a network or camera source that breaks.
        backoff: seconds before the first retry, doubled each time.
        reporter: progress lines.
        stop: set it to stop after the frames being scored (the studio detaching a source).
        on_result: called with each scored frame (as scored, cropped to ``roi``), its
            result and its record (the studio's live view); it must return quickly.
        calibrate_frames: the first N scored frames are good: refit the thresholds on
            them (:mod:`cflowad.line.calibrate`), save ``out/model``, score on with it.
        drift: the drift alarm's settings (:mod:`cflowad.line.drift`); trips and clears go
            to ``out/drift.jsonl``.
        publisher: where frame records, events and drift alarms are published
            (:mod:`cflowad.line.publish`); ``model_name`` names the model there.
    """
    if every < 1 or debounce < 1 or batch_size < 1 or retries < 0:
        raise UserError("options --every, --debounce and --batch-size must be at least 1")
    refuse_foreign(out, is_stream_output)
    if video_out is not None and video_out.suffix.lower() not in (".mp4", ".mkv", ".mov", ".avi"):
        raise UserError(f"option --video-out={video_out}: use an .mp4, .mkv, .mov or .avi name")
    reporter = reporter or Reporter(enabled=False)
    decisions = Decisions(
        model,
        out,
        "--calibrate-frames",
        calibrate_frames,
        drift=drift,
        reporter=reporter,
        publisher=publisher,
        model_name=model_name,
    )
    source_ = _Source(source, retries, backoff, reporter)
    out.mkdir(parents=True, exist_ok=True)
    if save_anomalous:
        (out / "anomalous").mkdir(exist_ok=True)
    summary = StreamSummary()
    started = datetime.now(UTC).isoformat(timespec="milliseconds")

    def publish(kind: str, record: dict[str, Any], subject: str) -> None:
        decisions.publish(kind, record | {"source": source}, subject, started)

    events = _Events(
        debounce,
        out / "events.jsonl",
        lambda event: publish(
            "event", event, f"{source} frames {event['first_frame']}-{event['last_frame']}"
        ),
    )
    writer: _VideoWriter | None = None
    start = time.monotonic()
    last_report = start
    frames = source_.live_frames() if live else source_.frames()
    size: tuple[int, int] | None = None
    try:
        with (out / "frames.jsonl").open("w") as lines:
            for batch in _batches(frames, every, 1 if live else batch_size):
                if stop is not None and stop.is_set():
                    break
                size = _check_size(batch, size, roi, source)
                crops = [_crop(f.rgb, roi) for f in batch]
                decided = decisions.score(crops)
                for frame, crop, (result, calibrating, drifted) in zip(
                    batch, crops, decided, strict=True
                ):
                    latency = (time.monotonic() - frame.arrived) * 1000
                    if calibrating:  # a good frame by the user's word: no decision
                        record = {
                            "frame": frame.index,
                            "pts_seconds": frame.pts_seconds,
                            "calibration": True,
                            "raw_score": result.raw_score,
                        }
                        lines.write(json.dumps(record) + "\n")
                        continue
                    if drifted is not None:
                        publish("drift", drifted, f"{source} drift at frame {frame.index}")
                    record = {
                        "frame": frame.index,
                        "pts_seconds": frame.pts_seconds,
                        **result.record(),
                        "latency_ms": round(latency, 2),
                    }
                    lines.write(json.dumps(record) + "\n")
                    lines.flush()
                    publish("result", record, f"{source} frame {frame.index}")
                    summary.scored += 1
                    summary.anomalous += result.anomalous
                    summary.latencies_ms.append(latency)
                    summary.events += events.add(frame, result)
                    if on_result is not None:
                        on_result(crop, result, record)
                    if video_out is not None or (save_anomalous and result.anomalous):
                        picture = _annotate(frame, result, roi)
                        if save_anomalous and result.anomalous:
                            Image.fromarray(picture).save(
                                out / "anomalous" / f"frame_{frame.index:06d}.png"
                            )
                        if video_out is not None:
                            if writer is None:
                                rate = source_.rate / every if source_.rate else Fraction(25)
                                writer = _VideoWriter(video_out, picture.shape, rate)
                            writer.write(picture)
                if time.monotonic() - last_report > 5:
                    last_report = time.monotonic()
                    reporter.log(_progress(summary, last_report - start))
    finally:
        summary.events += events.close()
        if writer is not None:
            writer.close()
        source_.close()
        summary.dropped = source_.dropped
        summary.decoded = source_.decoded
        summary.seconds = time.monotonic() - start
    return summary


def _progress(summary: StreamSummary, seconds: float) -> str:
    rate = summary.scored / seconds if seconds > 0 else 0.0
    return (
        f"{summary.scored} frames scored ({rate:.1f}/s), {summary.anomalous} anomalous, "
        f"{summary.events} events, {summary.dropped} dropped"
    )


def _batches(frames: Iterator[Frame], every: int, batch_size: int) -> Iterator[list[Frame]]:
    """Every ``every``-th frame in batches; when the source fails, the frames already
    decoded are scored before the error goes on."""
    batch: list[Frame] = []
    try:
        for frame in frames:
            if frame.index % every:
                continue
            batch.append(frame)
            if len(batch) == batch_size:
                yield batch
                batch = []
    except UserError:
        if batch:
            yield batch
        raise
    if batch:
        yield batch


def _check_size(
    batch: list[Frame],
    size: tuple[int, int] | None,
    roi: Roi | None,
    source: str,
) -> tuple[int, int]:
    for frame in batch:
        height, width = frame.rgb.shape[:2]
        if size is None:
            size = (height, width)
            if roi is not None and (roi[0] + roi[2] > width or roi[1] + roi[3] > height):
                raise UserError(
                    f"option --roi={','.join(map(str, roi))} reaches outside the "
                    f"{width}x{height} frames of {source}"
                )
        elif (height, width) != size:
            raise UserError(
                f"{source}: frame size changed from {size[1]}x{size[0]} to {width}x{height} "
                f"at frame {frame.index}; score each part as its own stream"
            )
    assert size is not None
    return size


def _crop(rgb: np.ndarray, roi: Roi | None) -> np.ndarray:
    if roi is None:
        return rgb
    x, y, w, h = roi
    return rgb[y : y + h, x : x + w]


class _Events:
    """Runs of at least ``debounce`` anomalous scored frames, written as they end."""

    def __init__(
        self, debounce: int, path: Path, on_event: Callable[[dict[str, Any]], None]
    ) -> None:
        self.debounce, self.on_event = debounce, on_event
        self.file = path.open("w")
        self.run: list[tuple[Frame, float]] = []

    def add(self, frame: Frame, result: ImageResult) -> int:
        """Count one scored frame; 1 when it ends an event."""
        if result.anomalous:
            self.run.append((frame, result.score))
            return 0
        return self._end()

    def close(self) -> int:
        ended = self._end()
        self.file.close()
        return ended

    def _end(self) -> int:
        run, self.run = self.run, []
        if len(run) < self.debounce:
            return 0
        peak_frame, peak = max(run, key=lambda item: item[1])
        event = {
            "first_frame": run[0][0].index,
            "last_frame": run[-1][0].index,
            "frames": len(run),
            "first_pts_seconds": run[0][0].pts_seconds,
            "last_pts_seconds": run[-1][0].pts_seconds,
            "peak_score": round(peak, 6),
            "peak_frame": peak_frame.index,
        }
        self.file.write(json.dumps(event) + "\n")
        self.file.flush()
        self.on_event(event)
        return 1


def _annotate(frame: Frame, result: ImageResult, roi: Roi | None) -> np.ndarray:
    """The frame with the heat map (in the ROI), the predicted outline and the score."""
    from cflowad.results.pictures import blend

    picture = frame.rgb.copy()
    x, y = (roi[0], roi[1]) if roi else (0, 0)
    blended = blend(_crop(frame.rgb, roi), result.anomaly_map, result.mask)
    picture[y : y + blended.shape[0], x : x + blended.shape[1]] = blended
    image = Image.fromarray(picture)
    draw = ImageDraw.Draw(image)
    if roi is not None:
        draw.rectangle((x, y, x + roi[2] - 1, y + roi[3] - 1), outline=(255, 255, 255))
    colour = (255, 64, 64) if result.anomalous else (255, 255, 255)
    label = f"frame {frame.index}  score {result.score:.3f}" + (
        "  ANOMALOUS" if result.anomalous else ""
    )
    draw.rectangle((0, 0, 8 + 7 * len(label), 16), fill=(0, 0, 0))
    draw.text((4, 2), label, fill=colour)
    return np.asarray(image)


class _VideoWriter:
    """H.264 (or MPEG-4 where x264 is missing) at the scored frames' rate."""

    def __init__(self, path: Path, shape: tuple[int, ...], rate: Fraction) -> None:
        import av

        path.parent.mkdir(parents=True, exist_ok=True)
        self.container = av.open(str(path), "w")
        codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
        stream = self.container.add_stream(codec, rate=Fraction(rate).limit_denominator(1000))
        assert isinstance(stream, av.VideoStream)
        self.stream = stream
        self.height, self.width = shape[0] - shape[0] % 2, shape[1] - shape[1] % 2  # yuv420p
        self.stream.width, self.stream.height = self.width, self.height
        self.stream.pix_fmt = "yuv420p"

    def write(self, picture: np.ndarray) -> None:
        import av

        frame = av.VideoFrame.from_ndarray(
            np.ascontiguousarray(picture[: self.height, : self.width]), format="rgb24"
        )
        for packet in self.stream.encode(frame):
            self.container.mux(packet)

    def close(self) -> None:
        for packet in self.stream.encode():
            self.container.mux(packet)
        self.container.close()


class _Source:
    """A video source opened with PyAV; network and camera sources reconnect with backoff."""

    def __init__(self, source: str, retries: int, backoff: float, reporter: Reporter) -> None:
        try:
            import av
        except ImportError:
            raise missing_extra("cflowad stream", "PyAV", "stream") from None
        self.av = av
        self.source = source
        self.retries, self.backoff, self.reporter = retries, backoff, reporter
        self.reconnects = source.isdigit() or source.lower().startswith(NETWORK)
        self.dropped = 0
        self.decoded = 0
        self.rate: Fraction | None = None
        self._stop = threading.Event()
        self.container = self._open()

    def _open(self) -> Any:
        av, source = self.av, self.source
        options: dict[str, str] = {}
        kwargs: dict[str, Any] = {}
        if source.isdigit():
            kwargs["format"] = "v4l2"
            target = f"/dev/video{source}"
        else:
            target = source
            if source.lower().startswith(("rtsp://", "rtsps://")):
                options = {"rtsp_transport": "tcp", "timeout": "5000000"}
            elif not source.lower().startswith(NETWORK) and not Path(source).is_file():
                raise UserError(f"SOURCE {source}: file not found")
        try:
            container = av.open(target, options=options, timeout=10.0, **kwargs)
        except av.error.FileNotFoundError:
            raise UserError(f"SOURCE {source}: not found") from None
        except av.error.InvalidDataError:
            raise UserError(f"SOURCE {source}: not a video file FFmpeg can read") from None
        except (av.error.FFmpegError, OSError) as error:
            raise UserError(f"SOURCE {source}: cannot open ({_reason(error)})") from None
        if not container.streams.video:
            container.close()
            raise UserError(f"SOURCE {source}: has no video stream")
        stream = container.streams.video[0]
        if stream.codec_context is None or stream.codec_context.codec is None:
            container.close()
            raise UserError(f"SOURCE {source}: unsupported video codec")
        stream.thread_type = "AUTO"
        self.rate = stream.average_rate or stream.guessed_rate
        return container

    def frames(self) -> Iterator[Frame]:
        """Every frame, in order; a broken network or camera source is reopened.

        Reconnects back off (``backoff``, doubled each time) up to ``retries`` times in
        a row; a source that then ran for :data:`HEALTHY_SECONDS` starts a new round.
        """
        index = 0
        attempt = 0
        problem = ""
        container: Any = self.container
        while True:
            opened = time.monotonic()
            if container is not None:
                try:
                    for decoded in container.decode(container.streams.video[0]):
                        if self._stop.is_set():
                            return
                        pts = float(decoded.time) if decoded.time is not None else None
                        self.decoded += 1
                        rgb = decoded.to_ndarray(format="rgb24")
                        yield Frame(index, pts, rgb, time.monotonic())
                        index += 1
                    if not self.reconnects:
                        return
                    problem = "the stream ended"
                except self.av.error.FFmpegError as error:
                    if not self.reconnects:
                        raise UserError(
                            f"SOURCE {self.source}: unreadable at frame {index} ({_reason(error)})"
                        ) from None
                    problem = _reason(error)
                if time.monotonic() - opened >= HEALTHY_SECONDS:
                    attempt = 0
            attempt += 1
            if attempt > self.retries:
                raise UserError(
                    f"SOURCE {self.source}: {problem} after {index} frames; gave up after "
                    f"{self.retries} reconnects"
                )
            wait = self.backoff * 2 ** (attempt - 1)
            self.reporter.warn(f"{self.source}: {problem}; reconnecting in {wait:g} s")
            time.sleep(wait)
            self.container.close()
            try:
                container = self.container = self._open()
            except UserError as error:
                container, problem = None, str(error)

    def live_frames(self) -> Iterator[Frame]:
        """The newest frame each time one is asked for; older unread frames are dropped.

        A file is paced by its timestamps, as a camera would deliver it.
        """
        latest: list[Frame] = []
        failure: list[BaseException] = []
        ready = threading.Condition()
        finished = threading.Event()

        def read() -> None:
            start = time.monotonic()
            try:
                for frame in self.frames():
                    if not self.reconnects and frame.pts_seconds is not None:
                        delay = start + frame.pts_seconds - time.monotonic()
                        if delay > 0:
                            time.sleep(delay)
                        frame = Frame(frame.index, frame.pts_seconds, frame.rgb, time.monotonic())
                    with ready:
                        if latest:
                            self.dropped += 1
                            latest.clear()
                        latest.append(frame)
                        ready.notify()
            except BaseException as error:  # handed to the scoring thread
                failure.append(error)
            finally:
                finished.set()
                with ready:
                    ready.notify()

        reader = threading.Thread(target=read, name="cflowad-video-reader", daemon=True)
        reader.start()
        try:
            while True:
                with ready:  # never yield while holding the lock: the reader must go on
                    while not latest and not finished.is_set():
                        ready.wait(0.5)
                    newest = latest.pop() if latest else None
                if newest is not None:
                    yield newest
                    continue
                if failure:
                    raise failure[0]
                return
        finally:
            self._stop.set()
            reader.join(10)

    def close(self) -> None:
        self._stop.set()
        self.container.close()


def _reason(error: BaseException) -> str:
    return getattr(error, "strerror", None) or str(error) or type(error).__name__

"""cflowad stream and cflowad watch on this machine: frames/s, live latency, hot-folder delay.

    python benchmarks/streams.py runs/magnetic_tile ../shared/data/magnetic_tile \\
        --out runs/streams.json

1. A 640x480 mp4 (30 frames/s, 10 s) made from the set's test images: frames/s scoring
   every frame, and with --live at the file's 30 frames/s (latency p50/p99, share dropped).
2. A hot folder: 200 test images dropped at once (files/s), then 100 dropped at 4 per
   second, below the model's speed (delay from the copy to the record, p50/p99).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

import av
import numpy as np
from PIL import Image

import cflowad
from cflowad.common.allocator import keep_freed_memory
from cflowad.line.stream import stream_video
from cflowad.line.watch import watch_folder


def make_video(images: list[Path], path: Path, seconds: int = 10, fps: int = 30) -> Path:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 640, 480, "yuv420p"
        for i in range(seconds * fps):
            image = Image.open(images[i % len(images)]).convert("RGB").resize((640, 480))
            frame = av.VideoFrame.from_ndarray(np.asarray(image), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def percentiles(values: list[float]) -> dict[str, float]:
    return {f"p{q}": round(float(np.percentile(values, q)), 1) for q in (50, 99)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("data", type=Path)
    parser.add_argument("--out", type=Path, default=Path("runs/streams.json"))
    args = parser.parse_args()
    keep_freed_memory()
    model = cflowad.load(args.model)
    images = sorted((args.data / "test").glob("*/*"))
    report: dict[str, object] = {"model": str(args.model)}
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        video = make_video(images, root / "line.mp4")
        for name, options in (("every_frame", {}), ("live_30fps", {"live": True})):
            summary = stream_video(model, str(video), root / name, **options)
            report[name] = {
                "frames_decoded": summary.decoded,
                "frames_scored": summary.scored,
                "frames_per_second": round(summary.scored / summary.seconds, 1),
                "dropped_share": round(summary.dropped / max(summary.decoded, 1), 3),
                "latency_ms": percentiles(summary.latencies_ms),
                "seconds": round(summary.seconds, 1),
            }
            print(name, report[name], flush=True)

        inbox, out = root / "inbox", root / "watch"
        inbox.mkdir()
        stop = threading.Event()
        result: dict[str, object] = {}
        watcher = threading.Thread(
            target=lambda: result.update(summary=watch_folder(model, inbox, out, stop=stop))
        )
        watcher.start()
        journal = out / "results.jsonl"

        def records() -> list[dict[str, object]]:
            if not journal.is_file():
                return []
            return [json.loads(line) for line in journal.read_text().splitlines()]

        burst = images[:200]
        start = time.perf_counter()
        for i, image in enumerate(burst):
            shutil.copy(image, inbox / f"burst_{i:04d}{image.suffix}")
        while len(records()) < len(burst):
            time.sleep(0.05)
        report["hot_folder_burst"] = {
            "files": len(burst),
            "files_per_second": round(len(burst) / (time.perf_counter() - start), 1),
        }
        copied: dict[str, float] = {}
        for i, image in enumerate(images[200:300]):
            name = f"steady_{i:04d}{image.suffix}"
            shutil.copy(image, inbox / name)
            copied[name] = time.time()
            time.sleep(0.25)
        deadline = time.monotonic() + 120
        while len(records()) < 300 and time.monotonic() < deadline:
            time.sleep(0.05)
        stop.set()
        watcher.join()
        delays = [
            (datetime.fromisoformat(str(r["scored_at"])).timestamp() - copied[str(r["file"])])
            * 1000
            for r in records()
            if r["file"] in copied
        ]
        report["hot_folder_steady_4_per_second"] = {
            "files": len(delays),
            "copy_to_record_ms": percentiles(delays),
            "note": "includes the 0.5 s settle wait (--settle) that guards against partial files",
        }
        print(report["hot_folder_burst"], report["hot_folder_steady_4_per_second"])
    args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

"""The studio's memory with a live stream attached for a long time (flat: within 10 %).

A local HTTP server (127.0.0.1) encodes an endless H.264 MPEG-TS stream of brick-texture
frames at --fps, as a network camera would send it; the studio attaches it as a
``stream`` source and scores every frame. The studio process's resident memory is
sampled every --every seconds for --minutes; the report compares the median of the
first and the last tenth of the samples (after a warm-up of --warmup minutes).

    python benchmarks/studio_soak.py --minutes 60 --json soak.json
"""

from __future__ import annotations

import argparse
import http.server
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import av
import httpx
import numpy as np
from skimage import data as skdata

sys.path.insert(0, str(Path(__file__).parent))
from studio_loop import studio


def camera(fps: float, stop: threading.Event) -> type[http.server.BaseHTTPRequestHandler]:
    """A handler that streams brick frames, H.264 in MPEG-TS, until ``stop`` is set."""
    brick = skdata.brick()
    rng = np.random.default_rng(0)

    class Camera(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "video/mp2t")
            self.end_headers()
            try:
                output = av.open(self.wfile, mode="w", format="mpegts")
                stream = output.add_stream("libx264", rate=int(fps))
                stream.width = stream.height = 256
                stream.pix_fmt = "yuv420p"
                stream.options = {"tune": "zerolatency", "preset": "ultrafast"}
                start = time.monotonic()
                index = 0
                while not stop.is_set():
                    y, x = rng.integers(0, brick.shape[0] - 256, 2)
                    gray = brick[y : y + 256, x : x + 256]
                    frame = av.VideoFrame.from_ndarray(np.stack([gray] * 3, -1), format="rgb24")
                    for packet in stream.encode(frame):
                        output.mux(packet)
                    self.wfile.flush()
                    index += 1
                    time.sleep(max(0.0, start + index / fps - time.monotonic()))
                output.close()
            except (BrokenPipeError, ConnectionResetError):
                pass

        def log_message(self, *args: object) -> None:
            pass

    return Camera


def resident_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=60)
    parser.add_argument("--warmup", type=float, default=2)
    parser.add_argument("--every", type=float, default=15, help="seconds between samples")
    parser.add_argument("--fps", type=float, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    stop = threading.Event()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), camera(args.fps, stop))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    source = f"http://127.0.0.1:{server.server_address[1]}/live.ts"
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        (root / "data").mkdir()
        train = root / "train"
        train.mkdir()
        brick = skdata.brick()
        from PIL import Image

        for i in range(60):
            y, x = np.random.default_rng(i).integers(0, brick.shape[0] - 256, 2)
            Image.fromarray(brick[y : y + 256, x : x + 256]).save(train / f"{i:03d}.png")
        subprocess.run(
            [sys.executable, "-m", "cflowad", "train", str(train), "--out",
             str(root / "ws" / "models" / "brick"), "--decoder", "gaussian", "--quiet"],
            check=True,
        )  # fmt: skip
        with studio(root / "ws", root / "data") as url:
            while httpx.get(f"{url}/v1/models/brick").status_code != 200:
                time.sleep(0.2)
            pid = int(subprocess.check_output(["pgrep", "-f", f"studio {root / 'ws'}"]).split()[0])
            token = httpx.get(f"{url}/studio/api/state").json()["csrf"]
            attached = httpx.post(
                f"{url}/studio/api/sources",
                json={"kind": "stream", "model": "brick", "target": source},
                headers={"X-CSRF-Token": token},
            ).json()
            samples: list[tuple[float, float, int]] = []
            start = time.monotonic()
            end = start + 60 * args.minutes
            while time.monotonic() < end:
                time.sleep(args.every)
                scored = httpx.get(f"{url}/studio/api/sources/{attached['id']}").json()
                elapsed = round(time.monotonic() - start, 1)
                samples.append((elapsed, round(resident_mb(pid), 1), scored["scored"]))
                print(samples[-1], scored["state"], scored["error"] or "", flush=True)
            stop.set()
    kept = [s for s in samples if s[0] >= 60 * args.warmup]
    tenth = max(1, len(kept) // 10)
    first = statistics.median(s[1] for s in kept[:tenth])
    last = statistics.median(s[1] for s in kept[-tenth:])
    result = {
        "minutes": args.minutes,
        "fps": args.fps,
        "frames_scored": samples[-1][2],
        "rss_mb_first_tenth": first,
        "rss_mb_last_tenth": last,
        "growth": round(last / first - 1, 4),
        "rss_mb_max": max(s[1] for s in kept),
        "samples": samples,
    }
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

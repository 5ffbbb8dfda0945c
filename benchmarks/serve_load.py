"""cflowad serve under load, next to cflowad bench, for a model directory and its ONNX file.

    python benchmarks/serve_load.py runs/magnetic_tile runs/magnetic_tile.onnx \\
        ../shared/data/magnetic_tile/test/good --out runs/serve_load.json

For each model, one after the other on the same machine (nothing else running):
``cflowad bench`` at batch 1, 8 and 16; then ``cflowad serve`` with that model alone
and ``cflowad loadtest`` at concurrency 1, 4 and 16, for each ``--workers`` setting;
repeated ``--rounds`` times (medians reported); then, for the ONNX file with the
last ``--workers`` setting, a run at concurrency 16 with a reload in the middle
(``--reload-seconds 0`` skips it): errors, requests, and the server's
resident memory at the start and the end. The load generator runs on the same
cores as the server, as a camera client on the inspection PC would.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from cflowad.line.loadtest import run_loadtest

CLI = [sys.executable, "-m", "cflowad"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def server(model: Path, *options: str) -> Iterator[tuple[str, int]]:
    port = free_port()
    process = subprocess.Popen([*CLI, "serve", str(model), "--port", str(port), *options])
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"server for {model} did not start")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/readyz").status_code == 200:
                    break
            time.sleep(0.25)
        yield url, process.pid
    finally:
        process.terminate()
        process.wait(60)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def bench(model_dir: Path, images: Path) -> dict[str, dict[str, float]]:
    """images/s at batch 1, 8, 16: PyTorch under "torch", ONNX Runtime under "onnx"."""
    out = Path("runs") / ".serve_bench.json"
    subprocess.run(
        [*CLI, "bench", str(model_dir), str(images), "--batch-size", "1,8,16",
         "--repeats", "7", "--json", str(out), "--onnx", "-q"],
        check=True,
    )  # fmt: skip
    batches = json.loads(out.read_text())["batches"]
    return {
        "torch": {str(b["batch_size"]): b["images_per_second"] for b in batches},
        "onnx": {str(b["batch_size"]): b["onnxruntime"]["images_per_second"] for b in batches},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("onnx", type=Path)
    parser.add_argument("images", type=Path)
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--reload-seconds", type=float, default=60.0)
    parser.add_argument("--out", type=Path, default=Path("runs/serve_load.json"))
    parser.add_argument("--warmup", type=float, default=30.0)
    parser.add_argument("--reload-only", action="store_true", help="only the reload run")
    parser.add_argument("--rounds", type=int, default=1, help="bench + servers, repeated")
    parser.add_argument(
        "--workers", type=lambda v: [int(w) for w in v.split(",")], default=[1, 2],
        help="cflowad serve --workers settings to load, comma-separated",
    )  # fmt: skip
    args = parser.parse_args()
    files = sorted(args.images.iterdir())[:32]
    report: dict[str, object] = json.loads(args.out.read_text()) if args.reload_only else {}
    rounds: dict[str, list[dict[str, object]]] = {}
    for _ in range(0 if args.reload_only else args.rounds):
        # the host's speed drifts by tens of percent over minutes: bench right before
        # the servers it is compared with, and report medians over rounds
        measured = bench(args.model_dir, args.images)
        models = ((args.model_dir, measured["torch"]), (args.onnx, measured["onnx"]))
        for model, speeds in models:
            for workers in args.workers:
                with server(model, "--workers", str(workers)) as (url, _):
                    levels = run_loadtest(url, model.name, files, [1, 4, 16], args.duration)
                key = model.name if workers == 1 else f"{model.name} --workers {workers}"
                one = {
                    "bench_images_per_second": speeds,
                    "bench_batch1_ms": round(1000 / speeds["1"], 1),
                    "load": levels,
                    "c16_over_best_bench": round(
                        levels[-1]["requests_per_second"] / max(speeds.values()), 2
                    ),
                    "c1_p50_minus_bench_batch1_ms": round(
                        levels[0]["p50_ms"] - 1000 / speeds["1"], 1
                    ),
                    # the same without the co-located client: the server's own latency_ms
                    "c1_server_p50_minus_bench_batch1_ms": round(
                        levels[0]["server_p50_ms"] - 1000 / speeds["1"], 1
                    ),
                }
                rounds.setdefault(key, []).append(one)
                print(key, json.dumps(one, indent=1), flush=True)
    for key, results in rounds.items():
        report[key] = {
            "median_c16_over_best_bench": statistics.median(
                r["c16_over_best_bench"] for r in results
            ),
            "median_c1_p50_minus_bench_batch1_ms": statistics.median(
                r["c1_p50_minus_bench_batch1_ms"] for r in results
            ),
            "median_c1_server_p50_minus_bench_batch1_ms": statistics.median(
                r["c1_server_p50_minus_bench_batch1_ms"] for r in results
            ),
            "rounds": results,
        }
    if args.reload_seconds <= 0:
        args.out.write_text(json.dumps(report, indent=2))
        return
    with server(args.onnx, "--workers", str(args.workers[-1])) as (url, pid):
        # warm up until the allocator's arenas stop growing (about 30 s at concurrency 16:
        # 1213 -> 1298 -> 1312 -> 1321 -> 1324 MB at 5, 15, 25, 35, 45 s), then measure
        run_loadtest(url, args.onnx.name, files, [16], args.warmup)
        start_rss = rss_mb(pid)
        reload: dict[str, object] = {}

        def reload_midway() -> None:
            time.sleep(args.reload_seconds / 2)
            response = httpx.post(f"{url}/v1/models/{args.onnx.name}/reload", timeout=120)
            reload.update(status=response.status_code, revision=response.json().get("revision"))

        thread = threading.Thread(target=reload_midway)
        thread.start()
        levels = run_loadtest(url, args.onnx.name, files, [16], args.reload_seconds)
        thread.join()
        end_rss = rss_mb(pid)
    report["reload_under_load"] = {
        **levels[0],
        "workers": args.workers[-1],
        "reload": reload,
        "rss_start_mb": round(start_rss, 1),
        "rss_end_mb": round(end_rss, 1),
        "rss_change": round(end_rss / start_rss - 1, 3),
    }
    print(json.dumps(report["reload_under_load"], indent=1))
    args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

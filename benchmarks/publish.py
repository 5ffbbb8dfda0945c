"""`--publish` on the line: messages delivered vs images scored across a broker restart and
a `kill -9` of `cflowad watch`, and scoring throughput with publishing on vs off.

The broker is amqtt (tests/mqtt_broker.py), in its own process, recording every message
it takes. Part 1 runs the real command: `cflowad watch --publish mqtt://...` over a
folder of the category's test images; the broker is killed after 25 % of them are
scored and started again at 50 %; watch is killed (SIGKILL) at 65 % and started again
with `--once`. Every scored image must reach the broker; repeats may only carry the id
of their first delivery. Part 2 scores the same folder in-process with `watch_folder`,
publishing off and on (every record, QoS 1), alternating, and compares the medians.

    python benchmarks/publish.py MODEL ../shared/data/magnetic_tile --json publish.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cflowad
from cflowad.line.publish import Publisher
from cflowad.line.sinks import PublishSettings
from cflowad.line.spool import Spool
from cflowad.line.watch import watch_folder

BROKER = Path(__file__).resolve().parent.parent / "tests" / "mqtt_broker.py"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _start_broker(port: int, record: Path) -> subprocess.Popen[str]:
    process = subprocess.Popen(
        [sys.executable, str(BROKER), str(port), str(record)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert process.stdout is not None and process.stdout.readline().strip() == "ready"
    return process


def _scored(journal: Path) -> int:
    return len(journal.read_text().splitlines()) if journal.is_file() else 0


def _wait(condition: object, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.05)


def delivery(model: Path, images: list[Path], folder: Path) -> dict[str, object]:
    """Part 1: the real command, a broker restart, and a kill -9 of watch."""
    inbox, out, record = folder / "inbox", folder / "out", folder / "broker.jsonl"
    inbox.mkdir()
    for k, image in enumerate(images):
        shutil.copy(image, inbox / f"{k:04d}{image.suffix}")
    port = _free_port()
    broker = _start_broker(port, record)
    command = [
        sys.executable, "-m", "cflowad", "watch", str(model), str(inbox), "--out", str(out),
        "--settle", "0.1", "--publish", f"mqtt://127.0.0.1:{port}/line/{{model}}",
        "--publish-what", "all", "-q",
    ]  # fmt: skip
    journal, n = out / "results.jsonl", len(images)
    watch = subprocess.Popen(command)
    steps: list[str] = []
    _wait(lambda: _scored(journal) >= n // 4, 900, "25 % scored")
    broker.kill()
    broker.wait()
    steps.append(f"broker killed at {_scored(journal)} scored")
    _wait(lambda: _scored(journal) >= n // 2, 900, "50 % scored")
    broker = _start_broker(port, record)
    steps.append(f"broker started again at {_scored(journal)} scored")
    _wait(lambda: _scored(journal) >= int(n * 0.65), 900, "65 % scored")
    watch.send_signal(signal.SIGKILL)
    watch.wait()
    pending = sum(Spool(s, 2**40).pending for s in (out / "spool").iterdir())
    steps.append(f"watch killed (SIGKILL) at {_scored(journal)} scored")
    subprocess.run([*command, "--once"], check=True)
    steps.append("watch started again with --once: finished")
    broker.kill()
    journal_files = [json.loads(line)["file"] for line in journal.read_text().splitlines()]
    received = [json.loads(json.loads(line)["data"]) for line in record.read_text().splitlines()]
    first_id: dict[str, str] = {}
    for message in received:
        first_id.setdefault(message["file"], message["id"])
    return {
        "images": n,
        "scored": len(journal_files),
        "scored_twice": len(journal_files) - len(set(journal_files)),
        "messages_received": len(received),
        "distinct_ids": len({m["id"] for m in received}),
        "scored_not_delivered": len(set(journal_files) - set(first_id)),
        "repeats_with_another_id": sum(first_id[m["file"]] != m["id"] for m in received),
        "spooled_undelivered_at_kill": pending,
        "steps": steps,
    }


def throughput(model_dir: Path, images: list[Path], folder: Path, rounds: int) -> dict[str, object]:
    """Part 2: in-process watch over the folder, publishing off and on, alternating."""
    model = cflowad.load(model_dir, "cpu")
    inbox = folder / "inbox2"
    inbox.mkdir()
    for k, image in enumerate(images):
        shutil.copy(image, inbox / f"{k:04d}{image.suffix}")
    port = _free_port()
    broker = _start_broker(port, folder / "broker2.jsonl")
    rates: dict[str, list[float]] = {"off": [], "on": []}
    try:
        for round_ in range(rounds):
            for mode in ("off", "on"):
                out = folder / f"out-{mode}-{round_}"
                publisher = (
                    Publisher(
                        PublishSettings(urls=(f"mqtt://127.0.0.1:{port}/bench",), what="all"),
                        out / "spool",
                        "watch",
                        print,
                    )
                    if mode == "on"
                    else None
                )
                start = time.perf_counter()
                summary = watch_folder(
                    model, inbox, out, settle=0.0, once=True, publisher=publisher
                )
                seconds = time.perf_counter() - start
                if publisher is not None:
                    assert publisher.close(60) == 0, "not all delivered"
                rates[mode].append(summary.scored / seconds)
                print(f"round {round_ + 1} publishing {mode}: {rates[mode][-1]:.2f} images/s")
    finally:
        broker.kill()
    off, on = statistics.median(rates["off"]), statistics.median(rates["on"])
    return {
        "images": len(images),
        "images_per_s_off": rates["off"],
        "images_per_s_on": rates["on"],
        "median_off": round(off, 2),
        "median_on": round(on, 2),
        "on_vs_off": round(on / off, 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("category", type=Path)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    images = sorted((args.category / "test").glob("*/*"))
    step = max(1, len(images) // args.images)
    images = images[::step][: args.images]
    flags = [
        f for f in ("avx512f", "avx512_bf16", "avx2") if f in Path("/proc/cpuinfo").read_text()
    ]
    result: dict[str, object] = {
        "model": str(args.model),
        "cpu_flags": flags,
        "cores": os.cpu_count(),
    }
    with tempfile.TemporaryDirectory() as folder:
        result["delivery"] = delivery(args.model, images, Path(folder))
        print(json.dumps(result["delivery"], indent=2))
        result["throughput"] = throughput(args.model, images, Path(folder), args.rounds)
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

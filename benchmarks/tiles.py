"""Scoring time and memory per megapixel, in one pass and with --tile-size.

Usage: python benchmarks/tiles.py [OUT.json] [--repeats 2]

Each case builds the scoring network for an input size (the default encoder,
Lite0, with random weights: the same arithmetic as ImageNet's) and scores one
image of that size at batch 1, in a fresh process: the median seconds of
``--repeats`` passes after a warm-up, and the peak resident memory above the
memory before the first pass (the network itself and the input excluded: what
scoring adds). One pass over a 20-megapixel input is not measured, since its
encoder's activations alone exceed this machine's memory budget: the largest
one-pass case shows the trend.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

CASES = [  # (width, height, tile size or None)
    (256, 256, None),
    (640, 416, None),
    (640, 416, 256),
    (1280, 832, None),
    (1280, 832, 256),
    (2560, 1664, None),
    (2560, 1664, 256),
    (2560, 1664, 512),
    (5472, 3648, 512),
]

CHILD = """
import json, resource, statistics, sys, time
import torch
from cflowad.method.config import Config
from cflowad.method.scoring import CFlowNet

width, height, tile, repeats = json.loads(sys.argv[1])
config = Config(encoder_weights="random", image_size=(height, width), aspect="fixed",
                tile_size=tile)
net = CFlowNet.build(config, pretrained=False).eval()
net.refresh_conditions()
images = torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(0))

def resident_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20

before = resident_mb()
seconds = []
with torch.inference_mode():
    for _ in range(repeats + 1):
        start = time.perf_counter()
        net(images)
        seconds.append(time.perf_counter() - start)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"seconds": statistics.median(seconds[1:]), "peak_above_mb": peak - before,
                  "tiles": None if net.tiles is None else net.tiles.count,
                  "threads": torch.get_num_threads()}))
"""


def main() -> None:
    args = sys.argv[1:]
    repeats = 2
    if "--repeats" in args:
        i = args.index("--repeats")
        repeats = int(args[i + 1])
        del args[i : i + 2]
    out = Path(args[0]) if args else None
    flags = Path("/proc/cpuinfo").read_text().split("flags")[1].split("\n")[0].split()
    rows = []
    print("| input | tile | tiles | s / image | s / MP | MB above | MB / MP |")
    print("|---|---|---|---|---|---|---|")
    for width, height, tile in CASES:
        run = subprocess.run(
            [sys.executable, "-c", CHILD, json.dumps([width, height, tile, repeats])],
            capture_output=True,
            text=True,
            timeout=1800,
        )
        if run.returncode:
            print(f"{width}x{height} tile {tile}: failed\n{run.stderr[-2000:]}", file=sys.stderr)
            continue
        figures = json.loads(run.stdout.splitlines()[-1])
        megapixels = width * height / 1e6
        row = {"width": width, "height": height, "tile_size": tile, **figures}
        row["seconds_per_megapixel"] = figures["seconds"] / megapixels
        row["mb_per_megapixel"] = figures["peak_above_mb"] / megapixels
        rows.append(row)
        print(
            f"| {width}x{height} ({megapixels:.1f} MP) | {tile or 'none'} "
            f"| {figures['tiles'] or 1} "
            f"| {figures['seconds']:.2f} | {row['seconds_per_megapixel']:.2f} "
            f"| {figures['peak_above_mb']:.0f} | {row['mb_per_megapixel']:.0f} |",
            flush=True,
        )
    machine = {
        "avx512": any(f.startswith("avx512") for f in flags),
        "avx512_bf16": "avx512_bf16" in flags,
        "threads": rows[0]["threads"] if rows else None,
    }
    print(json.dumps(machine))
    if out is not None:
        out.write_text(json.dumps({"machine": machine, "cases": rows}, indent=2))


if __name__ == "__main__":
    main()

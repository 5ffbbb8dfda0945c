"""Peak memory of ``cflowad predict`` on 200 and on 5,000 images (issue: memory on big runs).

Usage: python benchmarks/predict_memory.py MODEL MVTEC_CATEGORY [--counts 200,5000]

The images are the category's test images flipped and rotated (8 variants each),
written once under runs/predict_memory/. Each count runs ``cflowad predict`` in a
fresh process under /usr/bin/time -v; prints images/s and peak resident memory.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from cflowad.data.datasets import find_test_set

ROOT = Path("runs/predict_memory")


def make_images(data: Path, count: int) -> Path:
    folder = ROOT / f"images_{count}"
    if folder.is_dir() and len(list(folder.iterdir())) == count:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    sources = find_test_set(data).images
    written = 0
    for variant in range(8):
        for source in sources:
            if written == count:
                return folder
            image = np.asarray(Image.open(source))
            image = np.rot90(image, variant % 4)
            if variant >= 4:
                image = image[:, ::-1]
            Image.fromarray(np.ascontiguousarray(image)).save(folder / f"{written:05d}.png")
            written += 1
    if written < count:
        raise SystemExit(f"only {written} variants of {len(sources)} images")
    return folder


def main() -> None:
    model, data = sys.argv[1], Path(sys.argv[2])
    counts = [200, 5000]
    if "--counts" in sys.argv:
        counts = [int(c) for c in sys.argv[sys.argv.index("--counts") + 1].split(",")]
    results = {}
    for count in counts:
        folder = make_images(data, count)
        out = ROOT / f"out_{count}"
        start = time.perf_counter()
        done = subprocess.run(
            ["/usr/bin/time", "-v", "cflowad", "predict", model, str(folder), "--out", str(out)],
            capture_output=True,
            text=True,
            check=True,
        )
        seconds = time.perf_counter() - start
        peak = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)[1])
        results[count] = {
            "images_per_second": round(count / seconds, 2),
            "peak_rss_mib": round(peak / 1024, 1),
        }
        print(count, results[count], flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()

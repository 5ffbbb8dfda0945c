"""Time AUPRO and pixel AUROC on 100 maps of 900 x 900 (the evaluation issue's yardstick).

Usage: python benchmarks/metrics_speed.py
"""

from __future__ import annotations

import time

import numpy as np

from cflowad.results.metrics import aupro, pixel_auroc


def main() -> None:
    rng = np.random.default_rng(0)
    maps = rng.random((100, 900, 900), dtype=np.float32)
    masks = np.zeros(maps.shape, dtype=bool)
    for i in range(50):
        y, x = rng.integers(0, 800, 2)
        masks[i, y : y + rng.integers(5, 100), x : x + rng.integers(5, 100)] = True
        maps[i][masks[i]] += 0.3
    for name, metric in (("aupro", aupro), ("pixel_auroc", pixel_auroc)):
        start = time.perf_counter()
        value = metric(maps, masks)
        print(f"{name}: {value:.4f} in {time.perf_counter() - start:.2f} s")


if __name__ == "__main__":
    main()

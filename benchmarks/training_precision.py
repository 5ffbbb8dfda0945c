"""Decoder training speed in float32 and under bfloat16 autocast, alternating A/B runs.

Usage: python benchmarks/training_precision.py [ROUNDS]
Cached features are random (630 images at 288 x 256, EfficientNet-Lite0's three
scales), so only the speed of fit_decoders' step is measured: one fiber batch of
256 per scale, forward, backward and fused Adam.
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import time

import numpy as np

from cflowad.config import Config
from cflowad.scoring import CFlowNet
from cflowad.train import FeatureCache, fit_decoders


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    config = Config(image_size=(288, 256), encoder_weights="random", steps=300)
    net = CFlowNet.build(config, pretrained=False)
    positions = [h * w for h, w in net.feature_sizes]
    rng = np.random.default_rng(0)
    cache = FeatureCache(
        [
            rng.standard_normal((630 * p, d), dtype=np.float32).astype(np.float16)
            for p, d in zip(positions, net.encoder.channels, strict=True)
        ],
        positions,
        on_disk=False,
    )
    speeds: dict[str, list[float]] = {"float32": [], "bfloat16": []}
    for _ in range(rounds):
        for precision in speeds:
            run = dataclasses.replace(config, training_precision=precision)
            start = time.perf_counter()
            fit_decoders(CFlowNet(run, net.encoder), cache, run)
            speeds[precision].append(run.steps / (time.perf_counter() - start))
    for precision, values in speeds.items():
        runs = ", ".join(f"{v:.1f}" for v in values)
        print(f"{precision:8s} steps/s: {runs}; median {statistics.median(values):.1f}")


if __name__ == "__main__":
    main()

"""Decoder training speed: float32 or bfloat16, eager or compiled, in alternating runs.

Usage: python benchmarks/training_speed.py [ROUNDS]
Cached features are random (630 images at 288 x 256, EfficientNet-Lite0's three
scales), so only fit_decoders' step is timed: one fiber batch of 256 per scale,
forward, backward and fused Adam. "steady" leaves out the first step, which
compiles (about a minute with an empty torch.compile cache, seconds after).
"""

from __future__ import annotations

import dataclasses
import statistics
import sys

import numpy as np

from cflowad.method.config import Config
from cflowad.method.scoring import CFlowNet
from cflowad.method.train import FeatureCache, fit_decoders


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
    variants = [(p, c) for c in (False, True) for p in ("float32", "bfloat16")]
    steady: dict[tuple[str, bool], list[float]] = {v: [] for v in variants}
    first: dict[tuple[str, bool], list[float]] = {v: [] for v in variants}
    for _ in range(rounds):
        for precision, compiled in variants:
            run = dataclasses.replace(
                config, training_precision=precision, compile_training=compiled
            )
            summary = fit_decoders(CFlowNet(run, net.encoder), cache, run)
            rest = summary["train_seconds"] - summary["first_step_seconds"]
            steady[precision, compiled].append((run.steps - 1) / rest)
            first[precision, compiled].append(summary["first_step_seconds"])
    for (precision, compiled), values in steady.items():
        runs = ", ".join(f"{v:.1f}" for v in values)
        print(
            f"{precision:8s} {'compiled' if compiled else 'eager':8s} steady steps/s: {runs}; "
            f"median {statistics.median(values):.1f}; first step "
            + ", ".join(f"{s:.1f}" for s in first[precision, compiled])
            + " s"
        )


if __name__ == "__main__":
    main()

"""Compare anomaly-map fusions and image scores on one trained model (used to pick defaults).

Usage: python benchmarks/scoring_variants.py MODEL_DIR MVTEC_CATEGORY
Per-scale statistics come from the model's own held-out training images, as in
``fit``; metrics are at the masks' resolution, as ``cflowad test`` reports them.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from cflowad import CFlowAD
from cflowad.data import batches, find_test_set, find_training_images, load_mask
from cflowad.metrics import image_auroc, pixel_auroc


def _negative_log_likelihoods(
    model: CFlowAD, items: list[Path]
) -> tuple[list[Tensor], list[tuple[int, int]]]:
    per_batch, sizes = [], []
    with torch.inference_mode():
        for batch, original in batches(items, model.config.image_size, 16):
            per_batch.append([-ll for ll in model.net.log_likelihoods(batch)])
            sizes += original
    return [torch.cat(scale) for scale in zip(*per_batch, strict=True)], sizes


def main() -> None:
    model = CFlowAD.load(sys.argv[1])
    data = Path(sys.argv[2])
    size = model.config.image_size
    _, held_out = model._split(find_training_images(data))
    held, _ = _negative_log_likelihoods(model, held_out)
    mean = [h.mean() for h in held]
    median = [h.median() for h in held]
    mad = [1.4826 * (h - m).abs().median() for h, m in zip(held, median, strict=True)]
    std = [h.std() for h in held]
    test = find_test_set(data)
    nll, sizes = _negative_log_likelihoods(model, test.images)
    masks = [
        np.zeros(s, bool) if p is None else load_mask(p, s)
        for p, s in zip(test.masks, sizes, strict=True)
    ]

    def up(x: Tensor, to: tuple[int, int]) -> Tensor:
        return F.interpolate(x[:, None], size=to, mode="bilinear", align_corners=False)[:, 0]

    scale_maps: dict[str, Callable[[int, Tensor], Tensor]] = {
        "centered": lambda k, x: x - mean[k],
        "zscore": lambda k, x: (x - mean[k]) / std[k],
        "robust": lambda k, x: (x - median[k]) / mad[k],
        "exp": lambda k, x: -torch.exp(-x + mean[k]),
    }
    for k in range(len(nll)):
        scale_maps[f"scale{k}"] = lambda j, x, k=k: (x - mean[j]) * (j == k)
    for name, per_scale in scale_maps.items():
        maps = sum(up(per_scale(k, x), size) for k, x in enumerate(nll))
        flat = maps.flatten(1)
        at_mask = [up(m[None], s)[0].numpy() for m, s in zip(maps, sizes, strict=True)]
        scores = {"max": flat.amax(1)}
        for top in (0.001, 0.01):
            count = max(1, round(top * flat.shape[1]))
            scores[f"top{top}"] = flat.topk(count, dim=1).values.mean(1)
        image = " ".join(
            f"{s}={image_auroc(v.numpy(), test.labels):.3f}" for s, v in scores.items()
        )
        print(f"{name:10s} pixel={pixel_auroc(at_mask, masks):.3f} {image}", flush=True)


if __name__ == "__main__":
    main()

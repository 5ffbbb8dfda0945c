"""Compare anomaly-map and image-score variants on one trained model (used to pick defaults).

Usage: python benchmarks/scoring_variants.py MODEL_DIR MVTEC_CATEGORY
Metrics are computed at the model's input resolution (fast, for ranking variants only).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from cflowad import CFlowAD
from cflowad.data import batches, find_test_set, load_mask, to_model_input
from cflowad.metrics import image_auroc, pixel_auroc


def _mask_at(path: Path | None, size: tuple[int, int]) -> np.ndarray:
    if path is None:
        return np.zeros(size, bool)
    mask = load_mask(path)[..., None].repeat(3, 2).astype(np.float32)
    return to_model_input(mask, size)[0].numpy() > 0.5


def main() -> None:
    model = CFlowAD.load(sys.argv[1])
    test = find_test_set(Path(sys.argv[2]))
    size = model.config.image_size
    per_scale = []
    with torch.inference_mode():
        for batch, _ in batches(test.images, size, 16):
            per_scale.append(model.net.log_likelihoods(batch))
    ll = [torch.cat([b[k] for b in per_scale]) for k in range(len(per_scale[0]))]
    masks = np.stack([_mask_at(p, size) for p in test.masks])
    mean, std = model.net.nll_mean, model.net.nll_std

    def up(x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]

    variants = {
        "zscore": sum(up((-lk - mean[k]) / std[k]) for k, lk in enumerate(ll)),
        "centered": sum(up(-lk - mean[k]) for k, lk in enumerate(ll)),
        "exp": -sum(up(torch.exp(lk + mean[k])) for k, lk in enumerate(ll)),
    }
    for k in range(len(ll)):
        variants[f"scale{k}"] = up((-ll[k] - mean[k]) / std[k])
    for name, maps in variants.items():
        flat = maps.flatten(1)
        pixel = pixel_auroc(maps.numpy(), masks)
        scores = {"max": flat.amax(1)}
        for top in (0.001, 0.01, 0.05):
            count = max(1, round(top * flat.shape[1]))
            scores[f"top{top}"] = flat.topk(count, dim=1).values.mean(1)
        image = " ".join(
            f"{s}={image_auroc(v.numpy(), test.labels):.3f}" for s, v in scores.items()
        )
        print(f"{name:10s} pixel={pixel:.3f} {image}", flush=True)


if __name__ == "__main__":
    main()

"""train --tune on a data set: what it chose on synthetic defects, and what the test
labels say of every candidate (for reporting only: nothing here feeds the choice).

Usage: python benchmarks/tune.py DATA OUT [--region SPEC]

Writes OUT/model (the tuned model), OUT/candidates/* (every trained candidate,
calibrated on half the held-out images) and OUT/tune.json: per candidate and scale
weighting, the synthetic figures --tune ranked by and the test set's image AUROC,
pixel AUROC and AUPRO at the model's input size (log-likelihoods computed once per
candidate, the weightings fused from them). The tuned model's full `cflowad test`
figures (at the masks' size) are what docs/benchmarks.md quotes.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from cflowad import CFlowAD
from cflowad.common.progress import Reporter
from cflowad.data.datasets import find_test_set, find_training_images, load_mask
from cflowad.data.images import batches
from cflowad.method.config import Config
from cflowad.results.metrics import aupro, image_auroc, pixel_auroc
from cflowad.selection.tune import tune, weightings


@torch.inference_mode()
def test_figures(model: CFlowAD, data: Path) -> dict[str, dict[str, float]]:
    test = find_test_set(data)
    size = model.image_size
    parts, masks = [], []
    for batch, _ in batches(test.images, size, 16):
        parts.append(model.net.log_likelihoods(batch))
    lls = [torch.cat(s) for s in zip(*parts, strict=True)]
    for path in test.masks:
        if path is None:
            masks.append(np.zeros(size, bool))
        else:
            mask = load_mask(path, None).astype(np.float32)
            masks.append(
                F.interpolate(torch.from_numpy(mask)[None, None], size=size, mode="nearest")[
                    0, 0
                ].numpy()
                > 0.5
            )
    out = {}
    for name, weights in weightings(len(model.net.decoders)):
        model.net.scale_weights = list(weights or [1.0] * len(model.net.decoders))
        maps = model.net.raw_map(lls)
        scores = model.net.raw_score(maps).numpy()
        maps_list = list(maps.numpy())
        out[name] = {
            "image_auroc": round(image_auroc(scores, test.labels), 4),
            "pixel_auroc": round(pixel_auroc(maps_list, masks), 4),
            "aupro": round(aupro(maps_list, masks), 4),
        }
    return out


def main() -> None:
    data, out = Path(sys.argv[1]), Path(sys.argv[2])
    region = sys.argv[sys.argv.index("--region") + 1] if "--region" in sys.argv else None
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    model = tune(
        Config(),
        find_training_images(data),
        "cpu",
        Reporter(enabled=True),
        region=region,
        keep=out / "candidates",
    )
    seconds = time.perf_counter() - start
    model.save(out / "model")
    rows = model.training["tune"]["candidates"]
    for folder in sorted((out / "candidates").iterdir()):
        candidate = CFlowAD.load(folder, device="cpu")
        figures = test_figures(candidate, data)
        for row in rows:
            if row.get("skipped") or f"{row['decoder']}-{row['size']}" != folder.name:
                continue
            row["test"] = figures[row["scale_weights"]]
    result = {"data": str(data), "tune_seconds": round(seconds, 1), "candidates": rows}
    (out / "tune.json").write_text(json.dumps(result, indent=2))
    print(f"tune {seconds:.0f} s")
    for row in rows:
        if row.get("skipped"):
            print(row["decoder"], row["size"], "skipped")
            continue
        t = row["test"]
        print(
            f"{'*' if row['chosen'] else ' '} {row['decoder']:8} {row['size']:8} "
            f"{row['scale_weights']:12} synthetic {row['image_auroc']:.3f} "
            f"{row['pixel_auroc']:.3f} {row['aupro']:.3f} ({row['criterion']:.3f})  "
            f"test {t['image_auroc']:.3f} {t['pixel_auroc']:.3f} {t['aupro']:.3f}  "
            f"{row['train_seconds']:.0f} s"
        )


if __name__ == "__main__":
    main()

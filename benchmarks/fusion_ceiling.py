"""How far could any weighting of the scales go? An oracle on test labels, for reporting only.

Usage: python benchmarks/fusion_ceiling.py MODEL_DIR DATA [--parts 12] [--targets I,P,A]
       [--out FILE]

Never a way to choose a default: it reads the test set's labels. It answers one
question about a trained model: is there *any* fixed weighting of its per-scale
terms ``1 - exp(min(0, l_k - m_k))`` (the kept fusion's terms, with the model's own
``m_k``) under which image AUROC (the map's maximum), pixel AUROC and AUPRO reach
the given targets, at the masks' resolution as ``cflowad test`` measures them?
Every weighting in steps of 1 / ``--parts`` (zero weights included, so each scale
alone is a corner) is scored. The report gives the best of each metric over the
grid, and the weighting whose worst margin to the targets is largest: if that margin
is negative, no reweighting of these flows reaches all three targets, even one
chosen on the test labels themselves.

Resizing is linear, so each scale's term is resized to the mask once and every
weighting is a weighted sum of those.
"""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from cflowad import CFlowAD
from cflowad.data.datasets import find_test_set, load_mask
from cflowad.data.images import batches
from cflowad.results.metrics import aupro, image_auroc, pixel_auroc


def option(name: str, default: str) -> str:
    return sys.argv[sys.argv.index(name) + 1] if name in sys.argv else default


def scale_terms(model: CFlowAD, images: list[Path]) -> tuple[list[list[np.ndarray]], list]:
    """Per image, each scale's term at the image's own resolution; and the shapes."""
    net = model.net
    out: list[list[np.ndarray]] = []
    with torch.inference_mode():
        for batch, sizes in batches(images, model.image_size, 16):
            ls = net.log_likelihoods(batch)
            terms = [1 - torch.exp((ll - net.reference[k]).clamp(max=0)) for k, ll in enumerate(ls)]
            for i, (height, width) in enumerate(sizes):
                per_scale = []
                for t in terms:
                    full = F.interpolate(
                        t[i][None, None],
                        size=model.image_size,
                        mode="bilinear",
                        align_corners=False,
                    )
                    own = F.interpolate(
                        full, size=(height, width), mode="bilinear", align_corners=False
                    )
                    per_scale.append(own[0, 0].numpy())
                out.append(per_scale)
            print(f"  scored {len(out)} / {len(images)}", end="\r", flush=True)
    print()
    return out, [t[0].shape for t in out]


def main() -> None:
    model = CFlowAD.load(sys.argv[1], device="cpu")
    test = find_test_set(Path(sys.argv[2]))
    targets = [float(x) for x in option("--targets", "0,0,0").split(",")]
    terms, shapes = scale_terms(model, list(test.images))
    masks = [
        np.zeros(shape, bool) if path is None else load_mask(path, shape)
        for shape, path in zip(shapes, test.masks, strict=True)
    ]
    scales = len(terms[0])
    n = int(option("--parts", "12"))
    grid = [w for w in itertools.product(range(n + 1), repeat=scales) if sum(w) == n]
    rows = []
    for w in grid:
        maps = [sum(wk / n * t for wk, t in zip(w, per, strict=True)) for per in terms]
        scores = np.array([m.max() for m in maps])
        figures = (image_auroc(scores, test.labels), pixel_auroc(maps, masks), aupro(maps, masks))
        margin = min(f - t for f, t in zip(figures, targets, strict=True))
        rows.append({"weights": [wk / n for wk in w], "figures": figures, "margin": margin})
        print(
            " ".join(f"{wk / n:.2f}" for wk in w), " ".join(f"{f:.3f}" for f in figures), flush=True
        )
    names = ("image_auroc", "pixel_auroc", "aupro")
    summary = {
        "model": sys.argv[1],
        "targets": dict(zip(names, targets, strict=True)),
        "equal": next(r for r in rows if len(set(r["weights"])) == 1) if n % scales == 0 else None,
        "best_each": {
            name: max(rows, key=lambda r, j=j: r["figures"][j]) for j, name in enumerate(names)
        },
        "best_worst_margin": max(rows, key=lambda r: r["margin"]),
    }
    print(json.dumps(summary, indent=1))
    if "--out" in sys.argv:  # every weighting's figures, to compare sets weighting by weighting
        Path(option("--out", "")).write_text(json.dumps({**summary, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

"""Compare scale fusions and image scores on synthetic defects, never on test labels.

Usage: python benchmarks/fusion_validation.py MODEL_DIR DATA [--test] [--swap] [--faint]

The model's held-out good images (never trained on) are split in two: half A fits
each fusion's statistics, half B is scored clean and with synthetic defects pasted
in (cflowad.synthetic, three per image). Metrics at model resolution. ``--swap``
exchanges the halves; ``--faint`` blends each defect into its image at 20-60 % of
its strength (the full-strength defects score near 0.98 and barely rank fusions);
``--test`` also prints the same variants on DATA's test set, for reporting only.

Besides the per-scale terms summed (the fusions of 0.2), the kept likelihood terms
are also combined in other ways (0.5): fixed per-scale weights, power means, the
maximum, and a Gaussian blur of the fused map.
"""

from __future__ import annotations

import itertools
import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch import Tensor
from torch.nn import functional as F

from cflowad import CFlowAD, Config
from cflowad.data.datasets import find_test_set, find_training_images, load_mask
from cflowad.data.images import batches, load_image
from cflowad.data.synthetic import paste_defects
from cflowad.method.scoring import CFlowNet
from cflowad.results.metrics import aupro, image_auroc, pixel_auroc


class Loaded:
    """A model's config and network, whatever its calibration format (flows are what count)."""

    def __init__(self, directory: str) -> None:
        meta = json.loads((Path(directory) / "model.json").read_text())
        self.config = Config.from_dict(meta["config"])
        self.net = CFlowNet.build(self.config, pretrained=False)
        state = load_file(str(Path(directory) / "model.safetensors"))
        own = self.net.state_dict()
        self.net.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
        self.net.eval().refresh_conditions()

    def _split(self, items: list) -> tuple[list, list]:
        return CFlowAD._split(self, items)  # type: ignore[arg-type]


def log_likelihoods(model: Loaded, items: list) -> list[Tensor]:
    """Per scale, (N, H_k, W_k) log p / D."""
    out = []
    with torch.inference_mode():
        for batch, _ in batches(items, model.config.image_size, 16):
            out.append(model.net.log_likelihoods(batch))
    return [torch.cat(s).double() for s in zip(*out, strict=True)]


def up(x: Tensor, size: tuple[int, int]) -> Tensor:
    return F.interpolate(x[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def fusions(fit: list[Tensor]) -> dict[str, Callable[[list[Tensor]], list[Tensor]]]:
    """Per-scale terms (before upsampling and summing), each fitted on good images ``fit``."""
    flat = [f.flatten() for f in fit]
    med = [f.median() for f in flat]
    mad = [1.4826 * (f - m).abs().median() for f, m in zip(flat, med, strict=True)]
    top = [f.max() for f in flat]
    q99 = [
        torch.quantile(f[torch.randperm(len(f))[:1_000_000]].float(), 0.99).double() for f in flat
    ]
    q999 = [
        torch.quantile(f[torch.randperm(len(f))[:1_000_000]].float(), 0.999).double() for f in flat
    ]
    sorted_nll = [torch.sort(-f).values for f in flat]

    def survival(k: int, nll: Tensor) -> Tensor:
        n = len(sorted_nll[k])
        above = n - torch.searchsorted(sorted_nll[k], nll.contiguous(), right=False)
        return -torch.log((above + 1.0) / (n + 1.0))

    out: dict[str, Callable[[list[Tensor]], list[Tensor]]] = {
        "robust_z": lambda ls: [(m - ll) / s for ll, m, s in zip(ls, med, mad, strict=True)],
        "lik_max": lambda ls: [1 - torch.exp(ll - t) for ll, t in zip(ls, top, strict=True)],
        "lik_q99": lambda ls: [
            1 - torch.exp((ll - t).clamp(max=0)) for ll, t in zip(ls, q99, strict=True)
        ],
        "lik_q999": lambda ls: [
            1 - torch.exp((ll - t).clamp(max=0)) for ll, t in zip(ls, q999, strict=True)
        ],
        "lik_median": lambda ls: [
            1 - torch.exp((ll - m).clamp(max=0)) for ll, m in zip(ls, med, strict=True)
        ],
        "lik_mad": lambda ls: [
            1 - torch.exp(((ll - m) / s).clamp(max=0))
            for ll, m, s in zip(ls, med, mad, strict=True)
        ],
        "neg_log_pvalue": lambda ls: [survival(k, -ll) for k, ll in enumerate(ls)],
        "nll": lambda ls: [-ll for ll in ls],
    }
    for k in range(len(fit)):
        out[f"only_{k}"] = lambda ls, k=k: [
            (m - ll) / s * (j == k) for j, (ll, m, s) in enumerate(zip(ls, med, mad, strict=True))
        ]
    return out


def fused(terms: list[Tensor], size: tuple[int, int]) -> Tensor:
    return sum(up(t, size) for t in terms)


def blur(maps: Tensor, sigma: float) -> Tensor:
    """(N, H, W) maps smoothed by a separable Gaussian of ``sigma`` pixels, edges reflected."""
    radius = int(np.ceil(4 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    out = []
    for chunk in maps.float().split(16):  # convolution's buffers grow with the kernel
        padded = F.pad(chunk[:, None], (radius, radius, radius, radius), mode="reflect")
        rows = F.conv2d(padded, kernel.view(1, 1, 1, -1))
        out.append(F.conv2d(rows, kernel.view(1, 1, -1, 1))[:, 0])
    return torch.cat(out).to(maps.dtype)


def combinations(
    kept: Callable[[list[Tensor]], list[Tensor]], scales: int
) -> dict[str, Callable[[list[Tensor], tuple[int, int]], Tensor]]:
    """The kept likelihood terms (``fusions``' "lik_q999") combined otherwise than by their mean."""

    def terms(ls: list[Tensor], size: tuple[int, int]) -> list[Tensor]:
        return [up(t, size) for t in kept(ls)]

    out: dict[str, Callable[[list[Tensor], tuple[int, int]], Tensor]] = {}
    for sigma in (2.0, 4.0, 8.0):
        out[f"blur_{sigma:g}px"] = lambda ls, size, s=sigma: blur(sum(terms(ls, size)) / len(ls), s)
    for power in (2, 4, 8):
        out[f"power_mean_{power}"] = lambda ls, size, p=power: (
            (sum(t**p for t in terms(ls, size)) / len(ls)) ** (1 / p)
        )
    out["max"] = lambda ls, size: torch.stack(terms(ls, size)).amax(0)
    out["geometric"] = lambda ls, size: torch.exp(
        sum(torch.log(t.clamp(min=1e-6)) for t in terms(ls, size)) / len(ls)
    )
    if scales == 3:  # every weighting in steps of 1/6, none below 1/6
        for w in itertools.product(range(1, 5), repeat=3):
            if sum(w) == 6:
                out["weights_" + "".join(map(str, w))] = lambda ls, size, w=w: (
                    sum(wk * t for wk, t in zip(w, terms(ls, size), strict=True)) / 6
                )
    return out


def image_scores(maps: Tensor, nll_sum: Tensor) -> dict[str, Tensor]:
    flat = maps.flatten(1)
    count = max(1, round(0.01 * flat.shape[1]))
    raw = nll_sum.flatten(1)
    return {
        "max": flat.amax(1),
        "top1%": flat.topk(count, 1).values.mean(1),
        "nll_top1%": raw.topk(count, 1).values.mean(1),
    }


def report(
    name: str,
    variants: dict,
    ls: list[Tensor],
    labels: np.ndarray,
    masks: list[np.ndarray] | None,
    size: tuple[int, int],
) -> None:
    nll_sum = fused([-ll for ll in ls], size)
    print(f"== {name}: {len(labels)} images, {int(labels.sum())} defective", flush=True)
    for vname, fn in variants.items():
        maps = fn(ls, size)
        scores = image_scores(maps, nll_sum)
        line = " ".join(f"{k}={image_auroc(v.numpy(), labels):.3f}" for k, v in scores.items())
        if masks is not None:
            m = [x.float().numpy() for x in maps]
            line = f"pix={pixel_auroc(m, masks):.3f} pro={aupro(m, masks):.3f} " + line
        print(f"{vname:15s} {line}", flush=True)


def main() -> None:
    model = Loaded(sys.argv[1])
    data = Path(sys.argv[2])
    size = model.config.image_size
    _, held = model._split(find_training_images(data))
    half_a, half_b = held[: len(held) // 2], held[len(held) // 2 :]
    if "--swap" in sys.argv:
        half_a, half_b = half_b, half_a
    fit = log_likelihoods(model, half_a)
    terms = fusions(fit)
    variants = {name: lambda ls, size, fn=fn: fused(fn(ls), size) for name, fn in terms.items()}
    variants.update(combinations(terms["lik_q999"], len(fit)))
    clean = [load_image(p) for p in half_b]
    defective, masks = [], []
    rng = np.random.default_rng(7)
    for seed in (1, 2, 3):
        d, m, _ = paste_defects(clean, seed=seed, kinds=("cutpaste", "noise", "scratch"))
        if "--faint" in sys.argv:
            d = [c + rng.uniform(0.2, 0.6) * (x - c) for c, x in zip(clean, d, strict=True)]
            m = [np.abs(x - c).max(axis=2) > 1e-3 for c, x in zip(clean, d, strict=True)]
        defective += d
        masks += m
    items = clean + defective
    labels = np.array([0] * len(clean) + [1] * len(defective))
    all_masks = [np.zeros(c.shape[:2], bool) for c in clean] + masks
    small = [
        F.interpolate(torch.from_numpy(m[None, None].astype(np.float32)), size=size)[0, 0].numpy()
        > 0.5
        for m in all_masks
    ]
    report("synthetic", variants, log_likelihoods(model, items), labels, small, size)
    if "--test" in sys.argv:
        test = find_test_set(data)
        gts = []
        for p in test.masks:
            if p is None:
                gts.append(np.zeros(size, bool))
                continue
            m = load_mask(p).astype(np.float32)
            gts.append(
                F.interpolate(torch.from_numpy(m[None, None]), size=size)[0, 0].numpy() > 0.5
            )
        report("test", variants, log_likelihoods(model, test.images), test.labels, gts, size)


if __name__ == "__main__":
    main()

"""``train --tune``: a few candidate models, chosen between on synthetic defects only.

One default cannot fit every part (docs/benchmarks.md: magnetic_tile's large faint
defects prefer a smaller input and the Gaussian decoder, visa_capsules' small ones the
flows and the fine scale), and a user with only good images cannot choose by hand. So:

1. The training images are split as :meth:`CFlowAD.fit` splits them; the held-out
   ones are split again, seeded: half A calibrates each candidate, half B validates.
2. Candidates (:func:`candidates`): the flows and the Gaussian decoder, each at the
   configured input size and at 7/8 and 5/4 of it (the scale at which the features
   see the part: smaller for large faint defects, larger for specks); for photos of
   at least twice the input's pixels, the flows at the photos' own size in tiles
   instead of the flows at 5/4. Each model
   trained is also read with three scale weightings (equal, the finest scale double,
   the coarsest double), which need no training: only the fusion changes.
3. Validation: B's images as they are, and each with one synthetic defect of each of
   two seeds (:mod:`cflowad.data.synthetic`: cut-paste, noise, scratches, specks,
   faint stains). Image AUROC over clean and defective, pixel AUROC and AUPRO over
   the defective maps, all at the model's input size (masks max-pooled to it, so a
   speck stays one pixel and is not rounded away).
4. The criterion: the mean of image AUROC and AUPRO (pixel AUROC is reported; it
   sits near 0.99 on most data and ranks little). Ties keep the earlier candidate:
   the default comes first.
5. The winner is recalibrated on all the held-out images (A and B), as ``fit`` would
   have, and every candidate's figures go into model.json (``training.tune``).

No test image is read: everything comes from the training folder.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from cflowad.common.errors import UserError
from cflowad.common.progress import Reporter
from cflowad.data.images import ImageInput, batches, image_sizes, load_image
from cflowad.data.synthetic import paste_defects
from cflowad.engine.model import CFlowAD
from cflowad.method.config import Config
from cflowad.results.metrics import aupro, image_auroc, pixel_auroc

__all__ = ["CRITERION", "Candidate", "candidates", "tune"]

CRITERION = "mean of image AUROC and AUPRO on synthetic defects"
_SEEDS = (0, 1)  # one defect per seed and held-out image
_MIN_HELD = 6  # held-out images: 3 to calibrate, 3 to validate at the least
# images with this many times the input's pixels get a candidate at their own size
NATIVE_FACTOR = 2


@dataclass(frozen=True)
class Candidate:
    """One model to train: a decoder at an input size (height, width), maybe in tiles."""

    decoder: str
    image_size: tuple[int, int]
    tile_size: int | None = None

    def config(self, base: Config) -> Config:
        """``base`` with this decoder and input size (a square one still takes the
        training images' aspect ratio, as ``fit`` does; a tiled one is the images' own)."""
        if self.tile_size is not None:
            return dataclasses.replace(
                base,
                decoder=self.decoder,
                image_size=self.image_size,
                aspect="fixed",
                tile_size=self.tile_size,
            )
        return dataclasses.replace(base, decoder=self.decoder, image_size=self.image_size)


def candidates(config: Config, sizes: Sequence[tuple[int, int]] = ()) -> list[Candidate]:
    """The trained candidates, cheapest first after the configured model itself.

    Input sizes are the configured one and 7/8 and 5/4 of it, in multiples of the
    largest stride; the Gaussian decoder fits in seconds, so its three sizes come
    before the flows' other two. When the training images (their ``sizes``) have at
    least :data:`NATIVE_FACTOR` times the configured input's pixels, the flows' 5/4
    gives way to the flows at the images' own size in tiles of the configured shorter
    side: the same lever (more pixels on a defect), pulled all the way, at a similar
    cost (the flows train on the same number of vectors; the encoder sees more).
    """
    step = max(config.strides)
    inputs = [config.image_size]
    for factor in (7 / 8, 5 / 4):
        height, width = (
            max(step, step * round(side * factor / step)) for side in config.image_size
        )
        if (height, width) not in inputs:
            inputs.append((height, width))
    other = "gaussian" if config.decoder == "flow" else "flow"
    chosen = [
        Candidate(config.decoder, config.image_size),
        *(Candidate(other, s) for s in inputs),
        *(Candidate(config.decoder, s) for s in inputs[1:]),
    ]
    if sizes and config.tile_size is None:
        native = dataclasses.replace(config, aspect="native").fit_to(sizes).image_size
        resolved = config.fit_to(sizes).image_size
        if native[0] * native[1] >= NATIVE_FACTOR * resolved[0] * resolved[1]:
            larger = ("flow", inputs[-1])  # the flows at 5/4, never the configured model
            chosen = chosen[:1] + [c for c in chosen[1:] if (c.decoder, c.image_size) != larger]
            tile = max(min(config.image_size), 4 * step)  # the smallest tile allowed
            chosen.append(Candidate("flow", native, tile))
    return chosen


def weightings(scales: int) -> list[tuple[str, tuple[float, ...] | None]]:
    """Scale weightings read from every trained model: equal, finest or coarsest double."""
    if scales == 1:
        return [("equal", None)]
    finest = (2.0,) + (1.0,) * (scales - 1)
    return [("equal", None), ("finest x2", finest), ("coarsest x2", finest[::-1])]


def tune(
    config: Config,
    items: Sequence[ImageInput],
    device: str,
    reporter: Reporter,
    budget_minutes: float | None = None,
    region: str | Path | np.ndarray | None = None,
    keep: Path | None = None,
) -> CFlowAD:
    """Train the candidates, keep the best on synthetic defects, recalibrate it.

    Args:
        config: the configuration the candidates vary (decoder, input size, weights).
        items: the training images (a test set is never read).
        device: where to train.
        reporter: progress, and the table of candidates at the end.
        budget_minutes: skip a candidate whose training would end past this (the
            first, the configured model, always trains).
        region: the inspection region, for every candidate.
        keep: save every trained candidate (calibrated on half the held-out images)
            in ``keep/<decoder>-<WIDTHxHEIGHT>``, to study them (benchmarks/tune.py).

    Returns:
        The chosen model, fitted and calibrated on every held-out image, with
        ``training["tune"]``: the criterion, the choice and every candidate's figures.
    """
    start = time.perf_counter()
    sizes = image_sizes(items)
    if config.aspect == "native":  # the candidates' sizes are fractions of the native one
        config = config.fit_to(sizes)
    splitter = CFlowAD(config, device=device)
    train_index, held_index = splitter.split_holdout(list(range(len(items))))
    del splitter
    if config.calibrate_on_train or len(held_index) < _MIN_HELD:
        raise UserError(
            f"option --tune needs at least {_MIN_HELD} held-out images (it keeps half to "
            f"validate on synthetic defects), got {len(held_index)}: more training images or "
            "a larger --holdout-fraction, and no --calibrate-on-train"
        )
    order = np.random.default_rng(config.seed).permutation(held_index).tolist()
    fit_index, check_index = order[: len(order) // 2], order[len(order) // 2 :]
    train = [items[i] for i in train_index]
    held = [items[i] for i in held_index]
    fit_part = [items[i] for i in fit_index]
    check_part = [items[i] for i in check_index]
    fit_sizes = [sizes[i] for i in [*train_index, *fit_index]]
    clean = [load_image(item) for item in check_part]
    defective, masks = [], []
    for seed in _SEEDS:
        images, pasted, _ = paste_defects(clean, seed=config.seed * 100 + seed)
        defective += images
        masks += pasted
    reporter.log(
        f"--tune: {len(train)} training images, {len(fit_part)} to calibrate each candidate, "
        f"{len(clean)} to validate ({len(defective)} with synthetic defects); {CRITERION}"
    )
    # each candidate calibrates on half the held-out images: its warning that they are
    # too few for the false-positive target would repeat what the final calibration says
    quiet = copy.copy(reporter)
    quiet.show_warnings = False
    rows: list[dict[str, Any]] = []
    best: tuple[dict[str, Any], CFlowAD, tuple[float, ...] | None] | None = None
    flow_seconds: float | None = None
    for index, candidate in enumerate(candidates(config, sizes)):
        elapsed = time.perf_counter() - start
        estimate = (flow_seconds or 0.0) if candidate.decoder == "flow" else 0.0
        if index > 0 and budget_minutes is not None and elapsed + estimate > budget_minutes * 60:
            size = _size(candidate.image_size)
            reporter.log(f"--tune: {candidate.decoder} at {size} skipped (--tune-budget)")
            rows.append(
                {
                    "decoder": candidate.decoder,
                    "size": size,
                    "tile_size": candidate.tile_size,
                    "skipped": True,
                    "chosen": False,
                }
            )
            continue
        tiles = "" if candidate.tile_size is None else f" in tiles of {candidate.tile_size}"
        reporter.log(
            f"--tune: candidate {index + 1}, {candidate.decoder} at "
            f"{_size(candidate.image_size)}{tiles}"
        )
        began = time.perf_counter()
        model = CFlowAD(candidate.config(config), device=device)
        model.fit_split(train, fit_part, quiet, region, fit_sizes)
        seconds = time.perf_counter() - began
        if keep is not None:
            model.save(keep / f"{candidate.decoder}-{_size(model.image_size)}")
        if candidate.decoder == "flow" and flow_seconds is None:
            flow_seconds = seconds
        for name, weights, figures in _validate(model, clean, defective, masks):
            row = {
                "decoder": candidate.decoder,
                "size": _size(model.image_size),
                "tile_size": candidate.tile_size,
                "scale_weights": name,
                **figures,
                "train_seconds": round(seconds, 1),
                "chosen": False,
            }
            rows.append(row)
            if best is None or figures["criterion"] > best[0]["criterion"]:
                best = (row, model, weights)
    assert best is not None  # the first candidate always runs
    best_row, chosen, weights = best
    best_row["chosen"] = True
    chosen.config = dataclasses.replace(chosen.config, scale_weights=weights)
    chosen.net.set_scale_weights(weights, len(chosen.config.strides))
    chosen.calibration = chosen.calibrate(held, reporter)
    chosen.training = {
        **chosen.training,
        "n_calibration": len(held),
        "total_seconds": round(time.perf_counter() - start, 2),
        "tune": {
            "criterion": CRITERION,
            "validation_images": {"clean": len(clean), "defective": len(defective)},
            "candidates": rows,
        },
    }
    return chosen


def _size(image_size: tuple[int, int]) -> str:
    """WIDTHxHEIGHT, as --image-size takes it (a square one before the aspect is fitted)."""
    return f"{image_size[1]}x{image_size[0]}"


@torch.inference_mode()
def _validate(
    model: CFlowAD,
    clean: list[np.ndarray],
    defective: list[np.ndarray],
    masks: list[np.ndarray],
) -> list[tuple[str, tuple[float, ...] | None, dict[str, float]]]:
    """Each weighting's figures on the validation images, at the model's input size."""
    net, size = model.net, model.image_size
    lls = [_log_likelihoods(model, images) for images in (clean, defective)]
    small = [
        F.adaptive_max_pool2d(torch.from_numpy(m).float()[None, None], size)[0, 0].numpy() > 0
        for m in masks
    ]
    if model.region is not None:  # a defect outside the region cannot be seen: not counted
        small = [m & model.region for m in small]
    keep = [i for i, m in enumerate(small) if m.any()]
    out = []
    for name, weights in weightings(len(net.decoders)):
        net.set_scale_weights(weights, len(net.decoders))
        good_scores = net.raw_score(net.raw_map(lls[0])).numpy()
        maps = net.raw_map(lls[1]).numpy()[keep]
        bad_scores = net.raw_score(torch.from_numpy(maps)).numpy()
        labels = np.r_[np.zeros(len(good_scores)), np.ones(len(bad_scores))]
        image = image_auroc(np.r_[good_scores, bad_scores], labels)
        truth = [small[i] for i in keep]
        pro = aupro(list(maps), truth)
        figures = {
            "image_auroc": round(image, 4),
            "pixel_auroc": round(pixel_auroc(list(maps), truth), 4),
            "aupro": round(pro, 4),
            "criterion": round((image + pro) / 2, 4),
        }
        out.append((name, weights, figures))
    net.set_scale_weights(model.config.scale_weights, len(net.decoders))
    return out


def _log_likelihoods(model: CFlowAD, images: list[np.ndarray]) -> list[Tensor]:
    """Per scale, (N, H_k, W_k) log-likelihoods per dimension of ``images``."""
    parts = [
        model.net.log_likelihoods(batch.to(model.device))
        for batch, _ in batches(images, model.image_size, 16)
    ]
    return [torch.cat(scale).cpu() for scale in zip(*parts, strict=True)]

"""Metrics against brute-force references written here, sklearn, and closed forms."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from cflowad.results.metrics import aupro, f1_max, image_auroc, pixel_auroc, pro_curve


def brute_pro_curve(maps, masks):
    """Threshold sweep with explicit per-region loops, straight from the MVTec definition."""
    all_scores = np.concatenate([m.ravel() for m in maps])
    regions, negatives = [], []
    for m, k in zip(maps, masks, strict=True):
        labelled, count = ndimage.label(k, structure=np.ones((3, 3)))
        regions += [m[labelled == r] for r in range(1, count + 1)]
        negatives.append(m[k == 0])
    negatives = np.concatenate(negatives)
    points = [(0.0, 0.0)]
    for t in np.unique(all_scores)[::-1]:
        fpr = float((negatives >= t).mean())
        pro = float(np.mean([(r >= t).mean() for r in regions]))
        points.append((fpr, pro))
    return np.array(points)


def brute_aupro(maps, masks, limit):
    curve = brute_pro_curve(maps, masks)
    x, y = curve[:, 0], curve[:, 1]
    inside = int(np.searchsorted(x, limit, side="right"))
    xs, ys = list(x[:inside]), list(y[:inside])
    if xs[-1] < limit:
        t = (limit - x[inside - 1]) / (x[inside] - x[inside - 1])
        xs.append(limit)
        ys.append(y[inside - 1] + t * (y[inside] - y[inside - 1]))
    return np.trapezoid(ys, xs) / limit


def random_case(seed, sizes=((12, 15), (9, 9), (14, 11))):
    rng = np.random.default_rng(seed)
    maps, masks = [], []
    for h, w in sizes:
        maps.append(np.round(rng.random((h, w)) * 6) / 6)  # heavy ties
        mask = np.zeros((h, w), np.uint8)
        for _ in range(2):
            y, x = rng.integers(0, h - 3), rng.integers(0, w - 3)
            mask[y : y + rng.integers(1, 4), x : x + rng.integers(1, 4)] = 255
        mask[0, 0] = 0
        maps[-1] = maps[-1] + 0.3 * (mask > 0) * rng.random((h, w)).round(1)
        masks.append(mask)
    return maps, masks


@pytest.mark.parametrize("seed", range(6))
def test_pro_curve_and_aupro_match_brute_force(seed):
    maps, masks = random_case(seed)
    fpr, pro = pro_curve(maps, masks)
    reference = brute_pro_curve(maps, masks)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(pro) >= 0)
    for f, p in reference:  # every threshold's point lies on one of our curve's segments
        on_segment = [
            fpr[i] <= f <= fpr[i + 1]
            and np.isclose(
                np.interp(f, fpr[i : i + 2], pro[i : i + 2]) if fpr[i + 1] > fpr[i] else p, p
            )
            and min(pro[i], pro[i + 1]) - 1e-12 <= p
            and p <= max(pro[i], pro[i + 1]) + 1e-12
            for i in range(len(fpr) - 1)
        ]
        assert any(on_segment), (f, p)
    for limit in (0.05, 0.3, 0.77, 1.0):
        assert aupro(maps, masks, limit) == pytest.approx(brute_aupro(maps, masks, limit), abs=1e-9)


@pytest.mark.parametrize("seed", range(4))
def test_pixel_auroc_matches_sklearn_with_ties(seed):
    maps, masks = random_case(seed)
    expected = roc_auc_score(
        np.concatenate([m.ravel() for m in masks]) > 0, np.concatenate([m.ravel() for m in maps])
    )
    assert pixel_auroc(maps, masks) == pytest.approx(expected, abs=1e-12)


def test_closed_forms():
    mask = np.zeros((20, 20), np.uint8)
    mask[5:9, 5:9] = 1
    mask[15:, 15:] = 1
    perfect = mask.astype(float)
    assert aupro([perfect], [mask]) == pytest.approx(1.0, abs=1e-12)
    assert pixel_auroc([perfect], [mask]) == pytest.approx(1.0, abs=1e-12)
    assert aupro([np.zeros((20, 20))], [mask]) == pytest.approx(0.15)
    assert aupro([np.zeros((20, 20))], [mask], fpr_limit=1.0) == pytest.approx(0.5)
    assert pixel_auroc([np.zeros((20, 20))], [mask]) == pytest.approx(0.5)


def test_regions_are_eight_connected_and_weighted_equally():
    mask = np.zeros((6, 6), np.uint8)
    mask[0, 0] = mask[1, 1] = 1  # diagonal neighbours: one region of 2 pixels
    mask[4:6, 2:6] = 1  # a second region of 8 pixels
    scores = np.zeros((6, 6))
    scores[0, 0] = scores[1, 1] = 1.0  # only the small region is found
    fpr, pro = pro_curve([scores], [mask])
    assert pro[np.searchsorted(fpr, 0, side="right") - 1] == pytest.approx(0.5)


def test_image_metrics():
    scores = np.array([0.1, 0.2, 0.3, 0.9, 0.5, 0.25])
    labels = np.array([0, 0, 0, 1, 1, 1])
    assert image_auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores))
    f1, threshold = f1_max(scores, labels)
    best = max(
        2 * ((scores >= t) & (labels == 1)).sum() / ((scores >= t).sum() + (labels == 1).sum())
        for t in scores
    )
    assert f1 == pytest.approx(best)
    predicted = scores >= threshold
    assert 2 * (predicted & (labels == 1)).sum() / (predicted.sum() + 3) == pytest.approx(f1)


def test_maps_of_different_sizes_and_errors():
    maps, masks = random_case(0, sizes=((5, 30), (40, 4)))
    assert 0 <= aupro(maps, masks) <= 1
    with pytest.raises(ValueError, match="shape"):
        pixel_auroc([np.zeros((3, 3))], [np.zeros((3, 4))])
    with pytest.raises(ValueError, match="both"):
        image_auroc(np.ones(3), np.ones(3))

"""The demo's data split: real ELPV cells from PyPI, no test image in training."""

from __future__ import annotations

import numpy as np

from cflowad.data.images import load_image
from cflowad.results.demo import elpv_split


def test_elpv_split_is_disjoint_seeded_and_labelled():
    train, test, labels = elpv_split()
    assert not set(train) & set(test)
    assert len(test) == len(labels) and labels.sum() > 100 and (labels == 0).sum() > 100
    assert len(train) == round(0.75 * (len(train) + (labels == 0).sum()))
    assert elpv_split()[0] == train
    cell = load_image(train[0])
    assert cell.shape == (300, 300, 3) and np.ptp(cell) > 0.1

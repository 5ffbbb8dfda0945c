"""The drift alarm: quiet on a stable line (defects included), quick on a change of light."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image, ImageFilter

from cflowad.common.errors import UserError
from cflowad.line.drift import DriftMonitor, DriftSettings
from cflowad.line.watch import watch_folder
from cflowad.method.calibration import Calibration


def _scores(rng: np.random.Generator, n: int, shift: float = 0.0) -> np.ndarray:
    """Raw scores in (0, 1) as the model gives them: a logistic of a normal variable."""
    return 1 / (1 + np.exp(-(rng.normal(2.0 + shift, 0.5, n))))


def test_quiet_on_a_stable_line_even_with_a_fifth_of_defects():
    rng = np.random.default_rng(0)
    for seed in range(5):
        held = _scores(np.random.default_rng(100 + seed), 70)
        monitor = DriftMonitor(list(held))
        stream = _scores(rng, 20_000)
        defects = rng.random(stream.size) < 0.2
        stream[defects] = 0.999
        trips = [e for e in map(monitor.add, stream) if e is not None]
        assert trips == [], trips[:1]
        assert 0.3 < (monitor.quantile or 0) < 0.8


def test_a_change_of_light_trips_within_half_a_window_and_clears_after():
    rng = np.random.default_rng(1)
    monitor = DriftMonitor(list(_scores(rng, 70)), DriftSettings(window=100))
    events = [monitor.add(s) for s in _scores(rng, 500)]
    assert not any(events)
    shifted = [monitor.add(s) for s in _scores(rng, 300, shift=1.5)]
    tripped = [i for i, e in enumerate(shifted) if e]
    assert tripped and tripped[0] <= 60 and shifted[tripped[0]]["state"] == "tripped"
    assert "higher" in shifted[tripped[0]]["message"]
    back = [monitor.add(s) for s in _scores(rng, 300)]
    cleared = [e for e in back if e]
    assert len(cleared) == 1 and cleared[0]["state"] == "cleared" and not monitor.tripped


def test_the_rank_is_the_mid_rank_of_the_median():
    monitor = DriftMonitor([0.1, 0.2, 0.3, 0.4], DriftSettings(window=10))
    for _ in range(10):
        monitor.add(0.25)
    assert monitor.quantile == 0.5  # two of four below
    for _ in range(10):
        monitor.add(0.3)
    assert monitor.quantile == pytest.approx((2 + 3) / 2 / 4)  # a tie counts half
    before_09 = Calibration.from_dict(
        {"reference": [1.0], "image_threshold_raw": 0.5, "pixel_threshold_raw": 0.5}
    )
    assert DriftMonitor.for_model(before_09) is None  # no held-out scores before 0.9
    assert DriftMonitor.for_model(None) is None
    with pytest.raises(UserError, match="drift-window"):
        DriftSettings(window=5)


def test_watch_writes_drift_records(trained_model, texture_dataset, tmp_path):
    """Good parts out of focus and noisy: the real model's scores rise, the alarm trips."""
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    inbox.mkdir()
    for k, path in enumerate(sorted((texture_dataset / "train" / "good").glob("*.png"))[:12]):
        blurred = Image.open(path).convert("RGB").filter(ImageFilter.GaussianBlur(3))
        pixels = np.asarray(blurred, dtype=np.float32)
        noisy = pixels + np.random.default_rng(k).normal(0, 25, pixels.shape)
        Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(inbox / f"{k:02d}.png")
    watch_folder(trained_model, inbox, out, once=True, settle=0, drift=DriftSettings(window=10))
    records = [json.loads(line) for line in (out / "drift.jsonl").read_text().splitlines()]
    assert records[0]["event"] == "drift" and records[0]["state"] == "tripped"
    assert records[0]["quantile"] > 0.95

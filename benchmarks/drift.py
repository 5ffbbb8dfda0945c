"""The drift alarm on real scores: false trips per hour on a stable line, and frames to
detect a change of light.

Scores a category's good test images (never seen in training or calibration) as they
are and changed as a line changes (light, sensor noise, focus), and its defective images.
A stable line is simulated by drawing from the good scores (and, with --defects, a
share of defect scores) at --fps for many hours; a change of light by switching to the
changed scores halfway through. The monitor only sees raw scores, so drawing them is
the same as scoring those images again.

    python benchmarks/drift.py MODEL ../shared/data/magnetic_tile --json drift.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

import cflowad
from cflowad.line.drift import DriftMonitor, DriftSettings


def load(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)


def as_image(pixels: np.ndarray) -> np.ndarray:
    return np.clip(pixels, 0, 255).astype(np.uint8)


# What changes on a line: the light (level, contrast, from one side), the sensor's gain
# (noise), the focus.
CHANGES = {
    "brighter, more contrast (x1.15 + 15)": lambda p: as_image(1.15 * load(p) + 15),
    "much brighter, more contrast (x1.4 + 40)": lambda p: as_image(1.4 * load(p) + 40),
    "darker (x0.6)": lambda p: as_image(0.6 * load(p)),
    "light from one side (0.5x to 1.5x across)": lambda p: as_image(
        load(p) * np.linspace(0.5, 1.5, load(p).shape[1])[None, :, None]
    ),
    "sensor noise (sd 12 levels)": lambda p: as_image(
        load(p) + np.random.default_rng(zlib.crc32(p.name.encode())).normal(0, 12, load(p).shape)
    ),
    "sensor noise (sd 25 levels)": lambda p: as_image(
        load(p) + np.random.default_rng(zlib.crc32(p.name.encode())).normal(0, 25, load(p).shape)
    ),
    "out of focus (Gaussian blur, radius 4)": lambda p: np.asarray(
        Image.open(p).convert("RGB").filter(ImageFilter.GaussianBlur(4))
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("category", type=Path)
    parser.add_argument("--fps", type=float, default=5)
    parser.add_argument("--hours", type=float, default=20)
    parser.add_argument("--defects", type=float, default=0.05, help="share of defective parts")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    model = cflowad.load(args.model, "cpu")
    held = model.calibration.holdout_raw_scores
    good_files = sorted((args.category / "test" / "good").iterdir())
    bad_files = sorted(
        p for d in (args.category / "test").iterdir() if d.name != "good" for p in d.iterdir()
    )
    good = model.predict(good_files).raw_scores
    bad = model.predict(bad_files).raw_scores
    settings = DriftSettings()
    rng = np.random.default_rng(0)

    def line(n: int, scores: np.ndarray) -> np.ndarray:
        drawn = rng.choice(scores, n)
        defective = rng.random(n) < args.defects
        drawn[defective] = rng.choice(bad, int(defective.sum()))
        return drawn

    per_hour = int(args.fps * 3600)
    trips = []
    for _ in range(int(args.hours)):
        monitor = DriftMonitor(held, settings)
        stable = line(per_hour, good)
        trips.append(sum(1 for s in stable if (e := monitor.add(s)) and e["state"] == "tripped"))
    threshold = model.calibration.image_threshold_raw
    changes = {}
    for name, change in CHANGES.items():
        changed = model.predict([change(p) for p in good_files])
        detect = []
        for _ in range(50):
            monitor = DriftMonitor(held, settings)
            for s in line(2 * settings.window, good):
                monitor.add(s)
            for k, s in enumerate(line(20 * settings.window, changed.raw_scores), 1):
                event = monitor.add(s)
                if event and event["state"] == "tripped":
                    detect.append(k)
                    break
        changes[name] = {
            "good_flagged": round(float(changed.anomalous.mean()), 4),
            "median_rank": round(
                float(np.searchsorted(sorted(held), np.median(changed.raw_scores)) / len(held)), 3
            ),
            "detected": f"{len(detect)} of 50",
            "frames_to_detect_median": statistics.median(detect) if detect else None,
            "frames_to_detect_max": max(detect) if detect else None,
        }
    result = {
        "model": str(args.model),
        "held_out_images": len(held),
        "window": settings.window,
        "fps": args.fps,
        "defect_share": args.defects,
        "hours_simulated": args.hours,
        "false_trips_per_hour": statistics.mean(trips),
        "false_trips_max_in_an_hour": max(trips),
        "good_flagged_as_trained": round(float(np.mean(good > threshold)), 4),
        "changes": changes,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

"""``cflowad demo``: CFLOW-AD on real electroluminescence images of solar cells (ELPV).

The ``elpv-dataset`` package ships 2,624 cells of 300 x 300 px with a defect
probability per cell. The demo uses mono-crystalline cells: a seeded 75 % of the
defect-free ones train, the rest and every certainly defective cell (probability
1.0) test. ELPV has image labels only, so the demo reports image-level metrics.
"""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import pyplot as plt

from cflowad.common.errors import UserError
from cflowad.common.progress import Reporter
from cflowad.data.files import staged_directory
from cflowad.data.images import load_image
from cflowad.engine.inference import THRESHOLD, Prediction
from cflowad.engine.model import CFlowAD
from cflowad.method.config import Config
from cflowad.results.metrics import f1_max, image_auroc
from cflowad.results.pictures import overlay, save_histogram

__all__ = ["elpv_split", "run_demo"]


def elpv_split(
    train_fraction: float = 0.75, seed: int = 0
) -> tuple[list[Path], list[Path], np.ndarray]:
    """(train images, test images, test labels) of the ELPV mono-crystalline cells."""
    spec = importlib.util.find_spec("elpv_dataset")
    if spec is None or spec.origin is None:
        raise UserError("the demo needs the ELPV data: pip install elpv-dataset")
    root = Path(spec.origin).parent / "data"
    table = np.genfromtxt(
        root / "labels.csv", dtype=["U32", "f8", "U8"], names=["path", "probability", "type"]
    )
    mono = table[table["type"] == "mono"]
    good = [root / p for p in mono["path"][mono["probability"] == 0.0]]
    bad = [root / p for p in mono["path"][mono["probability"] == 1.0]]
    order = np.random.default_rng(seed).permutation(len(good))
    cut = round(train_fraction * len(good))
    train = [good[i] for i in sorted(order[:cut])]
    test = [good[i] for i in sorted(order[cut:])] + bad
    labels = np.array([0] * (len(good) - cut) + [1] * len(bad))
    return train, test, labels


def run_demo(out: Path, steps: int, reporter: Reporter, decoder: str = "flow") -> dict[str, Any]:
    """Train, test, write OUT/metrics.json, pictures and the model; returns the metrics."""
    start = time.perf_counter()
    train, test, labels = elpv_split()
    reporter.log(
        f"ELPV mono cells: {len(train)} defect-free for training, {len(test)} for "
        f"testing ({int(labels.sum())} defective)"
    )
    with staged_directory(out) as staging:
        model = CFlowAD(Config(steps=steps, decoder=decoder)).fit(train, reporter=reporter)
        prediction = model.predict(test, reporter=reporter)
        f1, _ = f1_max(prediction.scores, labels)
        flagged = prediction.anomalous
        metrics = {
            "image_auroc": image_auroc(prediction.scores, labels),
            "image_f1_max": f1,
            "true_positive_rate_at_threshold": float(flagged[labels == 1].mean()),
            "false_positive_rate_at_threshold": float(flagged[labels == 0].mean()),
            "decoder": decoder,
            "n_train": len(train),
            "n_test": len(test),
            "n_defective": int(labels.sum()),
            "train_seconds": model.training["total_seconds"],
            "seconds": round(time.perf_counter() - start, 1),
        }
        (staging / "metrics.json").write_text(json.dumps(metrics, indent=2))
        save_histogram(staging / "score_histogram.png", prediction.scores, labels, THRESHOLD)
        _save_extremes(staging / "most_and_least_anomalous.png", test, prediction, model)
        model.save(staging / "model")
    reporter.log(f"demo written to {out}")
    return metrics


def _save_extremes(
    path: Path, images: list[Path], prediction: Prediction, model: CFlowAD, count: int = 4
) -> None:
    order = np.argsort(prediction.scores)
    picks = [("most anomalous", i) for i in order[::-1][:count]]
    picks += [("least anomalous", i) for i in order[:count]]
    figure, axes = plt.subplots(2, count, figsize=(3.2 * count, 4.2), dpi=70)
    for axis, (title, index) in zip(axes.ravel(), picks, strict=True):
        anomaly_map = prediction.maps[index]
        image = load_image(images[index])
        axis.imshow(overlay(image, anomaly_map, prediction.masks[index]))
        axis.set_title(f"{title}\nscore {prediction.scores[index]:.2f}", fontsize=9)
        axis.axis("off")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)

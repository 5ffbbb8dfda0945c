"""What ``cflowad test`` shows: a metrics table and, with --out, pictures per image."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from cflowad.common.progress import Reporter
from cflowad.data.datasets import TestSet
from cflowad.data.files import staged_directory
from cflowad.data.images import load_image
from cflowad.engine.inference import THRESHOLD
from cflowad.results.evaluate import Evaluation
from cflowad.results.pictures import save_curves, save_histogram, save_overlay

__all__ = ["print_metrics", "write_pictures"]


def print_metrics(metrics: dict[str, Any], title: str = "", quiet: bool = False) -> None:
    """A table of the headline metrics and the per-defect ones."""
    if quiet:
        return
    table = Table(title=title or None, highlight=False)
    for column in ("set", "images", "defective", "image AUROC", "pixel AUROC", "AUPRO", "F1-max"):
        table.add_column(column, justify="right" if column != "set" else "left")

    def row(name: str, m: dict[str, Any]) -> None:
        table.add_row(
            name,
            str(m["n_images"]),
            str(m["n_defective"]),
            *(_percent(m[k]) for k in ("image_auroc", "pixel_auroc", "aupro", "image_f1_max")),
        )

    row("all", metrics)
    for defect, m in metrics["per_defect"].items():
        row(defect, m)
    Console(highlight=False).print(table)
    tpr = _percent(metrics["true_positive_rate_at_threshold"])
    fpr = _percent(metrics["false_positive_rate_at_threshold"])
    Console(highlight=False).print(
        f"{metrics['images_per_second']:.1f} images/s; at the calibrated threshold "
        f"(score 0.5): TPR {tpr} %, FPR {fpr} %"
    )


def write_pictures(
    directory: Path,
    test: TestSet,
    evaluation: Evaluation,
    reporter: Reporter,
) -> None:
    """Per image: the image beside its heat map, predicted (white) and true (green) outlines;
    plus the ROC curve, the PRO curve and the score histogram."""
    prediction = evaluation.prediction
    with staged_directory(directory) as staging:
        with reporter.task("pictures", len(test.images)) as task:
            for i, path in enumerate(test.images):
                truth = None if evaluation.masks is None else evaluation.masks[i]
                if truth is not None and truth.shape != prediction.maps[i].shape:
                    truth = None
                folder = staging / test.defect_types[i]
                folder.mkdir(exist_ok=True)
                save_overlay(
                    folder / f"{path.stem}.png",
                    load_image(path),
                    prediction.maps[i],
                    prediction.masks[i],
                    truth,
                )
                task.advance()
        save_histogram(staging / "score_histogram.png", prediction.scores, test.labels, THRESHOLD)
        save_curves(
            staging,
            prediction.scores,
            test.labels,
            evaluation.maps if evaluation.masks is not None else None,
            evaluation.masks,
        )


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"

"""``cflowad predict`` and ``cflowad test``: score images into files; measure on a test set."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from rich.console import Console

from cflowad.cli.options import (
    Device,
    Quiet,
    RayAddress,
    SkipBad,
    Threads,
    image_files,
    keep_readable,
    summary_table,
    use_threads,
)
from cflowad.common.errors import UserError
from cflowad.common.progress import Reporter
from cflowad.data.datasets import TestSet, find_test_set
from cflowad.data.files import refuse_foreign, replace_file, staged_directory
from cflowad.data.images import load_image
from cflowad.engine.catalog import find_models, is_model_source
from cflowad.engine.inference import ImageResult, Predictor
from cflowad.engine.loading import load
from cflowad.fleet.archive import archive_items, score_archive

__all__ = ["predict", "test_command"]


def predict(
    model_dir: Annotated[
        Path,
        typer.Argument(
            help="A model directory from cflowad train, an ONNX file from export, or "
            "(Parquet) a folder of them, one per category."
        ),
    ],
    images: Annotated[
        list[Path],
        typer.Argument(
            help="Image files or folders: JSON takes the images directly in a folder, "
            "Parquet walks the whole tree (the folder --index paths are relative to)."
        ),
    ],
    out: Annotated[Path, typer.Option("--out", help="Folder for predictions and maps.")],
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 16,
    pictures: Annotated[
        bool,
        typer.Option(
            "--pictures", help="Also write a PNG per image: the image beside its heat map (JSON)."
        ),
    ] = False,
    output_format: Annotated[
        str,
        typer.Option(
            "--format",
            help="json (predictions.json) or parquet (sharded, resumable: for archives). "
            "auto: parquet with --index, --engine ray or a folder of models.",
        ),
    ] = "auto",
    engine: Annotated[
        str,
        typer.Option(
            help="Parquet: local (this process) or ray (Ray Data on a pool of actors, one "
            'thread each; pip install "cflowad[ray]").'
        ),
    ] = "local",
    index: Annotated[
        Path | None,
        typer.Option(
            help="CSV of path[,category] rows (paths relative to the one IMAGES folder): "
            "the images to score, each with its category's model."
        ),
    ] = None,
    shard_size: Annotated[
        int, typer.Option(help="Parquet: images per shard (the unit a re-run skips).")
    ] = 1000,
    jobs: Annotated[
        int | None,
        typer.Option(help="--engine ray: scoring actors (default: one per CPU of the cluster)."),
    ] = None,
    ray_address: RayAddress = None,
    device: Device = "auto",
    threads: Threads = None,
    skip_bad: SkipBad = False,
    quiet: Quiet = False,
) -> None:
    """Score images: OUT/predictions.jsonl as it goes, predictions.json and one .npy map each.

    Records are written as each image is scored, so memory does not grow with the
    number of images; a run that fails or is stopped keeps what it scored in
    OUT.partial, and OUT is replaced only when the run succeeds.

    --format parquet scores archives: OUT/shards/part-NNNNN.parquet (image, category,
    score, anomalous, raw_score, map) and OUT/maps/part-NNNNN/*.npy, a shard at a time;
    a re-run skips the finished shards.
    """
    models = find_models(model_dir, "MODEL")
    use_threads(threads, models.values())
    reporter = Reporter(enabled=not quiet)
    several = not is_model_source(model_dir)
    if output_format == "auto":
        parquet = index is not None or engine != "local" or several
        output_format = "parquet" if parquet else "json"
    if output_format == "parquet":
        if pictures:
            raise UserError("option --pictures: only with --format json")
        items = archive_items(images, models, index, out)
        manifest = score_archive(
            models,
            items,
            out,
            engine,
            batch_size,
            shard_size,
            jobs,
            ray_address,
            device,
            skip_bad,
            reporter,
        )
        summary_table(
            [
                ("images", str(manifest["n_images"] - manifest["skipped_images"])),
                ("shards", f"{manifest['n_shards']} in {out / 'shards'}"),
                ("speed", f"{manifest['images_per_second']} images/s ({engine})"),
            ],
            quiet,
        )
        return
    if output_format != "json":
        raise UserError(f"option --format={output_format!r} must be auto, json or parquet")
    for option, given_here in {
        "--index": index is not None,
        "--engine": engine != "local",
        "--jobs": jobs is not None,
        "--ray-address": ray_address is not None,
        "MODEL (a folder of models)": several,
    }.items():
        if given_here:
            raise UserError(f"{option}: needs --format parquet")
    refuse_foreign(out)  # before any work
    model: Predictor = load(model_dir, device)
    category = next(iter(models))
    files = image_files(images)
    if skip_bad:
        files = [files[i] for i in keep_readable(files)]
    flagged = 0
    with staged_directory(out, keep_partial=True) as staging:
        (staging / "maps").mkdir()
        if pictures:
            (staging / "pictures").mkdir()
        with (staging / "predictions.jsonl").open("w") as lines:
            for result in model.predict_iter(files, batch_size=batch_size, reporter=reporter):
                record = _write_result(staging, files[result.index], category, result, pictures)
                lines.write(json.dumps(record) + "\n")
                lines.flush()
                flagged += result.anomalous
        _jsonl_to_json(staging / "predictions.jsonl", staging / "predictions.json")
    summary_table(
        [
            ("images", str(len(files))),
            ("anomalous", f"{flagged} (score above 0.5)"),
            ("written", str(out / "predictions.json")),
        ],
        quiet,
    )


def test_command(
    model_dir: Annotated[
        Path,
        typer.Argument(help="A model directory (or a root of them), or an ONNX file from export."),
    ],
    data: Annotated[
        Path | None, typer.Argument(help="MVTec category (its test split) or a root of categories.")
    ] = None,
    json_file: Annotated[Path, typer.Option("--json", help="Metrics file to write.")] = Path(
        "metrics.json"
    ),
    out: Annotated[Path | None, typer.Option("--out", help="Folder for pictures.")] = None,
    good: Annotated[Path | None, typer.Option(help="Plain folder of good test images.")] = None,
    defective: Annotated[
        list[Path] | None, typer.Option(help="Plain folder of defective images (repeatable).")
    ] = None,
    masks: Annotated[
        Path | None, typer.Option(help="Folder of masks for --defective images.")
    ] = None,
    mask_suffix: Annotated[
        str, typer.Option(help="Mask file name: <stem><suffix>.<ext>.")
    ] = "_mask",
    metric_resolution: Annotated[
        str, typer.Option(help="mask: ground truth's size (MVTec); model: model input size.")
    ] = "mask",
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 16,
    device: Device = "auto",
    threads: Threads = None,
    skip_bad: SkipBad = False,
    quiet: Quiet = False,
) -> None:
    """Evaluate on a test split: image/pixel AUROC, AUPRO, F1-max, per defect type."""
    from cflowad.results.evaluate import evaluate
    from cflowad.results.report import print_metrics, write_pictures

    reporter = Reporter(enabled=not quiet)
    jobs: list[tuple[str, Path, Path | None]] = [("", model_dir, data)]
    if data is not None and data.is_dir() and not (data / "test").is_dir():
        categories = sorted(p for p in data.iterdir() if (p / "test").is_dir())
        if categories:
            jobs = [(c.name, model_dir / c.name, c) for c in categories]
    if json_file.is_dir():
        raise UserError(f"{json_file}: is a folder; --json takes a file name")
    use_threads(threads, [model_path for _, model_path, _ in jobs])
    for name, _, _ in jobs:
        if out is not None:
            refuse_foreign(out / name if name else out)  # before any work
    results = {}
    for name, model_path, source in jobs:
        test_set = find_test_set(source, good, defective or (), masks, mask_suffix)
        if skip_bad:
            keep = keep_readable(test_set.images)
            test_set = TestSet(
                [test_set.images[i] for i in keep],
                test_set.labels[keep],
                [test_set.defect_types[i] for i in keep],
                [test_set.masks[i] for i in keep],
            )
        model = load(model_path, device)
        decoder = model.describe()["decoder"]
        reporter.log(
            f"testing {model_path} ({decoder} decoder) on {len(test_set.images)} images"
            + (f" ({name})" if name else "")
        )
        evaluation = evaluate(model, test_set, batch_size, metric_resolution, reporter)
        results[name] = {"decoder": decoder, **evaluation.metrics}
        print_metrics(evaluation.metrics, name, quiet)
        if out is not None:
            write_pictures(out / name if name else out, test_set, evaluation, reporter)
    report = results[""] if list(results) == [""] else _mean_over_categories(results)
    replace_file(json_file, json.dumps(report, indent=2))
    if not quiet:
        Console(stderr=True).print(f"metrics written to {json_file}", highlight=False)


def _write_result(
    folder: Path, file: Path, category: str, result: ImageResult, picture: bool
) -> dict[str, Any]:
    """Save one image's map (and picture); return its record."""
    stem = f"{result.index:05d}_{file.stem}"
    record: dict[str, Any] = {
        "image": str(file),
        "category": category,
        **result.record(),
        "map": f"maps/{stem}.npy",
    }
    np.save(folder / record["map"], result.anomaly_map)
    if picture:
        from cflowad.results.pictures import save_overlay

        record["picture"] = f"pictures/{stem}.png"
        save_overlay(folder / record["picture"], load_image(file), result.anomaly_map, result.mask)
    return record


def _jsonl_to_json(source: Path, target: Path) -> None:
    """predictions.json: the JSON Lines records as one list, copied a line at a time."""
    with source.open() as lines, target.open("w") as out:
        out.write("[")
        for i, line in enumerate(lines):
            out.write(("," if i else "") + "\n  " + line.rstrip("\n"))
        out.write("\n]\n")


def _mean_over_categories(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    keys = ("image_auroc", "pixel_auroc", "aupro", "image_f1_max")
    mean: dict[str, Any] = {}
    for key in keys:
        values = [r[key] for r in results.values() if r[key] is not None]
        mean[key] = float(np.mean(values)) if values else None
    mean["n_images"] = sum(r["n_images"] for r in results.values())
    mean["n_defective"] = sum(r["n_defective"] for r in results.values())
    mean["seconds"] = round(sum(r["seconds"] for r in results.values()), 3)
    mean["images_per_second"] = round(mean["n_images"] / mean["seconds"], 2)
    mean["categories"] = results
    return mean

"""``cflowad export`` and ``cflowad bench``: a trained model as one ONNX file, and how
fast each engine scores it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from cflowad.cli.options import (
    Device,
    Quiet,
    Threads,
    comma_separated,
    image_files,
    summary_table,
    use_threads,
)
from cflowad.common.errors import UserError
from cflowad.common.progress import Reporter
from cflowad.data.files import replace_file
from cflowad.data.images import load_image
from cflowad.engine.model import CFlowAD

__all__ = ["bench", "export"]


def export(
    model_dir: Annotated[Path, typer.Argument(help="A model directory from cflowad train.")],
    onnx: Annotated[Path, typer.Option("--onnx", help="ONNX file to write.")],
    quiet: Quiet = False,
) -> None:
    """Write the model as one ONNX file: images -> scores, decisions, maps, masks."""
    model = CFlowAD.load(model_dir)
    reporter = Reporter(enabled=not quiet)
    with reporter.task("exporting", 1) as task:
        result = model.export_onnx(onnx)
        task.advance()
    difference = result["max_relative_difference"]
    height, width = model.config.image_size
    summary_table(
        [
            ("written", f"{result['onnx']} ({result['megabytes']} MiB, {result['seconds']} s)"),
            ("input", f"images: float32 (N, 3, {height}, {width}), RGB in [0, 1]"),
            ("outputs", "scores, anomalous, maps, masks (at the input size)"),
            (
                "checked",
                "onnxruntime not installed: not checked"
                if difference is None
                else f"onnxruntime equals PyTorch (max relative difference {difference:.1e})",
            ),
        ],
        quiet,
    )


def bench(
    model_dir: Annotated[Path, typer.Argument(help="A model directory.")],
    images: Annotated[
        list[Path] | None,
        typer.Argument(
            help="Images or folders to time on, as many as the largest batch (default: "
            "uniform noise at model size; real images are more representative)."
        ),
    ] = None,
    json_file: Annotated[Path, typer.Option("--json", help="Results file to write.")] = Path(
        "bench.json"
    ),
    batch_size: Annotated[str, typer.Option(help="Batch sizes, comma-separated.")] = "1,16",
    threads: Threads = None,
    repeats: Annotated[int, typer.Option(help="Timed repetitions per batch size.")] = 5,
    train_data: Annotated[
        Path | None, typer.Option("--train", help="Also time training on this data.")
    ] = None,
    steps: Annotated[int, typer.Option(help="Training steps to time with --train.")] = 200,
    onnx: Annotated[
        bool, typer.Option("--onnx", help="Also time the ONNX export in ONNX Runtime.")
    ] = False,
    device: Device = "auto",
    quiet: Quiet = False,
) -> None:
    """Time the whole predict path against the encoder alone; optionally training."""
    from cflowad.engine.bench import run_bench

    sizes = list(comma_separated(batch_size, "batch_size", int, "1,16"))
    if any(s < 1 for s in sizes) or repeats < 1:
        raise UserError("options --batch-size and --repeats must be at least 1")
    use_threads(threads)
    files = image_files(images or [])[: max(sizes)]
    for image in files:
        load_image(image)
    result = run_bench(
        model_dir,
        files,
        sizes,
        repeats,
        train_data,
        steps,
        Reporter(enabled=not quiet),
        onnx=onnx,
        device=device,
    )
    replace_file(json_file, json.dumps(result, indent=2))
    rows = []
    for b in result["batches"]:
        rows.append(
            (
                f"batch {b['batch_size']}",
                f"{b['images_per_second']:.1f} img/s model, "
                f"{b['encoder_images_per_second']:.1f} img/s encoder, "
                f"ratio {b['ratio']:.2f}",
            )
        )
        if "onnxruntime" in b:
            o = b["onnxruntime"]
            rows.append(
                (
                    "  onnxruntime",
                    f"{o['images_per_second']:.1f} img/s model, "
                    f"{o['encoder_images_per_second']:.1f} img/s encoder, ratio {o['ratio']:.2f}",
                )
            )
    rows.append(("peak RSS", f"{result['peak_rss_mb']:.0f} MiB"))
    if "train_steps_per_second" in result:
        rows.append(("training", f"{result['train_steps_per_second']:.1f} steps/s"))
    summary_table(rows, quiet)

"""``cflowad export`` and ``cflowad bench``: a trained model as one ONNX file, and how
fast each engine scores it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

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
    onnx: Annotated[Path | None, typer.Option("--onnx", help="ONNX file to write.")] = None,
    openvino: Annotated[
        Path | None,
        typer.Option(
            "--openvino",
            help="OpenVINO folder to write (model.xml + model.bin); needs "
            "pip install 'cflowad[openvino]'.",
        ),
    ] = None,
    int8: Annotated[
        bool,
        typer.Option(
            "--int8",
            help="Quantize the encoder to int8 (calibrated on the training images of "
            "--data; ONNX Runtime's quantizer for --onnx, NNCF for --openvino), train the "
            "flows again on its features (as long as a training), keep the model's flows "
            "or these, whichever finds synthetic defects in the held-out images best, and "
            "refit the thresholds on the int8 graph.",
        ),
    ] = False,
    bf16: Annotated[
        bool,
        typer.Option(
            "--bf16",
            help="With --openvino: let OpenVINO compute in bfloat16 (CPUs with AMX or "
            "AVX-512 BF16; 1.4-1.6x faster, maps a little moved) and refit the thresholds "
            "in bfloat16 with the held-out images of --data. Export on the line's CPU kind.",
        ),
    ] = False,
    data: Annotated[
        Path | None,
        typer.Option(
            help="With --int8 or --bf16: what the model was trained on (the same folder)."
        ),
    ] = None,
    quiet: Quiet = False,
) -> None:
    """Write the model for a runtime: images -> scores, decisions, maps, masks.

    --onnx FILE for ONNX Runtime, --openvino DIR for OpenVINO (either or both); give
    the file or folder wherever a model directory goes.
    """
    if onnx is None and openvino is None:
        raise UserError("cflowad export: give --onnx FILE, --openvino DIR, or both")
    for option, chosen in (("--int8", int8), ("--bf16", bf16)):
        if chosen and data is None:
            raise UserError(
                f"option {option} needs --data DIR: the images the model was trained on"
            )
    if bf16 and (openvino is None or int8):
        raise UserError("option --bf16 is for --openvino DIR in float (not with --int8)")
    model = CFlowAD.load(model_dir)
    reporter = Reporter(enabled=not quiet)
    height, width = model.config.image_size
    rows: list[tuple[str, str]] = []
    if int8:
        from cflowad.selection.int8 import export_int8

        for runtime, path in (("onnx", onnx), ("openvino", openvino)):
            if path is not None:
                result = export_int8(model, path, data, reporter, runtime)
                rows += [
                    (f"int8 ({runtime})", _written(path, result)),
                    *_refit_rows("int8", "on the int8 graph", result),
                    _synthetic_row(result),
                ]
    if onnx is not None and not int8:
        with reporter.task("exporting to ONNX", 1) as task:
            rows += _float_rows(model.export_onnx(onnx), "onnx", "onnxruntime")
            task.advance()
    if bf16 and openvino is not None:
        from cflowad.engine.bfloat16 import export_bf16

        result = export_bf16(model, openvino, data, reporter)
        rows += [
            ("written", _written(result["openvino"], result)),
            *_refit_rows("bf16", "in bfloat16", result),
        ]
    elif openvino is not None and not int8:
        with reporter.task("converting to OpenVINO", 1) as task:
            rows += _float_rows(model.export_openvino(openvino), "openvino", "OpenVINO")
            task.advance()
    rows += [
        ("input", f"images: float32 (N, 3, {height}, {width}), RGB in [0, 1]"),
        ("outputs", "scores, anomalous, maps, masks (at the input size)"),
    ]
    summary_table(rows, quiet)


def _written(path: Any, result: dict[str, Any]) -> str:
    """Where an export went, its size and how long it took."""
    return f"{path} ({result['megabytes']} MiB, {result['seconds']} s)"


def _float_rows(result: dict[str, Any], key: str, runtime: str) -> list[tuple[str, str]]:
    """Summary lines of a float export: what was written, and its check against PyTorch
    in ``runtime`` (None: the runtime is not installed)."""
    difference = result["max_relative_difference"]
    return [
        ("written", _written(result[key], result)),
        (
            "checked",
            f"{runtime} not installed: not checked"
            if difference is None
            else f"{runtime} equals PyTorch (max relative difference {difference:.1e})",
        ),
    ]


def _synthetic_row(result: dict[str, Any]) -> tuple[str, str]:
    """Which flows the int8 file kept, and every model's figures on synthetic defects."""
    from cflowad.selection.int8 import FLOWS

    figures = result["synthetic_defects"]
    counted = next(iter(figures.values()))["defects"]
    return (
        "flows",
        f"{FLOWS[result['flows']]}: on {counted} synthetic defects in the held-out images, "
        + ", ".join(
            f"{name} {f['image_auroc']:.3f} / {f['aupro']:.3f}" for name, f in figures.items()
        )
        + " (image AUROC / AUPRO)",
    )


def _refit_rows(name: str, where: str, result: dict[str, Any]) -> list[tuple[str, str]]:
    """Summary lines of a reduced-precision export: how far it is from float, and its
    thresholds (``cflowad.engine.refit.refit_thresholds``'s keys)."""
    threshold = result["image_threshold_raw"]
    return [
        (
            f"{name} vs float",
            f"maps correlate {result['map_correlation_median']} (median), raw scores "
            f"{result['raw_score_correlation']}, on {result['held_out_images']} held-out images",
        ),
        (
            "thresholds",
            f"refitted {where}: image {threshold['float']:.4f} -> {threshold[name]:.4f} (raw)",
        ),
    ]


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
    runtimes: Annotated[
        str,
        typer.Option(
            help="Runtimes to time side by side, comma-separated: torch, onnx (ONNX "
            "Runtime), openvino, int8 (ONNX Runtime, the encoder in int8), bf16 "
            "(OpenVINO in bfloat16, on CPUs with bfloat16 units)."
        ),
    ] = "torch",
    onnx: Annotated[
        bool, typer.Option("--onnx", help="Also time ONNX Runtime (as --runtimes torch,onnx).")
    ] = False,
    device: Device = "auto",
    quiet: Quiet = False,
) -> None:
    """Time the whole predict path against the encoder alone, per runtime; optionally
    training."""
    from cflowad.engine.bench import RUNTIMES, run_bench

    sizes = list(comma_separated(batch_size, "batch_size", int, "1,16"))
    if any(s < 1 for s in sizes) or repeats < 1:
        raise UserError("options --batch-size and --repeats must be at least 1")
    named = [r.strip() for r in runtimes.split(",") if r.strip()]
    chosen = tuple(dict.fromkeys(["torch", *named]))
    chosen += ("onnx",) if onnx and "onnx" not in chosen else ()
    unknown = [r for r in chosen if r not in RUNTIMES]
    if unknown:
        raise UserError(
            f"option --runtimes: unknown {', '.join(unknown)}; choose from {', '.join(RUNTIMES)}"
        )
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
        runtimes=chosen,
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
        for runtime in chosen[1:]:
            o = b[RUNTIMES[runtime]]
            rows.append(
                (
                    f"  {RUNTIMES[runtime]}",
                    f"{o['images_per_second']:.1f} img/s model, "
                    f"{o['encoder_images_per_second']:.1f} img/s encoder, ratio {o['ratio']:.2f}",
                )
            )
    rows.append(("peak RSS", f"{result['peak_rss_mb']:.0f} MiB"))
    if "train_steps_per_second" in result:
        rows.append(("training", f"{result['train_steps_per_second']:.1f} steps/s"))
    summary_table(rows, quiet)

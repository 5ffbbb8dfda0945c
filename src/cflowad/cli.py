"""The ``cflowad`` command line: train, predict, test, export, demo, bench, serve, loadtest,
watch, stream.

Error contract: a mistake the user can fix prints one line naming the file or
option to stderr and exits 2; an internal error exits 1 with its traceback
(``--debug`` shows tracebacks for every error).
"""

from __future__ import annotations

import json
import sys
import traceback
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from rich.console import Console
from rich.table import Table
from typer.exceptions import TyperException

from cflowad import __version__, load
from cflowad.allocator import keep_freed_memory
from cflowad.archive import archive_items, score_archive
from cflowad.catalog import find_models, is_model_source, is_onnx_file
from cflowad.config import CONFIG_FIELDS, Config, read_config_file
from cflowad.data import (
    TestSet,
    find_test_set,
    find_training_images,
    list_images,
    load_image,
    readable,
)
from cflowad.errors import UserError
from cflowad.files import refuse_foreign, replace_file, staged_directory
from cflowad.fleet import FLEET_FILE, Category, find_categories, train_fleet
from cflowad.inference import ImageResult, Predictor
from cflowad.model import CFlowAD, is_model_dir
from cflowad.progress import Reporter
from cflowad.serve_settings import ServeSettings

__all__ = ["app", "main"]

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    help="CFLOW-AD anomaly detection: train on good images, flag and localize defects.",
)
DEFAULTS = Config()


def _comma_separated(
    text: str, name: str, kind: Callable[[str], Any], example: str
) -> tuple[Any, ...]:
    """``"8,16,32"`` -> (8, 16, 32), or a one-line error naming the option."""
    try:
        return tuple(kind(x) for x in text.split(","))
    except ValueError:
        what = "integers" if kind is int else "numbers"
        option = "--" + name.replace("_", "-")
        raise UserError(f"option {option}={text!r} must be {what}, e.g. {example}") from None


Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")]
SkipBad = Annotated[
    bool,
    typer.Option("--skip-bad", help="Warn about unreadable image files and go on without them."),
]
Device = Annotated[str, typer.Option(help="auto (CUDA when present), cpu, cuda or cuda:N.")]
_SERVE = ServeSettings()  # serve's defaults, one source for the command and the server
Threads = Annotated[
    int | None,
    typer.Option(
        help="Threads (default: all cores); ONNX files run in ONNX Runtime on them. "
        "For throughput, run one process per core with --threads 1."
    ),
]

RayAddress = Annotated[
    str | None,
    typer.Option(help="Ray cluster to join with --engine ray (default: a local one)."),
]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"cflowad {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
    debug: Annotated[
        bool, typer.Option("--debug", help="Show tracebacks for every error.")
    ] = False,
) -> None:
    """CFLOW-AD anomaly detection: train on good images, flag and localize defects."""


@app.command()
def train(
    ctx: typer.Context,
    data: Annotated[
        Path,
        typer.Argument(
            help="MVTec category (train/good is used), a folder of "
            "defect-free images, or a root of categories."
        ),
    ],
    out: Annotated[
        Path,
        typer.Option(
            "--out", help="Model directory to write (a root of categories writes OUT/<category>)."
        ),
    ],
    config_file: Annotated[
        Path | None,
        typer.Option(
            "--config",
            help="TOML or JSON file of Config fields (YAML too with PyYAML); flags override it.",
        ),
    ] = None,
    backbone: Annotated[str, typer.Option(help="timm CNN name.")] = DEFAULTS.backbone,
    decoder: Annotated[
        str,
        typer.Option(
            help="flow (the paper's conditional flows) or gaussian (the appendix's Gaussian "
            "model, one per position: fitted in seconds, no training steps)."
        ),
    ] = DEFAULTS.decoder,
    encoder_weights: Annotated[
        str, typer.Option(help="pretrained (ImageNet) or random (tests only: poor accuracy).")
    ] = DEFAULTS.encoder_weights,
    random_weights: Annotated[
        bool, typer.Option(hidden=True, help="Same as --encoder-weights random.")
    ] = False,
    weights_file: Annotated[
        Path | None, typer.Option(help="Encoder weights file (.safetensors or .pth).")
    ] = None,
    image_size: Annotated[
        str,
        typer.Option(
            help="Model input: N (shorter side N, longer side keeps the training images' "
            "median aspect unless --aspect fixed) or WIDTHxHEIGHT, multiples of 32."
        ),
    ] = "256",
    aspect: Annotated[
        str, typer.Option(help="auto: keep the median aspect ratio; fixed: N x N.")
    ] = DEFAULTS.aspect,
    strides: Annotated[str, typer.Option(help="Feature strides, comma-separated.")] = "8,16,32",
    coupling_blocks: Annotated[
        int, typer.Option(help="Coupling blocks per flow.")
    ] = DEFAULTS.coupling_blocks,
    condition_dim: Annotated[
        int, typer.Option(help="Positional-encoding channels.")
    ] = DEFAULTS.condition_dim,
    clamp_alpha: Annotated[
        float, typer.Option(help="Soft clamping of coupling log-scales.")
    ] = DEFAULTS.clamp_alpha,
    objective: Annotated[
        str, typer.Option(help="nll (paper eq. 7.2) or logsigmoid (official code's variant).")
    ] = DEFAULTS.objective,
    training_precision: Annotated[
        str,
        typer.Option(
            "--training-precision",
            "--precision",
            help="Decoder training: auto (bfloat16 where its matrix products measure faster "
            "than float32 on this CPU), float32 or bfloat16. Scoring is always float32.",
        ),
    ] = DEFAULTS.training_precision,
    compile_training: Annotated[
        bool,
        typer.Option(
            "--compile-training/--no-compile-training",
            "--compile/--no-compile",
            help="Fuse the training step with torch.compile (needs a C++ compiler; "
            "about a minute the first time, cached afterwards).",
        ),
    ] = DEFAULTS.compile_training,
    fiber_batch_size: Annotated[
        int, typer.Option(help="Feature vectors per fiber batch.")
    ] = DEFAULTS.fiber_batch_size,
    finest_batch_factor: Annotated[
        int,
        typer.Option(
            help="The finest of several scales draws this many fiber batches per step "
            "(it has 16x the coarsest scale's vectors and the cheapest flow)."
        ),
    ] = DEFAULTS.finest_batch_factor,
    steps: Annotated[
        int,
        typer.Option(help="Optimizer steps (one fiber batch per scale each, more for the finest)."),
    ] = DEFAULTS.steps,
    learning_rate: Annotated[
        float, typer.Option(help="Adam peak learning rate.")
    ] = DEFAULTS.learning_rate,
    warmup_fraction: Annotated[
        float, typer.Option(help="Share of steps with a linear learning-rate warm-up.")
    ] = DEFAULTS.warmup_fraction,
    holdout_fraction: Annotated[
        float, typer.Option(help="Share of images held out to calibrate thresholds.")
    ] = DEFAULTS.holdout_fraction,
    min_holdout: Annotated[
        int, typer.Option(help="Held-out images at least.")
    ] = DEFAULTS.min_holdout,
    calibrate_on_train: Annotated[
        bool, typer.Option(help="Train on every image and calibrate on them too (optimistic).")
    ] = False,
    image_fpr: Annotated[
        float, typer.Option(help="Target false-positive rate of the image threshold.")
    ] = DEFAULTS.image_fpr,
    pixel_fpr: Annotated[
        float, typer.Option(help="Target false-positive rate of the pixel threshold.")
    ] = DEFAULTS.pixel_fpr,
    feature_pooling: Annotated[
        int, typer.Option(help="Average each feature over its k x k neighbourhood (1: none).")
    ] = DEFAULTS.feature_pooling,
    score_top_k: Annotated[
        float, typer.Option(help="Image score: mean of this top fraction of the map (0: maximum).")
    ] = DEFAULTS.score_top_k,
    scale_weights: Annotated[
        str | None,
        typer.Option(
            help="Weights of the scales in the map, comma-separated, finest first (default: "
            "equal). Each scale's term stays bounded; weighting the finest scale sharpens "
            "maps of small defects, the coarsest helps large ones (docs/design.md)."
        ),
    ] = None,
    feature_cache_budget_mb: Annotated[
        int,
        typer.Option(
            "--feature-cache-budget-mb",
            "--cache-budget-mb",
            help="Feature cache above this goes to a memory-mapped file.",
        ),
    ] = DEFAULTS.feature_cache_budget_mb,
    feature_cache_dir: Annotated[
        Path | None,
        typer.Option(
            "--feature-cache-dir",
            "--cache-dir",
            help="Folder for a memory-mapped feature cache (default: the temporary folder).",
        ),
    ] = None,
    seed: Annotated[
        int, typer.Option(help="Seed for hold-out split, weights and sampling.")
    ] = DEFAULTS.seed,
    device: Device = "auto",
    jobs: Annotated[
        int,
        typer.Option(
            help="A root of categories: train this many at once, each in its own process "
            "with cores/N threads (models are the same for any N)."
        ),
    ] = 1,
    engine: Annotated[
        str,
        typer.Option(
            help="A root of categories: local (a process pool) or ray (one Ray task per "
            'category; pip install "cflowad[ray]").'
        ),
    ] = "local",
    ray_address: RayAddress = None,
    threads: Annotated[
        int | None,
        typer.Option(help="Threads per category with a root (default: cores / --jobs)."),
    ] = None,
    skip_bad: SkipBad = False,
    quiet: Quiet = False,
) -> None:
    """Train a model on defect-free images; thresholds are calibrated on held-out ones.

    A root of categories trains one model per category into OUT/<category> and lists
    them in OUT/fleet.json; a re-run skips the categories already trained the same way.

    Every option but --out, --config, --device, --skip-bad, --quiet and the fleet's
    (--jobs, --engine, --ray-address, --threads) is a field of cflowad.Config under
    the same name; the model's model.json records them all.
    """
    reporter = Reporter(enabled=not quiet)
    given = {
        name: value
        for name, value in ctx.params.items()
        # typer vendors its own click: compare the source by name, not by class
        if getattr(ctx.get_parameter_source(name), "name", "DEFAULT") != "DEFAULT"
    }
    if given.pop("random_weights", False):
        given["encoder_weights"] = "random"
    for name, kind, example in (("strides", int, "8,16,32"), ("scale_weights", float, "2,1,1")):
        if name in given:
            given[name] = _comma_separated(given[name], name, kind, example)
    for name in ("weights_file", "feature_cache_dir"):
        if given.get(name) is not None:
            given[name] = str(given[name])
    fields = {} if config_file is None else read_config_file(config_file)
    fields.update({k: v for k, v in given.items() if k in CONFIG_FIELDS})
    config = Config(**fields)
    changed = {
        f: getattr(config, f) for f in CONFIG_FIELDS if getattr(config, f) != getattr(DEFAULTS, f)
    }
    reporter.log(
        "config: "
        + (", ".join(f"{k}={v!r}" for k, v in changed.items()) or "defaults")
        + " (saved in model.json)"
    )
    categories = find_categories(data, out)
    if categories:
        fleet = train_fleet(
            categories,
            out,
            config,
            jobs,
            engine,
            ray_address,
            threads,
            skip_bad,
            device,
            Reporter(enabled=not quiet),
        )
        _fleet_summary(categories, out, fleet, quiet)
        return
    fleet_options = {"--jobs": jobs != 1, "--engine": engine != "local", "--threads": threads}
    for option, given_here in fleet_options.items():
        if given_here:
            raise UserError(
                f"option {option}: {data} is a single category; it applies to a root of them"
            )
    refuse_foreign(out, is_model_dir, "--out")  # before training, not after
    reporter.log(f"training {data} -> {out}")
    images = find_training_images(data)
    if skip_bad:
        images = [images[i] for i in _readable(images)]
    model = CFlowAD(config, device=device).fit(images, reporter=reporter)
    model.save(out)
    _summary_table([("model", str(out)), *_training_rows(model)], quiet)


def _fleet_summary(
    categories: list[Category], out: Path, fleet: dict[str, Any], quiet: bool
) -> None:
    """A line per category; a failed category fails the command (after the others ran)."""
    records = fleet["categories"]
    rows = []
    for category in categories:
        record = records[category.name]
        if record["status"] == "trained":
            rows.append(
                (
                    category.name,
                    f"held-out FPR {record['held_out_fpr']:.2%}, "
                    f"{record['n_train']} train images, {record['seconds']:.0f} s",
                )
            )
        else:
            rows.append((category.name, f"FAILED: {record['error']}"))
    _summary_table([*rows, ("fleet", str(out / FLEET_FILE))], quiet)
    failed = [c.name for c in categories if records[c.name]["status"] == "failed"]
    for name in failed:
        if "traceback" in records[name]:
            print(records[name]["traceback"], file=sys.stderr, end="")
    if failed:
        message = (
            f"{len(failed)} of {len(categories)} categories failed ({', '.join(failed)}); "
            f"the reasons are in {out / FLEET_FILE}"
        )
        if all(records[name].get("user_error") for name in failed):
            raise UserError(message)
        print(f"cflowad: error: {message}", file=sys.stderr)
        raise typer.Exit(1)


@app.command()
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
    _use_threads(threads, models.values())
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
        _summary_table(
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
    files = _image_files(images)
    if skip_bad:
        files = [files[i] for i in _readable(files)]
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
    _summary_table(
        [
            ("images", str(len(files))),
            ("anomalous", f"{flagged} (score above 0.5)"),
            ("written", str(out / "predictions.json")),
        ],
        quiet,
    )


@app.command()
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
    _summary_table(
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


@app.command("test")
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
    from cflowad.evaluate import evaluate
    from cflowad.report import print_metrics, write_pictures

    reporter = Reporter(enabled=not quiet)
    jobs: list[tuple[str, Path, Path | None]] = [("", model_dir, data)]
    if data is not None and data.is_dir() and not (data / "test").is_dir():
        categories = sorted(p for p in data.iterdir() if (p / "test").is_dir())
        if categories:
            jobs = [(c.name, model_dir / c.name, c) for c in categories]
    if json_file.is_dir():
        raise UserError(f"{json_file}: is a folder; --json takes a file name")
    _use_threads(threads, [model_path for _, model_path, _ in jobs])
    for name, _, _ in jobs:
        if out is not None:
            refuse_foreign(out / name if name else out)  # before any work
    results = {}
    for name, model_path, source in jobs:
        test_set = find_test_set(source, good, defective or (), masks, mask_suffix)
        if skip_bad:
            keep = _readable(test_set.images)
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


@app.command()
def demo(
    out: Annotated[
        Path, typer.Option("--out", help="Folder for metrics.json and pictures.")
    ] = Path("cflowad-demo"),
    steps: Annotated[int, typer.Option(help="Optimizer steps.")] = DEFAULTS.steps,
    decoder: Annotated[str, typer.Option(help="flow or gaussian (see cflowad train).")] = (
        DEFAULTS.decoder
    ),
    quiet: Quiet = False,
) -> None:
    """Train and test on real solar-cell images (ELPV, installed from PyPI) in minutes."""
    from cflowad.demo import run_demo

    metrics = run_demo(out, steps=steps, reporter=Reporter(enabled=not quiet), decoder=decoder)
    _summary_table([(k, _fmt(v)) for k, v in metrics.items() if not isinstance(v, dict)], quiet)


@app.command()
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
    from cflowad.bench import run_bench

    try:
        sizes = [int(s) for s in batch_size.split(",")]
    except ValueError:
        raise UserError(f"option --batch-size={batch_size!r} must be integers, e.g. 1,16") from None
    if any(s < 1 for s in sizes) or repeats < 1:
        raise UserError("options --batch-size and --repeats must be at least 1")
    _use_threads(threads)
    files = _image_files(images or [])[: max(sizes)]
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
    _summary_table(rows, quiet)


@app.command()
def serve(
    models: Annotated[
        Path,
        typer.Argument(
            help="A model directory, an ONNX file from cflowad export, or a folder of them; "
            "each is served under its folder or file name."
        ),
    ],
    host: Annotated[
        str, typer.Option(help="Address to listen on (0.0.0.0: every interface).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    max_batch: Annotated[
        int, typer.Option(help="Most images of one model scored in one forward pass.")
    ] = _SERVE.max_batch,
    max_wait_ms: Annotated[
        float,
        typer.Option(help="Longest a batch waits for requests still arriving, in ms."),
    ] = _SERVE.max_wait_ms,
    threads: Threads = None,
    workers: Annotated[
        int,
        typer.Option(
            help="Batches scored at once, sharing --threads: 1 answers a lone request "
            "soonest, 2 or more give more requests/s under load (docs/benchmarks.md)."
        ),
    ] = _SERVE.workers,
    api_key_file: Annotated[
        Path | None,
        typer.Option(
            help="File holding the API key: every endpoint but /healthz then needs "
            "'Authorization: Bearer <key>'."
        ),
    ] = None,
    max_image_mb: Annotated[
        float, typer.Option(help="Largest upload accepted, in MB.")
    ] = _SERVE.max_image_mb,
    device: Device = "auto",
) -> None:
    """Score images over HTTP: POST /v1/models/NAME/predict, with probes, metrics and reloads.

    Needs the serve extra (pip install 'cflowad[serve]'). The OpenAPI page is at
    /docs; SIGHUP or POST /v1/models/NAME/reload loads models from disk again.
    """
    settings = ServeSettings(
        max_batch=max_batch,
        max_wait_ms=max_wait_ms,
        max_image_mb=max_image_mb,
        workers=workers,
        api_key=_read_api_key(api_key_file),
        device=device,
    )
    sources = find_models(models)
    _use_threads(threads, sources.values(), workers)
    from cflowad.server import create_app, run_server

    app_ = create_app(sources, settings)
    _check_port(host, port)
    run_server(app_, host, port)


@app.command()
def loadtest(
    url: Annotated[str, typer.Argument(help="The server, e.g. http://127.0.0.1:8000.")],
    images: Annotated[list[Path], typer.Argument(help="Image files, sent in turn.")],
    model: Annotated[str, typer.Option("--model", help="Name of the served model.")],
    concurrency: Annotated[
        str, typer.Option(help="Concurrent clients, comma-separated; run one after another.")
    ] = "1,4,16",
    duration: Annotated[float, typer.Option(help="Seconds per concurrency.")] = 20.0,
    max_requests: Annotated[
        int, typer.Option(help="Stop a concurrency early after this many requests.")
    ] = 100_000,
    json_file: Annotated[
        Path | None, typer.Option("--json", help="Write the results to this JSON file.")
    ] = None,
    api_key_file: Annotated[
        Path | None, typer.Option(help="File holding the server's API key.")
    ] = None,
    quiet: Quiet = False,
) -> None:
    """Closed-loop load on cflowad serve: requests/s, p50/p95/p99 latency and errors.

    Latency is the client's clock; the server's own (its answers' latency_ms) is
    beside it, so a client that shares the cores shows up as the difference.
    """
    from cflowad.loadtest import run_loadtest

    try:
        levels = [int(c) for c in concurrency.split(",")]
    except ValueError:
        raise UserError(
            f"option --concurrency={concurrency!r} must be integers, e.g. 1,4,16"
        ) from None
    reporter = Reporter(enabled=not quiet)
    reporter.log(f"load on {url} model {model}: concurrency {levels}, {duration:g} s each")
    results = run_loadtest(
        url,
        model,
        _image_files(images),
        levels,
        duration,
        max_requests=max_requests,
        api_key=_read_api_key(api_key_file),
        on_level=lambda r: reporter.log(
            f"concurrency {r['concurrency']}: {r['requests_per_second']:.1f} requests/s, "
            f"p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms, "
            f"{sum(r['errors'].values())} errors"
        ),
    )
    if json_file is not None:
        replace_file(
            json_file, json.dumps({"url": url, "model": model, "levels": results}, indent=2)
        )
    _summary_table(
        [
            (
                f"concurrency {r['concurrency']}",
                f"{r['requests_per_second']:.1f} req/s, p50 {r['p50_ms']:.1f} / p95 "
                f"{r['p95_ms']:.1f} / p99 {r['p99_ms']:.1f} ms{_server_part(r)}, {r['ok']} ok, "
                f"errors {r['errors'] or 0}",
            )
            for r in results
        ],
        quiet,
    )
    if any(r["errors"] for r in results):
        raise typer.Exit(1)


def _server_part(level: dict[str, Any]) -> str:
    served = level["server_p50_ms"]
    return "" if served is None else f" (server's own p50 {served:.1f} ms)"


@app.command()
def watch(
    model_dir: Annotated[
        Path, typer.Argument(help="A model directory, or an ONNX file from cflowad export.")
    ],
    inbox: Annotated[Path, typer.Argument(help="The hot folder the camera writes images into.")],
    out: Annotated[
        Path, typer.Option("--out", help="Folder for results.jsonl, maps, rejected and done.")
    ],
    move_done: Annotated[
        bool, typer.Option("--move-done", help="Move each scored image to OUT/done.")
    ] = False,
    pictures: Annotated[
        bool, typer.Option("--pictures", help="Also write OUT/pictures/<name>.png.")
    ] = False,
    settle: Annotated[
        float, typer.Option(help="Seconds a file must stop changing before it is read.")
    ] = 0.5,
    batch_size: Annotated[int, typer.Option(help="Files ready together, scored together.")] = 8,
    poll: Annotated[
        bool, typer.Option("--poll", help="Watch by polling (network shares; no inotify).")
    ] = False,
    once: Annotated[
        bool, typer.Option("--once", help="Score what is in INBOX now, then exit.")
    ] = False,
    device: Device = "auto",
    threads: Threads = None,
    quiet: Quiet = False,
) -> None:
    """Score every image that arrives in INBOX exactly once; Ctrl-C stops.

    OUT/results.jsonl is the journal: a restart (even after kill -9) neither loses
    nor rescores a file. Unreadable files move to OUT/rejected with the reason.
    Needs the stream extra (pip install 'cflowad[stream]').
    """
    import threading

    from cflowad.hotfolder import is_watch_output, watch_folder

    _use_threads(threads, [model_dir])
    refuse_foreign(out, is_watch_output)  # before loading the model
    reporter = Reporter(enabled=not quiet)
    model = load(model_dir, device)
    reporter.log(f"watching {inbox} (Ctrl-C stops); records in {out / 'results.jsonl'}")
    stop = threading.Event()
    try:
        summary = watch_folder(
            model,
            inbox,
            out,
            move_done=move_done,
            pictures=pictures,
            settle=settle,
            batch_size=batch_size,
            poll=poll,
            once=once,
            stop=stop,
            reporter=reporter,
        )
    except KeyboardInterrupt:
        raise typer.Exit(0) from None
    delays = np.array(summary.delays or [np.nan]) * 1000
    _summary_table(
        [
            ("scored", str(summary.scored)),
            ("anomalous", f"{summary.anomalous} (score above 0.5)"),
            ("rejected", f"{summary.rejected} (see {out / 'rejected'})"),
            (
                "arrival to record",
                f"p50 {np.percentile(delays, 50):.0f} ms, p99 {np.percentile(delays, 99):.0f} ms",
            ),
        ],
        quiet,
    )


@app.command()
def stream(
    model_dir: Annotated[
        Path, typer.Argument(help="A model directory, or an ONNX file from cflowad export.")
    ],
    source: Annotated[
        str,
        typer.Argument(
            help="A video file, a camera index (0 is /dev/video0), or an rtsp:// or http:// URL."
        ),
    ],
    out: Annotated[
        Path, typer.Option("--out", help="Folder for frames.jsonl, events.jsonl, pictures.")
    ],
    every: Annotated[int, typer.Option(help="Score every N-th frame.")] = 1,
    roi: Annotated[
        str | None,
        typer.Option(help="Score only this region, x,y,w,h in pixels; maps go back in place."),
    ] = None,
    debounce: Annotated[
        int, typer.Option(help="An event needs this many anomalous frames in a row.")
    ] = 1,
    live: Annotated[
        bool,
        typer.Option(
            "--live",
            help="When scoring falls behind, skip to the newest frame (dropped frames are "
            "counted), so latency stays bounded; files are then played at their frame rate.",
        ),
    ] = False,
    video_out: Annotated[
        Path | None,
        typer.Option(help="Write the scored frames with heat map, outline and score (.mp4)."),
    ] = None,
    save_anomalous: Annotated[
        bool, typer.Option("--save-anomalous", help="PNGs of anomalous frames in OUT/anomalous.")
    ] = False,
    batch_size: Annotated[int, typer.Option(help="Frames scored together (not with --live).")] = 8,
    retries: Annotated[
        int, typer.Option(help="Reconnects of a camera or network stream that breaks.")
    ] = 3,
    device: Device = "auto",
    threads: Threads = None,
    quiet: Quiet = False,
) -> None:
    """Score a video, a camera or a network stream frame by frame: OUT/frames.jsonl as it goes.

    Needs the stream extra (pip install 'cflowad[stream]').
    """
    from cflowad.video import is_stream_output, parse_roi, stream_video

    _use_threads(threads, [model_dir])
    region = parse_roi(roi)
    refuse_foreign(out, is_stream_output)  # before loading the model
    reporter = Reporter(enabled=not quiet)
    model = load(model_dir, device)
    reporter.log(f"scoring {source}{' live' if live else ''}; frames in {out / 'frames.jsonl'}")
    summary = stream_video(
        model,
        source,
        out,
        every=every,
        roi=region,
        debounce=debounce,
        live=live,
        video_out=video_out,
        save_anomalous=save_anomalous,
        batch_size=batch_size,
        retries=retries,
        reporter=reporter,
    )
    latencies = np.percentile(np.array(summary.latencies_ms or [np.nan]), [50, 99])
    _summary_table(
        [
            (
                "frames",
                f"{summary.scored} scored of {summary.decoded} decoded, "
                f"{summary.scored / max(summary.seconds, 1e-9):.1f}/s",
            ),
            ("dropped", f"{summary.dropped} (--live)"),
            ("anomalous", f"{summary.anomalous} frames, {summary.events} events"),
            (
                "latency",
                f"p50 {latencies[0]:.0f} ms, p99 {latencies[1]:.0f} ms",
            ),
        ],
        quiet,
    )


def _read_api_key(path: Path | None) -> str | None:
    if path is None:
        return None
    if not path.is_file():
        raise UserError(f"option --api-key-file={path}: file not found")
    key = path.read_text().strip()
    if not key or any(c.isspace() for c in key):
        raise UserError(f"option --api-key-file={path}: the key must be one word, not empty")
    return key


def _check_port(host: str, port: int) -> None:
    """One clear line for a port that is taken or an address that is not ours."""
    import socket

    if not 0 <= port <= 65535:
        raise UserError(f"option --port={port} must be 0 to 65535")
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as error:
        raise UserError(
            f"options --host={host} --port={port}: cannot listen there ({error.strerror})"
        ) from None


_skipped: list[str] = []  # files skipped by --skip-bad in this run; main() counts them at the end


def _write_result(
    folder: Path, file: Path, category: str, result: ImageResult, picture: bool
) -> dict[str, Any]:
    """Save one image's map (and picture); return its record."""
    stem = f"{result.index:05d}_{file.stem}"
    record: dict[str, Any] = {
        "image": str(file),
        "category": category,
        "score": round(result.score, 6),
        "anomalous": result.anomalous,
        "raw_score": result.raw_score,
        "map": f"maps/{stem}.npy",
    }
    np.save(folder / record["map"], result.anomaly_map)
    if picture:
        from cflowad.pictures import save_overlay

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


def _use_threads(threads: int | None, scoring: Iterable[Path] = (), workers: int = 1) -> None:
    """Set the threads (default: torch's count at start, all cores), shared with ONNX
    Runtime when every model the command scores is an ONNX file
    (:func:`cflowad.runtime.share_threads`, which checks --threads and --workers)."""
    from cflowad.runtime import share_threads

    models = list(scoring)
    share_threads(threads, bool(models) and all(is_onnx_file(m) for m in models), workers)


def _readable(files: list[Path]) -> list[int]:
    """Indices of the files that decode; a warning per other file and a count (--skip-bad)."""
    keep, errors = readable(files)
    for error in errors:
        print(f"cflowad: warning: skipped {error}", file=sys.stderr)
    _skipped.extend(errors)
    if not keep:
        raise UserError(f"none of the {len(files)} image files could be read")
    return keep


def _image_files(items: list[Path]) -> list[Path]:
    """Files given, with folders expanded to their images; missing files are user errors."""
    files: list[Path] = []
    for item in items:
        files.extend(list_images(item) if item.is_dir() else [item])
    for file in files:
        if not file.is_file():
            raise UserError(f"{file}: file not found")
    return files


def _training_rows(model: CFlowAD) -> list[tuple[str, str]]:
    t = model.training
    c = model.calibration or {}
    if model.config.decoder == "gaussian":
        fit = f"a Gaussian per position and scale in {t['fit_seconds']:.1f} s"
    else:
        fit = (
            f"{t['steps']} steps in {t['train_seconds']:.1f} s "
            f"({t['steps_per_second']:.1f} steps/s, {t['precision']}"
            f"{', compiled' if t.get('compiled') else ''}), loss {t['final_loss']:.4f}"
        )
    return [
        ("images", f"{t['n_train']} train, {t['n_calibration']} calibration"),
        ("encode", f"{t['encode_seconds']:.1f} s ({t['feature_cache_mb']} MiB cache)"),
        (f"{model.config.decoder} decoder", fit),
        (
            "thresholds (raw)",
            f"image {c['image_threshold_raw']:.4g}, pixel {c['pixel_threshold_raw']:.4g} "
            f"(0.5 on the 0-1 scale; held-out false-positive rate "
            f"{c['image_fpr_achievable']:.2%} achievable for images)",
        ),
    ]


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


def _fmt(value: object) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _summary_table(rows: list[tuple[str, str]], quiet: bool) -> None:
    if quiet:
        return
    table = Table(show_header=False, box=None)
    for key, value in rows:
        table.add_row(key, value)
    Console(highlight=False).print(table)


def _one_line_warning(message: Warning | str, *_: Any, **__: Any) -> None:
    print(f"cflowad: warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Entry point with the error contract: user errors exit 2 in one line, bugs exit 1."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    keep_freed_memory()
    warnings.showwarning = _one_line_warning
    command = typer.main.get_command(app)
    _skipped.clear()
    try:
        result = command.main(args, prog_name="cflowad", standalone_mode=False)
        if _skipped:
            print(
                f"cflowad: warning: skipped {len(_skipped)} unreadable image files (--skip-bad)",
                file=sys.stderr,
            )
        return result if isinstance(result, int) else 0
    except typer.Exit as done:
        return done.exit_code
    except typer.Abort:
        print("cflowad: aborted", file=sys.stderr)
        return 130
    except TyperException as error:  # bad command line: unknown option, missing argument
        if debug:
            traceback.print_exc()
        message = error.format_message() if hasattr(error, "format_message") else str(error)
        context = getattr(error, "ctx", None)
        where = (
            f"cflowad {context.info_name} --help"
            if context and context.parent
            else "cflowad --help"
        )
        print(f"cflowad: error: {message} (see {where})", file=sys.stderr)
        return 2
    except UserError as error:
        if debug:
            traceback.print_exc()
        print(f"cflowad: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cflowad: interrupted", file=sys.stderr)
        return 130
    except Exception:
        traceback.print_exc()
        print(
            "cflowad: internal error (a bug: please report it with the traceback above)",
            file=sys.stderr,
        )
        return 1

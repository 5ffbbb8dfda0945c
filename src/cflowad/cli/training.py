"""``cflowad train``: one model, or a fleet of them from a root of categories."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from cflowad.cli.options import (
    DEFAULTS,
    Device,
    Quiet,
    RayAddress,
    SkipBad,
    comma_separated,
    keep_readable,
    summary_table,
)
from cflowad.common.errors import UserError
from cflowad.common.progress import Reporter
from cflowad.data.datasets import find_training_images
from cflowad.data.files import refuse_foreign
from cflowad.engine.model import CFlowAD, is_model_dir
from cflowad.fleet.training import FLEET_FILE, Category, find_categories, train_fleet
from cflowad.method.config import CONFIG_FIELDS, Config, read_config_file
from cflowad.results.tune import tune as tune_model

__all__ = ["train"]


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
            "median aspect unless --aspect fixed), WIDTHxHEIGHT, multiples of 32, or native "
            "(the training images' own size: with --tile-size for photos of megapixels)."
        ),
    ] = "256",
    aspect: Annotated[
        str,
        typer.Option(
            help="auto: keep the median aspect ratio; fixed: N x N; native: the training "
            "images' median size, rounded down to multiples of 32 (--image-size native)."
        ),
    ] = DEFAULTS.aspect,
    strides: Annotated[str, typer.Option(help="Feature strides, comma-separated.")] = "8,16,32",
    coupling_blocks: Annotated[
        str,
        typer.Option(
            help="Coupling blocks per flow: one number for every scale, or one per stride, "
            "finest first (4,6,8 lightens the finest scale, which has the most positions)."
        ),
    ] = str(DEFAULTS.coupling_blocks),
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
    tile_size: Annotated[
        int | None,
        typer.Option(
            help="Run the encoder on square tiles of this many input pixels (a multiple of "
            "32), stitched into one map: give --image-size the images' native size (or a "
            "fraction of it) and memory follows the tile, not the image (docs/design.md).",
        ),
    ] = None,
    tile_overlap: Annotated[
        float,
        typer.Option(
            help="With --tile-size: share of a tile that neighbours overlap; each keeps "
            "the half of the overlap nearer its centre."
        ),
    ] = DEFAULTS.tile_overlap,
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
    region: Annotated[
        str | None,
        typer.Option(
            help="Inspect only here: a mask image the training images' shape (white: "
            "inspect), a box x,y,w,h in their pixels, or a JSON file of polygons (as the "
            "studio draws them; docs/formats.md). Maps are zero outside it and the score "
            "and thresholds ignore it, in every command and export.",
        ),
    ] = None,
    tune: Annotated[
        bool,
        typer.Option(
            "--tune",
            help="Train a few candidates (flows and Gaussian decoder, input size x7/8, x1, "
            "x5/4 or the photos' own size in tiles, three scale weightings) and keep the "
            "best on synthetic defects pasted into held-out good images; every candidate's "
            "figures go into model.json.",
        ),
    ] = False,
    tune_budget: Annotated[
        float | None,
        typer.Option(
            help="With --tune: skip candidates that would end training after this many "
            "minutes (the configured model always trains).",
        ),
    ] = None,
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
    progress_file: Annotated[
        Path | None,
        typer.Option(
            help="Also write the current step's progress (step, done, total, per_second, "
            "eta_seconds) to this JSON file, replaced as it advances: for a dashboard "
            "(cflowad studio reads it)."
        ),
    ] = None,
) -> None:
    """Train a model on defect-free images; thresholds are calibrated on held-out ones.

    A root of categories trains one model per category into OUT/<category> and lists
    them in OUT/fleet.json; a re-run skips the categories already trained the same way.

    Every option but --out, --config, --region, --tune, --tune-budget, --device,
    --skip-bad, --quiet, --progress-file and the fleet's (--jobs, --engine,
    --ray-address, --threads) is a field of cflowad.Config under
    the same name; the model's model.json records them all.
    """
    reporter = Reporter(enabled=not quiet, progress_file=progress_file)
    given = {
        name: value
        for name, value in ctx.params.items()
        # typer vendors its own click: compare the source by name, not by class
        if getattr(ctx.get_parameter_source(name), "name", "DEFAULT") != "DEFAULT"
    }
    if str(given.get("image_size", "")).strip().lower() == "native":
        given.pop("image_size")
        given["aspect"] = "native"
    if given.pop("random_weights", False):
        given["encoder_weights"] = "random"
    for name, kind, example in (
        ("strides", int, "8,16,32"),
        ("scale_weights", float, "2,1,1"),
        ("coupling_blocks", int, "4,6,8"),
    ):
        if name in given:
            given[name] = comma_separated(given[name], name, kind, example)
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
    for option, single in (("--region", region is not None), ("--tune", tune)):
        if categories and single:
            raise UserError(f"option {option}: {data} is a root of categories; give one category")
    if tune_budget is not None and (not tune or tune_budget <= 0):
        raise UserError("option --tune-budget: a positive number of minutes, with --tune")
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
        images = [images[i] for i in keep_readable(images)]
    if tune:
        model = tune_model(config, images, device, reporter, tune_budget, region)
    else:
        model = CFlowAD(config, device=device).fit(images, reporter=reporter, region=region)
    model.save(out)
    if tune and not quiet:
        _tune_table(model.training["tune"])
    summary_table([("model", str(out)), *_training_rows(model)], quiet)


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
    summary_table([*rows, ("fleet", str(out / FLEET_FILE))], quiet)
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


def _tune_table(tune: dict[str, Any]) -> None:
    """The candidates of --tune, the chosen one marked."""
    table = Table(title=f"--tune: {tune['criterion']}", box=None, highlight=False)
    for column in ("", "decoder", "input", "tile", "weights", "image AUROC", "pixel AUROC"):
        table.add_column(column)
    table.add_column("AUPRO")
    table.add_column("criterion")
    table.add_column("train s")
    for row in tune["candidates"]:
        tile = str(row.get("tile_size") or "")
        if row.get("skipped"):
            table.add_row("", row["decoder"], row["size"], tile, "skipped (--tune-budget)")
            continue
        table.add_row(
            "*" if row["chosen"] else "",
            row["decoder"],
            row["size"],
            tile,
            row["scale_weights"],
            *(f"{row[k]:.3f}" for k in ("image_auroc", "pixel_auroc", "aupro", "criterion")),
            f"{row['train_seconds']:.0f}",
        )
    Console(highlight=False).print(table)


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

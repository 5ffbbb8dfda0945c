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
    keep_readable,
    summary_table,
    with_config_options,
)
from cflowad.common.errors import UserError
from cflowad.common.progress import Reporter
from cflowad.data.datasets import find_training_images
from cflowad.data.files import refuse_foreign
from cflowad.engine.model import CFlowAD, is_model_dir
from cflowad.fleet.training import FLEET_FILE, Category, find_categories, train_fleet
from cflowad.method.config import CONFIG_FIELDS, Config, parse_field, read_config_file
from cflowad.selection.tune import tune as tune_model

__all__ = ["train"]


@with_config_options
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
    random_weights: Annotated[
        bool, typer.Option(hidden=True, help="Same as --encoder-weights random.")
    ] = False,
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
    **options: Any,
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
    fields = {} if config_file is None else read_config_file(config_file)
    # the options given on the command line override the file (typer vendors its own
    # click: compare the source by name, not by class)
    fields.update(
        (name, parse_field(name, str(value) if isinstance(value, Path) else value))
        for name, value in options.items()
        if getattr(ctx.get_parameter_source(name), "name", "DEFAULT") != "DEFAULT"
    )
    if random_weights:
        fields["encoder_weights"] = "random"
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
    c = model.fitted_calibration()
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
            f"image {c.image_threshold_raw:.4g}, pixel {c.pixel_threshold_raw:.4g} "
            f"(0.5 on the 0-1 scale; held-out false-positive rate "
            f"{c.image_fpr_achievable or 0:.2%} achievable for images)",
        ),
    ]

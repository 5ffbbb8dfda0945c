"""``cflowad demo``: the main job on built-in defaults (the work is :mod:`cflowad.results.demo`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cflowad.cli.options import DEFAULTS, Quiet, summary_table
from cflowad.common.progress import Reporter

__all__ = ["demo"]


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
    from cflowad.results.demo import run_demo

    metrics = run_demo(out, steps=steps, reporter=Reporter(enabled=not quiet), decoder=decoder)
    summary_table([(k, _fmt(v)) for k, v in metrics.items() if not isinstance(v, dict)], quiet)


def _fmt(value: object) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)

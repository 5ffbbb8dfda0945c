"""The Typer application and ``main``: the error contract of every command.

Error contract: a mistake the user can fix prints one line naming the file or
option to stderr and exits 2; an internal error exits 1 with its traceback
(``--debug`` shows tracebacks for every error). The commands are registered in
:mod:`cflowad.cli`, each defined in the module of its group.
"""

from __future__ import annotations

import sys
import traceback
import warnings
from typing import Annotated, Any

import typer
from typer.exceptions import TyperException

from cflowad.cli.options import skipped
from cflowad.common.allocator import keep_freed_memory
from cflowad.common.errors import UserError
from cflowad.common.version import __version__

__all__ = ["app", "main"]

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    help="CFLOW-AD anomaly detection: train on good images, flag and localize defects.",
)


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


def _one_line_warning(message: Warning | str, *_: Any, **__: Any) -> None:
    print(f"cflowad: warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Entry point with the error contract: user errors exit 2 in one line, bugs exit 1."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    keep_freed_memory()
    warnings.showwarning = _one_line_warning
    command = typer.main.get_command(app)
    skipped.clear()
    try:
        result = command.main(args, prog_name="cflowad", standalone_mode=False)
        if skipped:
            print(
                f"cflowad: warning: skipped {len(skipped)} unreadable image files (--skip-bad)",
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

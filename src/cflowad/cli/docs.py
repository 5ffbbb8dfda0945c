"""docs/cli.md, generated from the command line itself so that it cannot drift.

Regenerate with ``python -m cflowad.cli.docs > docs/cli.md``; a test checks it is current.
"""

from __future__ import annotations

from typing import Any

import typer

from cflowad.cli import app

__all__ = ["cli_reference"]


def cli_reference() -> str:
    """Every command with its arguments and options, defaults included, as Markdown."""
    root = typer.main.get_command(app)
    lines = [
        "# Command reference",
        "",
        "Generated from the CLI (`python -m cflowad.cli.docs > docs/cli.md`); "
        "`cflowad COMMAND --help` shows the same.",
        "",
        "A mistake (missing file, bad option value, broken model) prints one line naming "
        "it and exits 2; an internal error exits 1 with a traceback (`--debug` always "
        "shows tracebacks).",
    ]
    for name, command in sorted(root.commands.items()):  # type: ignore[attr-defined]
        lines += ["", f"## cflowad {name}", "", (command.help or "").strip(), ""]
        arguments = [p for p in command.params if p.param_type_name == "argument"]
        if arguments:
            lines.append("Arguments: " + ", ".join(f"`{p.name.upper()}`" for p in arguments))
            lines.append("")
        lines += ["| option | default | meaning |", "|---|---|---|"]
        for option in command.params:
            if option.param_type_name != "option" or option.hidden:
                continue
            flags = " / ".join(f"`{f}`" for f in [*option.opts, *option.secondary_opts])
            lines.append(f"| {flags} | {_default(option)} | {(option.help or '').strip()} |")
    return "\n".join(lines) + "\n"


def _default(option: Any) -> str:
    if option.is_flag and option.secondary_opts:
        return "on" if option.default else "off"
    if option.is_flag:
        return "off"
    if option.required:
        return "required"
    return "-" if option.default is None else f"`{option.default}`"


if __name__ == "__main__":
    print(cli_reference(), end="")

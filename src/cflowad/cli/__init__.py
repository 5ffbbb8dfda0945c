"""The ``cflowad`` command line: every command, in the order ``cflowad --help`` lists them.

Each group of commands is a module of this package (options shared between commands
are in :mod:`cflowad.cli.options`, the error contract in :mod:`cflowad.cli.app`).
"""

from cflowad.cli import demo, deploy, scoring, serving, streams, studio, training
from cflowad.cli.app import app, main

__all__ = ["app", "main"]

app.command()(training.train)
app.command()(scoring.predict)
app.command()(deploy.export)
app.command("test")(scoring.test_command)
app.command()(demo.demo)
app.command()(deploy.bench)
app.command()(serving.serve)
app.command()(serving.loadtest)
app.command()(streams.watch)
app.command()(streams.stream)
app.command()(studio.studio)

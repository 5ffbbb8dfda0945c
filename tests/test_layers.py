"""The packages stay layers: every import, even one inside a function, goes down the map
that docs/architecture.md draws, and no module imports itself back through others.

The allowed imports are read from the table in docs/architecture.md, so the map a
newcomer reads is the rule the code is held to.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parents[1] / "src" / "cflowad"
MAP = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"
ROOT = "<root>"  # cflowad/__init__.py, __main__.py and the old import paths: the public face


def modules(source: Path = SOURCE) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    found = {}
    for path in source.rglob("*.py"):
        parts = list(path.relative_to(source.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def import_edges(found: dict[str, Path]) -> set[tuple[str, str]]:
    """(importer, imported) for every cflowad import anywhere in a module, lazy ones too."""
    edges = set()
    for name, path in found.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                # `from cflowad.x import y` imports the module cflowad.x.y when there is one
                targets = [
                    f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in found else node.module
                    for a in node.names
                ]
            elif isinstance(node, ast.ImportFrom):
                raise AssertionError(f"{path}: relative import; write the absolute path")
            else:
                continue
            edges.update((name, t) for t in targets if t.split(".")[0] == "cflowad")
    return edges


def package_of(module: str, packages: Iterable[str]) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in packages else ROOT


def read_map(text: str) -> dict[str, set[str]]:
    """The table rows ``| `cflowad.PKG` | holds | may import |`` as {package: allowed}."""
    rows = re.findall(r"^\| `cflowad\.(\w+)` \|[^|]*\|([^|]*)\|\s*$", text, re.M)
    allowed: dict[str, set[str]] = {}
    for package, may in rows:
        may = may.strip()
        if may == "nothing":
            allowed[package] = set()
        elif may == "every package":
            allowed[package] = {p for p, _ in rows} - {package}
        else:
            allowed[package] = set(re.findall(r"`(\w+)`", may))
    return allowed


def violations(edges: set[tuple[str, str]], allowed: dict[str, set[str]]) -> list[str]:
    """Imports that go against the map: up a layer, sideways, or into the public face."""
    found = []
    for importer, imported in sorted(edges):
        source, target = package_of(importer, allowed), package_of(imported, allowed)
        if source in (ROOT, target):
            continue
        if target == ROOT:
            found.append(f"{importer} imports {imported}: the public face, not a layer")
        elif target not in allowed[source]:
            found.append(f"{importer} imports {imported}: {source} may not import {target}")
    return found


def cycles(edges: set[tuple[str, str]]) -> list[list[str]]:
    """Import cycles between modules (each found once, from its smallest module)."""
    graph: dict[str, set[str]] = {}
    for a, b in edges:
        graph.setdefault(a, set()).add(b)
    found = []

    def visit(start: str, node: str, path: list[str]) -> None:
        for nxt in sorted(graph.get(node, ())):
            if nxt == start:
                found.append([*path, start])
            elif nxt > start and nxt not in path:
                visit(start, nxt, [*path, nxt])

    for start in sorted(graph):
        visit(start, start, [start])
    return found


def test_every_import_goes_down_the_map_in_docs_architecture():
    found = modules()
    allowed = read_map(MAP.read_text())
    packages = {p.name for p in SOURCE.iterdir() if (p / "__init__.py").is_file()}
    assert set(allowed) == packages, "docs/architecture.md maps every package, and only those"
    assert violations(import_edges(found), allowed) == []


def test_no_module_imports_itself_back_not_even_lazily():
    assert cycles(import_edges(modules())) == []


def test_the_map_itself_is_layered():
    allowed = read_map(MAP.read_text())
    package_edges = {(f"cflowad.{a}", f"cflowad.{b}") for a, may in allowed.items() for b in may}
    assert cycles(package_edges) == []


def test_the_checks_catch_an_upward_import_and_a_cycle(tmp_path):
    package = tmp_path / "cflowad"
    for folder, text in {
        "common": "import cflowad.method.flows\n",  # the lowest layer importing the method
        "method": "from cflowad.method import other\n",
    }.items():
        (package / folder).mkdir(parents=True)
        (package / folder / "__init__.py").write_text("")
        (package / folder / "mod.py").write_text(text)
    (package / "method" / "flows.py").write_text("")
    (package / "method" / "other.py").write_text("from cflowad.method.mod import x\n")
    (package / "__init__.py").write_text("")
    edges = import_edges(modules(package))
    allowed = {"common": set(), "method": {"common"}}
    assert violations(edges, allowed) == [
        "cflowad.common.mod imports cflowad.method.flows: common may not import method"
    ]
    assert cycles(edges) == [["cflowad.method.mod", "cflowad.method.other", "cflowad.method.mod"]]


@pytest.mark.parametrize(
    ("old", "homes"),
    [
        ("cflowad.model", ["cflowad.engine.model"]),
        ("cflowad.inference", ["cflowad.engine.inference"]),
        ("cflowad.runtime", ["cflowad.engine.onnx", "cflowad.engine.threads"]),
    ],
)
def test_the_old_import_paths_give_the_same_objects_and_warn(old, homes, monkeypatch):
    import importlib
    import sys

    monkeypatch.delitem(sys.modules, old, raising=False)  # imported afresh: it warns again
    with pytest.warns(DeprecationWarning, match=rf"{old} is deprecated and goes in cflowad 0\.17"):
        module = importlib.import_module(old)
    assert module.__all__
    for name in module.__all__:
        found = [getattr(importlib.import_module(h), name, None) for h in homes]
        assert any(getattr(module, name) is f for f in found), name


@pytest.mark.parametrize(
    ("name", "home"),
    [
        ("CFlowAD", "cflowad.engine.model"),
        ("OnnxModel", "cflowad.engine.onnx"),
        ("Predictor", "cflowad.engine.inference"),
        ("Config", "cflowad.method.config"),
        ("load", "cflowad.engine.loading"),
    ],
)
def test_the_public_api_is_importable_from_the_top(name, home):
    import importlib

    import cflowad

    assert name in cflowad.__all__
    assert getattr(cflowad, name) is getattr(importlib.import_module(home), name)


MODEL_FILES = ("model.json", "model.safetensors")


def model_file_paths(found: dict[str, Path]) -> list[str]:
    """``something / "model.json"`` (or the weights file) in a module outside the engine:
    a second reader of the model's files, which cflowad.engine.catalog owns."""
    paths = []
    for name, path in found.items():
        if name.startswith("cflowad.engine"):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (
                isinstance(node, ast.BinOp)
                and isinstance(node.op, ast.Div)
                and isinstance(node.right, ast.Constant)
                and node.right.value in MODEL_FILES
            ):
                paths.append(f"{name}:{node.lineno}")
    return paths


def test_only_the_engine_opens_a_models_files():
    assert model_file_paths(modules()) == []


def test_the_model_file_check_catches_a_reader(tmp_path):
    package = tmp_path / "cflowad"
    (package / "line").mkdir(parents=True)
    (package / "engine").mkdir()
    (package / "line" / "x.py").write_text(
        "import json\njson.loads((path / 'model.json').read_text())\n"
    )
    (package / "engine" / "y.py").write_text("meta = directory / 'model.json'\n")
    assert model_file_paths(modules(package)) == ["cflowad.line.x:2"]

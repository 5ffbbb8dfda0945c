"""Which models a path holds, and the names they are known by (served, listed, chosen).

A model is a directory from ``cflowad train`` (it holds ``model.json``), an ONNX
file or an OpenVINO folder (it holds ``model.xml``) from ``cflowad export``. A
directory is known by its folder name, an ONNX file by its file name
(``magnetic_tile.onnx``), so a model and its export can sit side by side.
"""

from __future__ import annotations

import re
from pathlib import Path

from cflowad.common.errors import UserError
from cflowad.engine.openvino import IR_FILE, is_openvino_folder

__all__ = [
    "NAME_PATTERN",
    "find_models",
    "is_exported",
    "is_model_source",
    "is_onnx_file",
    "model_files",
    "model_format",
    "scan_models",
]

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def is_model_source(path: Path) -> bool:
    """A model directory (with ``model.json``), an ``.onnx`` file or an OpenVINO folder."""
    if path.is_dir():
        return (path / "model.json").is_file() or is_openvino_folder(path)
    return is_onnx_file(path)


def is_exported(path: Path) -> bool:
    """An ONNX file or an OpenVINO folder: scored by a runtime other than PyTorch."""
    return is_onnx_file(path) or is_openvino_folder(path)


def model_format(path: Path) -> str:
    """How a model is stored, as the model lists say it: onnx, openvino, model directory."""
    if is_onnx_file(path) or path.suffix.lower() == ".onnx":
        return "onnx"
    return "openvino" if is_openvino_folder(path) else "model directory"


def model_files(path: Path) -> list[Path]:
    """The files a model is made of: what changes when it is replaced on disk."""
    if not path.is_dir():
        return [path]
    if is_openvino_folder(path):
        return [path / IR_FILE, path / IR_FILE.replace(".xml", ".bin")]
    return [path / "model.json", path / "model.safetensors"]


def is_onnx_file(path: Path) -> bool:
    """An ``.onnx`` file (from ``cflowad export``), scored by ONNX Runtime."""
    return path.is_file() and path.suffix.lower() == ".onnx"


def find_models(path: Path, option: str = "MODELS") -> dict[str, Path]:
    """Name -> path for a model directory, an ONNX file, or a folder of them (not recursive).

    Example:
        >>> import tempfile
        >>> root = Path(tempfile.mkdtemp())
        >>> (root / "tile").mkdir(); (root / "tile" / "model.json").write_text("{}")
        2
        >>> (root / "tile.onnx").write_bytes(b""); (root / "notes.txt").write_text("")
        0
        0
        >>> sorted(find_models(root))
        ['tile', 'tile.onnx']
    """
    if not path.exists():
        raise UserError(f"{option} {path}: not found")
    if is_model_source(path):
        found = {path.name: path}
    elif path.is_dir():
        found = {child.name: child for child in sorted(path.iterdir()) if is_model_source(child)}
        if not found:
            raise UserError(
                f"{option} {path}: no models in it (model directories from cflowad train, "
                "holding model.json, "
                "or .onnx files and OpenVINO folders from cflowad export, directly in the folder)"
            )
    else:
        raise UserError(
            f"{option} {path}: not a model (a model directory, an .onnx file or a folder of them)"
        )
    for name, source in found.items():
        if not NAME_PATTERN.fullmatch(name):
            raise UserError(
                f"{source}: the name {name!r} cannot be used in a URL; rename it to letters, "
                "digits, '.', '_' and '-'"
            )
    return found


def scan_models(folder: Path) -> dict[str, Path]:
    """Name -> path of the models directly in ``folder`` whose names fit a URL; none is fine.

    For a folder that models come and go in (``cflowad serve`` on a folder, the studio's
    workspace); names starting with '.' are staging folders and are skipped.
    """
    if not folder.is_dir():
        return {}
    return {
        child.name: child
        for child in sorted(folder.iterdir())
        if NAME_PATTERN.fullmatch(child.name) and is_model_source(child)
    }

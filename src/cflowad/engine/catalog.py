"""Which models a path holds, what each is, and what its files say: the model's card.

A model is a directory from ``cflowad train`` (it holds ``model.json``), an ONNX
file or an OpenVINO folder (it holds ``model.xml``) from ``cflowad export``. A
directory is known by its folder name, an ONNX file by its file name
(``magnetic_tile.onnx``), so a model and its export can sit side by side.

This module is the only reader of ``model.json`` and the only hash of model files:
every package (the line, fleets, the studio) asks :func:`read_card` or
:func:`identity`, so a change of the format is made here once.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cflowad.common.errors import UserError
from cflowad.engine.openvino import IR_FILE, is_openvino_folder
from cflowad.method.calibration import Calibration

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "META_FILE",
    "NAME_PATTERN",
    "REGION_FORMAT_VERSION",
    "WEIGHTS_FILE",
    "Calibration",
    "ModelCard",
    "file_sha256",
    "find_models",
    "identity",
    "is_exported",
    "is_model_source",
    "is_onnx_file",
    "model_files",
    "model_format",
    "model_kind",
    "read_card",
    "read_meta",
    "scan_models",
]

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
FORMAT = "cflowad-model"
FORMAT_VERSION = 3
# A model with an inspection region says 4, so that a cflowad before 0.11, which would
# ignore the region and report specks outside it, refuses the model instead.
REGION_FORMAT_VERSION = 4
# What changed in each version, for the one-line message that an old model gets.
_RETRAIN = {
    2: "it fuses the scales by unbounded z-scores, which let the coarsest scale swamp the "
    "others; its held-out statistics were not saved, so it cannot be converted",
}
WEIGHTS_FILE = "model.safetensors"
META_FILE = "model.json"

Kind = Literal["directory", "onnx", "openvino"]
_FORMATS = {"directory": "model directory", "onnx": "onnx", "openvino": "openvino"}


def model_kind(path: Path) -> Kind | None:
    """``directory`` (holds model.json), ``onnx`` (an ``.onnx`` file, any case of the
    suffix), ``openvino`` (a folder with model.xml), or None."""
    if path.is_dir():
        if is_openvino_folder(path):
            return "openvino"
        return "directory" if (path / META_FILE).is_file() else None
    return "onnx" if is_onnx_file(path) else None


def is_model_source(path: Path) -> bool:
    """A model directory (with ``model.json``), an ``.onnx`` file or an OpenVINO folder."""
    return model_kind(path) is not None


def is_exported(path: Path) -> bool:
    """An ONNX file or an OpenVINO folder: scored by a runtime other than PyTorch."""
    return model_kind(path) in ("onnx", "openvino")


def model_format(path: Path) -> str:
    """How a model is stored, as the model lists say it: onnx, openvino, model directory."""
    if path.suffix.lower() == ".onnx" and not path.is_dir():
        return "onnx"  # also a file that is gone (a model list still names it)
    return _FORMATS[model_kind(path) or "directory"]


def model_files(path: Path) -> list[Path]:
    """The files a model is made of: what changes when it is replaced on disk."""
    if not path.is_dir():
        return [path]
    if is_openvino_folder(path):
        return [path / IR_FILE, path / IR_FILE.replace(".xml", ".bin")]
    return [path / META_FILE, path / WEIGHTS_FILE]


def is_onnx_file(path: Path) -> bool:
    """An ``.onnx`` file (from ``cflowad export``), scored by ONNX Runtime."""
    return path.is_file() and path.suffix.lower() == ".onnx"


def file_sha256(*paths: Path) -> str:
    """The SHA-256 of the files' bytes, one after the other (read 1 MiB at a time)."""
    digest = hashlib.sha256()
    for path in paths:
        with path.open("rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def read_meta(directory: Path, verify: bool = True) -> dict[str, Any]:
    """A model directory's ``model.json``, checked: the format, a version this cflowad
    reads, and (``verify``) the weights file whose checksum it records; errors name
    the file."""
    meta_path, weights_path = directory / META_FILE, directory / WEIGHTS_FILE
    if not directory.is_dir():
        raise UserError(f"{directory}: model directory not found")
    for path in (meta_path, weights_path):
        if not path.is_file():
            raise UserError(f"{path}: missing (not a cflowad model directory?)")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{meta_path}: not valid JSON ({error})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UserError(f"{meta_path}: not a cflowad model file")
    version = meta.get("format_version")
    if version in _RETRAIN:
        raise UserError(
            f"{meta_path}: format version {version} needs retraining with this cflowad "
            f"(cflowad train): {_RETRAIN[version]}"
        )
    if version not in (FORMAT_VERSION, REGION_FORMAT_VERSION):
        raise UserError(
            f"{meta_path}: format version {version} is not supported (this cflowad "
            f"reads {FORMAT_VERSION} and {REGION_FORMAT_VERSION}; a newer cflowad wrote it?)"
        )
    if verify and file_sha256(weights_path) != meta.get("weights_sha256"):
        raise UserError(f"{weights_path}: checksum mismatch (truncated or modified file)")
    return meta


def identity(path: Path) -> str | None:
    """What identifies a model's content: a model directory's weights checksum (recorded
    in model.json), an export's own files' hash; None for a path that holds no model."""
    kind = model_kind(path)
    try:
        if kind == "directory":
            recorded = json.loads((path / META_FILE).read_text()).get("weights_sha256")
            return str(recorded) if recorded else None
        if kind is not None:
            return file_sha256(*model_files(path))
    except (OSError, ValueError, AttributeError):
        return None
    return None


@dataclass(frozen=True)
class ModelCard:
    """What one model path is and what its files say, without building its network.

    ``calibration`` and ``config`` are those of the model directory the path was
    trained or exported as; ``training`` is its training summary.
    """

    path: Path
    name: str
    kind: Kind
    files: tuple[Path, ...]
    identity: str
    calibration: Calibration
    config: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)

    @property
    def format(self) -> str:
        """onnx, openvino or model directory, as the model lists say it."""
        return _FORMATS[self.kind]


def read_card(path: Path) -> ModelCard:
    """The card of a model directory (its ``model.json``, checked as a load checks it
    but for the weights' checksum, which only a load computes) or of an export (its
    metadata, read by its runtime); errors name the file."""
    kind = model_kind(path)
    if kind is None:
        raise UserError(
            f"{path}: not a model (a model directory, an .onnx file or an OpenVINO folder)"
        )
    files = tuple(model_files(path))
    if kind == "directory":
        meta = read_meta(path, verify=False)
        try:
            calibration = Calibration.from_dict(meta["calibration"])
        except (KeyError, TypeError, ValueError) as error:
            raise UserError(f"{path / META_FILE}: incomplete model description ({error})") from None
        return ModelCard(
            path,
            path.name,
            kind,
            files,
            str(meta["weights_sha256"]),
            calibration,
            dict(meta.get("config") or {}),
            dict(meta.get("training") or {}),
        )
    from cflowad.engine.onnx import OnnxModel
    from cflowad.engine.openvino import OpenVinoModel

    # an export's metadata is read by its runtime (ONNX Runtime or OpenVINO)
    exported = OnnxModel(path) if kind == "onnx" else OpenVinoModel(path)
    summary = exported.describe()
    return ModelCard(
        path,
        path.name,
        kind,
        files,
        file_sha256(*files),
        exported.calibration,
        {
            "backbone": summary["backbone"],
            "decoder": summary["decoder"],
            "image_size": list(exported.image_size),
        },
        summary["training"],
    )


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

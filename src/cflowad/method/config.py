"""The model's configuration: one frozen dataclass, saved in every model file."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import UnionType
from typing import Any, Union, get_args, get_origin, get_type_hints

import numpy as np

from cflowad.common.errors import UserError

__all__ = [
    "CONFIG_FIELDS",
    "Config",
    "comma_separated",
    "field_type",
    "option_default",
    "parse_field",
    "parse_image_size",
    "read_config_file",
]

OBJECTIVES = ("nll", "logsigmoid")
PRECISIONS = ("auto", "float32", "bfloat16")
ENCODER_WEIGHTS = ("pretrained", "random")
ASPECTS = ("auto", "fixed", "native")
DECODERS = ("flow", "gaussian")
# How a field is written on the command line and in the studio's settings, beyond its type:
# "size" (N, WIDTHxHEIGHT or native), "ints" / "floats" (comma-separated), "path".
KINDS = ("plain", "size", "ints", "floats", "path")


def _field(
    default: Any,
    help: str,
    *,
    flags: tuple[str, ...] = (),
    kind: str = "plain",
    example: str = "",
    studio: bool = False,
) -> Any:
    """A Config field with what every front end needs to offer it: the help text, the
    command line's flags (default ``--field-name``), how it is written as text, and
    whether the studio's training form offers it. The one source of each option."""
    return field(
        default=default,
        metadata={"help": help, "flags": flags, "kind": kind, "example": example, "studio": studio},
    )


@dataclass(frozen=True)
class Config:
    """Every choice that defines a CFLOW-AD model; CLI flags map onto these fields 1:1.

    Defaults follow the paper (8 coupling blocks, clamp 1.9, 128 condition channels,
    fiber batches of 256, objective (7.2)) except where a benchmark in the README
    supports a change: Adam's learning rate is 8e-3 (2e-4 in the paper, which trains
    for far more steps), and the finest of several scales draws ``finest_batch_factor``
    (4) fiber batches' worth of vectors per step (see :func:`cflowad.method.train.fiber_batches`).
    ``image_size`` is (height, width), multiples of 32. With
    ``aspect="auto"`` and a square ``image_size`` N, ``fit`` keeps the training
    images' median aspect ratio: the shorter side is N, the longer one a multiple
    of 32 (``"fixed"`` uses ``image_size`` as given; ``"native"`` the images' own
    median size, rounded down to multiples of 32: :meth:`fit_to`). ``training_precision="auto"``
    trains the decoders with bfloat16 matrix products where they measure faster
    than float32 on this CPU (scoring is always float32); ``compile_training`` fuses the
    training step with torch.compile (falls back to eager if compiling fails).
    ``scale_weights`` (finest scale first; ``None``: equal, the default) weights each
    scale's bounded term in the map; training does not depend on it, thresholds do.
    ``tile_size`` (a multiple of 32; ``None``: no tiles) runs the encoder on square tiles
    of the input, neighbours sharing ``tile_overlap`` of a tile (:mod:`cflowad.method.tiles`):
    ``image_size`` can then be the images' native size with memory set by the tile.

    Example:
        >>> Config(image_size=(256, 384)).image_size
        (256, 384)
    """

    backbone: str = _field("tf_efficientnet_lite0", "timm CNN name.")
    decoder: str = _field(
        "flow",
        "flow (the paper's conditional flows) or gaussian (the appendix's Gaussian model, "
        "one per position: fitted in seconds, no training steps).",
        studio=True,
    )
    encoder_weights: str = _field(
        "pretrained", "pretrained (ImageNet) or random (tests only: poor accuracy).", studio=True
    )
    weights_file: str | None = _field(
        None, "Encoder weights file (.safetensors or .pth).", kind="path"
    )
    image_size: tuple[int, int] = _field(
        (256, 256),
        "Model input: N (shorter side N, longer side keeps the training images' median "
        "aspect unless --aspect fixed), WIDTHxHEIGHT, multiples of 32, or native (the "
        "training images' own size: with --tile-size for photos of megapixels).",
        kind="size",
        studio=True,
    )
    aspect: str = _field(
        "auto",
        "auto: keep the median aspect ratio; fixed: N x N; native: the training images' "
        "median size, rounded down to multiples of 32 (--image-size native).",
    )
    strides: tuple[int, ...] = _field(
        (8, 16, 32), "Feature strides, comma-separated.", kind="ints", example="8,16,32"
    )
    coupling_blocks: int | tuple[int, ...] = _field(
        8,
        "Coupling blocks per flow: one number for every scale, or one per stride, finest "
        "first (4,6,8 lightens the finest scale, which has the most positions).",
        kind="ints",
        example="4,6,8",
    )
    condition_dim: int = _field(128, "Positional-encoding channels.")
    clamp_alpha: float = _field(1.9, "Soft clamping of coupling log-scales.")
    objective: str = _field("nll", "nll (paper eq. 7.2) or logsigmoid (official code's variant).")
    training_precision: str = _field(
        "auto",
        "Decoder training: auto (bfloat16 where its matrix products measure faster than "
        "float32 on this CPU), float32 or bfloat16. Scoring is always float32.",
        flags=("--training-precision", "--precision"),
    )
    compile_training: bool = _field(
        True,
        "Fuse the training step with torch.compile (needs a C++ compiler; about a minute "
        "the first time, cached afterwards).",
        flags=("--compile-training/--no-compile-training", "--compile/--no-compile"),
        studio=True,
    )
    fiber_batch_size: int = _field(256, "Feature vectors per fiber batch.")
    finest_batch_factor: int = _field(
        4,
        "The finest of several scales draws this many fiber batches per step (it has 16x "
        "the coarsest scale's vectors and the cheapest flow).",
    )
    steps: int = _field(
        3000,
        "Optimizer steps (one fiber batch per scale each, more for the finest).",
        studio=True,
    )
    learning_rate: float = _field(8e-3, "Adam peak learning rate.")
    warmup_fraction: float = _field(0.05, "Share of steps with a linear learning-rate warm-up.")
    holdout_fraction: float = _field(
        0.1, "Share of images held out to calibrate thresholds.", studio=True
    )
    min_holdout: int = _field(4, "Held-out images at least.", studio=True)
    calibrate_on_train: bool = _field(
        False, "Train on every image and calibrate on them too (optimistic)."
    )
    image_fpr: float = _field(
        0.01, "Target false-positive rate of the image threshold.", studio=True
    )
    pixel_fpr: float = _field(0.01, "Target false-positive rate of the pixel threshold.")
    feature_pooling: int = _field(1, "Average each feature over its k x k neighbourhood (1: none).")
    score_top_k: float = _field(
        0.0, "Image score: mean of this top fraction of the map (0: maximum)."
    )
    scale_weights: tuple[float, ...] | None = _field(
        None,
        "Weights of the scales in the map, comma-separated, finest first (default: equal). "
        "Each scale's term stays bounded; weighting the finest scale sharpens maps of small "
        "defects, the coarsest helps large ones (docs/design.md).",
        kind="floats",
        example="2,1,1",
        studio=True,
    )
    tile_size: int | None = _field(
        None,
        "Run the encoder on square tiles of this many input pixels (a multiple of 32), "
        "stitched into one map: give --image-size the images' native size (or a fraction "
        "of it) and memory follows the tile, not the image (docs/design.md).",
        studio=True,
    )
    tile_overlap: float = _field(
        0.25,
        "With --tile-size: share of a tile that neighbours overlap; each keeps the half of "
        "the overlap nearer its centre.",
    )
    feature_cache_budget_mb: int = _field(
        4096,
        "Feature cache above this goes to a memory-mapped file.",
        flags=("--feature-cache-budget-mb", "--cache-budget-mb"),
    )
    feature_cache_dir: str | None = _field(
        None,
        "Folder for a memory-mapped feature cache (default: the temporary folder).",
        flags=("--feature-cache-dir", "--cache-dir"),
        kind="path",
    )
    seed: int = _field(0, "Seed for hold-out split, weights and sampling.")

    def __post_init__(self) -> None:
        if isinstance(self.image_size, str) and self.image_size.strip().lower() == "native":
            # the training images' own size, found by fit_to: no size to give until then
            object.__setattr__(self, "aspect", "native")
            object.__setattr__(self, "image_size", (256, 256))
        object.__setattr__(self, "image_size", parse_image_size(self.image_size))
        # finest first, as the encoder returns its scales (8,16,32 and 32,16,8 are one model)
        object.__setattr__(self, "strides", tuple(sorted(int(s) for s in self.strides)))
        if self.scale_weights is not None:  # finest scale first, as the strides are sorted
            try:
                weights = tuple(float(w) for w in self.scale_weights)
            except (TypeError, ValueError):
                raise UserError(
                    f"option scale_weights={self.scale_weights!r} must be numbers, e.g. 2,1,1"
                ) from None
            object.__setattr__(self, "scale_weights", weights)
        if not isinstance(self.coupling_blocks, int):  # a list from JSON, a tuple, "4,6,8"
            try:
                blocks = tuple(int(b) for b in self.coupling_blocks)
            except (TypeError, ValueError):
                raise UserError(
                    f"option coupling_blocks={self.coupling_blocks!r} must be integers, e.g. 4,6,8"
                ) from None
            object.__setattr__(self, "coupling_blocks", blocks[0] if len(blocks) == 1 else blocks)
        checks = [
            (self.objective in OBJECTIVES, "objective", f"one of {', '.join(OBJECTIVES)}"),
            (self.decoder in DECODERS, "decoder", f"one of {', '.join(DECODERS)}"),
            (
                self.training_precision in PRECISIONS,
                "training_precision",
                f"one of {', '.join(PRECISIONS)}",
            ),
            (self.aspect in ASPECTS, "aspect", f"one of {', '.join(ASPECTS)}"),
            (
                self.encoder_weights in ENCODER_WEIGHTS,
                "encoder_weights",
                f"one of {', '.join(ENCODER_WEIGHTS)}",
            ),
            (
                all(b >= 1 for b in self.blocks_per_scale)
                and len(self.blocks_per_scale) == len(self.strides),
                "coupling_blocks",
                "at least 1: one number for every scale, or one per stride, finest first",
            ),
            (
                self.condition_dim >= 2 and self.condition_dim % 4 == 0,
                "condition_dim",
                "a positive multiple of 4",
            ),
            (self.clamp_alpha > 0, "clamp_alpha", "positive"),
            (self.fiber_batch_size >= 2, "fiber_batch_size", "at least 2"),
            (self.finest_batch_factor >= 1, "finest_batch_factor", "at least 1"),
            (self.steps >= 1, "steps", "at least 1"),
            (self.learning_rate > 0, "learning_rate", "positive"),
            (0 <= self.warmup_fraction < 1, "warmup_fraction", "in [0, 1)"),
            (0 < self.holdout_fraction < 1, "holdout_fraction", "in (0, 1)"),
            (self.min_holdout >= 1, "min_holdout", "at least 1"),
            (0 < self.image_fpr < 1, "image_fpr", "in (0, 1)"),
            (0 < self.pixel_fpr < 1, "pixel_fpr", "in (0, 1)"),
            (0 <= self.score_top_k < 1, "score_top_k", "in [0, 1) (0 means the maximum)"),
            (
                self.feature_pooling >= 1 and self.feature_pooling % 2 == 1,
                "feature_pooling",
                "an odd kernel size, 1 for none",
            ),
            (0 <= self.tile_overlap <= 0.75, "tile_overlap", "in [0, 0.75]"),
            (self.feature_cache_budget_mb >= 0, "feature_cache_budget_mb", "at least 0"),
            (
                len(self.strides) >= 1
                and len(set(self.strides)) == len(self.strides)
                and all(s in (4, 8, 16, 32) for s in self.strides),
                "strides",
                "a subset of 4, 8, 16, 32",
            ),
            (
                self.scale_weights is None
                or (
                    len(self.scale_weights) == len(self.strides)
                    and all(math.isfinite(w) and w > 0 for w in self.scale_weights)
                ),
                "scale_weights",
                "one positive weight per stride, finest first (omit it for equal weights)",
            ),
        ]
        for ok, name, what in checks:
            if not ok:
                raise UserError(f"option {name}={getattr(self, name)!r} must be {what}")
        largest = max(self.strides)
        if any(side % largest for side in self.image_size):
            raise UserError(
                f"option image_size={self.image_size} must be multiples of {largest} "
                "(the largest feature stride)"
            )
        tile = self.tile_size
        if tile is not None and (tile < 4 * largest or tile % largest):
            raise UserError(
                f"option tile_size={self.tile_size} must be a multiple of {largest} (the "
                f"largest feature stride), at least {4 * largest}"
            )

    @property
    def blocks_per_scale(self) -> tuple[int, ...]:
        """Coupling blocks of each scale's flow, finest first."""
        if isinstance(self.coupling_blocks, int):
            return (self.coupling_blocks,) * len(self.strides)
        return self.coupling_blocks

    def resolve_size(self, aspect_ratio: float) -> Config:
        """This config with ``image_size`` fitted to ``aspect_ratio`` (width / height)."""
        height, width = self.image_size
        if self.aspect != "auto" or height != width:
            return self
        step = max(self.strides)
        longer = max(height, step * round(height * max(aspect_ratio, 1 / aspect_ratio) / step))
        size = (height, longer) if aspect_ratio >= 1 else (longer, height)
        return dataclasses.replace(self, image_size=size, aspect="fixed")

    def fit_to(self, sizes: Sequence[tuple[int, int]]) -> Config:
        """This config with ``image_size`` resolved from the training images' (height,
        width): ``aspect="native"`` takes their median height and width (a camera's
        size; the majority's when two cameras mix), each rounded down to a multiple of
        the largest stride (the resolution tiles inspect at); ``"auto"`` keeps their
        median aspect ratio (:meth:`resolve_size`)."""
        if self.aspect != "native":
            return self.resolve_size(float(np.median([w / h for h, w in sizes])))
        step = max(self.strides)
        height, width = (int(np.median(side)) for side in zip(*sizes, strict=True))
        low = max(step, 32)  # the smallest input there is
        size = (max(low, height // step * step), max(low, width // step * step))
        return dataclasses.replace(self, image_size=size, aspect="fixed")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, the inverse of :meth:`from_dict`."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Config:
        """Rebuild from :meth:`to_dict` output, refusing unknown keys."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise UserError(f"unknown configuration keys: {', '.join(sorted(unknown))}")
        return cls(**data)


def parse_image_size(value: int | str | tuple[int, int] | list[int]) -> tuple[int, int]:
    """Accept 256, "256", "384x256" (width x height) or (height, width)."""
    if isinstance(value, str):
        text = value.lower().strip()
        try:
            if "x" in text:
                width, height = (int(p) for p in text.split("x"))
                return _positive((height, width), value)
            side = int(text)
        except ValueError:
            raise UserError(
                f"option image_size={value!r} must be N or WIDTHxHEIGHT, e.g. 256 or 384x256"
            ) from None
        return _positive((side, side), value)
    if isinstance(value, int):
        return _positive((value, value), value)
    if len(value) != 2:
        raise UserError(f"option image_size={value!r} must be (height, width)")
    return _positive((int(value[0]), int(value[1])), value)


def _positive(size: tuple[int, int], raw: object) -> tuple[int, int]:
    if min(size) < 32:
        raise UserError(f"option image_size={raw!r} must be at least 32 pixels per side")
    return size


CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(Config))
_FIELDS = {f.name: f for f in dataclasses.fields(Config)}
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def comma_separated(
    text: str, name: str, kind: Callable[[str], Any], example: str
) -> tuple[Any, ...]:
    """``"8,16,32"`` -> (8, 16, 32), or a one-line error naming the option: the one parser
    of every comma-separated option (--strides, --scale-weights, --batch-size, --concurrency)."""
    try:
        return tuple(kind(x) for x in text.split(","))
    except ValueError:
        what = "integers" if kind is int else "numbers"
        option = "--" + name.replace("_", "-")
        raise UserError(f"option {option}={text!r} must be {what}, e.g. {example}") from None


def field_type(name: str) -> type:
    """The type of a Config field's value, None left out: int, float, bool, str or tuple."""
    hint = get_type_hints(Config)[name]
    union = get_origin(hint) in (Union, UnionType)
    kinds = [t for t in get_args(hint) if t is not type(None)] if union else [hint]
    base = get_origin(kinds[-1]) or kinds[-1]  # int | tuple[int, ...]: as text, a tuple
    return tuple if base is tuple else base


def parse_field(name: str, value: Any) -> Any:
    """A Config field's value from its text (the command line's, the studio's settings);
    a value that is not text passes as it is, for Config to check. Errors name the option.

    Example:
        >>> parse_field("strides", "8,16"), parse_field("steps", "100"), parse_field("tune", 1)
        Traceback (most recent call last):
        ...
        cflowad.common.errors.UserError: unknown option tune (not a Config field)
        >>> parse_field("scale_weights", ""), parse_field("compile_training", "off")
        (None, False)
    """
    spec = _FIELDS.get(name)
    if spec is None:
        raise UserError(f"unknown option {name} (not a Config field)")
    if not isinstance(value, str):
        return value
    text, kind = value.strip(), spec.metadata["kind"]
    if text == "" and spec.default is None:
        return None
    if kind == "size":
        return text  # N, WIDTHxHEIGHT or native: Config reads all three
    if kind in ("ints", "floats"):
        parsed = comma_separated(
            text, name, int if kind == "ints" else float, spec.metadata["example"]
        )
        return parsed[0] if len(parsed) == 1 and isinstance(spec.default, int) else parsed
    base = field_type(name)
    if base is bool:
        if text.lower() not in (*_TRUE, *_FALSE):
            raise UserError(f"option --{name.replace('_', '-')}={value!r} must be true or false")
        return text.lower() in _TRUE
    if base in (int, float):
        try:
            return base(text)
        except ValueError:
            what = "an integer" if base is int else "a number"
            raise UserError(f"option --{name.replace('_', '-')}={value!r} must be {what}") from None
    return text


def option_default(name: str) -> Any:
    """A field's default as the command line shows and takes it: 256 for (256, 256),
    "8,16,32" for a tuple, the value itself otherwise."""
    default: Any = _FIELDS[name].default
    if _FIELDS[name].metadata["kind"] == "size":
        height, width = default
        return str(height) if height == width else f"{width}x{height}"
    if isinstance(default, tuple):
        return ",".join(str(v) for v in default)
    if _FIELDS[name].metadata["kind"] == "ints":
        return str(default)
    return default


def read_config_file(path: Path) -> dict[str, Any]:
    """Config fields from a TOML, JSON or (with PyYAML) YAML file; unknown keys are errors.

    A model's ``model.json`` works too: its ``config`` entry is read.
    """
    if not path.is_file():
        raise UserError(f"{path}: config file not found")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        elif path.suffix == ".json":
            data = json.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise UserError(f"{path}: reading YAML needs PyYAML: pip install pyyaml") from None
            data = yaml.safe_load(text)
        else:
            raise UserError(f"{path}: config files are .toml, .json or .yaml")
    except UserError:
        raise
    except Exception as error:  # each parser's own syntax error
        raise UserError(f"{path}: not a valid {path.suffix[1:]} file ({error})") from None
    if isinstance(data, dict) and isinstance(data.get("config"), dict):
        data = data["config"]
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a table of Config fields")
    unknown = sorted(set(data) - set(CONFIG_FIELDS))
    if unknown:
        raise UserError(f"{path}: unknown Config fields: {', '.join(unknown)}")
    return data

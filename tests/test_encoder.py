"""The encoder: real ImageNet weights from the offline Lite packages, shapes from feature_info."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage import data as skdata

from cflowad.data import to_model_input
from cflowad.encoder import Encoder, load_lite_classifier
from cflowad.errors import UserError

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

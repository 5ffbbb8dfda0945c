"""The model façade: purity of scores, save/load, determinism, the fast path's exactness."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

from cflowad import CFlowAD, Config, UserError
from cflowad.engine.model import FORMAT_VERSION
from cflowad.method import train
from cflowad.method.scoring import CFlowNet
from cflowad.method.train import training_step_loss

RNG = np.random.default_rng(0)
IMAGES = [RNG.random((70 + 3 * i, 50 + 5 * i, 3), dtype=np.float32) for i in range(10)]


@pytest.fixture(scope="module")
def small_model() -> CFlowAD:
    return CFlowAD(
        compile_training=False, encoder_weights="random", image_size=64, steps=30, min_holdout=3
    ).fit(IMAGES)


def test_map_of_an_image_alone_equals_its_map_in_any_batch(small_model):
    alone = small_model.predict(IMAGES[2:3], batch_size=1)
    for companions in (IMAGES[:5], IMAGES[2:3] + [np.zeros((64, 64, 3), np.float32)] * 7):
        batch = small_model.predict(companions, batch_size=8)
        index = next(i for i, x in enumerate(companions) if x is IMAGES[2])
        scale = np.abs(alone.maps[0]).max()
        assert np.abs(batch.maps[index] - alone.maps[0]).max() <= 1e-5 * scale
        assert batch.scores[index] == pytest.approx(alone.scores[0], rel=1e-5)


def test_maps_come_back_at_original_resolution(small_model):
    prediction = small_model.predict(IMAGES[:3])
    assert [m.shape for m in prediction.maps] == [x.shape[:2] for x in IMAGES[:3]]
    assert all(m.dtype == np.float32 for m in prediction.maps)
    assert np.array_equal(prediction.anomalous, prediction.scores > 0.5)
    assert np.array_equal(prediction.masks[1], prediction.maps[1] > 0.5)


def test_save_load_gives_identical_predictions(small_model, tmp_path):
    before = small_model.predict(IMAGES[:4])
    small_model.save(tmp_path / "model")
    after = CFlowAD.load(tmp_path / "model").predict(IMAGES[:4])
    assert np.array_equal(before.scores, after.scores)
    assert all(np.array_equal(a, b) for a, b in zip(before.maps, after.maps, strict=True))
    meta = json.loads((tmp_path / "model" / "model.json").read_text())
    assert meta["format_version"] == FORMAT_VERSION and meta["calibration"]["n_images"] == 3


@pytest.mark.slow  # trains
def test_same_seed_same_model_and_scores():
    a, b = (
        CFlowAD(
            compile_training=False,
            encoder_weights="random",
            image_size=64,
            steps=15,
            min_holdout=3,
            seed=5,
        ).fit(IMAGES)
        for _ in range(2)
    )
    for (name, x), y in zip(a.net.state_dict().items(), b.net.state_dict().values(), strict=True):
        assert torch.equal(x, y), name
    assert np.array_equal(a.predict(IMAGES[:3]).scores, b.predict(IMAGES[:3]).scores)


def test_fast_path_equals_plain_per_position_evaluation(small_model):
    """Precomputed conditions, all positions at once == one flow call per position."""
    net = small_model.net
    images = torch.rand(2, 3, *net.image_size)
    with torch.no_grad():
        fast = net.log_likelihoods(images)
        features = net.features(images)
        for k, (f, flow) in enumerate(zip(features, net.decoders, strict=True)):
            dim, height, width = f.shape[1:]
            code = net.codes(k).view(height, width, -1)
            for b in range(2):
                for y in range(height):
                    for x in range(width):
                        reference = flow.log_prob(f[b, :, y, x][None], code[y, x][None]) / dim
                        assert fast[k][b, y, x].item() == pytest.approx(reference.item(), rel=1e-5)


def test_network_exports_whole_with_a_dynamic_batch(small_model):
    """The predict path has no data-dependent Python control flow: torch.export traces it."""
    net = small_model.net
    batch = torch.export.Dim("batch", min=1, max=64)
    exported = torch.export.export(
        net, (torch.rand(2, 3, *net.image_size),), dynamic_shapes=({0: batch},)
    )
    images = torch.rand(3, 3, *net.image_size)
    with torch.inference_mode():
        for eager, traced in zip(net(images), exported.module()(images), strict=True):
            torch.testing.assert_close(traced, eager, rtol=1e-5, atol=1e-5)


def test_holdout_never_trains_and_is_seeded():
    model = CFlowAD(
        compile_training=False,
        encoder_weights="random",
        image_size=64,
        steps=1,
        min_holdout=3,
        seed=1,
    )
    fitted, held = model.split_holdout(list(range(10)))
    assert len(held) == 3 and not set(fitted) & set(held)
    assert model.split_holdout(list(range(10))) == (fitted, held)
    with pytest.raises(UserError, match=r"need at least 5 training images"):
        model.split_holdout(list(range(4)))


def test_broken_model_files_give_errors_naming_the_file(small_model, tmp_path):
    path = small_model.save(tmp_path / "m")
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(UserError, match=r"model.safetensors"):
        CFlowAD.load(path)
    (path / "model.json").write_text("{not json")
    with pytest.raises(UserError, match=r"model.json: not valid JSON"):
        CFlowAD.load(path)
    (path / "model.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(UserError, match=r"not a cflowad model"):
        CFlowAD.load(path)
    with pytest.raises(UserError, match=r"not found"):
        CFlowAD.load(tmp_path / "nothing")


def test_save_never_replaces_a_folder_that_is_not_a_model(small_model, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "keep.jpg").write_bytes(b"mine")
    with pytest.raises(UserError, match=r"not written by cflowad"):
        small_model.save(folder)
    assert (folder / "keep.jpg").read_bytes() == b"mine"


def test_config_errors_name_the_option():
    with pytest.raises(UserError, match=r"image_size"):
        Config(image_size=100)
    with pytest.raises(UserError, match=r"objective"):
        Config(objective="mse")
    with pytest.raises(UserError, match=r"strides"):
        Config(strides=(8, 8, 16))
    with pytest.raises(UserError, match=r"finest_batch_factor"):
        Config(finest_batch_factor=0)
    assert Config(image_size="384x256").image_size == (256, 384)
    assert Config(strides=(32, 8, 16)).strides == (8, 16, 32)


def test_predict_before_fit_is_an_error():
    with pytest.raises(UserError, match=r"not fitted"):
        CFlowAD(compile_training=False, encoder_weights="random", image_size=64).predict(IMAGES[:1])


@pytest.mark.slow
def test_end_to_end_on_real_textures_finds_pasted_defects(trained_model, texture_dataset):
    from sklearn.metrics import roc_auc_score

    from cflowad.data.datasets import find_test_set, load_mask

    test = find_test_set(texture_dataset)
    prediction = trained_model.predict(test.images)
    assert roc_auc_score(test.labels, prediction.scores) >= 0.9
    masks = [
        np.zeros(m.shape, bool) if p is None else load_mask(p)
        for m, p in zip(prediction.maps, test.masks, strict=True)
    ]
    pixel = roc_auc_score(
        np.concatenate([m.ravel() for m in masks]),
        np.concatenate([m.ravel() for m in prediction.maps]),
    )
    assert pixel >= 0.9


@pytest.mark.slow  # trains
def test_auto_aspect_keeps_the_training_images_shape():
    assert Config(image_size=256).resolve_size(1.5).image_size == (256, 384)
    assert Config(image_size=256).resolve_size(0.5).image_size == (512, 256)
    assert Config(image_size=256).resolve_size(1.05).image_size == (256, 256)
    assert Config(image_size=256, aspect="fixed").resolve_size(2.0).image_size == (256, 256)
    assert Config(image_size="320x256").resolve_size(0.5).image_size == (256, 320)
    wide = [RNG.random((40, 100, 3), dtype=np.float32) for _ in range(6)]
    model = CFlowAD(
        compile_training=False, encoder_weights="random", image_size=64, steps=2, min_holdout=2
    ).fit(wide)
    assert model.config.image_size == (64, 160)
    assert model.predict(wide[:1]).maps[0].shape == (40, 100)


def test_feature_cache_over_budget_is_memory_mapped_with_equal_content(small_model):
    from cflowad.method.train import encode

    in_memory = encode(small_model.net, IMAGES[:3], budget_mb=4096)
    on_disk = encode(small_model.net, IMAGES[:3], budget_mb=0)
    assert on_disk.on_disk and not in_memory.on_disk
    assert isinstance(on_disk.scales[0], np.memmap)
    for a, b in zip(in_memory.scales, on_disk.scales, strict=True):
        assert np.array_equal(a, b)


@pytest.mark.slow  # trains
def test_training_precision_is_applied_and_recorded():
    losses = {}
    for precision in ("float32", "bfloat16"):
        model = CFlowAD(
            encoder_weights="random",
            image_size=64,
            steps=20,
            min_holdout=3,
            training_precision=precision,
            compile_training=False,
        ).fit(IMAGES)
        assert model.training["precision"] == precision
        losses[precision] = model.training["final_loss"]
    assert losses["float32"] != losses["bfloat16"]
    assert losses["bfloat16"] == pytest.approx(losses["float32"], rel=0.02)
    with pytest.raises(UserError, match="training_precision"):
        Config(training_precision="float16")


@pytest.mark.parametrize(
    ("float32_ms", "bfloat16_ms", "chosen"),
    [(2.0, 1.0, "bfloat16"), (1.0, 1.8, "float32"), (1.1, 1.0, "float32")],
)
def test_auto_precision_follows_the_measured_speed(monkeypatch, float32_ms, bfloat16_ms, chosen):
    # Two hosts with the same AVX512-BF16 flag measured bfloat16 2x faster and 1.8x
    # slower than float32: "auto" follows the probe, and a small edge keeps float32.
    seconds = {torch.float32: float32_ms / 1e3, torch.bfloat16: bfloat16_ms / 1e3}
    monkeypatch.setattr(train, "matmul_seconds", seconds.__getitem__)
    train.bfloat16_is_faster.cache_clear()
    try:
        assert train.resolve_precision("auto") == chosen
        assert train.resolve_precision("float32") == "float32"
        assert train.resolve_precision("bfloat16") == "bfloat16"
    finally:
        train.bfloat16_is_faster.cache_clear()


def test_matmul_probe_times_the_product():
    from cflowad.method.train import matmul_seconds

    a, b = torch.randn(512, 288), torch.randn(288, 640)
    start = time.perf_counter()
    for _ in range(20):
        a @ b
    direct = (time.perf_counter() - start) / 20
    # Same product, same order of magnitude (not a speed target: a broken probe that
    # times nothing, or loops far more than it says, is off by 10x or more).
    assert direct / 10 < matmul_seconds(torch.float32) < direct * 10


@pytest.mark.slow  # trains
def test_training_falls_back_to_eager_when_compiling_fails(monkeypatch):
    def broken_compile(function, **options):
        def fail(*args, **kwargs):
            raise RuntimeError("no C++ compiler")

        return fail

    monkeypatch.setattr(torch, "compile", broken_compile)
    model = CFlowAD(encoder_weights="random", image_size=64, steps=5, min_holdout=3)
    model.fit(IMAGES)
    assert model.training["compiled"] is False
    eager = CFlowAD(
        encoder_weights="random", image_size=64, steps=5, min_holdout=3, compile_training=False
    ).fit(IMAGES)
    assert model.training["final_loss"] == eager.training["final_loss"]


@pytest.mark.slow  # compiles a training step
def test_compiled_training_step_matches_float32_loss_and_gradients():
    """The fused bfloat16 step (the default) against the plain float32 step."""
    net = CFlowNet.build(Config(encoder_weights="random"), pretrained=False)
    generator = torch.Generator().manual_seed(0)
    zs = [
        2 * torch.randn(n, 256, d, generator=generator)
        for n, d in zip((2, 1, 1), net.encoder.channels, strict=True)
    ]
    cs = [
        net.codes(k)[torch.randint(len(net.codes(k)), z.shape[:2], generator=generator)]
        for k, z in enumerate(zs)
    ]
    params = list(net.decoders.parameters())

    def loss_and_gradient(step_loss, precision):
        total = step_loss(net.decoders, zs, cs, "nll", precision)
        return total, torch.cat([g.flatten() for g in torch.autograd.grad(total, params)])

    exact, exact_grad = loss_and_gradient(training_step_loss, "float32")
    fused, fused_grad = loss_and_gradient(
        torch.compile(training_step_loss, dynamic=False), "bfloat16"
    )
    assert fused.item() == pytest.approx(exact.item(), rel=5e-3)
    assert torch.nn.functional.cosine_similarity(fused_grad, exact_grad, dim=0) > 0.999


@pytest.mark.parametrize(
    ("strides", "drawn"), [((8, 16, 32), [24, 8, 8]), ((32, 16), [24, 8]), ((16,), [8])]
)
@pytest.mark.slow  # trains
def test_finest_of_several_scales_draws_its_factor_of_fiber_batches(monkeypatch, strides, drawn):
    shapes: list[list[int]] = []

    def recording_loss(decoders, zs, cs, objective, precision):
        shapes.append([z.shape[0] * z.shape[1] for z in zs])
        assert [c.shape[:2] for c in cs] == [z.shape[:2] for z in zs]
        return training_step_loss(decoders, zs, cs, objective, precision)

    monkeypatch.setattr(train, "training_step_loss", recording_loss)
    CFlowAD(
        compile_training=False,
        encoder_weights="random",
        image_size=64,
        strides=strides,
        steps=2,
        fiber_batch_size=8,
        finest_batch_factor=3,
        min_holdout=3,
    ).fit(IMAGES[:6])
    assert shapes == [drawn, drawn]


def test_models_saved_before_the_batch_factor_load_as_trained_on_equal_batches(
    small_model, tmp_path
):
    small_model.save(tmp_path / "model")
    assert CFlowAD.load(tmp_path / "model").config.finest_batch_factor == 4
    meta_path = tmp_path / "model" / "model.json"
    meta = json.loads(meta_path.read_text())
    del meta["config"]["finest_batch_factor"]
    meta_path.write_text(json.dumps(meta))
    assert CFlowAD.load(tmp_path / "model").config.finest_batch_factor == 1


def test_a_scale_with_several_fiber_batches_has_the_loss_of_all_its_vectors_at_once():
    """Separate products per batch change the summation order, not the objective."""
    net = CFlowNet.build(Config(encoder_weights="random"), pretrained=False)
    generator = torch.Generator().manual_seed(0)
    zs = [torch.randn(4, 64, d, generator=generator) for d in net.encoder.channels]
    cs = [
        net.codes(k)[torch.randint(len(net.codes(k)), (4, 64), generator=generator)]
        for k in range(3)
    ]
    flows = list(net.decoders)
    whole = sum(
        train.flow_loss(flow, z.flatten(0, 1), c.flatten(0, 1))
        for flow, z, c in zip(flows, zs, cs, strict=True)
    )
    chunked = training_step_loss(net.decoders, zs, cs, "nll", "float32")
    assert chunked.item() == pytest.approx(float(whole), rel=1e-5)


@pytest.mark.slow  # trains
def test_scale_weights_are_saved_loaded_and_exported(tmp_path):
    """The weighted fusion is part of the model: model.json records it, a loaded model
    and its ONNX file give the same maps, and thresholds are calibrated on it."""
    pytest.importorskip("onnxruntime")
    from cflowad.engine.onnx import OnnxModel

    options = dict(compile_training=False, encoder_weights="random", image_size=64, steps=20)
    weighted = CFlowAD(**options, min_holdout=3, scale_weights=(4, 1, 1)).fit(IMAGES[:6])
    equal = CFlowAD(**options, min_holdout=3).fit(IMAGES[:6])
    weighted.save(tmp_path / "model")
    meta = json.loads((tmp_path / "model" / "model.json").read_text())
    assert meta["config"]["scale_weights"] == [4.0, 1.0, 1.0]
    loaded = CFlowAD.load(tmp_path / "model")
    assert loaded.config.scale_weights == (4.0, 1.0, 1.0)
    before, after = weighted.predict(IMAGES[6:]), loaded.predict(IMAGES[6:])
    assert all(np.array_equal(a, b) for a, b in zip(before.maps, after.maps, strict=True))
    assert weighted.calibration.pixel_threshold_raw != equal.calibration.pixel_threshold_raw
    weighted.export_onnx(tmp_path / "model.onnx")
    onnx = OnnxModel(tmp_path / "model.onnx").predict(IMAGES[6:])
    for a, b in zip(before.maps, onnx.maps, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


@pytest.mark.slow  # trains
def test_coupling_blocks_per_scale_build_saved_and_loaded_flows(tmp_path):
    """--coupling-blocks 2,1,1: the finest scale's flow gets 2 blocks, the others 1;
    model.json records it, and a reload scores the same."""
    options = dict(compile_training=False, encoder_weights="random", image_size=64, steps=10)
    model = CFlowAD(**options, min_holdout=3, coupling_blocks=(2, 1, 1)).fit(IMAGES[:6])
    assert [len(model.net.decoder(k).blocks) for k in range(3)] == [2, 1, 1]
    model.save(tmp_path / "model")
    meta = json.loads((tmp_path / "model" / "model.json").read_text())
    assert meta["config"]["coupling_blocks"] == [2, 1, 1]
    loaded = CFlowAD.load(tmp_path / "model")
    assert loaded.config.blocks_per_scale == (2, 1, 1)
    before, after = model.predict(IMAGES[6:]), loaded.predict(IMAGES[6:])
    assert all(np.array_equal(a, b) for a, b in zip(before.maps, after.maps, strict=True))
    assert Config(coupling_blocks=[4]).coupling_blocks == 4  # one number: every scale
    assert Config(coupling_blocks=4).blocks_per_scale == (4, 4, 4)
    with pytest.raises(UserError, match="coupling_blocks"):
        Config(coupling_blocks=(4, 6))  # three strides
    with pytest.raises(UserError, match="coupling_blocks"):
        Config(coupling_blocks=(4, 0, 8))

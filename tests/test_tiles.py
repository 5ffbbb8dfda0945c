"""Native-resolution tiles: layout, stitching, a defect on a cut, every runtime, memory."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage
from skimage import data as skdata

from cflowad import CFlowAD
from cflowad.cli import main
from cflowad.common.errors import UserError
from cflowad.method import scoring
from cflowad.method.config import Config
from cflowad.method.scoring import CFlowNet
from cflowad.method.tiles import spans

pytestmark = pytest.mark.slow  # tiled models trained on photos of up to 20 megapixels

FAST = ["--steps", "60", "--no-compile", "--quiet"]


@pytest.mark.parametrize("tile", [128, 160, 256, 512])
@pytest.mark.parametrize("overlap", [0.0, 0.1, 0.25, 0.5])
def test_the_tiles_own_every_pixel_once_away_from_their_edges(tile, overlap):
    for length in range(32, 2049, 96):
        size, parts = spans(length, tile, overlap, 32)
        assert size == min(tile, length)
        owned = np.zeros(length, int)
        for part in parts:
            assert part.start <= part.own_start < part.own_end <= part.start + size
            assert part.start % 32 == part.own_start % 32 == part.own_end % 32 == 0
            owned[part.own_start : part.own_end] += 1
        assert (owned == 1).all()
        assert parts[-1].start + size == length  # no tile hangs over the edge
        for left, right in itertools.pairwise(parts):
            shared = left.start + size - right.start
            assert shared >= overlap * tile  # at least the overlap asked for
            # the cut is half-way through the overlap, on the 32 grid
            margins = (left.start + size - left.own_end, right.own_start - right.start)
            assert abs(margins[0] - margins[1]) <= 32 and min(margins) >= 32 * (shared // 64)
            if overlap > 0:  # an overlap asked for is whole pairs of steps: real margins
                assert min(margins) >= 32


def test_a_tile_that_covers_the_image_is_the_untiled_model(texture_dataset):
    common = {"image_size": 128, "steps": 20, "compile_training": False, "device": "cpu"}
    whole = CFlowAD(**common).fit(texture_dataset)
    tiled = CFlowAD(**common, tile_size=256).fit(texture_dataset)
    assert tiled.net.tiles is not None and tiled.net.tiles.count == 1
    images = sorted(str(p) for p in (texture_dataset / "test").glob("*/*.png"))
    a, b = whole.predict(images), tiled.predict(images)
    np.testing.assert_array_equal(a.raw_scores, b.raw_scores)
    np.testing.assert_array_equal(np.stack(a.maps), np.stack(b.maps))


def test_stitched_features_are_each_tiles_own_features():
    """Brute force: every feature cell of the stitched map equals the cell of the one
    tile that owns it, computed by the encoder on that tile alone."""
    config = Config(encoder_weights="random", image_size=(256, 320), aspect="fixed", tile_size=128)
    net = CFlowNet.build(config, pretrained=False).eval()
    images = torch.rand(2, 3, 256, 320, generator=torch.Generator().manual_seed(0))
    layout = net.tiles
    assert layout is not None and layout.count == 3 * 4
    with torch.inference_mode():
        stitched = net.features(images)
        for row in layout.rows:
            for column in layout.columns:
                tile = images[:, :, row.start : row.start + 128, column.start : column.start + 128]
                alone = net.encoder(tile)
                for k, stride in enumerate(net.encoder.strides):
                    expected = alone[k][:, :, row.owned(stride), column.owned(stride)]
                    got = stitched[k][
                        :,
                        :,
                        row.own_start // stride : row.own_end // stride,
                        column.own_start // stride : column.own_end // stride,
                    ]
                    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_flows_without_kept_condition_terms_score_the_same(monkeypatch):
    """Inputs too large to keep every block's condition term compute them as they go."""
    config = Config(encoder_weights="random", image_size=(256, 320), aspect="fixed")
    net = CFlowNet.build(config, pretrained=False).eval()
    features = [
        torch.randn(2, d, h, w)
        for d, (h, w) in zip(net.encoder.channels, net.feature_sizes, strict=True)
    ]
    net.refresh_conditions()
    with torch.inference_mode():
        kept = [net.scale_log_likelihood(k, f) for k, f in enumerate(features)]
    monkeypatch.setattr(scoring, "CONDITION_BUDGET", 0)
    monkeypatch.setattr(scoring, "POSITION_CHUNK", 300)  # several chunks, one short
    net.refresh_conditions()
    assert all(getattr(net, f"conditions_{k}").numel() == 0 for k in range(3))
    with torch.inference_mode():
        computed = [net.scale_log_likelihood(k, f) for k, f in enumerate(features)]
    for a, b in zip(kept, computed, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def tiled_model(make_textures, tmp_path_factory):
    root = tmp_path_factory.mktemp("tiles")
    data = make_textures(root / "brick", n_train=24, n_good=4, n_bad=4, size=256)
    out = root / "model"
    command = [
        "train",
        str(data),
        "--out",
        str(out),
        "--image-size",
        "native",
        "--tile-size",
        "128",
    ]
    assert main([*command, *FAST]) == 0
    return data, out


def test_a_defect_on_a_cut_between_tiles_is_found(tiled_model):
    data, model_dir = tiled_model
    model = CFlowAD.load(model_dir, device="cpu")
    layout = model.net.tiles
    assert layout is not None and layout.count == 9
    cut = layout.columns[1].own_start  # 96: tiles 0 and 1 meet here
    assert cut == layout.rows[1].own_start == 96
    good = np.asarray(Image.open(sorted((data / "test" / "good").glob("*.png"))[0])).copy()
    defect = good.copy()
    mask = np.zeros(good.shape[:2], bool)
    mask[cut - 12 : cut + 12, cut - 12 : cut + 12] = True  # on the corner of four tiles
    defect[mask] = skdata.gravel()[100:124, 100:124].ravel()  # as the data set's defects
    prediction = model.predict([good, defect])
    heat = prediction.maps[1]
    assert ndimage.binary_dilation(mask, iterations=6)[np.unravel_index(heat.argmax(), heat.shape)]
    assert prediction.raw_scores[1] > prediction.raw_scores[0]
    assert prediction.anomalous[1]


def test_native_is_the_median_size_on_the_32_grid():
    sizes = [(427, 640)] * 3 + [(1000, 1500)] * 2
    assert Config(aspect="native").fit_to(sizes).image_size == (416, 640)
    assert Config(aspect="native").fit_to(sizes).aspect == "fixed"
    assert Config(aspect="native", strides=(8,)).fit_to([(40, 90)]).image_size == (40, 88)
    assert Config(aspect="native").fit_to([(20, 300)]).image_size == (32, 288)
    assert Config().fit_to(sizes).image_size == (256, 384)  # auto: the median aspect


def test_a_tiled_model_scores_the_same_in_every_runtime(tiled_model, tmp_path, monkeypatch, capfd):
    """Exports encode the tiles a group at a time (here 2 of the 9 tiles a step: 5
    steps, the last one padded): in a loop past UNROLLED_GROUPS steps (here 4), where
    the graph holds the encoder once however many tiles, unrolled below it (ONNX
    Runtime runs a loop's convolutions slower). Flows that compute their condition
    terms as they go (as at 20 megapixels; here forced, in chunks of 300 positions)
    keep them out of ONNX Runtime's folding."""
    import onnx

    from cflowad.engine.onnx import cpu_session

    data, model_dir = tiled_model
    meta = json.loads((model_dir / "model.json").read_text())
    assert meta["config"]["tile_size"] == 128 and meta["config"]["tile_overlap"] == 0.25
    assert meta["config"]["image_size"] == [256, 256]  # --image-size native
    monkeypatch.setattr(scoring, "TILE_GROUP_PIXELS", 2 * 128 * 128)
    monkeypatch.setattr(scoring, "CONDITION_BUDGET", 0)
    monkeypatch.setattr(scoring, "POSITION_CHUNK", 300)
    onnx_file, folder = tmp_path / "model.onnx", tmp_path / "openvino"
    unrolled = tmp_path / "unrolled.onnx"
    assert main(["export", str(model_dir), "--onnx", str(unrolled), "--quiet"]) == 0
    monkeypatch.setattr(scoring, "UNROLLED_GROUPS", 4)
    assert main(["export", str(model_dir), "--onnx", str(onnx_file), "--quiet"]) == 0
    assert main(["export", str(model_dir), "--openvino", str(folder), "--quiet"]) == 0

    def nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
        inner = [n for node in graph.node for a in node.attribute if a.g.node for n in nodes(a.g)]
        return [*graph.node, *inner]

    graph = nodes(onnx.load(str(onnx_file), load_external_data=False).graph)
    convolutions = sum(
        isinstance(m, torch.nn.Conv2d) for m in CFlowAD.load(model_dir).net.modules()
    )
    assert [n.op_type for n in graph].count("Scan") == 1
    assert [n.op_type for n in graph].count("Conv") == convolutions
    flat = nodes(onnx.load(str(unrolled), load_external_data=False).graph)
    assert [n.op_type for n in flat].count("Scan") == 0
    assert [n.op_type for n in flat].count("Conv") == 5 * convolutions
    session = cpu_session(onnx_file)
    unfolded = {i.name for i in session.get_overridable_initializers()}
    # the finest scale's codes (1,024 positions); coarser ones may be folded by the
    # exporter's own optimizer, which stops at a size limit
    assert "net.code_0" in unfolded <= {"net.code_0", "net.code_1", "net.code_2"}
    assert [i.name for i in session.get_inputs()] == ["images"]
    images = [str(p) for p in sorted((data / "test").glob("*/*.png"))]
    results = {}
    exports = [("onnx", onnx_file), ("unrolled", unrolled), ("openvino", folder)]
    for name, model in [("torch", model_dir), *exports]:
        out = tmp_path / f"out-{name}"
        assert main(["predict", str(model), *images, "--out", str(out), "-q"]) == 0
        records = json.loads((out / "predictions.json").read_text())
        results[name] = (
            np.array([r["score"] for r in records]),
            np.stack([np.load(out / r["map"]) for r in records]),
        )
    assert "appears in graph inputs" not in capfd.readouterr().err  # ONNX Runtime's warning
    for name, _ in exports:
        np.testing.assert_allclose(results[name][0], results["torch"][0], atol=1e-5)
        np.testing.assert_allclose(results[name][1], results["torch"][1], atol=1e-4)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--tile-size", "100"], "tile_size=100 must be a multiple of 32"),
        (["--tile-size", "64"], "at least 128"),
        (["--tile-size", "128", "--tile-overlap", "0.9"], "tile_overlap=0.9"),
    ],
)
def test_wrong_tiles_are_one_line_errors(texture_dataset, tmp_path, capsys, options, message):
    out = tmp_path / "model"
    assert main(["train", str(texture_dataset), "--out", str(out), *options, *FAST]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()
    with pytest.raises(UserError):
        Config(tile_size=96)


def test_a_20_megapixel_image_is_scored_in_bounded_memory(tmp_path):
    """A model at the native size of a 20-megapixel camera (5472 x 3648) scores one of
    its images with under 1.5 GB more than the loaded model: the encoder sees 512 x 512
    tiles, the flows compute their condition terms a chunk at a time (kept, they
    alone would take 4 GB), and batches hold one such image."""
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (3648, 5472, 3), dtype=np.uint8) for _ in range(3)]
    model = CFlowAD(
        encoder_weights="random",
        image_size=(3648, 5472),
        tile_size=512,
        steps=2,
        min_holdout=1,
        compile_training=False,
        device="cpu",
    ).fit(images)
    model.save(tmp_path / "model")
    Image.fromarray(images[0]).save(tmp_path / "image.png")
    del images, model
    script = textwrap.dedent(
        f"""
        import json, resource
        import cflowad

        def peak():
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

        model = cflowad.load({str(tmp_path / "model")!r})
        loaded = peak()
        prediction = model.predict({str(tmp_path / "image.png")!r})
        print(json.dumps({{"loaded": loaded, "scored": peak(),
                           "shape": list(prediction.maps[0].shape)}}))
        """
    )
    run = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=600
    )
    figures = json.loads(run.stdout.splitlines()[-1])
    assert figures["shape"] == [3648, 5472]
    assert figures["scored"] - figures["loaded"] < 1500, figures


def test_the_server_answers_a_tiled_model_as_predict_does(tiled_model, served_map):
    data, model_dir = tiled_model
    image = sorted((data / "test" / "patch").glob("*.png"))[0]
    expected = CFlowAD.load(model_dir, device="cpu").predict(str(image))
    score, served = served_map(model_dir, image)
    assert score == pytest.approx(float(expected.scores[0]), abs=1e-6)
    np.testing.assert_allclose(served, expected.maps[0], atol=1.5 / 65535)

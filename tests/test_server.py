"""cflowad serve on 127.0.0.1: parity with predict, bad input, auth, readiness, reloads, load."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import uvicorn
from PIL import Image
from safetensors.torch import load_file, save_file

import cflowad
import cflowad.line.served
from cflowad.cli import main
from cflowad.data.images import load_image, to_model_input
from cflowad.engine.inference import InferenceEngine
from cflowad.line.server import ServeSettings, create_app
from cflowad.results.pictures import blend

FAST = ["--image-size", "64", "--steps", "30", "--no-compile", "--quiet"]


@pytest.fixture(scope="module")
def models(texture_dataset, tmp_path_factory) -> Path:
    """A folder with a model directory and its ONNX export, as `cflowad serve` takes it."""
    root = tmp_path_factory.mktemp("served")
    assert main(["train", str(texture_dataset), "--out", str(root / "brick"), *FAST]) == 0
    assert main(["export", str(root / "brick"), "--onnx", str(root / "brick.onnx"), "-q"]) == 0
    return root


@pytest.fixture(scope="module")
def images(texture_dataset) -> list[Path]:
    return (
        sorted((texture_dataset / "test" / "patch").glob("*.png"))[:3]
        + sorted((texture_dataset / "test" / "good").glob("*.png"))[:3]
    )


@contextlib.contextmanager
def serving(app, ready: bool = True) -> Iterator[str]:
    """Run ``app`` in uvicorn on 127.0.0.1 (a free port) in a thread; yield its URL."""
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.02)
    url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    try:
        if ready:
            _wait_ready(url)
        yield url
    finally:
        server.should_exit = True
        thread.join(30)


def _wait_ready(url: str, headers: dict[str, str] | None = None) -> None:
    deadline = time.monotonic() + 120
    while (ready := httpx.get(f"{url}/readyz", headers=headers)).status_code != 200:
        assert time.monotonic() < deadline, f"models did not become ready: {ready.text}"
        time.sleep(0.1)


def _post(url: str, model: str, data: bytes, **kwargs) -> httpx.Response:
    headers = {"content-type": "image/png", **kwargs.pop("headers", {})}
    return httpx.post(f"{url}/v1/models/{model}/predict", content=data, headers=headers, **kwargs)


@pytest.mark.parametrize("workers", [1, 2])
def test_scores_match_predict_for_the_model_and_its_onnx_file(models, images, workers):
    expected = {
        name: cflowad.load(models / name).predict(images, batch_size=1)
        for name in ("brick", "brick.onnx")
    }
    with serving(create_app(models, ServeSettings(max_wait_ms=50, workers=workers))) as url:
        listed = httpx.get(f"{url}/v1/models").json()["models"]
        assert {m["name"]: m["format"] for m in listed} == {
            "brick": "model directory",
            "brick.onnx": "onnx",
        }
        for m in listed:
            assert m["input_size"] == {"height": 64, "width": 64}
            assert m["image_threshold"] == 0.5 and len(m["weights_sha256"]) == 64
            assert m["training"]["n_train"] > 0
        for name, prediction in expected.items():
            # raw bodies sent concurrently (batched together) and one multipart upload
            with httpx.Client() as client, threading_pool(len(images)) as pool:
                answers = list(
                    pool.map(lambda f, n=name: _post(url, n, f.read_bytes()).json(), images)
                )
                form = client.post(
                    f"{url}/v1/models/{name}/predict",
                    files={"image": (images[0].name, images[0].read_bytes(), "image/png")},
                ).json()
            assert form["score"] == answers[0]["score"]
            for answer, score, flag in zip(
                answers, prediction.scores, prediction.anomalous, strict=True
            ):
                assert answer["model"] == name
                np.testing.assert_allclose(answer["score"], score, rtol=1e-5, atol=1e-6)
                assert answer["anomalous"] == bool(flag)
                assert answer["image_threshold"] == 0.5 and answer["latency_ms"] > 0
        metrics = httpx.get(f"{url}/metrics").text
        assert 'cflowad_requests_total{model="brick",status="200"} 7.0' in metrics
        assert "cflowad_batch_size_bucket" in metrics and "cflowad_score_bucket" in metrics


def threading_pool(n: int):
    from concurrent.futures import ThreadPoolExecutor

    return ThreadPoolExecutor(max_workers=n)


def test_outputs_are_pngs_at_the_image_size(models, texture_dataset):
    image = sorted((texture_dataset / "test" / "patch").glob("*.png"))[0]
    big = Image.open(image).resize((96, 80))  # not the model's 64 x 64
    buffer = io.BytesIO()
    big.save(buffer, format="PNG")
    expected = cflowad.load(models / "brick").predict(np.asarray(big))
    with serving(create_app(models / "brick")) as url:
        answer = _post(url, "brick", buffer.getvalue(), params={"outputs": "map,mask,overlay"})
        answer = answer.json()
    pictures = {
        k: np.asarray(Image.open(io.BytesIO(base64.b64decode(answer[k]))))
        for k in ("map", "mask", "overlay")
    }
    assert pictures["map"].shape == pictures["mask"].shape == (80, 96)
    assert pictures["overlay"].shape == (80, 96, 3)
    np.testing.assert_allclose(pictures["map"] / 65535, expected.maps[0], atol=1.5 / 65535)
    np.testing.assert_array_equal(pictures["mask"] == 255, expected.masks[0])
    # the upload stays uint8 in the server; its overlay is the float image's
    rgb = np.asarray(big.convert("RGB")) / np.float32(255)
    overlay = blend(rgb, expected.maps[0], expected.masks[0])
    assert np.abs(pictures["overlay"].astype(int) - overlay).max() <= 1
    assert (answer["width"], answer["height"]) == (96, 80)


def test_bad_input_is_a_json_error_and_the_server_goes_on(models, images, tmp_path):
    good = images[0].read_bytes()
    png = io.BytesIO()
    Image.fromarray(np.zeros((300, 300, 3), np.uint8) + 7).save(png, format="BMP")
    with serving(create_app(models / "brick", ServeSettings(max_image_mb=0.1))) as url:
        cases = [
            (_post(url, "brick", b""), 400, "empty"),
            (_post(url, "brick", b"not an image at all"), 400, "not an image"),
            (_post(url, "brick", good[: len(good) // 2]), 400, "unreadable image"),
            (_post(url, "brick", png.getvalue()), 413, "--max-image-mb"),
            (  # no Content-Length: the limit holds while reading
                httpx.post(
                    f"{url}/v1/models/brick/predict",
                    content=iter([png.getvalue()[:50_000], png.getvalue()[50_000:]]),
                    headers={"content-type": "image/bmp"},
                ),
                413,
                "--max-image-mb",
            ),
            (_post(url, "nope", good), 404, "unknown model 'nope'"),
            (_post(url, "../brick", good), 404, "Not Found"),
            (
                _post(url, "brick", good, headers={"content-type": "application/json"}),
                415,
                "content type",
            ),
            (_post(url, "brick", good, params={"outputs": "map,heat"}), 400, "heat"),
            (
                httpx.post(f"{url}/v1/models/brick/predict", files={"other": ("a.png", good)}),
                400,
                "'image'",
            ),
        ]
        for response, status, words in cases:
            assert response.status_code == status, (status, response.text)
            body = response.json()
            assert set(body) == {"error"} and words in body["error"], body
            assert "Traceback" not in response.text
        assert _post(url, "brick", good).status_code == 200
        metrics = httpx.get(f"{url}/metrics").text
        assert 'cflowad_requests_total{model="brick",status="400"}' in metrics
        assert 'cflowad_requests_total{model="(unknown)",status="404"}' in metrics


def test_api_key_guards_everything_but_healthz(models, images):
    good = images[0].read_bytes()
    settings = ServeSettings(api_key="s3cret-key")
    with serving(create_app(models / "brick", settings), ready=False) as url:
        auth = {"authorization": "Bearer s3cret-key"}
        _wait_ready(url, auth)
        assert httpx.get(f"{url}/healthz").status_code == 200
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "s3cret-key"}):
            for response in (
                httpx.get(f"{url}/readyz", headers=headers),
                httpx.get(f"{url}/v1/models", headers=headers),
                httpx.get(f"{url}/metrics", headers=headers),
                httpx.get(f"{url}/docs", headers=headers),
                _post(url, "brick", good, headers=headers),
            ):
                assert response.status_code == 401 and "API key" in response.json()["error"]
        assert _post(url, "brick", good, headers=auth).status_code == 200
        assert httpx.get(f"{url}/openapi.json", headers=auth).status_code == 200


class _MeanEngine(InferenceEngine):
    """A stand-in model with a closed form: score = mean of the resized image; slow on purpose."""

    image_size = (32, 32)

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.batches: list[int] = []

    def score_batch(self, images: torch.Tensor):
        time.sleep(self.delay)
        self.batches.append(len(images))
        scores = images.mean(dim=(1, 2, 3))
        return scores, images.mean(dim=1), scores

    def describe(self):
        return {"backbone": "mean of pixels"}


def _fake_models(tmp_path: Path, names=("a",)) -> Path:
    for name in names:
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.json").write_text("{}")
    return tmp_path


def test_not_ready_until_every_model_is_loaded_and_warmed(tmp_path, monkeypatch, images):
    gate = threading.Event()
    engine = _MeanEngine()

    def slow_load(path, device):
        assert gate.wait(60)
        return engine

    monkeypatch.setattr(cflowad.line.served, "load", slow_load)
    with serving(create_app(_fake_models(tmp_path)), ready=False) as url:
        assert httpx.get(f"{url}/healthz").json() == {"status": "alive"}
        ready = httpx.get(f"{url}/readyz")
        assert ready.status_code == 503 and "0 of 1" in ready.json()["error"]
        assert _post(url, "a", images[0].read_bytes()).status_code == 503
        assert engine.batches == []
        gate.set()
        _wait_ready(url)
        assert engine.batches == [1]  # the warm-up image, before the first request
        answer = _post(url, "a", images[0].read_bytes()).json()
    expected = to_model_input(load_image(images[0]), (32, 32)).mean().item()
    assert answer["score"] == pytest.approx(expected, rel=1e-5)


def test_a_client_that_disconnects_frees_its_place(tmp_path, monkeypatch, images):
    engine = _MeanEngine(delay=0.6)
    monkeypatch.setattr(cflowad.line.served, "load", lambda path, device: engine)
    body = images[0].read_bytes()
    with serving(create_app(_fake_models(tmp_path), ServeSettings(max_batch=1))) as url:
        with threading_pool(2) as pool:
            first = pool.submit(_post, url, "a", body)
            time.sleep(0.2)  # the first is being scored; the next ones queue
            port = int(url.rsplit(":", 1)[1])
            with socket.create_connection(("127.0.0.1", port)) as gone:
                gone.sendall(
                    b"POST /v1/models/a/predict HTTP/1.1\r\nhost: x\r\ncontent-type: image/png"
                    + f"\r\ncontent-length: {len(body)}\r\n\r\n".encode()
                    + body
                )
                time.sleep(0.1)
            third = pool.submit(_post, url, "a", body)
            assert first.result().status_code == 200 and third.result().status_code == 200
        assert engine.batches == [1, 1, 1]  # warm-up, first, third: the one that left is not scored
        assert 'status="499"} 1.0' in httpx.get(f"{url}/metrics").text


def test_reload_under_load_fails_no_request(models, images, tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    model = served / "brick"
    model.mkdir()
    for file in (models / "brick").iterdir():
        (model / file.name).write_bytes(file.read_bytes())
    body = images[3].read_bytes()  # a good image: its score moves with the threshold
    statuses: list[int] = []
    revisions: set[int] = set()
    stop = threading.Event()

    def client() -> None:
        with httpx.Client() as http:
            deadline = time.monotonic() + 60
            while not stop.is_set() and time.monotonic() < deadline:
                response = http.post(
                    f"{url}/v1/models/brick/predict",
                    content=body,
                    headers={"content-type": "image/png"},
                )
                statuses.append(response.status_code)
                if response.status_code == 200:
                    revisions.add(response.json()["revision"])

    # only the reloads asked for here: not the ones that follow changed files
    with serving(create_app(served, ServeSettings(follow_seconds=0))) as url:
        before = _post(url, "brick", body).json()
        _lower_image_threshold(model, before["raw_score"] / 2)  # a "retrained" model
        with threading_pool(4) as pool:
            clients = [pool.submit(client) for _ in range(4)]
            time.sleep(1.0)
            reloaded = httpx.post(f"{url}/v1/models/brick/reload", timeout=60)
            time.sleep(1.0)
            # a broken model on disk is refused; the one loaded keeps serving
            (model / "model.safetensors").write_bytes(b"broken")
            refused = httpx.post(f"{url}/v1/models/brick/reload", timeout=60)
            time.sleep(0.5)
            stop.set()
            for c in clients:
                c.result()
        after = _post(url, "brick", body).json()
    assert reloaded.status_code == 200 and reloaded.json()["revision"] == 2
    assert refused.status_code == 422
    assert "checksum mismatch" in refused.json()["error"]
    assert statuses and set(statuses) == {200}, set(statuses)
    assert revisions == {1, 2}
    assert after["revision"] == 2 and after["anomalous"] and not before["anomalous"]
    assert after["raw_score"] == pytest.approx(before["raw_score"], rel=1e-6)


def _lower_image_threshold(model: Path, value: float) -> None:
    """Rewrite a model directory as a new model whose image threshold is ``value``."""
    weights = model / "model.safetensors"
    state = load_file(str(weights))
    state["image_threshold"].fill_(value)
    save_file(state, str(weights), metadata={"format": "cflowad-model"})
    meta = json.loads((model / "model.json").read_text())
    meta["calibration"]["image_threshold_raw"] = value
    meta["weights_sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()
    (model / "model.json").write_text(json.dumps(meta))


def test_loadtest_smoke(models, images, tmp_path, capsys):
    out = tmp_path / "load.json"
    with serving(create_app(models / "brick.onnx")) as url:
        code = main(
            [
                "loadtest", url, *map(str, images[:2]), "--model", "brick.onnx",
                "--concurrency", "1,4", "--duration", "2.5", "--json", str(out), "-q",
            ]
        )  # fmt: skip
        assert code == 0
        assert main(["loadtest", url, str(images[0]), "--model", "nope", "--duration", "1"]) == 2
    assert "HTTP 404" in capsys.readouterr().err
    levels = json.loads(out.read_text())["levels"]
    assert [level["concurrency"] for level in levels] == [1, 4]
    for level in levels:
        assert level["ok"] > 0 and level["errors"] == {} and level["requests"] == level["ok"]
        assert 0 < level["p50_ms"] <= level["p95_ms"] <= level["p99_ms"]
        # the server's own clock starts after the client's and stops before it
        assert 0 < level["server_p50_ms"] < level["p50_ms"]
        assert level["server_p50_ms"] <= level["server_p99_ms"]


def test_loadtest_without_the_servers_latency_reports_none(images, tmp_path):
    """A proxy that rewrites the answers hides latency_ms: the client's figures stay."""
    from fastapi import FastAPI

    from cflowad.line.loadtest import run_loadtest

    bare = FastAPI()

    @bare.post("/v1/models/m/predict")
    async def predict() -> dict[str, float]:
        return {"score": 0.1}

    with serving(bare, ready=False) as url:
        (level,) = run_loadtest(url, "m", images[:1], [2], duration=0.5, max_requests=20)
    assert level["ok"] == level["requests"] > 0 and level["p50_ms"] > 0
    assert level["server_p50_ms"] is None and level["server_p99_ms"] is None


def test_the_command_serves_reloads_on_sighup_and_stops(models, images, tmp_path):
    key = tmp_path / "key"
    key.write_text("k3y\n")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "cflowad", "serve", str(models / "brick.onnx")]
    process = subprocess.Popen(
        [*command, "--port", str(port), "--api-key-file", str(key), "--threads", "1"],
        stderr=subprocess.PIPE,
        text=True,
    )
    url, auth = f"http://127.0.0.1:{port}", {"authorization": "Bearer k3y"}
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None and time.monotonic() < deadline
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/readyz", headers=auth).status_code == 200:
                    break
            time.sleep(0.2)
        process.send_signal(signal.SIGHUP)
        while httpx.get(f"{url}/v1/models/brick.onnx", headers=auth).json()["revision"] != 2:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert _post(url, "brick.onnx", images[0].read_bytes(), headers=auth).status_code == 200
    finally:
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    assert "Traceback" not in err
    # a port in use is one line and exit 2
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = str(taken.getsockname()[1])
        result = subprocess.run(
            [*command, "--port", busy], capture_output=True, text=True, timeout=120,
            env={**os.environ},
        )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("cflowad: error: options --host")


def test_serve_follows_model_files(models, texture_dataset, tmp_path):
    """A model replaced on disk is served without a restart; one copied in is added."""
    folder = tmp_path / "models"
    shutil.copytree(models / "brick", folder / "brick")
    image = sorted((texture_dataset / "test" / "good").iterdir())[0].read_bytes()
    with serving(create_app(folder, ServeSettings(follow_seconds=0.2))) as url:
        before = httpx.post(f"{url}/v1/models/brick/predict", content=image).json()
        model = cflowad.CFlowAD.load(models / "brick", device="cpu")
        model.set_image_threshold(before["raw_score"] / 2)
        staging = tmp_path / "staging"
        model.save(staging)
        os.rename(folder / "brick", tmp_path / "old")
        os.rename(staging, folder / "brick")
        shutil.copytree(models / "brick", folder / "copy")
        deadline = time.monotonic() + 30
        after = before
        while time.monotonic() < deadline and after["revision"] == before["revision"]:
            time.sleep(0.2)
            after = httpx.post(f"{url}/v1/models/brick/predict", content=image).json()
        while time.monotonic() < deadline and httpx.get(f"{url}/v1/models/copy").status_code != 200:
            time.sleep(0.2)
        listed = {m["name"] for m in httpx.get(f"{url}/v1/models").json()["models"]}
    assert after["revision"] == before["revision"] + 1
    assert after["anomalous"] and not before["anomalous"]
    assert listed == {"brick", "copy"}


def test_open_inference_protocol_with_tritonclient(models, images):
    """Triton's own client against /v2: metadata, and both input kinds, JSON and binary;
    the scores equal /v1's."""
    import tritonclient.http as triton

    with serving(create_app(models / "brick")) as url:
        client = triton.InferenceServerClient(url.removeprefix("http://"))
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("brick")
        metadata = client.get_model_metadata("brick")
        assert [o["name"] for o in metadata["outputs"]] == [
            "score",
            "anomalous",
            "raw_score",
            "map",
        ]
        assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
        expected = [_post(url, "brick", image.read_bytes()).json() for image in images]

        files = np.array([image.read_bytes() for image in images], dtype=np.object_)
        encoded = triton.InferInput("image", [len(images)], "BYTES")
        encoded.set_data_from_numpy(files, binary_data=True)
        outputs = [
            triton.InferRequestedOutput(name, binary_data=binary)
            for name, binary in (("score", True), ("anomalous", False), ("raw_score", True))
        ]
        answer = client.infer("brick", [encoded], outputs=outputs)
        assert answer.as_numpy("score") == pytest.approx([e["score"] for e in expected], abs=1e-6)
        assert answer.as_numpy("raw_score") == pytest.approx(
            [e["raw_score"] for e in expected], rel=1e-6
        )
        assert answer.as_numpy("anomalous").tolist() == [e["anomalous"] for e in expected]

        pixels = np.stack([np.asarray(Image.open(image).convert("RGB")) for image in images])
        for binary in (True, False):
            raw = triton.InferInput("image", list(pixels.shape), "UINT8")
            raw.set_data_from_numpy(pixels, binary_data=binary)
            wanted = [triton.InferRequestedOutput(n, binary_data=binary) for n in ("score", "map")]
            answer = client.infer("brick", [raw], outputs=wanted)
            assert answer.as_numpy("score") == pytest.approx(
                [e["score"] for e in expected], abs=1e-6
            )
            maps = answer.as_numpy("map")
            assert maps.shape == (len(images), *pixels.shape[1:3])
            first = cflowad.load(models / "brick").predict([pixels[0]]).maps[0]
            assert np.abs(maps[0] - first).max() < 1e-5

        with pytest.raises(triton.InferenceServerException, match="BYTES"):
            bad = triton.InferInput("image", [1], "FP32")
            bad.set_data_from_numpy(np.zeros(1, np.float32))
            client.infer("brick", [bad])
        with pytest.raises(triton.InferenceServerException, match="unknown model"):
            client.get_model_metadata("nope")
        broken = triton.InferInput("image", [1], "BYTES")
        broken.set_data_from_numpy(np.array([b"not an image"], dtype=np.object_))
        with pytest.raises(triton.InferenceServerException, match="image 0"):
            client.infer("brick", [broken])
        client.close()


def test_drift_gauges_after_a_window_of_requests(models, images):
    from cflowad.line.drift import DriftSettings

    settings = ServeSettings(drift=DriftSettings(window=10))
    with serving(create_app(models / "brick", settings)) as url:
        assert httpx.get(f"{url}/v1/models/brick").json()["drift"] == {
            "quantile": None,
            "tripped": False,
        }
        for k in range(10):
            assert _post(url, "brick", images[k % len(images)].read_bytes()).status_code == 200
        drift = httpx.get(f"{url}/v1/models/brick").json()["drift"]
        metrics = httpx.get(f"{url}/metrics").text
    assert 0 <= drift["quantile"] <= 1
    assert f'cflowad_drift_quantile{{model="brick"}} {drift["quantile"]}' in metrics
    assert f'cflowad_drift{{model="brick"}} {float(drift["tripped"])}' in metrics


def test_serve_publishes_each_answer_and_counts_it_in_metrics(models, images, tmp_path, webhook):
    from cflowad.common.errors import UserError
    from cflowad.line.sinks import PublishSettings

    receiver = webhook()
    port = receiver.port
    publish = PublishSettings(urls=(f"http://127.0.0.1:{port}/hook",), what="all")
    with pytest.raises(UserError, match="--spool"):
        ServeSettings(publish=publish)
    settings = ServeSettings(publish=publish, spool=tmp_path / "spool")
    with serving(create_app(models / "brick", settings)) as url:
        answers = [_post(url, "brick", image.read_bytes()).json() for image in images[:3]]
        deadline = time.monotonic() + 30
        while len(receiver.received) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        metrics = httpx.get(f"{url}/metrics").text
    messages = receiver.messages()
    assert [m["score"] for m in messages] == [a["score"] for a in answers]
    assert {m["kind"] for m in messages} == {"result"} and len({m["id"] for m in messages}) == 3
    assert {m["origin"] for m in messages} == {"serve"}
    destination = f'destination="http://127.0.0.1:{port}/hook"'
    assert f"cflowad_messages_published_total{{{destination}}} 3.0" in metrics
    assert f"cflowad_messages_pending{{{destination}}} 0.0" in metrics

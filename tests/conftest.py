"""Shared fixtures: a small MVTec-layout data set made from real textures."""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata

import cflowad.engine.threads


def make_texture_dataset(
    root: Path, n_train: int = 48, n_good: int = 8, n_bad: int = 8, size: int = 128, seed: int = 0
) -> Path:
    """Crops of scikit-image's brick texture; defects are pasted gravel patches with masks.

    48 training images: with about 20 the coarsest scale's flow (320 dimensions,
    8 x 8 positions per image) overfits and its map turns noisy.
    """
    rng = np.random.default_rng(seed)
    brick, gravel = skdata.brick(), skdata.gravel()

    def crop(texture: np.ndarray) -> np.ndarray:
        y, x = rng.integers(0, texture.shape[0] - size, 2)
        return texture[y : y + size, x : x + size].copy()

    def save(array: np.ndarray, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(path)

    for i in range(n_train):
        save(crop(brick), root / "train" / "good" / f"{i:03d}.png")
    for i in range(n_good):
        save(crop(brick), root / "test" / "good" / f"{i:03d}.png")
    for i in range(n_bad):
        image, mask = crop(brick), np.zeros((size, size), np.uint8)
        side = int(rng.integers(size // 6, size // 3))
        y, x = rng.integers(0, size - side, 2)
        image[y : y + side, x : x + side] = crop(gravel)[:side, :side]
        mask[y : y + side, x : x + side] = 255
        save(image, root / "test" / "patch" / f"{i:03d}.png")
        save(mask, root / "ground_truth" / "patch" / f"{i:03d}_mask.png")
    return root


@pytest.fixture(scope="session")
def texture_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_texture_dataset(tmp_path_factory.mktemp("textures") / "brick")


@pytest.fixture(scope="session")
def trained_model(texture_dataset: Path):
    """The default model (Lite0 ImageNet weights, 256 px), trained briefly on the texture set."""
    from cflowad import CFlowAD

    return CFlowAD(steps=300, seed=0, compile_training=False).fit(texture_dataset)


@pytest.fixture(scope="session")
def make_textures():
    """:func:`make_texture_dataset`, for tests that need several data sets."""
    return make_texture_dataset


# Fixtures that train a model (once per session or module): a test that uses one, even
# through another fixture, is slow. `pytest -m "not slow"` is the fast suite.
TRAINING_FIXTURES = {
    "trained_model",
    "model_dir",
    "small_model",
    "gaussian_model",
    "region_model",
    "models",
    "fleet",
    "tiled_model",
    "running",
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if TRAINING_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _training_is_marked_slow(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch):
    """A test not marked slow cannot train (its body or its function-scoped fixtures): the
    decoders' fitting refuses, naming the test, so the fast suite stays fast and a new
    test that trains says it must be marked."""
    if request.node.get_closest_marker("slow") is not None:
        return

    def refuse(*args, **kwargs):
        raise AssertionError(f"{request.node.nodeid} trains a model: mark it @pytest.mark.slow")

    import cflowad.engine.model
    import cflowad.method.train

    for module in (cflowad.engine.model, cflowad.method.train):
        for name in ("fit_decoders", "fit_gaussians"):
            monkeypatch.setattr(module, name, refuse)


@pytest.fixture(autouse=True)
def _threads_restored():
    """A command run in-process sets torch's and ONNX Runtime's threads for the whole
    process (`cflowad.engine.threads.share_threads`); no test leaves them to the next."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
    cflowad.engine.threads._threads.clear()
    cflowad.engine.threads._scorers.clear()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _served_map(model_dir: Path, image: Path) -> tuple[float, np.ndarray]:
    """The server's answer for one PNG: (score, map in [0, 1]), from an app that serves
    ``model_dir`` alone (in process, no socket), once its model has loaded."""
    import base64
    import io
    import time

    from fastapi.testclient import TestClient

    from cflowad.line.server import create_app

    with TestClient(create_app({"served": model_dir})) as client:
        deadline = time.monotonic() + 60
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, "the model did not load"
            time.sleep(0.1)
        answer = client.post(
            "/v1/models/served/predict",
            content=image.read_bytes(),
            headers={"content-type": "image/png"},
            params={"outputs": "map"},
        ).json()
    served = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer["map"])))) / 65535
    return answer["score"], served


@pytest.fixture
def served_map():
    """:func:`_served_map`: the server's (score, map) for one image of a model."""
    return _served_map


@pytest.fixture
def free_port():
    """A function that gives a port on 127.0.0.1 that nothing listens on."""
    return _free_port


class WebhookReceiver:
    """An HTTP receiver on 127.0.0.1: answers ``fail`` with each status in turn, then 200."""

    def __init__(self, port: int, fail: list[int] | None = None) -> None:
        self.port, self.fail, self.received = port, list(fail or []), []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                status = receiver.fail.pop(0) if receiver.fail else 200
                if status == 200:
                    receiver.received.append((dict(self.headers), body))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def messages(self) -> list[dict]:
        return [json.loads(body) for _, body in self.received]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def webhook():
    """A factory of :class:`WebhookReceiver` on free ports: ``webhook(fail=[503])``."""
    started: list[WebhookReceiver] = []

    def start(port: int | None = None, fail: list[int] | None = None) -> WebhookReceiver:
        started.append(WebhookReceiver(port or _free_port(), fail))
        return started[-1]

    yield start
    for receiver in started:
        receiver.stop()

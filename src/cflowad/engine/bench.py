"""``cflowad bench``: throughput of the whole model against its encoder alone.

Reports medians over repetitions after a warm-up. The "fiber loop" figure runs
the same decoders the way public implementations do (64 feature vectors per call,
a Python loop over chunks, the condition recomputed each time): the baseline the
fast path is measured against. With ``onnx`` the exported model (and the encoder
alone, exported the same way) are timed in ONNX Runtime too.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

from cflowad.common.progress import Reporter
from cflowad.data.images import batches
from cflowad.engine.export import write_onnx
from cflowad.engine.model import CFlowAD
from cflowad.engine.onnx import INPUT_NAME, cpu_session, require_onnxruntime
from cflowad.method.scoring import CFlowNet

__all__ = ["fiber_loop_forward", "run_bench"]


def fiber_loop_forward(net: CFlowNet, images: torch.Tensor, fiber: int = 64) -> torch.Tensor:
    """Anomaly maps computed in fiber batches of ``fiber`` vectors, as public code does."""
    log_likelihoods = []
    for k, features in enumerate(net.features(images)):
        batch, dim, height, width = features.shape
        z = features.flatten(2).transpose(1, 2).reshape(-1, dim)
        c = net.codes(k).repeat(batch, 1)
        chunks = [
            net.decoder(k).log_prob(z[i : i + fiber], c[i : i + fiber]) / dim
            for i in range(0, len(z), fiber)
        ]
        log_likelihoods.append(torch.cat(chunks).view(batch, height, width))
    return net.raw_map(log_likelihoods)


def run_bench(
    model_dir: Path,
    images: list[Path],
    batch_sizes: list[int],
    repeats: int,
    train_data: Path | None,
    steps: int,
    reporter: Reporter,
    onnx: bool = False,
    device: str = "auto",
) -> dict[str, Any]:
    """Measure and return the figures written to the bench JSON, in torch's current threads."""
    model = CFlowAD.load(model_dir, device=device)
    net = model.net
    size = model.config.image_size
    if images:
        pool = torch.cat([b for b, _ in batches(images, size, 16)])
    else:
        pool = torch.rand(max(batch_sizes), 3, *size, generator=torch.Generator().manual_seed(0))
    pool = pool.to(model.device)
    sessions = _onnx_sessions(model, reporter) if onnx else None
    results: list[dict[str, Any]] = []
    with reporter.task("timing", len(batch_sizes)) as task:
        for batch_size in batch_sizes:
            index = torch.arange(batch_size) % len(pool)
            batch = pool[index].contiguous()
            whole = _median_seconds(partial(net, batch), repeats)
            encoder = _median_seconds(partial(net.encoder, batch), repeats)
            results.append(
                {
                    "batch_size": batch_size,
                    "images_per_second": round(batch_size / whole, 2),
                    "encoder_images_per_second": round(batch_size / encoder, 2),
                    "ratio": round(encoder / whole, 3),
                    "ms_per_image": round(1000 * whole / batch_size, 2),
                }
            )
            loop = None
            if model.config.decoder == "flow":  # the official code's loop exists for flows only
                loop = _median_seconds(
                    partial(fiber_loop_forward, net, batch), max(1, repeats // 2)
                )
                results[-1]["fiber_loop_images_per_second"] = round(batch_size / loop, 2)
                results[-1]["speedup_over_fiber_loop"] = round(loop / whole, 2)
            if sessions is not None:
                feed = {INPUT_NAME: batch.cpu().numpy()}
                ort_whole = _median_seconds(partial(sessions[0].run, None, feed), repeats)
                ort_encoder = _median_seconds(partial(sessions[1].run, None, feed), repeats)
                results[-1]["onnxruntime"] = {
                    "images_per_second": round(batch_size / ort_whole, 2),
                    "encoder_images_per_second": round(batch_size / ort_encoder, 2),
                    "ratio": round(ort_encoder / ort_whole, 3),
                    "speedup_over_fiber_loop": round(loop / ort_whole, 2) if loop else None,
                    "ms_per_image": round(1000 * ort_whole / batch_size, 2),
                }
            task.advance()
    result: dict[str, Any] = {
        "model": str(model_dir),
        "image_size": list(size),
        "backbone": model.config.backbone,
        "inputs": "files" if images else "generated",
        "repeats": repeats,
        "batches": results,
        "machine": {
            "cpu": _cpu_name(),
            "cores": os.cpu_count(),
            "device": str(model.device),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
    }
    result["peak_rss_mb"] = _peak_rss_mb()
    if train_data is not None:
        config = dataclasses.replace(model.config, steps=steps)
        start = time.perf_counter()
        trained = CFlowAD(config, device=device).fit(train_data, reporter=reporter)
        result["train_seconds"] = round(time.perf_counter() - start, 2)
        result["train_steps_per_second"] = trained.training["steps_per_second"]
        result["train_encode_seconds"] = trained.training["encode_seconds"]
        result["train_images"] = trained.training["n_train"]
        result["train_peak_rss_mb"] = _peak_rss_mb()
    return result


class _EncoderOnly(torch.nn.Module):
    def __init__(self, net: CFlowNet) -> None:
        super().__init__()
        self.encoder = net.encoder

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.encoder(images))


def _onnx_sessions(model: CFlowAD, reporter: Reporter) -> tuple[Any, Any]:
    """ONNX Runtime sessions of the exported model and of its encoder alone."""
    require_onnxruntime("--onnx")
    height, width = model.config.image_size
    with tempfile.TemporaryDirectory() as folder, reporter.task("exporting to ONNX", 2) as task:
        whole = Path(folder) / "model.onnx"
        model.export_onnx(whole)
        task.advance()
        encoder = Path(folder) / "encoder.onnx"
        write_onnx(_EncoderOnly(model.net).eval(), torch.rand(2, 3, height, width), encoder)
        task.advance()
        return cpu_session(whole), cpu_session(encoder)


@torch.inference_mode()
def _median_seconds(function: Callable[[], object], repeats: int) -> float:
    # CUDA runs asynchronously: wait for the device before reading the clock
    on_cuda = torch.cuda.is_initialized()  # type: ignore[no-untyped-call]
    for _ in range(2):
        function()
    times = []
    for _ in range(repeats):
        if on_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        function()
        if on_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()

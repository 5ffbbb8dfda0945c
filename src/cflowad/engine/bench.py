"""``cflowad bench``: throughput of the whole model against its encoder alone.

Reports medians over repetitions after a warm-up. The "fiber loop" figure runs
the same decoders the way public implementations do (64 feature vectors per call,
a Python loop over chunks, the condition recomputed each time): the baseline the
fast path is measured against. With ``runtimes`` the exported model (and the
encoder alone, exported the same way) are timed in ONNX Runtime and OpenVINO too,
side by side in one run: in float32, with the convolutions in int8 (``int8``: ONNX
Runtime, ranges calibrated on the timing images; the speed does not depend on them),
and in bfloat16 (``bf16``: OpenVINO, on CPUs with bfloat16 units).
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

from cflowad.common.errors import UserError
from cflowad.common.progress import Reporter
from cflowad.data.images import batches
from cflowad.engine.export import write_onnx
from cflowad.engine.model import CFlowAD
from cflowad.engine.onnx import INPUT_NAME, cpu_session, require_onnxruntime
from cflowad.engine.openvino import cpu_config, host_has_bf16, require_openvino
from cflowad.method.scoring import CFlowNet

__all__ = ["RUNTIMES", "fiber_loop_forward", "run_bench"]

# a runtime's name on the command line -> its key in the bench JSON
RUNTIMES = {
    "torch": "torch",
    "onnx": "onnxruntime",
    "openvino": "openvino",
    "int8": "onnxruntime_int8",
    "bf16": "openvino_bf16",
}


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
    runtimes: tuple[str, ...] = ("torch",),
    device: str = "auto",
) -> dict[str, Any]:
    """Measure and return the figures written to the bench JSON, in torch's current threads
    (PyTorch always; ``runtimes`` may add ``onnx`` and ``openvino``)."""
    model = CFlowAD.load(model_dir, device=device)
    net = model.net
    size = model.config.image_size
    if images:
        pool = torch.cat([b for b, _ in batches(images, size, 16)])
    else:
        pool = torch.rand(max(batch_sizes), 3, *size, generator=torch.Generator().manual_seed(0))
    pool = pool.to(model.device)
    exported = _exported_runners(model, runtimes, reporter, pool[:64].cpu().numpy())
    results: list[dict[str, Any]] = []
    with reporter.task("timing", len(batch_sizes)) as task:
        for batch_size in batch_sizes:
            index = torch.arange(batch_size) % len(pool)
            batch = pool[index].contiguous()
            whole = _median_seconds(partial(net, batch), repeats)
            encoder = _median_seconds(partial(net.encode, batch), repeats)
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
            feed = batch.cpu().numpy()
            for key, (run_whole, run_encoder) in exported.items():
                seconds = _median_seconds(partial(run_whole, feed), repeats)
                encoder_seconds = _median_seconds(partial(run_encoder, feed), repeats)
                results[-1][key] = {
                    "images_per_second": round(batch_size / seconds, 2),
                    "encoder_images_per_second": round(batch_size / encoder_seconds, 2),
                    "ratio": round(encoder_seconds / seconds, 3),
                    "speedup_over_fiber_loop": round(loop / seconds, 2) if loop else None,
                    "ms_per_image": round(1000 * seconds / batch_size, 2),
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
        self.encode = net.encode  # in tiles, when the model has them

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.encode(images))


def _exported_runners(
    model: CFlowAD, runtimes: tuple[str, ...], reporter: Reporter, calibration: Any
) -> dict[str, tuple[Callable[[Any], Any], Callable[[Any], Any]]]:
    """Per exported runtime asked for: run the whole model, run the encoder alone (each
    takes a float32 batch), both from the same ONNX export."""
    wanted = [r for r in runtimes if r != "torch"]
    if not wanted:
        return {}
    for runtime in {"onnx", "int8"} & set(wanted):
        require_onnxruntime(f"--runtimes {runtime}")
    openvino = None
    if {"openvino", "bf16"} & set(wanted):
        openvino = require_openvino("--runtimes openvino")
    if "bf16" in wanted and not host_has_bf16():
        raise UserError("option --runtimes bf16: this CPU has no bfloat16 units")
    height, width = model.config.image_size
    runners: dict[str, tuple[Callable[[Any], Any], Callable[[Any], Any]]] = {}
    with tempfile.TemporaryDirectory() as folder, reporter.task("exporting", 2) as task:
        whole = Path(folder) / "model.onnx"
        model.export_onnx(whole)
        task.advance()
        encoder = Path(folder) / "encoder.onnx"
        write_onnx(_EncoderOnly(model.net).eval(), torch.rand(2, 3, height, width), encoder)
        task.advance()
        if "onnx" in wanted:
            sessions = cpu_session(whole), cpu_session(encoder)
            runners[RUNTIMES["onnx"]] = (
                partial(_run_onnx, sessions[0]),
                partial(_run_onnx, sessions[1]),
            )
        if "int8" in wanted:
            from cflowad.engine.quantize import quantize_file

            quantized = [path.with_suffix(".int8.onnx") for path in (whole, encoder)]
            for source, target in zip((whole, encoder), quantized, strict=True):
                quantize_file(source, target, calibration, Path(folder))
            runners[RUNTIMES["int8"]] = (
                partial(_run_onnx, cpu_session(quantized[0])),
                partial(_run_onnx, cpu_session(quantized[1])),
            )
        for runtime, precision in (("openvino", "f32"), ("bf16", "bf16")):
            if openvino is not None and runtime in wanted:
                core = openvino.Core()
                config = cpu_config(precision)
                requests = [
                    core.compile_model(str(path), "CPU", config).create_infer_request()
                    for path in (whole, encoder)
                ]
                runners[RUNTIMES[runtime]] = (requests[0].infer, requests[1].infer)
    return runners


def _run_onnx(session: Any, images: Any) -> Any:
    return session.run(None, {INPUT_NAME: images})


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

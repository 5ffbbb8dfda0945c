"""Training the decoders by eq. (7.2) on cached encoder features.

The encoder is frozen, so each training image is encoded once; decoders then train
on fiber batches drawn uniformly over (image, y, x) of every scale. Features are
cached as float16: about 176 KiB per 256 x 256 image with EfficientNet-Lite0
(40 x 32 x 32 + 112 x 16 x 16 + 320 x 8 x 8 values). Caches above the configured
budget live in a memory-mapped temporary file instead of RAM. Where bfloat16
matrix products measure faster than float32 on this CPU, a step's products run in
bfloat16; torch.compile fuses the step; scoring always runs in float32.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from cflowad.common.errors import UserError
from cflowad.common.progress import Reporter
from cflowad.data.images import ImageInput, batches
from cflowad.method.config import Config
from cflowad.method.flows import ConditionalFlow
from cflowad.method.gaussian import GaussianDecoder
from cflowad.method.scoring import CFlowNet

__all__ = [
    "FeatureCache",
    "encode",
    "fit_decoders",
    "fit_gaussians",
    "flow_loss",
    "resolve_precision",
    "training_features",
    "training_step_loss",
]


@dataclass
class FeatureCache:
    """Encoder features of a set of images: per scale, one (N * H_k * W_k, D_k) array."""

    scales: list[np.ndarray]
    positions: list[int]
    on_disk: bool

    @property
    def nbytes(self) -> int:
        """Total size of the cache."""
        return sum(a.nbytes for a in self.scales)


@torch.inference_mode()
def encode(
    net: CFlowNet,
    items: Sequence[ImageInput],
    batch_size: int = 16,
    budget_mb: int = 4096,
    reporter: Reporter | None = None,
    cache_dir: str | None = None,
    description: str = "encoding",
) -> FeatureCache:
    """Run the frozen encoder once over ``items`` and keep float16 features per position."""
    reporter = reporter or Reporter(enabled=False)
    positions = [h * w for h, w in net.feature_sizes]
    shapes = [(len(items) * p, d) for p, d in zip(positions, net.encoder.channels, strict=True)]
    total = sum(rows * dim * 2 for rows, dim in shapes)
    on_disk = total > budget_mb * 2**20
    if on_disk:
        reporter.log(
            f"feature cache of {total / 2**20:.0f} MiB exceeds the budget of "
            f"{budget_mb} MiB: memory-mapping it to a file in {cache_dir or tempfile.gettempdir()}"
        )
        scales = [_disk_array(s, cache_dir) for s in shapes]
    else:
        scales = [np.empty(s, dtype=np.float16) for s in shapes]
    start = 0
    device = net.reference.device
    with reporter.task(description, len(items)) as task:
        for images, _ in batches(items, net.image_size, batch_size):
            for k, features in enumerate(training_features(net, images.to(device))):
                rows = features.flatten(2).transpose(1, 2).reshape(-1, features.shape[1])
                scales[k][start * positions[k] : (start + len(images)) * positions[k]] = (
                    rows.to(torch.float16).cpu().numpy()
                )
            start += len(images)
            task.advance(len(images))
    return FeatureCache(scales, positions, on_disk)


@torch.inference_mode()
def training_features(net: CFlowNet, images: Tensor) -> list[Tensor]:
    """:meth:`CFlowNet.features` computed the same way on any number of threads.

    PyTorch picks its convolution by batch size and thread count: below 16 images,
    one thread runs 1 x 1 convolutions as plain matrix products and several threads
    split an image among them, each rounding differently. A batch padded to at least
    16 images (and one per thread) runs one image per thread through oneDNN, bit for
    bit the same on 1 to 16 threads (measured), so a model trained on a laptop, a
    server, ``--jobs N`` or a Ray worker is the same file.
    """
    return net.features(images, min_batch=max(16, torch.get_num_threads()))


def _disk_array(shape: tuple[int, int], folder: str | None) -> np.ndarray:
    """A float16 array backed by an unlinked file in ``folder`` (freed when dropped).

    The file's blocks are reserved first: a memory map over a disk that fills up
    would end the process with SIGBUS instead of a message.
    """
    where = Path(folder) if folder else Path(tempfile.gettempdir())
    if not where.is_dir():
        raise UserError(f"option --cache-dir={where}: folder not found")
    nbytes = shape[0] * shape[1] * 2
    handle, path = tempfile.mkstemp(suffix=".f16", prefix="cflowad-features-", dir=where)
    try:
        try:
            os.posix_fallocate(handle, 0, nbytes)
        except OSError as error:
            free = shutil.disk_usage(where).free
            raise UserError(
                f"option --cache-dir={where}: no room for the {nbytes / 2**20:.0f} MiB feature "
                f"cache ({free / 2**20:.0f} MiB free; {error.strerror})"
            ) from None
        return np.memmap(path, dtype=np.float16, mode="r+", shape=shape)
    finally:
        os.close(handle)
        os.unlink(path)


def flow_loss(flow: ConditionalFlow, z: Tensor, c: Tensor, objective: str = "nll") -> Tensor:
    """Training loss of one scale on a fiber batch z (N, D), c (N, C).

    ``"nll"`` is the paper's eq. (7.2) divided by D: mean(||u||^2 / 2 - log|det J|) / D.
    ``"logsigmoid"`` is the official code's variant, mean(-logsigmoid(log p / D)).
    """
    u, log_det = flow(z, flow.condition(c), rotate_last=False)
    dim = z.shape[-1]
    if objective == "nll":
        return (0.5 * (u * u).sum(dim=-1) - log_det).mean() / dim
    log_prob = -0.5 * (u * u).sum(dim=-1) - 0.5 * dim * math.log(2 * math.pi) + log_det
    return -F.logsigmoid(log_prob / dim).mean()


# bfloat16 must beat float32 by this factor on the probe to be chosen: on a host
# where the two are close, float32 keeps the exact numerics for no loss of speed.
BFLOAT16_MIN_SPEEDUP = 1.25


def matmul_seconds(dtype: torch.dtype) -> float:
    """Time of one (512 x 288) @ (288 x 640) product, a training step's typical one
    (the mean of 10 after 3 to warm up)."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(512, 288, generator=generator).to(dtype)
    b = torch.randn(288, 640, generator=generator).to(dtype)
    for _ in range(3):
        a @ b
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    return (time.perf_counter() - start) / 10


@functools.cache
def bfloat16_is_faster() -> bool:
    """Whether this CPU multiplies bfloat16 matrices clearly faster than float32.

    Measured, not read from CPU flags: two hosts with the same AVX512-BF16 flag
    differed by 3x. On one, bfloat16 products ran at 175 G/s against 90 for float32
    and the training step went 18 -> 25 steps/s; on another, a bfloat16 product took
    1.8x as long as a float32 one and the step went 15 -> 10 steps/s (without
    native support bfloat16 is emulated and slower still). Five alternating rounds,
    medians compared, so a host's drift hits both alike; under a second, once per process.
    """
    rounds = [(matmul_seconds(torch.float32), matmul_seconds(torch.bfloat16)) for _ in range(5)]
    float32, bfloat16 = (sorted(times)[len(times) // 2] for times in zip(*rounds, strict=True))
    return float32 > BFLOAT16_MIN_SPEEDUP * bfloat16


def resolve_precision(precision: str, device: torch.device | None = None) -> str:
    """``"auto"`` -> bfloat16 where it is supported on CUDA or measured faster on this CPU
    (:func:`bfloat16_is_faster`), else float32.

    Training under bfloat16 autocast runs matrix products in bfloat16 and the rest
    as PyTorch's autocast chooses; metrics barely move (docs/benchmarks.md), but a
    run that must be bit-reproducible across hosts should name its precision.
    """
    if precision == "auto":
        if device is not None and device.type == "cuda":
            return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
        return "bfloat16" if bfloat16_is_faster() else "float32"
    return precision


def training_step_loss(
    decoders: nn.ModuleList, zs: list[Tensor], cs: list[Tensor], objective: str, precision: str
) -> Tensor:
    """Summed loss of one training step over the scales: the part torch.compile fuses.

    ``zs[k]`` and ``cs[k]`` are (fiber batches, fiber batch size, D): a scale that draws
    several batches (:func:`fiber_batches`) runs each through its own products, so
    every reduction over vectors has the same length and order on any number of
    threads. One 1,024-row product split its reduction across 2 threads differently
    than on 1, and models trained with 1 and 2 threads differed.
    """
    device = zs[0].device
    total = torch.zeros((), device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bfloat16"):
        for flow, z, c in zip(cast(list[ConditionalFlow], list(decoders)), zs, cs, strict=True):
            losses = [
                flow_loss(flow, zb, cb, objective).float() for zb, cb in zip(z, c, strict=True)
            ]
            total = total + torch.stack(losses).mean()
    return total


def fiber_batches(config: Config) -> list[int]:
    """Fiber batches each scale's flow draws per step, finest scale first.

    Equal batches would leave the finest flow short: at strides 8 / 16 / 32 it has 16x
    the coarsest scale's vectors, so 3,000 steps show each of them about once while the
    coarsest sees each of its own 17 times. Its 40-dimensional flow is also the cheapest,
    so ``finest_batch_factor`` 4 costs a quarter of the step rate (default trainings on
    2 cores: 15.2 -> 11.5 steps/s); docs/design.md has the synthetic-defect comparison.
    """
    counts = [1] * len(config.strides)
    if len(counts) > 1:
        counts[0] = config.finest_batch_factor
    return counts


def fit_decoders(
    net: CFlowNet, cache: FeatureCache, config: Config, reporter: Reporter | None = None
) -> dict[str, Any]:
    """Train all decoders jointly with Adam, linear warm-up and cosine decay.

    Every step draws :func:`fiber_batches` fiber batches per scale; the summed
    loss trains disjoint parameters, so this equals one optimizer per scale. Returns a
    training summary.
    """
    reporter = reporter or Reporter(enabled=False)
    generator = torch.Generator().manual_seed(config.seed)
    features = [torch.from_numpy(a) for a in cache.scales]
    codes = [net.codes(k) for k in range(len(features))]
    device = codes[0].device
    net.decoders.train()
    # fused: one kernel for all parameters, measured 15.3 vs 14.4 steps/s on 2 cores
    optimizer = torch.optim.Adam(net.decoders.parameters(), lr=config.learning_rate, fused=True)
    warmup = max(1, int(config.warmup_fraction * config.steps))
    counts = fiber_batches(config)
    # with an inspection region, only the positions that reach a map inside it
    inside = [net.region_cells(k) for k in range(len(features))]
    allowed = [None if c is None else torch.nonzero(c.flatten().cpu())[:, 0] for c in inside]

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, config.steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)

    def gradients(total: Tensor) -> Tensor:
        optimizer.zero_grad(set_to_none=True)
        total.backward()  # type: ignore[no-untyped-call]  # the compiled backward is built here on the first step
        return total

    precision = resolve_precision(config.training_precision, device)
    loss_fn = training_step_loss
    if config.compile_training:
        reporter.log("compiling the training step (a minute the first time, then cached)")
        # Inductor's C++ build warns that no CUDA runtime exists: true and irrelevant here.
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
        loss_fn = torch.compile(training_step_loss, dynamic=False)
    history: list[float] = []
    running = math.nan
    first_step = math.nan
    start = time.perf_counter()
    with reporter.task("training", config.steps) as task:
        for step in range(config.steps):
            zs, cs = [], []
            for k in range(len(features)):
                shape = (counts[k], config.fiber_batch_size)
                cells = allowed[k]
                if cells is None:
                    index = torch.randint(features[k].shape[0], shape, generator=generator)
                else:
                    images = features[k].shape[0] // cache.positions[k]
                    image = torch.randint(images, shape, generator=generator)
                    cell = cells[torch.randint(len(cells), shape, generator=generator)]
                    index = image * cache.positions[k] + cell
                zs.append(features[k][index].to(device, torch.float32))
                cs.append(codes[k][(index % cache.positions[k]).to(device)])
            try:
                total = gradients(loss_fn(net.decoders, zs, cs, config.objective, precision))
            except Exception as error:  # a compiler missing or failing: train without it
                if step > 0 or loss_fn is training_step_loss:
                    raise
                reporter.log(f"torch.compile failed ({type(error).__name__}); training without it")
                loss_fn = training_step_loss
                total = gradients(loss_fn(net.decoders, zs, cs, config.objective, precision))
            optimizer.step()
            scheduler.step()
            if step == 0:
                first_step = time.perf_counter() - start
            value = total.item() / len(features)
            running = value if step == 0 else 0.98 * running + 0.02 * value
            if step % 100 == 0 or step == config.steps - 1:
                history.append(round(running, 5))
            if not math.isfinite(value):
                raise UserError(
                    f"training diverged at step {step} (loss {value}); "
                    f"try a lower --learning-rate than {config.learning_rate}"
                )
            task.advance(1, status=f"loss {running:.4f}")
    net.decoders.eval()
    net.refresh_conditions()
    seconds = time.perf_counter() - start
    return {
        "steps": config.steps,
        "precision": precision,
        "compiled": loss_fn is not training_step_loss,
        "first_step_seconds": round(first_step, 2),
        "train_seconds": round(seconds, 2),
        "steps_per_second": round(config.steps / seconds, 2),
        "final_loss": round(running, 5),
        "loss_history": history,
    }


def fit_gaussians(
    net: CFlowNet, cache: FeatureCache, reporter: Reporter | None = None
) -> dict[str, Any]:
    """Fit every scale's :class:`cflowad.method.gaussian.GaussianDecoder` from the cached
    features (float64, in chunks of positions). Returns a training summary."""
    reporter = reporter or Reporter(enabled=False)
    start = time.perf_counter()
    with reporter.task("fitting Gaussians", len(net.decoders)) as task:
        for k, decoder in enumerate(net.decoders):
            if not isinstance(decoder, GaussianDecoder):
                raise TypeError(f"scale {k} is not a Gaussian decoder")
            rows, dim = cache.scales[k].shape
            positions = cache.positions[k]
            decoder.fit(cache.scales[k].reshape(rows // positions, positions, dim))
            task.advance(1)
    seconds = time.perf_counter() - start
    return {"decoder": "gaussian", "fit_seconds": round(seconds, 2)}

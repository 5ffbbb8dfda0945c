"""One model in every runtime, side by side: speed at batch 1 and 16, accuracy, and how
far each runtime's maps are from PyTorch's.

    python benchmarks/runtimes.py MODEL ../shared/data/magnetic_tile --json runtimes.json

Exports MODEL as ONNX and OpenVINO in float32, and in int8 (`cflowad export --int8
--data CATEGORY/train/good`: the training's own images); times each at batch 1 and 16
on real test images (medians of --repeats, after a warm-up) with the encoder alone for
the float paths (`cflowad bench --runtimes`); runs `cflowad test` on each; and compares
each runtime's maps with PyTorch's on the test images (median Pearson correlation).
One run, one host: the ratios are comparable, the absolute rates drift with the host.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import cflowad
from cflowad.data.images import batches
from cflowad.results.evaluate import HEADLINE_METRICS

CLI = [sys.executable, "-m", "cflowad"]


def run(*args: object) -> None:
    subprocess.run([*CLI, *map(str, args), "-q"], check=True)


def rate(model: cflowad.Predictor, images: torch.Tensor, batch: int, repeats: int) -> float:
    """Images per second of ``score_batch`` (the whole model, no decoding or resizing)."""
    chunk = images[torch.arange(batch) % len(images)].contiguous()
    score = model.score_batch  # type: ignore[attr-defined]
    with torch.inference_mode():
        for _ in range(2):
            score(chunk)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            score(chunk)
            times.append(time.perf_counter() - start)
    return round(batch / statistics.median(times), 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("category", type=Path)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    cpu = Path("/proc/cpuinfo").read_text()
    result: dict[str, object] = {
        "model": str(args.model),
        "cpu_flags": [
            f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx") if f in cpu
        ],
        "threads": torch.get_num_threads(),
    }
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        paths = {
            "torch": args.model,
            "onnx": root / "model.onnx",
            "openvino": root / "openvino",
            "onnx-int8": root / "int8.onnx",
            "openvino-int8": root / "openvino-int8",
        }
        start = time.perf_counter()
        run("export", args.model, "--onnx", paths["onnx"], "--openvino", paths["openvino"])
        run(
            "export", args.model, "--onnx", paths["onnx-int8"], "--openvino",
            paths["openvino-int8"], "--int8", "--data", args.category / "train" / "good",
        )  # fmt: skip
        result["export_seconds"] = round(time.perf_counter() - start, 1)
        bench = root / "bench.json"
        run(
            "bench", args.model, args.category / "test" / "good", "--runtimes", "onnx,openvino",
            "--batch-size", "1,16", "--repeats", args.repeats, "--json", bench,
        )  # fmt: skip
        result["bench"] = json.loads(bench.read_text())["batches"]
        models = {name: cflowad.load(path, "cpu") for name, path in paths.items()}
        size = models["torch"].image_size
        test_images = sorted(p for p in (args.category / "test").glob("*/*") if p.is_file())
        pool = torch.cat([b for b, _ in batches(test_images[::40][:16], size, 16)])
        speed = {
            name: {f"batch_{b}": rate(model, pool, b, args.repeats) for b in (1, 16)}
            for name, model in models.items()
        }
        result["images_per_second"] = speed
        print(json.dumps(speed, indent=2), flush=True)
        reference = models["torch"].predict_iter(test_images, batch_size=16)
        others = {n: m.predict_iter(test_images, batch_size=16) for n, m in models.items()}
        correlations: dict[str, list[float]] = {name: [] for name in models if name != "torch"}
        for base in reference:
            for name in correlations:
                other = next(others[name]).anomaly_map.ravel()
                correlations[name].append(float(np.corrcoef(base.anomaly_map.ravel(), other)[0, 1]))
        result["map_correlation_with_torch"] = {
            name: {"median": round(statistics.median(v), 5), "min": round(min(v), 5)}
            for name, v in correlations.items()
        }
        accuracy = {}
        for name, path in paths.items():
            metrics = root / f"{name}.json"
            run("test", path, args.category, "--json", metrics)
            figures = json.loads(metrics.read_text())
            accuracy[name] = {k: figures.get(k) for k in HEADLINE_METRICS}
            accuracy[name]["image_fpr_achievable"] = (
                models[name].describe().get("image_fpr_achievable")
            )
            print(name, accuracy[name], flush=True)
        result["accuracy"] = accuracy
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""cflowad next to anomalib's Cflow, same encoder and input size, each in its own runtimes.

    python benchmarks/peer.py MODEL --anomalib-python ENV/bin/python [--data TRAIN] --json peer.json

Exports MODEL with ``cflowad export`` (ONNX, OpenVINO, and with ``--data``, the images
MODEL was trained on, OpenVINO ``--bf16`` on a CPU with bfloat16 units) and anomalib's Cflow with
benchmarks/anomalib_cflow.py (anomalib's ``to_onnx`` / ``to_openvino``, run in an
environment with anomalib 2.7), then times every file at batch 1 and 16 on the same
input, each timing in a fresh process, in alternating rounds so that drift on a
shared host falls on both alike. cflowad's files run as cflowad runs them
(``cflowad.load(...).score_batch``); anomalib's as its users run them: an ONNX
Runtime session, and OpenVINO's ``compile_model`` with no configuration (what
anomalib's ``OpenVINOInferencer`` does), which on a host with bfloat16 units lets
OpenVINO compute in bfloat16; and with the float32 hint cflowad's loader sets, for a
like-for-like figure.
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

HERE = Path(__file__).resolve().parent
RUNNERS = ("cflowad", "ort", "openvino", "openvino-f32")


def rate(runner: str, path: Path, batch: int, repeats: int, size: tuple[int, int]) -> float:
    """Images per second of one file, median of ``repeats`` calls after two warm-ups."""
    images = np.random.default_rng(0).random((batch, 3, *size), dtype=np.float32)
    if runner == "cflowad":
        import torch

        import cflowad

        model = cflowad.load(path)
        tensor = torch.from_numpy(images)

        def call() -> object:
            return model.score_batch(tensor)

    elif runner == "ort":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        feed = {session.get_inputs()[0].name: images}

        def call() -> object:
            return session.run(None, feed)

    else:
        import openvino as ov

        config = {"INFERENCE_PRECISION_HINT": "f32"} if runner == "openvino-f32" else {}
        compiled = ov.Core().compile_model(str(path), "CPU", config)

        def call() -> object:
            return compiled(images)

    for _ in range(2):
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return batch / statistics.median(times)


def measure(runner: str, path: Path, batch: int, repeats: int, size: tuple[int, int]) -> float:
    """:func:`rate` in a process of its own (no thread pools left spinning by another)."""
    command = [sys.executable, __file__, "--time", runner, str(path), str(batch), str(repeats)]
    command += ["--size", f"{size[0]}x{size[1]}"]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return float(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, nargs="?")
    parser.add_argument("--anomalib-python", type=Path)
    parser.add_argument("--data", type=Path, help="MODEL's training data, for --bf16")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--time", nargs=4, metavar=("RUNNER", "PATH", "BATCH", "REPEATS"))
    parser.add_argument("--size", default="256x256")
    args = parser.parse_args()
    if args.time:  # one timing, for measure()
        runner, path, batch, repeats = args.time
        height, width = (int(v) for v in args.size.split("x"))
        print(rate(runner, Path(path), int(batch), int(repeats), (height, width)))
        return
    if args.model is None or args.anomalib_python is None:
        parser.error("MODEL and --anomalib-python are required")
    meta = json.loads((args.model / "model.json").read_text())
    height, width = meta["config"]["image_size"]
    folder = Path(tempfile.mkdtemp(prefix="peer-"))
    cli = [sys.executable, "-m", "cflowad", "export", str(args.model), "-q"]
    subprocess.run([*cli, "--onnx", str(folder / "cflowad.onnx")], check=True)
    subprocess.run([*cli, "--openvino", str(folder / "cflowad-openvino")], check=True)
    bf16 = folder / "cflowad-openvino-bf16"
    if args.data is not None:
        subprocess.run([*cli, "--openvino", str(bf16), "--bf16", "--data", str(args.data)])
    peer = folder / "anomalib"
    exporter = [str(args.anomalib_python), str(HERE / "anomalib_cflow.py")]
    exported = subprocess.run(
        [*exporter, str(height), str(width), str(peer)], check=True, capture_output=True, text=True
    )
    paths = json.loads(exported.stdout.strip().splitlines()[-1])
    files = {
        "cflowad, ONNX Runtime": ("cflowad", folder / "cflowad.onnx"),
        "cflowad, OpenVINO": ("cflowad", folder / "cflowad-openvino"),
        "cflowad, OpenVINO --bf16": ("cflowad", bf16),
        "anomalib, ONNX Runtime": ("ort", Path(paths["onnx"])),
        "anomalib, OpenVINO (its default)": ("openvino", Path(paths["openvino"])),
        "anomalib, OpenVINO (float32 hint)": ("openvino-f32", Path(paths["openvino"])),
    }
    files = {name: (runner, path) for name, (runner, path) in files.items() if path.exists()}
    rates: dict[str, dict[int, list[float]]] = {name: {1: [], 16: []} for name in files}
    for round_ in range(args.rounds):
        for name, (runner, path) in files.items():
            for batch in (1, 16):
                repeats = args.repeats if batch == 1 else max(3, args.repeats // 4)
                value = measure(runner, path, batch, repeats, (height, width))
                rates[name][batch].append(value)
                print(f"round {round_ + 1}: {name}, batch {batch}: {value:.1f} images/s")
    table = {
        name: {f"batch {b}": round(statistics.median(v), 1) for b, v in by_batch.items()}
        for name, by_batch in rates.items()
    }
    ours = max(table[n]["batch 1"] for n in table if n.startswith("cflowad,"))
    theirs = max(table[n]["batch 1"] for n in table if n.startswith("anomalib"))
    result = {
        "input": f"{height}x{width}",
        "note": "fastest_batch_1_ratio: cflowad's fastest path over anomalib's",
        "images_per_second": table,
        "fastest_batch_1_ratio": round(ours / theirs, 2),
        "rounds": args.rounds,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

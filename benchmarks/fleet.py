"""Fleets on one machine: training four categories and scoring a 10,000-image archive.

Usage: python benchmarks/fleet.py ../shared/data [--steps 500] [--images 10000]
       [--scaling-images 2000]

1. A root of four categories: the two shared sets, and two made by splitting them
   (every second training image). ``cflowad train ROOT`` with --jobs 1, --jobs 2 and
   --engine ray: wall time, peak memory, and whether the fleet.json records agree.
2. The models exported to ONNX; an archive made by flipping and cropping the shared
   test images, each assigned to one of the four categories by an index CSV.
   ``cflowad predict`` with the local and the Ray engine: images/s, peak memory, and
   whether records and maps are identical.
3. Scaling: the Ray engine with 1 and 2 workers on the first --scaling-images images.

Memory is the peak of the summed proportional set size (PSS: shared pages divided
among the processes sharing them) over the command's whole process tree, Ray's
processes included, sampled every 0.2 s. Writes runs/fleet.json; the scores' maps
are removed afterwards (gigabytes).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

from cflowad.fleet.archive import read_shards

RUNS = Path("runs/fleet")
SETS = ("magnetic_tile", "visa_capsules")


def make_root(data: Path) -> Path:
    """Four categories: each shared set (linked), and its every second training image."""
    root = RUNS / "root"
    if root.is_dir():
        return root
    for name in SETS:
        (root / name).mkdir(parents=True)
        (root / name / "train").symlink_to((data / name / "train").resolve())
        half = root / f"{name}_half" / "train" / "good"
        half.mkdir(parents=True)
        for image in sorted((data / name / "train" / "good").iterdir())[::2]:
            (half / image.name).symlink_to(image.resolve())
    return root


def make_archive(data: Path, count: int) -> tuple[Path, Path]:
    """``count`` images flipped and cropped from the test images; an index CSV routing
    each to a category (alternately the full set's model and the half set's)."""
    archive = RUNS / f"archive_{count}"
    index = RUNS / f"index_{count}.csv"
    if index.is_file():
        return archive, index
    sources = [(name, p) for name in SETS for p in sorted((data / name / "test").rglob("*.*"))]
    rows = []
    variant = 0
    while len(rows) < count:
        flip, crop = variant % 4, variant // 4
        for number, (name, source) in enumerate(sources):
            if len(rows) == count:
                break
            image = np.asarray(Image.open(source).convert("RGB"))
            if flip & 1:
                image = image[:, ::-1]
            if flip & 2:
                image = image[::-1]
            h, w = image.shape[:2]
            ch, cw = int(h * (0.9 - 0.05 * (crop % 3))), int(w * (0.9 - 0.05 * (crop % 3)))
            y, x = [(0, 0), (h - ch, w - cw), ((h - ch) // 2, (w - cw) // 2)][crop % 3]
            category = name if number % 2 == 0 else f"{name}_half"
            target = archive / category / f"v{variant:02d}_{source.parent.name}_{source.name}"
            target.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.ascontiguousarray(image[y : y + ch, x : x + cw])).save(
                target, quality=95
            )
            rows.append((target.relative_to(archive).as_posix(), category))
        variant += 1
    with index.open("w", newline="") as handle:
        csv.writer(handle).writerows([("path", "category"), *rows])
    return archive, index


def _tree(pid: int) -> list[int]:
    """``pid`` and every descendant (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return found


def _pss_mib(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


def timed(command: list[str]) -> dict[str, float]:
    """Run ``command``; wall seconds and peak PSS (MiB) of its process tree."""
    print("$", " ".join(command), flush=True)
    start = time.perf_counter()
    process = subprocess.Popen(command)
    peak = 0.0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _pss_mib(_tree(process.pid)))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    code = process.wait()
    done.set()
    sampler.join()
    if code != 0:
        sys.exit(f"failed with exit code {code}: {' '.join(command)}")
    return {"seconds": round(time.perf_counter() - start, 1), "peak_pss_mib": round(peak)}


def _records(models: Path) -> dict[str, dict]:
    records = json.loads((models / "fleet.json").read_text())["categories"]
    return {
        n: {k: v for k, v in r.items() if k not in ("seconds", "warnings")}
        for n, r in records.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("data", type=Path)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--scaling-images", type=int, default=2_000)
    parser.add_argument("--phases", default="train,score,scale", help="comma-separated")
    args = parser.parse_args()
    phases = set(args.phases.split(","))
    RUNS.mkdir(parents=True, exist_ok=True)
    cflowad = [sys.executable, "-m", "cflowad"]
    root = make_root(args.data)
    summary = Path("runs") / "fleet.json"
    result: dict = json.loads(summary.read_text()) if summary.is_file() else {}
    result.update({"cores": os.cpu_count(), "steps": args.steps})

    def save() -> None:
        summary.write_text(json.dumps(result, indent=2) + "\n")

    runs = {"jobs_1": ["--jobs", "1"], "jobs_2": ["--jobs", "2"], "ray": ["--engine", "ray"]}
    for name, options in runs.items() if "train" in phases else ():
        result.setdefault("training", {})
        out = RUNS / f"models_{name}"
        shutil.rmtree(out, ignore_errors=True)
        train = [*cflowad, "train", str(root), "--out", str(out), "--steps", str(args.steps)]
        result["training"][name] = timed([*train, *options, "-q"])
        save()
    reference = _records(RUNS / "models_jobs_1")
    if "train" in phases:
        result["training"]["identical_records"] = all(
            _records(RUNS / f"models_{name}") == reference for name in runs
        )
    onnx = RUNS / "onnx"
    onnx.mkdir(exist_ok=True)
    for category in sorted(reference):
        target = onnx / f"{category}.onnx"
        if not target.is_file():
            source = str(RUNS / "models_jobs_1" / category)
            subprocess.run([*cflowad, "export", source, "--onnx", str(target), "-q"], check=True)

    archive, index = make_archive(args.data, args.images)
    if "score" in phases:
        score(archive, index, onnx, args.images, result)
        save()
    if "scale" in phases:
        scale(archive, index, onnx, args.scaling_images, result)
        save()
    print(json.dumps(result, indent=2))


def score(archive: Path, index: Path, onnx: Path, images: int, result: dict) -> None:
    """The archive on both engines: speed, memory, identical records and maps."""
    cflowad = [sys.executable, "-m", "cflowad"]
    result["scoring"] = {"images": images}
    outputs = {}
    for engine in ("local", "ray"):
        out = RUNS / f"scores_{engine}"
        shutil.rmtree(out, ignore_errors=True)
        command = [*cflowad, "predict", str(onnx), str(archive), "--index", str(index)]
        measured = timed([*command, "--out", str(out), "--engine", engine, "-q"])
        measured["images_per_second"] = round(images / measured["seconds"], 2)
        result["scoring"][engine] = measured
        outputs[engine] = out
    local, on_ray = (read_shards(outputs[e]) for e in ("local", "ray"))
    result["scoring"]["identical_records"] = local == on_ray
    sample = local[:: max(1, len(local) // 500)]
    result["scoring"]["identical_maps_of_sample"] = {
        "compared": len(sample),
        "identical": all(
            np.array_equal(np.load(outputs["local"] / r["map"]), np.load(outputs["ray"] / r["map"]))
            for r in sample
        ),
    }
    for out in outputs.values():
        shutil.rmtree(out)


def scale(archive: Path, index: Path, onnx: Path, images: int, result: dict) -> None:
    """The Ray engine with 1 and 2 workers on the archive's first ``images`` images."""
    cflowad = [sys.executable, "-m", "cflowad"]
    subset = RUNS / f"index_{images}.csv"
    lines = index.read_text().splitlines()[: images + 1]
    subset.write_text("\n".join(lines) + "\n")
    result["scaling"] = {"images": images}
    for workers in (1, 2):
        out = RUNS / f"scaling_{workers}"
        shutil.rmtree(out, ignore_errors=True)
        command = [*cflowad, "predict", str(onnx), str(archive), "--index", str(subset)]
        measured = timed(
            [*command, "--out", str(out), "--engine", "ray", "--jobs", str(workers), "-q"]
        )
        measured["images_per_second"] = round(images / measured["seconds"], 2)
        manifest = json.loads((out / "archive.json").read_text())
        measured["scoring_images_per_second"] = manifest["images_per_second"]
        result["scaling"][f"ray_workers_{workers}"] = measured
        shutil.rmtree(out)


if __name__ == "__main__":
    main()

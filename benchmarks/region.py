"""--region against specks on the background: image AUROC with and without a region.

Usage: python benchmarks/region.py DATA WORK [--border 96]

Makes WORK/set from DATA (an MVTec-layout category of one image size): every image
is laid on a wider background (a flat grey cloth with fine noise, ``--border`` pixels
on each side); the background of every *test* image, good or defective, carries 1 to
6 dark specks of dust 4 to 14 px across (training images are clean, as a careful
operator would collect them, while dust settles on the line). Then trains the default
model twice, with ``--region x,y,w,h`` (the part's rectangle) and without, and tests
both: the specks are what the image score (the map's maximum) reports without one.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from cflowad.data.images import list_images
from cflowad.results.evaluate import HEADLINE_METRICS


def lay(image: np.ndarray, border: int, rng: np.random.Generator, specks: bool) -> np.ndarray:
    height, width = image.shape[:2]
    canvas = rng.normal(118, 4, (height + 2 * border, width + 2 * border, 1))
    canvas = np.repeat(canvas, 3, axis=2)
    if specks:
        yy, xx = np.mgrid[: canvas.shape[0], : canvas.shape[1]]
        for _ in range(int(rng.integers(1, 7))):
            radius = rng.uniform(2, 7)
            while True:  # a speck on the background, never on the part
                cy = rng.uniform(radius, canvas.shape[0] - radius)
                cx = rng.uniform(radius, canvas.shape[1] - radius)
                inside = border - radius < cy < border + height + radius and (
                    border - radius < cx < border + width + radius
                )
                if not inside:
                    break
            canvas[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2] = rng.uniform(20, 60)
    canvas[border : border + height, border : border + width] = image
    return np.clip(canvas, 0, 255).astype(np.uint8)


def make_set(data: Path, target: Path, border: int) -> tuple[int, int]:
    rng = np.random.default_rng(0)
    size = (0, 0)
    for folder in sorted(p for p in (data / "train").iterdir() if p.is_dir()) + sorted(
        p for p in (data / "test").iterdir() if p.is_dir()
    ):
        out = target / folder.relative_to(data)
        out.mkdir(parents=True, exist_ok=True)
        for file in list_images(folder):
            image = np.asarray(Image.open(file).convert("RGB"))
            size = image.shape[:2]
            specks = folder.parent.name == "test"
            Image.fromarray(lay(image, border, rng, specks)).save(out / f"{file.stem}.png")
    truth = data / "ground_truth"
    for folder in sorted(p for p in truth.iterdir() if p.is_dir()):
        out = target / "ground_truth" / folder.name
        out.mkdir(parents=True, exist_ok=True)
        for file in list_images(folder):
            mask = np.asarray(Image.open(file).convert("L"))
            padded = np.pad(mask, border)
            Image.fromarray(padded).save(out / f"{file.stem}.png")
    return size


def run(command: list[str]) -> None:
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True)


def main() -> None:
    data, work = Path(sys.argv[1]), Path(sys.argv[2])
    border = int(sys.argv[sys.argv.index("--border") + 1]) if "--border" in sys.argv else 96
    target = work / "set"
    if not target.exists():
        height, width = make_set(data, target, border)
    else:
        height, width = np.asarray(Image.open(next((data / "train" / "good").iterdir()))).shape[:2]
    box = f"{border},{border},{width},{height}"
    results = {}
    for name, extra in (("without", []), ("with", ["--region", box])):
        model = work / f"model-{name}"
        start = time.perf_counter()
        if not model.exists():
            run(
                [
                    sys.executable,
                    "-m",
                    "cflowad",
                    "train",
                    str(target),
                    "--out",
                    str(model),
                    "--quiet",
                    *extra,
                ]
            )
        seconds = time.perf_counter() - start
        report = work / f"test-{name}.json"
        run(
            [
                sys.executable,
                "-m",
                "cflowad",
                "test",
                str(model),
                str(target),
                "--json",
                str(report),
                "--quiet",
            ]
        )
        metrics = json.loads(report.read_text())
        results[name] = {k: metrics[k] for k in HEADLINE_METRICS} | {
            "train_seconds": round(seconds, 1)
        }
        print(name, results[name], flush=True)
    (work / "region.json").write_text(json.dumps({"region": box, **results}, indent=2))


if __name__ == "__main__":
    main()

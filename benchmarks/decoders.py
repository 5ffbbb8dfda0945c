"""Flow and Gaussian decoders side by side: accuracy, fit time, speed, size, training-set size.

    python benchmarks/decoders.py ../shared/data --out runs/decoders.json

For each shared set and 5, 20 and all training images (the first N of train/good by
name; with 5 and 20, --calibrate-on-train, since a 10 % hold-out would leave nothing
to train on): `cflowad train --decoder D`, then `cflowad test` on the full test split.
The flow models on all images are the ones benchmarks/run.sh trains (runs/<set>);
they are reused when present. Also the ELPV demo with the Gaussian decoder and
`cflowad bench` of the Gaussian models. Writes as it goes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

CLI = [sys.executable, "-m", "cflowad"]
SIZES = ("5", "20", "all")


def run(*args: str) -> None:
    subprocess.run([*CLI, *map(str, args), "-q"], check=True)


def subset(data: Path, count: int, root: Path) -> Path:
    folder = root / f"{data.name}_{count}"
    folder.mkdir(parents=True, exist_ok=True)
    for image in sorted((data / "train" / "good").iterdir())[:count]:
        link = folder / image.name
        if not link.exists():
            link.symlink_to(image.resolve())
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path)
    parser.add_argument("--out", type=Path, default=Path("runs/decoders.json"))
    args = parser.parse_args()
    root = Path("runs/decoders")
    root.mkdir(parents=True, exist_ok=True)
    report: dict[str, dict[str, object]] = (
        json.loads(args.out.read_text()) if args.out.is_file() else {}
    )
    jobs = [(d, s, n) for d in ("gaussian", "flow") for s in ("magnetic_tile", "visa_capsules")
            for n in SIZES]  # fmt: skip
    for decoder, name, size in jobs:
        key = f"{name}/{decoder}/{size}"
        if key in report:
            continue
        data = args.data / name
        model = root / f"{name}_{size}_{decoder}"
        metrics_file = root / f"{name}_{size}_{decoder}.test.json"
        if decoder == "flow" and size == "all" and (Path("runs") / name).is_dir():
            model, metrics_file = Path("runs") / name, Path("runs") / f"{name}.test.json"
        else:
            source = data if size == "all" else subset(data, int(size), root / "subsets")
            extra = [] if size == "all" else ["--calibrate-on-train"]
            run("train", source, "--out", model, "--decoder", decoder, *extra)
            run("test", model, data, "--json", metrics_file)
        metrics = json.loads(metrics_file.read_text())
        training = json.loads((model / "model.json").read_text())["training"]
        report[key] = {
            "image_auroc": round(metrics["image_auroc"], 3),
            "pixel_auroc": round(metrics["pixel_auroc"], 3),
            "aupro": round(metrics["aupro"], 3),
            "n_train": training["n_train"],
            "encode_seconds": training["encode_seconds"],
            "fit_seconds": training.get("fit_seconds", training.get("train_seconds")),
            "test_images_per_second": metrics.get("images_per_second"),
            "model_mb": round((model / "model.safetensors").stat().st_size / 2**20, 1),
        }
        print(key, report[key], flush=True)
        args.out.write_text(json.dumps(report, indent=2))
    for name in ("magnetic_tile", "visa_capsules"):
        key = f"{name}/gaussian/bench"
        if key not in report:
            out = root / f"{name}_gaussian.bench.json"
            run("bench", root / f"{name}_all_gaussian", args.data / name / "test" / "good",
                "--batch-size", "1,16", "--repeats", "7", "--onnx", "--json", out)  # fmt: skip
            report[key] = {
                str(b["batch_size"]): [
                    b["images_per_second"],
                    b["onnxruntime"]["images_per_second"],
                ]
                for b in json.loads(out.read_text())["batches"]
            }
            print(key, report[key], flush=True)
            args.out.write_text(json.dumps(report, indent=2))
    if "demo/gaussian" not in report:
        run("demo", "--decoder", "gaussian", "--out", root / "demo_gaussian")
        report["demo/gaussian"] = json.loads((root / "demo_gaussian" / "metrics.json").read_text())
        args.out.write_text(json.dumps(report, indent=2))
        print("demo/gaussian", report["demo/gaussian"], flush=True)


if __name__ == "__main__":
    main()

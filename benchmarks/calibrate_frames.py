"""`stream --calibrate-frames` on a camera-like video of a category's test images.

Writes an H.264 video (lossy, 4:2:0, as cameras send it) of good test images, then
good and defective ones mixed, all resized to one frame size; streams it with the
model's thresholds and with the thresholds refitted on the first N frames, and reports
the good frames flagged and the defective frames caught after the first N.

    python benchmarks/calibrate_frames.py MODEL ../shared/data/magnetic_tile --json cal.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import av
import numpy as np
from PIL import Image

import cflowad
from cflowad.line.stream import stream_video


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("category", type=Path)
    parser.add_argument("--frames", type=int, default=40, help="N: good frames to calibrate on")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--crf", type=int, default=28, help="H.264 quality (23 is x264's default)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    good = sorted((args.category / "test" / "good").iterdir())
    bad = sorted(
        p for d in (args.category / "test").iterdir() if d.name != "good" for p in d.iterdir()
    )
    good = [good[i] for i in rng.permutation(len(good))]
    rest = [(p, False) for p in good[args.frames :]] + [
        (bad[i], True) for i in rng.choice(len(bad), 60, replace=False)
    ]
    rest = [rest[i] for i in rng.permutation(len(rest))]
    order = [(p, False) for p in good[: args.frames]] + rest
    model = cflowad.load(args.model, "cpu")
    result: dict[str, object] = {"model": str(args.model), "crf": args.crf, "frames": args.frames}
    with tempfile.TemporaryDirectory() as folder:
        video = Path(folder) / "camera.mp4"
        with av.open(str(video), "w") as container:
            stream = container.add_stream("libx264", rate=10)
            stream.width = stream.height = args.size
            stream.pix_fmt = "yuv420p"
            stream.options = {"crf": str(args.crf)}
            for path, _ in order:
                picture = Image.open(path).convert("RGB").resize((args.size, args.size))
                frame = av.VideoFrame.from_ndarray(np.asarray(picture), format="rgb24")
                for packet in stream.encode(frame):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        truth = [defective for _, defective in order]
        for name, frames in (("trained thresholds", 0), ("calibrated", args.frames)):
            out = Path(folder) / name.replace(" ", "_")
            stream_video(model, str(video), out, calibrate_frames=frames)
            lines = [json.loads(x) for x in (out / "frames.jsonl").read_text().splitlines()]
            decided = [(x["anomalous"], truth[x["frame"]]) for x in lines[args.frames :]]
            goods = [a for a, d in decided if not d]
            defects = [a for a, d in decided if d]
            entry = {
                "good_frames_flagged": f"{sum(goods)} of {len(goods)}",
                "defective_frames_caught": f"{sum(defects)} of {len(defects)}",
            }
            if frames:
                entry["calibration"] = json.loads((out / "calibration.json").read_text())
                entry["calibration"].pop("model")
            result[name] = entry
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

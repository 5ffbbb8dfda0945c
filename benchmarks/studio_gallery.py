"""How fast the studio's Review view opens on a large scored run, in a real browser.

Scores N synthetic images (crops of scikit-image's brick texture, 256 x 256) with a
Gaussian-decoder model, then opens the Review view R times and reports the medians of
first contentful paint and of "fully interactive" (the first page of cards rendered
with every thumbnail in view decoded; the others load as they are scrolled to), and of
turning to the next page.

    python benchmarks/studio_gallery.py --images 2000 --json gallery.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image
from playwright.sync_api import sync_playwright
from skimage import data as skdata

sys.path.insert(0, str(Path(__file__).parent))
from studio_loop import studio

# every card rendered, and every thumbnail in view decoded (the rest load lazily, on scroll)
READY = """() => {
  const images = [...document.querySelectorAll('#gallery article img')];
  const shown = images.filter((i) => i.getBoundingClientRect().top < window.innerHeight);
  return images.length === %d && shown.length > 0
    && shown.every((i) => i.complete && i.naturalWidth > 0);
}"""


def make_images(folder: Path, count: int) -> None:
    rng = np.random.default_rng(0)
    brick = skdata.brick()
    folder.mkdir(parents=True)
    for i in range(count):
        y, x = rng.integers(0, brick.shape[0] - 256, 2)
        Image.fromarray(brick[y : y + 256, x : x + 256]).save(folder / f"{i:05d}.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--chromium", default=shutil.which("chromium"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        make_images(root / "data" / "train", 60)
        make_images(root / "data" / "scored", args.images)
        model = root / "ws" / "models" / "brick"
        subprocess.run(
            [sys.executable, "-m", "cflowad", "train", str(root / "data" / "train"), "--out",
             str(model), "--decoder", "gaussian", "--quiet"],
            check=True,
        )  # fmt: skip
        with studio(root / "ws", root / "data") as url:
            while httpx.get(f"{url}/v1/models/brick").status_code != 200:
                time.sleep(0.2)
            token = httpx.get(f"{url}/studio/api/state").json()["csrf"]
            start = time.monotonic()
            run = httpx.post(
                f"{url}/studio/api/runs",
                json={"model": "brick", "root": "data", "path": "scored"},
                headers={"X-CSRF-Token": token},
            ).json()
            while httpx.get(f"{url}/studio/api/state").json()["runs"][0]["state"] != "done":
                time.sleep(1)
            scoring_s = time.monotonic() - start
            paints, ready, pages = [], [], []
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=args.chromium)
                for _ in range(args.repeats):
                    page = browser.new_page(viewport={"width": 1400, "height": 1000})
                    page.goto(f"{url}/studio#review")
                    page.wait_for_function(READY % 60, timeout=120_000)
                    ready.append(page.evaluate("performance.now()"))
                    paints.append(
                        page.evaluate(
                            "performance.getEntriesByName('first-contentful-paint')[0].startTime"
                        )
                    )
                    before = page.evaluate("performance.now()")
                    page.get_by_role("button", name="Next page").click()
                    page.wait_for_function(
                        "() => document.querySelector('#page-label').textContent.startsWith"
                        "('Page 2') && (" + READY % 60 + ")()"
                    )
                    pages.append(page.evaluate("performance.now()") - before)
                    page.close()
                browser.close()
    result = {
        "images": args.images,
        "run": run["id"],
        "scoring_seconds": round(scoring_s, 1),
        "first_contentful_paint_ms": round(statistics.median(paints), 1),
        "fully_interactive_ms": round(statistics.median(ready), 1),
        "next_page_ms": round(statistics.median(pages), 1),
        "repeats": args.repeats,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

"""The studio's whole loop on an MVTec-layout category, clicked through in a real browser.

From an empty workspace, as a user would: start a training on train/good (default
settings), score every test folder, move the threshold down until the 5
highest-scoring good test images are flagged and save it (revision 2), score again,
mark those 5 false alarms good, retrain with feedback (revision 3, which keeps the
saved threshold's held-out false-positive rate), compare, promote, score again.
Reports how many of the marked false alarms the new revision no longer flags and how
many defects each revision catches. The marked images are then training images: this
measures the loop, not accuracy on unseen images.

    python benchmarks/studio_loop.py ../shared/data/magnetic_tile --json loop.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
from playwright.sync_api import Page, expect, sync_playwright

TRAINING_TIMEOUT_MS = 40 * 60_000


@contextlib.contextmanager
def studio(workspace: Path, data: Path) -> Iterator[str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "cflowad", "studio", str(workspace), "--allow", str(data)]
    process = subprocess.Popen([*command, "--port", str(port)])
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        assert process.poll() is None and time.monotonic() < deadline, "studio did not start"
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                break
        time.sleep(0.2)
    try:
        yield url
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(60)


def pick(page: Page, picker: str, root: str, *folders: str) -> None:
    box = page.get_by_label(picker, exact=True)
    box.get_by_label("Folder root").select_option(root)
    for folder in folders:
        box.get_by_role("button", name=f"Open folder {folder}", exact=True).click()
    expect(box.get_by_label("Chosen folder")).to_have_value(f"{root}/{'/'.join(folders)}")


def score(page: Page, root: str, *folders: str) -> None:
    page.get_by_role("tab", name="Review").click()
    pick(page, "Folder to score", root, *folders)
    page.get_by_role("form", name="Score a folder").get_by_role(
        "button", name="Score folder"
    ).click()
    expect(page.locator("#run-select option:checked")).to_contain_text("/".join(folders))
    expect(page.locator("#run-status")).to_contain_text("done", timeout=30 * 60_000)


def counts(url: str, model: str) -> dict[str, dict[str, int]]:
    """Per scored folder of the latest runs: images and anomalous decisions, by revision."""
    state = httpx.get(f"{url}/studio/api/state").json()
    found: dict[str, dict[str, int]] = {}
    for run in state["runs"]:
        if run["model"] != model:
            continue
        items = httpx.get(f"{url}/studio/api/runs/{run['id']}/items", params={"limit": 500})
        records = items.json()["items"]
        key = f"{run['label']} r{run.get('revision')}"
        found.setdefault(
            key, {"images": len(records), "anomalous": sum(r["anomalous"] for r in records)}
        )
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("category", type=Path)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--chromium", default=shutil.which("chromium"))
    parser.add_argument("--screenshots", type=Path)
    args = parser.parse_args()
    data = args.category.resolve()
    root = data.parent.name
    tests = sorted(p.name for p in (data / "test").iterdir() if p.is_dir())
    timings: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as folder, sync_playwright() as playwright:
        workspace = Path(folder) / "ws"
        browser = playwright.chromium.launch(executable_path=args.chromium)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        with studio(workspace, data.parent) as url:
            page.goto(f"{url}/studio")
            start = time.monotonic()
            form = page.get_by_role("form", name="New training")
            form.get_by_label("Model name").fill(data.name)
            pick(page, "Folder of good images", root, data.name, "train", "good")
            form.get_by_role("button", name="Start training").click()
            expect(page.get_by_role("table", name="Models")).to_contain_text(
                data.name, timeout=TRAINING_TIMEOUT_MS
            )
            expect(page.get_by_label("Model to score with").locator("option")).to_have_count(1)
            timings["train_s"] = time.monotonic() - start
            start = time.monotonic()
            for test in tests:
                score(page, root, data.name, "test", test)
            timings["score_test_s"] = time.monotonic() - start
            # the threshold moved down on the Threshold view until the 5 highest-scoring
            # good images are flagged (the false alarms the user accepts for now)
            before_threshold = counts(url, data.name)
            good_raw = sorted(
                (
                    r["raw_score"]
                    for run in httpx.get(f"{url}/studio/api/state").json()["runs"]
                    if run["label"].endswith("test/good")
                    for r in httpx.get(
                        f"{url}/studio/api/runs/{run['id']}/items", params={"limit": 500}
                    ).json()["items"]
                ),
                reverse=True,
            )
            target = (good_raw[4] + good_raw[5]) / 2
            page.get_by_role("tab", name="Threshold").click()
            slider = page.get_by_role("slider", name="Threshold")
            expect(page.locator("#threshold-readout")).to_contain_text("reviewed images")
            low, high = page.evaluate("() => [threshold.low, threshold.high]")
            position = round(1000 * (-math.log(1 - target) - low) / (high - low))
            slider.fill(str(position))
            readout = page.locator("#threshold-readout").inner_text()
            page.get_by_role("button", name="Save threshold").click()
            expect(page.get_by_role("alert")).to_contain_text("now served")
            time.sleep(4)  # served within --reload-every
            for test in tests:
                score(page, root, data.name, "test", test)
            # the 5 highest-scoring good images, marked good on their cards
            good_run = page.locator("#run-select option", has_text="test/good").first
            page.get_by_label("Scored run").select_option(good_run.get_attribute("value"))
            cards = page.locator("#gallery article")
            expect(cards.first).to_be_visible()
            marked = []
            for k in range(5):
                card = cards.nth(k)
                marked.append(card.get_attribute("aria-label"))
                card.get_by_role("button", name="Mark good").click()
                expect(card.get_by_role("button", name="Mark good")).to_have_attribute(
                    "aria-pressed", "true"
                )
            before = counts(url, data.name)
            page.get_by_role("tab", name="Feedback").click()
            start = time.monotonic()
            page.get_by_role("button", name="Retrain with feedback").click()
            deadline = time.monotonic() + TRAINING_TIMEOUT_MS / 1000
            while not any(
                j["kind"] == "feedback" and j["state"] == "done"
                for j in httpx.get(f"{url}/studio/api/state").json()["jobs"]
            ):
                assert time.monotonic() < deadline, "retraining did not finish"
                time.sleep(2)
            timings["retrain_s"] = time.monotonic() - start
            page.reload()
            page.get_by_role("tab", name="Feedback").click()
            page.get_by_role("button", name="Compare revision 3").click()
            table = page.get_by_role("table", name="Old and new revision")
            expect(table.locator("tr")).to_have_count(6, timeout=10 * 60_000)
            summary = page.get_by_role("status").filter(has_text="false alarms").inner_text()
            comparison = httpx.get(
                f"{url}/studio/api/models/{data.name}/compare", params={"revision": 3}
            ).json()
            if args.screenshots:
                args.screenshots.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(args.screenshots / "loop-compare.png"), full_page=True)
            page.get_by_role("button", name="Promote").click()
            expect(page.get_by_role("alert")).to_contain_text("now served")
            time.sleep(4)  # the studio reloads the promoted revision
            for test in tests:
                score(page, root, data.name, "test", test)
            after = counts(url, data.name)
        browser.close()
    result = {
        "category": data.name,
        "threshold_readout": readout,
        "runs_revision_1": before_threshold,
        "marked_good": marked,
        "comparison": summary,
        "false_alarms_before": comparison["false_alarms_before"],
        "false_alarms_after": comparison["false_alarms_after"],
        "runs_revision_2": before,
        "runs_revision_3": after,
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

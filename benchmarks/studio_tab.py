"""What one open studio tab costs the server: requests a second while it sits on a view,
and the studio process's CPU seconds a second, with --tabs tabs open (an event stream
counts once, when it opens).

A studio is started on a fresh workspace with a model copied in (``--model``, a model
directory) and --runs scored runs of a folder (``--data``), as a workspace looks after a
day's work; headless Chromium (Debian's) opens the tabs and counts what they ask for,
for --seconds.

    python benchmarks/studio_tab.py --model runs/magnetic_tile \
        --data ../shared/data/magnetic_tile/test/good --runs 5 --seconds 30
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
from playwright.sync_api import sync_playwright

sys.path.insert(0, str(Path(__file__).parent))
from studio_loop import studio


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its threads (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--tabs", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--json", type=Path)
    arguments = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        workspace = Path(folder) / "ws"
        (workspace / "models").mkdir(parents=True)
        shutil.copytree(arguments.model, workspace / "models" / "part")
        with studio(workspace, arguments.data) as url:
            state = httpx.get(f"{url}/studio/api/state").json()
            root = state["roots"][1]
            headers = {"X-CSRF-Token": state["csrf"]}
            for _ in range(arguments.runs):
                body = {"model": "part", "root": root, "path": ""}
                httpx.post(f"{url}/studio/api/runs", json=body, headers=headers, timeout=60)
            deadline = time.monotonic() + 30 * 60
            while any(
                r["state"] != "done" for r in httpx.get(f"{url}/studio/api/state").json()["runs"]
            ):
                assert time.monotonic() < deadline, "the runs did not finish"
                time.sleep(1)
            pid = int(next(p for p in os.listdir("/proc") if p.isdigit() and _is_studio(p, url)))
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=shutil.which("chromium"))
                requests: list[str] = []

                pages = []
                for _ in range(arguments.tabs):
                    page = browser.new_page()
                    page.goto(f"{url}/studio#models")
                    pages.append(page)
                time.sleep(3)  # the first loads are not what a tab costs while it sits
                for page in pages:
                    page.on("request", lambda request: requests.append(request.url))
                before, start = cpu_seconds(pid), time.monotonic()
                samples = []
                while time.monotonic() - start < arguments.seconds:
                    for page in pages:
                        page.wait_for_timeout(1000 / len(pages))
                    samples.append(len(requests))
                elapsed = time.monotonic() - start
                cpu = cpu_seconds(pid) - before
                browser.close()
    result = {
        "tabs": arguments.tabs,
        "runs": arguments.runs,
        "seconds": round(elapsed, 1),
        "requests_per_second_per_tab": round(len(requests) / elapsed / arguments.tabs, 3),
        "studio_cpu_seconds_per_second": round(cpu / elapsed, 4),
        "requests_median_per_second": statistics.median(
            b - a for a, b in zip([0, *samples], samples, strict=False)
        ),
    }
    print(json.dumps(result, indent=2))
    if arguments.json:
        arguments.json.write_text(json.dumps(result, indent=2) + "\n")


def _is_studio(pid: str, url: str) -> bool:
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"studio" in command and url.rsplit(":", 1)[1].encode() in command


if __name__ == "__main__":
    main()

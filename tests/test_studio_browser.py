"""The studio in a real browser: headless Chromium (Debian's ``chromium``) driven by
Playwright, against ``cflowad studio`` running as its own process, clicking through
every view by the controls' accessible names. Set CFLOWAD_SCREENSHOTS=DIR to keep a
picture of each view (docs/studio.md shows them)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from cflowad.data.files import read_json
from cflowad.method.region import decode_region, draw_region, region_at

pytestmark = pytest.mark.slow  # a real browser against studios that train models


def find_chromium() -> str:
    """Debian's chromium (Playwright's own browser download is offline-blocked): installed
    with apt when missing and allowed (root or sudo without a password); otherwise the
    tests fail, saying how to install it. They never skip."""
    found = os.environ.get("CFLOWAD_CHROMIUM") or shutil.which("chromium")
    if found:
        return found
    apt = ["apt-get", "install", "-y", "--no-install-recommends", "chromium"]
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    if shutil.which("apt-get"):
        subprocess.run([*sudo, *apt], capture_output=True, timeout=900)
    return shutil.which("chromium") or ""


FAST = {"decoder": "gaussian", "image_size": "64"}  # a model in seconds
SHOTS = os.environ.get("CFLOWAD_SCREENSHOTS")


@contextlib.contextmanager
def studio(workspace: Path, data: Path, *extra: str) -> Iterator[str]:
    """``cflowad studio`` in its own process on a free port; yields its URL."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = workspace.parent / f"{workspace.name}-{port}.log"
    command = [sys.executable, "-m", "cflowad", "studio", str(workspace), "--allow", str(data)]
    with log.open("w") as output:
        process = subprocess.Popen(
            [*command, "--port", str(port), *extra], stdout=output, stderr=subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, f"studio exited: {log.read_text()}"
            assert time.monotonic() < deadline, f"studio did not start: {log.read_text()}"
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            time.sleep(0.2)
        yield url
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    chromium = find_chromium()
    assert chromium, "the browser tests need chromium: apt-get install chromium"
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=chromium)
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def data(texture_dataset, tmp_path_factory) -> Path:
    """An --allow folder: the texture set, and an empty hot folder."""
    root = tmp_path_factory.mktemp("allowed")
    shutil.copytree(texture_dataset, root / "brick")
    (root / "inbox").mkdir()
    return root


@pytest.fixture(scope="module")
def running(data, tmp_path_factory) -> Iterator[tuple[str, Path]]:
    """One studio for the views' tests, which build on each other in file order."""
    workspace = tmp_path_factory.mktemp("studio") / "ws"
    with studio(workspace, data) as url:
        yield url, workspace


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    opened = context.new_page()
    errors: list[str] = []
    opened.on("pageerror", lambda error: errors.append(str(error)))
    yield opened
    context.close()
    assert not errors, errors


def shot(page: Page, name: str) -> None:
    if SHOTS:
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(SHOTS) / f"{name}.png"), full_page=True)


def pick(page: Page, picker: str, *folders: str, root: str = "allowed") -> None:
    """Choose a folder in a folder picker: its root, then folder after folder."""
    box = page.get_by_label(picker, exact=True)
    box.get_by_label("Folder root").select_option(label=_root_name(page, root))
    for folder in folders:
        box.get_by_role("button", name=f"Open folder {folder}", exact=True).click()
    expect(box.get_by_label("Chosen folder")).to_have_value(
        f"{_root_name(page, root)}/{'/'.join(folders)}"
    )


def _root_name(page: Page, root: str) -> str:
    select = page.get_by_label("Folder root").first
    expect(select.locator("option")).to_have_count(2)  # the roots arrive with the state
    options = select.locator("option").all_text_contents()
    return next(o for o in options if o.startswith(root)) if root != "workspace" else root


def train_in_page(page: Page, name: str, settings: dict[str, str]) -> None:
    form = page.get_by_role("form", name="New training")
    form.get_by_label("Model name").fill(name)
    pick(page, "Folder of good images", "brick")
    form.get_by_text("Settings").click()
    if "decoder" in settings:
        form.get_by_label("Decoder").select_option(settings["decoder"])
    if "image_size" in settings:
        form.get_by_label("Image size").fill(settings["image_size"])
    if "steps" in settings:
        form.get_by_label("Training steps").fill(settings["steps"])
    form.get_by_role("button", name="Start training").click()


def api(url: str, method: str, path: str, **kwargs) -> httpx.Response:
    token = httpx.get(f"{url}/studio/api/state").json()["csrf"]
    return httpx.request(
        method, f"{url}{path}", headers={"X-CSRF-Token": token}, timeout=120, **kwargs
    )


def state_roots(url: str) -> list[str]:
    return httpx.get(f"{url}/studio/api/state").json()["roots"]


def wait_for(condition, seconds: float = 120, what: str = "condition"):
    deadline = time.monotonic() + seconds
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.25)
    return value


def test_a_page_load_logs_no_error(running, browser):
    """0.14.2 asked for the workspace root's sample on every load, and the console showed
    its 400; the page asks only for a folder train would read."""
    url, _ = running
    context = browser.new_context()
    opened = context.new_page()
    logged: list[str] = []
    opened.on("console", lambda message: message.type == "error" and logged.append(message.text))
    opened.goto(f"{url}/studio")
    expect(opened.get_by_label("Folder of good images", exact=True)).to_contain_text("images here")
    opened.wait_for_timeout(1500)  # the sample request, if any, has answered
    context.close()
    assert logged == []


def test_models_view_trains_with_live_progress(running, page):
    url, workspace = running
    page.goto(f"{url}/studio")
    train_in_page(page, "brick", FAST)
    bar = page.get_by_role("progressbar", name="Training brick").first
    expect(bar).to_be_visible()
    expect(page.get_by_role("table", name="Models")).to_contain_text("brick", timeout=120_000)
    expect(bar).to_have_attribute("aria-valuetext", "done (revision 1)", timeout=30_000)
    expect(page.get_by_role("table", name="Models")).to_contain_text("gaussian 64")  # served
    shot(page, "models")
    assert (workspace / "models" / "brick" / "model.json").is_file()  # served, CLI-readable
    # a folder without images is refused on the page, before anything is queued
    form = page.get_by_role("form", name="New training")
    form.get_by_label("Model name").fill("empty")
    pick(page, "Folder of good images", "inbox")
    form.get_by_role("button", name="Start training").click()
    expect(page.get_by_role("alert")).to_contain_text("no images")


def test_an_open_tab_is_sent_the_state_when_it_changes_not_polled(running, browser):
    """0.14.2's page asked GET /studio/api/state every second; now the server pushes the
    state (server-sent events) when it changes: a change made elsewhere (a run queued by
    a script) shows in the tab, and the tab asks for the state once, when it loads."""
    url, _ = running
    context = browser.new_context()
    opened = context.new_page()
    asked: list[str] = []
    opened.on("request", lambda r: "/studio/api/state" in r.url and asked.append(r.url))
    opened.goto(f"{url}/studio#review")
    expect(opened.locator("#run-select")).to_be_attached()
    opened.wait_for_timeout(3000)  # three polls' worth, quiet
    root = httpx.get(f"{url}/studio/api/state").json()["roots"][1]
    queued = api(
        url,
        "POST",
        "/studio/api/runs",
        json={"model": "brick", "root": root, "path": "brick/test/good"},
    ).json()
    expect(opened.locator(f'#run-select option[value="{queued["id"]}"]')).to_be_attached(
        timeout=10_000
    )
    polled = [u for u in asked if not u.endswith("/studio/api/state/events")]
    assert len(polled) == 1, polled  # the first load only; the rest was pushed
    context.close()


def test_a_training_survives_a_reload_and_can_be_cancelled(running, page):
    url, _ = running
    page.goto(f"{url}/studio")
    train_in_page(page, "slow", {"steps": "100000", "image_size": "64"})
    try:
        bar = page.get_by_role("progressbar", name="Training slow").first
        # the first step compiles: minutes on a loaded 2-core host with a cold cache
        expect(bar).to_contain_text("steps/s", timeout=300_000)
        page.reload()
        bar = page.get_by_role("progressbar", name="Training slow").first
        expect(bar).to_contain_text("ETA")  # the progress lives in the workspace, not the page
        page.get_by_role("button", name="Cancel training").click()
        expect(page.get_by_text("cancelled").first).to_be_visible()
    finally:  # a failure here must not leave a 100,000-step training on the shared cores
        for job in httpx.get(f"{url}/studio/api/state").json()["jobs"]:
            if job["model"] == "slow" and job["state"] in ("queued", "running"):
                api(url, "POST", f"/studio/api/trainings/{job['id']}/cancel")
    jobs = httpx.get(f"{url}/studio/api/state").json()["jobs"]
    assert next(j for j in jobs if j["model"] == "slow")["state"] == "cancelled"


def test_review_view_gallery_details_and_marks(running, page):
    url, workspace = running
    page.goto(f"{url}/studio#review")
    form = page.get_by_role("form", name="Score a folder")
    pick(page, "Folder to score", "brick", "test", "patch")
    form.get_by_role("button", name="Score folder").click()
    expect(page.get_by_role("status").filter(has_text="done: 8 of 8")).to_be_visible(timeout=60_000)
    pick(page, "Folder to score", "brick", "test", "good")
    form.get_by_role("button", name="Score folder").click()
    expect(page.locator("#run-select option:checked")).to_contain_text("test/good")
    expect(page.get_by_role("status").filter(has_text="done: 8 of 8")).to_be_visible(timeout=60_000)
    cards = page.locator("#gallery article")
    expect(cards).to_have_count(8)
    scores = [
        float(t.split()[1]) for t in cards.locator(".meta span:first-child").all_inner_texts()
    ]
    assert scores == sorted(scores, reverse=True)
    shot(page, "review")
    # the highest-scoring good image is a false alarm: mark it good on its card
    first = cards.first
    name = first.get_attribute("aria-label")
    first.get_by_role("button", name="Mark good").click()
    expect(page.get_by_role("alert")).to_contain_text("(saved)")
    marks = (workspace / "feedback.jsonl").read_text().splitlines()
    assert json.loads(marks[-1])["mark"] == "good" and marks[-1].count(name or "?")
    # the detail view: image, heat map, overlay; mark from there too
    cards.nth(1).get_by_role("button", name="Details").click()
    dialog = page.get_by_role("dialog", name="Details")
    expect(dialog).to_be_visible()
    for alt in ("image", "heat map", "overlay"):
        expect(dialog.get_by_role("img", name=alt, exact=True)).to_have_js_property(
            "complete", True
        )
    dialog.get_by_label("Zoom").fill("2")
    shot(page, "review-detail")
    dialog.get_by_role("button", name="Mark good").click()
    expect(dialog.get_by_role("button", name="Mark good")).to_have_attribute("aria-pressed", "true")
    dialog.get_by_role("button", name="Close").click()
    # filters: marked only, then the marks survive a reload
    page.get_by_label("Marks").select_option("marked")
    expect(cards).to_have_count(2)
    page.reload()
    page.get_by_label("Marks").select_option("marked")
    expect(cards).to_have_count(2)
    expect(cards.first).to_contain_text("marked good")
    page.get_by_label("Marks").select_option("any")
    page.get_by_label("Decision").select_option("anomalous")
    anomalous = cards.count()
    assert all("anomalous" in t for t in cards.locator(".meta").all_inner_texts()[:anomalous])
    # mark two defects in the other run
    page.get_by_label("Decision").select_option("all")
    patch_run = page.get_by_label("Scored run").locator("option", has_text="patch")
    page.get_by_label("Scored run").select_option(patch_run.get_attribute("value"))
    expect(cards).to_have_count(8)
    for k in range(2):
        cards.nth(k).get_by_role("button", name="Mark defective").click()
        expect(cards.nth(k).get_by_role("button", name="Mark defective")).to_have_attribute(
            "aria-pressed", "true"
        )


def test_threshold_view_slider_and_save(running, page):
    url, workspace = running
    page.goto(f"{url}/studio#threshold")
    readout = page.get_by_role("status").filter(has_text="held-out false-positive rate")
    expect(readout).to_contain_text("of 16 reviewed images change decision")
    expect(readout).to_contain_text("0 of 16")
    slider = page.get_by_role("slider", name="Threshold")
    slider.fill("0")  # everything above: every reviewed image that was normal now changes
    expect(readout).not_to_contain_text("0 of 16")
    expect(readout).to_contain_text("false-positive rate 100.00 %")
    slider.fill("500")
    text = readout.inner_text()
    raw = float(text.split()[1])
    shot(page, "threshold")
    before = httpx.get(f"{url}/v1/models/brick").json()
    page.get_by_role("button", name="Save threshold").click()
    expect(page.get_by_role("alert")).to_contain_text("now served")
    served = wait_for(
        lambda: (
            (m := httpx.get(f"{url}/v1/models/brick").json())["image_threshold_raw"]
            != (before["image_threshold_raw"])
            and m
        ),
        30,
        "the new threshold to be served",
    )
    assert served["image_threshold_raw"] == pytest.approx(raw, rel=1e-5)
    assert served["image_threshold"] == 0.5  # the readable scale followed
    history = [
        json.loads(line)
        for line in (workspace / "revisions" / "brick" / "history.jsonl").read_text().splitlines()
    ]
    assert history[-2]["kind"] == "threshold" and history[-1]["event"] == "promoted"
    assert (workspace / "revisions" / "brick" / "r0001").is_dir()  # the old one is kept


def test_feedback_view_retrain_compare_promote(running, page):
    url, workspace = running
    page.goto(f"{url}/studio#feedback")
    expect(page.get_by_text("2 images marked good, 2 marked defective")).to_be_visible()
    page.get_by_role("button", name="Retrain with feedback").click()
    expect(page.get_by_role("alert")).to_contain_text("with 2 images marked good")
    wait_for(
        lambda: any(
            j["kind"] == "feedback" and j["state"] == "done"
            for j in httpx.get(f"{url}/studio/api/state").json()["jobs"]
        ),
        120,
        "the retraining",
    )
    candidate = max(
        int(p.name[1:]) for p in (workspace / "revisions" / "brick").glob("r0*") if p.is_dir()
    )
    # promoting before the comparison is refused
    refused = api(url, "POST", "/studio/api/models/brick/promote", json={"revision": candidate})
    assert refused.status_code == 400 and "compared" in refused.json()["error"]
    page.reload()
    page.get_by_role("button", name=f"Compare revision {candidate}").click()
    table = page.get_by_role("table", name="Old and new revision")
    expect(table.locator("tr")).to_have_count(5)  # 4 marked images
    expect(page.get_by_role("status").filter(has_text="false alarms")).to_be_visible()
    shot(page, "feedback-compare")
    page.get_by_role("button", name="Promote").click()
    expect(page.get_by_role("alert")).to_contain_text(
        f"revision {candidate} of brick is now served"
    )
    state = httpx.get(f"{url}/studio/api/state").json()
    assert next(m for m in state["models"] if m["name"] == "brick")["revision"] == candidate


def test_live_view_hot_folder(running, page, data):
    url, _ = running
    page.goto(f"{url}/studio#live")
    form = page.get_by_role("form", name="Attach a source")
    pick(page, "Hot folder", "inbox")
    form.get_by_role("button", name="Attach source").click()
    source = page.get_by_label(
        "Source allowed/inbox".replace("allowed", _root_name(page, "allowed"))
    )
    expect(source).to_be_visible()
    for k, image in enumerate(sorted((data / "brick" / "test" / "patch").iterdir())[:3]):
        shutil.copy(image, data / "inbox" / f"part{k}.png")
    expect(source.get_by_role("status")).to_contain_text("3 scored", timeout=60_000)
    expect(source.get_by_role("img", name="newest frame", exact=False)).to_have_js_property(
        "complete", True
    )
    expect(source.get_by_role("list", name="Events").locator("li")).not_to_have_count(0)
    shot(page, "live")
    page.reload()  # the source runs on without the page
    source = page.get_by_label(
        "Source allowed/inbox".replace("allowed", _root_name(page, "allowed"))
    )
    shutil.copy(sorted((data / "brick" / "test" / "good").iterdir())[0], data / "inbox" / "g.png")
    expect(source.get_by_role("status")).to_contain_text("4 scored", timeout=60_000)
    source.get_by_role("button", name="Detach source").click()
    expect(source).to_have_count(0)


def test_dropped_images_are_scored(running, page, data):
    url, workspace = running
    page.goto(f"{url}/studio#review")
    files = sorted((data / "brick" / "test" / "patch").iterdir())[:2]
    page.get_by_label("Add images").set_input_files([str(f) for f in files])
    expect(page.locator("#run-select option:checked")).to_contain_text("dropped")
    expect(page.locator("#gallery article")).to_have_count(2, timeout=60_000)
    saved = sorted(p.name for p in (workspace / "uploads").glob("*/*.png"))
    assert saved == sorted(f.name for f in files)


def test_errors_are_shown_on_the_page(running, page, data):
    """A training that fails shows its log's tail; a broken model file and a source that
    cannot be opened say why; two tabs see the same state."""
    url, workspace = running
    page.goto(f"{url}/studio")
    train_in_page(page, "broken-settings", {"image_size": "33"})  # not a multiple of 32
    failed = page.locator(".job").filter(has_text="broken-settings").first
    expect(failed).to_contain_text("failed", timeout=90_000)
    expect(failed.locator("pre")).to_contain_text("image", timeout=10_000)
    broken = workspace / "models" / "damaged"
    broken.mkdir()
    (broken / "model.json").write_text('{"format": "cflowad-model", "format_version": 3}')
    (broken / "model.safetensors").write_bytes(b"not weights")
    expect(page.get_by_role("table", name="Models")).to_contain_text(
        "does not load", timeout=30_000
    )
    other = page.context.new_page()  # a second tab sees the same trainings
    other.goto(f"{url}/studio")
    expect(other.locator(".job").filter(has_text="broken-settings").first).to_contain_text("failed")
    other.close()
    page.get_by_role("tab", name="Live").click()
    form = page.get_by_role("form", name="Attach a source")
    form.get_by_label("Source kind").select_option("stream")
    form.get_by_label("Stream source").fill("rtsp://127.0.0.1:9/none")
    form.get_by_role("button", name="Attach source").click()
    source = page.get_by_label("Source rtsp://127.0.0.1:9/none")
    expect(source.get_by_role("status")).to_contain_text("failed", timeout=60_000)
    source.get_by_role("button", name="Detach source").click()
    shutil.rmtree(broken)


def test_a_file_linked_outside_is_refused_on_the_page(running, page, data, tmp_path):
    """A symbolic link *file* in an allowed folder that leads outside: not counted by
    the picker, refused when the folder is scored (on the page and the API), and never
    scored or served as a picture (0.14.2 listed, scored and served it)."""
    url, _ = running
    secret = tmp_path / "secret.png"
    shutil.copy(sorted((data / "brick" / "test" / "good").iterdir())[0], secret)
    linked = data / "linked"
    linked.mkdir()
    shutil.copy(sorted((data / "brick" / "test" / "good").iterdir())[1], linked / "a.png")
    (linked / "b.png").symlink_to(secret)
    before = {r["id"] for r in httpx.get(f"{url}/studio/api/state").json()["runs"]}
    page.goto(f"{url}/studio#review")
    pick(page, "Folder to score", "linked")
    box = page.get_by_label("Folder to score", exact=True)
    expect(box).to_contain_text("1 images here")  # the link is not counted
    page.get_by_role("form", name="Score a folder").get_by_role(
        "button", name="Score folder"
    ).click()
    expect(page.get_by_role("alert")).to_contain_text("b.png: a symbolic link that leads outside")
    root = _root_name(page, "allowed")
    refused = api(
        url, "POST", "/studio/api/runs", json={"model": "brick", "root": root, "path": "linked"}
    )
    assert refused.status_code == 400 and "symbolic link" in refused.json()["error"]
    browsed = httpx.get(f"{url}/studio/api/browse", params={"root": root, "path": "linked"})
    assert browsed.json()["images"] == 1 and browsed.json()["files"] == ["a.png"]
    sample = httpx.get(f"{url}/studio/api/sample", params={"root": root, "path": "linked"})
    assert sample.status_code == 400
    after = {r["id"] for r in httpx.get(f"{url}/studio/api/state").json()["runs"]}
    assert after == before  # nothing queued, so no picture of the secret exists
    shutil.rmtree(linked)


def test_security_csrf_paths_and_errors(running):
    url, _ = running
    no_token = httpx.post(
        f"{url}/studio/api/trainings", json={"name": "x", "root": "workspace", "path": ""}
    )
    assert no_token.status_code == 403 and "CSRF" in no_token.json()["error"]
    for path in ("../..", "/etc", "models/../../.."):
        refused = httpx.get(f"{url}/studio/api/browse", params={"root": "workspace", "path": path})
        assert refused.status_code == 400 and "error" in refused.json()
    unknown_root = httpx.get(f"{url}/studio/api/browse", params={"root": "etc", "path": ""})
    assert unknown_root.status_code == 400
    traversal = api(
        url, "POST", "/studio/api/runs", json={"model": "brick", "root": "workspace", "path": "../"}
    )
    assert traversal.status_code == 400
    stray = httpx.get(f"{url}/studio/api/runs/..%2F..%2Fetc/pictures/0/card")
    assert stray.status_code in (400, 404)
    bad_file = api(
        url, "POST", "/studio/api/uploads?model=brick", files={"image": ("x.png", b"not an image")}
    )
    assert bad_file.status_code == 400 and "x.png" in bad_file.json()["error"]
    too_big = api(
        url,
        "POST",
        "/studio/api/uploads?model=brick",
        files={"image": ("x.png", b"0" * (51 * 2**20))},
    )
    assert too_big.status_code == 413


def test_login_with_an_api_key(data, tmp_path, browser):
    key = tmp_path / "key"
    key.write_text("s3cret-key")
    with studio(tmp_path / "ws", data, "--api-key-file", str(key)) as url:
        assert httpx.get(f"{url}/studio/api/state").status_code == 401
        assert httpx.get(f"{url}/v1/models").status_code == 401
        bearer = {"Authorization": "Bearer s3cret-key"}
        assert httpx.get(f"{url}/studio/api/state", headers=bearer).status_code == 200
        context = browser.new_context()
        page = context.new_page()
        page.goto(f"{url}/studio")
        expect(page.get_by_role("form", name="Log in")).to_be_visible()  # redirected
        page.get_by_label("API key").fill("wrong")
        page.get_by_role("button", name="Log in").click()
        expect(page.get_by_role("alert")).to_contain_text("Wrong key")
        page.get_by_label("API key").fill("s3cret-key")
        page.get_by_role("button", name="Log in").click()
        expect(page.get_by_role("tab", name="Models")).to_be_visible()
        cookie = next(c for c in context.cookies() if c["name"] == "cflowad_studio")
        assert cookie["httpOnly"]
        context.close()
    refused = subprocess.run(
        [sys.executable, "-m", "cflowad", "studio", str(tmp_path / "ws2"), "--host", "0.0.0.0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 2 and "--api-key-file" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_kill_9_resumes_where_it_was(data, tmp_path, browser):
    workspace = tmp_path / "ws"
    with studio(workspace, data) as url:
        queued = api(
            url,
            "POST",
            "/studio/api/trainings",
            json={"name": "kept", "root": data.name, "path": "brick", "settings": FAST},
        )
        assert queued.status_code == 200, queued.text
        wait_for(lambda: httpx.get(f"{url}/v1/models/kept").status_code == 200, 120, "the model")
        scoring = api(
            url,
            "POST",
            "/studio/api/runs",
            json={"model": "kept", "root": data.name, "path": "brick/test/good"},
        )
        assert scoring.status_code == 200, scoring.text
        slow = api(
            url,
            "POST",
            "/studio/api/trainings",
            json={
                "name": "slow",
                "root": data.name,
                "path": "brick",
                "settings": {"steps": "300", "image_size": "64", "compile_training": "false"},
            },
        ).json()
        wait_for(
            lambda: (workspace / "jobs" / slow["id"] / "progress.json").is_file(), 120, "training"
        )
        pid = int(subprocess.check_output(["pgrep", "-f", f"studio {workspace}"]).split()[0])
        os.kill(pid, signal.SIGKILL)  # the studio dies mid-training
        time.sleep(0.5)
    with studio(workspace, data) as url:
        page = browser.new_page()
        page.goto(f"{url}/studio")
        expect(page.get_by_role("table", name="Models")).to_contain_text("kept")
        expect(page.get_by_role("table", name="Models")).to_contain_text("slow", timeout=400_000)
        page.get_by_role("tab", name="Review").click()
        expect(page.locator("#gallery article")).to_have_count(8)
        page.close()
    jobs = [json.loads((f / "job.json").read_text()) for f in (workspace / "jobs").iterdir()]
    assert sorted(j["state"] for j in jobs) == ["done", "done"]


def test_live_sources_and_api_answers_are_published(data, tmp_path, webhook):
    """--publish on the studio: a hot folder's decisions and a /v1 answer reach a webhook,
    through WORKSPACE/spool."""
    from cflowad.engine.model import CFlowAD

    workspace, inbox = tmp_path / "ws", data / "inbox-published"
    inbox.mkdir()
    model = CFlowAD(decoder="gaussian", image_size=64, image_fpr=0.2, seed=0).fit(data / "brick")
    model.save(workspace / "models" / "quick")
    receiver = webhook()
    hook = f"http://127.0.0.1:{receiver.port}/hook"
    with studio(workspace, data, "--publish", hook, "--publish-what", "all") as url:
        wait_for(lambda: httpx.get(f"{url}/v1/models/quick").status_code == 200, 60, "model")
        attached = api(
            url,
            "POST",
            "/studio/api/sources",
            json={"kind": "folder", "model": "quick", "target": f"{data.name}/{inbox.name}"},
        )
        assert attached.status_code == 200, attached.text
        images = sorted((data / "brick" / "test" / "patch").iterdir())[:2]
        for k, image in enumerate(images):
            shutil.copy(image, inbox / f"part{k}.png")
        answer = httpx.post(
            f"{url}/v1/models/quick/predict",
            content=images[0].read_bytes(),
            headers={"content-type": "image/png"},
        ).json()
        wait_for(lambda: len(receiver.received) >= 3, 60, "three messages")
    messages = receiver.messages()
    assert {m["origin"] for m in messages} == {"studio"} and {m["model"] for m in messages} == {
        "quick"
    }
    assert sorted(m["file"] for m in messages if "file" in m) == ["part0.png", "part1.png"]
    assert [m["score"] for m in messages if "file" not in m] == [answer["score"]]
    assert (workspace / "spool").is_dir()


def test_the_region_is_drawn_on_a_sample_and_trained_with(running, page):
    url, workspace = running
    page.goto(f"{url}/studio")
    form = page.get_by_role("form", name="New training")
    form.get_by_label("Model name").fill("boxed")
    pick(page, "Folder of good images", "brick")
    form.get_by_text("Settings").click()
    canvas = page.get_by_label("Sample image: draw the region on it")
    expect(canvas).to_be_visible()
    box = canvas.bounding_box()
    assert box is not None

    def at(fx: float, fy: float) -> tuple[float, float]:  # a point of the sample, in fractions
        return box["x"] + fx * box["width"], box["y"] + fy * box["height"]

    # drag from a tenth to six tenths of the sample: pixels 12 to 77 of a 128-pixel image
    page.mouse.move(*at(0.1, 0.1))
    page.mouse.down()
    page.mouse.move(*at(0.6, 0.6), steps=5)
    page.mouse.up()
    summary = form.get_by_label("Region drawn")
    drawn = summary.text_content() or ""
    assert drawn.startswith("box ")
    x, y, w, h = (int(v) for v in drawn.removeprefix("box ").split(","))
    assert abs(x - 12.8) <= 1.5 and abs(y - 12.8) <= 1.5 and abs(w - 64) <= 2 and abs(h - 64) <= 2
    # cut a triangle out of the box: three clicks, and a double-click on the last corner
    form.get_by_label("Polygon").check()
    form.get_by_label("Cut out").check()
    page.mouse.click(*at(0.2, 0.2))
    page.mouse.click(*at(0.5, 0.2))
    page.mouse.dblclick(*at(0.2, 0.5))
    expect(summary).to_have_text(f"box {x},{y},{w},{h}, less polygon of 3 corners")
    shot(page, "region")
    form.get_by_label("Decoder").select_option("gaussian")
    form.get_by_label("Image size").fill("64")
    form.get_by_role("button", name="Start training").click()
    meta_file = workspace / "models" / "boxed" / "model.json"
    wait_for(meta_file.is_file, what="the boxed model")
    meta = json.loads(meta_file.read_text())
    triangle = (0.3 * 128) ** 2 / 2
    assert meta["training"]["region_inside"] == pytest.approx((w * h - triangle) / 128**2, abs=0.03)
    # the model holds what the page drew, as cflowad.method.region rasterizes it
    (job,) = [j for j in map(read_json, workspace.glob("jobs/*/job.json")) if j["model"] == "boxed"]
    sent = job["settings"]["region"]
    assert (sent["width"], sent["height"]) == (128, 128) and len(sent["shapes"]) == 2
    expected = region_at(draw_region(sent, 128, 128), (64, 64))
    assert np.array_equal(decode_region(meta["region"]), expected)
    assert not expected[16, 16] and expected[35, 35] and not expected[5, 5]
    # a region that is not a box or shapes, or that is empty, is refused before anything
    # is queued
    root = next(r for r in state_roots(url) if r.startswith("allowed"))
    square = [[0, 0], [10, 0], [10, 10], [0, 10]]
    nothing = {"shapes": [{"points": square}, {"points": square, "exclude": True}]}
    for region, message in (("/etc/passwd", "x,y,w,h"), (nothing, "empty")):
        settings = {"region": region}
        body = {"name": "bad", "root": root, "path": "brick", "settings": settings}
        answer = api(url, "POST", "/studio/api/trainings", json=body)
        assert answer.status_code in (400, 422) and message in answer.text

"""One real-browser run of the lab loop with the internet blocked: Debian chromium drives a live server.

Generates from the tiny checkpoint on the Sample page (after checking that Enter in a form field starts nothing),
opens a sample with View and checks its dialog is on screen and the 3Dmol canvas drew the crystal (pixels that
are not background), runs a two-prompt sweep on Compare and reads its table, and screenshots every page into
``test-output/screenshots/``. Every request to a host other than 127.0.0.1/localhost is aborted and recorded,
so any CDN or telemetry dependency fails the test.
"""

from __future__ import annotations

import io
import shutil
import time
from urllib.parse import urlparse

import pytest
from PIL import Image
from playwright.sync_api import Error as PlaywrightError

from engine.lab import jobs
from engine.lab.settings import REPO_ROOT

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(420)]  # 5 min on a quiet machine; load 9 took longer

SHOTS = REPO_ROOT / "test-output" / "screenshots"
JOB_TIMEOUT_MS = 150_000


def _browser(playwright):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.fail("Debian's chromium is not installed: run `apt-get install chromium` (.ci/run does this as root)")
    # SwiftShader gives headless chromium a software WebGL, which 3Dmol.js needs to draw.
    return playwright.chromium.launch(executable_path=chromium, headless=True,
                                      args=["--no-sandbox", "--use-angle=swiftshader", "--enable-unsafe-swiftshader"])


def _idle(page) -> None:
    """Wait until Streamlit has finished the current script run."""
    page.wait_for_selector("[data-testid='stApp'][data-test-script-state='notRunning']", timeout=60_000)


def _open(page, url: str, title: str) -> None:
    page.goto(url)
    page.get_by_role("heading", name=title).first.wait_for(timeout=60_000)
    _idle(page)


def _fill(page, label: str, value: str) -> None:
    box = page.get_by_label(label, exact=True)
    box.fill(value)
    box.press("Tab")  # blur commits the value; Enter inside a form would submit it early


def _wait_job(job_dir, timeout_s: float = JOB_TIMEOUT_MS / 1000) -> dict:
    deadline = time.monotonic() + timeout_s
    while (state := jobs.job_state(job_dir))["state"] == "running":
        if time.monotonic() > deadline:
            jobs.request_stop(job_dir, grace_s=0)
            raise AssertionError(f"{job_dir.name} still running after {timeout_s} s:\n{jobs.tail_log(job_dir)}")
        time.sleep(0.5)
    return state


def _viewer_pixels(page, attempts: int = 3) -> float:
    """Share of non-background pixels in the 3Dmol canvas (retried if a rerun replaces the iframe)."""
    from playwright.sync_api import Error

    viewer = "#crystal canvas"
    for attempt in range(attempts):
        try:
            frames = [f for f in page.frames if f.query_selector(viewer)]
            assert frames, "no 3Dmol viewer on the page"
            canvas = frames[0].locator(viewer).first
            canvas.wait_for(timeout=30_000)
            page.wait_for_timeout(1500)  # let 3Dmol finish its first render
            return _non_white_fraction(canvas.screenshot())
        except Error:
            if attempt == attempts - 1:
                raise
            _idle(page)
    raise AssertionError("unreachable")


def _non_white_fraction(png: bytes) -> float:
    img = Image.open(io.BytesIO(png)).convert("RGB")
    pixels = list(img.get_flattened_data())
    return sum(1 for r, g, b in pixels if min(r, g, b) < 235) / len(pixels)


def _sample_and_view(page, url: str, runs) -> None:
    """Sample page: generate 4 crystals from the tiny checkpoint and check the 3D view drew one."""
    _open(page, f"{url}/sample", "Sample")
    _fill(page, "Z (0: try 1,2,3,4,6,8)", "4")
    _idle(page)
    temperature = page.get_by_role("slider").first
    temperature.focus()
    for _ in range(10):  # 0.8 -> 0.3 in steps of 0.05
        temperature.press("ArrowLeft")
    _fill(page, "Samples per prompt", "4")
    _fill(page, "Max new tokens", "300")
    _fill(page, "Sample set name", "e2e-nacl")
    # A person confirms a field with Enter: that must not start a job (only the Generate button does).
    page.get_by_label("Seed", exact=True).press("Enter")
    page.wait_for_timeout(1500)
    _idle(page)
    assert not (runs / "jobs" / "sample" / "e2e-nacl").exists() and page.get_by_text("Generating").count() == 0
    page.get_by_role("button", name="Generate").click()
    page.get_by_text("Generating e2e-nacl").first.wait_for(timeout=60_000)
    state = _wait_job(runs / "jobs" / "sample" / "e2e-nacl")
    assert state["state"] == "finished", jobs.tail_log(runs / "jobs" / "sample" / "e2e-nacl")
    # The page notices by itself (its live fragment reruns the app) and selects the new set.
    page.get_by_text("prompt Na4Cl4 | temperature 0.3").first.wait_for(timeout=30_000)
    _idle(page)
    # View opens the crystal where the user is looking: scroll to the gallery as a person does, click View,
    # and the dialog with the 3D view is on screen without scrolling.
    view = page.get_by_role("button", name="View").first
    for attempt in range(3):  # the live fragment may re-render the gallery between finding the button and scrolling
        try:
            view.scroll_into_view_if_needed()
            view.click()
            break
        except PlaywrightError as exc:
            if "not attached" not in str(exc) or attempt == 2:
                raise
            _idle(page)
    dialog = page.get_by_role("dialog")
    dialog.wait_for(timeout=30_000)
    from playwright.sync_api import expect

    expect(dialog).to_be_in_viewport()
    frame = dialog.locator("iframe").first
    frame.wait_for(timeout=30_000)
    expect(frame).to_be_in_viewport(ratio=0.3)
    # The 3D view lives in an iframe; its WebGL canvas must show the crystal, not just background.
    drawn = _viewer_pixels(page)
    assert drawn > 0.01, f"the 3Dmol canvas is blank ({drawn:.3%} non-background pixels)"
    page.screenshot(path=SHOTS / "sample.png")
    page.keyboard.press("Escape")  # close the dialog as a person does


def _sweep(page, url: str, runs) -> str:
    """Compare page: run a two-prompt sweep and return the text of its first table."""
    _open(page, f"{url}/compare", "Compare")
    page.get_by_text("Run a sweep").first.click()  # the expander is collapsed once a sweep exists
    _fill(page, "Sweep name", "e2e-sweep")
    _fill(page, "Prompts (one per line)", "Na4Cl4\nK4Cl4")
    _fill(page, "Samples per cell", "1")
    _fill(page, "Max new tokens", "300")
    page.get_by_role("button", name="Run sweep").click()
    page.get_by_text("e2e-sweep: running").first.wait_for(timeout=60_000)
    state = _wait_job(runs / "jobs" / "sweep" / "e2e-sweep")
    assert state["state"] == "finished", jobs.tail_log(runs / "jobs" / "sweep" / "e2e-sweep")
    page.get_by_text("e2e-sweep: finished").first.wait_for(timeout=30_000)
    _idle(page)
    table = page.locator("[data-testid='stTable']").first
    table.wait_for()
    page.screenshot(path=SHOTS / "compare.png", full_page=True)
    return table.inner_text()


def test_sample_view_and_sweep_offline(server):
    from playwright.sync_api import sync_playwright

    url, runs = server
    SHOTS.mkdir(parents=True, exist_ok=True)
    blocked: list[str] = []

    def only_local(route):
        request_url = route.request.url
        if urlparse(request_url).hostname in ("127.0.0.1", "localhost") or request_url.startswith(("data:", "blob:")):
            route.continue_()
        else:
            blocked.append(request_url)
            route.abort()

    with sync_playwright() as p:
        browser = _browser(p)
        context = browser.new_context(viewport={"width": 1500, "height": 1100})
        context.route("**/*", only_local)
        page = context.new_page()
        try:
            _sample_and_view(page, url, runs)
            text = _sweep(page, url, runs)
            for name, path, title in (("home", "", "crystallab"), ("data", "data", "Data"),
                                      ("train", "train", "Train"), ("structure", "structure", "Structure"),
                                      ("csp", "csp", "Structure prediction")):
                _open(page, f"{url}/{path}", title)  # every page's own address opens it ...
                page.wait_for_timeout(1000)
                assert page.get_by_text("Page not found").count() == 0, name  # ... with no "not found" dialog
                page.screenshot(path=SHOTS / f"{name}.png", full_page=True)
        except BaseException:
            page.screenshot(path=SHOTS / "failure.png", full_page=True)  # what the user saw when it failed
            raise
        finally:
            browser.close()

    assert not blocked, f"the dashboard tried to reach the internet: {blocked[:5]}"
    assert (runs / "sweeps" / "e2e-sweep" / "summary.csv").exists()
    assert "Na4Cl4" in text and "K4Cl4" in text, text[:500]

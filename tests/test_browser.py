"""End to end: `saelab app` on a free localhost port, read by Debian's headless chromium through Playwright.

Opens the overview, the feature list, a dashboard by URL and the diffing page, checks what they
show, hovers a token and reads its activation, types a prompt into the inspector, steers (one
generation side by side and a short strength sweep), and saves a screenshot of each page (to
`$SAELAB_E2E_SHOTS`, else the test's temp dir). `$SAELAB_E2E_STORE`
points it at another store (the README's screenshots come from the demo store). Without chromium
it skips, except under CI, where it fails: `.ci/run` installs the browser.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from saelab.app import serving
from saelab.store import FeatureStore

PROMPT = "Now is the winter of our discontent made glorious summer by this sun of York."
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
        "--disable-component-update", "--no-first-run"]  # fmt: skip


def _browser_or_skip() -> None:
    missing = [
        what for what, ok in (("chromium", Path(CHROMIUM).exists()), ("playwright", _has_playwright())) if not ok
    ]
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the browser test, but {' and '.join(missing)} is missing (see .ci/run)")
        pytest.skip(f"{' and '.join(missing)} not installed")


def _has_playwright() -> bool:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture
def served(request, tmp_path):
    """(base URL, store path) of `saelab app` serving the store under test, stopped afterwards."""
    store = Path(os.environ.get("SAELAB_E2E_STORE") or request.getfixturevalue("app_store"))
    with serving(store, log=tmp_path / "app.log") as base:
        yield base, store


def _finished(page) -> str:
    """Wait until Streamlit's script run is over and the page holds no skeletons; return its main text."""
    page.wait_for_selector('[data-testid="stApp"][data-test-script-state="notRunning"]', timeout=60_000)
    page.wait_for_function("!document.querySelector('[data-testid=\"stSkeleton\"]')", timeout=60_000)
    page.wait_for_timeout(300)
    return page.inner_text('[data-testid="stMain"]')


def test_the_app_in_a_real_browser(served, tmp_path) -> None:
    _browser_or_skip()
    from playwright.sync_api import sync_playwright

    base, store = served
    shots = Path(os.environ.get("SAELAB_E2E_SHOTS") or tmp_path / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)
    with FeatureStore(store) as fs:
        ids = fs.sae_ids()
        sae = next((s for s in ids if not fs.diffing_counts(s)), ids[0])
        crosscoder = next((s for s in ids if fs.diffing_counts(s)), None)
        top = fs.feature_list(sae, "max_act", limit=1).rows[0]
        dash = fs.dashboard(sae, top.feature)
    timings = {}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1500})

        page.goto(f"{base}/?sae={sae}")
        text = _finished(page)
        assert "Feature store" in text and sae in text and "Training curves" in text
        page.screenshot(path=shots / "overview.png", full_page=True)

        page.goto(f"{base}/features?sae={sae}&sort=density")
        text = _finished(page)
        assert f"Features of {sae}" in text and "features match" in text
        page.screenshot(path=shots / "features.png", full_page=True)

        t0 = time.perf_counter()
        page.goto(f"{base}/feature?sae={sae}&id={top.feature}")
        text = _finished(page)
        timings["dashboard"] = time.perf_counter() - t0
        assert f"feature #{top.feature}" in text and f"{top.max_act:.4g}" in text
        peak = page.locator(".sl-tok.peak").first
        peak.hover()
        tip = peak.get_attribute("data-tip")
        shown = page.evaluate("e => getComputedStyle(e, '::after').content", peak.element_handle())
        ex = dash.top_examples[0]
        assert tip is not None and f"act {ex.act:.3f}" in tip and f"id {ex.token_ids[ex.index]}" in tip
        assert f"act {ex.act:.3f}" in shown  # the hover box the reader sees
        page.screenshot(path=shots / "dashboard.png", full_page=True)

        page.goto(f"{base}/inspect?sae={sae}")
        _finished(page)
        box = page.get_by_role("textbox", name="Prompt")
        box.fill(PROMPT)
        box.press("Control+Enter")  # what a reader types to run it
        page.wait_for_selector(".sl-tok", timeout=120_000)
        text = _finished(page)
        assert "Features at token" in text and "text=" in page.url  # the prompt is in the shareable URL
        page.screenshot(path=shots / "inspector.png", full_page=True)

        # Steer with the dashboard's feature: one generation side by side, then a short sweep.
        page.goto(f"{base}/steer?sae={sae}&f={top.feature}:4&prompt=The%20king%20said&n=12&sweep=0,2,4&tokens=256")
        _finished(page)
        page.get_by_role("button", name="Generate").click()
        page.wait_for_selector("text=unsteered", timeout=120_000)
        text = _finished(page)
        assert "unsteered" in text and "steered" in text
        page.get_by_role("button", name="Measure").click()
        page.wait_for_selector("text=Save as", timeout=180_000)
        text = _finished(page)
        assert "delta_logprob" in text or "KL" in text
        page.set_viewport_size({"width": 1400, "height": 2400})  # the page scrolls inside the app's frame
        page.screenshot(path=shots / "steering.png", full_page=True)
        page.set_viewport_size({"width": 1400, "height": 1500})

        page.goto(f"{base}/feature?sae={sae}&id=-5")
        assert "out of range" in _finished(page)

        page.goto(f"{base}/diffing?sae={crosscoder or sae}")
        text = _finished(page)
        if crosscoder:
            assert "Model diffing" in text and "Latent Scaling" in text and "Leaning most to B" in text
            page.screenshot(path=shots / "diffing.png", full_page=True)
        else:
            assert "not a two-source crosscoder" in text
        browser.close()
    print(f"navigation to a painted dashboard: {timings['dashboard']:.2f} s")

"""Server-side time of each app page's script run on the 65,536-feature synthetic store, plus text
search latency and, where chromium is installed, the time from navigation to a painted dashboard.

    python bench/app_render.py                         # full size (builds the store of bench/store_query.py)
    python bench/app_render.py --store s.duckdb --keep # reuse a built store
    taskset -c 0,1 python bench/app_render.py          # the 2 cores the targets are set for

Targets: each page's script run <= 1 s; text search p95 <= 50 ms.
Results go to bench/results/app_render-cpu-<commit>.{md,json}.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("STREAMLIT_LOGGER_LEVEL", "error")  # AppTest warns once per run otherwise

import numpy as np
from _common import ROOT, save_results
from store_query import SAE_ID, VOCAB, build
from streamlit.testing.v1 import AppTest

from saelab.app import MAIN, STORE_ENV, serving
from saelab.store import FeatureStore

PAGE_TARGET_S = 1.0
SEARCH_TARGET_MS = 50.0

PAGES = {
    "overview": (None, {}),
    "features: first page": ("views/features.py", {}),
    "features: a middle page sorted by max_act asc": (
        "views/features.py",
        {"sort": "max_act", "order": "asc", "page": "MIDDLE_PAGE"},
    ),
    "features: text search": ("views/features.py", {"q": "tok123", "by": "text"}),
    "features: token search": ("views/features.py", {"q": "tok4567", "by": "token"}),
    "feature dashboard": ("views/feature.py", {"id": "FEATURE"}),
}
"""Pages timed: (page script, URL parameters); FEATURE / MIDDLE_PAGE: a feature / list page in the middle."""


def time_page(path: str | None, params: dict[str, str], n: int) -> list[float]:
    """Seconds of `n` script runs of one page (after a warm-up run), each in a fresh session."""
    times = []
    for i in range(n + 1):
        at = AppTest.from_file(str(MAIN), default_timeout=120)
        at.query_params["sae"] = SAE_ID
        if path is not None:
            at.run()
            at.switch_page(path)
            for k, v in {"sae": SAE_ID, **params}.items():
                at.query_params[k] = v
        t0 = time.perf_counter()
        at.run()
        took = time.perf_counter() - t0
        if at.exception or at.error:
            raise SystemExit(f"{path}: {[e.value for e in [*at.exception, *at.error]]}")
        if i:
            times.append(took)
    return times


def time_search(store: Path, n: int, seed: int = 2) -> list[float]:
    """Milliseconds of `n` text searches for random tokens."""
    rng = np.random.default_rng(seed)
    with FeatureStore(store) as fs:
        for _ in range(5):
            fs.search(SAE_ID, "tok1")
        out = []
        for _ in range(n):
            text = f"tok{int(rng.integers(0, VOCAB))}"
            t0 = time.perf_counter()
            fs.search(SAE_ID, text)
            out.append((time.perf_counter() - t0) * 1e3)
    return out


def browser_dashboard(store: Path, n: int) -> list[float] | None:
    """Seconds from navigation to a painted dashboard in headless chromium (None without it)."""
    chromium = shutil.which("chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        return None
    if chromium is None:
        return None
    with serving(store) as base:
        out = []
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1400, "height": 1500})
            for i in range(n + 1):
                t0 = time.perf_counter()
                page.goto(f"{base}/feature?sae={SAE_ID}&id={1000 + i}")
                page.wait_for_selector(".sl-tok.peak", timeout=60_000)
                page.wait_for_selector('[data-testid="stApp"][data-test-script-state="notRunning"]', timeout=60_000)
                page.evaluate("() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")
                if i:
                    out.append(time.perf_counter() - t0)
            browser.close()
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--features", type=int, default=65_536)
    parser.add_argument("--runs", type=int, default=5, help="timed script runs per page")
    parser.add_argument("--searches", type=int, default=200)
    parser.add_argument("--store", type=Path, help="store file (default: a temp file, deleted after)")
    parser.add_argument("--keep", action="store_true", help="keep --store and reuse it if it exists")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store = args.store or Path(tmp) / "synthetic.duckdb"
        if not (args.keep and store.exists()):
            store.unlink(missing_ok=True)
            build(store, args.features, 20, 64)
        os.environ[STORE_ENV] = str(store)
        middle = {"FEATURE": str(args.features // 2 + 17), "MIDDLE_PAGE": str(args.features // 100)}
        rows = {
            name: time_page(path, {k: middle.get(v, v) for k, v in params.items()}, args.runs)
            for name, (path, params) in PAGES.items()
        }
        search = time_search(store, args.searches)
        painted = browser_dashboard(store, args.runs)
        if args.store and not args.keep:
            store.unlink()
    device = f"CPU {platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} cores usable"
    lines = [
        f"App on the synthetic store ({args.features:,} features x 20 examples x 64 tokens). Device: {device}.",
        "",
        "| measure | n | median | max | target |",
        "|---|---|---|---|---|",
    ]
    for name, t in rows.items():
        ok = "met" if max(t) <= PAGE_TARGET_S else "MISSED"
        lines.append(f"| script run: {name} | {len(t)} | {np.median(t):.3f} s | {max(t):.3f} s | <= 1 s: {ok} |")
    p95 = float(np.percentile(search, 95))
    ok = "met" if p95 <= SEARCH_TARGET_MS else "MISSED"
    lines.append(
        f"| text search (p95 {p95:.1f} ms) | {len(search)} | {np.median(search):.1f} ms | {max(search):.1f} ms"
        f" | p95 <= 50 ms: {ok} |"
    )
    if painted:
        lines.append(
            f"| browser: navigation to a painted dashboard | {len(painted)} | {np.median(painted):.2f} s"
            f" | {max(painted):.2f} s | reported |"
        )
    else:
        lines.append("| browser: navigation to a painted dashboard | 0 | n/a (no chromium/playwright) | | |")
    table = "\n".join(lines)
    print(table)
    if not args.no_save:
        data = {"device": device, "pages_s": rows, "search_ms": search, "browser_dashboard_s": painted}
        print(save_results("app_render", "cpu", table, data).relative_to(ROOT))


if __name__ == "__main__":
    main()

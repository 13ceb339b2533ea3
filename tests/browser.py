"""Open a report in headless Chromium (Debian's `chromium`, driven by playwright with `executable_path`: no browser
download) and collect what a person would see: loaded thumbnails, table rows, plot sizes, console errors."""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REQUIRE_ENV = "BATCHGEN_REQUIRE_BROWSER"  # set by .ci/run: a missing browser fails the test instead of skipping it


def chromium_path() -> str:
    """The system Chromium, or skip (fail where REQUIRE_ENV is set) with the reason."""
    found = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    problem = None
    if not found:
        problem = "no chromium on PATH (Debian: apt-get install -y chromium; .ci/run installs it)"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            problem = "the playwright Python package is not installed (pip install playwright)"
    if problem:
        if os.environ.get(REQUIRE_ENV):
            pytest.fail(f"{REQUIRE_ENV} is set but {problem}")
        pytest.skip(problem)
    return found


@dataclass
class PageCheck:
    thumbnails: int = 0
    broken: list[str] = field(default_factory=list)
    arm_rows: int = 0
    plots: list[tuple[float, float, int]] = field(default_factory=list)  # (width, height, child elements)
    console_errors: list[str] = field(default_factory=list)
    load_ms: float = 0.0
    provenance: str = ""


def check_report(index: Path, screenshot: Path, chromium: str, load_all: bool = True) -> PageCheck:
    """Load `index` from file://; with `load_all`, make every lazy thumbnail load and wait for each."""
    from playwright.sync_api import sync_playwright

    result = PageCheck()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.on("console", lambda m: result.console_errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: result.console_errors.append(str(e)))
        started = time.perf_counter()
        page.goto(index.resolve().as_uri(), wait_until="load")
        result.load_ms = (time.perf_counter() - started) * 1000
        page.screenshot(path=str(screenshot), full_page=False)
        if load_all:
            page.evaluate("""() => Promise.all([...document.querySelectorAll('img[data-i]')].map(img => {
                img.loading = 'eager';
                return img.decode().catch(() => null);
            }))""")
            sizes = page.evaluate("""() => [...document.querySelectorAll('img[data-i]')]
                .map(img => [img.getAttribute('src'), img.complete, img.naturalWidth])""")
            result.thumbnails = len(sizes)
            result.broken = [src for src, complete, width in sizes if not complete or width == 0]
        result.arm_rows = page.locator("table#arms tbody tr").count()
        result.plots = page.evaluate("""() => [...document.querySelectorAll('svg.plot')].map(svg => {
            const box = svg.getBoundingClientRect();
            return [box.width, box.height, svg.querySelectorAll('circle, rect, path, line').length];
        })""")
        first = page.locator("img[data-i]").first
        if first.count():
            first.click()
            result.provenance = page.locator("#prov").inner_text()
        browser.close()
    return result

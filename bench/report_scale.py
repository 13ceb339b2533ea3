"""Report at scale: build the HTML report of a synthetic evaluation of ~10,000 images and open it in headless
Chromium from file://; how much it weighs and how fast it opens.

    .venv/bin/python bench/report_scale.py [--images 10000] [--loads 3]

The evaluation is synthetic (tests/eval_data.py: real manifests, score tables and 64x64 PNGs; 8 arms = 4 guidance
scales x 2 schedulers, 2 seeds, 4 categories), so only the report is measured. Per load, in a fresh browser page:
- `load`: navigation start to the load event (HTML parsed, inline data and SVG ready; lazy images not waited for);
- `busy`: the time the page's main thread spent running tasks by then (Chrome's TaskDuration): equal to `load`
  says the load is bound by parsing and layout, not by reading files;
- `first screen`: until every thumbnail in the first viewport has decoded;
- `jump`: scrolling to the middle of the contact sheets until every thumbnail in view has decoded;
- `provenance`: a click on a thumbnail until its provenance panel is filled (timed inside the page);
- `images fetched`: thumbnails loaded by the first screen (the rest are lazy).
Prints a table and writes bench/out/report_scale.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from batchgen.eval.report import build_report  # noqa: E402
from batchgen.eval.results import load_results  # noqa: E402
from batchgen.eval.spec import ReportSpec  # noqa: E402
from tests.browser import chromium_path  # noqa: E402
from tests.eval_data import write_synthetic_eval  # noqa: E402

OUT = REPO / "bench" / "out"
FIRST_SCREEN = """() => Promise.all([...document.querySelectorAll('img[data-i]')].filter(img => {
    const r = img.getBoundingClientRect(); return r.bottom > 0 && r.top < innerHeight;
}).map(img => img.decode().catch(() => null))).then(list => list.length)"""


def folder_bytes(path: Path) -> tuple[int, int]:
    files = [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files), len(files)


def measure_loads(index: Path, loads: int) -> list[dict[str, float]]:
    from playwright.sync_api import sync_playwright

    chromium = chromium_path()
    out = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        for _ in range(loads):
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            errors: list[str] = []
            page.on("console", lambda m, errors=errors: errors.append(m.text) if m.type == "error" else None)
            cdp = page.context.new_cdp_session(page)
            cdp.send("Performance.enable")
            started = time.perf_counter()
            page.goto(index.resolve().as_uri(), wait_until="load")
            loaded = time.perf_counter()
            # Time the page's main thread spent in tasks: is the load bound by parsing and layout or by reading files?
            busy = {m["name"]: m["value"] for m in cdp.send("Performance.getMetrics")["metrics"]}
            visible = page.evaluate(FIRST_SCREEN)
            first_screen = time.perf_counter()
            fetched = page.evaluate("() => [...document.querySelectorAll('img[data-i]')]"
                                    ".filter(i => i.complete && i.naturalWidth > 0).length")
            total = page.evaluate("() => document.querySelectorAll('img[data-i]').length")
            nav = page.evaluate("() => { const n = performance.getEntriesByType('navigation')[0];"
                                " return [n.domContentLoadedEventEnd, n.loadEventEnd]; }")
            # The click handler runs synchronously: time it inside the page (a driver round trip would dominate).
            # Jump into the middle of the contact sheets: the lazy thumbnails there load on demand.
            jumped = time.perf_counter()
            page.evaluate("() => document.querySelectorAll('img[data-i]')[5000 % document.images.length]"
                          ".scrollIntoView({block: 'center'})")
            shown = page.evaluate(FIRST_SCREEN)
            jump_s = time.perf_counter() - jumped
            click_ms = page.evaluate("""() => { const t = performance.now();
                document.querySelectorAll('img[data-i]')[5000 % document.images.length].click();
                return document.querySelector('#prov.open table') ? performance.now() - t : -1; }""")
            out.append({"load_s": loaded - started, "first_screen_s": first_screen - started,
                        "dom_content_loaded_s": nav[0] / 1000, "load_event_s": nav[1] / 1000,
                        "provenance_click_s": click_ms / 1000, "visible_thumbnails": visible,
                        "jump_to_middle_s": jump_s, "thumbnails_shown_after_jump": shown,
                        "load1": os.getloadavg()[0],  # the box is shared: how busy it was
                        "main_thread_busy_s": busy.get("TaskDuration", 0.0),
                        "layout_s": busy.get("LayoutDuration", 0.0), "style_s": busy.get("RecalcStyleDuration", 0.0),
                        "script_s": busy.get("ScriptDuration", 0.0),
                        "images_loaded_at_first_screen": fetched, "thumbnails": total, "console_errors": len(errors)})
            page.close()
        browser.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--loads", type=int, default=3)
    parser.add_argument("--work", default=str(OUT / "report_scale"))
    args = parser.parse_args()
    guidance, schedulers, seeds = [1.5, 4.0, 7.5, 12.0], ["ddim", "euler_a"], 2
    prompts = args.images // (len(guidance) * len(schedulers) * seeds)
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    started = time.perf_counter()
    counts = write_synthetic_eval(work / "eval", guidance, schedulers, prompts, seeds)
    synth_s = time.perf_counter() - started
    started = time.perf_counter()
    results = load_results(str(work / "eval"))
    read_s = time.perf_counter() - started
    started = time.perf_counter()
    index = build_report(results, str(work / "eval" / "report"), ReportSpec())
    build_s = time.perf_counter() - started
    started = time.perf_counter()
    build_report(results, str(work / "eval" / "report"), ReportSpec())
    rebuild_s = time.perf_counter() - started
    report_dir = work / "eval" / "report"
    html_bytes = (report_dir / "index.html").stat().st_size
    thumb_bytes, thumb_files = folder_bytes(report_dir / "thumbs")
    loads = measure_loads(Path(index), args.loads)
    summary = {
        "images": counts["images"], "arms": counts["arms"], "synthetic_eval_s": round(synth_s, 1),
        "read_results_s": round(read_s, 2), "build_report_s": round(build_s, 2),
        "rebuild_report_s": round(rebuild_s, 2), "index_html_mb": round(html_bytes / 1e6, 2),
        "thumbnails": thumb_files, "thumbnails_mb": round(thumb_bytes / 1e6, 2),
        "median": {k: round(statistics.median(x[k] for x in loads), 3) for k in loads[0]}, "loads": loads,
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "report_scale.json").write_text(json.dumps(summary, indent=2))
    print(f"{summary['images']} images, {summary['arms']} arms; report built in {build_s:.1f} s "
          f"(rebuild {rebuild_s:.1f} s), index.html {summary['index_html_mb']} MB, {thumb_files} thumbnails "
          f"{summary['thumbnails_mb']} MB")
    print(f"{'#':>3} {'load s':>7} {'busy s':>7} {'first screen s':>15} {'DOMContentLoaded s':>19} {'jump s':>7} "
          f"{'provenance s':>13} {'images fetched':>15} {'load1':>6}")
    for i, x in enumerate(loads):
        print(f"{i:>3} {x['load_s']:>7.2f} {x['main_thread_busy_s']:>7.2f} {x['first_screen_s']:>15.2f} "
              f"{x['dom_content_loaded_s']:>19.2f} {x['jump_to_middle_s']:>7.2f} {x['provenance_click_s']:>13.3f} "
              f"{x['images_loaded_at_first_screen']:>7}/{x['thumbnails']} {x['load1']:>6.1f}")


if __name__ == "__main__":
    main()

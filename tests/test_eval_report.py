"""The report: built from a synthetic evaluation, opened in headless Chromium from file://."""

from __future__ import annotations

import numpy as np
from PIL import Image

from batchgen.eval.report import build_report
from batchgen.eval.results import load_results
from batchgen.eval.spec import ReportSpec
from tests.browser import check_report, chromium_path
from tests.eval_data import write_synthetic_eval


def test_report_opens_from_file_in_chromium_with_every_part_rendered(tmp_path):
    chromium = chromium_path()
    root = tmp_path / "eval"
    counts = write_synthetic_eval(root, [1.5, 4.0, 7.5], ["ddim", "euler_a"], prompts=5, seeds=2,
                                  failed_arm="broken")
    results = load_results(str(root))
    index = build_report(results, str(root / "report"), ReportSpec(worst_k=3))
    page = check_report(root / "report" / "index.html", tmp_path / "report.png", chromium)

    assert page.console_errors == []
    # Contact sheets (every image once) + worst-k strips (3 per metric and arm: 2 metrics x 6 arms).
    assert page.thumbnails == counts["images"] + 3 * 2 * 6
    assert page.broken == [], page.broken[:5]
    assert page.arm_rows == counts["arms"] == 7  # the failed arm has its row too
    # Per metric: vs guidance and by category; every plot has a size and marks in it.
    assert len(page.plots) == 4 and all(w > 100 and h > 100 and marks >= 8 for w, h, marks in page.plots)
    assert "seed" in page.provenance and "model_sha256" in page.provenance and "score: clip_score" in page.provenance
    # The screenshot is not blank: many distinct colours, not one background.
    shot = np.asarray(Image.open(tmp_path / "report.png").convert("RGB"))
    assert shot.shape[0] > 500 and len(np.unique(shot.reshape(-1, 3), axis=0)) > 50
    html = (root / "report" / "index.html").read_text()
    assert "http://" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "") and "https://" not in html
    assert index.endswith("index.html")

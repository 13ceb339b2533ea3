"""Statistics on hand-made scores whose answers are known, and the export layouts."""

from __future__ import annotations

import json

import numpy as np
import pytest

from batchgen.eval.export import export
from batchgen.eval.results import ArmResult, Results, load_results
from batchgen.eval.spec import ReportSpec
from batchgen.eval.stats import summarize, worst
from tests.eval_data import write_synthetic_eval


def arm(name: str, values: dict[tuple[str, int], float], categories: dict[str, str]) -> ArmResult:
    rows = [{"id": f"{p}/s{s}", "sample_index": 0, "prompt": p, "seed": s, "prompt_key": p, "category": categories[p],
             "image_uri": f"/x/{name}/{p}_{s}.png", "scores": {"clip_score": v}} for (p, s), v in values.items()]
    return ArmResult(name, f"/x/{name}", "ok", None, {}, rows)


def test_means_intervals_spread_and_paired_differences():
    rng = np.random.default_rng(0)
    prompts = [f"p{i}" for i in range(30)]
    categories = {p: "odd" if i % 2 else "even" for i, p in enumerate(prompts)}
    base = {(p, s): float(rng.normal(20 + 3 * (i % 5), 1)) for i, p in enumerate(prompts) for s in (0, 1, 2)}
    better = {k: v + 1.5 for k, v in base.items()}  # exactly 1.5 better on every prompt x seed
    results = Results("/x", "base", [arm("base", base, categories), arm("better", better, categories)])
    rows = {(r["arm"], r["category"]): r for r in summarize(results, ReportSpec(bootstrap=500))}

    b = rows[("base", "*")]
    assert b["prompts"] == 30 and b["images"] == 90
    assert b["mean"] == pytest.approx(np.mean(list(base.values())))
    assert b["ci_low"] < b["mean"] < b["ci_high"]
    # Seed spread: the mean over prompts of the per-prompt standard deviation across seeds (ddof 1).
    expected_spread = np.mean([np.std([base[(p, s)] for s in (0, 1, 2)], ddof=1) for p in prompts])
    assert b["seed_spread"] == pytest.approx(expected_spread)
    assert b["diff"] is None  # the baseline is not compared with itself
    d = rows[("better", "*")]
    # Paired: the difference is exactly 1.5 on every prompt, so its interval has no width at all, while the
    # unpaired means' intervals overlap (prompt-to-prompt variation swamps 1.5).
    assert d["diff"] == pytest.approx(1.5) and d["diff_ci_low"] == pytest.approx(1.5)
    assert d["diff_ci_high"] == pytest.approx(1.5) and d["ci_low"] < b["ci_high"]
    odd = rows[("base", "odd")]
    assert odd["prompts"] == 15
    assert odd["mean"] == pytest.approx(np.mean([v for (p, _), v in base.items() if categories[p] == "odd"]))
    # Same scores, same intervals.
    again = {(r["arm"], r["category"]): r for r in summarize(results, ReportSpec(bootstrap=500))}
    assert again[("base", "*")]["ci_low"] == b["ci_low"]

    lowest = worst(results, 3)
    base_worst = [w["value"] for w in lowest if w["arm"] == "base"]
    assert base_worst == sorted(base.values())[:3]


def test_export_layouts(tmp_path):
    root = tmp_path / "eval"
    write_synthetic_eval(root, [2.0], ["ddim"], prompts=3, seeds=2, side=16)
    results = load_results(str(root))
    name = results.arms[0].name

    assert export(results, str(tmp_path / "flat"), "flat") == 6
    assert sorted(p.name for p in (tmp_path / "flat" / name).iterdir())[:2] == ["00000_0.png", "00000_1.png"]
    assert export(results, str(tmp_path / "flat"), "flat") == 0  # already there

    export(results, str(tmp_path / "geneval"), "geneval")
    folder = tmp_path / "geneval" / name / "00001"
    assert sorted(p.name for p in (folder / "samples").iterdir()) == ["0000.png", "0001.png"]
    assert json.loads((folder / "metadata.jsonl").read_text())["prompt"] == "a objects prompt number 1"

    export(results, str(tmp_path / "t2i"), "t2i-compbench")
    names = sorted(p.name for p in (tmp_path / "t2i" / name / "samples").iterdir())
    assert names[0] == "a animals prompt number 0_000000.png"  # the suite parses the prompt up to the last "_"
    assert (tmp_path / "t2i" / name / "samples" / names[0]).read_bytes().startswith(b"\x89PNG")


@pytest.mark.slow
def test_score_any_output_then_rescore_nothing(ray_local, tmp_path, tiny_scorers):
    from batchgen.eval.scoring import read_scores
    from batchgen.eval.spec import FidSpec, ScoringSpec
    from batchgen.eval.sweep import score_output

    root = tmp_path / "eval"
    write_synthetic_eval(root, [2.0], ["ddim"], prompts=4, seeds=2, side=32)
    output = str(root / "arms" / "g2-ddim")  # a plain job output: manifests, images, no eval around it
    reference = tmp_path / "reference"
    write_synthetic_eval(reference, [1.0], ["ddim"], prompts=3, seeds=2, side=32, seed=5)
    scoring = ScoringSpec(clip=str(tiny_scorers["clip"]), batch_size=4, cpus_per_actor=0.5,
                          fid=FidSpec(reference=str(reference / "arms"), extractor=str(tiny_scorers["extractor"]),
                                      image_size=32, kid_subsets=5, kid_subset_size=4))
    first = score_output(output, scoring)
    assert first["scored"] == 8 and first["reference_images"] == 6 and first["fid"] > 0
    scores = read_scores(output).to_pylist()
    clip = [s for s in scores if s["scorer"] == "clip_score" and s["weights_sha256"] != "synthetic"]
    assert len(clip) == 8 and all(s["image_sha256"] for s in clip)
    second = score_output(output, scoring)
    assert second["scored"] == 0 and second["fid"] == pytest.approx(first["fid"])
    assert load_results(output).arms[0].set_metrics["fid"] == pytest.approx(first["fid"])

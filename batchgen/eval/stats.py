"""Statistics per arm and per prompt category, with bootstrap intervals over prompts.

For an arm, a metric and a set of prompts P (all prompts, or one category's) whose images are scored:
- `mean`: the mean over prompts of each prompt's mean over its seeds, m = mean_p v(p), v(p) = mean_s v(p, s)
  (with every seed present, the mean over images);
- `ci_low`, `ci_high`: the 2.5th and 97.5th percentiles of m over `bootstrap` resamples of P with replacement
  (prompts are the unit: seeds of one prompt are not independent draws);
- `seed_spread`: the mean over prompts with two or more seeds of the standard deviation (ddof 1) across that
  prompt's seeds: how much an image moves with the seed alone;
- `diff`, `diff_ci_low`, `diff_ci_high` (arms other than the baseline): the paired difference arm - baseline,
  d(p) = mean over the seeds s scored in both arms of v_arm(p, s) - v_base(p, s), averaged over prompts, with the
  same bootstrap over prompts; an interval that excludes 0 says the arms differ on these prompts;
- `worst`: the k images with the lowest value of each metric in each arm (every metric here is higher-better).
Resamples come from a generator seeded with (bootstrap_seed, arm, metric, category): the same scores give the
same intervals.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections import defaultdict
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from batchgen.eval.results import Results
from batchgen.eval.spec import ReportSpec
from batchgen.storage import Storage

ALL = "*"
SUMMARY_SCHEMA = pa.schema([
    ("arm", pa.string()), ("category", pa.string()), ("metric", pa.string()), ("prompts", pa.int64()),
    ("images", pa.int64()), ("mean", pa.float64()), ("ci_low", pa.float64()), ("ci_high", pa.float64()),
    ("seed_spread", pa.float64()), ("diff", pa.float64()), ("diff_ci_low", pa.float64()),
    ("diff_ci_high", pa.float64()),
])


def _rng(seed: int, *key: str) -> np.random.Generator:
    digest = hashlib.sha256("\x00".join(key).encode()).digest()
    return np.random.default_rng([seed, int.from_bytes(digest[:8], "little")])


def bootstrap_mean(values: np.ndarray, resamples: int, rng: np.random.Generator) -> tuple[float, float, float]:
    """(mean, 2.5th, 97.5th percentile of the resampled means)."""
    if len(values) == 0:
        return (float("nan"),) * 3
    draws = rng.integers(0, len(values), size=(resamples, len(values)))
    means = values[draws].mean(axis=1)
    return float(values.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def _by_prompt(rows: list[dict[str, Any]], metric: str) -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = defaultdict(dict)
    for row in rows:
        if metric in row["scores"] and row["scores"][metric] is not None:
            out[row["prompt_key"]][int(row["seed"])] = float(row["scores"][metric])
    return out


def summarize(results: Results, spec: ReportSpec) -> list[dict[str, Any]]:
    """One row per (arm, category or `*`, metric): the definitions in this module's docstring."""
    baseline_name = results.baseline or (results.arms[0].name if results.arms else None)
    baseline = next((a for a in results.arms if a.name == baseline_name and a.status == "ok"), None)
    out = []
    for arm in results.arms:
        categories = sorted({r["category"] for r in arm.rows})
        for metric in results.metrics:
            for category in [ALL, *categories]:
                rows = [r for r in arm.rows if category in (ALL, r["category"])]
                values = _by_prompt(rows, metric)
                if not values:
                    continue
                keys = sorted(values)
                per_prompt = np.array([np.mean(list(values[k].values())) for k in keys])
                mean, low, high = bootstrap_mean(per_prompt, spec.bootstrap, _rng(spec.bootstrap_seed, arm.name,
                                                                                  metric, category))
                spreads = [np.std(list(v.values()), ddof=1) for v in values.values() if len(v) > 1]
                record = {"arm": arm.name, "category": category, "metric": metric, "prompts": len(keys),
                          "images": sum(len(v) for v in values.values()), "mean": mean, "ci_low": low,
                          "ci_high": high, "seed_spread": float(np.mean(spreads)) if spreads else None,
                          "diff": None, "diff_ci_low": None, "diff_ci_high": None}
                if baseline is not None and arm is not baseline:
                    base = _by_prompt([r for r in baseline.rows if category in (ALL, r["category"])], metric)
                    diffs = [np.mean([values[k][s] - base[k][s] for s in values[k] if s in base[k]])
                             for k in keys if k in base and set(values[k]) & set(base[k])]
                    if diffs:
                        d, d_low, d_high = bootstrap_mean(np.array(diffs), spec.bootstrap, _rng(
                            spec.bootstrap_seed, "diff", arm.name, metric, category))
                        record.update(diff=d, diff_ci_low=d_low, diff_ci_high=d_high)
                out.append(record)
    return out


def worst(results: Results, k: int) -> list[dict[str, Any]]:
    """The k lowest-scoring images per (arm, metric)."""
    out = []
    for arm in results.arms:
        for metric in results.metrics:
            scored = [r for r in arm.rows if r["scores"].get(metric) is not None]
            scored.sort(key=lambda r: (r["scores"][metric], r["id"]))
            for rank, row in enumerate(scored[:k]):
                out.append({"arm": arm.name, "metric": metric, "rank": rank, "id": row["id"],
                            "sample_index": row["sample_index"], "value": row["scores"][metric],
                            "prompt": row["prompt"], "seed": row["seed"], "image_uri": row["image_uri"]})
    return out


def write_stats(storage: Storage, prefix: str, summary: list[dict[str, Any]], worst_rows: list[dict[str, Any]],
                sets: dict[str, dict[str, float]]) -> list[str]:
    """Parquet and JSON of each table under `prefix`; returns the keys written."""
    keys = []
    tables = {"summary": pa.Table.from_pylist(summary, schema=SUMMARY_SCHEMA), "worst": pa.Table.from_pylist(
        worst_rows) if worst_rows else pa.table({"arm": pa.array([], pa.string())})}
    for name, table in tables.items():
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        storage.put(f"{prefix}{name}.parquet", buffer.getvalue(), "application/vnd.apache.parquet")
        storage.put(f"{prefix}{name}.json", json.dumps(table.to_pylist(), indent=1).encode(), "application/json")
        keys += [f"{prefix}{name}.parquet", f"{prefix}{name}.json"]
    storage.put(f"{prefix}sets.json", json.dumps(sets, indent=1, sort_keys=True).encode(), "application/json")
    return [*keys, f"{prefix}sets.json"]

"""`batchgen eval`: the steps of an evaluation in order. Everything checkable is checked before Ray starts (arms'
job specs, prompt sets, scorer sources, the reference set); then each arm runs as its own job (a failed arm is
recorded and the others go on), every arm's images and the reference set are scored in one pipeline, FID/KID
and the statistics are computed from the stored scores, and the report is written."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from typing import Any

from batchgen.errors import BatchgenError, JobConfigError
from batchgen.eval.arms import ARMS_KEY, build_arms, prompt_table, write_prompt_table
from batchgen.eval.distribution import fid_kid, stored_features
from batchgen.eval.results import load_results
from batchgen.eval.scorers import FEATURES, check_scorers
from batchgen.eval.scoring import Collection, manifest_collection, reference_collection, score_collections
from batchgen.eval.spec import EvalSpec, ReportSpec, ScoringSpec
from batchgen.eval.stats import summarize, worst, write_stats
from batchgen.storage import open_storage

logger = logging.getLogger(__name__)

STATS_PREFIX = "_eval/stats/"
REPORT_PREFIX = "report"


def run_eval(spec: EvalSpec, *, report: bool = True, progress: Any = None) -> dict[str, Any]:
    """Generate, score, summarize, report; returns a summary with each arm's status and counts. `progress`: the
    CLI's live bar, ended after each arm."""
    # 1. Check everything before any work.
    arms = build_arms(spec)
    table = prompt_table(spec)
    hashes = check_scorers(spec.scoring)
    root = open_storage(spec.output)
    reference = reference_collection(spec.scoring.fid.reference, root, hashes) if spec.scoring.fid else None
    write_prompt_table(spec, table)
    logger.info("eval: %d arms x %d prompt-seed rows = %d images", len(arms), table.num_rows,
                len(arms) * table.num_rows)

    # 2. Generate: each arm is an ordinary resumable job into its own prefix.
    from batchgen.pipeline import run_job

    entries = []
    for arm in arms:
        entry: dict[str, Any] = {"name": arm.name, "output": arm.job.output.uri, "settings": arm.settings,
                                 "status": "ok", "error": None, "generated": 0}
        logger.info("arm %s: generating into %s", arm.name, arm.job.output.uri)
        try:
            summary = run_job(arm.job)
            entry["generated"] = summary["generated"]
        except BatchgenError as e:  # one arm's failure is reported; the other arms are still run and scored
            logger.error("arm %s failed: %s", arm.name, e)
            entry.update(status="failed", error=str(e))
        finally:
            if progress is not None:
                progress.finish()
        entries.append(entry)
        _write_arms(root, spec, entries, hashes)

    # 3. Score every ok arm (and the reference set) in one pipeline.
    collections: list[Collection] = [manifest_collection(e["name"], e["output"], hashes) for e in entries
                                     if e["status"] == "ok"]
    if reference is not None and collections:
        collections.append(reference)
    scored = score_collections(collections, spec.scoring, hashes, arms[0].job.compute.address) if hashes else {}
    if progress is not None:
        progress.finish()
    for entry in entries:
        entry["scored"] = scored.get(entry["name"], 0)

    # 4. Set metrics and statistics from the stored scores; 5. the report.
    sets = set_metrics(spec.scoring, entries, reference, hashes)
    results = load_results(root.uri)
    for arm in results.arms:
        arm.set_metrics = sets.get(arm.name, {})
    write_stats(root, STATS_PREFIX, summarize(results, spec.report), worst(results, spec.report.worst_k), sets)
    out: dict[str, Any] = {"output": root.uri, "arms": entries, "stats": root.uri_for(STATS_PREFIX)}
    if report:
        from batchgen.eval.report import build_report

        out["report"] = build_report(results, root.uri_for(REPORT_PREFIX), spec.report)
    return out


def set_metrics(scoring: ScoringSpec, entries: list[dict[str, Any]], reference: Collection | None,
                hashes: dict[str, str]) -> dict[str, dict[str, float]]:
    """FID and KID of every ok arm against the reference set, from stored features."""
    if scoring.fid is None or reference is None:
        return {}
    reference_features = stored_features(reference.output, hashes[FEATURES])
    out = {}
    for entry in entries:
        if entry["status"] != "ok":
            continue
        features = stored_features(entry["output"], hashes[FEATURES])
        if len(features) < 2 or len(reference_features) < 2:
            logger.warning("arm %s: FID/KID need 2+ images on each side (%d, %d)", entry["name"], len(features),
                           len(reference_features))
            continue
        metrics = fid_kid(features, reference_features, scoring.fid)
        out[entry["name"]] = {k: v for k, v in asdict(metrics).items()}
    return out


def _write_arms(root: Any, spec: EvalSpec, entries: list[dict[str, Any]], hashes: dict[str, str]) -> None:
    listing = {"baseline": spec.baseline or entries[0]["name"], "arms": entries, "scorers": hashes}
    root.put(ARMS_KEY, json.dumps(listing, indent=1, default=str).encode(), "application/json")


def score_output(output: str, scoring: ScoringSpec, report_spec: ReportSpec | None = None) -> dict[str, Any]:
    """`batchgen score`: score any batchgen output in place (scores/ beside its manifests)."""
    if scoring.empty:
        raise JobConfigError("scoring spec names no scorer: set `clip` and/or `fid`")
    hashes = check_scorers(scoring)
    storage = open_storage(output)
    collection = manifest_collection(storage.uri.rstrip("/").rsplit("/", 1)[-1] or "output", storage.uri, hashes)
    if not collection.items:
        raise JobConfigError(f"output {storage.uri!r} lists no ok images in its manifests")
    collections = [collection]
    reference = reference_collection(scoring.fid.reference, storage, hashes) if scoring.fid else None
    if reference is not None:
        collections.append(reference)
    counts = score_collections(collections, scoring, hashes)
    summary: dict[str, Any] = {"output": storage.uri, "images": len(collection.items),
                               "scored": counts[collection.name]}
    entry = {"name": collection.name, "output": storage.uri, "status": "ok"}
    sets = set_metrics(scoring, [entry], reference, hashes)
    if sets:
        storage.put(STATS_PREFIX + "sets.json", json.dumps(sets, indent=1).encode(), "application/json")
        summary.update(sets[collection.name])
    return summary

"""What an evaluation produced, read back for statistics, the report and exports: per arm its status, settings,
manifest rows (ok images) and scalar scores. Works on an eval root (arms listed in _eval/arms.json) and on any
plain batchgen output (one arm, named after the output)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from batchgen.eval.scorers import METRICS
from batchgen.eval.scoring import read_scores
from batchgen.manifest import read_manifests
from batchgen.storage import NotFound, Storage, open_storage

ARMS_KEY = "_eval/arms.json"
SETS_KEY = "_eval/stats/sets.json"


@dataclass
class ArmResult:
    name: str
    output: str
    status: str  # ok | failed
    error: str | None
    settings: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)  # ok manifest rows, with `scores` and prompt keys
    set_metrics: dict[str, float] = field(default_factory=dict)  # fid, kid_mean, kid_std


@dataclass
class Results:
    root: str
    baseline: str | None
    arms: list[ArmResult]

    @property
    def metrics(self) -> list[str]:
        present = {m for arm in self.arms for row in arm.rows for m in row["scores"]}
        return [m for m in METRICS if m in present]


def prompt_fields(row: dict[str, Any]) -> dict[str, Any]:
    """prompt_set, prompt_id, category from the row's carried columns; a plain output's rows are keyed by prompt."""
    try:
        extra = json.loads(row.get("extra") or "{}")
    except ValueError:
        extra = {}
    prompt_set = extra.get("prompt_set") or "prompts"
    prompt_id = extra.get("prompt_id") or row["id"]
    return {"prompt_set": prompt_set, "prompt_id": str(prompt_id), "category": str(extra.get("category") or "all"),
            "prompt_key": f"{prompt_set}/{prompt_id}", "metadata": extra.get("metadata")}


def load_arm(name: str, output: str, status: str = "ok", error: str | None = None,
             settings: dict[str, Any] | None = None, hashes: dict[str, str] | None = None) -> ArmResult:
    arm = ArmResult(name, output, status, error, settings or {})
    storage = open_storage(output)
    rows: dict[tuple[str, int], dict[str, Any]] = {}
    try:
        for _, table in read_manifests(storage):
            for row in table.to_pylist():
                if row["status"] == "ok":
                    rows[(row["id"], row["sample_index"])] = row
    except NotFound:
        pass
    scores: dict[tuple[str, int], dict[str, float]] = {}
    table = read_scores(storage, ["id", "sample_index", "image_sha256", "scorer", "weights_sha256", "value",
                                  "scored_at"])
    for s in table.to_pylist():
        row = rows.get((s["id"], s["sample_index"]))
        if (s["scorer"] in METRICS and row is not None and s["image_sha256"] == row["sha256"]
                and (hashes is None or hashes.get(s["scorer"]) == s["weights_sha256"])):
            scores.setdefault((s["id"], s["sample_index"]), {})[s["scorer"]] = s["value"]  # sorted: latest wins
    for key, row in sorted(rows.items()):
        arm.rows.append({**row, **prompt_fields(row), "scores": scores.get(key, {})})
    return arm


def read_json(storage: Storage, key: str) -> Any:
    try:
        return json.loads(storage.get(key))
    except NotFound:
        return None


def load_results(root: str) -> Results:
    storage = open_storage(root)
    listed = read_json(storage, ARMS_KEY)
    if listed is None:
        name = storage.uri.rstrip("/").rsplit("/", 1)[-1] or "output"
        arm = load_arm(name, storage.uri)
        arm.set_metrics = (read_json(storage, SETS_KEY) or {}).get(name, {})  # written by `batchgen score`
        return Results(storage.uri, None, [arm])
    sets = read_json(storage, SETS_KEY) or {}
    hashes = listed.get("scorers") or None
    arms = []
    for entry in listed["arms"]:
        arm = load_arm(entry["name"], entry["output"], entry["status"], entry.get("error"), entry.get("settings"),
                       hashes)
        arm.set_metrics = sets.get(entry["name"], {})
        arms.append(arm)
    return Results(storage.uri, listed.get("baseline"), arms)

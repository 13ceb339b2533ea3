"""Arms and prompts: expand the arms, build the shared prompt table (prompt x seed, explicit seeds), and turn
each arm into an ordinary job spec writing to its own output prefix.

Every arm reads the same table, whose rows carry their own `seed`: the same prompt x seed has the same row id
and seed in every arm, so it starts from the same noise wherever the image size is the same, and comparisons
between arms are paired. An arm is a plain resumable job; rows added to the table (new prompts or seeds) and new
arms are generated on the next run, everything already committed is skipped by the job's own resume.
"""

from __future__ import annotations

import io
import itertools
import json
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from batchgen.errors import JobConfigError
from batchgen.eval.spec import ARM_AXES, ArmSpec, EvalSpec, PromptSetSpec
from batchgen.spec import JobSpec, load_spec
from batchgen.storage import open_storage

EVAL_PREFIX = "_eval/"
PROMPTS_KEY = EVAL_PREFIX + "prompts.parquet"
ARMS_KEY = EVAL_PREFIX + "arms.json"
ARMS_PREFIX = "arms/"
SHORT = {"guidance_scale": "g", "steps": "n", "scheduler": "", "width": "w", "height": "h", "negative_prompt": "neg"}


@dataclass(frozen=True)
class Arm:
    name: str
    settings: dict[str, Any]  # axis -> value, only what the arm sets
    job: JobSpec


def arm_specs(spec: EvalSpec) -> list[ArmSpec]:
    """Grid arms (one per combination, named by the axes that vary) then listed arms."""
    arms: list[ArmSpec] = []
    axes = list(spec.arms.grid)
    for values in itertools.product(*(spec.arms.grid[a] for a in axes)):
        arms.append(ArmSpec(**dict(zip(axes, values, strict=True))))
    arms.extend(spec.arms.listed)
    return arms


def _value_name(axis: str, value: Any) -> str:
    if axis == "model":
        return str(value).rstrip("/").rsplit("/", 1)[-1]
    if axis == "negative_prompt":
        return "neg" if value else "noneg"
    shown = f"{value:g}" if isinstance(value, float) else str(value)
    return f"{SHORT[axis]}{shown}"


def arm_name(arm: ArmSpec, varying: list[str]) -> str:
    if arm.name:
        return arm.name
    parts = [_value_name(axis, getattr(arm, axis)) for axis in varying if getattr(arm, axis) is not None]
    name = "-".join(p for p in parts if p) or "base"
    return "".join(ch if ch.isalnum() or ch in "._=+-" else "_" for ch in name)[:100]


def build_arms(spec: EvalSpec) -> list[Arm]:
    """Every arm as a validated job spec (before Ray starts: a bad field fails the whole sweep, exit 2)."""
    raw = arm_specs(spec)
    varying = [a for a in ARM_AXES if len({repr(getattr(r, a)) for r in raw}) > 1] or list(spec.arms.grid)
    root = open_storage(spec.output)
    prompts_uri = root.uri_for(PROMPTS_KEY)
    base = _dotted(spec.job)
    for fixed in ("input.prompts", "output.uri", "sampling.num_images"):
        if fixed in base:
            raise JobConfigError(f"eval spec: `job.{fixed}` is set by the sweep (prompt table, arm output, one "
                                 f"image per seed); remove it")
    arms: list[Arm] = []
    for entry in raw:
        name = arm_name(entry, varying)
        settings = {axis: getattr(entry, axis) for axis in ARM_AXES if getattr(entry, axis) is not None}
        overrides = {**base, **{ARM_AXES[a]: v for a, v in settings.items()}, **entry.job,
                     "input.prompts": prompts_uri, "output.uri": root.uri_for(ARMS_PREFIX + name),
                     "sampling.num_images": 1}
        try:
            job = load_spec(None, overrides)
        except JobConfigError as e:
            raise JobConfigError(f"eval spec, arm {name!r}: {e}") from None
        arms.append(Arm(name, settings | {f"job.{k}": v for k, v in entry.job.items()}, job))
    names = [a.name for a in arms]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise JobConfigError(f"eval spec: arm names must be distinct but {duplicates} repeat; name the arms")
    if spec.baseline is not None and spec.baseline not in names:
        raise JobConfigError(f"eval spec: `baseline` must name an arm ({names}) but is {spec.baseline!r}")
    return arms


def _dotted(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key != "columns":
            out.update(_dotted(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def read_prompt_set(prompt_set: PromptSetSpec) -> list[dict[str, Any]]:
    """[{prompt_id, prompt, category, metadata}] for one set; ids from an `id` field, else the line/row number."""
    if prompt_set.prompts is not None:
        records: list[dict[str, Any]] = [{"prompt": p} for p in prompt_set.prompts]
    else:
        records = _read_records(prompt_set.source or "")
    out = []
    for index, record in enumerate(records):
        prompt = record.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise JobConfigError(f"prompt set {prompt_set.name!r}: entry {index} has no `prompt` text (got {prompt!r})")
        prompt_id = str(record["id"]) if record.get("id") is not None else f"{index:05d}"
        category = record.get(prompt_set.category_field) or prompt_set.category or prompt_set.name
        metadata = {k: v for k, v in record.items() if k not in ("id",)}
        out.append({"prompt_id": prompt_id, "prompt": prompt, "category": str(category),
                    "metadata": json.dumps(metadata, default=str, sort_keys=True)})
    ids = [r["prompt_id"] for r in out]
    if len(set(ids)) != len(ids):
        raise JobConfigError(f"prompt set {prompt_set.name!r}: prompt ids must be distinct")
    if not out:
        raise JobConfigError(f"prompt set {prompt_set.name!r} holds no prompts")
    return out


def _read_records(source: str) -> list[dict[str, Any]]:
    parent, _, name = source.rstrip("/").rpartition("/")
    try:
        data = open_storage(parent or ".").get(name)
    except Exception as e:  # noqa: BLE001 - any unreadable source is a config error naming it
        raise JobConfigError(f"cannot read prompt set source {source!r}: {e}") from None
    try:
        if name.endswith((".parquet", ".pq")):
            return pq.read_table(io.BytesIO(data)).to_pylist()
        text = data.decode("utf-8")
        if name.endswith(".jsonl"):
            return [json.loads(line) for line in text.splitlines() if line.strip()]
    except (ValueError, pa.ArrowException) as e:
        raise JobConfigError(f"cannot parse prompt set source {source!r}: {e}") from None
    lines = (line.strip() for line in text.splitlines())
    return [{"prompt": line} for line in lines if line and not line.startswith("#")]


def prompt_table(spec: EvalSpec) -> pa.Table:
    """One row per (set, prompt, seed). The id `{set}/{prompt_id}/s{seed}` names the cell, so it is the same in
    every arm and stays the same when the sweep grows; `seed` is explicit, so the noise is the same in every arm."""
    rows = []
    for prompt_set in spec.prompts:
        for record in read_prompt_set(prompt_set):
            for seed in spec.seeds:
                rows.append({"id": f"{prompt_set.name}/{record['prompt_id']}/s{seed}", "prompt": record["prompt"],
                             "seed": seed, "prompt_set": prompt_set.name, "prompt_id": record["prompt_id"],
                             "category": record["category"], "metadata": record["metadata"]})
    schema = pa.schema([("id", pa.string()), ("prompt", pa.string()), ("seed", pa.int64()),
                        ("prompt_set", pa.string()), ("prompt_id", pa.string()), ("category", pa.string()),
                        ("metadata", pa.string())])
    return pa.Table.from_pylist(rows, schema=schema)


def write_prompt_table(spec: EvalSpec, table: pa.Table) -> str:
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    root = open_storage(spec.output)
    root.put(PROMPTS_KEY, buffer.getvalue(), "application/vnd.apache.parquet")
    return root.uri_for(PROMPTS_KEY)

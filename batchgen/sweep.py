"""Sweeps as data: expand prompts x guidance scales x schedulers x seeds into a prompt table with per-row columns.

A sweep needs nothing from the job runner: `guidance_scale`, `scheduler` and `seed` are per-row input columns
(see the README's Input section), so every cell of the grid is one ordinary row, recorded in its manifest row
and resumable like any other. One loaded model serves every cell: the engine denoises rows that share a
scheduler (and steps and size) in one loop, whatever their guidance scale and seed.
"""

from __future__ import annotations

import io
import itertools
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from batchgen.errors import JobConfigError
from batchgen.storage import open_storage


def read_prompt_list(path: str) -> list[str]:
    """Prompts from a text file (one per line; blank lines and lines starting with # are skipped) or from the
    `prompt` column of a Parquet file."""
    source = Path(path)
    try:
        if source.suffix in (".parquet", ".pq"):
            table = pq.read_table(source)
            if "prompt" not in table.column_names:
                raise JobConfigError(f"sweep prompts {path!r} has no column 'prompt' (columns: {table.column_names})")
            prompts = [str(p) for p in table.column("prompt").to_pylist() if p]
        else:
            lines = (line.strip() for line in source.read_text(encoding="utf-8").splitlines())
            prompts = [line for line in lines if line and not line.startswith("#")]
    except (OSError, pa.ArrowException) as e:
        raise JobConfigError(f"cannot read sweep prompts {path!r}: {e}") from None
    if not prompts:
        raise JobConfigError(f"sweep prompts {path!r} holds no prompts")
    return prompts


def check_axes(guidance_scales: list[float], schedulers: list[str], seeds: list[int]) -> None:
    from batchgen.engine import MAX_SEED
    from batchgen.models.schedulers import SCHEDULERS

    for name, values in (("guidance_scales", guidance_scales), ("schedulers", schedulers), ("seeds", seeds)):
        if not values:
            raise JobConfigError(f"sweep `{name}` must list at least one value")
        if len(set(values)) != len(values):
            raise JobConfigError(f"sweep `{name}` lists a value twice: {values}")
    for scale in guidance_scales:
        if not math.isfinite(scale) or scale < 0:
            raise JobConfigError(f"sweep guidance scale must be a finite number >= 0 but is {scale}")
    for scheduler in schedulers:
        if scheduler not in SCHEDULERS:
            raise JobConfigError(f"sweep scheduler must be one of {sorted(SCHEDULERS)} but is {scheduler!r}")
    for seed in seeds:
        if not 0 <= seed <= MAX_SEED:
            raise JobConfigError(f"sweep seed must be an integer in [0, {MAX_SEED}] but is {seed}")


def expand_sweep(prompts: list[str], guidance_scales: list[float], schedulers: list[str], seeds: list[int]) -> pa.Table:
    """One row per (scheduler, guidance scale, prompt, seed), in that order: consecutive rows, and so most
    batches, share a scheduler, which the engine needs to denoise rows in one loop. The id names the cell
    (`p003-g7.5-ddim-s1`), so it stays the same when axes grow and a grown sweep resumes into its output;
    `prompt_index` is carried into the manifest's `extra` for grouping by prompt."""
    check_axes(guidance_scales, schedulers, seeds)
    cells = list(itertools.product(schedulers, guidance_scales, range(len(prompts)), seeds))
    width = max(3, len(str(len(prompts) - 1)))
    return pa.table(
        {
            "id": [f"p{i:0{width}d}-g{g:g}-{s}-s{seed}" for s, g, i, seed in cells],
            "prompt": [prompts[i] for _, _, i, _ in cells],
            "guidance_scale": pa.array([float(g) for _, g, _, _ in cells], pa.float64()),
            "scheduler": [s for s, _, _, _ in cells],
            "seed": pa.array([seed for _, _, _, seed in cells], pa.int64()),
            "prompt_index": pa.array([i for _, _, i, _ in cells], pa.int64()),
        }
    )


def write_table(table: pa.Table, uri: str) -> str:
    """Write one Parquet file to a local path or an s3:// URI; returns where it went."""
    parent, _, name = uri.rstrip("/").rpartition("/")
    if not name.endswith((".parquet", ".pq")):
        raise JobConfigError(f"sweep output {uri!r} must name a .parquet file")
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    storage = open_storage(parent or ".")
    storage.put(name, buffer.getvalue(), "application/vnd.apache.parquet")
    return storage.uri_for(name)

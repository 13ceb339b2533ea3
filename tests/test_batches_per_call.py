"""compute.batches_per_call: one generator call (and one manifest) per batch_size x batches_per_call rows, while
the denoising loop still runs batch_size rows at a time."""

from __future__ import annotations

import pytest

from batchgen.manifest import manifest_parts, read_manifests
from batchgen.pipeline import run_job
from batchgen.storage import open_storage
from tests.jobs import job_spec, prompts_table, write_table

pytestmark = [pytest.mark.usefixtures("ray_local"), pytest.mark.timeout(180)]


def test_calls_carry_several_model_batches(tiny_model_dir, tmp_path):
    prompts = write_table(tmp_path / "p.parquet", prompts_table(24))
    out = tmp_path / "out"
    summary = run_job(job_spec(tiny_model_dir, str(prompts), str(out), **{
        "compute.batch_size": 4, "compute.batches_per_call": 3, "compute.min_actors": 1, "compute.max_actors": 1}))
    assert summary["images_ok"] == 24
    storage = open_storage(str(out))
    assert len(manifest_parts(storage)) == 2, "24 rows in calls of 4 x 3 rows"
    rows = [row for _, table in read_manifests(storage) for row in table.to_pylist()]
    assert sorted({r["batch_size"] for r in rows}) == [4], "the engine still denoises 4 rows at a time"

"""The Ray Data API: the README's example runs as written, and `generate` makes the job's images."""

from __future__ import annotations

import hashlib
import os
import re

import pyarrow.parquet as pq
import pytest

from tests.jobs import REPO, decode, prompts_table, write_table

pytestmark = [pytest.mark.usefixtures("ray_local"), pytest.mark.timeout(240)]


def readme_example() -> str:
    text = (REPO / "README.md").read_text()
    match = re.search(r"<!-- api-example -->\n```python\n(.*?)```", text, re.S)
    assert match, "README.md lost its API example"
    return match.group(1)


def test_the_readme_example_generates_scores_filters_and_writes(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    os.symlink(tiny_model_dir, tmp_path / "models" / "tiny-sd15")
    ids = [f"cap-{i}" for i in range(6)]
    write_table(tmp_path / "prompts.parquet", prompts_table(6, id=ids, source=["web"] * 6))
    exec(compile(readme_example(), "README.md", "exec"), {"__name__": "readme_example"})

    table = pq.read_table(tmp_path / "out" / "scored")
    rows = table.to_pylist()
    assert rows, "the filter kept nothing: the example shows no output"
    assert all(r["score"] > 0.25 and r["status"] == "ok" for r in rows)
    assert {(r["id"], r["sample_index"]) for r in rows} <= {(i, k) for i in ids for k in (0, 1)}
    for row in rows:
        assert hashlib.sha256(row["image"]).hexdigest() == row["sha256"]
        assert decode(row["image"]).shape == (32, 32, 3)
        assert row["model_sha256"] and row["steps"] == 2 and row["extra"] == '{"source": "web"}'

    # The job on the same rows and settings makes the same images (float32 pixels may differ by one level
    # between batch compositions).
    from batchgen.pipeline import run_job
    from batchgen.storage import open_storage
    from tests.jobs import job_spec, manifest_rows

    run_job(job_spec(tiny_model_dir, str(tmp_path / "prompts.parquet"), str(tmp_path / "job"), **{
        "sampling.seed": 0, "sampling.num_images": 2, "sampling.steps": 2}))
    storage = open_storage(str(tmp_path / "job"))
    made = {(r["id"], r["sample_index"]): r for r in manifest_rows(storage)}
    for row in rows:
        job_row = made[row["id"], row["sample_index"]]
        assert job_row["seed"] == row["seed"]
        job_image = decode(storage.get(job_row["image_uri"][len(storage.uri) + 1 :])).astype(int)
        assert abs(job_image - decode(row["image"]).astype(int)).max() <= 1

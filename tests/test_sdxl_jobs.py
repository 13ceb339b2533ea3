"""SDXL end to end on a real local Ray, S3 (moto) in and out: a base job, and a base+refiner job killed and
resumed."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from batchgen.engine import Engine
from batchgen.errors import JobConfigError
from batchgen.manifest import request_from_row
from batchgen.models.loading import load_model
from batchgen.pipeline import plan_job, run_job
from batchgen.resume import check_fingerprint
from batchgen.storage import open_storage
from tests.jobs import (
    assert_accounted,
    decode,
    job_spec,
    kill_run_after_manifests,
    prompts_table,
    run_cli,
    success,
    wait_until_lease_free,
    write_spec,
)
from tests.test_job import upload_table

pytestmark = pytest.mark.usefixtures("ray_local")


def stored_image(storage, row) -> np.ndarray:
    return decode(storage.get(row["image_uri"][len(storage.uri) + 1 :]))


@pytest.mark.timeout(300)
def test_sdxl_job_on_s3_records_every_conditioning_value(tiny_sdxl_dir, s3_server, s3_bucket):
    sizes = pa.array([None, [64, 48], None, None, [16, 16], None], type=pa.list_(pa.int64()))
    table = prompts_table(6, id=list("abcdef"), prompt_2=[None, "oil paint", None, None, None, "ink"],
                          negative_prompt=["", "blur", None, "text", "", None]).append_column("original_size", sizes)
    prompts = upload_table(s3_bucket, "in/p.parquet", table)
    output = f"s3://{s3_bucket}/sdxl"
    summary = run_job(job_spec(tiny_sdxl_dir, prompts, output))
    storage = open_storage(output)
    rows = assert_accounted(storage, {(i, 0) for i in "abcdef"})
    assert summary["images_ok"] == 6 and all(r["status"] == "ok" for r in rows.values())
    a, b = rows["a", 0], rows["b", 0]
    assert a["scheduler"] == "euler", "`model`: the checkpoint's own Euler, recorded by name"
    assert (a["original_size"], a["crops_coords_top_left"], a["target_size"]) == ([32, 32], [0, 0], [32, 32])
    assert (b["original_size"], b["prompt_2"], a["prompt_2"]) == ([64, 48], "oil paint", None)
    assert a["refiner"] is None and a["aesthetic_score"] is None, "fields SDXL base does not use stay null"
    assert run_cli("inspect", output).returncode == 0
    model = load_model(a["model"], device="cpu", dtype=a["dtype"])
    for row in (a, b):
        again = Engine(model).generate([request_from_row(row)])[0].image
        assert np.abs(again.astype(int) - stored_image(storage, row).astype(int)).max() <= 1


@pytest.mark.timeout(480)
def test_sdxl_refiner_job_killed_then_resumed_exactly_once(tiny_sdxl_dir, tiny_refiner_dir, s3_server, s3_bucket,
                                                           tmp_path):
    n = 32
    ids = [f"r{i:02d}" for i in range(n)]
    prompts = upload_table(s3_bucket, "in/p.parquet", prompts_table(n, id=ids, aesthetic_score=[4.0] + [None] * 31))
    output = f"s3://{s3_bucket}/refined"
    # A short lease timeout: the rerun takes the killed driver's lease over once it is stale.
    settings = {"sampling.steps": 30, "compute.batch_size": 4, "output.lease_timeout_s": 3}
    spec = job_spec(tiny_sdxl_dir, prompts, output, **settings)
    spec_file = write_spec(tmp_path / "job.yaml", spec)
    storage = open_storage(output)
    # The CLI flags name the refiner; the run is killed (driver and its Ray) once two batches are committed.
    kill_run_after_manifests(spec_file, storage, tmp_path / "killed.log", "--refiner", str(tiny_refiner_dir),
                             "--refiner-start", "0.5")
    expected = {(i, 0) for i in ids}
    before = assert_accounted(storage, expected, finished=False)
    assert 0 < len(before) < n

    refined = job_spec(tiny_sdxl_dir, prompts, output, **settings,
                       **{"model.refiner": {"source": str(tiny_refiner_dir), "start": 0.5}})
    later_split = refined.model_copy(update={"model": refined.model.model_copy(update={
        "refiner": refined.model.refiner.model_copy(update={"start": 0.6})})})
    with pytest.raises(JobConfigError, match="model.refiner.start: 0.5 in the output, 0.6 now"):
        check_fingerprint(storage, plan_job(later_split).fingerprint)
    wait_until_lease_free(storage)
    run_job(refined)
    final = assert_accounted(storage, expected)
    assert all(r["status"] == "ok" for r in final.values())
    assert (success(storage)["skipped_done"], success(storage)["generated"]) == (len(before), n - len(before))
    assert all(before[k]["sha256"] == final[k]["sha256"] for k in before), "committed images were redone"
    first = final["r00", 0]
    assert (first["refiner"], first["refiner_start"], len(first["refiner_sha256"])) == (str(tiny_refiner_dir), 0.5, 64)
    assert (first["aesthetic_score"], final["r01", 0]["aesthetic_score"]) == (4.0, 6.0)
    assert final["r01", 0]["negative_aesthetic_score"] == 2.5
    assert run_cli("inspect", output).returncode == 0

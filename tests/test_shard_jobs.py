"""Shard layouts end to end on a real local Ray: a WebDataset job read back by the webdataset library, and a
driver killed while a shard upload is open, then the same command resuming."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from batchgen.manifest import manifest_parts
from batchgen.pipeline import run_job
from batchgen.spec import JobSpec
from batchgen.storage import Storage, open_storage
from tests.jobs import (
    REPO,
    assert_accounted,
    job_spec,
    kill_process_tree,
    manifest_rows,
    prompts_table,
    run_cli,
    wait_for,
    wait_until_lease_free,
    write_spec,
    write_table,
)
from tests.test_faults import pairs

pytestmark = pytest.mark.usefixtures("ray_local")


def samples_in_listed_shards(storage: Storage, tmp_path: Path) -> Counter:
    """(id, sample) of every sample the webdataset library reads from the shards the manifests list."""
    import json

    import webdataset as wds

    shards = sorted({r["image_uri"] for r in manifest_rows(storage) if r["status"] == "ok"})
    local = []
    for i, uri in enumerate(shards):
        path = tmp_path / f"shard-{i}.tar"
        path.write_bytes(storage.get(uri[len(storage.uri) + 1 :]))
        local.append(str(path))
    found = Counter()
    for sample in wds.WebDataset(local, shardshuffle=False, empty_check=False):
        meta = json.loads(sample["json"])
        found[meta["id"], meta["sample_index"]] += 1
    return found


@pytest.mark.timeout(240)
def test_webdataset_job_writes_full_shards_that_inspect_verifies(tiny_model_dir, tmp_path):
    prompts = write_table(tmp_path / "p.parquet", prompts_table(20))
    out = tmp_path / "out"
    summary = run_job(job_spec(tiny_model_dir, str(prompts), str(out), **{
        "output.layout": "webdataset", "output.shard_samples": 8, "compute.batch_size": 4}))
    storage = open_storage(str(out))
    final = assert_accounted(storage, pairs(20))
    assert summary["images_ok"] == 20
    per_shard = Counter(r["image_uri"] for r in final.values())
    assert sorted(per_shard.values()) == [4, 8, 8], "shards of shard_samples rows, the tail last"
    assert len(manifest_parts(storage)) == 3 and len(list(storage.list("shards/"))) == 3
    assert not list(storage.list("images/"))
    assert samples_in_listed_shards(storage, tmp_path) == Counter(pairs(20))
    assert run_cli("inspect", str(out)).returncode == 0


@pytest.mark.timeout(420)
def test_driver_killed_while_a_shard_is_open_then_rerun_lists_every_row_once(
    tiny_model_dir, s3_server, s3_bucket, tmp_path
):
    rows = 24
    prompts = write_table(tmp_path / "p.parquet", prompts_table(rows))
    output = f"s3://{s3_bucket}/out"
    spec = write_spec(tmp_path / "job.yaml", job_spec(tiny_model_dir, str(prompts), output, **{
        "output.layout": "webdataset", "output.shard_samples": 4, "output.retry_deadline_s": 120,
        "output.lease_timeout_s": 3,
        "sampling.steps": 6, "compute.batch_size": 4}))
    storage = open_storage(output, retry_deadline_s=60)
    env = {**os.environ, "RAY_ADDRESS": "local"}
    command = [sys.executable, "-m", "batchgen", "run", str(spec)]
    log = tmp_path / "killed.log"
    with open(log, "wb") as sink:
        driver = subprocess.Popen(command, cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        wait_for(lambda: manifest_parts(storage) or driver.poll() is not None, 240, "a committed shard", 0.1)
        s3_server.stop(keep_objects=True)
        # A store task retries S3 with its shard written locally and not yet uploaded (the lease check before
        # the upload, or the upload itself): the shard is open when the driver dies.
        wait_for(lambda: any("MapBatches(_store)" in line and "retrying in" in line
                             for line in log.read_text().splitlines()), 120, "a store task retrying S3")
    finally:
        kill_process_tree(driver)  # what outlives the driver is killed too (test_faults checks that none does)
        s3_server.start()
    assert driver.returncode == -signal.SIGKILL, log.read_text()[-3000:]
    before = assert_accounted(storage, pairs(rows), finished=False)
    assert 0 < len(before) < rows
    wait_until_lease_free(storage)  # the rerun takes the killed driver's lease over once it is stale

    rerun = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    final = assert_accounted(storage, pairs(rows))
    assert all(r["status"] == "ok" for r in final.values())
    assert all(before[key]["image_uri"] == final[key]["image_uri"] for key in before), "a committed shard was redone"
    assert samples_in_listed_shards(storage, tmp_path) == Counter(pairs(rows)), "every row once across shards"


def map_operators(tiny_model_dir, tmp_path, **settings) -> list[tuple[str, float]]:
    """(name, CPUs asked) of every map operator in the physical plan of a 4-row job with these spec settings."""
    from ray.data._internal.execution.operators.map_operator import MapOperator
    from ray.data._internal.logical.optimizers import get_execution_plan

    from batchgen.pipeline import build_dataset, plan_job, size_compute
    from batchgen.prompts import DoneKeys

    prompts = write_table(tmp_path / "p.parquet", prompts_table(4))
    spec = job_spec(tiny_model_dir, str(prompts), str(tmp_path / "out"), **{
        "compute.cpus_per_actor": 1.0, "compute.min_actors": 1, "compute.max_actors": 1, **settings})
    plan = plan_job(spec)
    with plan.output as output:
        output.start(plan.fingerprint)
        ds = build_dataset(plan, size_compute(spec.compute, 2, 0), output.store_stage(plan.model), DoneKeys())
        physical, _ = get_execution_plan(ds._logical_plan)
    ops, todo = [], [physical.dag]
    while todo:
        op = todo.pop()
        todo.extend(op.input_dependencies)
        if isinstance(op, MapOperator):
            ops.append((op.name, op._ray_remote_args.get("num_cpus")))
    return ops


@pytest.mark.timeout(120)
@pytest.mark.parametrize("layout", ["files", "webdataset", "parquet"])
def test_only_the_generators_ask_a_whole_cpu(tiny_model_dir, tmp_path, layout):
    """Every CPU stage of the job's physical plan asks a fraction of a CPU. A stage whose tasks ask Ray's
    default of 1 CPU waits, beside a 1-CPU generator on a 2-CPU node, until the 0.25-CPU tasks around it leave a
    whole CPU free: the shard layouts' bare re-blocking did (bench/RESULTS.md a, shard layouts)."""
    ops = map_operators(tiny_model_dir, tmp_path, **{"output.layout": layout, "output.shard_samples": 8})
    generators = [cpus for name, cpus in ops if "GeneratorActor" in name]
    assert generators == [1.0], ops
    stages = [(name, cpus) for name, cpus in ops if "GeneratorActor" not in name]
    assert any("_store" in name for name, _ in stages), ops
    assert all(cpus <= JobSpec().compute.cpus_per_storage_task for _, cpus in stages), stages


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("side", "fused"), [(128, True), (256, False)])
def test_a_shard_of_small_images_is_encoded_and_stored_in_one_task(tiny_model_dir, tmp_path, side, fused):
    """A shard of 1,000 128x128 images is 47 MiB of pixels: encoded, gathered and stored by one task (one task stage
    per row, not three). At 256x256 it is 188 MiB, above a Ray Data block's 128 MiB: encoded per generator call,
    so the re-blocking gathers compressed images into shards."""
    ops = map_operators(tiny_model_dir, tmp_path, **{"output.layout": "webdataset", "output.shard_samples": 1000,
                                                     "sampling.width": side, "sampling.height": side})
    after = [name for name, _ in ops if any(part in name for part in ("_encode", "_store", "=1000,strict=True"))]
    if fused:
        assert after == ["MapBatches(_encode)->StreamingRepartition[num_rows_per_block=1000,strict=True]->"
                         "MapBatches(_store)"], ops
    else:
        assert sorted(after) == ["MapBatches(_encode)", "MapBatches(_store)",
                                 "StreamingRepartition[num_rows_per_block=1000,strict=True]"], ops


def test_rows_that_set_their_own_size_are_encoded_per_call():
    from batchgen.pipeline import shard_encode_rows

    spec = JobSpec.model_validate({"output": {"uri": "/tmp/x", "layout": "parquet"},
                                   "sampling": {"width": 64, "height": 64}})
    assert shard_encode_rows(spec, {"prompt": "caption"}) == spec.output.shard_samples
    assert shard_encode_rows(spec, {"prompt": "caption", "height": "h"}) is None

"""End to end on a real local Ray: Parquet in, images and manifests out, on local disk and on S3 (moto)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import threading
from collections import Counter
from dataclasses import asdict

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchgen.engine import Engine
from batchgen.manifest import inspect_output, read_manifests, read_success, request_from_row
from batchgen.models.loading import load_model
from batchgen.pipeline import run_job
from batchgen.storage import open_storage
from tests.jobs import decode, job_spec, prompts_table, run_cli, write_table

pytestmark = pytest.mark.usefixtures("ray_local")


def manifest_rows(storage) -> list[dict]:
    return [row for _, table in read_manifests(storage) for row in table.to_pylist()]


def upload_table(bucket: str, key: str, table) -> str:
    import boto3

    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    boto3.client("s3").put_object(Bucket=bucket, Key=key, Body=buffer.getvalue())
    return f"s3://{bucket}/{key}"


def test_200_rows_to_s3_every_row_accounted(tiny_model_dir, s3_server, s3_bucket):
    ids = [f"row-{i:04d}" for i in range(200)]
    prompts = upload_table(s3_bucket, "in/prompts.parquet", prompts_table(200, id=ids))
    output = f"s3://{s3_bucket}/out"
    summary = run_job(job_spec(tiny_model_dir, prompts, output))

    storage = open_storage(output)
    rows = manifest_rows(storage)
    assert Counter(r["id"] for r in rows) == Counter(ids), "every input row exactly once"
    assert all(r["status"] == "ok" for r in rows)
    for row in rows[:: 20]:
        data = storage.get(row["image_uri"][len(output) + 1 :])
        assert hashlib.sha256(data).hexdigest() == row["sha256"] and len(data) == row["bytes"]
        assert decode(data).shape == (32, 32, 3)
    report = inspect_output(storage)
    assert report.healthy, report.problems
    assert report.ok == 200
    assert summary["images_ok"] == 200 and summary["errors"] == 0 and summary["rows"] == 200
    success = read_success(storage)
    assert success["images_ok_total"] == 200 and success["images_per_s"] > 0
    assert {r["worker"] for r in rows}.__len__() == 2, "both generator actors got work"
    assert all(r["model_sha256"] == rows[0]["model_sha256"] and len(r["model_sha256"]) == 64 for r in rows)
    versions = json.loads(rows[0]["versions"])
    assert {"torch", "diffusers", "transformers", "ray", "batchgen"} <= set(versions)
    assert storage.exists("_batchgen/job.yaml")
    assert run_cli("inspect", output).returncode == 0


def test_manifest_row_reproduces_its_image(tiny_model_dir, tmp_path):
    prompts = write_table(tmp_path / "p.parquet", prompts_table(12, negative_prompt=["blurry", ""] * 6))
    run_job(job_spec(tiny_model_dir, str(prompts), str(tmp_path / "out"), **{"sampling.scheduler": "euler_a"}))
    storage = open_storage(str(tmp_path / "out"))
    rows = manifest_rows(storage)
    model = load_model(rows[0]["model"], device="cpu", dtype=rows[0]["dtype"])
    engine = Engine(model)
    for row in rows[:3]:
        again = engine.generate([request_from_row(row)])[0].image
        stored = decode(storage.get(row["image_uri"][len(storage.uri) + 1 :]))
        # float32 differs across batch sizes by ~1e-6, which can flip a uint8 rounding: allow one level.
        assert np.abs(again.astype(int) - stored.astype(int)).max() <= 1


def test_local_output_mapped_columns_and_extras(tiny_model_dir, tmp_path):
    table = prompts_table(10).rename_columns(["caption"])
    table = table.append_column("source", [[f"set-{i % 3}" for i in range(10)]])
    prompts = write_table(tmp_path / "in" / "p.parquet", table)
    out = tmp_path / "out"
    run_job(job_spec(tiny_model_dir, str(prompts), str(out), **{"input.columns": {"caption": "prompt"}}))
    rows = manifest_rows(open_storage(str(out)))
    assert len(rows) == 10 and all(r["status"] == "ok" for r in rows)
    assert sorted(r["prompt"] for r in rows) == sorted(table.column("caption").to_pylist())
    assert sorted(json.loads(r["extra"])["source"] for r in rows) == sorted(f"set-{i % 3}" for i in range(10))
    for row in rows:
        assert (out / row["image_uri"][len(str(out)) + 1 :]).is_file()
    assert rows[0]["image_uri"].startswith(str(out) + "/images/")


def test_per_row_overrides(tiny_model_dir, tmp_path):
    table = prompts_table(
        4,
        id=["a", "b", "c", "d"],
        steps=[1, None, 3, 2],
        width=[40, 32, None, 32],
        height=[24, 32, None, 48],
        scheduler=["euler", None, "unipc", "ddim"],
        guidance_scale=[1.0, 3.0, None, 9.0],
        seed=[None, 77, None, 5],
        num_images=[1, 2, None, 3],
        negative_prompt=["dark", None, "", "text"],
    )
    prompts = write_table(tmp_path / "p.parquet", table)
    run_job(job_spec(tiny_model_dir, str(prompts), str(tmp_path / "out")))
    rows = {(r["id"], r["sample_index"]): r for r in manifest_rows(open_storage(str(tmp_path / "out")))}
    assert sorted(rows) == [("a", 0), ("b", 0), ("b", 1), ("c", 0), ("d", 0), ("d", 1), ("d", 2)]
    a, b0, b1, c, d2 = rows["a", 0], rows["b", 0], rows["b", 1], rows["c", 0], rows["d", 2]
    assert (a["steps"], a["width"], a["height"], a["scheduler"], a["guidance_scale"]) == (1, 40, 24, "euler", 1.0)
    assert (b0["steps"], b0["scheduler"], b0["guidance_scale"], b0["negative_prompt"]) == (2, "ddim", 3.0, "")
    assert (b0["seed"], b1["seed"]) == (77, 78), "a row's seed, plus the sample index"
    assert (c["steps"], c["width"], c["guidance_scale"], c["scheduler"]) == (3, 32, 7.5, "unipc")
    assert d2["seed"] == 7 and d2["negative_prompt"] == "text"
    assert all(r["status"] == "ok" for r in rows.values())
    stored = decode(open_storage(str(tmp_path / "out")).get(a["image_uri"].split("/out/", 1)[1]))
    assert stored.shape == (24, 40, 3)


def test_invalid_rows_become_error_rows(tiny_model_dir, tmp_path):
    table = prompts_table(
        6,
        steps=[2, 0, 2, 2, 2, 2],
        width=[32, 32, 30, 32, 32, 32],
        guidance_scale=[7.5, 7.5, 7.5, float("nan"), 7.5, 7.5],
        scheduler=["ddim", "ddim", "ddim", "ddim", "warp", "ddim"],
    )
    prompt_column = table.column("prompt").to_pylist()
    prompt_column[5] = ""
    table = table.set_column(0, "prompt", [prompt_column])
    prompts = write_table(tmp_path / "p.parquet", table)
    summary = run_job(job_spec(tiny_model_dir, str(prompts), str(tmp_path / "out")))
    rows = sorted(manifest_rows(open_storage(str(tmp_path / "out"))), key=lambda r: int(r["id"].split(":")[1]))
    assert [r["status"] for r in rows] == ["ok", "error", "error", "error", "error", "error"]
    assert "`steps` must be an integer in [1, 1000] but is 0" in rows[1]["error"]
    assert "`width` must be divisible by 8 but is 30" in rows[2]["error"]
    assert "`guidance_scale` must be a finite number >= 0 but is nan" in rows[3]["error"]
    assert "`scheduler` must be one of" in rows[4]["error"] and "'warp'" in rows[4]["error"]
    assert "`prompt` must be a non-empty string" in rows[5]["error"]
    assert summary["images_ok"] == 1 and summary["errors"] == 5


def test_missing_prompt_column_exits_2_naming_it(tmp_path, tiny_model_dir):
    prompts = write_table(tmp_path / "p.parquet", prompts_table(3).rename_columns(["text"]))
    result = run_cli("run", "--prompts", str(prompts), "--output", str(tmp_path / "out"),
                     "--model", str(tiny_model_dir))
    assert result.returncode == 2, result.stderr
    assert "has no column 'prompt'" in result.stderr and "p.parquet" in result.stderr
    assert not (tmp_path / "out").exists(), "nothing is written for an invalid job"


def test_unknown_model_dir_and_bad_flag_exit_2(tmp_path):
    prompts = write_table(tmp_path / "p.parquet", prompts_table(3))
    missing = run_cli("validate", "--prompts", str(prompts), "--model", str(tmp_path / "nomodel"))
    assert missing.returncode == 2 and "nomodel' does not exist" in missing.stderr
    bad = run_cli("validate", "--prompts", str(prompts), "--width", "100")
    assert bad.returncode == 2 and "sampling.width" in bad.stderr and "100" in bad.stderr


def test_same_job_twice_gives_identical_images(tiny_model_dir, tmp_path):
    prompts = write_table(tmp_path / "p.parquet", prompts_table(16))
    pixels = []
    for name, batch in (("one", 8), ("two", 3)):
        out = tmp_path / name
        run_job(job_spec(tiny_model_dir, str(prompts), str(out), **{"compute.batch_size": batch}))
        storage = open_storage(str(out))
        rows = sorted(manifest_rows(storage), key=lambda r: r["id"])
        pixels.append([decode(storage.get(r["image_uri"][len(storage.uri) + 1 :])).astype(int) for r in rows])
    assert len(pixels[0]) == len(pixels[1]) == 16
    for a, b in zip(*pixels, strict=True):
        assert np.abs(a - b).max() <= 1


def test_queued_blocks_live_in_the_object_store_not_the_driver(ray_local):
    """Ray returns results under RAY_max_direct_call_object_size inline into the owner's (the driver's) heap,
    where Ray Data's read-ahead of prompt rows made the driver grow with the input. With WORKER_ENV a block of
    a call's rows (tens of KB) goes to the object store; tiny results (block metadata, summaries) stay inline."""
    import ray
    from ray.experimental import get_object_locations

    from batchgen.pipeline import WORKER_ENV

    @ray.remote(num_cpus=0.25)
    def payload(size: int) -> bytes:
        return b"x" * size

    block, tiny = payload.remote(20_000), payload.remote(200)
    ray.wait([block, tiny], num_returns=2, timeout=60)
    where = get_object_locations([block, tiny])
    assert int(WORKER_ENV["RAY_max_direct_call_object_size"]) < 20_000
    assert where[block]["node_ids"], "a 20 kB result was inlined into the driver"
    assert where[tiny]["node_ids"] == [], "a 200-byte result went to the object store"


def test_a_ray_started_by_batchgen_gets_the_worker_env(monkeypatch):
    """The session Ray above is started by the tests; this checks that `batchgen run`'s own local Ray gets
    the same environment (and runs without a dashboard), and that joining a cluster leaves its env alone."""
    import ray

    from batchgen.pipeline import WORKER_ENV, init_ray, node_config

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    init_ray(None)
    init_ray("ray://head:10001")
    assert calls[0]["address"] is None and calls[0]["runtime_env"] == {"env_vars": WORKER_ENV}
    assert calls[0]["include_dashboard"] is False
    assert calls[0]["_system_config"] == node_config(os.cpu_count())
    assert calls[1]["address"] == "ray://head:10001" and calls[1]["runtime_env"] is None
    assert calls[1]["_system_config"] is None  # a cluster's raylets have their own (infra/Dockerfile)


def test_reader_waits_for_the_generators_within_the_read_ahead_cap(tiny_model_dir, tmp_path, monkeypatch):
    """Ray Data budgets object-store bytes, so without a cap in rows the reader of a big table runs the whole
    table ahead of the generators (in blocks the driver keeps bookkeeping for). The cap holds the rows read but
    not yet handed to a generator to the cap plus the read tasks in flight (one row group of 20 rows each).
    With the cap lifted, the same job queues over a hundred rows (reading starts once the actors are up)."""
    from batchgen.readahead import ReadAheadCap

    path = tmp_path / "p.parquet"
    pq.write_table(prompts_table(600), path, row_group_size=20)
    queued: list[int] = []
    can_add_input = ReadAheadCap.can_add_input

    def spy(self, op):
        if self._gated and op is self._gated[-1]:  # the reader
            queued.append(self.queued_rows(op))
        return can_add_input(self, op)

    monkeypatch.setattr(ReadAheadCap, "can_add_input", spy)
    peaks = {}
    for calls in (1, 1024):  # cap = max(8 rows x 2 actors x calls, 8 rows per read + 8): 16, then 16,384
        queued.clear()
        out = tmp_path / f"out-{calls}"
        spec = job_spec(tiny_model_dir, str(path), str(out), **{
            "input.rows_per_read": 8, "compute.read_ahead_calls": calls})
        assert run_job(spec)["images_ok"] == 600
        report = inspect_output(open_storage(str(out)))
        assert report.healthy and report.ok == 600, report.problems
        peaks[calls] = max(queued)
    assert peaks[1] <= 16 + 2 * 20, peaks  # compute.read_tasks = 2 read tasks in flight
    # Lifted, the reader runs past that bound and past twice the capped run's own peak: 112-164 rows seen (capped:
    # 32) since the re-blocking before the generators asks 0.25 CPU; 184-344 while it asked a whole CPU and lagged.
    assert peaks[1024] > max(16 + 2 * 20, 2 * peaks[1]), peaks


def _thread_niceness(pid: int) -> list[int]:
    """Niceness of every thread of `pid` (field 19 of /proc/PID/task/TID/stat, after the command's ')')."""
    values = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/stat") as f:
            values.append(int(f.read().rsplit(")", 1)[1].split()[16]))
    return values


def test_generators_outrank_the_cpu_stages(tiny_model_dir, tmp_path):
    """Ray starts every worker at niceness 15, below the driver, the raylet and an S3 server on the node; with
    WORKER_ENV the generator runs at the OS default and the store workers at compute.cpu_stage_nice, so on
    shared cores the model's threads win (the reader: the test above). Seen by sampling /proc while a job runs."""
    import psutil

    path = write_table(tmp_path / "p.parquet", prompts_table(96))
    seen: dict[str, list[list[int]]] = {"generator": [], "store": []}
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.05):
            for proc in psutil.process_iter(["cmdline"]):
                with contextlib.suppress(psutil.Error, OSError, IndexError, ValueError):
                    title = " ".join(proc.info["cmdline"] or [])
                    role = "generator" if "GeneratorActor" in title else "store" if "(_store)" in title else None
                    if role and title.startswith("ray::"):
                        seen[role].append(_thread_niceness(proc.pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        spec = job_spec(tiny_model_dir, str(path), str(tmp_path / "out"), **{"compute.cpu_stage_nice": 17})
        assert run_job(spec)["images_ok"] == 96
    finally:
        stop.set()
        sampler.join()
    assert seen["generator"] and all(max(sample) == 0 for sample in seen["generator"]), seen["generator"][:3]
    # a sample may land between the task starting and its first line raising the threads
    assert any(min(sample) >= 17 for sample in seen["store"]), seen["store"][:3]
    assert all(max(sample) <= 17 for sample in seen["store"]), seen["store"][:3]


def test_the_reader_lowers_its_worker_before_reading(tiny_model_dir, tmp_path):
    """The read stage, run as the Ray task it is, lowers every thread of its worker to compute.cpu_stage_nice
    and yields the table's rows. (Sampling /proc during a job cannot show this: a fresh worker spends ~0.5 s
    unpickling and importing before the function runs, and a worker that ran a store task is lowered already;
    18 is a value no other test asks for.)"""
    import ray

    from batchgen.pipeline import read_prompt_rows
    from batchgen.prompts import ANY_MODEL, DoneKeys, plan_input

    path = write_table(tmp_path / "p.parquet", prompts_table(12))
    spec = job_spec(tiny_model_dir, str(path), str(tmp_path / "out"))
    plan = plan_input(spec.input)

    @ray.remote(num_cpus=0.25)
    def read_in_a_worker(task: dict) -> tuple[int, list[int]]:
        blocks = read_prompt_rows(pa.Table.from_pylist([task]), plan, spec.sampling, ANY_MODEL, 8,
                                  ray.put(DoneKeys([])), 18)
        return sum(block.num_rows for block in blocks), _thread_niceness(os.getpid())

    rows, niceness = ray.get(read_in_a_worker.remote(asdict(plan.tasks[0])))
    assert rows == 12
    assert set(niceness) == {18}, niceness

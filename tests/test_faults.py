"""Faults caused for real while a job runs: a generator actor and the driver SIGKILLed, the S3 endpoint down for
a while or for good, S3 answering 503 SlowDown, a row whose generation overflows, a model that fails to load
in the actors. Each test checks that every row is accounted for exactly once and that a rerun generates only
what was missing."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import psutil
import pytest
from click.testing import CliRunner

from batchgen.cli import main
from batchgen.lease import latest_epoch, read_holder
from batchgen.manifest import manifest_parts
from batchgen.pipeline import run_job
from batchgen.storage import open_storage
from tests.jobs import (
    REPO,
    JobThread,
    assert_accounted,
    job_spec,
    kill_run_after_manifests,
    manifest_rows,
    prompts_table,
    success,
    wait_for,
    wait_until_lease_free,
    write_spec,
    write_table,
)
from tests.s3proxy import answer, forwarding_proxy

pytestmark = pytest.mark.usefixtures("ray_local")


def pairs(n: int, file_key: str = "p.parquet") -> set[tuple[str, int]]:
    return {(f"{file_key}:{i}", 0) for i in range(n)}


def busy_generator_pid(storage) -> int | None:
    """The pid of a generator actor that has committed rows and is now inside a batch. The pid comes from the
    manifests (`worker` is host:pid), so it is this job's actor; Ray titles an actor process
    `ray::<class>.<method>` while a call runs, so the title says whether it is mid-batch."""
    for pid in sorted({int(r["worker"].rsplit(":", 1)[1]) for r in manifest_rows(storage) if r["worker"]}):
        with contextlib.suppress(psutil.Error):
            title = " ".join(psutil.Process(pid).cmdline())
            if "GeneratorActor" in title and ".submit" in title:
                return pid
    return None


@pytest.mark.timeout(240)
def test_generator_actor_killed_mid_batch_is_restarted_and_its_rows_redone(tiny_model_dir, tmp_path):
    prompts = write_table(tmp_path / "p.parquet", prompts_table(24))
    out = tmp_path / "out"
    spec = job_spec(tiny_model_dir, str(prompts), str(out), **{"sampling.steps": 40, "compute.batch_size": 4})
    storage = open_storage(str(out))
    restarted_before = restarted_generator_actors()
    job = JobThread(spec)
    job.start()
    killed = wait_for(lambda: busy_generator_pid(storage), 150, "a generator actor inside a batch", 0.02)
    os.kill(killed, signal.SIGKILL)
    committed_at_kill = len(manifest_parts(storage))
    summary = job.result(timeout=180)

    assert not psutil.pid_exists(killed)
    assert committed_at_kill < 6, "the kill came after the last batch: nothing was left to redo"
    final = assert_accounted(storage, pairs(24))
    assert all(r["status"] == "ok" for r in final.values())
    assert (summary["generated"], summary["images_ok"], summary["skipped_done"]) == (24, 24, 0)
    assert restarted_generator_actors() - restarted_before, "Ray did not restart the killed actor"


def restarted_generator_actors() -> set[str]:
    """Ids of this session's generator actors that Ray has restarted (GCS actor table: no dashboard needed)."""
    import ray

    actors = ray._private.state.actors().values()
    return {a["ActorID"] for a in actors if "GeneratorActor" in a["ActorClassName"] and a["NumRestarts"] > 0}


@pytest.mark.timeout(120)
def test_row_whose_generation_overflows_becomes_an_error_row_and_its_batch_is_kept(tiny_model_dir, tmp_path):
    """Honest poison: guidance 1e300 is a finite float64 that passes validation, but it is inf in the float32
    denoiser, so that row's latents become inf/NaN for real. No test hook in the product is involved."""
    guidance = [7.5] * 8
    guidance[5] = 1e300
    prompts = write_table(tmp_path / "p.parquet", prompts_table(8, guidance_scale=guidance))
    out = tmp_path / "out"
    summary = run_job(job_spec(tiny_model_dir, str(prompts), str(out), **{"compute.batch_size": 8}))

    storage = open_storage(str(out))
    final = assert_accounted(storage, pairs(8))
    poisoned = final["p.parquet:5", 0]
    assert poisoned["status"] == "error" and "non-finite" in poisoned["error"]
    assert poisoned["guidance_scale"] == 1e300 and poisoned["image_uri"] is None
    kept = [r for key, r in final.items() if key != ("p.parquet:5", 0)]
    assert all(r["status"] == "ok" for r in kept)
    # One block of 8 rows, one sampling group: all 8 shared a single denoiser call, poisoned row included.
    assert {(r["worker"], r["batch_size"]) for r in final.values()} == {(poisoned["worker"], 8)}
    assert (summary["images_ok"], summary["errors"], summary["generated"]) == (7, 1, 8)

    again = run_job(job_spec(tiny_model_dir, str(prompts), str(out), **{"output.retry_errors": False}))
    assert (again["generated"], again["skipped_done"]) == (0, 8)
    assert_accounted(storage, pairs(8))


@pytest.mark.timeout(180)
def test_model_that_fails_to_load_in_the_actors_fails_fast_with_the_loaders_message(tiny_model_dir, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    corrupt = bytearray(weights.read_bytes())
    corrupt[:8] = (1 << 40).to_bytes(8, "little")  # a safetensors header length far past the end of the file
    weights.write_bytes(bytes(corrupt))
    prompts = write_table(tmp_path / "p.parquet", prompts_table(8))
    spec = write_spec(tmp_path / "job.yaml", job_spec(model, str(prompts), str(tmp_path / "out")))

    started = time.monotonic()
    result = CliRunner().invoke(main, ["run", str(spec)])
    assert time.monotonic() - started < 120, "failing to load should stop the job, not leave it waiting"
    assert result.exit_code == 1, result.output
    message = result.stderr
    assert "batchgen: job failed: job failed while running:" in message
    assert "cannot load model" in message and "unet/diffusion_pytorch_model.safetensors" in message
    storage = open_storage(str(tmp_path / "out"))
    assert not manifest_parts(storage) and not storage.exists("_SUCCESS")


@pytest.mark.timeout(240)
def test_s3_down_for_10s_mid_job_uploads_retry_and_the_job_completes(
    tiny_model_dir, s3_server, s3_bucket, tmp_path, capfd
):
    prompts = write_table(tmp_path / "p.parquet", prompts_table(24))
    output = f"s3://{s3_bucket}/out"
    spec = job_spec(tiny_model_dir, str(prompts), output, **{"sampling.steps": 20, "compute.batch_size": 4,
                                                              "output.retry_deadline_s": 60})
    storage = open_storage(output)
    job = JobThread(spec)
    job.start()
    wait_for(lambda: manifest_parts(storage), 150, "the first manifest")
    s3_server.stop(keep_objects=True)
    try:
        time.sleep(10)
    finally:
        s3_server.start()
    summary = job.result(timeout=180)

    final = assert_accounted(storage, pairs(24))
    assert all(r["status"] == "ok" for r in final.values())
    assert summary["images_ok"] == 24 and success(storage)["images_ok_total"] == 24
    # The store tasks' own warnings, which Ray forwards from the workers to this driver's stderr.
    retried = [line for line in capfd.readouterr().err.splitlines() if "retrying in" in line]
    assert any("Could not connect to the endpoint URL" in line for line in retried), retried[:3]


@pytest.mark.timeout(240)
def test_s3_down_past_the_retry_deadline_fails_with_exit_1_and_a_rerun_resumes(
    tiny_model_dir, s3_server, s3_bucket, tmp_path
):
    prompts = write_table(tmp_path / "p.parquet", prompts_table(24))
    output = f"s3://{s3_bucket}/out"
    settings = {"sampling.steps": 20, "compute.batch_size": 4}
    # The failing run cannot release its lease while S3 is down: a short lease timeout lets the rerun take it.
    spec = job_spec(tiny_model_dir, str(prompts), output, **settings,
                    **{"output.retry_deadline_s": 3, "output.lease_timeout_s": 2})
    storage = open_storage(output, retry_deadline_s=30)
    result: dict = {}

    def run() -> None:
        invoked = CliRunner().invoke(main, ["run", str(write_spec(tmp_path / "job.yaml", spec))])
        result.update(exit_code=invoked.exit_code, output=invoked.output, stderr=invoked.stderr)

    cli = threading.Thread(target=run, daemon=True)
    cli.start()
    wait_for(lambda: manifest_parts(storage), 150, "the first manifest")
    s3_server.stop(keep_objects=True)
    try:
        cli.join(120)
    finally:
        s3_server.start()
    assert not cli.is_alive(), "the job kept waiting for S3 past its retry deadline"
    assert result["exit_code"] == 1, result["output"]
    assert f"{output}/" in result["stderr"] and "failed after" in result["stderr"], result["stderr"]

    before = assert_accounted(storage, pairs(24), finished=False)
    assert 0 < len(before) < 24
    wait_until_lease_free(storage)
    summary = run_job(job_spec(tiny_model_dir, str(prompts), output, **settings, **{"output.retry_deadline_s": 60}))
    final = assert_accounted(storage, pairs(24))
    assert all(r["status"] == "ok" for r in final.values())
    assert (summary["skipped_done"], summary["generated"]) == (len(before), 24 - len(before))


@contextlib.contextmanager
def throttling_proxy(upstream: str, every: int) -> Iterator[dict[str, int]]:
    """An HTTP proxy to `upstream` that answers every `every`-th PUT with 503 SlowDown, as S3 does under load;
    yields counts of what it forwarded and refused."""
    counts = {"put": 0, "throttled": 0}
    lock = threading.Lock()

    def throttle(handler) -> bool:
        if handler.command != "PUT":
            return False
        with lock:
            counts["put"] += 1
            refused = counts["put"] % every == 0
            counts["throttled"] += refused
        if refused:
            answer(handler, 503, b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message>"
                                 b"</Error>")
        return refused

    with forwarding_proxy(upstream, throttle) as port:
        counts["port"] = port
        yield counts


@pytest.mark.timeout(420)
def test_driver_killed_mid_job_then_the_same_command_resumes_through_a_throttling_s3(
    tiny_model_dir, s3_server, s3_bucket, tmp_path
):
    rows = 48
    prompts = write_table(tmp_path / "p.parquet", prompts_table(rows))
    output = f"s3://{s3_bucket}/out"
    spec = write_spec(tmp_path / "job.yaml", job_spec(tiny_model_dir, str(prompts), output, **{
        "sampling.steps": 40, "compute.batch_size": 4, "output.retry_deadline_s": 60,
        "output.lease_timeout_s": 3}))
    storage = open_storage(output)
    with throttling_proxy(s3_server.endpoint, every=4) as proxy:
        env = {**os.environ, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{proxy['port']}", "RAY_ADDRESS": "local"}
        survivors = kill_run_after_manifests(spec, storage, tmp_path / "killed.log", timeout=240, env=env)
        assert not survivors, f"processes outlived the killed driver by 30 s: {survivors}"
        before = assert_accounted(storage, pairs(rows), finished=False)
        assert 0 < len(before) < rows
        holder = read_holder(storage, latest_epoch(storage))
        assert not holder.released, "a SIGKILLed driver cannot release its lease"
        wait_until_lease_free(storage)  # the rerun takes the dead driver's lease over once it is stale

        rerun = subprocess.run([sys.executable, "-m", "batchgen", "run", str(spec)], cwd=REPO, env=env,
                               capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    final = assert_accounted(storage, pairs(rows))
    assert all(r["status"] == "ok" for r in final.values())
    summary = success(storage)
    assert (summary["skipped_done"], summary["generated"]) == (len(before), rows - len(before))
    assert proxy["throttled"] > 0, "the proxy never answered SlowDown"
    assert all(before[key]["sha256"] == final[key]["sha256"] for key in before), "committed images were redone"
    assert "took over the lease" in rerun.stderr and f"run {holder.run_id}" in rerun.stderr, rerun.stderr[-3000:]
    assert (summary["lease_epoch"], latest_epoch(storage)) == (holder.epoch + 1, holder.epoch + 1)


"""Helpers and fixtures for end-to-end job tests: a local Ray, prompt tables, specs sized for 2 cores."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from batchgen.manifest import SUCCESS_KEY, inspect_output, manifest_parts, read_manifests, read_success
from batchgen.spec import JobSpec, dump_spec, load_spec
from batchgen.storage import Storage

REPO = Path(__file__).resolve().parent.parent

PROMPT_WORDS = ["lighthouse", "ramen", "fox", "garden", "harbor", "robot", "canyon", "owl", "teapot", "glacier"]


def prompts_table(n: int, start: int = 0, **columns: list[Any]) -> pa.Table:
    data: dict[str, Any] = {
        "prompt": [f"a {PROMPT_WORDS[i % len(PROMPT_WORDS)]} number {i}" for i in range(start, start + n)]
    }
    data.update(columns)
    return pa.table(data)


def write_table(path: Path, table: pa.Table) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def job_spec(model_dir: Path, prompts: str, output: str, **overrides: Any) -> JobSpec:
    """Small images and few steps; two actors of 0.4 CPU so the reader and the store stage always run."""
    values = {
        "input.prompts": prompts,
        "output.uri": output,
        "model.source": str(model_dir),
        "model.device": "cpu",
        "model.dtype": "float32",
        "sampling.steps": 2,
        "sampling.width": 32,
        "sampling.height": 32,
        "sampling.seed": 5,
        "compute.batch_size": 8,
        "compute.batches_per_call": 1,  # one manifest per model batch: fault and resume tests count them
        "compute.min_actors": 2,
        "compute.max_actors": 2,
        "compute.cpus_per_actor": 0.4,
        "compute.torch_threads": 1,
        "compute.no_progress_timeout_s": 120,
    }
    values.update(overrides)
    return load_spec(None, values)


def decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "batchgen", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
        env=env,
    )


def write_spec(path: Path, spec: JobSpec) -> Path:
    """The spec as a YAML file, for `batchgen run SPEC`."""
    path.write_text(dump_spec(spec))
    return path


def manifest_rows(storage: Storage) -> list[dict[str, Any]]:
    return [row for _, table in read_manifests(storage) for row in table.to_pylist()]


def assert_accounted(
    storage: Storage, expected: Iterable[tuple[str, int]], *, finished: bool = True
) -> dict[tuple[str, int], dict[str, Any]]:
    """Every expected (id, sample) is accounted for exactly once: by one ok row, or by error rows only (one per
    run at most); no other pair is listed; every ok row's object exists with its recorded size and sha256, and
    `batchgen inspect` finds no duplicate and no orphan. For an output whose last run did not finish
    (`finished=False`), pairs may still be missing, `_SUCCESS` must be absent and orphan images (uploaded, their
    manifest never written) are allowed. Returns the deciding row of each listed pair."""
    expected = set(expected)
    rows = manifest_rows(storage)
    per_run = Counter((r["run_id"], r["id"], r["sample_index"]) for r in rows)
    assert max(per_run.values(), default=1) == 1, f"a run listed a pair twice: {per_run.most_common(3)}"
    ok = Counter((r["id"], r["sample_index"]) for r in rows if r["status"] == "ok")
    assert max(ok.values(), default=1) == 1, f"duplicate ok rows: {ok.most_common(3)}"
    deciding = {(r["id"], r["sample_index"]): r for r in rows if r["status"] != "ok"}
    deciding.update({(r["id"], r["sample_index"]): r for r in rows if r["status"] == "ok"})
    report = inspect_output(storage)
    problems = report.problems
    if finished:
        assert set(deciding) == expected, (sorted(expected - set(deciding))[:5], sorted(set(deciding) - expected)[:5])
    else:
        assert set(deciding) <= expected, sorted(set(deciding) - expected)[:5]
        assert not storage.exists(SUCCESS_KEY), "_SUCCESS written by a run that did not finish"
        problems = [p for p in problems if not p.startswith("orphan object") and "_SUCCESS" not in p]
    assert not problems, problems
    assert report.ok == len(ok)
    return deciding


def success(storage: Storage) -> dict[str, Any]:
    summary = read_success(storage)
    assert summary is not None, f"{storage.uri} has no _SUCCESS"
    return summary


def wait_until_lease_free(storage: Storage, timeout: float = 60) -> None:
    """Wait until a rerun may take the output's lease: released, or stale by its holder's timeout (a driver that
    was killed, or failed where it could not reach the output to release it)."""
    from batchgen.lease import latest_epoch, read_holder

    deadline = time.monotonic() + timeout
    while True:
        epoch = latest_epoch(storage)
        holder = read_holder(storage, epoch) if epoch else None
        if holder is None or holder.released or time.time() - holder.heartbeat_at > holder.timeout_s:
            return
        assert time.monotonic() < deadline, f"the lease on {storage.uri} stayed live for {timeout} s: {holder}"
        time.sleep(0.1)


def wait_for(condition, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def kill_process_tree(process: subprocess.Popen, timeout: float = 30) -> list[psutil.Process]:
    """SIGKILL the driver's process group, then every process it had started (Ray's gcs and raylet share the
    group; Ray workers have groups of their own and exit when their raylet dies). Returns the processes that
    outlived the driver by more than `timeout` (then killed by pid)."""
    tree = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(10)
    _, alive = psutil.wait_procs(tree, timeout=timeout)
    for survivor in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            survivor.kill()
    psutil.wait_procs(alive, timeout=10)
    return alive

def kill_run_after_manifests(spec_file: Path, storage: Storage, log: Path, *args: str, manifests: int = 2,
                             timeout: float = 300, env: dict[str, str] | None = None) -> list[psutil.Process]:
    """Runs `batchgen run SPEC ARGS` with a Ray of its own and SIGKILLs it and its processes once `manifests`
    manifest parts are committed; fails if it finished first. Returns the processes that outlived it."""
    command = [sys.executable, "-m", "batchgen", "run", str(spec_file), *args]
    with open(log, "wb") as sink:
        driver = subprocess.Popen(command, cwd=REPO, env=env or {**os.environ, "RAY_ADDRESS": "local"},
                                  stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: len(manifest_parts(storage)) >= manifests or driver.poll() is not None, timeout,
                 f"{manifests} manifests from the first run", 0.1)
    finally:
        survivors = kill_process_tree(driver)
    assert driver.returncode == -signal.SIGKILL, log.read_text()[-3000:]
    return survivors


class JobThread(threading.Thread):
    """`run_job(spec)` on a thread, so a test can cause a fault while the job runs."""

    def __init__(self, spec: JobSpec):
        super().__init__(daemon=True)
        self.spec = spec
        self.summary: dict[str, Any] | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        from batchgen.pipeline import run_job

        try:
            self.summary = run_job(self.spec)
        except BaseException as e:  # noqa: BLE001 - handed to the test by result()
            self.error = e

    def result(self, timeout: float) -> dict[str, Any]:
        self.join(timeout)
        assert not self.is_alive(), f"the job did not finish within {timeout} s"
        if self.error is not None:
            raise self.error
        assert self.summary is not None
        return self.summary


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """One local Ray for the session: 2 CPUs, as on the CI machine. Started after the S3 server so its
    workers inherit the AWS endpoint settings, as a cluster's nodes carry their own AWS configuration."""
    import ray

    from batchgen.pipeline import WORKER_ENV, node_config

    # The worker environment and raylet settings a Ray started by `batchgen run` (and a submitted job) gets.
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", runtime_env={"env_vars": WORKER_ENV},
             _system_config=node_config(2))
    yield
    ray.shutdown()

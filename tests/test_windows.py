"""A big input as consecutive windows, each its own Ray Data execution in a child process (batchgen.windows)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchgen.errors import BatchgenError, JobConfigError
from batchgen.lease import latest_epoch, read_holder
from batchgen.manifest import SUCCESS_KEY
from batchgen.pipeline import run_job
from batchgen.prompts import DoneKeys, all_done, plan_input, sample_key
from batchgen.spec import InputSpec, load_spec
from batchgen.storage import open_storage
from batchgen.windows import plan_windows
from tests.jobs import (
    REPO,
    assert_accounted,
    job_spec,
    prompts_table,
    success,
    wait_for,
    wait_until_lease_free,
    write_spec,
)
from tests.test_bad_input import corrupt_pages


def write_groups(path, sizes: list[int], start: int = 0):
    """A prompt file whose row groups have the given sizes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with pq.ParquetWriter(path, pa.schema([("prompt", pa.string())])) as writer:
        for size in sizes:
            writer.write_table(prompts_table(size, start=start))
            start += size
    return path


def test_windows_are_whole_row_groups_in_planned_order(tmp_path):
    write_groups(tmp_path / "in" / "a.parquet", [4, 4, 4, 10])
    write_groups(tmp_path / "in" / "b.parquet", [4, 3])
    plan = plan_input(InputSpec(prompts=str(tmp_path / "in")))

    windows = plan_windows(plan, 8)

    cut = [[(t.file_key, t.row_group) for t in w.tasks] for w in windows]
    assert cut == [[("a.parquet", 0), ("a.parquet", 1)], [("a.parquet", 2)], [("a.parquet", 3)],  # 10 > 8: alone
                   [("b.parquet", 0), ("b.parquet", 1)]]
    assert [w.rows for w in windows] == [8, 4, 10, 7]
    assert [w.files for w in windows][-1] == [str(tmp_path / "in" / "b.parquet")]
    assert [t for w in windows for t in w.tasks] == plan.tasks, "every row group exactly once, in order"
    assert plan_windows(plan_input(InputSpec(prompts=str(tmp_path / "in"))), 8) == windows, "a rerun cuts the same"
    assert plan_windows(plan, 0) == [plan] and plan_windows(plan, None) == [plan] and plan_windows(plan, 29) == [plan]


def test_a_window_is_done_when_its_own_rows_are(tmp_path):
    """The resume check reads only the window's row groups: window 2's rows done, window 1's not."""
    write_groups(tmp_path / "p.parquet", [4, 4])
    plan = plan_input(InputSpec(prompts=str(tmp_path / "p.parquet")))
    first, second = plan_windows(plan, 4)
    done = DoneKeys([sample_key(f"p.parquet:{i}", 0) for i in range(4, 8)])
    assert all_done(second, load_spec().sampling, done)
    assert not all_done(first, load_spec().sampling, done)
    assert not all_done(plan, load_spec().sampling, done)


@pytest.mark.parametrize("value", [-1, "many"])
def test_window_rows_is_validated(value):
    with pytest.raises(JobConfigError) as refusal:
        load_spec(None, {"compute.window_rows": value})
    assert "compute.window_rows" in str(refusal.value) and repr(value) in str(refusal.value)


def signal_in_window_2(command: list[str], log_path, signum: int, group: bool = False):
    """Start a 3-window job's driver; once window 2 starts, send it `signum` (`group`: to its whole process group,
    as a terminal's Ctrl-C does; the driver gets a session of its own). Returns the ended driver, the window
    processes it had at that moment and its log."""
    with open(log_path, "wb") as log:
        driver = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=group)
    send = os.killpg if group else os.kill
    try:
        wait_for(lambda: "window 2/3" in log_path.read_text() or driver.poll() is not None, 240, "window 2 started",
                 0.1)
        windows = children_named(driver.pid, "multiprocessing")
        send(driver.pid, signum)
        driver.wait(60)
    finally:
        if driver.poll() is None:
            send(driver.pid, signal.SIGKILL)
    return driver, windows, log_path.read_text()


def children_named(pid: int, fragment: str) -> list[psutil.Process]:
    found = []
    for child in psutil.Process(pid).children(recursive=True):
        try:
            if fragment in " ".join(child.cmdline()):
                found.append(child)
        except psutil.Error:
            pass
    return found


@pytest.mark.timeout(420)
def test_a_windowed_job_killed_mid_job_resumes_without_redoing_a_window_and_matches_one_execution(
    tiny_model_dir, ray_local, tmp_path
):
    """12 rows in row groups of 2 as 3 windows of 4 rows. The driver is SIGKILLed (its pid alone) once window 1 is
    committed; its window process dies with it; the rerun skips window 1 without starting it and generates only
    the rest. The images equal those of the same job as one execution (batch size 1: the same float rounding)."""
    import ray

    rows = 12
    prompts = write_groups(tmp_path / "p.parquet", [2] * 6)
    expected = {(f"p.parquet:{i}", 0) for i in range(rows)}
    window_1 = {(f"p.parquet:{i}", 0) for i in range(4)}
    settings = {"compute.batch_size": 1, "compute.min_actors": 1, "compute.max_actors": 1,
                "output.lease_timeout_s": 3}
    reference = run_job(job_spec(tiny_model_dir, str(prompts), str(tmp_path / "one"), **settings,
                                 **{"compute.window_rows": 0}))
    assert reference["images_ok"] == rows
    one = assert_accounted(open_storage(str(tmp_path / "one")), expected)

    output = tmp_path / "windowed"
    spec = write_spec(tmp_path / "job.yaml", job_spec(tiny_model_dir, str(prompts), str(output), **settings,
                                                      **{"compute.window_rows": 4}))
    storage = open_storage(str(output))
    command = [sys.executable, "-m", "batchgen", "run", str(spec), "--address", ray.get_runtime_context().gcs_address]
    driver, windows, log = signal_in_window_2(command, tmp_path / "killed.log", signal.SIGKILL)
    assert driver.returncode == -signal.SIGKILL, log[-3000:]
    assert windows, "no window process was running when the driver was killed"
    _, alive = psutil.wait_procs(windows, timeout=30)
    assert not alive, f"window processes outlived their killed driver: {alive}"
    before = assert_accounted(storage, expected, finished=False)
    assert window_1 <= set(before) and len(before) < rows
    wait_until_lease_free(storage)

    rerun = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "window 1/3 (4 rows from p.parquet row group 0): every image is committed, skipped" in rerun.stderr
    final = assert_accounted(storage, expected)
    summary = success(storage)
    assert (summary["skipped_done"], summary["generated"]) == (len(before), rows - len(before))
    assert summary["images_ok_total"] == rows
    assert all(before[key]["sha256"] == final[key]["sha256"] for key in before), "committed images were redone"
    assert {key: row["sha256"] for key, row in final.items()} == {key: row["sha256"] for key, row in one.items()}


@pytest.mark.timeout(300)
def test_ctrl_c_during_a_window_exits_130_releases_the_lease_and_leaves_no_window(tiny_model_dir, ray_local,
                                                                                  tmp_path):
    """Ctrl-C in a terminal reaches the driver and its window process (one process group): the job exits 130
    saying how to resume, the window process is gone, the lease is released at once, window 1 stays committed
    and no _SUCCESS is written."""
    import ray

    prompts = write_groups(tmp_path / "p.parquet", [2] * 6)
    settings = {"compute.batch_size": 1, "compute.min_actors": 1, "compute.max_actors": 1,
                "compute.window_rows": 4}
    output = tmp_path / "out"
    spec = write_spec(tmp_path / "job.yaml", job_spec(tiny_model_dir, str(prompts), str(output), **settings))
    command = [sys.executable, "-m", "batchgen", "run", str(spec), "--address", ray.get_runtime_context().gcs_address]
    driver, windows, log = signal_in_window_2(command, tmp_path / "run.log", signal.SIGINT, group=True)
    assert driver.returncode == 130, log[-3000:]
    assert "interrupted; run the same command again to resume" in log
    assert windows, "no window process was running at Ctrl-C"
    _, alive = psutil.wait_procs(windows, timeout=30)
    assert not alive, f"window processes outlived the interrupted job: {alive}"
    storage = open_storage(str(output))
    assert read_holder(storage, latest_epoch(storage)).released
    assert not storage.exists(SUCCESS_KEY)
    committed = assert_accounted(storage, {(f"p.parquet:{i}", 0) for i in range(12)}, finished=False)
    assert {(f"p.parquet:{i}", 0) for i in range(4)} <= set(committed), "window 1's images were lost"


@pytest.mark.timeout(240)
def test_a_failing_window_fails_the_job_and_releases_the_lease(tiny_model_dir, ray_local, tmp_path):
    """Window 1's data pages are corrupt (found only by reading its rows, in the window's process): the job
    fails with the reader's message naming the file, window 2 never starts, the lease is released, no _SUCCESS."""
    corrupt_pages(tmp_path / "in" / "a.parquet", 40)
    write_groups(tmp_path / "in" / "b.parquet", [4])
    output = tmp_path / "out"
    with pytest.raises(BatchgenError) as failure:
        run_job(job_spec(tiny_model_dir, str(tmp_path / "in"), str(output), **{"compute.window_rows": 4}))
    assert "cannot read Parquet file" in str(failure.value) and "a.parquet" in str(failure.value)
    assert not isinstance(failure.value, JobConfigError)
    storage = open_storage(str(output))
    assert read_holder(storage, latest_epoch(storage)).released
    assert not storage.exists(SUCCESS_KEY)
    assert not assert_accounted(storage, set(), finished=False), "window 2 ran after window 1 failed"


def sleep_as_a_window(parent_pid: int) -> None:
    """A stand-in for a window's process (no Ray): protected as one, then busy for far longer than the test."""
    from batchgen.windows import _die_with_parent

    _die_with_parent(parent_pid)
    time.sleep(300)


SPAWNS_A_WINDOW = """
import multiprocessing, os, sys, time
from tests.test_windows import sleep_as_a_window
child = multiprocessing.get_context("spawn").Process(target=sleep_as_a_window, args=(os.getpid(),))
child.start()
time.sleep(2)  # the child has set its death signal by then, or is still starting (then the pid check catches it)
print(child.pid, flush=True)
time.sleep(300)
"""


def test_a_window_process_dies_with_its_driver():
    """The driver SIGKILLed (nothing of it runs to clean up): the kernel ends its window process at once."""
    driver = subprocess.Popen([sys.executable, "-c", SPAWNS_A_WINDOW], cwd=REPO, stdout=subprocess.PIPE, text=True)
    window = None
    try:
        window = psutil.Process(int(driver.stdout.readline()))
        assert window.is_running()
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(10)
        _, alive = psutil.wait_procs([window], timeout=20)
        assert not alive, "the window process outlived its killed driver"
    finally:
        driver.kill()
        if window is not None and window.is_running():
            window.kill()

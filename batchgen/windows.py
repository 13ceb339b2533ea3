"""A big input as consecutive windows of whole row groups, each its own Ray Data execution in a short-lived child
process. A Ray Data driver grows with the rows an execution streams and keeps that memory after the execution
ends (bench/RESULTS.md c), so the job's long-lived driver, which holds the lease, the output and the totals,
runs no execution itself once the input is larger than `compute.window_rows`."""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import sys
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from batchgen.errors import BatchgenError
from batchgen.output import RunTally
from batchgen.prompts import DoneKeys, InputPlan, ReadTask, committed_pairs
from batchgen.stages import StoreStage

if TYPE_CHECKING:  # pipeline imports this module
    from batchgen.pipeline import JobPlan, Progress, Resources

logger = logging.getLogger(__name__)


def plan_windows(plan: InputPlan, window_rows: int | None) -> list[InputPlan]:
    """The input's row groups, in planned order, cut into consecutive windows of at most `window_rows` rows (a
    larger row group is a window of its own); the whole plan when `window_rows` is 0 or None or the input fits.
    The cut depends on the planned input alone, so a resumed run cuts the same windows."""
    if not window_rows or plan.rows <= window_rows:
        return [plan]
    windows: list[InputPlan] = []
    tasks: list[ReadTask] = []
    for task in plan.tasks:
        if tasks and sum(t.rows for t in tasks) + task.rows > window_rows:
            windows.append(_window(plan, tasks))
            tasks = []
        tasks.append(task)
    windows.append(_window(plan, tasks))
    return windows


def _window(plan: InputPlan, tasks: list[ReadTask]) -> InputPlan:
    files = list(dict.fromkeys(task.path for task in tasks))
    return replace(plan, files=files, tasks=tasks, rows=sum(task.rows for task in tasks))


@dataclass(frozen=True)
class WindowWork:
    """What a window's child process needs to build and run its execution: picklable, no lease, no output."""

    plan: JobPlan  # `input` is the window's; no output (the lease stays with the driver)
    resources: Resources
    stage: StoreStage  # the output's store stage, fenced by the driver's lease epoch
    done: DoneKeys
    ray_address: str
    runtime_env: dict[str, Any] | None
    log_level: int


def stream_windows(plan: JobPlan, resources: Resources, stage: StoreStage, done: DoneKeys,
                   progress: Progress) -> RunTally:
    """Stream the job, window by window: in this process when it is one window, else each window in a child
    process whose store calls' summaries come back here (totals, progress). A window whose images are all
    committed is skipped; a window that fails fails the job (the caller releases the lease)."""
    from batchgen.pipeline import build_dataset, stream

    spec = plan.spec
    windows = plan_windows(plan.input, spec.compute.window_rows)
    if len(windows) == 1:
        return stream(build_dataset(plan, resources, stage, done), progress)
    import ray

    ray_address = ray.get_runtime_context().gcs_address
    runtime_env = dict(ray.get_runtime_context().runtime_env)
    run = RunTally()
    for number, window in enumerate(windows, 1):
        first = window.tasks[0]
        where = f"window {number}/{len(windows)} ({window.rows} rows from {first.file_key} row group {first.row_group})"
        skipped = committed_pairs(window, spec.sampling, done)
        if skipped is not None:
            logger.info("%s: every image is committed, skipped", where)
            run.skipped += skipped
            continue
        logger.info("%s: starting", where)
        work = WindowWork(replace(plan, input=window, output=None), resources, stage, done, ray_address,
                          runtime_env, logging.getLogger().getEffectiveLevel())
        _run_child(work, where, run, progress)
    return run


def _run_child(work: WindowWork, where: str, run: RunTally, progress: Progress) -> None:
    from ray import cloudpickle

    context = multiprocessing.get_context("spawn")  # never fork a process that runs Ray's threads
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(target=_window_main, args=(cloudpickle.dumps(work), sender, os.getpid()),
                            name="batchgen-window", daemon=False)
    child.start()
    sender.close()  # the child holds the only writer: its exit ends recv() with EOFError
    finished = False
    try:
        while True:
            try:
                kind, value = receiver.recv()
            except EOFError:
                break
            if kind == "summary":
                run.add(value)
                progress.update(value["ok"] + value["errors"])
            elif kind == "error":
                raise BatchgenError(value)
            else:
                finished = True
        child.join()
        if not finished:
            raise BatchgenError(f"job failed while running: {where} ended without finishing "
                                f"(its process exited with {child.exitcode})")
    finally:
        receiver.close()
        if child.is_alive():  # failed or interrupted here: the window's execution must not outlive its job
            child.terminate()
            child.join(30)
            if child.is_alive():
                child.kill()
                child.join()


def _window_main(payload: bytes, sender, parent_pid: int) -> None:
    """The child: join the parent's Ray, run the window's execution, send each store call's summary back."""
    _die_with_parent(parent_pid)
    from ray import cloudpickle

    work: WindowWork = cloudpickle.loads(payload)
    logging.basicConfig(level=work.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)
    for noisy in ("ray", "botocore", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        from batchgen.console import quiet_benign_warnings, quiet_ray_data_console
        from batchgen.pipeline import _job_error, build_dataset, configure_data, join_ray

        quiet_benign_warnings()
        quiet_ray_data_console()
        join_ray(work.ray_address, work.runtime_env)
        configure_data(work.plan.spec, work.resources)
        ds = build_dataset(work.plan, work.resources, work.stage, work.done)
        try:
            for summaries in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                for row in summaries.to_pylist():
                    sender.send(("summary", row))
        except Exception as e:  # noqa: BLE001 - the stage's own message goes to the parent
            sender.send(("error", str(_job_error(e))))
            return
        sender.send(("finished", None))
    except KeyboardInterrupt:
        return  # Ctrl-C reached the whole process group: the parent reports it
    except Exception as e:  # noqa: BLE001 - a window that cannot start fails the job with its reason
        sender.send(("error", f"job failed while running: cannot start the window: {type(e).__name__}: {e}"))
    finally:
        sender.close()


def _die_with_parent(parent_pid: int) -> None:
    """A killed driver must not leave its window running: the kernel kills this process when the thread that
    started it ends (Linux; that thread waits for the window), and a parent that died before that was set is
    caught by the pid check."""
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != parent_pid:
        os._exit(1)

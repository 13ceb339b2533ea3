"""Job assembly: plan (no Ray), then a lazy Ray Data pipeline read -> [fetch init images] -> generate ->
encode+store -> summary."""

from __future__ import annotations

import logging
import math
import os
import re
import time
from collections.abc import Collection
from dataclasses import asdict, dataclass
from typing import Any

import pyarrow as pa

from batchgen.errors import BatchgenError, JobConfigError
from batchgen.fetch import ImageFetcher, fetch_images
from batchgen.models.plan import plan_model
from batchgen.models.schedulers import MODEL_SCHEDULER
from batchgen.models.source import ModelFacts
from batchgen.output import JobOutput, RunTally
from batchgen.prompts import DoneKeys, InputPlan, ReadTask, RowReader, all_done, plan_input
from batchgen.resume import fingerprint, with_placement
from batchgen.rows import FIELD, IMAGE_FIELDS, Rules
from batchgen.spec import ComputeSpec, JobSpec, SamplingSpec
from batchgen.stages import EncodeStage, GeneratorActor, StoreStage, below_generators
from batchgen.windows import stream_windows

logger = logging.getLogger(__name__)
_progress_log = logging.getLogger("batchgen.progress")
# CPUs a read, fetch or re-blocking task asks: a fraction, so that several run beside a 1-CPU generator.
LIGHT_TASK_CPUS = 0.25


@dataclass(frozen=True)
class Resources:
    """How the generator stage is sized on the cluster it runs on."""

    min_actors: int
    max_actors: int
    gpus_per_actor: float
    cpus_per_actor: float
    torch_threads: int
    custom: dict[str, float]


def size_compute(compute: ComputeSpec, cluster_cpus: float, cluster_gpus: float) -> Resources:
    """One GPU per actor when GPUs exist; on CPU-only clusters a CPU share that leaves the other stages room
    (actors holding every CPU starve the reader and the job hangs)."""
    has_gpus = cluster_gpus > 0
    gpus = compute.gpus_per_actor if compute.gpus_per_actor is not None else (1.0 if has_gpus else 0.0)
    if compute.max_actors is not None:
        max_actors = compute.max_actors
    elif gpus > 0:
        max_actors = max(compute.min_actors, int(cluster_gpus // gpus))
    else:
        max_actors = compute.min_actors
    if compute.max_actors is not None and compute.max_actors < compute.min_actors:
        raise JobConfigError(
            f"`compute.max_actors` ({compute.max_actors}) must be >= `compute.min_actors` ({compute.min_actors})"
        )
    if compute.cpus_per_actor is not None:
        cpus = compute.cpus_per_actor
    elif has_gpus:
        cpus = 1.0
    else:
        cpus = round(max(0.1, min(1.0, (cluster_cpus - 0.75) / max_actors)), 2)
    if not has_gpus and cpus * max_actors > cluster_cpus - 0.5:
        raise JobConfigError(
            f"`compute.cpus_per_actor` {cpus} x {max_actors} actors leaves less than 0.5 of the cluster's "
            f"{cluster_cpus:g} CPUs for reading and storing: the job would stall"
        )
    default_threads = max(1, math.ceil(cpus)) if has_gpus else max(1, int(cluster_cpus // max_actors))
    threads = compute.torch_threads or default_threads
    custom = {compute.accelerator_resource: 1.0} if compute.accelerator_resource else {}
    return Resources(compute.min_actors, max_actors, gpus, cpus, threads, custom)


@dataclass(frozen=True)
class JobPlan:
    spec: JobSpec
    input: InputPlan
    model_options: dict[str, Any]
    model: ModelFacts
    rules: Rules  # what the model's family reads and accepts, for the reader
    fingerprint: dict[str, Any]
    output: JobOutput


def prepare_model(spec: JobSpec) -> tuple[dict[str, Any], ModelFacts, Rules]:
    """The model side of the plan (batchgen.models.plan): load options, manifest facts, the reader's rules."""
    return plan_model(spec.model, spec.sampling)


def plan_job(spec: JobSpec) -> JobPlan:
    """Everything that can be checked before Ray starts: input files and columns, the model, the output. The
    fingerprint's device class and dtype stay unresolved where they depend on the cluster's GPUs."""
    output = JobOutput(spec)  # an unsupported output scheme fails here, before any work
    model_options, facts, rules = prepare_model(spec)
    input_plan = plan_input(spec.input, rules, output=spec.output.uri)
    # The fingerprint names the scheduler that runs: `model` and the name it stands for make the same images;
    # likewise an unset T5 length and the length it stands for.
    ran = spec
    resolved: dict[str, Any] = {}
    if spec.sampling.scheduler == MODEL_SCHEDULER:
        resolved["scheduler"] = rules.model_scheduler
    if spec.sampling.max_sequence_length is None and "max_sequence_length" in rules.fields:
        resolved["max_sequence_length"] = FIELD["max_sequence_length"].default
    if resolved:
        ran = spec.model_copy(update={"sampling": spec.sampling.model_copy(update=resolved)})
    return JobPlan(spec, input_plan, model_options, facts, rules,
                   fingerprint(ran, facts, input_plan.identity, spec.compute.gpus_per_actor), output)


def build_dataset(plan: JobPlan, resources: Resources, stage: StoreStage, done: DoneKeys):
    """The lazy, streaming Dataset of per-batch summaries; nothing runs until it is iterated. `done`: the pairs the
    reader skips; `stage`: the output's store stage."""
    import ray

    spec = plan.spec
    done_ref = ray.put(done)  # shipped once through the object store, not inside every read task
    nice = spec.compute.cpu_stage_nice
    tasks = [asdict(t) for t in plan.input.tasks]
    ds = ray.data.from_items(tasks, override_num_blocks=len(tasks))
    ds = ds.map_batches(read_prompt_rows, batch_size=1, batch_format="pyarrow", num_cpus=LIGHT_TASK_CPUS,
                        fn_kwargs={"plan": plan.input, "sampling": spec.sampling, "rules": plan.rules,
                                   "rows_per_read": spec.input.rows_per_read, "done_ref": done_ref, "nice": nice},
                        compute=ray.data.TaskPoolStrategy(size=min(spec.compute.read_tasks, max(1, len(tasks)))))
    ds = add_fetch(ds, plan.input.columns, spec)
    ds = add_generator(ds, plan.model_options, spec.compute, resources)
    if spec.output.layout != "files":
        # One store call writes one shard: the generators' outputs are encoded, then gathered into shard-sized
        # blocks, so a shard is written and committed within one task (a retried task redoes it whole, under a
        # new name) and no writer state outlives a task.
        ds = ds.map_batches(_encode, fn_kwargs={"stage": stage.encoder, "nice": nice},
                            batch_size=shard_encode_rows(spec, plan.input.columns), batch_format="pyarrow",
                            num_cpus=spec.compute.cpus_per_storage_task)
        ds = reblock(ds, spec.output.shard_samples, spec.compute.cpus_per_storage_task, strict=True)
    return ds.map_batches(
        _store, fn_kwargs={"stage": stage, "nice": nice}, batch_size=None, batch_format="pyarrow",
        num_cpus=spec.compute.cpus_per_storage_task,
    )


def shard_encode_rows(spec: JobSpec, fields: Collection[str]) -> int | None:
    """Rows per encode call in a shard layout. A whole shard where its pixels fit in one Ray Data block of the
    default target size (128 MiB): Ray Data then fuses the encode, the re-blocking into shards and the store into
    one task per shard, one task stage per row instead of three (bench/RESULTS.md c). Else None, one generator
    call at a time, so the re-blocking gathers compressed images, never a shard of pixels (1,000 1024x1024
    images are 3 GiB). Rows that set their own size may be larger than the spec says: encoded per call."""
    from ray.data.context import DEFAULT_TARGET_MAX_BLOCK_SIZE

    if "width" in fields or "height" in fields:
        return None
    shard_pixels = spec.output.shard_samples * spec.sampling.width * spec.sampling.height * 3
    return spec.output.shard_samples if shard_pixels <= DEFAULT_TARGET_MAX_BLOCK_SIZE else None


def add_fetch(ds, fields: Collection[str] | None, spec: JobSpec):
    """Work rows -> the same rows with their init images and masks fetched and decoded, on CPU, so the generators
    never wait on I/O: the job's and `batchgen.generate`'s. `fields`: the row fields the input maps; no stage
    where none names an image, the stage where they are unknown (rows without images pass it unchanged)."""
    import ray

    if fields is not None and not any(name in fields for name in IMAGE_FIELDS):
        return ds
    fetcher = ImageFetcher(spec.output.retry_deadline_s, spec.input.fetch_workers, spec.input.max_image_bytes,
                           spec.input.max_image_pixels)
    return ds.map_batches(fetch_images, batch_size=spec.compute.batch_size * spec.compute.batches_per_call,
                          batch_format="pyarrow", num_cpus=LIGHT_TASK_CPUS,
                          fn_kwargs={"fetcher": fetcher, "nice": spec.compute.cpu_stage_nice},
                          compute=ray.data.TaskPoolStrategy(size=spec.input.fetch_tasks))


def add_generator(ds, model_options: dict[str, Any], compute: ComputeSpec, resources: Resources):
    """Work rows -> generated rows (pixels) on a pool of generator actors: the job's and `batchgen.generate`'s."""
    import ray

    # Small tables arrive as one block: split so every actor gets work; a call carries batches_per_call batches.
    rows_per_call = compute.batch_size * compute.batches_per_call
    ds = reblock(ds, rows_per_call, LIGHT_TASK_CPUS)
    return ds.map_batches(
        GeneratorActor,
        fn_constructor_kwargs={"model_options": model_options, "batch_size": compute.batch_size,
                               "torch_threads": resources.torch_threads},
        batch_size=rows_per_call,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(min_size=resources.min_actors, max_size=resources.max_actors),
        num_cpus=resources.cpus_per_actor,
        num_gpus=resources.gpus_per_actor,
        resources=resources.custom or None,
    )


def read_prompt_rows(batch: pa.Table, plan: InputPlan, sampling: SamplingSpec, rules: Rules, rows_per_read: int,
                     done_ref: Any, nice: int):
    """The read stage: a batch of ReadTasks (one Parquet row group each) to work rows. The operator is named
    after this function: batchgen.readahead finds the reader by it."""
    import ray

    below_generators(nice)
    reader = RowReader(plan, sampling, rows_per_read, ray.get(done_ref), rules)
    for task in batch.to_pylist():
        yield from reader.read(ReadTask(**task))


def reblock(ds, rows: int, num_cpus: float, strict: bool = False):
    """`ds` in blocks of `rows` rows (strict: exactly, the last one shorter) by tasks that ask `num_cpus` CPUs.
    `Dataset.repartition` takes no resource arguments and its tasks ask Ray's default of 1 CPU: beside a 1-CPU
    generator on a 2-CPU node such a task waits until the 0.25-CPU tasks around it leave a whole CPU free. The
    request is set on the repartition's logical operator, a Ray Data internal: where it is missing, say so and
    keep the default."""
    ds = ds.repartition(target_num_rows_per_block=rows, strict=strict)
    args = getattr(ds._logical_plan.dag, "ray_remote_args", None)
    if isinstance(args, dict):
        args["num_cpus"] = num_cpus
    else:
        logger.warning("cannot set the re-blocking's CPUs on this Ray: its tasks ask 1 CPU each")
    return ds


def _encode(batch: pa.Table, stage: EncodeStage, nice: int) -> pa.Table:
    below_generators(nice)
    return stage(batch)


def _store(batch: pa.Table, stage: StoreStage, nice: int) -> pa.Table:
    below_generators(nice)
    return stage(batch)


class Progress:
    """A log line every `interval_s`: images done, images/s, ETA. Quiet enough for a log file. Every update also
    goes to the `batchgen.progress` logger, which the CLI draws as a live bar on a terminal."""

    def __init__(self, expected: int, interval_s: float = 10.0):
        self.expected = expected
        self.interval_s = interval_s
        self.start = time.monotonic()
        self.last = self.start
        self.done = 0

    def update(self, images: int) -> None:
        self.done += images
        now = time.monotonic()
        rate = self.done / max(now - self.start, 1e-9)
        _progress_log.info("%d/%d", self.done, self.expected, extra={"progress": (self.done, self.expected, rate)})
        if now - self.last >= self.interval_s:
            self.last = now
            rate = self.done / (now - self.start)
            left = max(0, self.expected - self.done)
            eta = f"{left / rate:.0f}s" if rate > 0 else "?"
            logger.info("images %d/%d (est.), %.2f images/s, ETA %s", self.done, self.expected, rate, eta)


# Set for every process of a job: a Ray started here and submitted jobs get them through their runtime_env,
# `batchgen run --address` on a cluster node from the image (infra/Dockerfile).
# RAY_max_direct_call_object_size: Ray returns a task result smaller than this (default 100 KiB) inline to the
# task's owner, i.e. into the driver's own heap, and Ray Data reads ahead of a slow generator as far as its
# object store budget allows (GBs): so every queued block of prompt rows (tens of KB for a call's rows) sat in
# the driver until its turn, and the driver grew with the input (bench/orchestration.py: +120 MiB from
# 10,000 to 300,000 rows, flat with this). Above 1 KiB they go to the object store, where Ray Data budgets,
# spills and frees them; block metadata and the per-call summaries stay inline.
# RAY_worker_niceness: Ray starts every worker at niceness 15, below the driver, the raylet and anything else on
# the node, and the generator with them. At 0 the generator outranks the read and store workers, which lower
# themselves to compute.cpu_stage_nice (stages.below_generators): where they share cores (CPU generators; on a
# GPU node, the thread feeding the GPU among many PNG encoders) the model wins and the stages catch up.
WORKER_ENV = {"TOKENIZERS_PARALLELISM": "false", "RAY_max_direct_call_object_size": "1024",
              "RAY_worker_niceness": "0"}


def node_config(cpus: int) -> dict[str, Any]:
    """Raylet settings for a node with `cpus` CPUs (`_system_config` of a Ray started here; on a cluster, the same
    names as RAY_* variables of `ray start`, infra/). num_workers_soft_limit: a raylet kills idle workers beyond
    this many after a second, by default one per CPU; the light stages' 0.25-CPU tasks run four per CPU, so
    workers were killed between a stage's tasks and started again (each start imports Ray, pyarrow and
    batchgen: ~0.7 s of CPU). Kept instead, one per light task that fits on the node."""
    return {"num_workers_soft_limit": math.ceil(cpus / LIGHT_TASK_CPUS)}


def init_ray(address: str | None) -> None:
    import ray

    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS")
        local = address is None
        # A Ray started here runs without its dashboard (ignored when joining a cluster): on a 2-core machine
        # the dashboard cost 3 ms of CPU per image in steady state, taken from the generator. Ray sizes a local
        # node from the CPUs it can use; os.cpu_count() is at least that, so no light task's worker is cut.
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True, include_dashboard=False,
                 runtime_env={"env_vars": WORKER_ENV} if local else None,
                 _system_config=node_config(os.cpu_count() or 1) if local else None)
    _quiet_data_context()


def join_ray(gcs_address: str, runtime_env: dict[str, Any] | None) -> None:
    """Join the Ray another batchgen process started or joined (a window's process, batchgen.windows), with its
    runtime_env; a submitted job's driver passes its own to its children through the environment."""
    import ray
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

    inherited = RAY_JOB_CONFIG_JSON_ENV_VAR in os.environ  # given twice, Ray refuses it as a conflict
    ray.init(address=gcs_address, logging_level=logging.WARNING, log_to_driver=True,
             runtime_env=None if inherited else runtime_env)
    _quiet_data_context()


def _quiet_data_context() -> None:
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False


def cluster_totals() -> tuple[float, float]:
    import ray

    totals = ray.cluster_resources()
    return float(totals.get("CPU", 0)), float(totals.get("GPU", 0))


def run_job(spec: JobSpec) -> dict[str, Any]:
    """Plan, start the output (its lease), start (or join) Ray, stream the job (window by window on a big input),
    commit the output (_SUCCESS last); returns the summary."""
    started = time.time()
    plan = plan_job(spec)
    with plan.output as output:
        done = output.start(plan.fingerprint)
        if all_done(plan.input, spec.sampling, done):
            logger.info("every image of %s is already committed: nothing to generate", output.uri)
            return output.commit(plan.input.rows, RunTally(skipped=len(done)), started)
        resources = start_ray(spec)
        output.begin(with_placement(plan.fingerprint, spec, resources.gpus_per_actor))
        progress = Progress(max(0, plan.input.rows * spec.sampling.num_images - len(done)))
        run = stream_windows(plan, resources, output.store_stage(plan.model), done, progress)
        return output.commit(plan.input.rows, run, started)


def start_ray(spec: JobSpec) -> Resources:
    """Start (or join) Ray, size the generator stage, set Ray Data's limits for this job."""
    init_ray(spec.compute.address)
    resources = size_compute(spec.compute, *cluster_totals())
    logger.info("generator: %d-%d actors x (%.2f CPU, %g GPU, %d torch threads); batch size %d",
                resources.min_actors, resources.max_actors, resources.cpus_per_actor, resources.gpus_per_actor,
                resources.torch_threads, spec.compute.batch_size)
    configure_data(spec, resources)
    return resources


def configure_data(spec: JobSpec, resources: Resources) -> None:
    """Ray Data's limits for this job, in the process that runs its execution."""
    from ray.data import DataContext

    from batchgen.readahead import install as install_read_ahead_cap
    from batchgen.readahead import read_ahead_rows

    context = DataContext.get_current()
    context.execution_no_progress_timeout_s = spec.compute.no_progress_timeout_s
    # Start reading once min_actors generators are up: while none is, Ray Data's liveness rule runs the reader
    # past any backpressure (nothing is running), so a long model load would let it read the whole input.
    context.wait_for_min_actors_s = math.ceil(spec.compute.no_progress_timeout_s)
    rows_per_call = spec.compute.batch_size * spec.compute.batches_per_call
    install_read_ahead_cap(context, read_ahead_rows(
        rows_per_call, resources.max_actors, spec.compute.read_ahead_calls, spec.input.rows_per_read))


def stream(ds, progress: Progress) -> RunTally:
    """Run the pipeline to the end, summing its store calls' summaries."""
    run = RunTally()
    try:
        for summaries in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            for row in summaries.to_pylist():
                run.add(row)
                progress.update(row["ok"] + row["errors"])
    except Exception as e:  # Ray wraps stage failures: surface the stage's own error
        raise _job_error(e) from e
    return run


def _job_error(error: BaseException) -> BatchgenError:
    """A failed stream as one BatchgenError (exit code 1) carrying the failing stage's own message. Ray hands a
    worker's exception to the driver as traceback text only (a RayTaskError around Ray Data's UserCodeException,
    or an ActorDiedError for an actor that failed in `__init__`), and chains a bare SystemException under its
    own failures; so the message is the last `batchgen.<module>.X: ...` line of that text, else the last other
    `SomeError: ...` line, else the deepest non-empty message (e.g. Ray Data's no-progress timeout)."""
    chain: list[BaseException] = []
    seen: BaseException | None = error
    while seen is not None and all(seen is not e for e in chain):
        chain.append(seen)
        cause = getattr(seen, "cause", None)  # RayTaskError: the worker-side exception (its own chain is lost)
        seen = cause if isinstance(cause, BaseException) else seen.__cause__
    text = "\n".join(str(each) for each in chain)
    ours = _OUR_ERROR_LINE.findall(text)
    if ours:
        return BatchgenError(f"job failed while running: {ours[-1]}")
    theirs = [line for line in _ERROR_LINE.findall(text) if not line.startswith("ray.")]
    if theirs:
        return BatchgenError(f"job failed while running: {theirs[-1]}")
    deepest = next((str(each).strip() for each in reversed(chain) if str(each).strip()), type(error).__name__)
    return BatchgenError(f"job failed while running: {deepest}")


# Any batchgen exception class (errors.py and storage.py's StorageUnavailable, NotFound...), named in a traceback.
_OUR_ERROR_LINE = re.compile(r"^batchgen\.(?:\w+\.)+[A-Z]\w*: (.+)$", re.MULTILINE)
_ERROR_LINE = re.compile(r"^((?:[A-Za-z_]\w*\.)*\w*(?:Error|Exception): .+)$", re.MULTILINE)

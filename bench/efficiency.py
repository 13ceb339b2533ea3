"""Pipeline efficiency: steady-state images/s of the whole `batchgen run` over images/s of the bare engine.

    .venv/bin/python bench/efficiency.py [--small 40] [--large 200] [--repeats 3] [--px 128] [--steps 10]
    .venv/bin/python bench/efficiency.py --layout webdataset     # or parquet: shards of --shard-samples images

Both sides use the same SD-shaped random-weight model (`--size bench`), batch size, steps, size, guidance
and total torch threads. The bare side is `batchgen.engine.Engine.generate` in this process, after one
warm-up batch. The pipeline side is the real command (`batchgen run SPEC`: Parquet on S3 -> local Ray ->
generator actor -> PNG encode -> S3 on a moto_server subprocess -> manifests -> _SUCCESS), run twice with
`--small` and `--large` images; its steady-state rate is (large - small) / (wall_large - wall_small),
so start-up (Ray, model load, first batch) and the final drain cancel out. Cold start is reported as
measured (see bench/coldstart.py for the breakdown). Each repeat runs the bare loop ((large - small) / 2
images) right before and right after the two pipeline runs and uses the mean, so a busy period hits both
sides; the table shows the load and the cores other processes used next to each repeat. CPU seconds per
image by process role (large run minus small run) do not depend on the load and show where time goes.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import threading
import time

from _common import (
    OUT,
    MotoServer,
    add_quiet_options,
    bench_model,
    busy_cpu_s,
    job,
    load1,
    machine,
    median,
    own_cpu_s,
    prompts,
    quiet_repeats,
    run_batchgen,
    save,
    table,
    torch_threads,
    wait_quiet,
    write_spec,
)


def bare_rate(engine, images: int, batch_size: int, steps: int, px: int, guidance: float):
    """images/s of Engine.generate on consecutive batches (the work one actor call does, minus Ray), the
    cores other processes used meanwhile, and this process's CPU ms per image."""
    from batchgen.engine import GenerationRequest

    texts = prompts(images)
    busy, own = busy_cpu_s(), own_cpu_s()
    start = time.perf_counter()
    for first in range(0, images, batch_size):
        batch = [GenerationRequest(prompt=texts[i], seed=i, steps=steps, width=px, height=px,
                                   guidance_scale=guidance) for i in range(first, min(images, first + batch_size))]
        results = engine.generate(batch)
        assert all(r.ok for r in results)
    wall = time.perf_counter() - start
    own = own_cpu_s() - own
    other = max(0.0, (busy_cpu_s() - busy) - own) / wall
    return images / wall, other, 1000 * own / images


def pin_threads(pid: int, cpus: set[int]) -> None:
    """Every thread of `pid` onto `cpus` (affinity is per thread; threads started later inherit it)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):
            os.sched_setaffinity(int(tid), cpus)


class ModelCores:
    """--isolate: the model gets cores of its own, as a GPU is a device of its own. Everything this benchmark
    starts (Ray, the batchgen command, moto) inherits `rest` from this process; a watcher moves every thread of
    the generator actor (found by its Ray process title) onto `model` while the job runs, and the bare loop
    runs on `model` too."""

    def __init__(self, model: set[int], rest: set[int]):
        self.model, self.rest = model, rest
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.pinned: set[int] = set()  # generator actor pids moved onto the model cores (recorded per repeat)

    def start_watch(self) -> None:
        import psutil

        def watch() -> None:
            me = psutil.Process()
            while not self._stop.wait(0.2):
                for proc in me.children(recursive=True):
                    with contextlib.suppress(psutil.Error, OSError):
                        if "GeneratorActor" in " ".join(proc.cmdline()):
                            pin_threads(proc.pid, self.model)
                            self.pinned.add(proc.pid)

        self._stop.clear()
        self._thread = threading.Thread(target=watch, daemon=True)
        self._thread.start()

    def stop_watch(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()

    @contextlib.contextmanager
    def on_model_cores(self):
        pin_threads(os.getpid(), self.model)
        try:
            yield
        finally:
            pin_threads(os.getpid(), self.rest)


def model_ms(uri: str, env: dict[str, str]) -> float:
    """Milliseconds the generator spent denoising and decoding, from the manifests (`generate_ms` per row is its
    chunk's wall time over the chunk's rows); text encoding and Ray's own work in the actor are not in it."""
    from unittest import mock

    from batchgen.manifest import read_manifests
    from batchgen.storage import open_storage

    with mock.patch.dict(os.environ, env):
        storage = open_storage(uri)
        return sum(sum(t.column("generate_ms").to_pylist()) for _, t in read_manifests(storage, ["generate_ms"]))


def per_image_cpu(small, large, extra_images: int) -> dict[str, float]:
    """CPU milliseconds per image by process role in steady state: the large run's CPU minus the small run's,
    over the extra images. CPU time is per process, so other engineers' load does not enter it."""
    a, b = small.monitor.cpu_by_role(), large.monitor.cpu_by_role()
    return {role: round(1000 * (b[role] - a.get(role, 0.0)) / extra_images, 1) for role in b}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", type=int, default=40, help="images in the short pipeline run")
    parser.add_argument("--large", type=int, default=200, help="images in the long pipeline run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--px", type=int, default=128)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads, both sides")
    parser.add_argument("--size", default="bench", help="tiny-model size (batchgen/tiny.py SIZES)")
    parser.add_argument("--layout", default="files", choices=["files", "webdataset", "parquet"],
                        help="output.layout of the pipeline side")
    parser.add_argument("--shard-samples", type=int, default=40,
                        help="output.shard_samples for the shard layouts (small, so shards roll over mid-run)")
    add_quiet_options(parser, max_attempts=8)
    parser.add_argument("--isolate", action="store_true",
                        help="give the model every core but core 0 (and that many torch threads, both sides); "
                             "Ray, the other stages and moto share core 0: the model has compute of its own, as on "
                             "a GPU node")
    args = parser.parse_args()
    cores = ModelCores(set(range(1, os.cpu_count())), {0}) if args.isolate else None
    if cores:
        if os.cpu_count() < 2:
            parser.error("--isolate needs at least 2 cores")
        args.threads = len(cores.model)
        pin_threads(os.getpid(), cores.rest)  # moto, Ray and the command start from here and inherit core 0
    model_cores = cores.on_model_cores if cores else contextlib.nullcontext

    from batchgen.engine import Engine
    from batchgen.models.loading import load_model

    name = ("efficiency-isolated" if args.isolate else "efficiency") + (
        "" if args.layout == "files" else f"-{args.layout}")
    work = OUT / name
    model_dir = bench_model(args.size)
    moto = MotoServer(work / "moto.log")
    bucket = moto.bucket("bench")
    specs = {}
    moto.put_prompts(bucket, (args.small, args.large))
    with torch_threads(args.threads), model_cores():
        engine = Engine(load_model(str(model_dir), device="cpu", dtype="float32"), max_batch_size=args.batch_size)
        bare_rate(engine, args.batch_size, args.batch_size, args.steps, args.px, args.guidance)  # warm-up

    bare_images = (args.large - args.small) // 2
    repeats, rejected = [], []
    try:
        for r in range(args.max_attempts):
            if len(repeats) == args.repeats:
                break
            runs = {}
            quiet = wait_quiet(args.max_other_cores)
            load_before = load1()
            with torch_threads(args.threads), model_cores():
                before = bare_rate(engine, bare_images, args.batch_size, args.steps, args.px, args.guidance)
            model_time = {}
            for n in (args.small, args.large):
                spec = job(model_dir, f"s3://{bucket}/prompts/{n}.parquet", f"s3://{bucket}/runs/{r}-{n}",
                           steps=args.steps, px=args.px, guidance=args.guidance, batch_size=args.batch_size,
                           threads=args.threads)
                if args.layout != "files":
                    spec["output"].update(layout=args.layout, shard_samples=args.shard_samples)
                specs[n] = write_spec(work / f"job-{n}.yaml", spec)
                if cores:
                    cores.start_watch()
                try:
                    runs[n] = run_batchgen(specs[n], env=moto.env, monitor_interval_s=1.0,
                                           extra_pids=[moto.process.pid])
                finally:
                    if cores:
                        cores.stop_watch()
                assert runs[n].summary["images_ok"] == n, runs[n].summary
                model_time[n] = model_ms(f"s3://{bucket}/runs/{r}-{n}", moto.env) / 1000
            with torch_threads(args.threads), model_cores():
                after = bare_rate(engine, bare_images, args.batch_size, args.steps, args.px, args.guidance)
            # The bare loop runs right before and right after the pipeline pair; their mean faces similar load.
            bare, bare_other, bare_cpu_ms = (statistics.mean(x) for x in zip(before, after, strict=True))
            small, large = runs[args.small], runs[args.large]
            steady = (args.large - args.small) / (large.wall_s - small.wall_s)
            # Where the gap goes (one actor): the share of steady-state wall time the generator spent in the model
            # (does the model wait for the pipeline?), and how much slower the model ran there than in the bare
            # loop (on this machine the other stages take CPU from it; on a GPU node they run on other cores).
            model_s_per_image = (model_time[args.large] - model_time[args.small]) / (args.large - args.small)
            row = {
                "repeat": r,
                "load1_before": load_before,
                "load1_after": load1(),
                "other_cores_before": quiet,
                "other_cores_bare": round(bare_other, 2),
                "other_cores_pipeline": round(max(small.other_cores, large.other_cores), 2),
                "bare_images_s": bare,
                "bare_images_s_before_after": [before[0], after[0]],
                "pipeline_steady_images_s": steady,
                "efficiency": steady / bare,
                "model_busy_fraction": model_s_per_image * steady,
                "model_speed_vs_bare": 1 / (model_s_per_image * bare),
                "small_wall_s": small.wall_s,
                "large_wall_s": large.wall_s,
                "large_whole_run_images_s": args.large / large.wall_s,
                "large_first_image_s": large.summary["first_image_s"],
                "large_cpu_s_by_role": large.monitor.cpu_by_role(),
                "large_processes": large.monitor.processes(),
                "bare_cpu_ms_per_image": round(bare_cpu_ms, 1),
                "steady_cpu_ms_per_image_by_role": per_image_cpu(small, large, args.large - args.small),
                "model_cores_pinned_pids": sorted(cores.pinned) if cores else None,
                "other_cores_max": round(max(before[1], after[1], small.other_cores, large.other_cores), 2),
            }
            busy = row["other_cores_max"] > args.max_busy_cores
            (rejected if busy else repeats).append(row)
            print(f"attempt {r}: bare {bare:.2f} images/s, pipeline steady {steady:.2f} images/s, "
                  f"efficiency {steady / bare:.3f} (load {load_before} -> {load1()}; other processes used up to "
                  f"{row['other_cores_max']:.2f} cores{': rejected, machine busy' if busy else ''})", flush=True)
    finally:
        moto.stop()

    repeats = quiet_repeats(repeats, rejected)
    result = {
        "bench": "efficiency",
        "machine": machine(),
        "args": vars(args),
        "commands": [f".venv/bin/batchgen run {specs[n].relative_to(OUT.parent.parent)}" for n in specs],
        "repeats": repeats,
        "rejected_busy": rejected,
        "median": {k: median([r[k] for r in repeats]) for k in ("bare_images_s", "pipeline_steady_images_s",
                                                                 "efficiency", "large_whole_run_images_s",
                                                                 "model_busy_fraction", "model_speed_vs_bare")},
    }
    path = save(name, result)
    print()
    if cores:
        print(f"isolated: model on cores {sorted(cores.model)}, everything else on {sorted(cores.rest)}")
    print(f"model={args.size} px={args.px} steps={args.steps} batch={args.batch_size} guidance={args.guidance} "
          f"threads={args.threads}; pipeline: S3 (moto) in and out, PNG, layout {args.layout}; "
          f"small={args.small} large={args.large}")
    print(table(repeats, [("repeat", "repeat", "d"), ("load1_before", "load1", ".2f"),
                          ("other_cores_bare", "other cores (bare)", ".2f"),
                          ("other_cores_pipeline", "other cores (pipeline)", ".2f"),
                          ("bare_images_s", "bare img/s", ".2f"),
                          ("pipeline_steady_images_s", "pipeline img/s", ".2f"), ("efficiency", "ratio", ".3f"),
                          ("model_busy_fraction", "model busy", ".3f"), ("model_speed_vs_bare", "model speed", ".3f"),
                          ("large_whole_run_images_s", "whole-run img/s", ".2f"),
                          ("large_first_image_s", "first image s", ".1f")]))
    m = result["median"]
    print(f"median: bare {m['bare_images_s']:.2f}, pipeline steady {m['pipeline_steady_images_s']:.2f} images/s, "
          f"efficiency {m['efficiency']:.3f}; model busy {m['model_busy_fraction']:.3f} of the time, at "
          f"{m['model_speed_vs_bare']:.3f} of its bare speed (per repeat, ratio = busy x speed)")
    roles = sorted({role for r in repeats for role in r["steady_cpu_ms_per_image_by_role"]})
    cpu_rows = [{"role": "bare engine (this process)", "ms": median([r["bare_cpu_ms_per_image"] for r in repeats])}]
    cpu_rows += [{"role": role, "ms": median([r["steady_cpu_ms_per_image_by_role"].get(role, 0.0) for r in repeats])}
                 for role in roles]
    cpu_rows = [cpu_rows[0], *sorted(cpu_rows[1:], key=lambda row: -row["ms"])]
    print("steady-state CPU ms per image by process (pipeline: large run minus small run; medians):")
    print(table(cpu_rows, [("role", "process", "s"), ("ms", "CPU ms/image", ".1f")]))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

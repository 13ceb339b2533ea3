"""Cold start: seconds from the command's start to Ray, to every generator actor ready, to the first stored image.

    .venv/bin/python bench/coldstart.py [--repeats 3] [--actors 1] [--size bench]

Runs the real `batchgen run` (local Ray started by the command, output to a local directory so the first
image's time is its file's modification time, exact to the nanosecond) and watches its process tree every
0.1 s. Ray titles a worker `ray::<actor>.__init__` while its constructor runs; the generator is ready when
that title drops the `.__init__` (model loaded). Phases, from the moment the command is started:

  ray launched      the CLI has imported, validated the job and planned the input; gcs_server appears
  actors created    the first generator actor process starts its constructor
  actors ready      every generator actor has loaded its model
  first image       the first image file exists in the output
  done              the command exits (`--images` images)
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from _common import (
    OUT,
    bench_model,
    job,
    load1,
    machine,
    median,
    run_batchgen,
    save,
    table,
    wait_quiet,
    write_prompts,
    write_spec,
)

PHASES = ("ray_launched_s", "actors_created_s", "actors_ready_s", "first_image_s", "done_s")


def phases(run, output: Path) -> dict[str, float]:
    events = [(t - run.started, pid, title) for t, pid, title in run.monitor.events]
    ray = min(t for t, _, title in events if "gcs_server" in title)
    init = {pid: t for t, pid, title in events if title.startswith("ray::") and "GeneratorActor" in title
            and title.endswith(".__init__")}
    ready = {}
    for t, pid, title in events:
        if pid in init and t > init[pid] and not title.endswith(".__init__") and pid not in ready:
            ready[pid] = t
    images = [p.stat().st_mtime for p in (output / "images").rglob("*") if p.is_file()]
    return {
        "ray_launched_s": ray,
        "actors_created_s": min(init.values()),
        "actors_ready_s": max(ready.values()) if len(ready) == len(init) else None,
        "first_image_s": min(images) - run.started,
        "done_s": run.wall_s,
        "actors": len(init),
        "summary_first_image_s": run.summary["first_image_s"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--actors", type=int, default=1)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--size", default="bench")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--px", type=int, default=128)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--max-other-cores", type=float, default=0.3)
    args = parser.parse_args()

    import os

    work = OUT / "coldstart"
    model_dir = bench_model(args.size)
    prompts_path = write_prompts(work / f"prompts-{args.images}.parquet", args.images)
    threads = max(1, (os.cpu_count() or 1) // args.actors)
    output = work / "out"
    spec = job(model_dir, str(prompts_path), str(output), steps=args.steps, px=args.px, guidance=args.guidance,
               batch_size=args.batch_size, threads=threads, min_actors=args.actors, max_actors=args.actors)
    path = write_spec(work / "job.yaml", spec)
    runs = []
    for r in range(args.repeats):
        shutil.rmtree(output, ignore_errors=True)
        quiet = wait_quiet(args.max_other_cores)
        before = load1()
        run = run_batchgen(path, monitor_interval_s=0.1)
        row = {"repeat": r, "load1": before, "other_cores_before": quiet, "other_cores": round(run.other_cores, 2),
               **phases(run, output)}
        runs.append(row)
        print(row, flush=True)
    shutil.rmtree(output, ignore_errors=True)
    medians = {k: median([r[k] for r in runs if r[k] is not None]) for k in PHASES}
    data = {"bench": "coldstart", "machine": machine(), "args": vars(args),
            "commands": [f".venv/bin/batchgen run {path.relative_to(OUT.parent.parent)}"], "runs": runs,
            "median": medians}
    out = save("coldstart", data)
    print()
    print(f"model={args.size} px={args.px} steps={args.steps} batch={args.batch_size} actors={args.actors} "
          f"images={args.images}; local Ray started by the command, PNG to local disk; seconds from command start")
    columns = [("repeat", "repeat", "d"), ("load1", "load1", ".2f"), ("other_cores", "other cores", ".2f")]
    columns += [(k, k.removesuffix("_s").replace("_", " ") + " s", ".1f") for k in PHASES]
    print(table([*runs, {"repeat": "median", **medians}], [(k, h, "" if k == "repeat" else f)
                                                          for k, h, f in columns]))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""Orchestration cost: a near-zero-cost model through the whole pipeline, and memory as rows grow.

    .venv/bin/python bench/orchestration.py [--rows 10000 100000] [--batch-size 64]

The real `batchgen run` with the tiny random-weight model at its smallest setting (8x8 px, 1 step,
guidance 1.0, so one UNet pass of the batch and no unconditional pass) to a local directory: Parquet
read, Ray Data, generator actor, PNG encode and write, manifests, _SUCCESS. What is left is the
pipeline's own cost per row. For each row count: wall time, rows/s, the steady rate between the two
largest runs (the difference quotient, so start-up cancels), and the peak RSS (the kernel's VmHWM) of
the driver, the generator actor, the busiest Ray task worker and the Ray daemons. Streaming means those
peaks stay flat as rows grow. An input above `--window-rows` runs as consecutive windows (batchgen.windows),
each in a child process of the driver: its peak is reported apart ("window driver", the largest), and so is a
window switch's cost to the generator, the idle gap between one window's last stored image and the next one's
first (image files' modification times, rows mapped to windows as the job cut them).
"""

from __future__ import annotations

import argparse
import bisect
import os
import shutil
from pathlib import Path

from _common import OUT, job, load1, machine, run_batchgen, save, table, wait_quiet, write_prompts, write_spec

from batchgen.models.tiny import make_tiny_model
from batchgen.spec import JobSpec
from batchgen.storage import open_storage

ROLES = ("driver", "window driver", "generator actor", "ray task workers", "raylet", "gcs_server")


def peaks(run) -> dict[str, float]:
    """Largest peak RSS (MiB) per process role, and how many processes had that role."""
    out: dict[str, float] = {}
    for stats in run.monitor.stats.values():
        out[stats.role] = max(out.get(stats.role, 0.0), stats.peak_rss_mib)
        out[f"{stats.role} processes"] = out.get(f"{stats.role} processes", 0) + 1
    return out


def driver_rss_curve(run) -> list[float]:
    """The driver's RSS (MiB) at 10%, 25%, 50%, 75% and 95% of the run: flat when it streams."""
    driver = next(s for s in run.monitor.stats.values() if s.role == "driver")
    samples = driver.rss_mib_samples
    return [round(samples[min(len(samples) - 1, int(f * len(samples)))][1]) for f in (0.1, 0.25, 0.5, 0.75, 0.95)]


def window_switch_gaps(output: Path, prompts_path: Path, window_rows: int | None) -> list[float]:
    """Seconds between the last image stored in each window and the first stored in the next."""
    from batchgen.manifest import read_manifests
    from batchgen.prompts import plan_input
    from batchgen.spec import InputSpec
    from batchgen.windows import plan_windows

    windows = plan_windows(plan_input(InputSpec(prompts=str(prompts_path))), window_rows)
    if len(windows) < 2:
        return []
    ends = [w.tasks[0].first_row + w.rows for w in windows]  # one input file: windows are consecutive row ranges
    first = [float("inf")] * len(windows)
    last = [0.0] * len(windows)
    storage = open_storage(str(output))
    for _, part in read_manifests(storage):
        for row_id, uri in zip(part.column("id").to_pylist(), part.column("image_uri").to_pylist(), strict=True):
            window = bisect.bisect_right(ends, int(row_id.rsplit(":", 1)[1]))
            stored = os.stat(uri.removeprefix("file://")).st_mtime
            first[window] = min(first[window], stored)
            last[window] = max(last[window], stored)
    return [round(first[i + 1] - last[i], 2) for i in range(len(windows) - 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--px", type=int, default=8)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--guidance", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the generator actor")
    parser.add_argument("--read-ahead-calls", type=int, default=None,
                        help="compute.read_ahead_calls (default: the spec's); 1000000 = the reader unbounded")
    parser.add_argument("--layout", default="files", choices=["files", "webdataset", "parquet"],
                        help="output.layout (shards of 1,000 samples)")
    parser.add_argument("--window-rows", type=int, default=None,
                        help="compute.window_rows (default: the spec's); 0 = one Ray Data execution")
    parser.add_argument("--keep", action="store_true", help="keep the generated images and manifests")
    parser.add_argument("--max-other-cores", type=float, default=0.3)
    args = parser.parse_args()

    work = OUT / "orchestration"
    model_dir = OUT / "models" / "tiny-sd15"
    if not (model_dir / "model_index.json").is_file():
        make_tiny_model(model_dir, "sd15", "tiny")
    results = []
    commands = []
    for n in sorted(args.rows):
        prompts_path = write_prompts(work / f"prompts-{n}.parquet", n)
        output = work / f"out-{n}"
        shutil.rmtree(output, ignore_errors=True)
        spec = job(model_dir, str(prompts_path), str(output), steps=args.steps, px=args.px, guidance=args.guidance,
                   batch_size=args.batch_size, threads=args.threads,
                   **({"read_ahead_calls": args.read_ahead_calls} if args.read_ahead_calls else {}),
                   **({"window_rows": args.window_rows} if args.window_rows is not None else {}))
        spec["output"]["layout"] = args.layout
        path = write_spec(work / f"job-{n}.yaml", spec)
        commands.append(f".venv/bin/batchgen run {path.relative_to(OUT.parent.parent)}")
        quiet = wait_quiet(args.max_other_cores)
        before = load1()
        run = run_batchgen(path, monitor_interval_s=1.0)
        assert run.summary["images_ok"] == n, run.summary
        row = {"rows": n, "load1": before, "other_cores_before": quiet, "other_cores": round(run.other_cores, 2),
               "wall_s": run.wall_s, "rows_per_s": n / run.wall_s, "first_image_s": run.summary["first_image_s"],
               "peak_rss_mib": peaks(run), "driver_rss_curve_mib": driver_rss_curve(run),
               "cpu_s_by_role": run.monitor.cpu_by_role(), "processes": run.monitor.processes(),
               "window_switch_gaps_s": window_switch_gaps(output, prompts_path, spec["compute"].get(
                   "window_rows", JobSpec().compute.window_rows))}
        row["window_switch_s_max"] = max(row["window_switch_gaps_s"], default=None)
        results.append(row)
        print({k: v for k, v in row.items() if k not in ("peak_rss_mib", "processes")}, flush=True)
        if not args.keep:
            shutil.rmtree(output, ignore_errors=True)

    if len(results) >= 2:
        a, b = results[-2], results[-1]
        steady = (b["rows"] - a["rows"]) / (b["wall_s"] - a["wall_s"])
    else:
        steady = None
    for row in results:
        for role in ROLES:
            row[role] = row["peak_rss_mib"].get(role)
    data = {"bench": "orchestration", "machine": machine(), "args": vars(args), "commands": commands,
            "runs": results, "steady_rows_per_s_between_largest_two": steady}
    name = "orchestration" if args.read_ahead_calls is None else f"orchestration-read-ahead-{args.read_ahead_calls}"
    name += "" if args.layout == "files" else f"-{args.layout}"
    name += "" if args.window_rows is None else f"-windows{args.window_rows}"
    out = save(name, data)
    print()
    print(f"tiny model, {args.px}x{args.px} px, {args.steps} step, guidance {args.guidance}, batch {args.batch_size}, "
          f"PNG to local disk, layout {args.layout}; {os.cpu_count()} cores")
    print(table(results, [("rows", "rows", "d"), ("load1", "load1", ".2f"), ("other_cores", "other cores", ".2f"),
                          ("wall_s", "wall s", ".1f"), ("rows_per_s", "rows/s", ".0f"),
                          ("driver", "driver MiB", ".0f"), ("window driver", "window driver MiB (max)", ".0f"),
                          ("window_switch_s_max", "window switch s (max)", ".1f"),
                          ("generator actor", "actor MiB", ".0f"),
                          ("ray task workers", "task worker MiB (max)", ".0f"), ("raylet", "raylet MiB", ".0f"),
                          ("gcs_server", "gcs MiB", ".0f")]))
    if steady:
        print(f"steady rate between the two largest runs: {steady:.0f} rows/s")
    for row in results:
        print(f"{row['rows']} rows: driver RSS at 10/25/50/75/95% of the run {row['driver_rss_curve_mib']} MiB; "
              f"window switches {row['window_switch_gaps_s']} s; CPU s by role {row['cpu_s_by_role']}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""Control for section c's driver growth: a Ray Data pipeline of batchgen's shape with none of batchgen's code.

    .venv/bin/python bench/raydata_driver.py [--rows 10000 100000 300000] [--rows-per-call 256]

Same operators as batchgen.pipeline.build_dataset (row-group read tasks -> re-blocking to one call's rows ->
one actor -> a task per call that returns one summary row, iterated on the driver), the same Ray settings as a
Ray batchgen starts (no dashboard, WORKER_ENV), but the read task makes rows in memory, the actor adds 192
bytes of "pixels" a row and the last task stores nothing. Each row count runs in a fresh driver process that
samples its own RSS every 0.5 s (`--row-ms` makes the actor take a model's time, so growth per second and
growth per row can be told apart); the table gives RSS at 10/25/50/75/95 % of the rows consumed and the peak.
If this driver grows as batchgen's does, the growth is Ray's or Ray Data's, not batchgen's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

from _common import load1, machine, save, status_mib, table, wait_quiet

FRACTIONS = (0.1, 0.25, 0.5, 0.75, 0.95)


def rss_mib() -> float:
    return status_mib(os.getpid(), "VmRSS") or 0.0


def execution(window: list[dict], rows_per_call: int, rows_per_read: int, row_ms: float):
    """batchgen's operators over `window` (read tasks), in plain Ray Data."""
    import pyarrow as pa
    import ray

    def read_prompt_rows(batch: pa.Table):  # the names batchgen.readahead finds the operators by
        for task in batch.to_pylist():
            for first in range(task["start"], task["start"] + task["n"], rows_per_read):
                ids = range(first, min(task["start"] + task["n"], first + rows_per_read))
                yield pa.table({"id": [f"row-{i}" for i in ids], "prompt": [f"a prompt number {i}" for i in ids],
                                "seed": list(ids)})

    class GeneratorActor:
        def __call__(self, batch: pa.Table) -> pa.Table:
            time.sleep(row_ms * batch.num_rows / 1000)  # a model's time, without its CPU
            return batch.append_column("pixels", pa.array([bytes(192)] * batch.num_rows, pa.binary()))

    def store(batch: pa.Table) -> pa.Table:
        return pa.table({"ok": [batch.num_rows]})

    ds = ray.data.from_items(window, override_num_blocks=len(window))
    ds = ds.map_batches(read_prompt_rows, batch_size=1, batch_format="pyarrow", num_cpus=0.25,
                        compute=ray.data.TaskPoolStrategy(size=min(2, len(window))))
    ds = ds.repartition(target_num_rows_per_block=rows_per_call)
    ds = ds.map_batches(GeneratorActor, batch_size=rows_per_call, batch_format="pyarrow", num_cpus=0.5,
                        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=1))
    return ds.map_batches(store, batch_size=None, batch_format="pyarrow", num_cpus=0.25)


def window_child(address: str, window: list[dict], rows_per_call: int, rows_per_read: int, row_ms: float,
                 read_ahead_rows: int) -> dict:
    """One window as its own driver process joined to the parent's Ray: output times and its own peak RSS."""
    import ray

    from batchgen.pipeline import WORKER_ENV

    ray.init(address=address, logging_level="WARNING", runtime_env={"env_vars": WORKER_ENV})
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    if read_ahead_rows:
        from batchgen.readahead import install

        install(context, read_ahead_rows)
    times = []
    rows = 0
    for batch in execution(window, rows_per_call, rows_per_read, row_ms).iter_batches(batch_size=None,
                                                                                       batch_format="pyarrow"):
        rows += sum(batch.column("ok").to_pylist())
        times.append(time.time())
    return {"rows": rows, "first_output": times[0], "last_output": times[-1],
            "peak_rss_mib": round(status_mib(os.getpid()) or 0.0)}


def one(rows: int, rows_per_call: int, rows_per_read: int, rows_per_task: int, row_ms: float,
        read_ahead_rows: int, windows: int = 1, fresh_children: bool = False) -> dict:
    import ray

    from batchgen.pipeline import WORKER_ENV

    ray.init(include_dashboard=False, logging_level="WARNING", runtime_env={"env_vars": WORKER_ENV})
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    if read_ahead_rows:  # batchgen's one addition to Ray Data's scheduling
        from batchgen.readahead import install

        install(context, read_ahead_rows)
    done = [0]
    samples: list[tuple[int, float]] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.5):
            samples.append((done[0], rss_mib()))

    tasks = [{"start": s, "n": min(rows_per_task, rows - s)} for s in range(0, rows, rows_per_task)]

    # --windows N: the rows as N consecutive executions (each its own Ray Data run and actor pool) in this
    # driver; a window switch costs the gap between one execution's last output and the next one's first.
    per_window = -(-len(tasks) // windows)
    sampler = threading.Thread(target=sample, daemon=True)
    start_rss = rss_mib()
    start = time.perf_counter()
    sampler.start()
    gaps = []
    last_output = None
    children = []
    for w in range(0, len(tasks), per_window):
        if fresh_children:  # the window's Ray Data execution runs in a fresh driver process joined to this Ray
            cmd = [sys.executable, __file__, "--child", json.dumps(
                {"address": ray.get_runtime_context().gcs_address, "window": tasks[w : w + per_window],
                 "rows_per_call": rows_per_call, "rows_per_read": rows_per_read, "row_ms": row_ms,
                 "read_ahead_rows": read_ahead_rows})]
            child = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip()
                               .splitlines()[-1])
            if last_output is not None:
                gaps.append(round(child["first_output"] - last_output, 2))
            last_output = child["last_output"]
            done[0] += child["rows"]
            children.append(child["peak_rss_mib"])
            continue
        first = True
        for batch in execution(tasks[w : w + per_window], rows_per_call, rows_per_read, row_ms).iter_batches(
                batch_size=None, batch_format="pyarrow"):
            now = time.time()
            if first and last_output is not None:
                gaps.append(round(now - last_output, 2))
            first = False
            last_output = now
            done[0] += sum(batch.column("ok").to_pylist())
    wall = time.perf_counter() - start
    stop.set()
    sampler.join()
    assert done[0] == rows, (done[0], rows)
    curve = []
    for f in FRACTIONS:
        at = [rss for n, rss in samples if n >= f * rows]
        curve.append(round(at[0]) if at else None)
    return {"rows": rows, "windows": windows, "fresh_children": fresh_children, "child_peak_rss_mib": children,
            "child_peak_max_mib": max(children, default=None),
            "window_switch_gaps_s": gaps, "wall_s": round(wall, 1),
            "rows_per_s": round(rows / wall),
            "calls": -(-rows // rows_per_call), "rss_before_mib": round(start_rss), "rss_curve_mib": curve,
            "peak_rss_mib": round(status_mib(os.getpid()) or 0.0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000, 300_000])
    parser.add_argument("--rows-per-call", type=int, default=256, help="batchgen: batch_size x batches_per_call")
    parser.add_argument("--rows-per-read", type=int, default=1024, help="rows per block a read task yields")
    parser.add_argument("--rows-per-task", type=int, default=10_000, help="rows per read task (a row group)")
    parser.add_argument("--row-ms", type=float, default=0.0,
                        help="the actor sleeps this long per row (2 = about batchgen's rate in section c)")
    parser.add_argument("--read-ahead-rows", type=int, default=0,
                        help="install batchgen.readahead.ReadAheadCap with this cap (batchgen's default for one "
                        "actor and 256-row calls: 4096); 0 = Ray Data alone")
    parser.add_argument("--windows", type=int, default=1,
                        help="run the rows as this many consecutive Ray Data executions in one driver")
    parser.add_argument("--fresh-children", action="store_true",
                        help="run each window's execution in a fresh driver process joined to this Ray")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--max-other-cores", type=float, default=0.3)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(window_child(**json.loads(args.child))))
        return
    if args.one:
        print(json.dumps(one(args.one, args.rows_per_call, args.rows_per_read, args.rows_per_task, args.row_ms,
                             args.read_ahead_rows, args.windows, args.fresh_children)))
        return
    results = []
    for rows in args.rows:
        wait_quiet(args.max_other_cores)
        before = load1()
        cmd = [sys.executable, __file__, "--one", str(rows), "--rows-per-call", str(args.rows_per_call),
               "--rows-per-read", str(args.rows_per_read), "--rows-per-task", str(args.rows_per_task),
               "--row-ms", str(args.row_ms), "--read-ahead-rows", str(args.read_ahead_rows),
               "--windows", str(args.windows)] + (["--fresh-children"] if args.fresh_children else [])
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        result = json.loads(done.stdout.strip().splitlines()[-1])
        result["load1"] = before
        results.append(result)
        print(result, flush=True)
    print()
    print(f"pure Ray Data, batchgen's shape; rows per call {args.rows_per_call}, per read block "
          f"{args.rows_per_read}, per read task {args.rows_per_task}; actor {args.row_ms} ms a row; read-ahead cap "
          f"{args.read_ahead_rows or 'none'}; driver RSS MiB")
    rows_out = [{**r, **{f"at {int(f * 100)}%": v for f, v in zip(FRACTIONS, r["rss_curve_mib"], strict=True)}}
                for r in results]
    print(table(rows_out, [("rows", "rows", "d"), ("windows", "windows", "d"), ("wall_s", "wall s", ".1f"),
                           ("rows_per_s", "rows/s", "d"),
                           ("rss_before_mib", "before", "d")]
                + [(f"at {int(f * 100)}%", f"at {int(f * 100)}%", "d") for f in FRACTIONS]
                + [("peak_rss_mib", "peak", "d")]
                + ([("child_peak_max_mib", "window child peak (max)", "d")] if args.fresh_children else [])))
    name = ("raydata-driver" + (f"-{args.row_ms:g}ms" if args.row_ms else "")
            + (f"-cap{args.read_ahead_rows}" if args.read_ahead_rows else "")
            + (f"-windows{args.windows}" if args.windows > 1 else "")
            + ("-fresh-children" if args.fresh_children else ""))
    print(f"wrote {save(name, {'machine': machine(), 'args': vars(args), 'results': results})}")


if __name__ == "__main__":
    main()

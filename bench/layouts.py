"""Output layouts on S3: objects written per 1,000 images and rows/s, files against WebDataset and Parquet shards.

    .venv/bin/python bench/layouts.py [--rows 2000 10000] [--layouts files webdataset parquet]

The orchestration program's near-free model (tiny random weights, 8x8 px, 1 step, guidance 1.0, batch 64), so
what differs between layouts is the pipeline's own cost: prompts and output on a local moto S3 server, one
`batchgen run` per layout and row count. Objects are counted by listing the output after the run (data objects,
manifest parts, the rest); rows/s is rows over the command's wall time, and the steady rate is the difference
quotient between the two largest runs of a layout (start-up cancels).
"""

from __future__ import annotations

import argparse
from collections import Counter

from _common import OUT, MotoServer, job, load1, machine, run_batchgen, save, table, wait_quiet, write_spec

from batchgen.models.tiny import make_tiny_model


def count_objects(server: MotoServer, bucket: str, prefix: str) -> Counter:
    """Objects under s3://bucket/prefix/, by their first path part (images, shards, manifests, ...)."""
    counts: Counter = Counter()
    for page in server.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/"):
        for item in page.get("Contents", []):
            counts[item["Key"][len(prefix) + 1 :].split("/", 1)[0]] += 1
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[2000, 10000])
    parser.add_argument("--layouts", nargs="+", default=["files", "webdataset", "parquet"])
    parser.add_argument("--shard-samples", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-other-cores", type=float, default=0.3)
    args = parser.parse_args()

    work = OUT / "layouts"
    model_dir = OUT / "models" / "tiny-sd15"
    if not (model_dir / "model_index.json").is_file():
        make_tiny_model(model_dir, "sd15", "tiny")
    results = []
    with MotoServer(work / "moto.log") as server:
        bucket = server.bucket("bench-layouts")
        server.put_prompts(bucket, args.rows)
        for layout in args.layouts:
            for n in sorted(args.rows):
                prefix = f"out-{layout}-{n}"
                spec = job(model_dir, f"s3://{bucket}/prompts/{n}.parquet", f"s3://{bucket}/{prefix}", steps=1,
                           px=8, guidance=1.0, batch_size=args.batch_size, threads=1)
                spec["output"].update(layout=layout, shard_samples=args.shard_samples)
                path = write_spec(work / f"job-{layout}-{n}.yaml", spec)
                quiet = wait_quiet(args.max_other_cores)
                before = load1()
                run = run_batchgen(path, env=server.env, monitor_interval_s=1.0)
                assert run.summary["images_ok"] == n, run.summary
                objects = count_objects(server, bucket, prefix)
                data = objects.get("images", 0) + objects.get("shards", 0)
                row = {"layout": layout, "rows": n, "load1": before, "other_cores_before": quiet,
                       "other_cores": round(run.other_cores, 2), "wall_s": run.wall_s, "rows_per_s": n / run.wall_s,
                       "objects": dict(objects), "data_objects": data, "manifest_parts": objects.get("manifests", 0),
                       "objects_per_1000": 1000 * sum(objects.values()) / n,
                       "driver_peak_mib": max(s.peak_rss_mib for s in run.monitor.stats.values()
                                              if s.role == "driver")}
                results.append(row)
                print({k: v for k, v in row.items()}, flush=True)
    steady = {}
    for layout in args.layouts:
        runs = [r for r in results if r["layout"] == layout]
        if len(runs) >= 2:
            a, b = runs[-2], runs[-1]
            steady[layout] = (b["rows"] - a["rows"]) / (b["wall_s"] - a["wall_s"])
    out = save("layouts", {"bench": "layouts", "machine": machine(), "args": vars(args), "runs": results,
                           "steady_rows_per_s_between_largest_two": steady})
    print()
    print(f"tiny model, 8x8 px, 1 step, batch {args.batch_size}, PNG; prompts and output on a local moto S3 server; "
          f"shards of {args.shard_samples} samples")
    print(table(results, [("layout", "layout", "s"), ("rows", "rows", "d"), ("other_cores", "other cores", ".2f"),
                          ("wall_s", "wall s", ".1f"), ("rows_per_s", "rows/s", ".0f"),
                          ("data_objects", "data objects", "d"), ("manifest_parts", "manifest parts", "d"),
                          ("objects_per_1000", "objects / 1,000 images", ".1f"),
                          ("driver_peak_mib", "driver MiB", ".0f")]))
    for layout, rate in steady.items():
        print(f"{layout}: steady rate between the two largest runs {rate:.0f} rows/s")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

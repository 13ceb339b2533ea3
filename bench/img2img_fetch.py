"""Does fetching init images slow the generator? The generator's busy share in an img2img job against the same job
as text-to-image.

    .venv/bin/python bench/img2img_fetch.py [--small 16] [--large 64] [--repeats 1] [--px 64] [--steps 6]

Both jobs run the real command (`batchgen run SPEC`: Parquet on S3 -> local Ray -> [fetch stage] -> generator
actor -> PNG -> S3 on a moto_server subprocess) on the same SD-shaped random-weight model, batch size, steps and
size. The img2img job's rows each name their own init image on S3 (`--init-px` square PNGs of noise, so every
row is a real S3 GET and PNG decode), strength 1.0 so both jobs run the same denoising steps (img2img adds the
VAE encode and the resize). As in bench/efficiency.py, each job runs with `--small` and `--large` images and the
steady state is the difference, so start-up cancels; **model busy** is the share of steady-state wall time the
generator spent in the model (manifests' `generate_ms` x steady images/s). If the fetch stage made the generator
wait, img2img's busy share would drop below text-to-image's. CPU ms per image by process role (large run minus
small run) shows what the fetch stage costs (it runs in the Ray task workers, with the reader and the store).
"""

from __future__ import annotations

import argparse
import io
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from _common import (
    OUT,
    MotoServer,
    add_quiet_options,
    bench_model,
    job,
    load1,
    machine,
    median,
    prompts,
    quiet_repeats,
    run_batchgen,
    save,
    table,
    wait_quiet,
    write_spec,
)
from efficiency import model_ms, per_image_cpu
from PIL import Image


def put_inputs(moto: MotoServer, bucket: str, counts: tuple[int, ...], init_px: int) -> int:
    """Prompt tables for both modes and one init image per row; returns the bytes of one init image."""
    client = moto.client()
    rng = np.random.default_rng(0)
    size = 0
    for i in range(max(counts)):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (init_px, init_px, 3), dtype=np.uint8)).save(buffer, format="PNG")
        client.put_object(Bucket=bucket, Key=f"init/{i}.png", Body=buffer.getvalue())
        size = len(buffer.getvalue())
    for n in counts:
        img2img = {"init_image": [f"init/{i}.png" for i in range(n)], "strength": [1.0] * n}
        for mode, columns in (("text", {}), ("img2img", img2img)):
            buffer = io.BytesIO()  # init paths are relative to the table's folder: s3://bucket/
            pq.write_table(pa.table({"prompt": prompts(n), **columns}), buffer)
            client.put_object(Bucket=bucket, Key=f"{mode}-{n}.parquet", Body=buffer.getvalue())
    return size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", type=int, default=16)
    parser.add_argument("--large", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--px", type=int, default=64)
    parser.add_argument("--init-px", type=int, default=256, help="side of the init images (PNG of noise)")
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads of the generator")
    parser.add_argument("--size", default="bench", help="tiny-model size (batchgen/tiny.py SIZES)")
    add_quiet_options(parser, max_attempts=3)
    args = parser.parse_args()

    work = OUT / "img2img-fetch"
    model_dir = bench_model(args.size)
    moto = MotoServer(work / "moto.log")
    bucket = moto.bucket("bench")
    init_bytes = put_inputs(moto, bucket, (args.small, args.large), args.init_px)
    repeats, rejected, commands = [], [], set()
    try:
        for r in range(args.max_attempts):
            if len(repeats) == args.repeats:
                break
            quiet = wait_quiet(args.max_other_cores)
            row = {"repeat": r, "load1_before": load1(), "other_cores_before": quiet}
            other = 0.0
            runs: dict[str, dict] = {"text": {}, "img2img": {}}
            model_time: dict[str, dict] = {"text": {}, "img2img": {}}
            # The modes alternate run by run, so a change in the machine's load hits both.
            for n in (args.small, args.large):
                for mode in ("text", "img2img"):
                    spec = job(model_dir, f"s3://{bucket}/{mode}-{n}.parquet", f"s3://{bucket}/runs/{r}-{mode}-{n}",
                               steps=args.steps, px=args.px, guidance=args.guidance, batch_size=args.batch_size,
                               threads=args.threads)
                    path = write_spec(work / f"job-{mode}-{n}.yaml", spec)
                    commands.add(f".venv/bin/batchgen run {path.relative_to(OUT.parent.parent)}")
                    run = run_batchgen(path, env=moto.env, monitor_interval_s=1.0, extra_pids=[moto.process.pid])
                    assert run.summary["images_ok"] == n, run.summary
                    runs[mode][n] = run
                    model_time[mode][n] = model_ms(f"s3://{bucket}/runs/{r}-{mode}-{n}", moto.env) / 1000
                    other = max(other, run.other_cores)
            for mode in ("text", "img2img"):
                small, large = runs[mode][args.small], runs[mode][args.large]
                steady = (args.large - args.small) / (large.wall_s - small.wall_s)
                extra_model_s = model_time[mode][args.large] - model_time[mode][args.small]
                model_s_per_image = extra_model_s / (args.large - args.small)
                row[f"{mode}_steady_images_s"] = steady
                row[f"{mode}_model_busy"] = model_s_per_image * steady
                row[f"{mode}_model_ms_per_image"] = 1000 * model_s_per_image
                # Within the large run alone: model time over the run's wall time (start-up included, so lower).
                row[f"{mode}_large_run_model_share"] = model_time[mode][args.large] / large.wall_s
                row[f"{mode}_cpu_ms_per_image_by_role"] = per_image_cpu(small, large, args.large - args.small)
            row["busy_ratio"] = row["img2img_model_busy"] / row["text_model_busy"]
            row["large_run_share_ratio"] = row["img2img_large_run_model_share"] / row["text_large_run_model_share"]
            row["other_cores_max"] = round(other, 2)
            busy = row["other_cores_max"] > args.max_busy_cores
            (rejected if busy else repeats).append(row)
            print(f"attempt {r}: model busy text {row['text_model_busy']:.3f}, img2img {row['img2img_model_busy']:.3f} "
                  f"(other processes used up to {row['other_cores_max']:.2f} cores"
                  f"{': rejected, machine busy' if busy else ''})", flush=True)
    finally:
        moto.stop()

    repeats = quiet_repeats(repeats, rejected)
    keys = ("text_steady_images_s", "img2img_steady_images_s", "text_model_busy", "img2img_model_busy", "busy_ratio",
            "text_model_ms_per_image", "img2img_model_ms_per_image", "text_large_run_model_share",
            "img2img_large_run_model_share", "large_run_share_ratio")
    result = {"bench": "img2img-fetch", "machine": machine(), "args": vars(args), "init_image_bytes": init_bytes,
              "commands": sorted(commands), "repeats": repeats, "rejected_busy": rejected,
              "median": {k: median([row[k] for row in repeats]) for k in keys}}
    path = save("img2img-fetch", result)
    print()
    print(f"model={args.size} px={args.px} steps={args.steps} batch={args.batch_size} threads={args.threads}; "
          f"init images {args.init_px}x{args.init_px} PNG ({init_bytes} bytes) on S3 (moto), one per row, "
          f"strength 1.0; "
          f"small={args.small} large={args.large}")
    print(table(repeats, [("repeat", "repeat", "d"), ("other_cores_max", "other cores", ".2f"),
                          ("text_steady_images_s", "t2i img/s", ".2f"), ("img2img_steady_images_s", "i2i img/s", ".2f"),
                          ("text_model_busy", "t2i model busy", ".3f"), ("img2img_model_busy", "i2i model busy", ".3f"),
                          ("busy_ratio", "i2i/t2i busy", ".3f"),
                          ("text_large_run_model_share", "t2i share (large run)", ".3f"),
                          ("img2img_large_run_model_share", "i2i share (large run)", ".3f"),
                          ("text_model_ms_per_image", "t2i model ms", ".0f"),
                          ("img2img_model_ms_per_image", "i2i model ms", ".0f")]))
    roles = sorted({role for row in repeats for mode in ("text", "img2img")
                    for role in row[f"{mode}_cpu_ms_per_image_by_role"]})
    cpu_rows = [{"role": role, **{mode: median([row[f"{mode}_cpu_ms_per_image_by_role"].get(role, 0.0)
                                                for row in repeats]) for mode in ("text", "img2img")}}
                for role in roles]
    print("steady-state CPU ms per image by process (large run minus small run; medians):")
    print(table(sorted(cpu_rows, key=lambda c: -c["img2img"]),
                [("role", "process", "s"), ("text", "text-to-image", ".1f"), ("img2img", "img2img", ".1f")]))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

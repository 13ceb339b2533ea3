"""batchgen against the usual ways to script the same job, on the same model, prompts, steps and threads.

    .venv/bin/python bench/baselines.py [--small 40] [--large 160] [--repeats 2] [--px 128] [--steps 10]

(i)   per-prompt script: diffusers' StableDiffusionPipeline called one prompt at a time, PIL PNG save,
      boto3 put_object to the moto S3 server; `--large - --small` prompts timed after one warm-up prompt
      (steady state); its whole-run rate adds the model load.
(ii)  the pattern of Ray's Stable Diffusion batch example (doc/source/data/examples/
      stablediffusion_batch_prediction.ipynb): a callable class holding the pipeline, `map_batches` on the
      batch's prompt list (pandas batches, one actor), `take_all()` on the driver, which then encodes PNGs
      and puts them to S3. Run at `--small` and `--large` prompts in one Ray session; steady state is the
      difference quotient, so Ray start-up and model load cancel.
(iii) batchgen: the real `batchgen run` command to the same S3, steady state by the same difference quotient.

All use DDIM, guidance `--guidance`, `--batch-size` prompts per call for (ii) and (iii), and torch threads =
cores. The table also gives each side's whole-run rate, start-up included: `--large` images for (ii) and
(iii) (Ray started with its defaults, dashboard included, as `batchgen run` starts it), `--large - --small`
for (i).
"""

from __future__ import annotations

import argparse
import io
import os
import time

import numpy as np
from _common import (
    OUT,
    MotoServer,
    TreeMonitor,
    add_quiet_options,
    bench_model,
    busy_cpu_s,
    job,
    load1,
    machine,
    median,
    prompts,
    quiet_repeats,
    run_batchgen,
    save,
    table,
    torch_threads,
    wait_quiet,
    write_spec,
)
from PIL import Image


def load_pipeline(model_dir: str):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def per_prompt(model_dir: str, texts: list[str], s3, bucket: str, prefix: str, args) -> tuple[float, float]:
    """(steady images/s, whole-run images/s including model load): the usual one-prompt-at-a-time script."""
    import torch

    def one(i: int, text: str) -> None:
        image = pipe(text, num_inference_steps=args.steps, guidance_scale=args.guidance, height=args.px,
                     width=args.px, generator=torch.Generator().manual_seed(i)).images[0]
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        s3.put_object(Bucket=bucket, Key=f"{prefix}/{i}.png", Body=buffer.getvalue(), ContentType="image/png")

    started = time.perf_counter()
    pipe = load_pipeline(model_dir)
    one(0, "warm-up")
    steady_start = time.perf_counter()
    for i, text in enumerate(texts):
        one(i, text)
    end = time.perf_counter()
    return len(texts) / (end - steady_start), len(texts) / (end - started)


class PredictCallable:
    """The callable class of Ray's example, on CPU: torch threads set as batchgen sets them."""

    def __init__(self, model_dir: str, threads: int, steps: int, px: int, guidance: float):
        import torch

        torch.set_num_threads(threads)
        self.pipe = load_pipeline(model_dir)
        self.steps, self.px, self.guidance = steps, px, guidance

    def __call__(self, batch):
        import torch

        generators = [torch.Generator().manual_seed(int(seed)) for seed in batch["seed"]]
        images = self.pipe(list(batch["prompt"]), num_inference_steps=self.steps, guidance_scale=self.guidance,
                           height=self.px, width=self.px, generator=generators).images
        return {"seed": batch["seed"].to_numpy(), "images": np.array(images, dtype=object)}


def ray_example(model_dir: str, texts: list[str], s3, bucket: str, prefix: str, args) -> float:
    """Wall seconds for map_batches + take_all + the driver's PNG encode and put of every image."""
    import pandas as pd
    import ray

    started = time.perf_counter()
    ds = ray.data.from_pandas(pd.DataFrame({"prompt": texts, "seed": range(len(texts))}))
    preds = ds.map_batches(
        PredictCallable,
        batch_size=args.batch_size,
        fn_constructor_kwargs={"model_dir": model_dir, "threads": args.threads, "steps": args.steps,
                               "px": args.px, "guidance": args.guidance},
        concurrency=1,
        batch_format="pandas",
        num_cpus=1,
    )
    results = preds.take_all()
    for row in results:
        buffer = io.BytesIO()
        image = row["images"]  # Ray Data turns the returned PIL images into arrays on the way
        (Image.fromarray(image.astype(np.uint8)) if isinstance(image, np.ndarray) else image).save(buffer, format="PNG")
        s3.put_object(Bucket=bucket, Key=f"{prefix}/{row['seed']}.png", Body=buffer.getvalue(),
                      ContentType="image/png")
    assert len(results) == len(texts)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", type=int, default=40)
    parser.add_argument("--large", type=int, default=160)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--px", type=int, default=128)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--size", default="bench")
    add_quiet_options(parser, max_attempts=6)
    args = parser.parse_args()

    import ray

    work = OUT / "baselines"
    model_dir = str(bench_model(args.size))
    moto = MotoServer(work / "moto.log")
    os.environ.update(moto.env)  # this process's Ray workers and boto3 inherit the endpoint
    bucket = moto.bucket("bench")
    s3 = moto.client()
    moto.put_prompts(bucket, (args.small, args.large))

    repeats, rejected = [], []
    commands = []
    try:
        for r in range(args.max_attempts):
            if len(repeats) == args.repeats:
                break
            row: dict = {"repeat": r, "other_cores_before": wait_quiet(args.max_other_cores), "load1": load1()}
            # Everything this repeat runs is this process or its children (Ray, the batchgen command) or moto.
            tree = TreeMonitor(os.getpid(), 1.0, extra_pids=[moto.process.pid]).start()
            busy_before, started = busy_cpu_s(), time.perf_counter()
            with torch_threads(args.threads):
                row["per_prompt_steady"], row["per_prompt_whole"] = per_prompt(
                    model_dir, prompts(args.large - args.small), s3, bucket, f"per-prompt/{r}", args)

            ray_started = time.perf_counter()
            ray.init(num_cpus=os.cpu_count(), logging_level="WARNING")
            ray.data.DataContext.get_current().enable_progress_bars = False
            ray_init_s = time.perf_counter() - ray_started
            walls = {n: ray_example(model_dir, prompts(n), s3, bucket, f"ray-example/{r}-{n}", args)
                     for n in (args.small, args.large)}
            ray.shutdown()
            row["ray_example_steady"] = (args.large - args.small) / (walls[args.large] - walls[args.small])
            row["ray_example_whole"] = args.large / (walls[args.large] + ray_init_s)

            runs = {}
            for n in (args.small, args.large):
                spec = job(model_dir, f"s3://{bucket}/prompts/{n}.parquet", f"s3://{bucket}/batchgen/{r}-{n}",
                           steps=args.steps, px=args.px, guidance=args.guidance, batch_size=args.batch_size,
                           threads=args.threads)
                path = write_spec(work / f"job-{n}.yaml", spec)
                runs[n] = run_batchgen(path, env=moto.env, monitor_interval_s=2.0)
                commands.append(f".venv/bin/batchgen run {path.relative_to(OUT.parent.parent)}")
            row["batchgen_steady"] = (args.large - args.small) / (runs[args.large].wall_s - runs[args.small].wall_s)
            row["batchgen_whole"] = args.large / runs[args.large].wall_s
            row["load1_after"] = load1()
            tree.stop()
            outside = busy_cpu_s() - busy_before - sum(p.cpu_s for p in tree.stats.values())
            row["other_cores"] = round(max(0.0, outside) / (time.perf_counter() - started), 2)
            for side in ("per_prompt", "ray_example"):
                row[f"batchgen_over_{side}"] = row["batchgen_steady"] / row[f"{side}_steady"]
            (rejected if row["other_cores"] > args.max_busy_cores else repeats).append(row)
            print({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
    finally:
        moto.stop()
    repeats = quiet_repeats(repeats, rejected)

    medians = {k: median([r[k] for r in repeats]) for k in repeats[0] if k.endswith(("steady", "whole"))
               or k.startswith("batchgen_over")}
    result = {"bench": "baselines", "machine": machine(), "args": vars(args), "commands": sorted(set(commands)),
              "repeats": repeats, "rejected_busy": rejected, "median": medians}
    path = save("baselines", result)
    rows = [
        {"way": "(i) per-prompt script", "steady": medians["per_prompt_steady"],
         "whole": medians["per_prompt_whole"], "ratio": medians["batchgen_over_per_prompt"]},
        {"way": "(ii) Ray SD example pattern", "steady": medians["ray_example_steady"],
         "whole": medians["ray_example_whole"], "ratio": medians["batchgen_over_ray_example"]},
        {"way": "(iii) batchgen run", "steady": medians["batchgen_steady"], "whole": medians["batchgen_whole"],
         "ratio": 1.0},
    ]
    print()
    print(f"model={args.size} px={args.px} steps={args.steps} batch={args.batch_size} guidance={args.guidance} "
          f"threads={args.threads}; S3 (moto) out, PNG; medians of {args.repeats} repeats")
    print(f"load1 before each repeat {[r['load1'] for r in repeats]}; cores other processes used during each "
          f"{[r['other_cores'] for r in repeats]} ({len(rejected)} busy attempts rejected)")
    print(table(rows, [("way", "way", "s"), ("steady", "steady img/s", ".2f"),
                       ("whole", "whole-run img/s", ".2f"),
                       ("ratio", "batchgen / way (steady)", ".2f")]))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

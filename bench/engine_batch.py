"""Seconds per image of the bare engine at several batch sizes (no Ray): how batching pays on this machine.

    .venv/bin/python bench/engine_batch.py [--size tiny|bench] [--batches 1 4 16] [--steps 10] [--px 64]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from batchgen.engine import Engine, GenerationRequest
from batchgen.models.loading import load_model
from batchgen.models.tiny import make_tiny_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["tiny", "bench"], default="tiny")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--px", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--json", type=Path, default=Path("bench/out/engine_batch.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        model = load_model(str(make_tiny_model(Path(tmp) / "m", "sd15", args.size)), device="cpu", dtype="float32")
    engine = Engine(model)
    engine.generate([GenerationRequest(prompt="warm up", seed=0, steps=1, width=args.px, height=args.px)])

    results = []
    for batch in args.batches:
        rows = [GenerationRequest(prompt=f"prompt {i}", seed=i, steps=args.steps, width=args.px, height=args.px)
                for i in range(batch)]
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            engine.generate(rows)
            times.append(time.perf_counter() - start)
        median = statistics.median(times)
        results.append({"batch": batch, "s_per_batch": median, "s_per_image": median / batch,
                        "images_per_s": batch / median})

    load = os.getloadavg()[0]
    print(f"model={args.size} px={args.px} steps={args.steps} cfg=on threads={args.threads} "
          f"load1={load:.2f} repeats={args.repeats} (median)")
    print(f"{'batch':>6} {'s/batch':>9} {'s/image':>9} {'images/s':>9}")
    for r in results:
        print(f"{r['batch']:>6} {r['s_per_batch']:>9.3f} {r['s_per_image']:>9.4f} {r['images_per_s']:>9.2f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "load1": load,
                                     "results": results}, indent=2))


if __name__ == "__main__":
    main()

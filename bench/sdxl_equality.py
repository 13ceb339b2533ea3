"""How close batchgen's SDXL images are to diffusers' own pipelines, and to themselves across batch sizes.

    .venv/bin/python bench/sdxl_equality.py [--steps 4] [--px 32]

On the tiny random-weight SDXL base and refiner (batchgen make-tiny-model --family sdxl|sdxl-refiner), float32
on CPU: max abs difference (images in [0, 1]) between batchgen's engine and StableDiffusionXLPipeline per
scheduler; between base+refiner and the two-pipeline ensemble (base output_type="latent", denoising_end=0.5,
then the refiner with denoising_start=0.5 and a fresh torch.Generator("cpu").manual_seed(seed)); and between
a mixed batch (per-row guidance, negatives, prompt_2, size conditioning, aesthetic scores) and each row alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from pathlib import Path

import numpy as np
import torch
from _common import save, table
from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

from batchgen.engine import Engine, GenerationRequest
from batchgen.models.loading import load_model
from batchgen.models.schedulers import make_scheduler
from batchgen.models.tiny import make_tiny_model

START = 0.5


def reference(base, refiner, req: GenerationRequest) -> np.ndarray:
    pipe, config = base
    pipe.scheduler = make_scheduler(req.scheduler, config)
    kwargs = {"prompt": req.prompt, "prompt_2": req.prompt_2, "negative_prompt": req.negative_prompt or None,
              "negative_prompt_2": req.negative_prompt_2, "num_inference_steps": req.steps,
              "guidance_scale": req.guidance_scale, "original_size": req.value("original_size"),
              "crops_coords_top_left": req.value("crops_coords_top_left"), "target_size": req.value("target_size")}
    generator = torch.Generator().manual_seed(req.seed)
    if refiner is None:
        return pipe(**kwargs, height=req.height, width=req.width, generator=generator, output_type="np").images[0]
    latents = pipe(**kwargs, height=req.height, width=req.width, generator=generator, output_type="latent",
                   denoising_end=START).images
    refiner_pipe, refiner_config = refiner
    refiner_pipe.scheduler = make_scheduler(req.scheduler, refiner_config)
    return refiner_pipe(**kwargs, image=latents, denoising_start=START, aesthetic_score=req.aesthetic_score,
                        negative_aesthetic_score=req.negative_aesthetic_score,
                        generator=torch.Generator("cpu").manual_seed(req.seed), output_type="np").images[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--px", type=int, default=32)
    parser.add_argument("--schedulers", nargs="+", default=["euler", "euler_a", "ddim", "dpmpp_2m_karras", "unipc",
                                                             "heun", "lms"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base_dir = make_tiny_model(Path(tmp) / "sdxl", "sdxl")
        refiner_dir = make_tiny_model(Path(tmp) / "refiner", "sdxl-refiner")
        models = {"base": load_model(str(base_dir), device="cpu", dtype="float32"),
                  "base+refiner": load_model(str(base_dir), device="cpu", dtype="float32",
                                             refiner={"source": str(refiner_dir), "start": START})}
        pipe = StableDiffusionXLPipeline.from_pretrained(str(base_dir), add_watermarker=False)
        refiner_pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(str(refiner_dir))
    for p in (pipe, refiner_pipe):
        p.set_progress_bar_config(disable=True)
    base, refiner = (pipe, pipe.scheduler.config), (refiner_pipe, refiner_pipe.scheduler.config)
    plain = GenerationRequest(prompt="a lighthouse on a cliff at dusk", seed=7, guidance_scale=6.5,
                              steps=args.steps, width=args.px, height=args.px, negative_prompt="fog")
    rows = []
    for name, model in models.items():
        engine = Engine(model)
        for scheduler in args.schedulers:
            req = dataclasses.replace(plain, scheduler=scheduler)
            ours = engine.generate([req], output="float")[0].image
            expected = reference(base, refiner if name == "base+refiner" else None, req)
            rows.append({"model": name, "check": f"vs diffusers, {scheduler}",
                         "max_abs_diff": float(np.abs(ours - expected).max())})
        mixed = [dataclasses.replace(plain, seed=s, scheduler="euler_a", **values) for s, values in enumerate([
            {}, {"guidance_scale": 1.0}, {"guidance_scale": 0.0}, {"negative_prompt": "", "negative_prompt_2": "x"},
            {"prompt_2": "oil painting"}, {"original_size": (64, 48), "crops_coords_top_left": (8, 4)},
            {"target_size": (16, 16)}, {"aesthetic_score": 2.0, "negative_aesthetic_score": 7.0}])]
        batched = [result.image for result in engine.generate(mixed, output="float")]
        alone = [engine.generate([r], output="float")[0].image for r in mixed]
        expected = [reference(base, refiner if name == "base+refiner" else None, r) for r in mixed]
        for check, others in (("one at a time", alone), ("diffusers row by row", expected)):
            worst = max(float(np.abs(b - o).max()) for b, o in zip(batched, others, strict=True))
            rows.append({"model": name, "check": f"batch of {len(mixed)} (euler_a) vs {check}", "max_abs_diff": worst})
    print(table(rows, [("model", "model", "s"), ("check", "check", "s"), ("max_abs_diff", "max abs diff", ".2e")]))
    print(f"wrote {save('sdxl_equality', {'bench': 'sdxl_equality', 'args': vars(args), 'rows': rows})}")


if __name__ == "__main__":
    main()

"""The img2img and inpainting equality table: batchgen's images against each diffusers pipeline, max abs difference.

    .venv/bin/python bench/img2img_equality.py [--steps 4] [--px 32] [--only SD3]

Tiny random-weight models built by batchgen (`make-tiny-model --family sd15 | sd15-inpaint | sdxl | sdxl-refiner |
sdxl-inpaint | sd3`), float32 on CPU, one row per call with the row's seed on both sides, strengths 0.3 / 0.75 / 1.0
(SDXL inpainting also its default 0.9999), schedulers DDIM and Euler ancestral (whose per-step noise makes the
RNG order visible; SD3: flow-match Euler and Heun). Prints one line per (family, mode) with the largest
difference over its cases; `--only` runs the modes whose name contains it.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from _common import OUT, machine, save, table
from PIL import Image


def images(px: int) -> tuple[Image.Image, Image.Image]:
    rng = np.random.default_rng(0)
    init = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((px, px), Image.BILINEAR)
    mask = Image.fromarray(((np.arange(px)[None, :] >= px // 3) * 255).repeat(px, 0).astype(np.uint8), mode="L")
    return init, mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--px", type=int, default=32)
    parser.add_argument("--only", default="", help="run only the modes whose name contains this")
    args = parser.parse_args()

    import diffusers

    from batchgen.engine import Engine, GenerationRequest
    from batchgen.models.loading import load_model
    from batchgen.models.schedulers import make_scheduler
    from batchgen.models.tiny import make_tiny_model

    init, mask = images(args.px)
    discrete, flow = ("ddim", "euler_a"), ("euler", "heun")
    cases = [  # (family and mode, tiny model, diffusers pipeline, masked, strengths, schedulers)
        ("SD img2img", "sd15", "StableDiffusionImg2ImgPipeline", False, (0.3, 0.75, 1.0), discrete),
        ("SD inpainting, 9-channel UNet", "sd15-inpaint", "StableDiffusionInpaintPipeline", True, (0.3, 0.75, 1.0),
         discrete),
        ("SD inpainting, 4-channel UNet", "sd15", "StableDiffusionInpaintPipeline", True, (0.3, 0.75, 1.0), discrete),
        ("SDXL img2img (base)", "sdxl", "StableDiffusionXLImg2ImgPipeline", False, (0.3, 0.75, 1.0), discrete),
        ("SDXL img2img (refiner alone)", "sdxl-refiner", "StableDiffusionXLImg2ImgPipeline", False, (0.3, 0.75, 1.0),
         discrete),
        ("SDXL inpainting, 4-channel UNet", "sdxl", "StableDiffusionXLInpaintPipeline", True, (0.3, 0.9999, 1.0),
         discrete),
        ("SDXL inpainting, 9-channel UNet", "sdxl-inpaint", "StableDiffusionXLInpaintPipeline", True,
         (0.3, 0.9999, 1.0), discrete),
        ("SD3 img2img", "sd3", "StableDiffusion3Img2ImgPipeline", False, (0.3, 0.75, 1.0), flow),
    ]
    rows = []
    for name, family, pipeline_name, masked, strengths, schedulers in cases:
        if args.only not in name:
            continue
        model_dir = OUT / "models" / f"tiny-{family}"
        if not (model_dir / "model_index.json").is_file():
            make_tiny_model(model_dir, family)
        engine = Engine(load_model(str(model_dir), device="cpu", dtype="float32"))
        pipe = getattr(diffusers, pipeline_name).from_pretrained(str(model_dir))
        pipe.set_progress_bar_config(disable=True)
        own_config = pipe.scheduler.config  # every case builds its scheduler from the checkpoint's own config
        worst, count = 0.0, 0
        table_name = "flow" if schedulers == flow else "discrete"
        for scheduler in schedulers:
            for strength in strengths:
                extra = {"mask_image": "mask.png", "mask_pixels": mask.tobytes(), "mask_image_size": (args.px, args.px)}
                req = GenerationRequest(prompt="a lighthouse on a cliff", negative_prompt="blurry", seed=7,
                                        guidance_scale=6.5, steps=args.steps, width=args.px, height=args.px,
                                        scheduler=scheduler, init_image="init.png", strength=strength,
                                        init_pixels=init.tobytes(), init_image_size=(args.px, args.px),
                                        **(extra if masked else {}))
                ours = engine.generate([req], output="float")[0]
                assert ours.ok, ours.error
                pipe.scheduler = make_scheduler(scheduler, own_config, table_name)
                kwargs = {"mask_image": mask} if masked else {}
                if masked or table_name == "flow":  # SD3 img2img does not take the size from the image
                    kwargs.update(height=args.px, width=args.px)
                theirs = pipe(req.prompt, image=init, strength=strength, negative_prompt=req.negative_prompt,
                              num_inference_steps=args.steps, guidance_scale=req.guidance_scale,
                              generator=torch.Generator().manual_seed(req.seed), output_type="np", **kwargs).images[0]
                worst = max(worst, float(np.abs(ours.image - theirs).max()))
                count += 1
        rows.append({"mode": name, "pipeline": pipeline_name, "cases": count, "max_abs_diff": worst})
        print(f"{name}: max abs diff {worst:.2e} over {count} cases", flush=True)
    path = save("img2img-equality", {"bench": "img2img-equality", "machine": machine(), "args": vars(args),
                                     "rows": rows})
    print()
    print(table(rows, [("mode", "family and mode", "s"), ("pipeline", "diffusers pipeline", "s"),
                       ("cases", "cases", "d"), ("max_abs_diff", "max abs diff", ".2e")]))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

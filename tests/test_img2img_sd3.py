"""SD3 image-to-image against diffusers' StableDiffusion3Img2ImgPipeline on the same tiny models and seeds; masks and
skip-layer guidance, which that pipeline does not take, refused."""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import pytest
import torch
from diffusers import StableDiffusion3Img2ImgPipeline

from batchgen.engine import Engine, GenerationRequest
from batchgen.errors import JobConfigError
from batchgen.models.loading import load_model
from batchgen.models.schedulers import make_scheduler
from batchgen.prompts import plan_input
from batchgen.rows import resolve_fields
from batchgen.spec import InputSpec, SamplingSpec
from tests.jobs import prompts_table, write_table
from tests.test_img2img import images_of, init_image, mask_image
from tests.test_img2img import request as img2img_request

TOKENS = 48  # a short T5 length keeps the tiny model fast (as in test_sd3.py)
TOLERANCE = 1e-4


def request(strength: float, **overrides) -> GenerationRequest:
    values = {"guidance_scale": 5.0, "scheduler": "euler", "max_sequence_length": TOKENS, **overrides}
    return img2img_request(strength, **values)


@functools.cache
def diffusers_pipeline(model_dir) -> tuple[StableDiffusion3Img2ImgPipeline, dict]:
    pipe = StableDiffusion3Img2ImgPipeline.from_pretrained(str(model_dir))
    pipe.set_progress_bar_config(disable=True)
    return pipe, pipe.scheduler.config  # the checkpoint's own: every reference builds its scheduler from it


def reference(model_dir, req: GenerationRequest) -> np.ndarray:
    """diffusers' img2img pipeline, one row, one CPU generator seeded with the row's seed, the same PIL image."""
    pipe, scheduler_config = diffusers_pipeline(model_dir)
    pipe.scheduler = make_scheduler(req.scheduler, scheduler_config, "flow")
    image, _ = images_of(req)
    return pipe(req.prompt, image=image, strength=req.strength, negative_prompt=req.negative_prompt or None,
                num_inference_steps=req.steps, guidance_scale=req.guidance_scale, height=req.height, width=req.width,
                max_sequence_length=req.max_sequence_length, generator=torch.Generator().manual_seed(req.seed),
                output_type="np").images[0]


def generate(model, rows: list[GenerationRequest]) -> list:
    results = Engine(model).generate(rows, output="float")
    assert all(r.ok for r in results), [r.error for r in results]
    return results


# 4 steps: strength 0.3 keeps 2 steps here (4 - 1.2 = 2.8 cut to 2) where rounding the count would keep 1.
@pytest.mark.parametrize(("strength", "scheduler"), [(0.3, "euler"), (0.3, "heun"), (0.75, "heun"), (1.0, "euler")])
def test_sd3_img2img_matches_diffusers(tiny_sd3, tiny_sd3_dir, strength, scheduler):
    req = request(strength, scheduler=scheduler, negative_prompt="blurry")
    ours = generate(tiny_sd3, [req])[0].image
    diff = float(np.abs(ours - reference(tiny_sd3_dir, req)).max())
    print(f"equality sd3-img2img-{strength}-{scheduler}: max abs diff {diff:.2e}")
    assert diff <= TOLERANCE
    assert ours.std() > 1e-2, "image is flat: the comparison would prove nothing"


def test_sd3_img2img_mixed_strengths_batch_equals_one_at_a_time(tiny_sd3, tiny_sd3_dir):
    rows = [request(0.3, seed=1), request(0.75, seed=2, image=init_image(1)),
            request(0.75, seed=3, prompt="a bowl of ramen", negative_prompt="text"),
            request(0.75, seed=4, guidance_scale=1.0),
            dataclasses.replace(request(0.75, seed=9), init_image=None, strength=None, init_pixels=None,
                                init_image_size=None)]
    engine = Engine(tiny_sd3)
    batched = generate(tiny_sd3, rows)
    assert [r.batch_size for r in batched] == [1, 3, 3, 3, 1]
    for row, result in zip(rows, batched, strict=True):
        assert np.abs(result.image - engine.generate([row], output="float")[0].image).max() <= TOLERANCE
    for i in (0, 1, 3):
        assert np.abs(batched[i].image - reference(tiny_sd3_dir, rows[i])).max() <= TOLERANCE
    assert np.abs(batched[1].image - batched[2].image).max() > 1e-2


def test_sd3_img2img_init_image_of_another_size_with_dynamic_shifting(tiny_sd3_dynamic_dir):
    """The processor stretches a 24x72 image to the row's 48x64, and `mu` comes from the output size."""
    model = load_model(str(tiny_sd3_dynamic_dir), device="cpu", dtype="float32")
    req = request(0.75, image=init_image(3, size=(24, 72)), width=64, height=48, seed=5)
    ours = generate(model, [req])[0].image
    assert ours.shape == (48, 64, 3)
    assert np.abs(ours - reference(tiny_sd3_dynamic_dir, req)).max() <= TOLERANCE


def test_sd3_img2img_default_strength_is_diffusers_and_never_leaves_zero_steps(tiny_sd3):
    rules = tiny_sd3.adapter.rules
    row = {"prompt": "a fox", "init_image": "fox.png", "steps": 4}
    assert resolve_fields(row, SamplingSpec(), rules)["strength"] == 0.6
    # 4 x 0.05 < 1 is an error row for SD and SDXL; SD3 does not round, so one step is left.
    assert resolve_fields({**row, "strength": 0.05}, SamplingSpec(), rules)["strength"] == 0.05


def test_sd3_refuses_masks_and_skip_layer_guidance_with_init_images(tiny_sd3, tmp_path):
    slg = {"skip_guidance_layers": (1,), "skip_layer_guidance_scale": 2.8, "skip_layer_guidance_start": 0.0,
           "skip_layer_guidance_stop": 1.0}
    rows = [request(0.75, seed=1), request(0.75, seed=2, mask=mask_image()), request(0.75, seed=3, **slg),
            dataclasses.replace(request(0.75, seed=4, **slg), init_image=None, strength=None, init_pixels=None,
                                init_image_size=None)]
    results = Engine(tiny_sd3).generate(rows)
    assert results[0].ok and results[3].ok, "rows without the refused field still run"
    assert "`mask_image` must be null: this stable-diffusion-3 model does not use it" in results[1].error
    assert ("`skip_guidance_layers` must be null (`sampling.skip_layer_guidance` unset) for a row with an "
            "init_image") in results[2].error
    # In a job: a mask column, mapped or named `mask_image`, is refused before any work (not carried into extra).
    rules = tiny_sd3.adapter.rules
    path = write_table(tmp_path / "p.parquet", prompts_table(1, photo=["a.png"], hole=["m.png"]))
    with pytest.raises(JobConfigError, match=r"maps to \['mask_image'\], which a stable-diffusion-3 model does not"):
        plan_input(InputSpec(prompts=str(path), columns={"photo": "init_image", "hole": "mask_image"}), rules)
    named = write_table(tmp_path / "q.parquet", prompts_table(1, init_image=["a.png"], mask_image=["m.png"]))
    with pytest.raises(JobConfigError, match="has column 'mask_image', an image a stable-diffusion-3 model does not"):
        plan_input(InputSpec(prompts=str(named)), rules)
    assert plan_input(InputSpec(prompts=str(path), columns={"photo": "init_image"}), rules).extra_columns == ["hole"]

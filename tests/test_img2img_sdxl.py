"""SDXL image-to-image (a base, and the refiner as an img2img model on its own) and inpainting (4- and 9-channel
UNets) against diffusers' StableDiffusionXLImg2ImgPipeline and StableDiffusionXLInpaintPipeline on the same tiny
models and seeds."""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLInpaintPipeline

from batchgen.engine import Engine
from batchgen.models.loading import load_model
from batchgen.models.schedulers import make_scheduler
from tests.test_img2img import images_of, init_image, mask_image, request


@functools.cache
def diffusers_pipeline(model_dir, inpaint: bool = False):
    pipeline_class = StableDiffusionXLInpaintPipeline if inpaint else StableDiffusionXLImg2ImgPipeline
    pipe = pipeline_class.from_pretrained(str(model_dir))
    pipe.set_progress_bar_config(disable=True)
    return pipe, pipe.scheduler.config  # the checkpoint's own: every reference builds its scheduler from it


def reference(model_dir, req) -> np.ndarray:
    image, mask = images_of(req)
    pipe, scheduler_config = diffusers_pipeline(model_dir, inpaint=mask is not None)
    pipe.scheduler = make_scheduler(req.scheduler, scheduler_config)
    kwargs = {"mask_image": mask, "height": req.height, "width": req.width} if mask is not None else {}
    out = pipe(req.prompt, image=image, strength=req.strength, negative_prompt=req.negative_prompt or None,
               num_inference_steps=req.steps, guidance_scale=req.guidance_scale,
               generator=torch.Generator().manual_seed(req.seed), output_type="np", **kwargs)
    return out.images[0]


@pytest.fixture(scope="module")
def tiny_refiner(tiny_refiner_dir):
    return load_model(str(tiny_refiner_dir), device="cpu", dtype="float32")


@pytest.mark.parametrize(("strength", "scheduler"), [(0.3, "euler_a"), (0.75, "ddim"), (1.0, "euler_a")])
def test_sdxl_img2img_matches_diffusers(tiny_sdxl, tiny_sdxl_dir, strength, scheduler):
    req = request(strength, scheduler=scheduler, negative_prompt="blurry" if scheduler == "ddim" else "")
    result = Engine(tiny_sdxl).generate([req], output="float")[0]
    assert result.ok, result.error
    assert np.abs(result.image - reference(tiny_sdxl_dir, req)).max() <= 1e-4
    assert result.image.std() > 1e-3


@pytest.mark.parametrize(("strength", "scheduler"), [(0.3, "euler_a"), (0.75, "euler"), (1.0, "ddim")])
def test_refiner_alone_is_an_img2img_model(tiny_refiner, tiny_refiner_dir, strength, scheduler):
    req = request(strength, scheduler=scheduler, negative_prompt="blurry")
    result = Engine(tiny_refiner).generate([req], output="float")[0]
    assert result.ok, result.error
    assert np.abs(result.image - reference(tiny_refiner_dir, req)).max() <= 1e-4


def test_sdxl_mixed_strengths_batch_equals_one_at_a_time(tiny_refiner, tiny_refiner_dir):
    rows = [request(0.3, seed=1), request(0.75, seed=2, image=init_image(1)), request(0.75, seed=3),
            request(1.0, seed=4, aesthetic_score=8.0, negative_aesthetic_score=1.0)]
    engine = Engine(tiny_refiner)
    batched = engine.generate(rows, output="float")
    assert [r.batch_size for r in batched] == [1, 2, 2, 1]
    for row, result in zip(rows, batched, strict=True):
        assert np.abs(result.image - engine.generate([row], output="float")[0].image).max() <= 1e-4
    assert np.abs(batched[1].image - reference(tiny_refiner_dir, rows[1])).max() <= 1e-4


@pytest.mark.parametrize(("strength", "scheduler"), [(0.3, "euler_a"), (0.9999, "euler_a"), (1.0, "ddim")])
def test_sdxl_inpaint_4_channels_matches_diffusers(tiny_sdxl, tiny_sdxl_dir, strength, scheduler):
    req = request(strength, mask=mask_image(), scheduler=scheduler, negative_prompt="blurry")
    result = Engine(tiny_sdxl).generate([req], output="float")[0]
    assert result.ok, result.error
    assert np.abs(result.image - reference(tiny_sdxl_dir, req)).max() <= 1e-4


@pytest.mark.parametrize(("strength", "scheduler"), [(0.3, "euler_a"), (0.75, "ddim"), (0.9999, "euler_a"),
                                                     (1.0, "euler_a")])
def test_sdxl_inpaint_9_channels_matches_diffusers(tiny_sdxl_inpaint, tiny_sdxl_inpaint_dir, strength, scheduler):
    """diffusers encodes the masked image with the row's generator after the noise (and the init image before it
    only below strength 1): Euler ancestral's per-step noise would show any other order."""
    assert tiny_sdxl_inpaint.pipe.unet.config.in_channels == 9
    req = request(strength, mask=mask_image(), scheduler=scheduler, negative_prompt="blurry")
    result = Engine(tiny_sdxl_inpaint).generate([req], output="float")[0]
    assert result.ok, result.error
    assert np.abs(result.image - reference(tiny_sdxl_inpaint_dir, req)).max() <= 1e-4
    assert result.image.std() > 1e-3


def test_sdxl_inpaint_9_channels_batch_equals_one_at_a_time_and_needs_both_images(tiny_sdxl_inpaint):
    rows = [request(s, seed=n, mask=mask_image(n), image=init_image(n)) for n, s in enumerate([0.3, 0.75, 0.75])]
    text_only = dataclasses.replace(request(0.75), init_image=None, strength=None, init_pixels=None,
                                    init_image_size=None)
    engine = Engine(tiny_sdxl_inpaint)
    batched = engine.generate([*rows, request(0.75, seed=5), text_only], output="float")
    assert [r.batch_size for r in batched[:3]] == [1, 2, 2]
    for row, result in zip(rows, batched[:3], strict=True):
        assert np.abs(result.image - engine.generate([row], output="float")[0].image).max() <= 1e-4
    assert "`mask_image` must be set: this stable-diffusion-xl checkpoint needs init_image and mask_image" in (
        batched[3].error)
    assert "`init_image` must be set" in batched[4].error


def test_refiner_alone_needs_an_init_image(tiny_refiner, tiny_sdxl):
    text_only = dataclasses.replace(request(0.75), init_image=None, strength=None, init_pixels=None,
                                    init_image_size=None)
    result = Engine(tiny_refiner).generate([text_only])[0]
    assert "`init_image` must be set: this stable-diffusion-xl checkpoint needs init_image on every row" in result.error
    assert (tiny_sdxl.adapter.rules.strength, tiny_sdxl.adapter.rules.inpaint_strength) == (0.3, 0.9999)


def test_inpainting_base_with_a_refiner_exits_2(tiny_sdxl_inpaint_dir, tiny_refiner_dir, tmp_path):
    """A base followed by a refiner starts from noise: an inpainting checkpoint, whose rows all need images, is
    refused before Ray starts rather than making every row an error row."""
    from tests.test_sdxl import validate

    code, message = validate("--model", str(tiny_sdxl_inpaint_dir), "--output", str(tmp_path / "out"),
                             "--refiner", str(tiny_refiner_dir))
    assert code == 2, message
    assert f"`model.refiner`: a base followed by a refiner starts from noise, but '{tiny_sdxl_inpaint_dir}' is a " \
           "StableDiffusionXLInpaintPipeline that needs init_image and mask_image on every row" in message


@pytest.mark.parametrize(("tiny", "family"), [("sd15-inpaint", "stable-diffusion"),
                                              ("sdxl-inpaint", "stable-diffusion-xl")])
def test_make_tiny_if_missing_builds_inpainting_models(tmp_path, tiny, family):
    from batchgen.models.plan import plan_model
    from batchgen.spec import load_spec

    spec = load_spec(None, {"input.prompts": str(tmp_path / "prompts"), "output.uri": str(tmp_path / "out"),
                            "model.source": str(tmp_path / tiny), "model.make_tiny_if_missing": tiny})
    _, _, rules = plan_model(spec.model, spec.sampling)
    assert (rules.family, rules.needs) == (family, ("init_image", "mask_image"))

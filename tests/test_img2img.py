"""Image-to-image and inpainting against diffusers' own pipelines on the same tiny models and seeds."""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline
from PIL import Image

from batchgen.engine import Engine, GenerationRequest
from batchgen.models.schedulers import make_scheduler

SIZE = 32
STEPS = 4


def init_image(seed: int = 0, size: tuple[int, int] = (SIZE, SIZE)) -> Image.Image:
    """A smooth random image (a noise field would make every model's output look alike)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((size[1], size[0]), Image.BILINEAR)


def mask_image(seed: int = 0) -> Image.Image:
    """White (repaint) on the right part, at a seed-dependent column."""
    columns = np.arange(SIZE)[None, :] >= 10 + 4 * (seed % 3)
    return Image.fromarray((columns.repeat(SIZE, 0) * 255).astype(np.uint8), mode="L")


def request(strength: float, image: Image.Image | None = None, mask: Image.Image | None = None,
            **overrides) -> GenerationRequest:
    image = image or init_image()
    values = dict(prompt="a lighthouse on a cliff", seed=7, guidance_scale=6.5, steps=STEPS, width=SIZE,
                  height=SIZE, scheduler="euler_a", init_image="s3://bucket/init.png", strength=strength,
                  init_pixels=image.tobytes(), init_image_size=(image.height, image.width))
    if mask is not None:
        values.update(mask_image="s3://bucket/mask.png", mask_pixels=mask.tobytes(),
                      mask_image_size=(mask.height, mask.width))
    values.update(overrides)
    return GenerationRequest(**values)


def images_of(req: GenerationRequest) -> tuple[Image.Image, Image.Image | None]:
    height, width = req.init_image_size
    image = Image.frombytes("RGB", (width, height), req.init_pixels)
    mask = Image.frombytes("L", (SIZE, SIZE), req.mask_pixels) if req.mask_pixels else None
    return image, mask


@functools.cache
def diffusers_pipeline(pipeline_class, model_dir):
    pipe = pipeline_class.from_pretrained(str(model_dir))
    pipe.set_progress_bar_config(disable=True)
    return pipe, pipe.scheduler.config  # the checkpoint's own: every reference builds its scheduler from it


def reference(pipeline_class, model_dir, req: GenerationRequest, image: Image.Image | None = None) -> np.ndarray:
    """diffusers' own pipeline for the mode, one row, one CPU generator seeded with the row's seed."""
    pipe, scheduler_config = diffusers_pipeline(pipeline_class, model_dir)
    pipe.scheduler = make_scheduler(req.scheduler, scheduler_config)
    own_image, mask = images_of(req)
    kwargs = {"mask_image": mask, "height": req.height, "width": req.width} if mask is not None else {}
    out = pipe(req.prompt, image=image or own_image, strength=req.strength, negative_prompt=req.negative_prompt or None,
               num_inference_steps=req.steps, guidance_scale=req.guidance_scale, eta=req.eta,
               generator=torch.Generator().manual_seed(req.seed), output_type="np", **kwargs)
    return out.images[0]


def ours(model, req: GenerationRequest) -> np.ndarray:
    result = Engine(model).generate([req], output="float")[0]
    assert result.ok, result.error
    return result.image


@pytest.mark.parametrize(("strength", "scheduler"), [(0.3, "euler_a"), (0.75, "ddim"), (1.0, "euler_a"),
                                                     (0.5, "dpmpp_2m_karras"), (0.75, "pndm")])
def test_img2img_matches_diffusers(tiny_model, tiny_model_dir, strength, scheduler):
    req = request(strength, scheduler=scheduler, negative_prompt="fog" if scheduler == "ddim" else "")
    got = ours(tiny_model, req)
    expected = reference(StableDiffusionImg2ImgPipeline, tiny_model_dir, req)
    assert np.abs(got - expected).max() <= 1e-4
    assert got.std() > 1e-3, "image is flat: the comparison would prove nothing"


@pytest.mark.parametrize("strength", [0.3, 0.75, 1.0])
def test_inpaint_9_channels_matches_diffusers(tiny_inpaint_model, tiny_inpaint_model_dir, strength):
    assert tiny_inpaint_model.pipe.unet.config.in_channels == 9
    req = request(strength, mask=mask_image())
    assert np.abs(ours(tiny_inpaint_model, req) - reference(StableDiffusionInpaintPipeline, tiny_inpaint_model_dir,
                                                             req)).max() <= 1e-4


@pytest.mark.parametrize(("strength", "scheduler"), [(0.3, "euler_a"), (0.75, "ddim"), (1.0, "euler_a")])
def test_inpaint_4_channels_matches_diffusers(tiny_model, tiny_model_dir, strength, scheduler):
    req = request(strength, mask=mask_image(), scheduler=scheduler)
    got = ours(tiny_model, req)
    assert np.abs(got - reference(StableDiffusionInpaintPipeline, tiny_model_dir, req)).max() <= 1e-4
    # The blend keeps the unmasked (left) part close to the init image; the repainted part is the model's.
    left = np.asarray(init_image(), dtype=np.float32)[:, :8] / 255
    assert np.abs(got[:, :8] - left).mean() < np.abs(got[:, -8:] - np.asarray(init_image())[:, -8:] / 255).mean()


def test_init_image_of_another_size_is_stretched_to_the_row_size(tiny_model, tiny_model_dir):
    """The model's image processor resizes to the row's width x height (no crop, aspect ratio not kept): the same
    as handing diffusers the image resized with the processor's filter (Lanczos)."""
    wide = init_image(3, size=(24, 72))
    req = request(0.75, image=wide)
    resized = wide.resize((SIZE, SIZE), Image.LANCZOS)
    assert np.abs(ours(tiny_model, req) - reference(StableDiffusionImg2ImgPipeline, tiny_model_dir, req,
                                                    image=resized)).max() <= 1e-4


def mixed_rows() -> list[GenerationRequest]:
    return [
        request(0.3, seed=1),
        request(0.75, seed=2, image=init_image(1), guidance_scale=1.0),
        request(0.75, seed=3, prompt="a bowl of ramen", negative_prompt="text"),
        request(0.75, seed=6, mask=mask_image(1)),
        dataclasses.replace(request(0.75, seed=9), init_image=None, strength=None, init_pixels=None,
                            init_image_size=None),
    ]


def test_mixed_strengths_batch_equals_one_at_a_time_and_diffusers(tiny_model, tiny_model_dir):
    rows = mixed_rows()
    engine = Engine(tiny_model)
    batched = engine.generate(rows, output="float")
    assert all(r.ok for r in batched), [r.error for r in batched]
    assert max(r.batch_size for r in batched) >= 2, "rows that share a loop were batched"
    for row, result in zip(rows, batched, strict=True):
        single = engine.generate([row], output="float")[0]
        assert np.abs(result.image - single.image).max() <= 1e-4
    for i in (0, 1, 3):
        pipeline = StableDiffusionInpaintPipeline if rows[i].mask_image else StableDiffusionImg2ImgPipeline
        assert np.abs(batched[i].image - reference(pipeline, tiny_model_dir, rows[i])).max() <= 1e-4
    assert np.abs(batched[0].image - batched[1].image).max() > 1e-2


def test_inpaint_batch_equals_one_at_a_time(tiny_inpaint_model):
    rows = [request(s, seed=n, mask=mask_image(n), image=init_image(n)) for n, s in enumerate([0.3, 0.75, 1.0, 0.75])]
    engine = Engine(tiny_inpaint_model)
    batched = engine.generate(rows, output="float")
    assert [r.batch_size for r in batched] == [1, 2, 1, 2]
    for row, result in zip(rows, batched, strict=True):
        assert np.abs(result.image - engine.generate([row], output="float")[0].image).max() <= 1e-4


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"strength": 0.0}, "`strength` must be a number in (0, 1] but is 0.0"),
        ({"strength": 1.5}, "`strength` must be a number in (0, 1] but is 1.5"),
        ({"strength": 0.2}, "`strength` leaves no denoising step at 4 steps (needs steps x strength >= 1)"),
        ({"strength": None}, "`strength` must be set for a row with an init_image"),
        ({"init_image": None, "init_pixels": None}, "`strength` must be null when `init_image` is"),
    ],
)
def test_bad_img2img_row_is_an_error_row(tiny_model, overrides, message):
    rows = [request(0.75, seed=1), dataclasses.replace(request(0.75, seed=2), **overrides)]
    results = Engine(tiny_model).generate(rows)
    assert results[0].ok
    assert not results[1].ok and message in results[1].error


def test_inpainting_model_needs_image_and_mask(tiny_inpaint_model):
    text_only = GenerationRequest(prompt="a fox", seed=1, steps=STEPS, width=SIZE, height=SIZE)
    results = Engine(tiny_inpaint_model).generate([text_only, request(0.75, seed=2),
                                                   request(0.75, seed=3, mask=mask_image())])
    needs = "`init_image` must be set: this stable-diffusion checkpoint needs init_image and mask_image"
    assert needs in results[0].error
    assert "`mask_image` must be set" in results[1].error
    assert results[2].ok


@pytest.mark.parametrize(("pipeline_name", "scheduler_name", "whole_steps"), [
    ("StableDiffusionImg2ImgPipeline", "HeunDiscreteScheduler", True),
    ("StableDiffusionXLImg2ImgPipeline", "EulerDiscreteScheduler", True),
    ("StableDiffusion3Img2ImgPipeline", "FlowMatchEulerDiscreteScheduler", False),
])
def test_strength_cuts_timesteps_as_each_family_pipeline_does(pipeline_name, scheduler_name, whole_steps):
    """The family-independent cut (img2img.strength_timesteps) against each pipeline's own `get_timesteps`, with the
    rule each family takes: SD and SDXL keep int(steps x strength) steps, SD3 does not truncate the count."""
    import types

    import diffusers

    from batchgen.models.img2img import strength_timesteps

    pipeline = getattr(diffusers, pipeline_name)
    cut = 0
    for steps in (1, 3, 4, 7, 10, 25):
        for strength in (0.05, 0.3, 0.31, 0.5, 0.75, 0.99, 1.0):
            theirs = getattr(diffusers, scheduler_name)()
            theirs.set_timesteps(steps)
            expected, _ = pipeline.get_timesteps(types.SimpleNamespace(scheduler=theirs), steps, strength, "cpu")
            ours = getattr(diffusers, scheduler_name)()
            ours.set_timesteps(steps)
            got = strength_timesteps(ours, steps, strength, whole_steps)
            assert torch.equal(got, expected), (steps, strength)
            assert ours.begin_index == theirs.begin_index
            cut += len(got) < len(ours.timesteps)
    assert cut > 10

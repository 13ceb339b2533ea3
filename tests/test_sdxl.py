"""SDXL base and base+refiner against diffusers' own pipelines on the tiny models, per-row conditioning, batching."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

from batchgen.cli import main
from batchgen.engine import Engine, GenerationRequest
from batchgen.models.schedulers import make_scheduler
from tests.models import REFINER_START

SIZE = 32
STEPS = 4


@pytest.fixture(scope="module")
def diffusers_base(tiny_sdxl_dir):
    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl_dir), add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe, pipe.scheduler.config


@pytest.fixture(scope="module")
def diffusers_refiner(tiny_refiner_dir):
    pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(str(tiny_refiner_dir))
    pipe.set_progress_bar_config(disable=True)
    return pipe, pipe.scheduler.config


def conditioning(req: GenerationRequest) -> dict:
    return {"prompt": req.prompt, "prompt_2": req.prompt_2, "negative_prompt": req.negative_prompt or None,
            "negative_prompt_2": req.negative_prompt_2, "num_inference_steps": req.steps,
            "guidance_scale": req.guidance_scale, "eta": req.eta, "original_size": req.value("original_size"),
            "crops_coords_top_left": req.value("crops_coords_top_left"), "target_size": req.value("target_size")}


def reference(base, req: GenerationRequest, refiner=None) -> np.ndarray:
    """diffusers' SDXL pipeline, one prompt, one CPU generator; with `refiner`, the two-pipeline ensemble: the base
    to denoising_end as latents, then the refiner from denoising_start with a fresh generator of the same seed."""
    pipe, config = base
    pipe.scheduler = make_scheduler(req.scheduler, config)
    kwargs = conditioning(req)
    generator = torch.Generator().manual_seed(req.seed)
    if refiner is None:
        return pipe(**kwargs, height=req.height, width=req.width, generator=generator, output_type="np").images[0]
    latents = pipe(**kwargs, height=req.height, width=req.width, generator=generator, output_type="latent",
                   denoising_end=REFINER_START).images
    refiner_pipe, refiner_config = refiner
    refiner_pipe.scheduler = make_scheduler(req.scheduler, refiner_config)
    return refiner_pipe(**kwargs, image=latents, denoising_start=REFINER_START, aesthetic_score=req.aesthetic_score,
                        negative_aesthetic_score=req.negative_aesthetic_score,
                        generator=torch.Generator("cpu").manual_seed(req.seed), output_type="np").images[0]


def request(**overrides) -> GenerationRequest:
    base = GenerationRequest(prompt="a lighthouse on a cliff at dusk", seed=7, guidance_scale=6.5, steps=STEPS,
                             width=SIZE, height=SIZE, scheduler="euler")
    return dataclasses.replace(base, **overrides)


def max_diff(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape
    return float(np.abs(a - b).max())


@pytest.mark.parametrize(("scheduler", "negative"), [("euler", ""), ("euler_a", "blurry, low quality"),
                                                   ("dpmpp_2m_karras", ""), ("ddim", "text"), ("unipc", "")])
def test_base_matches_diffusers(tiny_sdxl, diffusers_base, scheduler, negative):
    req = request(scheduler=scheduler, negative_prompt=negative)
    ours = Engine(tiny_sdxl).generate([req], output="float")[0].image
    assert ours.shape == (SIZE, SIZE, 3) and ours.std() > 1e-3, "a flat image would prove nothing"
    assert max_diff(ours, reference(diffusers_base, req)) <= 1e-4


@pytest.mark.parametrize("scheduler", ["euler", "euler_a", "heun"])
def test_base_and_refiner_match_the_two_pipeline_ensemble(tiny_sdxl_refined, diffusers_base, diffusers_refiner,
                                                          scheduler):
    req = request(scheduler=scheduler, negative_prompt="fog", seed=123)
    ours = Engine(tiny_sdxl_refined).generate([req], output="float")[0].image
    assert max_diff(ours, reference(diffusers_base, req, diffusers_refiner)) <= 1e-4


def mixed_rows(refined: bool) -> list[GenerationRequest]:
    """One sampling group (same steps, size, scheduler): every per-row value differs and shares the loop. The
    rows after the third share the first row's seed and prompt, so each differs from it by its value alone."""
    rows = [
        request(seed=1),
        request(seed=2, guidance_scale=1.0),
        request(seed=3, guidance_scale=0.0, prompt="a bowl of ramen"),
        request(seed=1, guidance_scale=3.0, negative_prompt="text", negative_prompt_2="watermark"),
        request(seed=1, prompt_2="oil painting, impasto"),
        request(seed=1, original_size=(64, 48), crops_coords_top_left=(8, 4), target_size=(16, 16)),
        request(seed=1, negative_prompt="", negative_prompt_2="blur", guidance_scale=9.0),
    ]
    if refined:
        rows.append(request(seed=1, aesthetic_score=2.0, negative_aesthetic_score=7.0))
    return rows


@pytest.mark.parametrize("refined", [False, True], ids=["base", "base+refiner"])
def test_per_row_values_in_one_batch_match_diffusers_row_by_row(
    tiny_sdxl, tiny_sdxl_refined, diffusers_base, diffusers_refiner, refined
):
    model = tiny_sdxl_refined if refined else tiny_sdxl
    rows = mixed_rows(refined)
    engine = Engine(model)
    batched = engine.generate(rows, output="float")
    assert {r.batch_size for r in batched} == {len(rows)}, "all rows shared one loop"
    for row, result in zip(rows, batched, strict=True):
        expected = reference(diffusers_base, row, diffusers_refiner if refined else None)
        assert max_diff(result.image, expected) <= 1e-4, row
        assert max_diff(result.image, engine.generate([row], output="float")[0].image) <= 1e-4
    # The per-row values took effect: each changes the image of the first row's seed and prompt (by far more than
    # the float noise between batch sizes).
    for row, result in zip(rows[3:], batched[3:], strict=True):
        assert max_diff(result.image, batched[0].image) > 1e-4, row


def test_refiner_changes_the_image_and_shares_the_bases_components(tiny_sdxl, tiny_sdxl_refined):
    adapter = tiny_sdxl_refined.adapter
    assert adapter.refiner.text_encoder_2 is tiny_sdxl_refined.pipe.text_encoder_2, "identical files: loaded once"
    assert adapter.refiner.vae is tiny_sdxl_refined.pipe.vae
    assert adapter.refiner.unet is not tiny_sdxl_refined.pipe.unet
    req = request()
    base_only = Engine(tiny_sdxl).generate([req], output="float")[0].image
    refined = Engine(tiny_sdxl_refined).generate([req], output="float")[0].image
    assert max_diff(base_only, refined) > 1e-3


def test_empty_negative_is_zeros_where_the_model_says_so(tiny_sdxl_refined):
    adapter = tiny_sdxl_refined.adapter
    assert adapter.force_zeros and not adapter.refiner.config.force_zeros_for_empty_prompt
    empty = adapter.empty_conditioning()
    assert not empty["prompt_embeds"].any() and not empty["pooled"].any()
    assert empty["refiner_prompt_embeds"].abs().sum() > 0, "the refiner encodes an empty prompt"
    encoded = adapter.encode_text([("fog", "fog")]).conditioning
    assert encoded["prompt_embeds"].abs().sum() > 0


def test_rejected_scheduler_is_an_error_row_naming_the_allowed_names(tiny_sdxl):
    results = Engine(tiny_sdxl).generate([request(scheduler="warp9"), request(seed=2)])
    assert results[1].ok and not results[0].ok
    assert "`scheduler` must be one of ['model', 'ddim'," in results[0].error
    assert "for a stable-diffusion-xl model but is 'warp9'" in results[0].error


def validate(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["validate", *args])
    return result.exit_code, result.stderr


def test_refiner_refusals_exit_2_naming_the_models(tiny_model_dir, tiny_sdxl_dir, tiny_refiner_dir, tmp_path):
    other_vae = tmp_path / "other-vae-refiner"
    shutil.copytree(tiny_refiner_dir, other_vae)
    config = json.loads((other_vae / "vae" / "config.json").read_text())
    (other_vae / "vae" / "config.json").write_text(json.dumps({**config, "scaling_factor": 0.5}))
    base = ["--model", str(tiny_sdxl_dir), "--output", str(tmp_path / "out")]

    code, message = validate(*base, "--refiner", str(other_vae))
    assert code == 2 and f"refiner '{other_vae}' is incompatible with base '{tiny_sdxl_dir}'" in message
    assert "vae scaling_factor is 0.5 in the refiner but 0.13025 in the base" in message
    code, message = validate(*base, "--refiner", str(tiny_model_dir))
    assert code == 2 and f"`model.refiner.source` '{tiny_model_dir}' is a StableDiffusionPipeline" in message
    code, message = validate("--model", str(tiny_model_dir), "--refiner", str(tiny_refiner_dir))
    assert code == 2 and "a stable-diffusion model" in message and "takes no refiner" in message
    code, message = validate(*base, "--scheduler", "warp9")
    assert code == 2 and "must be one of ['model', 'ddim'," in message
    code, message = validate(*base, "--refiner", str(tiny_refiner_dir), "--refiner-start", "1.5")
    assert code == 2 and "model.refiner.start" in message
    code, message = validate(*base, "--refiner", str(tiny_refiner_dir), "--refiner-start", "0.7")
    assert code == 0, message

"""The engine against diffusers' own StableDiffusionPipeline, batch invariance, guidance and bad rows."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from batchgen.engine import Engine, GenerationRequest
from batchgen.models.schedulers import make_scheduler

SIZE = 64
STEPS = 4


def reference(model_dir, req: GenerationRequest) -> np.ndarray:
    """diffusers' own pipeline, one prompt, one CPU generator: the ground truth."""
    pipe = StableDiffusionPipeline.from_pretrained(str(model_dir))
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = make_scheduler(req.scheduler, pipe.scheduler.config)
    out = pipe(
        req.prompt,
        negative_prompt=req.negative_prompt or None,
        num_inference_steps=req.steps,
        guidance_scale=req.guidance_scale,
        height=req.height,
        width=req.width,
        eta=req.eta,
        generator=torch.Generator().manual_seed(req.seed),
        output_type="np",
    )
    return out.images[0]


def request(**overrides) -> GenerationRequest:
    base = GenerationRequest(
        prompt="a lighthouse on a cliff at dusk", seed=7, guidance_scale=6.5, steps=STEPS, width=SIZE, height=SIZE
    )
    return dataclasses.replace(base, **overrides)


@pytest.mark.parametrize("scheduler", ["ddim", "euler_a", "dpmpp_2m_karras", "pndm", "ddpm", "unipc", "lms"])
@pytest.mark.parametrize("negative", ["", "blurry, low quality"])
def test_matches_diffusers_epsilon(tiny_model, tiny_model_dir, scheduler, negative):
    req = request(scheduler=scheduler, negative_prompt=negative)
    ours = Engine(tiny_model).generate([req], output="float")[0].image
    expected = reference(tiny_model_dir, req)
    assert ours.shape == expected.shape == (SIZE, SIZE, 3)
    assert np.abs(ours - expected).max() <= 1e-4
    assert ours.std() > 1e-3, "image is flat: the comparison would prove nothing"


@pytest.mark.parametrize("scheduler", ["ddim", "euler", "dpmpp_2m", "heun"])
def test_matches_diffusers_v_prediction(tiny_v_model, tiny_v_model_dir, scheduler):
    assert tiny_v_model.adapter.base_scheduler_config.prediction_type == "v_prediction"
    req = request(scheduler=scheduler, negative_prompt="fog", seed=123)
    ours = Engine(tiny_v_model).generate([req], output="float")[0].image
    assert np.abs(ours - reference(tiny_v_model_dir, req)).max() <= 1e-4


def test_ddim_eta_matches_diffusers(tiny_model, tiny_model_dir):
    req = request(scheduler="ddim", eta=0.8)
    ours = Engine(tiny_model).generate([req], output="float")[0].image
    assert np.abs(ours - reference(tiny_model_dir, req)).max() <= 1e-4


def mixed_rows() -> list[GenerationRequest]:
    return [
        request(seed=1),
        request(seed=2, prompt="a bowl of ramen, studio light", negative_prompt="text"),
        request(seed=3, scheduler="euler_a", guidance_scale=3.0),
        request(seed=4, width=48, height=80),
        request(seed=5, steps=STEPS + 2, guidance_scale=1.0),
        request(seed=1, prompt="a lighthouse on a cliff at dusk", guidance_scale=9.0),
        request(seed=6, scheduler="euler_a", negative_prompt="text"),
        request(seed=7, width=48, height=80, guidance_scale=0.0),
    ]


def test_batch_equals_one_at_a_time(tiny_model):
    rows = mixed_rows()
    engine = Engine(tiny_model)
    batched = engine.generate(rows, output="float")
    for row, result in zip(rows, batched, strict=True):
        single = engine.generate([row], output="float")[0]
        assert result.ok and single.ok
        assert result.image.shape == (row.height, row.width, 3)
        assert np.abs(result.image - single.image).max() <= 1e-4
    # Rows that shared a loop really were batched.
    assert max(r.batch_size for r in batched) >= 2


def test_same_row_same_image_whatever_its_neighbours(tiny_model):
    engine = Engine(tiny_model)
    target = request(seed=99)
    alone = engine.generate([target], output="float")[0].image
    crowd = [request(seed=s, prompt=f"prompt number {s}") for s in range(5)]
    among = engine.generate(crowd[:2] + [target] + crowd[2:], output="float")[2].image
    assert np.abs(alone - among).max() <= 1e-4
    other_seed = engine.generate([request(seed=100)], output="float")[0].image
    assert np.abs(alone - other_seed).max() > 1e-2, "different seeds must give different images"


def test_max_batch_size_splits_without_changing_pixels(tiny_model):
    rows = [request(seed=s) for s in range(5)]
    whole = Engine(tiny_model).generate(rows, output="float")
    split = Engine(tiny_model, max_batch_size=2).generate(rows, output="float")
    assert [r.batch_size for r in split] == [2, 2, 2, 2, 1]
    for a, b in zip(whole, split, strict=True):
        assert np.abs(a.image - b.image).max() <= 1e-4


def test_per_row_guidance_equals_separate_runs(tiny_model, tiny_model_dir):
    scales = [0.0, 1.0, 2.5, 7.5, 12.0]
    rows = [request(seed=11, guidance_scale=g) for g in scales]
    batched = Engine(tiny_model).generate(rows, output="float")
    for row, result in zip(rows, batched, strict=True):
        assert np.abs(result.image - reference(tiny_model_dir, row)).max() <= 1e-4
    assert np.abs(batched[2].image - batched[3].image).max() > 1e-3


class CountingDenoiser:
    """Wraps the family's denoiser to record the batch size of every call."""

    def __init__(self, denoiser):
        self.inner = denoiser
        self.calls: list[int] = []

    def __call__(self, latents, *args, **kwargs):
        self.calls.append(latents.shape[0])
        return self.inner(latents, *args, **kwargs)


def counting_engine(model, monkeypatch) -> tuple[Engine, CountingDenoiser]:
    counter = CountingDenoiser(model.adapter.denoiser)
    monkeypatch.setattr(model.adapter, "denoiser", counter)
    return Engine(model), counter


def test_cfg_is_one_call_of_twice_the_batch(tiny_model, monkeypatch):
    engine, counter = counting_engine(tiny_model, monkeypatch)
    engine.generate([request(seed=s, guidance_scale=g) for s, g in [(1, 7.5), (2, 1.0), (3, 0.5)]])
    assert counter.calls == [6] * STEPS


def test_guidance_at_most_one_skips_unconditional_pass(tiny_model, tiny_model_dir, monkeypatch):
    engine, counter = counting_engine(tiny_model, monkeypatch)
    rows = [request(seed=s, guidance_scale=g) for s, g in [(1, 1.0), (2, 0.0), (3, 0.7)]]
    results = engine.generate(rows, output="float")
    assert counter.calls == [3] * STEPS
    assert np.abs(results[0].image - reference(tiny_model_dir, rows[0])).max() <= 1e-4


def test_unique_prompts_encoded_once(tiny_model, monkeypatch):
    engine = Engine(tiny_model)
    engine.empty_conditioning()
    seen: list[list[str]] = []
    original = tiny_model.adapter.encode_text

    def spy(prompts):
        seen.append(list(prompts))
        return original(prompts)

    monkeypatch.setattr(tiny_model.adapter, "encode_text", spy)
    engine.generate([request(seed=s, prompt=["cat", "dog"][s % 2], negative_prompt="") for s in range(6)])
    assert seen == [["cat", "dog"]]


def test_truncation_flag(tiny_model):
    limit = tiny_model.adapter.max_prompt_tokens
    long_prompt = "x " * (limit * 2)
    results = Engine(tiny_model).generate([request(prompt="short prompt"), request(prompt=long_prompt)])
    assert [r.truncated for r in results] == [False, True]
    assert all(r.ok for r in results)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("prompt", "", "`prompt` must be a non-empty string"),
        ("prompt", None, "`prompt` must be a non-empty string"),
        ("width", 60, "`width` must be divisible by 8 but is 60"),
        ("height", 0, "`height` must be an integer in [8, 4096] but is 0"),
        ("steps", 0, "`steps` must be an integer in [1, 1000] but is 0"),
        ("steps", 10_000, "`steps` must be an integer in [1, 1000] but is 10000"),
        ("guidance_scale", float("nan"), "`guidance_scale` must be a finite number >= 0 but is nan"),
        ("guidance_scale", float("inf"), "`guidance_scale` must be a finite number >= 0 but is inf"),
        ("guidance_scale", -2.0, "`guidance_scale` must be a finite number >= 0 but is -2.0"),
        ("scheduler", "warp9", "`scheduler` must be one of"),
        ("seed", -1, "`seed` must be an integer in"),
    ],
)
def test_bad_row_is_rejected_without_failing_others(tiny_model, field, value, message):
    rows = [request(seed=1), request(**{"seed": 2, field: value}), request(seed=3)]
    results = Engine(tiny_model).generate(rows)
    assert results[0].ok and results[2].ok
    assert results[0].image.dtype == np.uint8 and results[0].image.shape == (SIZE, SIZE, 3)
    assert not results[1].ok and results[1].image is None
    assert message in results[1].error


def test_non_finite_row_becomes_error_rest_of_batch_kept(tiny_model):
    engine = Engine(tiny_model)
    inner = engine.denoise

    def poison_second_row(rows, cond, uncond):
        images = inner(rows, cond, uncond)
        with torch.inference_mode():
            images[1] = float("nan")
        return images

    engine.denoise = poison_second_row
    results = engine.generate([request(seed=s) for s in range(3)])
    assert [r.ok for r in results] == [True, False, True]
    assert "non-finite" in results[1].error

"""SD3 and SD3.5 against diffusers' own StableDiffusion3Pipeline: T5 on and off, per-row guidance and negatives,
skip-layer guidance, both shift modes, flow-match Euler and Heun, batch invariance and bad rows."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from diffusers import StableDiffusion3Pipeline

from batchgen.engine import Engine, GenerationRequest
from batchgen.models.loading import load_model
from batchgen.models.schedulers import make_scheduler

SIZE = 32
STEPS = 4
TOKENS = 48  # a short T5 length keeps the tiny model fast (its tokens are characters); 256 is the default
TOLERANCE = 1e-4
_pipelines: dict[tuple[str, bool], tuple[StableDiffusion3Pipeline, dict]] = {}


def diffusers_pipeline(model_dir, t5: bool = True) -> tuple[StableDiffusion3Pipeline, dict]:
    key = (str(model_dir), t5)
    if key not in _pipelines:
        drop = {} if t5 else {"text_encoder_3": None, "tokenizer_3": None}
        pipe = StableDiffusion3Pipeline.from_pretrained(str(model_dir), **drop)
        pipe.set_progress_bar_config(disable=True)
        _pipelines[key] = pipe, pipe.scheduler.config  # the checkpoint's own, before any swap
    return _pipelines[key]


def reference(model_dir, req: GenerationRequest, t5: bool = True) -> np.ndarray:
    """diffusers' pipeline, one prompt, one CPU generator seeded with the row's seed: the ground truth."""
    pipe, scheduler_config = diffusers_pipeline(model_dir, t5)
    pipe.scheduler = make_scheduler(req.scheduler, scheduler_config, "flow")
    skip = {}
    if req.skip_guidance_layers:
        skip = {"skip_guidance_layers": list(req.skip_guidance_layers),
                "skip_layer_guidance_scale": req.skip_layer_guidance_scale,
                "skip_layer_guidance_start": req.skip_layer_guidance_start,
                "skip_layer_guidance_stop": req.skip_layer_guidance_stop}
    return pipe(
        req.prompt, prompt_2=req.prompt_2, prompt_3=req.prompt_3, negative_prompt=req.negative_prompt or None,
        negative_prompt_2=req.negative_prompt_2, negative_prompt_3=req.negative_prompt_3,
        num_inference_steps=req.steps, guidance_scale=req.guidance_scale, height=req.height, width=req.width,
        max_sequence_length=req.max_sequence_length, generator=torch.Generator().manual_seed(req.seed),
        output_type="np", **skip,
    ).images[0]


def request(**overrides) -> GenerationRequest:
    base = GenerationRequest(prompt="a lighthouse on a cliff at dusk", seed=7, guidance_scale=5.0, steps=STEPS,
                             width=SIZE, height=SIZE, scheduler="euler", max_sequence_length=TOKENS)
    return dataclasses.replace(base, **overrides)


def max_diff(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape
    return float(np.abs(a - b).max())


def generate(model, rows: list[GenerationRequest]) -> list[np.ndarray]:
    results = Engine(model).generate(rows, output="float")
    assert all(r.ok for r in results), [r.error for r in results]
    return [r.image for r in results]


CASES = {
    "sd3-euler": ("tiny_sd3", request()),
    "sd3-heun": ("tiny_sd3", request(scheduler="heun", seed=3)),
    "sd3-model-scheduler": ("tiny_sd3", request(scheduler="model", seed=4)),
    "sd35-second-and-third-texts": ("tiny_sd35", request(prompt_2="an oil painting", prompt_3="gulls, fog",
                                                         negative_prompt="blurry", negative_prompt_3="text")),
    "sd35-long-t5-default-length": ("tiny_sd35", request(max_sequence_length=256, seed=11)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_diffusers(case, request_fixture):
    name, req = CASES[case]
    model = request_fixture(name)
    ours = generate(model, [req])[0]
    diff = max_diff(ours, reference(request_fixture(f"{name}_dir"), req))
    print(f"equality {case}: max abs diff {diff:.2e}")
    assert diff <= TOLERANCE
    assert ours.std() > 1e-2, "image is flat: the comparison would prove nothing"


@pytest.fixture
def request_fixture(request):
    return request.getfixturevalue


def test_without_t5_matches_diffusers_and_ignores_third_texts(tiny_sd3_dir):
    model = load_model(str(tiny_sd3_dir), device="cpu", dtype="float32", skip_components=("text_encoder_3",
                                                                                           "tokenizer_3"))
    assert model.pipe.text_encoder_3 is None
    rows = [request(negative_prompt="fog"), request(negative_prompt="fog", prompt_3="ignored without T5")]
    ours = generate(model, rows)
    diff = max_diff(ours[0], reference(tiny_sd3_dir, rows[0], t5=False))
    print(f"equality sd3-without-t5: max abs diff {diff:.2e}")
    assert diff <= TOLERANCE
    assert max_diff(ours[0], ours[1]) <= TOLERANCE
    with_t5 = load_model(str(tiny_sd3_dir), device="cpu", dtype="float32")
    assert max_diff(ours[0], generate(with_t5, rows[:1])[0]) > 1e-3, "dropping T5 changed nothing"


def test_dynamic_shifting_matches_diffusers_and_depends_on_size(tiny_sd3_dynamic_dir, tiny_sd3):
    model = load_model(str(tiny_sd3_dynamic_dir), device="cpu", dtype="float32")
    assert model.adapter.rules.schedulers == ("model", "euler"), "flow-match Heun has no dynamic shifting"
    rows = [request(), request(width=64, height=48, seed=2)]
    ours = generate(model, rows)
    for case, row, image in zip(("32x32", "64x48"), rows, ours, strict=True):
        diff = max_diff(image, reference(tiny_sd3_dynamic_dir, row))
        print(f"equality sd3-dynamic-shift-{case}: max abs diff {diff:.2e}")
        assert diff <= TOLERANCE
    assert max_diff(ours[0], generate(tiny_sd3, rows[:1])[0]) > 1e-3, "dynamic shifting changed nothing"


def test_per_row_guidance_and_negatives_in_one_batch(tiny_sd35, tiny_sd35_dir):
    rows = [request(seed=1, guidance_scale=0.0), request(seed=1, guidance_scale=1.0),
            request(seed=1, guidance_scale=3.0, negative_prompt="fog"),
            request(seed=1, guidance_scale=7.0, negative_prompt="night", negative_prompt_2="rain"),
            request(seed=1, guidance_scale=7.0)]
    ours = generate(tiny_sd35, rows)
    for n, (row, image) in enumerate(zip(rows, ours, strict=True)):
        diff = max_diff(image, reference(tiny_sd35_dir, row))
        print(f"equality sd35-batched-row-{n} (guidance {row.guidance_scale}): max abs diff {diff:.2e}")
        assert diff <= TOLERANCE
    assert max_diff(ours[0], ours[1]) <= TOLERANCE, "guidance <= 1 is the conditional prediction alone"
    assert max_diff(ours[3], ours[4]) > 1e-3, "the row's negative prompt changed nothing"


SLG = {"skip_guidance_layers": (1, 2), "skip_layer_guidance_scale": 2.8, "skip_layer_guidance_start": 0.01,
       "skip_layer_guidance_stop": 0.6}


def test_skip_layer_guidance_matches_diffusers_and_only_touches_cfg_rows(tiny_sd35, tiny_sd35_dir, monkeypatch):
    steps = 8  # window: steps x 0.01 < i < steps x 0.6, i.e. steps 1 to 4; with <= 5 steps and stop 0.2, never
    rows = [request(steps=steps, seed=5, **SLG), request(steps=steps, seed=6, guidance_scale=1.0, **SLG)]
    calls: list[tuple[int, bool]] = []
    inner = tiny_sd35.adapter.denoiser

    def counting(*args, **kwargs):
        calls.append((kwargs["hidden_states"].shape[0], "skip_layers" in kwargs))
        return inner(*args, **kwargs)

    monkeypatch.setattr(tiny_sd35.adapter, "denoiser", counting)
    ours = generate(tiny_sd35, rows)
    monkeypatch.undo()
    assert calls.count((1, True)) == 4, "one skip-layer pass per step in the window, for the CFG row only"
    diff = max_diff(ours[0], reference(tiny_sd35_dir, rows[0]))
    print(f"equality sd35-skip-layer-guidance: max abs diff {diff:.2e}")
    assert diff <= TOLERANCE
    off = generate(tiny_sd35, [dataclasses.replace(r, **dict.fromkeys(SLG)) for r in rows])
    print(f"skip-layer guidance on vs off: max abs diff {max_diff(ours[0], off[0]):.2e}")
    assert max_diff(ours[0], off[0]) > 1e-2, "skip-layer guidance changed nothing"
    assert max_diff(ours[1], off[1]) <= TOLERANCE, "a row without CFG got skip-layer guidance"


def test_batch_equals_one_at_a_time(tiny_sd3):
    rows = [request(seed=1), request(seed=2, prompt="a bowl of ramen", negative_prompt="text"),
            request(seed=3, scheduler="heun", guidance_scale=3.0), request(seed=4, width=48, height=32),
            request(seed=5, steps=STEPS + 2, guidance_scale=1.0), request(seed=1, guidance_scale=9.0),
            request(seed=6, scheduler="heun", prompt_3="only T5 reads this"), request(seed=7, width=48, height=32,
                                                                                        guidance_scale=0.0)]
    engine = Engine(tiny_sd3)
    batched = engine.generate(rows, output="float")
    assert max(r.batch_size for r in batched) >= 2
    worst = 0.0
    for row, result in zip(rows, batched, strict=True):
        single = engine.generate([row], output="float")[0]
        assert result.ok and single.ok and result.image.shape == (row.height, row.width, 3)
        worst = max(worst, max_diff(result.image, single.image))
    print(f"sd3 batch vs one at a time: max abs diff {worst:.2e}")
    assert worst <= TOLERANCE


def test_t5_truncation_is_flagged(tiny_sd3):
    results = Engine(tiny_sd3).generate([request(prompt="short"), request(prompt="word " * 10, max_sequence_length=8)])
    assert [r.truncated for r in results] == [False, True]


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("width", 40,
         "`width` must be divisible by 16 (the VAE's factor 8 x the transformer's patch size 2) but is 40"),
        ("scheduler", "dpmpp_2m_karras", "`scheduler` must be one of ['model', 'euler', 'heun'] for a "
         "stable-diffusion-3 model but is 'dpmpp_2m_karras'"),
        ("skip_guidance_layers", (3, 4), "`skip_guidance_layers` must index layers of this model's transformer, "
         "which has 4 (0 to 3) but is (3, 4)"),
        ("max_sequence_length", 513, "`max_sequence_length` must be an integer in [1, 512] but is 513"),
    ],
)
def test_bad_row_is_rejected_without_failing_others(tiny_sd3, field, value, message):
    rows = [request(seed=1), request(**{"seed": 2, field: value}), request(seed=3)]
    results = Engine(tiny_sd3).generate(rows)
    assert results[0].ok and results[2].ok
    assert not results[1].ok and results[1].error == message

"""GPU knobs checked on CPU: half-precision loading, SDPA, channels_last, compile wiring, VAE sub-batches,
deferred collection of results, and the out-of-memory fallback (by injecting torch.OutOfMemoryError)."""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from batchgen.engine import Engine, GenerationRequest
from batchgen.models.loading import load_model
from batchgen.pipeline import prepare_model
from batchgen.spec import load_spec
from batchgen.stages import GeneratorActor

pytestmark = pytest.mark.timeout(60)

SIZE = 32


def request(seed: int, **overrides) -> GenerationRequest:
    base = GenerationRequest(prompt=f"a lighthouse, study {seed}", seed=seed, guidance_scale=5.0, steps=2,
                             width=SIZE, height=SIZE)
    return dataclasses.replace(base, **overrides)


def assert_same_images(a, b, tolerance: float = 1e-4) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.ok and y.ok
        assert np.abs(x.image.astype(np.float64) - y.image.astype(np.float64)).max() <= tolerance


def test_float16_keeps_a_force_upcast_vae_in_float32_and_decodes_in_it(tiny_model_dir):
    model = load_model(str(tiny_model_dir), device="cpu", dtype="float16")
    pipe = model.pipe
    assert pipe.vae.config.force_upcast, "the tiny VAE must ask for upcasting, or this proves nothing"
    assert (pipe.unet.dtype, pipe.text_encoder.dtype, pipe.vae.dtype) == (torch.float16, torch.float16, torch.float32)
    seen: list[torch.dtype] = []
    decode = pipe.vae.decode

    def spy(latents, *args, **kwargs):
        seen.append(latents.dtype)
        return decode(latents, *args, **kwargs)

    pipe.vae.decode = spy
    result = Engine(model).generate([request(1)])[0]
    assert result.ok and result.image.dtype == np.uint8 and result.image.std() > 0
    assert seen == [torch.float32]


def test_bfloat16_needs_no_vae_upcast(tiny_model_dir):
    model = load_model(str(tiny_model_dir), device="cpu", dtype="bfloat16")
    assert model.pipe.unet.dtype == model.pipe.vae.dtype == model.adapter.vae.dtype == torch.bfloat16
    assert Engine(model).generate([request(1)])[0].ok


def test_attention_runs_through_sdpa(tiny_model, monkeypatch):
    unet, vae = tiny_model.pipe.unet, tiny_model.pipe.vae
    processors = [*unet.attn_processors.values(), *vae.attn_processors.values()]
    assert processors and {type(p).__name__ for p in processors} == {"AttnProcessor2_0"}
    calls = []
    sdpa = F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    Engine(tiny_model).generate([request(1)])
    assert len(calls) >= 2, "the UNet's attention layers must call torch's scaled_dot_product_attention"


def test_channels_last_is_off_on_cpu_by_default_and_gives_the_same_pixels(tiny_model, tiny_model_dir):
    assert not tiny_model.adapter.channels_last
    model = load_model(str(tiny_model_dir), device="cpu", dtype="float32", channels_last=True)
    conv = model.pipe.unet.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert model.pipe.vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    rows = [request(s) for s in range(3)]
    assert_same_images(Engine(model).generate(rows, output="float"), Engine(tiny_model).generate(rows, output="float"))


def test_compile_denoiser_wraps_the_unet_and_gives_the_same_pixels(tiny_model, tiny_model_dir, monkeypatch):
    """Inductor needs minutes on two CPU cores, so the wiring runs on dynamo's eager backend: the real graph
    capture of our call, without code generation."""
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    model = load_model(str(tiny_model_dir), device="cpu", dtype="float32", compile_denoiser=True)
    denoiser = model.adapter.denoiser
    assert isinstance(denoiser, torch._dynamo.eval_frame.OptimizedModule)
    assert denoiser._orig_mod is model.pipe.unet
    rows = [request(s) for s in range(2)]
    assert_same_images(Engine(model).generate(rows, output="float"), Engine(tiny_model).generate(rows, output="float"))
    assert tiny_model.adapter.denoiser is tiny_model.pipe.unet, "off by default"


def test_vae_sub_batches_give_identical_pixels(tiny_model, tiny_model_dir):
    model = load_model(str(tiny_model_dir), device="cpu", dtype="float32", vae_batch_size=2)
    sizes: list[int] = []
    decode = model.pipe.vae.decode

    def spy(latents, *args, **kwargs):
        sizes.append(latents.shape[0])
        return decode(latents, *args, **kwargs)

    model.pipe.vae.decode = spy
    rows = [request(s) for s in range(5)]
    split = Engine(model).generate(rows)
    assert sizes == [2, 2, 1]
    whole = Engine(tiny_model).generate(rows)
    assert_same_images(split, whole, tolerance=0)


def test_spec_knobs_reach_the_generator_actor(tiny_model_dir):
    spec = load_spec(None, {"model.source": str(tiny_model_dir), "model.device": "cpu", "model.dtype": "float32",
                            "model.channels_last": True, "model.vae_batch_size": 3})
    assert spec.model.compile_denoiser is False
    options, *_ = prepare_model(spec)
    threads = torch.get_num_threads()
    try:
        actor = GeneratorActor(options, batch_size=4, torch_threads=1)
    finally:
        torch.set_num_threads(threads)
    assert actor.model.adapter.channels_last and actor.model.adapter.vae_batch_size == 3
    assert actor.model.adapter.denoiser is actor.model.pipe.unet
    assert actor.engine.max_batch_size == actor.engine.batch_limit == 4


def test_results_are_collected_after_the_next_chunk_is_launched(tiny_model, monkeypatch):
    """The sync point of a chunk (on CUDA: waiting for its device-to-host copy) comes after the next chunk's
    work is queued; on CPU there is no CUDA event or pinned buffer at all."""
    from batchgen import engine as engine_module

    def no_cuda(*args, **kwargs):
        raise AssertionError("CPU generation must not touch CUDA events")

    monkeypatch.setattr(torch.cuda, "Event", no_cuda)
    order: list[str] = []
    launch = Engine._launch
    collect = engine_module._LaunchedChunk.collect

    def logged_launch(self, requests, chunk, *args):
        order.append(f"launch {chunk[0]}")
        return launch(self, requests, chunk, *args)

    def logged_collect(self, results):
        order.append(f"collect {self.indices[0]}")
        return collect(self, results)

    monkeypatch.setattr(Engine, "_launch", logged_launch)
    monkeypatch.setattr(engine_module._LaunchedChunk, "collect", logged_collect)
    rows = [request(s) for s in range(5)]
    results = Engine(tiny_model, max_batch_size=2).generate(rows)
    assert order == ["launch 0", "launch 2", "collect 0", "launch 4", "collect 2", "collect 4"]
    assert [r.batch_size for r in results] == [2, 2, 2, 2, 1] and all(r.ok for r in results)
    assert all(r.generate_ms > 0 for r in results)


class OutOfMemoryAbove:
    """Wraps a family's denoiser: it raises torch.OutOfMemoryError on batches larger than `limit` rows
    (CFG rows count twice), as CUDA does when a batch does not fit."""

    def __init__(self, denoiser, limit: int):
        self.inner = denoiser
        self.limit = limit
        self.calls: list[int] = []
        self.failures = 0

    def __call__(self, latents, *args, **kwargs):
        self.calls.append(latents.shape[0])
        if latents.shape[0] > self.limit:
            self.failures += 1
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return self.inner(latents, *args, **kwargs)


def out_of_memory_above(model, limit: int, monkeypatch) -> OutOfMemoryAbove:
    flaky = OutOfMemoryAbove(model.adapter.denoiser, limit)
    monkeypatch.setattr(model.adapter, "denoiser", flaky)
    return flaky


def test_out_of_memory_halves_the_batch_same_pixels_then_grows_back(tiny_model, monkeypatch):
    rows = [request(s) for s in range(16)]
    unsplit = Engine(tiny_model, max_batch_size=8).generate(rows)
    engine = Engine(tiny_model, max_batch_size=8, grow_after=2)
    flaky = out_of_memory_above(tiny_model, 8, monkeypatch)  # 4 rows with CFG
    results = engine.generate(rows)
    assert_same_images(results, unsplit, tolerance=1)  # uint8; float noise across batch sizes can flip a level
    assert all(r.batch_size <= 4 for r in results) and flaky.failures >= 2
    # After two chunks that fit, the engine tried 8 rows again (and fell back again).
    first_retry = flaky.calls.index(8)
    assert 16 in flaky.calls[first_retry:]
    flaky.limit = 10**6  # memory is back
    again = engine.generate([request(s) for s in range(16, 40)])
    assert engine.batch_limit == 8 and all(r.ok for r in again)
    assert [r.batch_size for r in again][-8:] == [8] * 8


def test_out_of_memory_on_a_lone_row_becomes_an_error_row(tiny_model, monkeypatch):
    engine = Engine(tiny_model, max_batch_size=2)
    out_of_memory_above(tiny_model, 0, monkeypatch)
    results = engine.generate([request(1), request(2)])
    assert engine.batch_limit == 1
    for result in results:
        assert not result.ok and result.image is None
        assert "out of accelerator memory at batch size 1 (32x32, 2 steps)" in result.error
        assert "Tried to allocate 2.00 GiB" in result.error

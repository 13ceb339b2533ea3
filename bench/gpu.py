"""Denoiser throughput on a CUDA GPU: images/s and achieved TFLOP/s against the device's peak.

    .venv/bin/python bench/gpu.py [--models sd15 sdxl sdxl-refiner sd35m] [--batches 1 2 4 8 16 32 64]
                                  [--steps 30] [--refiner-start 0.8] [--dtype float16] [--peak-tflops N]
                                  [--channels-last] [--compile]
    .venv/bin/python bench/gpu.py --flops-only      # any machine: FLOPs per denoiser step, no GPU needed

SD-1.5-shaped (512 px, 64x64 latents, 768-d text), SDXL-shaped (1024 px, 128x128 latents, 2048-d text,
pooled and size conditioning) and SDXL-refiner-shaped (1280-d text, aesthetic-score time ids) UNets built
from their configs with random weights: no downloads. With both SDXL models measured, a `sdxl+refiner` row
gives the ensemble's images/s at the same batch: the base's steps up to `--refiner-start` of the schedule
and the refiner's after it (the step split rounded as diffusers rounds it for the default schedule). Each
batch of B images is one classifier-free-guidance call of 2B rows, as batchgen's engine makes it. An
SD3.5-medium-shaped MMDiT-X transformer (`sd35m`, 1024 px: 128x128 latents of 16 channels in 2x2 patches,
4096 image tokens beside 77 CLIP + 256 T5 text tokens), also random weights (skip-layer guidance, when on, adds
a B-row pass inside its window: not measured). --flops-only also counts the T5-XXL encoder per text, what
`model.text_encoder_3_device: cpu` moves to the CPU.
FLOPs come from torch.utils.flop_counter.FlopCounterMode over one step on the meta device (exact for the
graph, no memory); time from CUDA events over `--iters` steps after `--warmup`. images/s is the
denoiser alone at `--steps` steps (no text encoder, no VAE). The peak is looked up by device name
(dense fp16/bf16 tensor-core TFLOP/s from the vendors' data sheets) or given with --peak-tflops.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from _common import machine, save, table

# Dense (no sparsity) fp16/bf16 tensor-core TFLOP/s. Checked in order: specific names before their prefixes.
PEAK_TFLOPS = [
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM
    ("H200", 989.0),
    ("GH200", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10G", 125.0),
    ("A10", 125.0),
    ("V100", 125.0),
    ("T4", 65.0),
]

UNETS = {
    "sd15": {
        "latent": 64,
        "text": (77, 768),
        "config": {
            "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
            "block_out_channels": (320, 640, 1280, 1280),
            "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                 "DownBlock2D"),
            "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            "cross_attention_dim": 768, "attention_head_dim": 8,
        },
    },
    "sdxl": {
        "latent": 128,
        "text": (77, 2048),
        "config": {
            "sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
            "block_out_channels": (320, 640, 1280),
            "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            "transformer_layers_per_block": (1, 2, 10), "attention_head_dim": (5, 10, 20),
            "cross_attention_dim": 2048, "use_linear_projection": True, "addition_embed_type": "text_time",
            "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 2816,
        },
    },
    "sdxl-refiner": {
        "latent": 128,
        "text": (77, 1280),
        "config": {
            "sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
            "block_out_channels": (384, 768, 1536, 1536),
            "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            "transformer_layers_per_block": 4, "attention_head_dim": (6, 12, 24, 24),
            "cross_attention_dim": 1280, "use_linear_projection": True, "addition_embed_type": "text_time",
            "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 2560,
        },
    },
}


# SD3.5-medium's transformer config (stabilityai/stable-diffusion-3.5-medium, transformer/config.json).
TRANSFORMERS = {
    "sd35m": {
        "latent": 128,
        "channels": 16,
        "text": (77 + 256, 4096),
        "pooled": 2048,
        "config": {
            "sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 24,
            "attention_head_dim": 64, "num_attention_heads": 24, "joint_attention_dim": 4096,
            "caption_projection_dim": 1536, "pooled_projection_dim": 2048, "pos_embed_max_size": 384,
            "dual_attention_layers": tuple(range(13)), "qk_norm": "rms_norm",
        },
    },
}
# T5 v1.1 XXL's encoder, SD3's third text encoder.
T5_XXL = {"vocab_size": 32128, "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24, "num_heads": 64,
          "feed_forward_proj": "gated-gelu", "dropout_rate": 0.0}


def build_denoiser(name: str, device: str, dtype: torch.dtype):
    if name in TRANSFORMERS:
        from diffusers import SD3Transformer2DModel

        with torch.device(device):
            transformer = SD3Transformer2DModel(**TRANSFORMERS[name]["config"])
        return transformer.to(dtype).eval().requires_grad_(False)
    return build_unet(name, device, dtype)


def denoiser_inputs(name: str, rows: int, device: str, dtype: torch.dtype) -> tuple[tuple, dict]:
    if name not in TRANSFORMERS:
        return inputs(name, rows, device, dtype)
    shape = TRANSFORMERS[name]
    return (), {
        "hidden_states": torch.randn(rows, shape["channels"], shape["latent"], shape["latent"], device=device,
                                     dtype=dtype),
        "encoder_hidden_states": torch.randn(rows, *shape["text"], device=device, dtype=dtype),
        "pooled_projections": torch.randn(rows, shape["pooled"], device=device, dtype=dtype),
        "timestep": torch.full((rows,), 500.0, device=device, dtype=dtype),
        "return_dict": False,
    }


def t5_flops_per_text(tokens: int = 256) -> float:
    """FLOPs of one T5-XXL encoder pass over one text of `tokens` tokens (meta device: shapes only)."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import T5Config, T5EncoderModel

    with torch.device("meta"):
        encoder = T5EncoderModel(T5Config(**T5_XXL)).eval()
    ids = torch.zeros(1, tokens, dtype=torch.long, device="meta")
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        encoder(ids)
    return counter.get_total_flops()


def build_unet(name: str, device: str, dtype: torch.dtype):
    from diffusers import UNet2DConditionModel

    with torch.device(device):
        unet = UNet2DConditionModel(**UNETS[name]["config"])
    return unet.to(dtype).eval().requires_grad_(False)


def inputs(name: str, rows: int, device: str, dtype: torch.dtype) -> tuple[tuple, dict]:
    shape = UNETS[name]
    latents = torch.randn(rows, 4, shape["latent"], shape["latent"], device=device, dtype=dtype)
    text = torch.randn(rows, *shape["text"], device=device, dtype=dtype)
    kwargs: dict = {"encoder_hidden_states": text, "return_dict": False}
    if name.startswith("sdxl"):
        size = 8 * shape["latent"]
        # (original size, crop, target size) for the base; (original size, crop, aesthetic score) for the refiner
        ids = [size, size, 0, 0, size, size] if name == "sdxl" else [size, size, 0, 0, 6.0]
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(rows, 1280, device=device, dtype=dtype),
            "time_ids": torch.tensor([ids] * rows, device=device, dtype=dtype),
        }
    return (latents, torch.tensor(500, device=device)), kwargs


def flops_per_row(name: str) -> float:
    """FLOPs of one denoiser step per latent row, counted on the meta device (shapes only, no compute)."""
    from torch.utils.flop_counter import FlopCounterMode

    unet = build_denoiser(name, "meta", torch.float16)
    args, kwargs = denoiser_inputs(name, 2, "meta", torch.float16)
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        unet(*args, **kwargs)
    return counter.get_total_flops() / 2


def peak_for(device_name: str) -> float | None:
    return next((tflops for key, tflops in PEAK_TFLOPS if key in device_name), None)


def time_step(unet, args, kwargs, warmup: int, iters: int) -> float:
    """Seconds per UNet call, from CUDA events around `iters` calls after `warmup` calls."""
    with torch.inference_mode():
        for _ in range(warmup):
            unet(*args, **kwargs)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(iters):
            unet(*args, **kwargs)
        end.record()
        end.synchronize()
    return start.elapsed_time(end) / 1000 / iters


def ensemble_steps(steps: int, start: float) -> tuple[int, int]:
    """(base steps, refiner steps) for a first-order scheduler on the default 1000-step schedule with 'leading'
    spacing: the base runs the timesteps >= the cutoff, the refiner those below it (diffusers' rule)."""
    cutoff = int(round(1000 - start * 1000))
    timesteps = [t + 1 for t in range(0, 1000, 1000 // steps)][:steps][::-1]  # leading spacing, steps_offset 1
    base = sum(t >= cutoff for t in timesteps)
    return base, steps - base


def ensemble_rows(rows: list[dict], flops: dict, steps: int, start: float, peak: float | None) -> list[dict]:
    """sdxl+refiner at each batch both were measured at: images/s of base then refiner on the same images."""
    step_ms = {(r["model"], r["batch"]): r["step_ms"] for r in rows if "step_ms" in r}
    base_steps, refiner_steps = ensemble_steps(steps, start)
    out = []
    for (name, batch), base_ms in step_ms.items():
        refiner_ms = step_ms.get(("sdxl-refiner", batch))
        if name != "sdxl" or refiner_ms is None:
            continue
        seconds = (base_steps * base_ms + refiner_steps * refiner_ms) / 1000
        work = 2 * batch * (base_steps * flops["sdxl"] + refiner_steps * flops["sdxl-refiner"])
        tflops = work / seconds / 1e12
        out.append({"model": "sdxl+refiner", "batch": batch, "step_ms": seconds * 1000 / steps,
                    "images_per_s": batch / seconds, "tflops": tflops, "utilization": tflops / peak if peak else None,
                    "note": f"{base_steps} base + {refiner_steps} refiner steps"})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=sorted(UNETS | TRANSFORMERS),
                        default=["sd15", "sdxl", "sdxl-refiner", "sd35m"])
    parser.add_argument("--refiner-start", type=float, default=0.8,
                        help="fraction of the schedule the SDXL base runs before the refiner (sdxl+refiner row)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    parser.add_argument("--steps", type=int, default=30, help="denoising steps per image, for images/s")
    parser.add_argument("--dtype", choices=["float16", "bfloat16"], default="float16")
    parser.add_argument("--peak-tflops", type=float, help="the device's dense fp16/bf16 peak, if not in the table")
    parser.add_argument("--channels-last", action="store_true", help="UNet weights and latents in NHWC")
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet (compile time not counted)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--flops-only", action="store_true", help="count FLOPs per step and exit (no GPU needed)")
    args = parser.parse_args()

    if not args.flops_only and not torch.cuda.is_available():
        print(f"bench/gpu.py measures a CUDA GPU, and torch {torch.__version__} sees none on this machine "
              "(torch.cuda.is_available() is False). Run it on a GPU machine with a CUDA build of torch, "
              "or use --flops-only here.", file=sys.stderr)
        sys.exit(2)
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    flops = {name: flops_per_row(name) for name in args.models}
    if args.flops_only:
        for name, per_row in flops.items():
            print(f"{name}: {per_row / 1e9:.1f} GFLOP per latent row per step; one image with CFG at "
                  f"{args.steps} steps = {2 * per_row * args.steps / 1e12:.2f} TFLOP")
        if "sd35m" in flops:
            t5 = t5_flops_per_text()
            print(f"T5-XXL encoder: {t5 / 1e12:.2f} TFLOP per text at 256 tokens (each distinct prompt and "
                  f"negative once); {t5 / (2 * flops['sd35m'] * args.steps):.1%} of one sd35m image's denoising")
        return
    device_name = torch.cuda.get_device_name()
    peak = args.peak_tflops or peak_for(device_name)
    if peak is None:
        print(f"note: no peak known for {device_name!r}; pass --peak-tflops to get utilization", file=sys.stderr)
    dtype = getattr(torch, args.dtype)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.benchmark = True

    rows = []
    for name in args.models:
        unet = build_denoiser(name, "cuda", dtype)
        if args.channels_last:
            unet.to(memory_format=torch.channels_last)
        model = torch.compile(unet) if args.compile else unet
        for batch in args.batches:
            call_args, kwargs = denoiser_inputs(name, 2 * batch, "cuda", dtype)
            if args.channels_last and call_args:
                call_args = (call_args[0].to(memory_format=torch.channels_last), call_args[1])
            row = {"model": name, "batch": batch}
            try:
                started = time.perf_counter()
                step_s = time_step(model, call_args, kwargs, args.warmup, args.iters)
            except torch.OutOfMemoryError:
                row["note"] = "out of memory"
                rows.append(row)
                del call_args, kwargs
                torch.cuda.empty_cache()
                break
            tflops = 2 * batch * flops[name] / step_s / 1e12
            row.update(step_ms=step_s * 1000, images_per_s=batch / (step_s * args.steps), tflops=tflops,
                       utilization=tflops / peak if peak else None, measure_s=time.perf_counter() - started,
                       peak_memory_gib=torch.cuda.max_memory_allocated() / 2**30)
            rows.append(row)
            print(row, flush=True)
            del call_args, kwargs
            torch.cuda.reset_peak_memory_stats()
        del unet, model
        torch.cuda.empty_cache()

    rows += ensemble_rows(rows, flops, args.steps, args.refiner_start, peak)
    result = {"bench": "gpu", "machine": machine(), "device": device_name, "peak_tflops": peak, "args": vars(args),
              "gflop_per_row_step": {k: v / 1e9 for k, v in flops.items()}, "rows": rows}
    out = save("gpu", result)
    print()
    print(f"{device_name}, {args.dtype}, peak {peak} TFLOP/s, channels_last={args.channels_last}, "
          f"compile={args.compile}; CFG (2 rows per image); images/s at {args.steps} steps, denoiser only")
    print(table(rows, [("model", "model", "s"), ("batch", "batch", "d"), ("step_ms", "ms/step", ".1f"),
                       ("images_per_s", "images/s", ".2f"), ("tflops", "TFLOP/s", ".0f"),
                       ("utilization", "of peak", ".0%"), ("peak_memory_gib", "GiB", ".1f"), ("note", "note", "s")]))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

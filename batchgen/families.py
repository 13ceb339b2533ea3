"""Model-family adapters: how text becomes conditioning, how the denoiser is called, how latents decode.

The denoising loop (engine.py) only sees batch-first tensors in a dict, a latent shape and these
methods, so a family with other text encoders or another denoiser (SDXL's pooled embeddings and size
conditioning, SD3's three encoders and transformer) is a new adapter, not a change to the loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

Conditioning = dict[str, torch.Tensor]


@dataclass
class EncodedText:
    """Conditioning for a list of prompts (batch-first tensors) and whether each prompt was truncated."""

    conditioning: Conditioning
    truncated: list[bool]


class FamilyAdapter:
    """What the engine needs from a diffusion model family."""

    name: str
    latent_channels: int
    vae_scale_factor: int
    max_prompt_tokens: int
    base_scheduler_config: Any

    def encode_text(self, prompts: list[str]) -> EncodedText:
        raise NotImplementedError

    def predict(self, latents: torch.Tensor, t: torch.Tensor, cond: Conditioning, width: int, height: int):
        raise NotImplementedError

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> float32 images in [0, 1], shape (B, 3, H, W)."""
        raise NotImplementedError


def take(cond: Conditioning, index: list[int]) -> Conditioning:
    """Rows `index` of every tensor, in that order."""
    idx = torch.tensor(index, dtype=torch.long, device=next(iter(cond.values())).device)
    return {k: v.index_select(0, idx) for k, v in cond.items()}


def concat(first: Conditioning, second: Conditioning) -> Conditioning:
    return {k: torch.cat([first[k], second[k]]) for k in first}


class StableDiffusionAdapter(FamilyAdapter):
    """SD 1.x and 2.x: one CLIP text encoder, a UNet with cross-attention, a KL VAE.

    Epsilon and v-prediction models differ only in the scheduler config's `prediction_type`, which the
    schedulers read themselves.
    """

    name = "stable-diffusion"

    def __init__(self, pipe: Any, vae_batch_size: int | None = None, channels_last: bool | None = None,
                 compile_denoiser: bool = False):
        self.tokenizer = pipe.tokenizer
        self.text_encoder = pipe.text_encoder
        self.unet = pipe.unet
        self.vae = pipe.vae
        self.base_scheduler_config = pipe.scheduler.config
        self.latent_channels = self.unet.config.in_channels
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.max_prompt_tokens = self.tokenizer.model_max_length
        self.vae_batch_size = vae_batch_size
        # Models whose VAE overflows in half precision (config.force_upcast) were loaded with a float32
        # VAE (loading.py); decoding casts the latents to whatever dtype the VAE holds.
        self.vae_dtype = self.vae.dtype
        self.channels_last = self.unet.device.type == "cuda" if channels_last is None else channels_last
        if self.channels_last:  # NHWC convolutions: the tensor-core layout on GPUs
            self.unet.to(memory_format=torch.channels_last)
            self.vae.to(memory_format=torch.channels_last)
        # Compiled lazily by torch on the first call of each new shape: slower first batch, faster steady state.
        self.denoiser = torch.compile(self.unet) if compile_denoiser else self.unet

    @torch.inference_mode()
    def encode_text(self, prompts: list[str]) -> EncodedText:
        tokens = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.max_prompt_tokens,
            truncation=True,
            return_tensors="pt",
        )
        full_lengths = [len(ids) for ids in self.tokenizer(prompts, verbose=False).input_ids]
        truncated = [n > self.max_prompt_tokens for n in full_lengths]
        device = self.text_encoder.device
        embeds = self.text_encoder(tokens.input_ids.to(device))[0]
        return EncodedText({"encoder_hidden_states": embeds.to(self.unet.dtype)}, truncated)

    def predict(self, latents, t, cond, width, height):
        return self.denoiser(latents, t, encoder_hidden_states=cond["encoder_hidden_states"], return_dict=False)[0]

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        step = self.vae_batch_size or latents.shape[0]
        scaled = (latents / self.vae.config.scaling_factor).to(self.vae_dtype)
        parts = [self.vae.decode(chunk, return_dict=False)[0] for chunk in scaled.split(step)]
        return (torch.cat(parts).float() / 2 + 0.5).clamp(0, 1)


def adapter_for(pipe: Any, vae_batch_size: int | None = None, channels_last: bool | None = None,
                compile_denoiser: bool = False) -> FamilyAdapter:
    """The adapter for a loaded diffusers pipeline (already on its device), chosen by its class."""
    from diffusers import StableDiffusionPipeline

    if isinstance(pipe, StableDiffusionPipeline):
        return StableDiffusionAdapter(pipe, vae_batch_size, channels_last, compile_denoiser)
    raise ValueError(
        f"model family of pipeline class {type(pipe).__name__!r} is not supported yet; "
        "supported: StableDiffusionPipeline (SD 1.x, SD 2.x)"
    )

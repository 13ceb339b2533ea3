"""SD 1.x and 2.x: one CLIP text encoder, a UNet with cross-attention, a KL VAE; text-to-image, image-to-image
and inpainting (9-channel inpainting UNets and plain 4-channel ones).

Epsilon and v-prediction models differ only in the scheduler config's `prediction_type`, which the schedulers
read themselves.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from diffusers import StableDiffusionInpaintPipeline
from diffusers.utils.torch_utils import randn_tensor

from batchgen.models.adapter import (
    Conditioning,
    EncodedText,
    FamilyAdapter,
    concat,
    guide,
    row_generators,
)
from batchgen.models.families import Family
from batchgen.models.img2img import (
    Start,
    encode_latents,
    has_init_image,
    inpaint_start,
    preprocess,
    source_images,
    strength_timesteps,
)
from batchgen.models.schedulers import step_kwargs
from batchgen.rows import IMAGE_FIELDS, GenerationRequest


def prepare_denoiser(unet: Any, vae: Any, channels_last: bool | None, compile_denoiser: bool) -> tuple[bool, Any]:
    """(channels_last in effect, the callable denoiser): NHWC weights on CUDA by default (the tensor-core
    layout), and torch.compile on request (compiled lazily per shape: slower first batch, faster after)."""
    channels_last = unet.device.type == "cuda" if channels_last is None else channels_last
    if channels_last:
        unet.to(memory_format=torch.channels_last)
        vae.to(memory_format=torch.channels_last)
    return channels_last, torch.compile(unet) if compile_denoiser else unet


def decode_latents(vae: Any, latents: torch.Tensor, batch_size: int | None) -> torch.Tensor:
    """Latents -> float32 images in [0, 1], in sub-batches of `batch_size`. Undoes the VAE's latent scaling (and
    its per-channel mean and std, or its shift, where the config has them); runs in the VAE's own dtype, which is
    float32 for VAEs that overflow in half precision (`force_upcast`, see loading.py)."""
    config = vae.config
    mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
    if mean is not None and std is not None:
        shape = (1, len(mean), 1, 1)
        mean = torch.tensor(mean).view(shape).to(latents.device, latents.dtype)
        std = torch.tensor(std).view(shape).to(latents.device, latents.dtype)
        scaled = latents * std / config.scaling_factor + mean
    else:
        scaled = latents / config.scaling_factor
    if getattr(config, "shift_factor", None) is not None:  # SD3's VAE: latents were shifted, then scaled
        scaled = scaled + config.shift_factor
    scaled = scaled.to(vae.dtype)
    step = batch_size or latents.shape[0]
    parts = [vae.decode(chunk, return_dict=False)[0] for chunk in scaled.split(step)]
    return (torch.cat(parts).float() / 2 + 0.5).clamp(0, 1)


class StableDiffusionAdapter(FamilyAdapter):
    def __init__(self, pipe: Any, family: Family, vae_batch_size: int | None = None,
                 channels_last: bool | None = None, compile_denoiser: bool = False):
        self.family = family
        self.tokenizer = pipe.tokenizer
        self.text_encoder = pipe.text_encoder
        self.unet = pipe.unet
        self.vae = pipe.vae
        self.base_scheduler_config = pipe.scheduler.config
        self.latent_channels = self.vae.config.latent_channels
        # An inpainting UNet takes the mask and the masked image's latents next to the latents (9 channels).
        self.mask_channels = self.unet.config.in_channels != self.latent_channels
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        needs = IMAGE_FIELDS if self.mask_channels else ()
        self.rules = dataclasses.replace(family.rules(self.vae_scale_factor), needs=needs)
        # The processors diffusers' inpainting pipeline makes for this model (its image processor is img2img's too).
        # Not `from_pipe`: it would cast the shared modules to float32.
        if not hasattr(pipe, "mask_processor"):
            pipe = StableDiffusionInpaintPipeline(**{**pipe.components, "requires_safety_checker": False})
        self.image_processor, self.mask_processor = pipe.image_processor, pipe.mask_processor
        self.max_prompt_tokens = self.tokenizer.model_max_length
        self.vae_batch_size = vae_batch_size
        self.channels_last, self.denoiser = prepare_denoiser(self.unet, self.vae, channels_last, compile_denoiser)

    @torch.inference_mode()
    def encode_text(self, keys: list[str]) -> EncodedText:
        tokens = self.tokenizer(keys, padding="max_length", max_length=self.max_prompt_tokens, truncation=True,
                                return_tensors="pt")
        full_lengths = [len(ids) for ids in self.tokenizer(keys, verbose=False).input_ids]
        truncated = [n > self.max_prompt_tokens for n in full_lengths]
        embeds = self.text_encoder(tokens.input_ids.to(self.text_encoder.device))[0]
        return EncodedText({"encoder_hidden_states": embeds.to(self.unet.dtype)}, truncated)

    @torch.inference_mode()
    def sample(self, rows: list[GenerationRequest], cond: Conditioning, uncond: Conditioning) -> torch.Tensor:
        first = rows[0]
        device, dtype = self.unet.device, self.unet.dtype
        scheduler = self.make_scheduler(first.scheduler, device, first.steps)
        generators = row_generators(rows)
        if not has_init_image(rows):
            start = Start(scheduler.timesteps, self.initial_latents(
                rows, self.latent_channels, generators, device, dtype, scheduler.init_noise_sigma))
        elif first.mask_image is None:
            start = self.img2img_start(rows, scheduler, generators)
        else:
            start = inpaint_start(rows, scheduler, generators, self.vae, (self.image_processor, self.mask_processor),
                                  self.mask_channels, self.unet.dtype, self.rules.whole_strength_steps)
        latents = start.latents
        guidance = torch.tensor([float(r.guidance_scale) for r in rows], device=device, dtype=dtype).view(-1, 1, 1, 1)
        # One denoiser call of 2B rows (unconditional, then conditional); none of B when no row guides.
        use_cfg = bool((guidance > 1).any())
        hidden = concat(uncond, cond)["encoder_hidden_states"] if use_cfg else cond["encoder_hidden_states"]
        extra = step_kwargs(scheduler, generators, first.eta)
        if start.masked_latents is not None:
            mask_input = torch.cat([start.mask, start.masked_latents], dim=1)
            mask_input = torch.cat([mask_input, mask_input]) if use_cfg else mask_input
        for i, t in enumerate(start.timesteps):
            model_input = torch.cat([latents, latents]) if use_cfg else latents
            model_input = scheduler.scale_model_input(model_input, t)
            if start.masked_latents is not None:
                model_input = torch.cat([model_input, mask_input], dim=1)
            prediction = self.denoiser(model_input, t, encoder_hidden_states=hidden, return_dict=False)[0]
            latents = scheduler.step(guide(prediction, guidance, use_cfg), t, latents, **extra, return_dict=False)[0]
            if start.blend is not None:
                latents = start.blend(scheduler, i, latents)
        return decode_latents(self.vae, latents, self.vae_batch_size)

    def img2img_start(self, rows: list[GenerationRequest], scheduler: Any, generators: list) -> Start:
        """diffusers' StableDiffusionImg2ImgPipeline: per row, the VAE sample of the init image, then the noise."""
        first = rows[0]
        images = preprocess(self.image_processor, source_images(rows), first.height, first.width)
        timesteps = strength_timesteps(scheduler, first.steps, first.strength, self.rules.whole_strength_steps)
        init = encode_latents(self.vae, images, generators, self.unet.dtype)
        noise = randn_tensor(init.shape, generator=generators, device=init.device, dtype=init.dtype)
        return Start(timesteps, scheduler.add_noise(init, noise, timesteps[:1].repeat(len(rows))))

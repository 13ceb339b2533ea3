"""SDXL base, and base followed by the SDXL refiner (ensemble of experts), as diffusers samples them.

Base: two CLIP encoders whose penultimate hidden states are concatenated, the pooled embedding of the second,
and micro-conditioning time ids (original size, crop top-left, target size) built per row, never broadcast.
An empty negative prompt is zeros where the model says `force_zeros_for_empty_prompt` (diffusers'
`negative_prompt=None`). With a refiner the base stops at `refiner_start` (diffusers' `denoising_end`) and the
refiner continues from its latents (`denoising_start`) with `text_encoder_2` only, aesthetic-score time ids and
fresh per-row generators seeded with the row's seed; its VAE decodes. Image-to-image and inpainting (4-channel
UNets, and 9-channel inpainting UNets that read the mask and masked-image latents) start as diffusers'
StableDiffusionXLImg2ImgPipeline and StableDiffusionXLInpaintPipeline do (img2img.py).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from diffusers import StableDiffusionXLInpaintPipeline
from diffusers.utils.torch_utils import randn_tensor

from batchgen.models.adapter import Conditioning, EncodedText, FamilyAdapter, guide, row_generators
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
from batchgen.models.schedulers import make_scheduler, step_kwargs
from batchgen.models.sd import decode_latents, prepare_denoiser
from batchgen.rows import IMAGE_FIELDS, GenerationRequest

TextKey = tuple[str, str]  # (text for encoder 1, text for encoder 2)


def _encode(tokenizer: Any, encoder: Any, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None, list[bool]]:
    """(penultimate hidden states, the pooled projection if the encoder has one, truncated per text)."""
    limit = tokenizer.model_max_length
    tokens = tokenizer(texts, padding="max_length", max_length=limit, truncation=True, return_tensors="pt")
    truncated = [len(ids) > limit for ids in tokenizer(texts, verbose=False).input_ids]
    out = encoder(tokens.input_ids.to(encoder.device), output_hidden_states=True)
    pooled = out[0] if out[0].ndim == 2 else None  # CLIPTextModelWithProjection: text_embeds first
    return out.hidden_states[-2], pooled, truncated


def _zero_empty(cond: Conditioning, texts: list[str], names: tuple[str, ...]) -> None:
    """Zero the rows of an empty text: `force_zeros_for_empty_prompt`'s unconditional embeddings."""
    empty = torch.tensor([not text for text in texts], device=cond[names[0]].device)
    for name in names:
        cond[name][empty] = 0


def _cutoff(scheduler: Any, fraction: float) -> int:
    """The discrete timestep at `fraction` of the schedule, as diffusers computes denoising_end/start."""
    train = scheduler.config.num_train_timesteps
    return int(round(train - fraction * train))


class StableDiffusionXLAdapter(FamilyAdapter):
    empty_key = ("", "")

    def __init__(self, pipe: Any, family: Family, refiner: Any = None, refiner_start: float | None = None,
                 vae_batch_size: int | None = None, channels_last: bool | None = None,
                 compile_denoiser: bool = False):
        self.family = family
        self.pipe = pipe
        self.unet = pipe.unet
        self.base_scheduler_config = pipe.scheduler.config
        self.force_zeros = bool(pipe.config.force_zeros_for_empty_prompt)
        self.refiner = refiner
        self.refiner_start = refiner_start
        self.vae = (refiner or pipe).vae  # the last expert decodes
        self.vae_scale_factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
        self.rules = family.rules(self.vae_scale_factor, refined=refiner is not None, pipeline=type(pipe).__name__)
        # An inpainting UNet takes the mask and the masked image's latents next to the latents (9 channels): every
        # row needs both images, whatever pipeline class the checkpoint names.
        self.mask_channels = self.unet.config.in_channels != pipe.vae.config.latent_channels
        if self.mask_channels:
            self.rules = dataclasses.replace(self.rules, needs=IMAGE_FIELDS)
        self.max_prompt_tokens = (pipe.tokenizer or pipe.tokenizer_2).model_max_length
        self._processors: tuple[Any, Any] | None = None
        self.vae_batch_size = vae_batch_size
        self.channels_last, self.denoiser = prepare_denoiser(self.unet, pipe.vae, channels_last, compile_denoiser)
        if refiner is not None:
            _, self.refiner_denoiser = prepare_denoiser(refiner.unet, refiner.vae, self.channels_last,
                                                        compile_denoiser)

    def text_keys(self, req: GenerationRequest) -> tuple[TextKey, TextKey]:
        negative = req.negative_prompt or ""
        return (req.prompt, req.prompt_2 or req.prompt), (negative, req.negative_prompt_2 or negative)

    @torch.inference_mode()
    def encode_text(self, keys: list[TextKey]) -> EncodedText:
        first, second = [k[0] for k in keys], [k[1] for k in keys]
        dtype = self.pipe.text_encoder_2.dtype
        if self.pipe.text_encoder is None:
            # A refiner on its own: diffusers pairs its one tokenizer with the first text of each pair.
            hidden, pooled, truncated_1 = _encode(self.pipe.tokenizer_2, self.pipe.text_encoder_2, first)
            cond = {"prompt_embeds": hidden.to(dtype), "pooled": pooled.to(dtype)}
            if self.force_zeros:
                _zero_empty(cond, first, ("prompt_embeds", "pooled"))
            return EncodedText(cond, truncated_1)
        hidden_1, _, truncated_1 = _encode(self.pipe.tokenizer, self.pipe.text_encoder, first)
        hidden_2, pooled, truncated_2 = _encode(self.pipe.tokenizer_2, self.pipe.text_encoder_2, second)
        cond = {"prompt_embeds": torch.cat([hidden_1, hidden_2], dim=-1).to(dtype), "pooled": pooled.to(dtype)}
        if self.force_zeros:
            _zero_empty(cond, first, ("prompt_embeds", "pooled"))
        if self.refiner is not None:
            # diffusers' refiner pairs its one tokenizer with the first text of each pair (prompt, negative_prompt).
            hidden, pooled, _ = _encode(self.refiner.tokenizer_2, self.refiner.text_encoder_2, first)
            cond.update(refiner_prompt_embeds=hidden.to(dtype), refiner_pooled=pooled.to(dtype))
            if self.refiner.config.force_zeros_for_empty_prompt:
                _zero_empty(cond, first, ("refiner_prompt_embeds", "refiner_pooled"))
        truncated = [a or b for a, b in zip(truncated_1, truncated_2, strict=True)]
        return EncodedText(cond, truncated)

    def _time_ids(self, rows: list[GenerationRequest], refiner: bool, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """(unconditional, conditional) time ids, one row per image. The base's unconditional ids equal its
        conditional ones; the refiner's carry the negative aesthetic score and no crop, as in diffusers."""
        cond, uncond = [], []
        expert = self.refiner if refiner else self.pipe
        for r in rows:
            size, crop, target = r.value("original_size"), r.value("crops_coords_top_left"), r.value("target_size")
            if getattr(expert.config, "requires_aesthetics_score", False):
                cond.append([*size, *crop, r.aesthetic_score])
                uncond.append([*size, 0, 0, r.negative_aesthetic_score])
            else:
                cond.append([*size, *crop, *target])
                uncond.append(cond[-1])
        device = self.unet.device
        return torch.tensor(uncond, dtype=dtype, device=device), torch.tensor(cond, dtype=dtype, device=device)

    def _run(self, denoiser: Any, scheduler: Any, timesteps: torch.Tensor, latents: torch.Tensor,
             rows: list[GenerationRequest], embeds: tuple[torch.Tensor, torch.Tensor],
             pooled: tuple[torch.Tensor, torch.Tensor], refiner: bool, generators: list,
             start: Start | None = None) -> torch.Tensor:
        dtype = embeds[1].dtype
        guidance = torch.tensor([float(r.guidance_scale) for r in rows], device=latents.device, dtype=latents.dtype)
        guidance = guidance.view(-1, 1, 1, 1)
        use_cfg = bool((guidance > 1).any())
        uncond_ids, cond_ids = self._time_ids(rows, refiner, dtype)
        if use_cfg:
            hidden, text_embeds = torch.cat(embeds), torch.cat(pooled)
            time_ids = torch.cat([uncond_ids, cond_ids])
        else:
            hidden, text_embeds, time_ids = embeds[1], pooled[1], cond_ids
        added = {"text_embeds": text_embeds, "time_ids": time_ids}
        extra = step_kwargs(scheduler, generators, rows[0].eta)
        mask_input = None
        if start is not None and start.masked_latents is not None:  # a 9-channel inpainting UNet
            mask_input = torch.cat([start.mask, start.masked_latents], dim=1)
            mask_input = torch.cat([mask_input, mask_input]) if use_cfg else mask_input
        for i, t in enumerate(timesteps):
            model_input = torch.cat([latents, latents]) if use_cfg else latents
            model_input = scheduler.scale_model_input(model_input, t)
            if mask_input is not None:
                model_input = torch.cat([model_input, mask_input], dim=1)
            prediction = denoiser(model_input, t, encoder_hidden_states=hidden, added_cond_kwargs=added,
                                  return_dict=False)[0]
            latents = scheduler.step(guide(prediction, guidance, use_cfg), t, latents, **extra, return_dict=False)[0]
            if start is not None and start.blend is not None:
                latents = start.blend(scheduler, i, latents)
        return latents

    def processors(self) -> tuple[Any, Any]:
        """The image and mask processors diffusers' SDXL inpainting pipeline makes for this model (built on first
        use; not `from_pipe`, which would cast the shared modules to float32)."""
        if self._processors is None:
            pipe = self.pipe
            if not hasattr(pipe, "mask_processor"):
                pipe = StableDiffusionXLInpaintPipeline(**{**self.pipe.components})
            self._processors = (pipe.image_processor, pipe.mask_processor)
        return self._processors

    @torch.inference_mode()
    def sample(self, rows: list[GenerationRequest], cond: Conditioning, uncond: Conditioning) -> torch.Tensor:
        first = rows[0]
        device = self.unet.device
        dtype = cond["prompt_embeds"].dtype
        # 1. The base, to the refiner's start when there is one.
        scheduler = self.make_scheduler(first.scheduler, device, first.steps)
        generators = row_generators(rows)
        start = None
        if has_init_image(rows) and first.mask_image is not None:
            start = inpaint_start(rows, scheduler, generators, self.pipe.vae, self.processors(), self.mask_channels,
                                  dtype, self.rules.whole_strength_steps, latents_mean_std=False)
            timesteps, latents = start.timesteps, start.latents
        elif has_init_image(rows):
            timesteps, latents = self._img2img_start(rows, scheduler, generators, dtype)
        else:
            latents = self.initial_latents(rows, self.unet.config.in_channels, generators, device, dtype,
                                           scheduler.init_noise_sigma)
            timesteps = scheduler.timesteps
            if self.refiner is not None:
                timesteps = timesteps[: int((timesteps >= _cutoff(scheduler, self.refiner_start)).sum())]
            if hasattr(scheduler, "set_begin_index"):
                scheduler.set_begin_index(0)
        latents = self._run(self.denoiser, scheduler, timesteps, latents, rows,
                            (uncond["prompt_embeds"], cond["prompt_embeds"]), (uncond["pooled"], cond["pooled"]),
                            False, generators, start)
        # 2. The refiner from the same latents (no new noise), with fresh generators for its stochastic steps.
        if self.refiner is not None:
            latents = self._refine(rows, latents, cond, uncond)
        return decode_latents(self.vae, latents, self.vae_batch_size)

    def _img2img_start(self, rows: list[GenerationRequest], scheduler: Any, generators: list,
                       dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """diffusers' StableDiffusionXLImg2ImgPipeline (a base or a refiner on its own): per row, the VAE sample of
        the init image (in float32 for a `force_upcast` VAE), then the noise, added at the first kept timestep."""
        first = rows[0]
        images = preprocess(self.pipe.image_processor, source_images(rows), first.height, first.width)
        timesteps = strength_timesteps(scheduler, first.steps, first.strength, self.rules.whole_strength_steps)
        init = encode_latents(self.pipe.vae, images, generators, dtype)  # a force_upcast VAE is loaded in float32
        noise = randn_tensor(init.shape, generator=generators, device=init.device, dtype=init.dtype)
        return timesteps, scheduler.add_noise(init, noise, timesteps[:1].repeat(len(rows)))

    def _refine(self, rows: list[GenerationRequest], latents: torch.Tensor, cond: Conditioning,
                uncond: Conditioning) -> torch.Tensor:
        first = rows[0]
        scheduler = make_scheduler(first.scheduler, self.refiner.scheduler.config)
        scheduler.set_timesteps(first.steps, device=latents.device)
        steps = int((scheduler.timesteps < _cutoff(scheduler, self.refiner_start)).sum())
        if scheduler.order == 2 and steps % 2 == 0:
            steps += 1  # never stop between a second-order step's two evaluations
        start = len(scheduler.timesteps) - steps
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(start)
        return self._run(self.refiner_denoiser, scheduler, scheduler.timesteps[start:], latents, rows,
                         (uncond["refiner_prompt_embeds"], cond["refiner_prompt_embeds"]),
                         (uncond["refiner_pooled"], cond["refiner_pooled"]), True, row_generators(rows))

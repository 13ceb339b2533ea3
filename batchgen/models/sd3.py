"""SD3 and SD3.5: CLIP-L, CLIP-G and (optionally) T5 text encoders, an MMDiT transformer, flow matching, a VAE
with a shift.

The conditioning is diffusers' layout: both CLIPs' penultimate hidden states side by side, padded or cropped to
T5's width, then T5's states after them along the sequence; the pooled projections of both CLIPs side by side.
Without T5 its part is zeros of the same shape. Flow-matching schedulers start from unit noise and take the
model input unscaled; a checkpoint with dynamic shifting gets `mu` from the image size, as diffusers computes it.
Skip-layer guidance (SD3.5-medium) adds, for the rows that use CFG and only inside its step window, a pass of the
conditional branch without the named transformer blocks. Image-to-image is diffusers' StableDiffusion3Img2ImgPipeline:
the schedule (with `mu`) cut by strength without rounding the step count, the init latents noised with
`scale_noise`; that pipeline has no skip-layer guidance, so rows with an init image never use it (rows.py refuses).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import StableDiffusion3Img2ImgPipeline
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift
from diffusers.utils.torch_utils import randn_tensor

from batchgen.models.adapter import Conditioning, EncodedText, FamilyAdapter, concat, guide, row_generators, take
from batchgen.models.families import Family
from batchgen.models.img2img import Start, encode_latents, has_init_image, preprocess, source_images, strength_timesteps
from batchgen.models.schedulers import make_scheduler, step_kwargs
from batchgen.models.sd import decode_latents
from batchgen.rows import FIELD, GenerationRequest

TextKey = tuple[str, str, str, int]  # (CLIP-L text, CLIP-G text, T5 text, T5 tokens)


class StableDiffusion3Adapter(FamilyAdapter):
    def __init__(self, pipe: Any, family: Family, vae_batch_size: int | None = None,
                 channels_last: bool | None = None, compile_denoiser: bool = False):
        self.family = family
        self.clip = ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2))
        self.tokenizer_3, self.text_encoder_3 = pipe.tokenizer_3, pipe.text_encoder_3  # None when T5 is dropped
        self.transformer = pipe.transformer
        self.vae = pipe.vae
        self.base_scheduler_config = pipe.scheduler.config
        self.latent_channels = self.transformer.config.in_channels
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.rules = family.rules(self.vae_scale_factor, scheduler_config=dict(pipe.scheduler.config),
                                  denoiser_config=dict(self.transformer.config))
        self.max_prompt_tokens = pipe.tokenizer.model_max_length
        # The processor diffusers' img2img pipeline makes for this model (not `from_pipe`, which would cast modules).
        self.image_processor = StableDiffusion3Img2ImgPipeline(**pipe.components).image_processor
        self.vae_batch_size = vae_batch_size
        # The transformer works on patch tokens (no NHWC layout to choose); the VAE is convolutional.
        channels_last = self.transformer.device.type == "cuda" if channels_last is None else channels_last
        if channels_last:
            self.vae.to(memory_format=torch.channels_last)
        self.denoiser = torch.compile(self.transformer) if compile_denoiser else self.transformer
        self.empty_key = self._key("", None, None, FIELD["max_sequence_length"].default)

    def _key(self, text: str, text_2: str | None, text_3: str | None, tokens: int) -> TextKey:
        """diffusers' defaults: an empty or null second or third text is the first. Without T5 its text does
        not matter, so rows that differ only there share an encoding."""
        return (text, text_2 or text, (text_3 or text) if self.text_encoder_3 is not None else "", int(tokens))

    def text_keys(self, req: GenerationRequest) -> tuple[TextKey, TextKey]:
        negative = req.negative_prompt or ""
        return (self._key(req.prompt, req.prompt_2, req.prompt_3, req.max_sequence_length),
                self._key(negative, req.negative_prompt_2, req.negative_prompt_3, req.max_sequence_length))

    def _clip(self, index: int, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor, list[bool]]:
        """(penultimate hidden states, pooled projection, truncated) of CLIP encoder `index`."""
        tokenizer, encoder = self.clip[index]
        tokens = tokenizer(texts, padding="max_length", max_length=self.max_prompt_tokens, truncation=True,
                           return_tensors="pt")
        truncated = [len(ids) > self.max_prompt_tokens for ids in tokenizer(texts, verbose=False).input_ids]
        out = encoder(tokens.input_ids.to(encoder.device), output_hidden_states=True)
        return out.hidden_states[-2], out[0], truncated

    def _t5(self, texts: list[str], tokens: int) -> tuple[torch.Tensor, list[bool]]:
        """T5's last hidden states, padded to `tokens` without a mask (as SD3 was trained); zeros without T5."""
        device, dtype = self.transformer.device, self.transformer.dtype
        if self.text_encoder_3 is None:
            width = self.transformer.config.joint_attention_dim
            return torch.zeros((len(texts), tokens, width), device=device, dtype=dtype), [False] * len(texts)
        ids = self.tokenizer_3(texts, padding="max_length", max_length=tokens, truncation=True,
                               add_special_tokens=True, return_tensors="pt").input_ids
        truncated = [len(full) > tokens for full in self.tokenizer_3(texts, verbose=False).input_ids]
        states = self.text_encoder_3(ids.to(self.text_encoder_3.device))[0]
        return states.to(device, dtype), truncated

    def encoding_batch(self, key: TextKey) -> int:
        return key[3]  # the T5 length: the conditioning's sequence length

    @torch.inference_mode()
    def encode_text(self, keys: list[TextKey]) -> EncodedText:
        lengths = {key[3] for key in keys}
        if len(lengths) > 1:
            raise ValueError(f"texts of different T5 lengths {sorted(lengths)} cannot be encoded in one batch")
        device, dtype = self.transformer.device, self.transformer.dtype
        states_1, pooled_1, cut_1 = self._clip(0, [key[0] for key in keys])
        states_2, pooled_2, cut_2 = self._clip(1, [key[1] for key in keys])
        t5, cut_3 = self._t5([key[2] for key in keys], lengths.pop())
        clip = torch.cat([states_1, states_2], dim=-1).to(device, dtype)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))  # negative: crops
        conditioning = {"encoder_hidden_states": torch.cat([clip, t5], dim=-2),
                        "pooled_projections": torch.cat([pooled_1, pooled_2], dim=-1).to(device, dtype)}
        return EncodedText(conditioning, [any(cut) for cut in zip(cut_1, cut_2, cut_3, strict=True)])

    def _scheduler(self, first: GenerationRequest, device: torch.device):
        """The row's flow-matching scheduler; with dynamic shifting, `mu` from the image's token count."""
        scheduler = make_scheduler(first.scheduler, self.base_scheduler_config, self.family.scheduler_table)
        config = scheduler.config
        kwargs = {}
        if config.get("use_dynamic_shifting", None):
            patch = self.transformer.config.patch_size
            tokens = (first.height // self.vae_scale_factor // patch) * (first.width // self.vae_scale_factor // patch)
            kwargs["mu"] = calculate_shift(tokens, config.get("base_image_seq_len", 256),
                                           config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                                           config.get("max_shift", 1.16))
        scheduler.set_timesteps(first.steps, device=device, **kwargs)
        return scheduler

    def _forward(self, latents: torch.Tensor, t: torch.Tensor, cond: Conditioning, **kwargs: Any) -> torch.Tensor:
        return self.denoiser(hidden_states=latents, timestep=t.expand(latents.shape[0]),
                             encoder_hidden_states=cond["encoder_hidden_states"],
                             pooled_projections=cond["pooled_projections"], return_dict=False, **kwargs)[0]

    @torch.inference_mode()
    def sample(self, rows: list[GenerationRequest], cond: Conditioning, uncond: Conditioning) -> torch.Tensor:
        first = rows[0]
        device, dtype = self.transformer.device, self.transformer.dtype
        scheduler = self._scheduler(first, device)
        generators = row_generators(rows)
        if has_init_image(rows):
            start = self._img2img_start(rows, scheduler, generators, dtype)
        else:
            start = Start(scheduler.timesteps,
                          self.initial_latents(rows, self.latent_channels, generators, device, dtype, 1.0))
        latents = start.latents
        guidance = torch.tensor([float(r.guidance_scale) for r in rows], device=device, dtype=dtype).view(-1, 1, 1, 1)
        use_cfg = bool((guidance > 1).any())
        hidden = concat(uncond, cond) if use_cfg else cond
        # Skip-layer guidance: only rows that use CFG, only strictly inside the window (diffusers' bounds).
        layers = list(first.skip_guidance_layers or ())
        guided_rows = [n for n, r in enumerate(rows) if r.guidance_scale > 1] if layers else []
        if guided_rows:
            skip_cond = take(cond, guided_rows)
            skip_index = torch.tensor(guided_rows, device=device)
            skip_scale = torch.tensor([float(rows[n].skip_layer_guidance_scale) for n in guided_rows], device=device,
                                      dtype=dtype).view(-1, 1, 1, 1)
            window = (first.steps * first.skip_layer_guidance_start, first.steps * first.skip_layer_guidance_stop)
        extra = step_kwargs(scheduler, generators, 0.0)
        for i, t in enumerate(start.timesteps):
            model_input = torch.cat([latents, latents]) if use_cfg else latents
            prediction = self._forward(model_input, t, hidden)
            noise = guide(prediction, guidance, use_cfg)
            if guided_rows and window[0] < i < window[1]:
                text = prediction.chunk(2)[1].index_select(0, skip_index)
                skipped = self._forward(latents.index_select(0, skip_index), t, skip_cond, skip_layers=layers)
                noise = noise.index_add(0, skip_index, (text - skipped) * skip_scale)
            latents = scheduler.step(noise, t, latents, **extra, return_dict=False)[0]
        return decode_latents(self.vae, latents, self.vae_batch_size)

    def _img2img_start(self, rows: list[GenerationRequest], scheduler: Any, generators: list,
                       dtype: torch.dtype) -> Start:
        """diffusers' StableDiffusion3Img2ImgPipeline: the timesteps from `int(steps - steps x strength)` on (the
        scheduler told where it begins), then per row the VAE sample of the init image, shifted and scaled, then
        the noise, mixed in by `scale_noise` at the first kept timestep's sigma."""
        first = rows[0]
        images = preprocess(self.image_processor, source_images(rows), first.height, first.width)
        timesteps = strength_timesteps(scheduler, first.steps, first.strength, self.rules.whole_strength_steps)
        init = encode_latents(self.vae, images, generators, dtype)
        noise = randn_tensor(init.shape, generator=generators, device=init.device, dtype=init.dtype)
        return Start(timesteps, scheduler.scale_noise(init, timesteps[:1].repeat(len(rows)), noise))

"""Family-independent pieces of image-to-image and inpainting: the source images of a group of rows, the timesteps
left after cutting by strength, and the VAE encoding of init images with each row's own generator.

Every family's img2img pipeline in diffusers does the same three things in the same order: preprocess the image
with the model's VaeImageProcessor at the output size, drop the first steps of the schedule by strength, and
encode the image by sampling the VAE's latent distribution with the row's generator (the first draw of that
generator), then draw the noise (the second) and add it with the scheduler at the first kept timestep. The
families differ in how the latents are scaled (handled here from the VAE config), whether the step count is
truncated to an integer (`Rules.whole_strength_steps`) and which scheduler call adds noise (the family's module).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from batchgen.rows import GenerationRequest, denoising_start


@dataclass
class Start:
    """Where a group's denoising loop starts: its timesteps and latents; for inpainting, the mask and masked-image
    latents a 9-channel UNet reads, or the blend a 4-channel model applies after each step."""

    timesteps: torch.Tensor
    latents: torch.Tensor
    mask: torch.Tensor | None = None
    masked_latents: torch.Tensor | None = None
    blend: Callable[[Any, int, torch.Tensor], torch.Tensor] | None = None


def has_init_image(rows: list[GenerationRequest]) -> bool:
    """Whether a group (rows share the presence of init_image and mask_image) starts from images."""
    return rows[0].init_image is not None


def source_images(rows: list[GenerationRequest], mask: bool = False) -> list[Image.Image]:
    """The rows' fetched init images (RGB) or masks (L), as the PIL images a diffusers user would pass."""
    images = []
    for row in rows:
        pixels, size = (row.mask_pixels, row.mask_image_size) if mask else (row.init_pixels, row.init_image_size)
        if pixels is None or size is None:
            name = "mask_image" if mask else "init_image"
            raise ValueError(f"row {row.seed}: `{name}` {getattr(row, name)!r} was not fetched")
        height, width = size
        images.append(Image.frombytes("L" if mask else "RGB", (width, height), pixels))
    return images


def preprocess(processor: Any, images: list[Image.Image], height: int, width: int) -> torch.Tensor:
    """Each image through the model's own processor at the output size (one call per image, as a one-row
    diffusers call makes), concatenated: float32, (B, C, height, width)."""
    return torch.cat([processor.preprocess(image, height=height, width=width) for image in images]).float()


def strength_timesteps(scheduler: Any, steps: int, strength: float, whole_steps: bool = True) -> torch.Tensor:
    """The scheduler's timesteps after cutting by strength (set_timesteps already called), and the scheduler told
    where it starts, as diffusers' img2img `get_timesteps` does."""
    start = denoising_start(steps, strength, whole_steps) * scheduler.order
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start)
    return scheduler.timesteps[start:]


def encode_latents(vae: Any, images: torch.Tensor, generators: list[torch.Generator], dtype: torch.dtype,
                   latents_mean_std: bool = True) -> torch.Tensor:
    """Images in [-1, 1] -> scaled latents, sampling the VAE's latent distribution with each row's generator (one
    draw of the latent's shape per row, as diffusers' `retrieve_latents(vae.encode(image[i:i+1]), generator[i])`).
    Applies the VAE config's scaling: latents_mean/std (SDXL-style) or shift_factor (SD3) where present."""
    config = vae.config
    latents = vae.encode(images.to(device=vae.device, dtype=vae.dtype)).latent_dist.sample(generators)
    mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
    shift = getattr(config, "shift_factor", None)
    if latents_mean_std and mean is not None and std is not None:
        shape = (1, len(mean), 1, 1)
        mean = torch.tensor(mean).view(shape).to(latents.device, latents.dtype)
        std = torch.tensor(std).view(shape).to(latents.device, latents.dtype)
        latents = (latents - mean) * config.scaling_factor / std
    elif shift is not None:
        latents = (latents - shift) * config.scaling_factor
    else:
        latents = config.scaling_factor * latents
    return latents.to(dtype)


def skip_encode_draw(vae: Any, images: torch.Tensor, generators: list[torch.Generator]) -> None:
    """Advance each row's generator as encoding `images` would, without encoding: where diffusers encodes an image
    it then does not use (the masked image of a 4-channel inpainting model), so later draws still match."""
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    shape = (images.shape[0], vae.config.latent_channels, images.shape[2] // factor, images.shape[3] // factor)
    randn_tensor(shape, generator=generators, device=vae.device, dtype=vae.dtype)


def inpaint_start(rows: list[GenerationRequest], scheduler: Any, generators: list, vae: Any,
                  processors: tuple[Any, Any], mask_channels: bool, dtype: torch.dtype, whole_steps: bool = True,
                  latents_mean_std: bool = True) -> Start:
    """diffusers' StableDiffusionInpaintPipeline and StableDiffusionXLInpaintPipeline (`processors`: the model's
    image and mask processors). Per row: the init image's VAE sample (only for a 4-channel UNet or strength < 1),
    the noise, then the masked image's VAE sample (drawn for a 4-channel UNet too, which does not use it). A
    9-channel UNet (`mask_channels`) reads the mask and masked-image latents; a 4-channel one has the unmasked
    region reset to the init latents, noised to the next timestep, after every step. SDXL's inpainting encodes
    without the VAE's latents_mean/std (`latents_mean_std=False`), unlike its img2img."""
    first = rows[0]
    image_processor, mask_processor = processors
    images = preprocess(image_processor, source_images(rows), first.height, first.width)
    masks = preprocess(mask_processor, source_images(rows, mask=True), first.height, first.width)
    timesteps = strength_timesteps(scheduler, first.steps, first.strength, whole_steps)
    from_noise = first.strength == 1.0
    init = None
    if not mask_channels or not from_noise:
        init = encode_latents(vae, images, generators, dtype, latents_mean_std)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    shape = (len(rows), vae.config.latent_channels, first.height // factor, first.width // factor)
    noise = randn_tensor(shape, generator=generators, device=vae.device, dtype=dtype)
    if from_noise:
        latents = noise * scheduler.init_noise_sigma
    else:
        latents = scheduler.add_noise(init, noise, timesteps[:1].repeat(len(rows)))
    masked_images = images * (masks < 0.5)
    mask = torch.nn.functional.interpolate(masks, size=shape[2:]).to(device=vae.device, dtype=dtype)
    if mask_channels:
        return Start(timesteps, latents, mask=mask,
                     masked_latents=encode_latents(vae, masked_images, generators, dtype, latents_mean_std))
    skip_encode_draw(vae, masked_images, generators)

    def blend(scheduler: Any, i: int, latents: torch.Tensor) -> torch.Tensor:
        proper = init
        if i < len(timesteps) - 1:
            proper = scheduler.add_noise(init, noise, torch.tensor([timesteps[i + 1]]))
        return (1 - mask) * proper + mask * latents

    return Start(timesteps, latents, blend=blend)

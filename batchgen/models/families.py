"""The model families batchgen runs, as data: which pipeline classes, row fields and schedulers each has.

Torch-free: the driver reads a checkpoint's model_index.json and picks the family here before Ray starts,
so every family-dependent name (a scheduler, an SDXL-only column) is checked at plan time. The family's
sampler is its adapter module, imported only where a model is loaded.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from batchgen.models.schedulers import MODEL_SCHEDULER, model_scheduler_name, scheduler_names
from batchgen.rows import COMMON_FIELDS, IMG2IMG_FIELDS, Rules

DISCRETE_SCHEDULERS = scheduler_names("discrete")


@dataclass(frozen=True)
class Family:
    """One model family: its diffusers pipeline classes, the row fields it reads, the scheduler names it accepts
    (from `scheduler_table` in batchgen.models.schedulers), and the adapter (`module:Class`) that samples with it."""

    name: str
    pipelines: tuple[str, ...]
    fields: frozenset[str]
    schedulers: tuple[str, ...]
    adapter: str
    refiner_fields: frozenset[str] = frozenset()  # extra row fields when a refiner follows this family's base
    refiner_pipelines: tuple[str, ...] = ()  # model_index classes accepted as this family's refiner
    needs: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (checkpoint class, fields every row must set)
    strength: float = 0.8  # diffusers' img2img default for the family
    inpaint_strength: float = 1.0  # diffusers' inpainting default for the family
    whole_strength_steps: bool = True  # img2img keeps int(steps * strength) steps (SD3: not truncated)
    scheduler_table: str = "discrete"  # what the family's scheduler names mean
    denoiser: str = "unet"  # the denoiser's component; a `transformer` has a patch size and numbered blocks

    def rules(self, vae_scale_factor: int = 8, refined: bool = False, model_scheduler: str = MODEL_SCHEDULER,
              pipeline: str | None = None, scheduler_config: dict[str, Any] | None = None,
              denoiser_config: dict[str, Any] | None = None) -> Rules:
        """What rows may hold for this family; `pipeline` is the checkpoint's class (inpainting ones need masks).
        With the checkpoint's scheduler config, only the names that can honour it (and `model` named after what
        it stands for); with its denoiser config, its patch size and blocks."""
        alone = pipeline in self.refiner_pipelines  # a refiner on its own: an img2img model
        fields = self.fields | (self.refiner_fields if refined or alone else frozenset())
        if refined:
            fields -= IMG2IMG_FIELDS  # a base followed by a refiner starts from noise
        needs = dict(self.needs).get(pipeline, ())
        schedulers = self.schedulers
        if scheduler_config is not None:
            schedulers = tuple(n for n in scheduler_names(self.scheduler_table, scheduler_config) if n in schedulers)
            model_scheduler = model_scheduler_name(scheduler_config, self.scheduler_table)
        denoiser_config = denoiser_config or {}
        layers = denoiser_config.get("num_layers") if self.denoiser == "transformer" else None
        return Rules(fields, schedulers, vae_scale_factor, self.name, model_scheduler, self.strength,
                     self.inpaint_strength, self.whole_strength_steps, needs,
                     patch_size=denoiser_config.get("patch_size", 1), denoiser_layers=layers)

    def adapter_class(self) -> Any:
        module, name = self.adapter.split(":")
        return getattr(importlib.import_module(module), name)


SDXL_FIELDS = frozenset(("prompt_2", "negative_prompt_2", "original_size", "crops_coords_top_left", "target_size"))
SD3_FIELDS = (COMMON_FIELDS - {"eta"}) | frozenset(
    ("prompt_2", "negative_prompt_2", "prompt_3", "negative_prompt_3", "max_sequence_length", "skip_guidance_layers",
     "skip_layer_guidance_scale", "skip_layer_guidance_start", "skip_layer_guidance_stop"))
MASK_FIELDS = frozenset(("mask_image", "mask_image_sha256", "mask_image_size", "mask_pixels"))


FAMILIES: tuple[Family, ...] = (
    Family("stable-diffusion", ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline",
                                "StableDiffusionInpaintPipeline"), COMMON_FIELDS | IMG2IMG_FIELDS,
           DISCRETE_SCHEDULERS, "batchgen.models.sd:StableDiffusionAdapter",
           needs=(("StableDiffusionInpaintPipeline", ("init_image", "mask_image")),)),
    Family("stable-diffusion-xl", ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline",
                                   "StableDiffusionXLInpaintPipeline"),
           COMMON_FIELDS | SDXL_FIELDS | IMG2IMG_FIELDS, DISCRETE_SCHEDULERS,
           "batchgen.models.sdxl:StableDiffusionXLAdapter",
           refiner_fields=frozenset(("aesthetic_score", "negative_aesthetic_score")),
           refiner_pipelines=("StableDiffusionXLImg2ImgPipeline",), strength=0.3, inpaint_strength=0.9999,
           needs=(("StableDiffusionXLImg2ImgPipeline", ("init_image",)),
                  ("StableDiffusionXLInpaintPipeline", ("init_image", "mask_image")))),
    # SD3 img2img without masks: StableDiffusion3InpaintPipeline is not followed yet.
    Family("stable-diffusion-3", ("StableDiffusion3Pipeline",), SD3_FIELDS | (IMG2IMG_FIELDS - MASK_FIELDS),
           scheduler_names("flow"), "batchgen.models.sd3:StableDiffusion3Adapter", strength=0.6,
           whole_strength_steps=False, scheduler_table="flow", denoiser="transformer"),
)


def family_for(pipeline_class: str) -> Family:
    """The family whose base pipeline class this is; ValueError naming the supported ones otherwise."""
    for family in FAMILIES:
        if pipeline_class in family.pipelines:
            return family
    supported = [p for f in FAMILIES for p in f.pipelines]
    raise ValueError(f"pipeline class {pipeline_class!r} is not supported; supported: {supported}")

"""What a model family provides to the engine, and the sampling pieces families share.

The engine (engine.py) groups rows, encodes each distinct text once, chunks, falls back on out-of-memory and
overlaps copies; everything that depends on the family is here or in the family's module: which texts a row
needs (`text_keys`), encoding them (`encode_text`, `empty_conditioning`), and `sample`, which turns a group of
rows that share steps, size, scheduler and eta into images (noise, input scaling, the guided forward, the
scheduler loop, decoding). Per-row noise comes from a CPU generator per row seeded with the row's seed, so a
row's image does not depend on its batch.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.utils.torch_utils import randn_tensor

from batchgen.models.families import Family
from batchgen.models.schedulers import make_scheduler
from batchgen.rows import GenerationRequest, Rules

Conditioning = dict[str, torch.Tensor]


@dataclass
class EncodedText:
    """Conditioning for a list of text keys (batch-first tensors) and whether each key's text was truncated."""

    conditioning: Conditioning
    truncated: list[bool]


def take(cond: Conditioning, index: list[int]) -> Conditioning:
    """Rows `index` of every tensor, in that order."""
    idx = torch.tensor(index, dtype=torch.long, device=next(iter(cond.values())).device)
    return {k: v.index_select(0, idx) for k, v in cond.items()}


def concat(first: Conditioning, second: Conditioning) -> Conditioning:
    return {k: torch.cat([first[k], second[k]]) for k in first}


def stack(rows: list[Conditioning]) -> Conditioning:
    """One batch from single-row conditionings, in order."""
    return {k: torch.cat([row[k] for row in rows]) for k in rows[0]}


def row_generators(rows: list[GenerationRequest]) -> list[torch.Generator]:
    """One CPU generator per row seeded with the row's seed: the contract that makes images batch-invariant."""
    return [torch.Generator("cpu").manual_seed(int(r.seed)) for r in rows]


def guide(prediction: torch.Tensor, guidance: torch.Tensor, use_cfg: bool) -> torch.Tensor:
    """Classifier-free guidance per row: `prediction` holds (unconditional, conditional) halves when `use_cfg`;
    rows with guidance <= 1 take the conditional prediction as it is."""
    if not use_cfg:
        return prediction
    pred_uncond, pred_cond = prediction.chunk(2)
    return torch.where(guidance > 1, pred_uncond + guidance * (pred_cond - pred_uncond), pred_cond)


class FamilyAdapter:
    """The engine's view of one loaded model family. A family module subclasses this and provides the methods
    below; `empty_key` is the text key of an empty prompt (its conditioning is computed once per model)."""

    family: Family
    rules: Rules
    vae_scale_factor: int
    max_prompt_tokens: int
    base_scheduler_config: Any  # the checkpoint's scheduler config, as loaded (it names its class)
    empty_key: Hashable = ""

    def text_keys(self, req: GenerationRequest) -> tuple[Hashable, Hashable]:
        """(conditional, unconditional) keys of the texts a row needs; rows with equal keys share an encoding.
        Keys of one family sort against each other (the engine encodes them in sorted order)."""
        return req.prompt, req.negative_prompt

    def encoding_batch(self, key: Hashable) -> Hashable:
        """Texts with equal values here are encoded in one batch: their encodings have the same shape."""
        return None

    def encode_text(self, keys: list[Any]) -> EncodedText:
        raise NotImplementedError

    def empty_conditioning(self) -> Conditioning:
        """The conditioning of `empty_key` (an empty negative prompt)."""
        return self.encode_text([self.empty_key]).conditioning

    def sample(self, rows: list[GenerationRequest], cond: Conditioning, uncond: Conditioning) -> torch.Tensor:
        """Rows sharing steps, size, scheduler and eta -> float32 images in [0, 1], shape (B, 3, H, W)."""
        raise NotImplementedError

    # Shared pieces for families with a discrete-time scheduler and a latent VAE.
    def make_scheduler(self, name: str, device: torch.device, steps: int):
        scheduler = make_scheduler(name, self.base_scheduler_config, self.family.scheduler_table)
        scheduler.set_timesteps(steps, device=device)
        return scheduler

    def initial_latents(self, rows: list[GenerationRequest], channels: int, generators: list[torch.Generator],
                        device: torch.device, dtype: torch.dtype, init_noise_sigma: Any) -> torch.Tensor:
        first = rows[0]
        factor = self.vae_scale_factor
        shape = (len(rows), channels, first.height // factor, first.width // factor)
        latents = randn_tensor(shape, generator=generators, device=device, dtype=dtype)
        return latents * init_noise_sigma

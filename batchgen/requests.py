"""What one image asks for, and its validation: no torch, so readers and storage workers stay light."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from batchgen.errors import RowError
from batchgen.schedulers import SCHEDULERS

MAX_STEPS = 1000
MAX_SIDE = 4096
MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class GenerationRequest:
    """Everything that decides one image's pixels, given the model."""

    prompt: str
    seed: int
    negative_prompt: str = ""
    guidance_scale: float = 7.5
    steps: int = 25
    width: int = 512
    height: int = 512
    scheduler: str = "ddim"
    eta: float = 0.0

    def group_key(self) -> tuple:
        """Rows with equal keys share one denoising loop."""
        return (self.steps, self.width, self.height, self.scheduler, self.eta)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def validate_request(req: GenerationRequest, vae_scale_factor: int = 8) -> None:
    """Raise RowError naming the first bad field; cheap, runs before any compute."""
    if not isinstance(req.prompt, str) or not req.prompt.strip():
        raise RowError("prompt", req.prompt, "must be a non-empty string")
    if not isinstance(req.negative_prompt, str):
        raise RowError("negative_prompt", req.negative_prompt, "must be a string")
    if not isinstance(req.seed, (int, np.integer)) or isinstance(req.seed, bool) or not 0 <= req.seed <= MAX_SEED:
        raise RowError("seed", req.seed, f"must be an integer in [0, {MAX_SEED}]")
    if not _is_number(req.guidance_scale) or not math.isfinite(req.guidance_scale) or req.guidance_scale < 0:
        raise RowError("guidance_scale", req.guidance_scale, "must be a finite number >= 0")
    if not isinstance(req.steps, (int, np.integer)) or isinstance(req.steps, bool) or not 1 <= req.steps <= MAX_STEPS:
        raise RowError("steps", req.steps, f"must be an integer in [1, {MAX_STEPS}]")
    multiple = max(8, vae_scale_factor)
    for name in ("width", "height"):
        side = getattr(req, name)
        if not isinstance(side, (int, np.integer)) or isinstance(side, bool) or not multiple <= side <= MAX_SIDE:
            raise RowError(name, side, f"must be an integer in [{multiple}, {MAX_SIDE}]")
        if side % multiple:
            raise RowError(name, side, f"must be divisible by {multiple}")
    if req.scheduler not in SCHEDULERS:
        raise RowError("scheduler", req.scheduler, f"must be one of {sorted(SCHEDULERS)}")
    if not _is_number(req.eta) or not math.isfinite(req.eta) or req.eta < 0:
        raise RowError("eta", req.eta, "must be a finite number >= 0")

"""Schedulers by name: each name maps to a diffusers scheduler class and the options that define it.

A family's table says what its names mean: `euler` is EulerDiscreteScheduler on a discrete-time (UNet) model
and FlowMatchEulerDiscreteScheduler on a flow-matching one.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

# name -> (diffusers class name, config overrides). The model's own scheduler config supplies the noise
# schedule (betas, prediction type, timestep spacing); the name only picks the sampler. Classes are looked
# up on use, so validating a name (the reader, the spec) does not import diffusers and torch.
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_2m_karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "unipc": ("UniPCMultistepScheduler", {}),
}
# Flow-matching models (SD3): the checkpoint's FlowMatchEulerDiscreteScheduler config carries the shift.
FLOW_SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "euler": ("FlowMatchEulerDiscreteScheduler", {}),
    "heun": ("FlowMatchHeunDiscreteScheduler", {}),
}
TABLES = {"discrete": SCHEDULERS, "flow": FLOW_SCHEDULERS}
# Per table, the config options a scheduler class lacks: it would silently ignore them (flow-match Heun has only
# a static `shift`), so a checkpoint that turns one on cannot use that name.
LACKS: dict[str, dict[str, tuple[str, ...]]] = {
    "flow": {"heun": ("use_dynamic_shifting", "invert_sigmas", "shift_terminal", "use_karras_sigmas",
                      "use_exponential_sigmas", "use_beta_sigmas", "stochastic_sampling")},
}
# The checkpoint's own scheduler, exactly as its scheduler_config.json configures it.
MODEL_SCHEDULER = "model"
# Every name some family accepts (the spec checks a name against these; the plan against the model's family).
ALL_NAMES = (MODEL_SCHEDULER, *sorted(set(SCHEDULERS) | set(FLOW_SCHEDULERS)))


def scheduler_names(table: str = "discrete", config: dict[str, Any] | None = None) -> tuple[str, ...]:
    """The names a model with this scheduler config accepts: `model`, then the table's names that can honour
    every option the config turns on."""
    config = config or {}
    lacks = LACKS.get(table, {})
    usable = [name for name in TABLES[table] if not any(config.get(key) for key in lacks.get(name, ()))]
    return (MODEL_SCHEDULER, *sorted(usable))


def model_scheduler_name(config: dict[str, Any], table: str = "discrete") -> str:
    """The name that rebuilds this scheduler config unchanged (so manifests name what ran), else `model`."""
    for name, (class_name, overrides) in TABLES[table].items():
        if config.get("_class_name") == class_name and all(config.get(k) == v for k, v in overrides.items()):
            return name
    return MODEL_SCHEDULER


def make_scheduler(name: str, base_config: Any, table: str = "discrete"):
    """A fresh scheduler (schedulers carry per-run state) of the named kind on the model's schedule."""
    diffusers = importlib.import_module("diffusers")
    if name == MODEL_SCHEDULER:
        return getattr(diffusers, base_config["_class_name"]).from_config(base_config)
    try:
        class_name, overrides = TABLES[table][name]
    except KeyError:
        allowed = [MODEL_SCHEDULER, *sorted(TABLES[table])]
        raise ValueError(f"`scheduler` must be one of {allowed} but is {name!r}") from None
    return getattr(diffusers, class_name).from_config(base_config, **overrides)


def step_kwargs(scheduler: Any, generators: list, eta: float) -> dict[str, Any]:
    """The optional arguments this scheduler's `step` accepts: per-row generators and DDIM's eta."""
    accepted = inspect.signature(scheduler.step).parameters
    kwargs: dict[str, Any] = {}
    if "generator" in accepted:
        kwargs["generator"] = generators
    if "eta" in accepted:
        kwargs["eta"] = eta
    return kwargs

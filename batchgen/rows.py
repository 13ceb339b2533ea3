"""The row contract: every per-image field declared once; the reader, schemas, request and group key derive from it.

No torch and no pyarrow at import, so the spec, the driver and light workers can use it. A field's declaration
says its type, where its default comes from, how it is checked, whether rows with different values can share a
denoising loop, whether manifests record it and whether an input column may map to it. Which fields a model
uses is the family's business (batchgen.models.families): the others stay null.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields, make_dataclass
from typing import Any

import numpy as np

from batchgen.errors import RowError
from batchgen.models.schedulers import ALL_NAMES, MODEL_SCHEDULER

MAX_STEPS = 1000
MAX_SIDE = 4096
MAX_SEED = 2**63 - 1
MAX_IMAGES_PER_ROW = 10_000
ANY_FAMILY = "any"  # rules for no model in particular: every field, every scheduler name
MAX_T5_TOKENS = 512  # T5's trained context: SD3's T5 saw at most this many tokens


@dataclass(frozen=True)
class Rules:
    """What the model at hand allows: the family's fields and scheduler names, its latent grid, its denoiser."""

    fields: frozenset[str]
    schedulers: tuple[str, ...] = ALL_NAMES
    vae_scale_factor: int = 8
    family: str = ANY_FAMILY
    model_scheduler: str = MODEL_SCHEDULER  # the name `model` stands for: the checkpoint's configured scheduler
    strength: float = 0.8  # default img2img strength (diffusers' img2img pipeline default for the family)
    inpaint_strength: float = 1.0  # default inpainting strength (diffusers' inpainting pipeline default)
    whole_strength_steps: bool = True  # img2img keeps int(steps * strength) steps (SD, SDXL); SD3 does not truncate
    needs: tuple[str, ...] = ()  # fields every row must set (an inpainting or img2img-only checkpoint's images)
    patch_size: int = 1  # a transformer denoiser's latent patch: sizes are multiples of vae_scale_factor x this
    denoiser_layers: int | None = None  # a transformer denoiser's block count (skip-layer guidance indexes them)


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _non_empty_text(name: str, value: Any, rules: Rules) -> None:
    if not isinstance(value, str) or not value.strip():
        raise RowError(name, value, "must be a non-empty string")


def _text(name: str, value: Any, rules: Rules) -> None:
    if not isinstance(value, str):
        raise RowError(name, value, "must be a string")


def _optional_text(name: str, value: Any, rules: Rules) -> None:
    if value is not None and not isinstance(value, str):
        raise RowError(name, value, "must be a string or null")


def _seed(name: str, value: Any, rules: Rules) -> None:
    if not _is_int(value) or not 0 <= value <= MAX_SEED:
        raise RowError(name, value, f"must be an integer in [0, {MAX_SEED}]")


def _guidance(name: str, value: Any, rules: Rules) -> None:
    if not _is_number(value) or not math.isfinite(value) or value < 0:
        raise RowError(name, value, "must be a finite number >= 0")


_eta = _guidance


def _finite(name: str, value: Any, rules: Rules) -> None:
    if not _is_number(value) or not math.isfinite(value):
        raise RowError(name, value, "must be a finite number")


def _steps(name: str, value: Any, rules: Rules) -> None:
    if not _is_int(value) or not 1 <= value <= MAX_STEPS:
        raise RowError(name, value, f"must be an integer in [1, {MAX_STEPS}]")


def _side(name: str, value: Any, rules: Rules) -> None:
    multiple = max(8, rules.vae_scale_factor * rules.patch_size)
    if not _is_int(value) or not multiple <= value <= MAX_SIDE:
        raise RowError(name, value, f"must be an integer in [{multiple}, {MAX_SIDE}]")
    if value % multiple:
        why = (f" (the VAE's factor {rules.vae_scale_factor} x the transformer's patch size {rules.patch_size})"
               if rules.patch_size > 1 else "")
        raise RowError(name, value, f"must be divisible by {multiple}{why}")


def _scheduler(name: str, value: Any, rules: Rules) -> None:
    if value not in rules.schedulers:
        model = f" for a {rules.family} model" if rules.family != ANY_FAMILY else ""
        raise RowError(name, value, f"must be one of {list(rules.schedulers)}{model}")


def _uri(name: str, value: Any, rules: Rules) -> None:
    if value is not None and (not isinstance(value, str) or not value.strip()
                              or ("://" in value and not value.startswith(("s3://", "file://")))):
        raise RowError(name, value, "must be a local path or s3:// URI (or image bytes in a binary column)")


def _strength(name: str, value: Any, rules: Rules) -> None:
    if value is None:
        return
    if not _is_number(value) or not 0 < value <= 1:
        raise RowError(name, value, "must be a number in (0, 1]")


def _recorded(name: str, value: Any, rules: Rules) -> None:
    """Set by the fetch stage, never read from a column: nothing to check."""


def _pair(name: str, value: Any, rules: Rules) -> None:
    if value is None:
        return
    if (not isinstance(value, (list, tuple)) or len(value) != 2 or not all(_is_int(v) for v in value)
            or not all(0 <= v <= 4 * MAX_SIDE for v in value)):
        raise RowError(name, value, f"must be two integers in [0, {4 * MAX_SIDE}]")


def _t5_tokens(name: str, value: Any, rules: Rules) -> None:
    if not _is_int(value) or not 1 <= value <= MAX_T5_TOKENS:
        raise RowError(name, value, f"must be an integer in [1, {MAX_T5_TOKENS}]")


def _layers(name: str, value: Any, rules: Rules) -> None:
    if value is None:
        return
    if (not isinstance(value, (list, tuple)) or not value or not all(_is_int(v) and v >= 0 for v in value)
            or len(set(value)) != len(value)):
        raise RowError(name, value, "must be a non-empty list of distinct layer indices >= 0, or null")
    if rules.denoiser_layers is None:
        raise RowError(name, value, f"needs a transformer denoiser; a {rules.family} model has none")
    if max(value) >= rules.denoiser_layers:
        raise RowError(name, value, f"must index layers of this model's transformer, which has "
                                    f"{rules.denoiser_layers} (0 to {rules.denoiser_layers - 1})")


def _optional_guidance(name: str, value: Any, rules: Rules) -> None:
    if value is not None:
        _guidance(name, value, rules)


def _optional_fraction(name: str, value: Any, rules: Rules) -> None:
    if value is not None and (not _is_number(value) or not 0 <= value <= 1):
        raise RowError(name, value, "must be a number in [0, 1], or null")


@dataclass(frozen=True)
class RowField:
    """One per-image field. `kind` is its type (text, int, float, pair: two ints, ints: a list of ints);
    `default` the value of a request that does not set it; `sampling` the SamplingSpec attribute (dotted: inside
    a section of it) that holds the job's default (None: the field has no job default; a job default of None
    leaves `default`); `derive` computes the default from the row's other fields. A field with `column=False`
    is a job option: every row of a job has the job's value."""

    name: str
    kind: str
    default: Any
    check: Callable[[str, Any, Rules], None]
    doc: str
    sampling: str | None = None
    derive: Callable[[dict[str, Any]], Any] | None = None
    group: bool | str = False  # rows with different values need separate loops; "presence": set vs null does
    manifest: bool = True  # recorded in manifest rows (provenance)
    column: bool = True  # an input column may supply it
    requires: str | None = None  # only meaningful when this other field is set: null otherwise


def _row_size(values: dict[str, Any]) -> tuple[int, int] | None:
    height, width = values.get("height"), values.get("width")
    return (int(height), int(width)) if _is_int(height) and _is_int(width) else None


# The order here is the column order of work rows and manifests. prompt and seed come first: they have no
# default on a request.
FIELDS: tuple[RowField, ...] = (
    RowField("prompt", "text", None, _non_empty_text, "The text to generate from (required)."),
    RowField("seed", "int", None, _seed, "Noise seed; default derived from (job seed, id, sample index)."),
    RowField("negative_prompt", "text", "", _text, "Text to steer away from; empty = the model's unconditional.",
             sampling="negative_prompt"),
    RowField("guidance_scale", "float", 7.5, _guidance, "Classifier-free guidance; <= 1 disables it.",
             sampling="guidance_scale"),
    RowField("steps", "int", 25, _steps, "Denoising steps.", sampling="steps", group=True),
    RowField("width", "int", 512, _side, "Image width in pixels.", sampling="width", group=True),
    RowField("height", "int", 512, _side, "Image height in pixels.", sampling="height", group=True),
    RowField("scheduler", "text", MODEL_SCHEDULER, _scheduler, "Sampler name; `model` = the checkpoint's own.",
             sampling="scheduler", group=True),
    RowField("eta", "float", 0.0, _eta, "DDIM eta (noise in DDIM steps).", sampling="eta", group=True),
    RowField("prompt_2", "text", None, _optional_text, "SDXL: text for the second encoder; null = prompt."),
    RowField("negative_prompt_2", "text", None, _optional_text,
             "SDXL: negative text for the second encoder; null = negative_prompt."),
    RowField("original_size", "pair", None, _pair, "SDXL: (height, width) conditioning; default the row's size.",
             derive=_row_size),
    RowField("crops_coords_top_left", "pair", None, _pair, "SDXL: (top, left) crop conditioning; default (0, 0).",
             derive=lambda values: (0, 0)),
    RowField("target_size", "pair", None, _pair, "SDXL: (height, width) conditioning; default the row's size.",
             derive=_row_size),
    RowField("aesthetic_score", "float", 6.0, _finite, "SDXL refiner: aesthetic score of the conditional pass."),
    RowField("negative_aesthetic_score", "float", 2.5, _finite,
             "SDXL refiner: aesthetic score of the unconditional pass."),
    # Image-to-image and inpainting. A binary column holds the image itself; its row then records
    # `table:<file>:<row>:<column>` as the URI. The fetch stage (batchgen.fetch) sets the sha256, size and pixels.
    RowField("init_image", "text", None, _uri, "img2img/inpainting: source image, a local path or s3:// URI "
             "(or the image bytes in a binary column); null = text-to-image.", group="presence"),
    RowField("strength", "float", None, _strength, "img2img/inpainting: how much noise is added to the init "
             "image, in (0, 1]; default the family's.", group=True, requires="init_image"),
    RowField("mask_image", "text", None, _uri, "Inpainting: mask (white = repaint), a path, s3:// URI or bytes.",
             group="presence", requires="init_image"),
    RowField("init_image_sha256", "text", None, _recorded, "sha256 of the init image's bytes.", column=False),
    RowField("init_image_size", "pair", None, _pair, "(height, width) of the init image before resizing.",
             column=False),
    RowField("mask_image_sha256", "text", None, _recorded, "sha256 of the mask's bytes.", column=False),
    RowField("mask_image_size", "pair", None, _pair, "(height, width) of the mask before resizing.", column=False),
    RowField("init_pixels", "bytes", None, _recorded, "Decoded init image, RGB uint8 (height x width x 3).",
             manifest=False, column=False),
    RowField("mask_pixels", "bytes", None, _recorded, "Decoded mask, L uint8 (height x width).",
             manifest=False, column=False),
    RowField("prompt_3", "text", None, _optional_text, "SD3: text for the T5 encoder; null = prompt."),
    RowField("negative_prompt_3", "text", None, _optional_text,
             "SD3: negative text for the T5 encoder; null = negative_prompt."),
    # SD3 job options. The T5 length shapes the conditioning (no attention mask: padding changes the image), so
    # rows with different lengths cannot share a batch; skip-layer guidance adds a pass inside a step window.
    RowField("max_sequence_length", "int", 256, _t5_tokens, "SD3: T5 tokens (padded or truncated to this).",
             sampling="max_sequence_length", group=True, column=False),
    RowField("skip_guidance_layers", "ints", None, _layers,
             "SD3: transformer blocks the skip-layer pass leaves out; null = no skip-layer guidance.",
             sampling="skip_layer_guidance.layers", group=True, column=False),
    RowField("skip_layer_guidance_scale", "float", None, _optional_guidance, "SD3: skip-layer guidance scale.",
             sampling="skip_layer_guidance.scale", column=False),
    RowField("skip_layer_guidance_start", "float", None, _optional_fraction,
             "SD3: fraction of the steps after which skip-layer guidance starts.",
             sampling="skip_layer_guidance.start", group=True, column=False),
    RowField("skip_layer_guidance_stop", "float", None, _optional_fraction,
             "SD3: fraction of the steps before which skip-layer guidance stops.",
             sampling="skip_layer_guidance.stop", group=True, column=False),
)
FIELD = {f.name: f for f in FIELDS}
COMMON_FIELDS = frozenset(
    ("prompt", "seed", "negative_prompt", "guidance_scale", "steps", "width", "height", "scheduler", "eta"))
GROUP_FIELDS = tuple(f.name for f in FIELDS if f.group)
MANIFEST_FIELDS = tuple(f.name for f in FIELDS if f.manifest)
# Input-only fields: a row's identity and how many samples it asks for; they never reach the model.
INPUT_FIELDS = ("id", "num_images")
COLUMN_TARGETS = (*INPUT_FIELDS, *(f.name for f in FIELDS if f.column))
IMAGE_FIELDS = ("init_image", "mask_image")  # fields that name an image the fetch stage reads
IMG2IMG_FIELDS = frozenset(("init_image", "strength", "mask_image", "init_image_sha256", "init_image_size",
                            "mask_image_sha256", "mask_image_size", "init_pixels", "mask_pixels"))


def column_fields(rules: Rules) -> set[str]:
    """The fields an input column may map to for this model (the job's reader and `batchgen.generate` alike)."""
    return {name for name in COLUMN_TARGETS if name in INPUT_FIELDS or name in rules.fields}


def arrow_type(kind: str):
    import pyarrow as pa

    return {"text": pa.string(), "int": pa.int64(), "float": pa.float64(), "pair": pa.list_(pa.int64()),
            "bytes": pa.binary(), "ints": pa.list_(pa.int64())}[kind]


def arrow_fields(names: Iterable[str] = tuple(FIELD)) -> list[tuple[str, Any]]:
    """(name, Arrow type) of the named row fields, in declaration order."""
    wanted = set(names)
    return [(f.name, arrow_type(f.kind)) for f in FIELDS if f.name in wanted]


def group_value(name: str, value: Any) -> Any:
    """The part of a field's value that decides which rows share a denoising loop."""
    return (value is not None) if FIELD[name].group == "presence" else value


def _group_key(self) -> tuple:
    """Rows with equal keys share one denoising loop."""
    return tuple(group_value(name, getattr(self, name)) for name in GROUP_FIELDS)


def _value(self, name: str) -> Any:
    """The field's value, or the default derived from the row's other fields where it is null."""
    value = getattr(self, name)
    derive = FIELD[name].derive
    return derive(self.__dict__) if value is None and derive is not None else value


REQUIRED = ("prompt", "seed")  # a request has no default for these
GenerationRequest = make_dataclass(
    "GenerationRequest",
    [(f.name, Any) if f.name in REQUIRED else (f.name, Any, field(default=f.default)) for f in FIELDS],
    frozen=True,
    namespace={"group_key": _group_key, "value": _value, "__module__": __name__,
               "__doc__": "Everything that decides one image's pixels, given the model: one attribute per row field."},
)


def request_from(values: dict[str, Any]) -> GenerationRequest:
    """A request from a work or manifest row (extra keys ignored); list fields become tuples (hashable keys)."""
    kwargs = {}
    for f in FIELDS:
        if f.name in values:
            value = values[f.name]
            kwargs[f.name] = tuple(value) if f.kind in ("pair", "ints") and value is not None else value
    return GenerationRequest(**kwargs)


def request_dict(req: GenerationRequest) -> dict[str, Any]:
    return {f.name: getattr(req, f.name) for f in fields(req)}


def validate_request(req: GenerationRequest, rules: Rules | None = None, vae_scale_factor: int = 8) -> None:
    """Raise RowError naming the first bad field; cheap, runs before any compute."""
    rules = rules or Rules(frozenset(FIELD), vae_scale_factor=vae_scale_factor)
    for f in FIELDS:
        if f.name in rules.fields:
            f.check(f.name, getattr(req, f.name), rules)
    check_together(req.__dict__, rules)


# Converting input values (Parquet gives ints for float columns, floats for int columns, lists for pairs).
def to_int(name: str, value: Any) -> int:
    if isinstance(value, bool):
        raise RowError(name, value, "must be an integer")
    if isinstance(value, float):
        if not math.isfinite(value) or value != int(value):
            raise RowError(name, value, "must be an integer")
        return int(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    raise RowError(name, value, "must be an integer")


def to_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise RowError(name, value, "must be a number")
    return float(value)


def to_pair(name: str, value: Any) -> tuple[int, int]:
    if not isinstance(value, (list, tuple, np.ndarray)) or len(value) != 2:
        raise RowError(name, value, "must be two integers")
    return (to_int(name, value[0]), to_int(name, value[1]))


def to_ints(name: str, value: Any) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple, np.ndarray)):
        raise RowError(name, value, "must be a list of integers")
    return tuple(to_int(name, v) for v in value)


# A text value is not converted: the field's check names a non-string.
CONVERT = {"text": lambda name, value: value, "int": to_int, "float": to_float, "pair": to_pair,
           "bytes": lambda name, value: value, "ints": to_ints}


def job_value(sampling: Any, path: str) -> Any:
    """The job's default for a field: SamplingSpec attribute `path` (dotted: inside a section, None where the
    section is unset)."""
    value = sampling
    for part in path.split("."):
        value = getattr(value, part, None)
        if value is None:
            return None
    return tuple(value) if isinstance(value, list) else value


def resolve_fields(values: dict[str, Any], sampling: Any, rules: Rules) -> dict[str, Any]:
    """An input row's values (field -> raw value, absent or None = unset) to the request fields the family
    uses, with defaults applied and everything checked; raises RowError naming the first bad field. Fields
    the family does not use stay out (null in work rows and manifests). `seed` is left to the reader."""
    out: dict[str, Any] = {}
    for f in FIELDS:
        if f.name == "seed" or f.name not in rules.fields:
            continue
        value = values.get(f.name)
        if value is not None:
            value = CONVERT[f.kind](f.name, value)
        elif f.sampling is not None:
            value = job_value(sampling, f.sampling)
        if value is None and f.derive is None:
            value = f.default
        out[f.name] = value
    if out.get("scheduler") == MODEL_SCHEDULER:
        out["scheduler"] = rules.model_scheduler  # recorded by name, so the manifest says what ran
    for f in FIELDS:
        if f.derive is not None and f.name in out and out[f.name] is None:
            out[f.name] = f.derive(out)
    if out.get("init_image") is not None and out.get("strength") is None:
        out["strength"] = rules.inpaint_strength if out.get("mask_image") is not None else rules.strength
    for f in FIELDS:
        if f.name in out:
            f.check(f.name, out[f.name], rules)
    check_together(out, rules)
    return out


def denoising_start(steps: int, strength: float, whole_steps: bool = True) -> int:
    """Index of the first of `steps` scheduler steps an img2img row runs, as diffusers' img2img pipelines cut it:
    SD and SDXL keep int(steps * strength) steps; SD3 keeps steps * strength and truncates the start instead."""
    kept = min(steps * strength, steps)
    return max(steps - int(kept), 0) if whole_steps else int(max(steps - kept, 0))


def check_together(values: dict[str, Any], rules: Rules) -> None:
    """The checks that involve several fields; RowError naming the field to fix."""
    for f in FIELDS:
        if f.requires and f.name in rules.fields and values.get(f.name) is not None and values.get(f.requires) is None:
            raise RowError(f.name, values[f.name], f"must be null when `{f.requires}` is")
    for name in IMAGE_FIELDS:  # an image the model cannot use would be silently ignored (a mask on SD3)
        if name not in rules.fields and values.get(name) is not None:
            raise RowError(name, values[name], f"must be null: this {rules.family} model does not use it")
    if values.get("init_image") is not None and values.get("skip_guidance_layers") is not None:
        raise RowError("skip_guidance_layers", values["skip_guidance_layers"], "must be null "
                       "(`sampling.skip_layer_guidance` unset) for a row with an init_image: diffusers' img2img "
                       "pipeline has no skip-layer guidance")
    for name in rules.needs:
        if values.get(name) is None:
            raise RowError(name, None, f"must be set: this {rules.family} checkpoint needs {' and '.join(rules.needs)}"
                           " on every row")
    strength, steps = values.get("strength"), values.get("steps")
    if "strength" in rules.fields and values.get("init_image") is not None and strength is None:
        raise RowError("strength", None, "must be set for a row with an init_image")
    whole = rules.whole_strength_steps
    if strength is not None and _is_int(steps) and denoising_start(steps, strength, whole) >= steps:
        raise RowError("strength", strength, f"leaves no denoising step at {steps} steps (needs steps x strength >= 1)")

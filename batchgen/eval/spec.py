"""The typed evaluation spec: prompt sets, seeds, arms (grid or list), the base job, scoring, report."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from batchgen.errors import JobConfigError

# Arm axis -> the job spec field it sets.
ARM_AXES = {
    "model": "model.source",
    "guidance_scale": "sampling.guidance_scale",
    "steps": "sampling.steps",
    "scheduler": "sampling.scheduler",
    "width": "sampling.width",
    "height": "sampling.height",
    "negative_prompt": "sampling.negative_prompt",
}
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=+-]{0,99}$")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PromptSetSpec(Section):
    name: str = Field(description="Names the set in row ids, statistics and the report.")
    source: str | None = Field(
        None, description="A .txt (one prompt a line, # comments), .jsonl or .parquet file (local or s3://) with a "
        "`prompt` field and optional `id` and category fields; other fields are kept as the prompt's metadata "
        "(GenEval's metadata lines, for export)."
    )
    prompts: list[str] | None = Field(None, description="Inline prompts, instead of a source file.")
    category: str | None = Field(None, description="Category of prompts that have none (default: the set's name).")
    category_field: str = Field("category", description="The source field holding a prompt's category.")

    @field_validator("name")
    @classmethod
    def _name(cls, name: str) -> str:
        if not NAME.match(name):
            raise ValueError(f"must match {NAME.pattern}")
        return name

    @model_validator(mode="after")
    def _one_source(self) -> PromptSetSpec:
        if (self.source is None) == (self.prompts is None):
            raise ValueError("give exactly one of `source` and `prompts`")
        return self


class ArmSpec(Section):
    """One arm: the settings that differ from the base job. Unset fields keep the base job's value."""

    name: str | None = Field(None, description="Default: built from the arm's settings, e.g. `g7.5-ddim`.")
    model: str | None = Field(None, description="Model source (directory, hub id, s3:// URI).")
    guidance_scale: float | None = None
    steps: int | None = None
    scheduler: str | None = None
    width: int | None = None
    height: int | None = None
    negative_prompt: str | None = None
    job: dict[str, Any] = Field(
        default_factory=dict, description="Other job fields by dotted name (family options such as a refiner "
        "split), e.g. {model.vae_batch_size: 2}."
    )

    @field_validator("name")
    @classmethod
    def _name(cls, name: str | None) -> str | None:
        if name is not None and not NAME.match(name):
            raise ValueError(f"must match {NAME.pattern}")
        return name


class ArmsSpec(Section):
    grid: dict[str, list[Any]] = Field(
        default_factory=dict, description="Axis -> values; one arm per combination. Axes: " + ", ".join(ARM_AXES)
    )
    listed: list[ArmSpec] = Field(default_factory=list, alias="list",
                                  description="`list`: arms one by one (added to the grid's).")

    @field_validator("grid")
    @classmethod
    def _axes(cls, grid: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for axis, values in grid.items():
            if axis not in ARM_AXES:
                raise ValueError(f"unknown axis {axis!r}; axes: {list(ARM_AXES)}")
            if not values or len({repr(v) for v in values}) != len(values):
                raise ValueError(f"axis {axis!r} must list distinct values, got {values}")
        return grid


class FidSpec(Section):
    reference: str = Field(description="Reference images: a folder or s3:// prefix of images or WebDataset .tar "
                           "shards.")
    extractor: str = Field(description="TorchScript feature extractor file (local or s3://): uint8 NCHW images in, "
                           "(N, D) features out, e.g. an Inception saved with torch.jit.save.")
    image_size: int = Field(299, ge=8, le=1024, description="Images are resized to this square before extraction.")
    call_kwargs: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments of each extractor call "
                                        "(e.g. {return_features: true} for StyleGAN's Inception archive).")
    kid_subsets: int = Field(100, ge=1, description="KID: random subsets averaged.")
    kid_subset_size: int = Field(1000, ge=2, description="KID: images per subset (capped at the smaller set).")


class ScoringSpec(Section):
    clip: str | None = Field(None, description="CLIPModel directory (local or s3://) for CLIP score; any CLIP "
                             "checkpoint in transformers' format (PickScore is one).")
    aesthetic: str | None = Field(None, description="Aesthetic MLP weights (safetensors, LAION predictor layout: "
                                  "Linear layers `layers.N`) over `clip`'s normalized image embeddings.")
    fid: FidSpec | None = None
    batch_size: int = Field(32, ge=1, le=4096, description="Images per scorer call.")
    actors: int = Field(1, ge=1, description="Scorer actors (each loads the scorers once).")
    gpus_per_actor: float | None = Field(None, ge=0, description="None = 1 when the cluster has GPUs, else 0.")
    cpus_per_actor: float | None = Field(None, gt=0, description="None = 1 with GPUs, else what leaves the "
                                         "fetch and write tasks half a CPU.")
    device: str = Field("auto", description="auto (CUDA when present), cpu, cuda.")

    @model_validator(mode="after")
    def _aesthetic_needs_clip(self) -> ScoringSpec:
        if self.aesthetic and not self.clip:
            raise ValueError("`aesthetic` scores CLIP image embeddings: set `clip` too")
        return self

    @property
    def empty(self) -> bool:
        return not (self.clip or self.fid)


class ReportSpec(Section):
    worst_k: int = Field(8, ge=0, le=1000, description="Lowest-scoring images shown per metric and arm.")
    thumbnail: int = Field(128, ge=16, le=1024, description="Thumbnail side in pixels.")
    bootstrap: int = Field(2000, ge=100, le=100_000, description="Bootstrap resamples for the 95% intervals.")
    bootstrap_seed: int = Field(0, ge=0, description="Seed of the bootstrap: the same scores give the same intervals.")


class EvalSpec(Section):
    output: str = Field(description="Root of the evaluation: arms/<arm>/ (each an ordinary job output), _eval/ "
                        "(prompt table, arms, statistics), report/.")
    prompts: list[PromptSetSpec] = Field(min_length=1)
    seeds: list[int] = Field(min_length=1, description="Every prompt is generated once per seed in every arm, with "
                             "the same noise: comparisons between arms are paired.")
    arms: ArmsSpec
    baseline: str | None = Field(None, description="Arm that the others are compared with (default: the first).")
    job: dict[str, Any] = Field(default_factory=dict, description="The base job spec (model, sampling, output, "
                                "compute sections as in a job spec); each arm overrides its own fields.")
    scoring: ScoringSpec = ScoringSpec()
    report: ReportSpec = ReportSpec()

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) != len(seeds) or min(seeds) < 0:
            raise ValueError(f"must be distinct integers >= 0, got {seeds}")
        return seeds

    @field_validator("prompts")
    @classmethod
    def _set_names(cls, sets: list[PromptSetSpec]) -> list[PromptSetSpec]:
        names = [s.name for s in sets]
        if len(set(names)) != len(names):
            raise ValueError(f"prompt set names must be distinct, got {names}")
        return sets

    @model_validator(mode="after")
    def _some_arm(self) -> EvalSpec:
        if not self.arms.grid and not self.arms.listed:
            raise ValueError("`arms` needs a `grid` or a `list`")
        return self


def _describe(error: ValidationError, source: str) -> str:
    lines = []
    for item in error.errors():
        field = ".".join(str(p) for p in item["loc"])
        shown = repr(item.get("input"))
        shown = shown[:77] + "..." if len(shown) > 80 else shown
        lines.append(f"{source}: `{field}` {item['msg'].lower()} (got {shown})")
    return "\n".join(lines)


def load_eval_spec(path: str | Path) -> EvalSpec:
    """Read and validate an evaluation spec (relative paths in it are taken from the working directory, as in a
    job spec)."""
    try:
        tree = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise JobConfigError(f"cannot read eval spec {str(path)!r}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise JobConfigError(f"eval spec {str(path)!r} is not valid YAML: {e}") from None
    if not isinstance(tree, dict):
        raise JobConfigError(f"eval spec {str(path)!r} must be a mapping, got {type(tree).__name__}")
    return parse_eval_spec(tree, str(path))


def parse_eval_spec(tree: dict[str, Any], source: str = "eval spec") -> EvalSpec:
    try:
        return EvalSpec.model_validate(tree)
    except ValidationError as e:
        raise JobConfigError(_describe(e, source)) from None


def parse_scoring(tree: dict[str, Any], source: str = "scoring spec") -> ScoringSpec:
    """A scoring section alone (for `batchgen score`), or the `scoring` key of an eval spec."""
    if "scoring" in tree and isinstance(tree["scoring"], dict):
        tree = tree["scoring"]
    try:
        return ScoringSpec.model_validate(tree)
    except ValidationError as e:
        raise JobConfigError(_describe(e, source)) from None

"""The typed job spec: input, model, sampling defaults, output, compute; validated before Ray starts."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from batchgen.errors import JobConfigError
from batchgen.models.schedulers import ALL_NAMES, MODEL_SCHEDULER
from batchgen.models.tiny import FAMILIES as TINY_FAMILIES
from batchgen.rows import COLUMN_TARGETS, FIELD, MAX_T5_TOKENS

DEMO_PROMPTS = str(Path(__file__).resolve().parent / "data" / "demo_prompts.parquet")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InputSpec(Section):
    prompts: str = Field(
        DEMO_PROMPTS,
        description="Parquet prompt table: a file, a directory, a glob, or an s3:// URI of any of those. "
        "Default: the 50-prompt demo table shipped with the package.",
    )
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="Input column -> batchgen field, e.g. {caption: prompt}. Fields: " + ", ".join(COLUMN_TARGETS),
    )
    rows_per_read: int = Field(
        1024, ge=1, description="Rows read per Parquet batch; bounds the reader's memory per task."
    )
    fetch_tasks: int = Field(
        2, ge=1, le=1024, description="Init-image/mask fetch tasks in flight (one generator call's rows each)."
    )
    fetch_workers: int = Field(8, ge=1, le=256, description="Parallel image reads per fetch task.")
    max_image_bytes: int = Field(
        50 * 2**20, ge=1, description="Larger init images and masks become error rows (bounds fetch memory)."
    )
    max_image_pixels: int = Field(
        8192 * 8192, ge=1, description="Init images and masks with more pixels become error rows (decode memory)."
    )

    @field_validator("columns")
    @classmethod
    def _known_fields(cls, columns: dict[str, str]) -> dict[str, str]:
        for source, target in columns.items():
            if target not in COLUMN_TARGETS:
                raise ValueError(f"column {source!r} maps to unknown field {target!r}; fields: {list(COLUMN_TARGETS)}")
        return columns


class RefinerSpec(Section):
    source: str = Field(description="SDXL refiner: local diffusers directory, hub id, or s3:// URI.")
    revision: str | None = Field(None, description="Hub revision for a hub id.")
    start: float = Field(0.8, gt=0, lt=1, description="Fraction of the schedule the base denoises before the "
                         "refiner continues from its latents (diffusers' denoising_end / denoising_start).")


class ModelSpec(Section):
    source: str = Field(
        "models/tiny-sd15", description="Local diffusers directory, hub id, or s3:// URI of a diffusers directory."
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) for a hub id.")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="Weights dtype; auto = float16 on CUDA, float32 on CPU."
    )
    device: str = Field("auto", description="auto (CUDA when present), cpu, cuda, cuda:N.")
    allow_pickle: bool = Field(False, description="Accept pickle (.bin/.ckpt) weights; they can run code on load.")
    refiner: RefinerSpec | None = Field(
        None, description="A refiner that finishes the base's images (SDXL base + refiner); the same actor holds "
        "both, loading components they share once.")
    text_encoder_3: bool = Field(
        True, description="SD3: load the T5 encoder. false drops it (its embeddings are zeros, as in diffusers): "
        "about 9.5 GB less accelerator memory at 16-bit on SD3/SD3.5 checkpoints, some loss of prompt adherence "
        "(text rendering most). Manifests record it as a dropped component.")
    text_encoder_3_device: str | None = Field(
        None, description="SD3: device for the T5 encoder (e.g. cpu when it does not fit beside the transformer); "
        "None = the model's device. On CPU it runs in the model's dtype and costs CPU time per distinct text "
        "(see README); pixels match to the precision of the two devices' kernels.")
    make_tiny_if_missing: Literal[TINY_FAMILIES] | None = Field(
        None, description="Build a tiny random-weight model of this family at `source` if it does not exist (demo)."
    )
    vae_batch_size: int | None = Field(
        None, ge=1, description="Decode latents in sub-batches of this size (bounds the VAE's peak memory); "
        "None = the whole batch at once. Pixels are identical either way."
    )
    channels_last: bool | None = Field(
        None, description="Keep UNet and VAE weights in channels_last (NHWC) memory format; None = on CUDA only."
    )
    compile_denoiser: bool = Field(
        False, description="torch.compile the denoiser: the first batch of each shape pays the compile (a minute "
        "or more on GPU), later batches run faster. Off by default."
    )


class SkipLayerGuidanceSpec(Section):
    """Skip-layer guidance (SD3.5-medium): for rows that use CFG, inside the step window, also push away from
    a pass of the conditional branch without these transformer blocks. Defaults: diffusers'."""

    layers: list[int] = Field(min_length=1, description="Transformer blocks to skip, e.g. [7, 8, 9] on SD3.5-medium.")
    scale: float = Field(2.8, ge=0, description="Skip-layer guidance scale.")
    start: float = Field(0.01, ge=0, le=1, description="Applied at steps i with steps x start < i < steps x stop.")
    stop: float = Field(0.2, ge=0, le=1, description="End of the window, as a fraction of the steps.")

    @model_validator(mode="after")
    def _window(self) -> SkipLayerGuidanceSpec:
        if self.start >= self.stop:
            raise ValueError(f"`start` ({self.start}) must be below `stop` ({self.stop})")
        return self


class SamplingSpec(Section):
    """Defaults for rows whose table has no column for the field."""

    steps: int = Field(FIELD["steps"].default, ge=1, le=1000, description="Denoising steps.")
    guidance_scale: float = Field(FIELD["guidance_scale"].default, ge=0,
                                  description="Classifier-free guidance; <= 1 disables it.")
    scheduler: str = Field(
        FIELD["scheduler"].default, description=f"{MODEL_SCHEDULER} (the checkpoint's own configured scheduler) or "
        "one of: " + ", ".join(ALL_NAMES[1:]) + "; the model's family may accept fewer (checked at plan time).")
    width: int = Field(FIELD["width"].default, ge=8, le=4096, description="Image width in pixels, a multiple of 8.")
    height: int = Field(FIELD["height"].default, ge=8, le=4096,
                        description="Image height in pixels, a multiple of 8.")
    negative_prompt: str = Field(FIELD["negative_prompt"].default, description="Negative prompt for rows without one.")
    eta: float = Field(FIELD["eta"].default, ge=0,
                       description="DDIM eta (noise in DDIM steps); ignored by other schedulers.")
    seed: int = Field(0, ge=0, description="Job seed: rows without a seed get one derived from (seed, id, sample).")
    num_images: int = Field(1, ge=1, le=10_000, description="Images per row for rows without num_images.")
    max_sequence_length: int | None = Field(
        None, ge=1, le=MAX_T5_TOKENS, description="SD3: T5 tokens per text (padded or truncated to this; images "
        f"depend on it); None = {FIELD['max_sequence_length'].default}. Other families refuse it.")
    skip_layer_guidance: SkipLayerGuidanceSpec | None = Field(
        None, description="SD3: skip-layer guidance options; None = off. Other families refuse it.")

    @field_validator("scheduler")
    @classmethod
    def _known_scheduler(cls, name: str) -> str:
        if name not in ALL_NAMES:
            raise ValueError(f"must be one of {list(ALL_NAMES)}")
        return name

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_8(cls, side: int) -> int:
        if side % 8:
            raise ValueError("must be a multiple of 8")
        return side

    @field_validator("guidance_scale", "eta")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("must be finite")
        return value


class OutputSpec(Section):
    uri: str = Field("out/demo", description="Local directory or s3://bucket/prefix for images and manifests.")
    format: Literal["png", "jpeg", "webp"] = Field("png", description="Image file format.")
    layout: Literal["files", "webdataset", "parquet"] = Field(
        "files", description="files: one object per image under images/; webdataset: tar shards under shards/ "
        "({key}.{ext}, {key}.json, {key}.txt per sample); parquet: Parquet shards under shards/ with the image "
        "bytes in an `image` column beside the manifest fields. Shards suit training loaders and cost far fewer "
        "objects; see batchgen/writers."
    )
    shard_samples: int = Field(
        1000, ge=1, le=1_000_000, description="Most samples per shard (shard layouts): a store call takes this "
        "many generated rows and writes them as one shard."
    )
    shard_bytes: int = Field(
        512 * 2**20, ge=1, description="A shard rolls over to a new one once its image bytes reach this."
    )
    quality: int = Field(90, ge=1, le=100, description="JPEG/WebP quality (ignored for PNG).")
    retry_deadline_s: float = Field(
        300.0, gt=0, description="How long one storage operation may keep retrying before the job fails."
    )
    upload_workers: int = Field(16, ge=1, le=256, description="Parallel uploads per storage task.")
    retry_errors: bool = Field(True, description="On resume, regenerate rows whose last attempt was an error.")
    lease_timeout_s: float = Field(
        120.0, gt=0, description="A run holding this output's lease heartbeats every quarter of this; a lease not "
        "heartbeaten for this long is stale and the next run takes it over (README: One writer per output)."
    )
    override_fingerprint: bool = Field(
        False, description="Continue into an output made with different pixel-changing settings, mixing its "
        "images knowingly; the override and the old fingerprint are recorded under _batchgen/overrides/."
    )


class ComputeSpec(Section):
    address: str | None = Field(None, description="Ray cluster address; None = RAY_ADDRESS or a local Ray.")
    batch_size: int = Field(8, ge=1, le=1024, description="Rows per denoising loop (the model's batch).")
    batches_per_call: int = Field(
        4, ge=1, le=64, description="Model batches per generator actor call (rows per Ray task = batch_size x "
        "this): amortizes Ray's per-task cost and lets a batch's device-to-host copy overlap the next; the "
        "first image is stored after this many batches."
    )
    read_ahead_calls: int = Field(
        16, ge=1, le=1_000_000, description="Calls' worth of prompt rows per generator actor that the reader may hold "
        "ready beyond those already handed to actors; bounds the driver's memory however big the input."
    )
    read_tasks: int = Field(
        2, ge=1, le=1024, description="Prompt read tasks in flight (one Parquet row group each); with "
        "read_ahead_calls it bounds how far the reader runs ahead."
    )
    min_actors: int = Field(1, ge=1, description="Generator actors kept alive.")
    max_actors: int | None = Field(
        None, ge=1, description="Most generator actors; None = one per GPU, or min_actors on CPU-only clusters."
    )
    gpus_per_actor: float | None = Field(None, ge=0, description="None = 1 when the cluster has GPUs, else 0.")
    cpus_per_actor: float | None = Field(
        None, gt=0, description="None = 1 with GPUs; on CPU-only clusters a share that leaves room for other stages."
    )
    torch_threads: int | None = Field(None, ge=1, description="Torch threads per actor; None = from the CPU share.")
    cpus_per_storage_task: float = Field(0.25, gt=0, description="CPUs reserved per encode+upload task.")
    cpu_stage_nice: int = Field(
        15, ge=0, le=19, description="Niceness of the worker processes that read prompts and encode+store images, "
        "so that where they share cores with a generator (its torch threads on CPU, the thread feeding a GPU) the "
        "generator wins; they have queued work to catch up on. 0 = leave them as Ray started them."
    )
    accelerator_resource: str | None = Field(
        None, description="Custom Ray resource the generator actors require (1 unit each), e.g. to pin to nodes."
    )
    no_progress_timeout_s: float = Field(
        600.0, gt=0, description="Fail the job when no block completes for this long (a hung stage)."
    )
    window_rows: int | None = Field(
        200_000, ge=0, description="An input with more rows runs as consecutive windows of whole row groups of at "
        "most this many rows, each its own Ray Data execution in a short-lived process, so the driver's memory "
        "does not grow with the input (batchgen.windows); each window starts its generator actors anew (the "
        "model loads once per window). 0 or None = one execution."
    )


class JobSpec(Section):
    input: InputSpec = InputSpec()
    model: ModelSpec = ModelSpec()
    sampling: SamplingSpec = SamplingSpec()
    output: OutputSpec = OutputSpec()
    compute: ComputeSpec = ComputeSpec()


def _describe(error: ValidationError, source: str) -> str:
    lines = []
    for item in error.errors():
        field = ".".join(str(p) for p in item["loc"])
        shown = repr(item.get("input"))
        if len(shown) > 80:
            shown = shown[:77] + "..."
        lines.append(f"{source}: `{field}` {item['msg'].lower()} (got {shown})")
    return "\n".join(lines)


def _set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for part in parents:
        if node.get(part) is None:  # absent, or an optional section written out as null (model.refiner)
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            raise JobConfigError(f"spec: `{part}` must be a mapping to set {dotted}")
    node[leaf] = value


def load_spec(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> JobSpec:
    """Read a YAML spec (or the embedded defaults), apply dotted overrides, validate everything."""
    tree: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except OSError as e:
            raise JobConfigError(f"cannot read job spec {source!r}: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise JobConfigError(f"job spec {source!r} is not valid YAML: {e}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise JobConfigError(f"job spec {source!r} must be a mapping, got {type(loaded).__name__}")
        tree = loaded or {}
    for dotted, value in (overrides or {}).items():
        if value is not None:
            _set_path(tree, dotted, value)
    try:
        return JobSpec.model_validate(tree)
    except ValidationError as e:
        raise JobConfigError(_describe(e, source)) from None


def dump_spec(spec: JobSpec) -> str:
    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)

"""Load a diffusion pipeline (local directory, hub id or s3:// URI) with its family adapter: safetensors only, no
remote code."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from batchgen.errors import ModelLoadError
from batchgen.models.families import family_for
from batchgen.models.source import model_source

if TYPE_CHECKING:  # torch is imported where a model is loaded: the driver only checks and hashes directories
    import torch

    from batchgen.models.adapter import FamilyAdapter

logger = logging.getLogger(__name__)

DTYPES = ("float32", "float16", "bfloat16")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth")
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")


@dataclass
class LoadedModel:
    """A pipeline on its device, its family adapter and what identifies it in manifests."""

    pipe: Any
    adapter: FamilyAdapter
    source: str
    revision: str | None
    weights_sha256: str
    device: torch.device
    dtype: torch.dtype
    refiner_sha256: str | None = None


def resolve_device(device: str = "auto") -> torch.device:
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    import torch

    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ModelLoadError(f"`dtype` must be one of {['auto', *DTYPES]} but is {dtype!r}")
    return getattr(torch, dtype)


def check_model_dir(path: Path, allow_pickle: bool = False) -> None:
    """Fail with the missing part named before any weights are read."""
    if not path.is_dir():
        raise ModelLoadError(f"model directory {str(path)!r} does not exist or is not a directory")
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise ModelLoadError(f"model directory {str(path)!r} has no model_index.json (not a diffusers pipeline)")
    try:
        index = json.loads(index_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{str(index_file)!r} is not valid JSON: {e}") from None
    for component, spec in index.items():
        if component.startswith("_") or not isinstance(spec, list) or spec[0] is None:
            continue
        sub = path / component
        if not sub.is_dir():
            raise ModelLoadError(f"model directory {str(path)!r} lists component {component!r} but has no {component}/")
        weights = [f for f in sub.iterdir() if f.name.endswith(WEIGHT_SUFFIXES)]
        if not weights:
            # Models save config.json; tokenizers, schedulers and feature extractors save other configs and
            # carry no weights. A model without weights would fail in every actor, after Ray started.
            if (sub / "config.json").is_file():
                raise ModelLoadError(f"component {component!r} in {str(path)!r} has a config.json but no weights "
                                     f"file ({', '.join(WEIGHT_SUFFIXES)}) in {component}/")
            continue
        if not allow_pickle and not any(f.name.endswith(".safetensors") for f in weights):
            names = sorted(f.name for f in weights)
            raise ModelLoadError(
                f"component {component!r} in {str(path)!r} has only pickle weights {names}; "
                "batchgen loads safetensors only (set model.allow_pickle: true to accept pickle, at your own risk)"
            )


def weights_sha256(path: Path) -> str:
    """sha256 over every weight and config file (names and bytes): identifies the pixels' source."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".json", ".txt", *WEIGHT_SUFFIXES))
    for file in files:
        digest.update(str(file.relative_to(path)).encode())
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                digest.update(chunk)
    return digest.hexdigest()


SHARED_WITH_REFINER = ("text_encoder_2", "vae")


def load_model(
    source: str,
    *,
    revision: str | None = None,
    dtype: str = "auto",
    device: str = "auto",
    allow_pickle: bool = False,
    vae_batch_size: int | None = None,
    channels_last: bool | None = None,
    compile_denoiser: bool = False,
    expected_sha256: str | None = None,
    refiner: dict[str, Any] | None = None,
    skip_components: tuple[str, ...] = (),
    component_devices: dict[str, str] | None = None,
) -> LoadedModel:
    """Load a pipeline from a local directory, an s3:// URI (staged once per node) or the hub (cached by
    huggingface_hub), with its family adapter. `refiner` ({source, revision, start, expected_sha256}) loads a
    refiner that finishes the base's images; components whose files equal the base's are loaded once.
    `skip_components` are not loaded at all (the pipeline gets None); `component_devices` puts named components
    on another device than the rest (same dtype)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    if allow_pickle:
        logger.warning("model.allow_pickle is set: pickle checkpoints can run arbitrary code when loaded")
    pipe, root = _load_pipeline(source, revision, torch_dtype, torch_device, allow_pickle, expected_sha256,
                                **dict.fromkeys(skip_components))
    for name, where_to in (component_devices or {}).items():
        getattr(pipe, name).to(resolve_device(where_to))
    try:
        family = family_for(type(pipe).__name__)
    except ValueError as e:
        raise ModelLoadError(f"model {source!r}: {e}") from None
    options: dict[str, Any] = {}
    refiner_digest = None
    if refiner:
        refiner_pipe, refiner_root = _load_refiner(pipe, root, refiner, family, torch_dtype, torch_device,
                                                   allow_pickle)
        options = {"refiner": refiner_pipe, "refiner_start": refiner["start"]}
        refiner_digest = weights_sha256(refiner_root) if refiner_root.is_dir() else ""
    adapter = family.adapter_class()(pipe, family, vae_batch_size=vae_batch_size, channels_last=channels_last,
                                     compile_denoiser=compile_denoiser, **options)
    digest = weights_sha256(root) if root.is_dir() else ""
    logger.info("loaded %s (%s, %s) on %s, weights sha256 %s", source, type(pipe).__name__, torch_dtype,
                torch_device, digest[:12])
    return LoadedModel(pipe, adapter, source, revision, digest, torch_device, torch_dtype, refiner_digest)


def _load_pipeline(source: str, revision: str | None, torch_dtype: torch.dtype, torch_device: torch.device,
                   allow_pickle: bool, expected_sha256: str | None, **components: Any) -> tuple[Any, Path]:
    """One pipeline on its device and the local directory its files are in; `components` are already loaded
    modules to use instead of reading them again."""
    import torch
    from diffusers import DiffusionPipeline

    where = model_source(source, revision)
    if where.kind == "s3":
        from batchgen.models.staging import stage_model

        where = model_source(str(stage_model(source, expected_sha256=expected_sha256)))
    no_checker = {"safety_checker": None, "requires_safety_checker": False}  # for SD 1.x/2.x, which list one
    if where.kind == "local":
        check_model_dir(where.path, allow_pickle)
        if "safety_checker" not in json.loads((where.path / "model_index.json").read_text()):
            no_checker = {}
    try:
        pipe = DiffusionPipeline.from_pretrained(
            str(where.path) if where.kind == "local" else source,
            revision=where.revision,
            dtype=torch_dtype,
            use_safetensors=None if allow_pickle else True,
            **no_checker,
            **components,
        )
    except (OSError, ValueError) as e:
        kind = "local directory" if where.kind == "local" else "hub id (no such local directory either)"
        raise ModelLoadError(f"cannot load model {source!r} as a {kind}: {e}") from e
    # VAEs that overflow in half precision say so (SDXL's): they decode in float32 (the adapter casts latents).
    if "vae" not in components and getattr(pipe.vae.config, "force_upcast", False) and torch_dtype == torch.float16:
        pipe.vae.to(torch.float32)
    pipe.to(torch_device)
    pipe.set_progress_bar_config(disable=True)
    return pipe, where.path if where.kind == "local" else Path(pipe.config._name_or_path)


def _load_refiner(base: Any, base_root: Path, refiner: dict[str, Any], family: Any, torch_dtype: torch.dtype,
                  torch_device: torch.device, allow_pickle: bool) -> tuple[Any, Path]:
    """The refiner pipeline, sharing the base's text_encoder_2 and VAE where their files are identical."""
    source = refiner["source"]
    where = model_source(source, refiner.get("revision"))
    if where.kind == "s3":
        from batchgen.models.staging import stage_model

        where = model_source(str(stage_model(source, expected_sha256=refiner.get("expected_sha256"))))
    shared = {}
    if where.kind == "local":
        for name in SHARED_WITH_REFINER:
            if (base_root / name).is_dir() and weights_sha256(base_root / name) == weights_sha256(where.path / name):
                shared[name] = getattr(base, name)
    pipe, root = _load_pipeline(str(where.path) if where.kind == "local" else source, refiner.get("revision"),
                                torch_dtype, torch_device, allow_pickle, None, **shared)
    if type(pipe).__name__ not in family.refiner_pipelines:
        raise ModelLoadError(f"refiner {source!r} is a {type(pipe).__name__}, not one of {family.refiner_pipelines}")
    logger.info("loaded refiner %s; shared with the base: %s", source, sorted(shared) or "nothing")
    return pipe, root

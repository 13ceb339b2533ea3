"""Resume safety: the fingerprint of everything that changes pixels, stored once per output, and its check."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from batchgen.errors import JobConfigError
from batchgen.spec import JobSpec
from batchgen.storage import NotFound, Storage

logger = logging.getLogger(__name__)

FINGERPRINT_KEY = "_batchgen/fingerprint.json"
OVERRIDES_PREFIX = "_batchgen/overrides/"
SEED_POLICY = "row seed + sample index, else sha256(job seed, id, sample index)[:8]"
UNRESOLVED = "(resolved once the cluster is known)"

# The fingerprint is every spec field except these, so a field added to any section later is covered
# unless it is listed here. Each says where or how fast a job runs, never what an (id, sample) looks like:
# performance knobs (vae_batch_size, channels_last, compile_denoiser and the whole compute section, batch
# size included) change pixels at most within the tolerance that batch composition already has (README,
# "Reproducible"). input.prompts is replaced by the input's identity, model.source by the weights' hash (which
# also covers what allow_pickle merely permits to load).
NOT_FINGERPRINTED = {
    "input": {"prompts", "rows_per_read"},
    "model": {"source", "make_tiny_if_missing", "allow_pickle", "vae_batch_size", "channels_last",
              "compile_denoiser"},
    "output": {"uri", "retry_deadline_s", "upload_workers", "retry_errors", "lease_timeout_s",
               "override_fingerprint", "shard_samples", "shard_bytes"},
}
NOT_FINGERPRINTED_SECTIONS = {"compute"}


def placement(spec: JobSpec, gpus_per_actor: float | None) -> tuple[str | None, str | None]:
    """(device class, dtype) the generator actors will use, resolved as loading.resolve_device/resolve_dtype
    resolve them on an actor: `auto` is CUDA exactly when the actor was given a GPU (Ray hides GPUs from an
    actor without one). None where that depends on a cluster not yet known (`auto` without gpus_per_actor)."""
    device = spec.model.device
    if device != "auto":
        device_class: str | None = device.split(":")[0]
    elif gpus_per_actor is not None:
        device_class = "cuda" if gpus_per_actor > 0 else "cpu"
    else:
        device_class = None
    if spec.model.dtype != "auto":
        return device_class, spec.model.dtype
    return device_class, None if device_class is None else "float16" if device_class == "cuda" else "float32"


def fingerprint(spec: JobSpec, model: Any, input_files: dict[str, str], gpus_per_actor: float | None
                ) -> dict[str, Any]:
    """Fields whose change would give different images for the same (id, sample), derived from the spec."""
    tree = {name: section for name, section in spec.model_dump(mode="json").items()
            if name not in NOT_FINGERPRINTED_SECTIONS}
    for section, names in NOT_FINGERPRINTED.items():
        for name in names:
            tree[section].pop(name, None)
    device_class, dtype = placement(spec, gpus_per_actor)
    # Weights are identified by their hash; the path only matters where there is none (a hub id).
    tree["model"].update(source=None if model.sha256 else model.source, sha256=model.sha256,
                         device=device_class or UNRESOLVED, dtype=dtype or UNRESOLVED)
    # Every other weights hash the model facts carry (a refiner's), so a new model part is covered too; where
    # there is one, the refiner's path does not matter either.
    tree["model"].update({name: value for name, value in vars(model).items()
                          if name.endswith("sha256") and name != "sha256" and value})
    if tree["model"].get("refiner") and getattr(model, "refiner_sha256", None):
        tree["model"]["refiner"]["source"] = None
    tree["input"]["files"] = input_files
    if spec.output.format == "png":
        tree["output"].pop("quality")  # PNG is lossless: quality changes nothing
    tree["seed_policy"] = SEED_POLICY
    return tree


def with_placement(current: dict[str, Any], spec: JobSpec, gpus_per_actor: float) -> dict[str, Any]:
    """The fingerprint with the device class and dtype the actors resolve once the cluster is sized."""
    device_class, dtype = placement(spec, gpus_per_actor)
    return {**current, "model": {**current["model"], "device": device_class, "dtype": dtype}}


def _differences(old: Any, new: Any, path: str = "") -> list[tuple[str, Any, Any]]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            out += _differences(old.get(key), new.get(key), f"{path}.{key}" if path else key)
        return out
    return [] if old == new or new == UNRESOLVED else [(path, old, new)]


def check_fingerprint(storage: Storage, current: dict[str, Any], *, override: bool = False, epoch: int = 0,
                      run_id: str = "", record: bool = True) -> list[str]:
    """Refuse to mix images made differently in one output, naming each field that differs; record the
    fingerprint on first use. Input files added since are allowed (they hold new rows; changed or removed ones
    are differences). With `override` a difference is accepted: the new fingerprint replaces the old and the
    override is recorded under _batchgen/overrides/. Fields still UNRESOLVED are checked on a later call; with
    `record=False` nothing is written. Returns the overridden differences."""
    try:
        stored = json.loads(storage.get(FINGERPRINT_KEY))
    except NotFound:
        if record and _resolved(current):
            storage.put_if_absent(FINGERPRINT_KEY, _encode(current), "application/json")
        return []
    differences = [(path, a, b) for path, a, b in _differences(stored, current)
                   if not (path.startswith("input.files.") and a is None)]
    lines = [f"{path}: {a!r} in the output, {b!r} now" for path, a, b in differences]
    if not differences:
        added = sorted(set(current.get("input", {}).get("files", {})) - set(stored.get("input", {}).get("files", {})))
        if added and record and _resolved(current):
            logger.info("input files added since the output was made: %s", added[:10])
            storage.put(FINGERPRINT_KEY, _encode(current), "application/json")
        if record:
            logger.info("resuming into %s (fingerprint matches)", storage.uri)
        return []
    if not override:
        raise JobConfigError(
            f"output {storage.uri!r} was made with different settings; use a new output, the same settings, or "
            f"`output.override_fingerprint` (--override-fingerprint) to mix them knowingly:\n  " + "\n  ".join(lines)
        )
    if record and _resolved(current):
        logger.warning("output.override_fingerprint: continuing into %s despite:\n  %s", storage.uri,
                       "\n  ".join(lines))
        entry = {"run_id": run_id, "epoch": epoch, "at": time.time(), "differences": lines,
                 "previous": stored}
        storage.put(f"{OVERRIDES_PREFIX}{epoch:010d}.json", _encode(entry), "application/json")
        storage.put(FINGERPRINT_KEY, _encode(current), "application/json")
    return lines


def _resolved(current: dict[str, Any]) -> bool:
    return UNRESOLVED not in (current["model"]["device"], current["model"]["dtype"])


def _encode(value: Any) -> bytes:
    return json.dumps(value, indent=2, sort_keys=True).encode()

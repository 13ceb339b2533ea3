"""Resume safety: the fingerprint of everything that changes pixels, stored once per output."""

from __future__ import annotations

import json
import logging
from typing import Any

from batchgen.errors import JobConfigError
from batchgen.spec import JobSpec
from batchgen.storage import NotFound, Storage

logger = logging.getLogger(__name__)

FINGERPRINT_KEY = "_batchgen/fingerprint.json"
SEED_POLICY = "row seed + sample index, else sha256(job seed, id, sample index)[:8]"


def fingerprint(spec: JobSpec, model: Any) -> dict[str, Any]:
    """Fields whose change would give different images for the same (id, sample)."""
    return {
        # Weights are identified by their hash; the path only matters where there is none (a hub id).
        "model.source": None if model.sha256 else model.source,
        "model.revision": model.revision,
        "model.sha256": model.sha256,
        "model.dtype": spec.model.dtype,
        "sampling": spec.sampling.model_dump(mode="json"),
        "input.columns": dict(sorted(spec.input.columns.items())),
        "seed_policy": SEED_POLICY,
        "output.format": spec.output.format,
        "output.quality": spec.output.quality if spec.output.format != "png" else None,
    }


def _differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} in the output, {b!r} now")
    return out


def check_fingerprint(storage: Storage, current: dict[str, Any]) -> None:
    """Refuse to mix images made differently in one output; record the fingerprint on first use."""
    try:
        stored = json.loads(storage.get(FINGERPRINT_KEY))
    except NotFound:
        storage.put(FINGERPRINT_KEY, json.dumps(current, indent=2, sort_keys=True).encode(), "application/json")
        return
    differences = _differences(stored, current)
    if differences:
        raise JobConfigError(
            f"output {storage.uri!r} was made with different settings; use a new output or the same settings:\n  "
            + "\n  ".join(differences)
        )
    logger.info("resuming into %s (fingerprint matches)", storage.uri)

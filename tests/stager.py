"""Child-process side of the concurrent staging test; imports only the staging code (no torch), so that
several processes start fast enough to really race."""

from __future__ import annotations

import hashlib
from pathlib import Path

from batchgen.models.staging import stage_model


def tree_sha256(root: Path) -> str:
    """sha256 over every file's relative path and bytes."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def stage_in_process(uri: str, cache: str, barrier) -> tuple[str, str]:
    barrier.wait()  # every process asks at the same moment, as actors starting together on one node do
    path = stage_model(uri, cache)
    return str(path), tree_sha256(path)

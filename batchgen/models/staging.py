"""Stage an s3:// diffusers directory into a node-local cache, once per node, and hash it without downloading."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from filelock import FileLock, Timeout

from batchgen.errors import ModelLoadError, StorageError
from batchgen.storage import ObjectInfo, S3Storage, open_storage

logger = logging.getLogger(__name__)

CACHE_ENV = "BATCHGEN_MODEL_CACHE"
COMPLETE_MARKER = "COMPLETE"  # written last: its presence means `model/` holds every listed object
MODEL_DIR = "model"
FILES_AT_ONCE = 4  # a model is a few large weight files and many small configs
LOCK_TIMEOUT_S = 3600.0  # a waiter gives up after this long; a crashed downloader's lock is freed at once


def default_cache_dir() -> Path:
    """$BATCHGEN_MODEL_CACHE, else $XDG_CACHE_HOME/batchgen/models, else ~/.cache/batchgen/models."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "batchgen" / "models"


def list_model(uri: str) -> tuple[S3Storage, list[ObjectInfo]]:
    """The objects under an s3:// model prefix, sorted by key; fails naming the URI when it is not a model."""
    if not uri.startswith("s3://"):
        raise ModelLoadError(f"model source {uri!r} is not an s3:// URI")
    storage = open_storage(uri)
    assert isinstance(storage, S3Storage)
    try:
        # Keys ending in "/" are the empty "folder" objects some tools create; they hold no file.
        objects = sorted((o for o in storage.list_objects() if not o.key.endswith("/")), key=lambda o: o.key)
    except StorageError as e:
        raise ModelLoadError(f"cannot list model {uri!r}: {e}") from e
    if not objects:
        raise ModelLoadError(f"model {uri!r} has no objects under s3://{storage.bucket}/{storage.prefix}/")
    if not any(o.key == "model_index.json" for o in objects):
        names = [o.key for o in objects[:10]]
        raise ModelLoadError(f"model {uri!r} has no model_index.json (not a diffusers pipeline); found {names}")
    for info in objects:
        if {"", ".", ".."} & set(info.key.split("/")):
            raise ModelLoadError(f"model {uri!r} holds key {info.key!r}, which is not a safe relative path")
    return storage, objects


def listing_sha256(objects: list[ObjectInfo]) -> str:
    digest = hashlib.sha256()
    for info in objects:
        digest.update(f"{info.key}\t{info.size}\t{info.etag}\n".encode())
    return digest.hexdigest()


def remote_model_sha256(uri: str) -> str:
    """sha256 over the sorted (key, size, ETag) listing under `uri`: one LIST request, no weights read.

    It identifies the remote weights for manifests and the resume fingerprint: any re-upload of a file
    changes its ETag. An ETag is the MD5 of the bytes only for single-part uploads (multipart ETags are
    derived from the part MD5s and depend on the part size), so the same weights uploaded another way can
    hash differently; it never hashes equal for different bytes short of an MD5 collision. Keys are taken
    relative to the prefix, so a copy made with server-side copy (same ETags) hashes the same anywhere."""
    return listing_sha256(list_model(uri)[1])


def stage_model(uri: str, cache_dir: str | Path | None = None, expected_sha256: str | None = None) -> Path:
    """Download the model at `uri` into this node's cache, once, and return the local diffusers directory.

    The cache entry is named by the URI and the listing hash, so a changed remote model gets a new entry.
    Several processes may call this at once (actors starting together on one node): a file lock lets one
    download into a temp dir that is renamed into place, then marked complete; the others wait and reuse it.
    The cache should be on a node-local disk (file locks are unreliable on some network filesystems); entries
    are never evicted. With `expected_sha256` (what the driver recorded for the manifests), a model replaced
    since then is refused rather than staged: its images would be attributed to other weights."""
    storage, objects = list_model(uri)
    digest = listing_sha256(objects)
    if expected_sha256 and digest != expected_sha256:
        raise ModelLoadError(
            f"model {uri!r} changed since the job started: listing sha256 {digest[:16]}, expected "
            f"{expected_sha256[:16]}; rerun the job to record the new weights"
        )
    entry = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    entry = entry / hashlib.sha256(f"{uri}\n{digest}".encode()).hexdigest()[:32]
    target = entry / MODEL_DIR
    if (entry / COMPLETE_MARKER).is_file():
        return target
    entry.mkdir(parents=True, exist_ok=True)
    lock = FileLock(entry / ".lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        logger.info("waiting for another process on this node to stage %s", uri)
        try:
            lock.acquire(timeout=LOCK_TIMEOUT_S)
        except Timeout:
            raise StorageError(f"staging {uri!r}: waited {LOCK_TIMEOUT_S:.0f}s for the lock {lock.lock_file}") from None
    try:
        if not (entry / COMPLETE_MARKER).is_file():
            _download(storage, uri, objects, digest, entry)
    finally:
        lock.release()
    return target


def _download(storage: S3Storage, uri: str, objects: list[ObjectInfo], digest: str, entry: Path) -> None:
    """Called with the entry's lock held: no other process is writing here."""
    for leftover in entry.glob(".download-*"):  # from a process killed mid-download
        shutil.rmtree(leftover, ignore_errors=True)
    total = sum(o.size for o in objects)
    logger.info("staging %s (%d files, %.1f MB) into %s", uri, len(objects), total / 1e6, entry)
    started = time.monotonic()
    temp = Path(tempfile.mkdtemp(prefix=".download-", dir=entry))
    try:
        for info in objects:
            (temp / info.key).parent.mkdir(parents=True, exist_ok=True)
        files_at_once = min(FILES_AT_ONCE, len(objects))
        per_file = max(1, storage.max_workers // files_at_once)
        with ThreadPoolExecutor(files_at_once, thread_name_prefix="stage") as pool:
            list(pool.map(lambda info: _fetch(storage, uri, info, temp, per_file), objects))
        target = entry / MODEL_DIR
        if target.exists():  # a process died between the rename and the marker: that copy is unverified
            shutil.rmtree(target)
        os.rename(temp, target)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    record = {"uri": uri, "listing_sha256": digest, "files": len(objects), "bytes": total, "staged_at": time.time()}
    marker_temp = entry / f".{COMPLETE_MARKER}.tmp"
    marker_temp.write_text(json.dumps(record, indent=2))
    os.replace(marker_temp, entry / COMPLETE_MARKER)
    elapsed = time.monotonic() - started
    logger.info("staged %s in %.1fs (%.1f MB/s)", uri, elapsed, total / 1e6 / max(elapsed, 1e-3))


def _fetch(storage: S3Storage, uri: str, info: ObjectInfo, into: Path, concurrency: int) -> None:
    path = into / info.key
    storage.download(info.key, path, concurrency)
    size = path.stat().st_size
    if size != info.size:
        raise StorageError(f"{storage.uri_for(info.key)} is {size} bytes, listed as {info.size}: "
                           f"model {uri!r} changed while staging; start the job again")

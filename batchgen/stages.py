"""The Ray Data stages: a generator actor that holds one model, and a CPU stage that encodes and stores."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import time
from typing import Any

import numpy as np
import pyarrow as pa

from batchgen.encode import CONTENT_TYPES, EXTENSIONS, encode_image
from batchgen.lease import check_fence
from batchgen.manifest import write_manifest
from batchgen.models.source import ModelFacts
from batchgen.prompts import WORK_SCHEMA
from batchgen.storage import Storage, object_key

logger = logging.getLogger(__name__)

# The generator's output: the work row plus raw pixels (H*W*3 uint8) and what generation recorded.
GENERATED_SCHEMA = WORK_SCHEMA.append(pa.field("pixels", pa.binary()))
for _name, _type in [("truncated", pa.bool_()), ("generate_ms", pa.float64()), ("batch_size", pa.int64()),
                     ("worker", pa.string()), ("dtype", pa.string())]:
    GENERATED_SCHEMA = GENERATED_SCHEMA.append(pa.field(_name, _type))

SUMMARY_SCHEMA = pa.schema(
    [("manifest", pa.string()), ("ok", pa.int64()), ("errors", pa.int64()), ("skipped", pa.int64()),
     ("first_stored_at", pa.float64())]
)


def below_generators(niceness: int) -> None:
    """Raise every thread of this worker process to at least `niceness` (Linux niceness is per thread; threads
    started later inherit their creator's). Idempotent, never lowers it; a no-op where the OS has no niceness."""
    if niceness <= 0 or not hasattr(os, "setpriority"):
        return
    try:
        threads = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        threads = [0]
    for tid in threads:
        try:
            if os.getpriority(os.PRIO_PROCESS, tid) < niceness:
                os.setpriority(os.PRIO_PROCESS, tid, niceness)
        except OSError:  # a thread that exited meanwhile
            pass


def library_versions() -> str:
    from importlib.metadata import version

    names = ("batchgen", "torch", "diffusers", "transformers", "ray")
    return json.dumps({n: version(n) for n in names}, sort_keys=True)


class GeneratorActor:
    """Loads the model once; each call generates the pending rows of a batch and passes the others on."""

    def __init__(self, model_options: dict[str, Any], batch_size: int, torch_threads: int):
        import torch

        from batchgen.engine import Engine
        from batchgen.models.loading import load_model

        # Ray sets OMP_NUM_THREADS=1 in workers; match torch to the CPU share this actor was given.
        torch.set_num_threads(torch_threads)
        self.model = load_model(**model_options)
        self.engine = Engine(self.model, max_batch_size=batch_size)
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        self.dtype = str(self.model.dtype).removeprefix("torch.")  # what `auto` resolved to on this worker

    def __call__(self, batch: pa.Table) -> pa.Table:
        from batchgen.rows import request_from

        rows = batch.to_pylist()
        pending = [r for r in rows if r["status"] == "pending"]
        # Fields the reader left null are those the model's family does not use: the request's defaults stand.
        requests = [request_from({k: v for k, v in r.items() if v is not None}) for r in pending]
        for row, result in zip(pending, self.engine.generate(requests), strict=True):
            row.update(truncated=result.truncated, generate_ms=result.generate_ms, batch_size=result.batch_size,
                       worker=self.worker, dtype=self.dtype)
            if result.ok:
                row.update(status="ok", pixels=np.ascontiguousarray(result.image).tobytes())
            else:
                row.update(status="error", error=result.error)
        for row in rows:
            row.update(init_pixels=None, mask_pixels=None)  # the fetched inputs: used, not stored
        return pa.Table.from_pylist(rows, schema=GENERATED_SCHEMA)


def image_key(row_id: str, sample_index: int, fmt: str, epoch: int) -> str:
    """images/{2-hex shard}/{escaped id}_{sample}-e{lease epoch}.{ext}: inside the prefix, spread over shards,
    and unique per run (one run per lease epoch), so no run ever overwrites an image another run committed."""
    shard = hashlib.sha256(row_id.encode()).hexdigest()[:2]
    return f"{object_key('images', shard, f'{row_id}_{sample_index}')}-e{epoch}.{EXTENSIONS[fmt]}"


class StoreStage:
    """Encodes a batch's images, uploads them in parallel, then writes the manifest part that lists them;
    fenced by the output's lease: a run whose lease was taken over uploads and commits nothing more."""

    def __init__(self, storage: Storage, fmt: str, quality: int, model: ModelFacts, run_id: str, epoch: int):
        self.storage = storage
        self.fmt = fmt
        self.quality = quality
        self.model = model
        self.run_id = run_id
        self.epoch = epoch
        self.versions = library_versions()

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        skipped = sum(r["skipped"] or 0 for r in rows if r["status"] == "tally")
        rows = [r for r in rows if r["status"] != "tally"]
        uploads = []
        for row in rows:
            row.update(self.model.manifest_record(), dtype=row.get("dtype") or self.model.dtype, format=self.fmt,
                       versions=self.versions, run_id=self.run_id)
            if row["status"] != "ok":
                continue
            start = time.perf_counter()
            pixels = np.frombuffer(row.pop("pixels"), dtype=np.uint8).reshape(row["height"], row["width"], 3)
            data = encode_image(pixels, self.fmt, self.quality)
            key = image_key(row["id"], row["sample_index"], self.fmt, self.epoch)
            row.update(encode_ms=(time.perf_counter() - start) * 1000, image_uri=self.storage.uri_for(key),
                       sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
            uploads.append((key, data, CONTENT_TYPES[self.fmt]))
        if rows:
            check_fence(self.storage, self.epoch)
        start = time.perf_counter()
        if uploads:
            self.storage.put_many(uploads)
        upload_ms = (time.perf_counter() - start) * 1000 / max(1, len(uploads))
        stored_at = time.time() if uploads else None
        for row in rows:
            if row["status"] == "ok":
                row["upload_ms"] = upload_ms
        if rows:
            check_fence(self.storage, self.epoch)  # the commit point: the window left is this one PUT
        manifest = write_manifest(self.storage, rows, self.epoch) if rows else None
        ok = sum(r["status"] == "ok" for r in rows)
        summary = {"manifest": manifest, "ok": ok, "errors": len(rows) - ok, "skipped": skipped,
                   "first_stored_at": stored_at}
        return pa.Table.from_pylist([summary], schema=SUMMARY_SCHEMA)

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

from batchgen.encode import encode_image
from batchgen.lease import check_fence
from batchgen.manifest import MANIFEST_SCHEMA, write_manifest
from batchgen.models.source import ModelFacts
from batchgen.prompts import WORK_SCHEMA, DoneKeys, sample_key
from batchgen.storage import Storage
from batchgen.writers import Layout
from batchgen.writers.files import FilesLayout

logger = logging.getLogger(__name__)

# The generator's output: the work row plus raw pixels (H*W*3 uint8) and what generation recorded.
GENERATED_SCHEMA = WORK_SCHEMA.append(pa.field("pixels", pa.binary()))
for _name, _type in [("truncated", pa.bool_()), ("generate_ms", pa.float64()), ("batch_size", pa.int64()),
                     ("worker", pa.string()), ("dtype", pa.string())]:
    GENERATED_SCHEMA = GENERATED_SCHEMA.append(pa.field(_name, _type))

SUMMARY_SCHEMA = pa.schema(
    [("manifest", pa.string()), ("ok", pa.int64()), ("errors", pa.int64()), ("skipped", pa.int64()),
     ("first_stored_at", pa.float64()), ("retried_errors", pa.int64())]
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


# The encode stage's output: a manifest row with its encoded image (null for error rows), and resume's tally.
ENCODED_SCHEMA = MANIFEST_SCHEMA.append(pa.field("image", pa.binary())).append(pa.field("skipped", pa.int64()))


class EncodeStage:
    """Pixels to encoded image bytes, plus what the manifest records about each row (model, format, sha256)."""

    def __init__(self, fmt: str, quality: int, model: ModelFacts, run_id: str):
        self.fmt = fmt
        self.quality = quality
        self.model = model
        self.run_id = run_id
        self.versions = library_versions()

    def encode_rows(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for row in rows:
            if row["status"] == "tally":
                continue
            row.update(self.model.manifest_record(), dtype=row.get("dtype") or self.model.dtype, format=self.fmt,
                       versions=self.versions, run_id=self.run_id)
            pixels = row.pop("pixels", None)
            if row["status"] != "ok":
                continue
            start = time.perf_counter()
            image = np.frombuffer(pixels, dtype=np.uint8).reshape(row["height"], row["width"], 3)
            data = encode_image(image, self.fmt, self.quality)
            row.update(image=data, encode_ms=(time.perf_counter() - start) * 1000,
                       sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
        return rows

    def __call__(self, batch: pa.Table) -> pa.Table:
        return pa.Table.from_pylist(self.encode_rows(batch.to_pylist()), schema=ENCODED_SCHEMA)


class StoreStage:
    """Hands a batch's encoded images to the output layout's writer, then writes the manifest parts that list
    what the writer committed. Batches of generated pixels are encoded here first (the files layout: encode and
    upload in one task per call); shard layouts get batches the encode stage already encoded, so the blocks
    gathered into a shard carry compressed images rather than pixels."""

    def __init__(self, storage: Storage, fmt: str, quality: int, model: ModelFacts, run_id: str, epoch: int,
                 layout: Layout | None = None, failed_before: DoneKeys | None = None):
        self.storage = storage
        self.encoder = EncodeStage(fmt, quality, model, run_id)
        self.epoch = epoch
        self.layout = layout or FilesLayout()
        # Pairs whose only rows were errors when the run started: counting the ones stored again lets the
        # driver keep the output's error total without re-reading the manifests.
        self.failed_before = failed_before or DoneKeys()

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        if "pixels" in batch.column_names:
            rows = self.encoder.encode_rows(rows)
        skipped = sum(r["skipped"] or 0 for r in rows if r["status"] == "tally")
        rows = [r for r in rows if r["status"] != "tally"]
        writer = self.layout.open(self.storage, self.encoder.fmt, self.epoch)
        try:
            for row in rows:
                writer.add(row, row.pop("image", None))
            if rows:
                check_fence(self.storage, self.epoch)  # a run whose lease was taken over uploads nothing more
            groups = writer.close()
        except BaseException:
            writer.abort()
            raise
        ok = sum(r["status"] == "ok" for r in rows)
        stored_at = time.time() if ok else None
        if groups:
            check_fence(self.storage, self.epoch)  # the commit point: the window left is these PUTs
        manifests = [write_manifest(self.storage, group, self.epoch) for group in groups]
        retried = sum(sample_key(r["id"], r["sample_index"]) in self.failed_before for r in rows) if len(
            self.failed_before) else 0
        summary = {"manifest": ",".join(manifests) or None, "ok": ok, "errors": len(rows) - ok, "skipped": skipped,
                   "first_stored_at": stored_at, "retried_errors": retried}
        return pa.Table.from_pylist([summary], schema=SUMMARY_SCHEMA)

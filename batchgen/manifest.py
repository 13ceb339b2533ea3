"""Manifests: one Parquet part per stored batch, written after its images; _SUCCESS last; inspection."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from batchgen.models.source import MODEL_COLUMNS
from batchgen.prompts import DoneKeys, sample_key
from batchgen.rows import MANIFEST_FIELDS, GenerationRequest, arrow_fields, arrow_type, request_from
from batchgen.storage import NotFound, Storage

logger = logging.getLogger(__name__)

MANIFEST_PREFIX = "manifests/"
SUCCESS_KEY = "_SUCCESS"

# The row fields the manifest records (the row contract says which), then how the image was made and stored.
MANIFEST_SCHEMA = pa.schema(
    [("id", pa.string()), ("sample_index", pa.int64()), *arrow_fields(MANIFEST_FIELDS),
     *((name, arrow_type(kind)) for name, kind in MODEL_COLUMNS),
     ("image_uri", pa.string()), ("sha256", pa.string()), ("bytes", pa.int64()), ("format", pa.string()),
     ("status", pa.string()), ("error", pa.string()), ("truncated", pa.bool_()), ("generate_ms", pa.float64()),
     ("encode_ms", pa.float64()), ("upload_ms", pa.float64()), ("batch_size", pa.int64()), ("worker", pa.string()),
     ("versions", pa.string()), ("extra", pa.string()), ("run_id", pa.string()),
     # Where in a shard (`image_uri`) the image is: the byte offset of its data in a tar, its row in a Parquet
     # shard; null in the files layout.
     ("offset", pa.int64())]
)


_PART_NAME = re.compile(r"part-(\d{10})-[0-9a-f]{32}\.parquet")


def manifest_key(rows: list[dict[str, Any]], epoch: int) -> str:
    """Named by the lease epoch that wrote it and the (id, sample) pairs it lists: a retried batch overwrites its
    own part, and no two runs (or batches) ever share a name. The pairs are hashed in an encoding that cannot be
    ambiguous whatever the ids hold: each id as its UTF-8 length (8 bytes) then its bytes, then the sample."""
    digest = hashlib.sha256()
    for row_id, sample in sorted((r["id"], r["sample_index"]) for r in rows):
        raw = row_id.encode("utf-8", "surrogatepass")
        digest.update(len(raw).to_bytes(8, "little") + raw + int(sample).to_bytes(8, "little", signed=True))
    return f"{MANIFEST_PREFIX}part-{epoch:010d}-{digest.hexdigest()[:32]}.parquet"


def part_epoch(key: str) -> int:
    """The lease epoch that wrote a part; 0 for parts written before outputs had leases."""
    match = _PART_NAME.fullmatch(key.rpartition("/")[2])
    return int(match.group(1)) if match else 0


def write_manifest(storage: Storage, rows: list[dict[str, Any]], epoch: int) -> str:
    """One PUT (or write-then-rename): the part appears whole or not at all."""
    table = pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    key = manifest_key(rows, epoch)
    storage.put(key, buffer.getvalue(), "application/vnd.apache.parquet")
    return key


def manifest_parts(storage: Storage) -> list[str]:
    return [k for k in storage.list(MANIFEST_PREFIX) if k.endswith(".parquet")]


def read_manifests(storage: Storage, columns: list[str] | None = None) -> Iterator[tuple[str, pa.Table]]:
    for key in manifest_parts(storage):
        yield key, pq.read_table(io.BytesIO(storage.get(key)), columns=columns)


def _keys_by_status(storage: Storage) -> dict[str, np.ndarray]:
    """The 64-bit (id, sample) keys of every manifest row, grouped by status. 8 bytes a row, where Python sets
    of keys or (id, sample) tuples took 10-20 times that on the driver of a job of millions of images."""
    parts: dict[str, list[np.ndarray]] = {}
    for _, table in read_manifests(storage, ["id", "sample_index", "status"]):
        ids, indices, statuses = (table.column(c).to_pylist() for c in ("id", "sample_index", "status"))
        keys = np.fromiter(map(sample_key, ids, indices), dtype=np.uint64, count=len(ids))
        status = np.asarray(statuses, dtype=object)
        for name in set(statuses):
            parts.setdefault(name, []).append(keys[status == name])
    return {name: np.concatenate(arrays) for name, arrays in parts.items()}


@dataclass(frozen=True)
class Committed:
    """What an output held when a run started, read from its manifests once: the run's totals are these plus
    what the run's own store calls report, so nothing is re-read at the end."""

    ok: DoneKeys  # (id, sample) pairs with an ok row
    failed: DoneKeys  # pairs whose only rows are errors

    def skip(self, retry_errors: bool) -> DoneKeys:
        """The keys a run skips: ok pairs, and failed ones unless they are to be retried."""
        if retry_errors:
            return self.ok
        return DoneKeys(np.concatenate([self.ok.keys, self.failed.keys]))


def read_committed(storage: Storage) -> Committed:
    by_status = _keys_by_status(storage)
    ok = DoneKeys(by_status.get("ok", []))
    every = np.unique(np.concatenate(list(by_status.values()))) if by_status else np.empty(0, np.uint64)
    return Committed(ok, DoneKeys(np.setdiff1d(every, ok.keys, assume_unique=True)))


def request_from_row(row: dict[str, Any]) -> GenerationRequest:
    """The engine request that reproduces a manifest row's image (with the model it names): its recorded row
    fields; those recorded null (not used by the model's family) keep the request's defaults."""
    return request_from({name: value for name, value in row.items() if value is not None})


def write_success(storage: Storage, summary: dict[str, Any]) -> None:
    storage.put(SUCCESS_KEY, json.dumps(summary, indent=2, sort_keys=True).encode(), "application/json")


def read_success(storage: Storage) -> dict[str, Any] | None:
    try:
        return json.loads(storage.get(SUCCESS_KEY))
    except NotFound:
        return None


@dataclass
class InspectReport:
    """What `batchgen inspect` found: counts and every problem, each a line."""

    success: dict[str, Any] | None
    parts: int = 0
    rows: int = 0
    ok: int = 0
    errors: int = 0
    superseded: int = 0
    leftovers: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def healthy(self) -> bool:
        return not self.problems


def inspect_output(storage: Storage, verify_hashes: bool = True) -> InspectReport:
    """Ask the output's layout to verify every ok row's stored image (exists, size, sha256); find duplicates and
    orphans (data objects no ok row lists).

    Two ok rows for one (id, sample) from different lease epochs are the fencing rule's residual case (a run
    whose lease was taken over committed while the new holder generated the pair again): both images are
    intact, the higher epoch's row is the pair's row and the other counts as superseded. Any other duplicate is
    a problem. Data objects no row lists whose name carries a lease epoch are leftovers of runs that stopped
    between upload and commit: never listed, never overwritten, so not damage; other unlisted objects are
    problems."""
    from batchgen.writers import stored_layout  # the writers import this module's schema

    layout = stored_layout(storage)
    report = InspectReport(read_success(storage))
    if report.success is None:
        report.problems.append(f"{storage.uri_for(SUCCESS_KEY)} is missing: the job has not completed")
    listed: list[dict[str, Any]] = []
    seen_ok: dict[tuple[str, int], list[tuple[int, str]]] = {}
    columns = ["id", "sample_index", "status", "image_uri", "bytes", "sha256", "format", "offset"]
    for part, table in read_manifests(storage):
        report.parts += 1
        if "offset" not in table.column_names:  # written before shard layouts existed
            table = table.append_column("offset", pa.nulls(table.num_rows, pa.int64()))
        for row in table.select(columns).to_pylist():
            report.rows += 1
            if row["status"] != "ok":
                report.errors += 1
                continue
            seen_ok.setdefault((row["id"], row["sample_index"]), []).append((part_epoch(part), part))
            listed.append(row)
    report.ok = len(seen_ok)
    for (row_id, sample), parts in seen_ok.items():
        if len(parts) == 1:
            continue
        epochs = [epoch for epoch, _ in parts]
        if 0 in epochs or len(set(epochs)) < len(epochs):
            report.problems.append(f"duplicate ok rows for id={row_id!r} sample={sample} in "
                                   + " and ".join(part for _, part in parts))
        else:
            report.superseded += len(parts) - 1
    report.problems.extend(layout.verify(storage, listed, verify_hashes))
    referenced = {row["image_uri"] for row in listed}
    for key in storage.list(layout.data_prefix):
        if storage.uri_for(key) in referenced:
            continue
        if layout.leftover_name.fullmatch(key.rpartition("/")[2]):
            report.leftovers.append(storage.uri_for(key))
        else:
            report.problems.append(f"orphan object {storage.uri_for(key)}: no ok manifest row lists it")
    if report.success is not None:
        recorded_ok = report.success.get("images_ok_total")
        if recorded_ok is not None and recorded_ok != report.ok:
            report.problems.append(f"_SUCCESS records {recorded_ok} ok images but manifests list {report.ok}")
    return report

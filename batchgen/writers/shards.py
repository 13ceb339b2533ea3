"""Shard layouts: many samples per object (WebDataset tar or Parquet), rolled over by sample count or bytes.

A shard is streamed into `Storage.open_write` (a temp file renamed into place locally; a spooled file uploaded
by boto3's managed multipart transfer on S3) and appears whole or not at all. Shards are named
`shards/e{lease epoch}-{writer id}-{NNNNNN}.{ext}`: one run holds each epoch and the writer id is random per
writer, so concurrent store tasks, a task Ray retries and a rerun after a crash never write the same name, and
a committed shard is never rewritten. A shard cut off by a crash is never listed by a manifest (manifests are
written after their shard), so a rerun regenerates its rows into a new shard; `batchgen inspect` counts an
unlisted shard as a stopped run's leftover.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
import time
import uuid
from abc import abstractmethod
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq

from batchgen.encode import EXTENSIONS
from batchgen.manifest import MANIFEST_SCHEMA
from batchgen.storage import Storage, StorageError, object_key
from batchgen.writers.base import Layout, Row, Writer

SHARD_PREFIX = "shards/"


def sample_name(row_id: str, sample_index: int) -> str:
    """The sample's WebDataset key: the escaped id (no "/" and, because WebDataset splits a name at its first
    ".", no "." either) and the sample index. Unique per (id, sample), like the files layout's keys."""
    return f"{object_key(row_id).replace('.', '%2E')}_{sample_index}"


class ShardWriter(Writer):
    """Rows into shards of at most `max_samples` ok samples, closed early once their image bytes reach
    `max_bytes`. Error rows carry no data: they are listed with the shard open when they arrive."""

    extension: str
    content_type: str

    def __init__(self, storage: Storage, fmt: str, epoch: int, max_samples: int, max_bytes: int):
        self.storage = storage
        self.fmt = fmt
        self.max_samples = max_samples
        self.max_bytes = max_bytes
        self.stem = f"{SHARD_PREFIX}e{epoch}-{uuid.uuid4().hex[:8]}-"
        self.sequence = 0
        self.groups: list[list[Row]] = []
        self.rows: list[Row] = []  # the open shard's rows (and error rows waiting for a shard)
        self.samples = 0
        self.bytes = 0
        self.uri = ""
        self.started = 0.0
        self._open: ExitStack | None = None

    def add(self, row: Row, data: bytes | None) -> None:
        self.rows.append(row)
        if data is None:
            return
        if self._open is None:
            key = f"{self.stem}{self.sequence:06d}.{self.extension}"
            self.sequence += 1
            self.uri = self.storage.uri_for(key)
            self.started = time.perf_counter()
            self._open = ExitStack()
            self.begin(self._open.enter_context(self.storage.open_write(key, self.content_type)))
        row["image_uri"] = self.uri
        self.append(row, data)
        self.samples += 1
        self.bytes += len(data)
        if self.samples >= self.max_samples or self.bytes >= self.max_bytes:
            self._commit()

    def _commit(self) -> None:
        assert self._open is not None
        opened, self._open = self._open, None
        self.end()
        opened.close()  # the upload (or rename): the shard exists from here on
        ok = [r for r in self.rows if r["status"] == "ok"]
        per_sample_ms = (time.perf_counter() - self.started) * 1000 / max(1, len(ok))
        for row in ok:
            row["upload_ms"] = per_sample_ms
        self.groups.append(self.rows)
        self.rows, self.samples, self.bytes = [], 0, 0

    def close(self) -> list[list[Row]]:
        if self._open is not None:
            self._commit()
        if self.rows:  # error rows after the last shard: listed by a manifest part of their own
            self.groups.append(self.rows)
            self.rows = []
        return self.groups

    def abort(self) -> None:
        if self._open is not None:
            opened, self._open = self._open, None
            opened.__exit__(StorageError, StorageError("store call failed"), None)

    @abstractmethod
    def begin(self, file: BinaryIO) -> None:
        """Start a shard in `file`."""

    @abstractmethod
    def append(self, row: Row, data: bytes) -> None:
        """Write one sample; set the row's `offset`."""

    @abstractmethod
    def end(self) -> None:
        """Finish the shard's format (the file is committed after this)."""


class TarShardWriter(ShardWriter):
    """WebDataset: per sample `{key}.{png|jpg|webp}`, `{key}.json` (the manifest row), `{key}.txt` (the prompt)."""

    extension = "tar"
    content_type = "application/x-tar"

    def begin(self, file: BinaryIO) -> None:
        # Open across add() calls until the shard is full: closed by end() or with the file by abort().
        self.tar = tarfile.open(fileobj=file, mode="w", format=tarfile.PAX_FORMAT)  # noqa: SIM115

    def append(self, row: Row, data: bytes) -> None:
        name = sample_name(row["id"], row["sample_index"])
        self._member(f"{name}.{EXTENSIONS[self.fmt]}", data)
        # tarfile pads every member's data to whole 512-byte blocks and has just written them.
        padded = -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
        row["offset"] = self.tar.offset - padded
        manifest_row = {name: row.get(name) for name in MANIFEST_SCHEMA.names}
        self._member(f"{name}.json", json.dumps(manifest_row, sort_keys=True).encode())
        self._member(f"{name}.txt", (row["prompt"] or "").encode())

    def _member(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = int(time.time())
        info.mode = 0o444
        self.tar.addfile(info, io.BytesIO(data))

    def end(self) -> None:
        self.tar.close()  # end-of-archive blocks; the file itself stays open for the upload


# Parquet shards: the manifest's columns and the image bytes (already-compressed PNG/JPEG/WebP: stored as is).
PARQUET_SHARD_SCHEMA = MANIFEST_SCHEMA.append(pa.field("image", pa.binary()))
_ROWS_PER_GROUP = 64


class ParquetShardWriter(ShardWriter):
    """Parquet: the ok rows with their image bytes in an `image` column; `offset` is the row's index."""

    extension = "parquet"
    content_type = "application/vnd.apache.parquet"

    def begin(self, file: BinaryIO) -> None:
        compression: Any = {name: "zstd" for name in MANIFEST_SCHEMA.names} | {"image": "none"}
        self.parquet = pq.ParquetWriter(file, PARQUET_SHARD_SCHEMA, compression=compression)
        self.buffered: list[Row] = []

    def append(self, row: Row, data: bytes) -> None:
        row["offset"] = self.samples
        self.buffered.append({**row, "image": data})
        if len(self.buffered) >= _ROWS_PER_GROUP:
            self._flush()

    def _flush(self) -> None:
        if self.buffered:
            self.parquet.write_table(pa.Table.from_pylist(self.buffered, schema=PARQUET_SHARD_SCHEMA))
            self.buffered = []

    def end(self) -> None:
        self._flush()
        self.parquet.close()


class ShardLayout(Layout):
    data_prefix = SHARD_PREFIX
    leftover_name = re.compile(r"e[1-9]\d*-[0-9a-f]{8}-\d{6}\.\w+")
    writer: type[ShardWriter]

    def __init__(self, max_samples: int, max_bytes: int):
        self.max_samples = max_samples
        self.max_bytes = max_bytes

    def open(self, storage: Storage, fmt: str, epoch: int) -> Writer:
        return self.writer(storage, fmt, epoch, self.max_samples, self.max_bytes)

    def verify(self, storage: Storage, rows: list[Row], verify_hashes: bool) -> Iterator[str]:
        by_shard: dict[str, list[Row]] = {}
        for row in rows:
            by_shard.setdefault(row["image_uri"], []).append(row)
        prefix = storage.uri_for("")
        for uri, listed in by_shard.items():
            key = uri[len(prefix) :]
            if storage.size(key) is None:
                yield f"missing shard {uri} listing {len(listed)} samples, e.g. {_sample(listed[0])}"
                continue
            with storage.local_copy(key) as path, open(path, "rb") as file:
                try:
                    yield from self.verify_shard(file, uri, listed, verify_hashes)
                except (tarfile.TarError, pa.ArrowException, OSError) as exc:
                    yield (f"shard {uri} is unreadable ({exc}); it lists {len(listed)} samples, "
                           f"e.g. {_sample(listed[0])}")

    @abstractmethod
    def verify_shard(self, file: BinaryIO, uri: str, rows: list[Row], verify_hashes: bool) -> Iterator[str]:
        """Problems of the listed samples in one shard."""


def _sample(row: Row) -> str:
    return f"id={row['id']!r} sample={row['sample_index']}"


class WebDatasetLayout(ShardLayout):
    name = "webdataset"
    writer = TarShardWriter

    def verify_shard(self, file: BinaryIO, uri: str, rows: list[Row], verify_hashes: bool) -> Iterator[str]:
        with tarfile.open(fileobj=file, mode="r") as tar:
            members = {m.name: m for m in tar.getmembers()}
        for row in rows:
            name = f"{sample_name(row['id'], row['sample_index'])}.{EXTENSIONS[row['format']]}"
            member = members.get(name)
            if member is None:
                yield f"sample {_sample(row)}: member {name} missing from shard {uri}"
            elif (member.offset_data, member.size) != (row["offset"], row["bytes"]):
                yield (f"sample {_sample(row)}: member {name} of shard {uri} is at offset {member.offset_data} with "
                       f"{member.size} bytes, not {row['offset']} with {row['bytes']} as recorded")
            elif verify_hashes:
                file.seek(member.offset_data)
                if hashlib.sha256(file.read(member.size)).hexdigest() != row["sha256"]:
                    yield f"sample {_sample(row)}: sha256 mismatch for member {name} of shard {uri}"


class ParquetLayout(ShardLayout):
    name = "parquet"
    writer = ParquetShardWriter

    def verify_shard(self, file: BinaryIO, uri: str, rows: list[Row], verify_hashes: bool) -> Iterator[str]:
        columns = ["id", "sample_index", "bytes"] + (["image"] if verify_hashes else [])
        table = pq.read_table(file, columns=columns)
        for row in rows:
            at = row["offset"]
            stored = table.slice(at, 1).to_pylist()[0] if 0 <= at < table.num_rows else None
            if stored is None or (stored["id"], stored["sample_index"]) != (row["id"], row["sample_index"]):
                yield f"sample {_sample(row)}: not at row {at} of shard {uri}"
            elif verify_hashes and (len(stored["image"]) != row["bytes"]
                                    or hashlib.sha256(stored["image"]).hexdigest() != row["sha256"]):
                yield f"sample {_sample(row)}: sha256 mismatch for row {at} of shard {uri}"

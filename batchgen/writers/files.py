"""The first layout: one object per image under images/, uploaded in parallel at the end of each call."""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Iterator

from batchgen.encode import CONTENT_TYPES, EXTENSIONS
from batchgen.storage import Storage, object_key
from batchgen.writers.base import Layout, Row, Writer


def image_key(row_id: str, sample_index: int, fmt: str, epoch: int) -> str:
    """images/{2-hex shard}/{escaped id}_{sample}-e{lease epoch}.{ext}: inside the prefix, spread over shards,
    and unique per run (one run per lease epoch), so no run ever overwrites an image another run committed."""
    shard = hashlib.sha256(row_id.encode()).hexdigest()[:2]
    return f"{object_key('images', shard, f'{row_id}_{sample_index}')}-e{epoch}.{EXTENSIONS[fmt]}"


class FilesWriter(Writer):
    def __init__(self, storage: Storage, fmt: str, epoch: int):
        self.storage = storage
        self.fmt = fmt
        self.epoch = epoch
        self.rows: list[Row] = []
        self.uploads: list[tuple[str, bytes, str]] = []

    def add(self, row: Row, data: bytes | None) -> None:
        if data is not None:
            key = image_key(row["id"], row["sample_index"], self.fmt, self.epoch)
            row["image_uri"] = self.storage.uri_for(key)
            self.uploads.append((key, data, CONTENT_TYPES[self.fmt]))
        self.rows.append(row)

    def close(self) -> list[list[Row]]:
        start = time.perf_counter()
        if self.uploads:
            self.storage.put_many(self.uploads)
        upload_ms = (time.perf_counter() - start) * 1000 / max(1, len(self.uploads))
        for row in self.rows:
            if row["status"] == "ok":
                row["upload_ms"] = upload_ms
        return [self.rows] if self.rows else []

    def abort(self) -> None:
        """Images already uploaded stay, unlisted: leftovers that no later run overwrites (their epoch differs)."""


class FilesLayout(Layout):
    name = "files"
    data_prefix = "images/"
    leftover_name = re.compile(r".+-e[1-9]\d*\.\w+")

    def open(self, storage: Storage, fmt: str, epoch: int) -> Writer:
        return FilesWriter(storage, fmt, epoch)

    def verify(self, storage: Storage, rows: list[Row], verify_hashes: bool) -> Iterator[str]:
        prefix = storage.uri_for("")
        for row in rows:
            key = row["image_uri"][len(prefix) :]
            size = storage.size(key)
            if size is None:
                yield f"missing object {row['image_uri']} (id={row['id']!r} sample={row['sample_index']})"
            elif size != row["bytes"]:
                yield f"size mismatch for {row['image_uri']}: {size} != {row['bytes']} recorded"
            elif verify_hashes and hashlib.sha256(storage.get(key)).hexdigest() != row["sha256"]:
                yield f"sha256 mismatch for {row['image_uri']}"

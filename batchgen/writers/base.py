"""The writer seam: how one store call's samples become stored data plus the manifest rows that list it."""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Any

from batchgen.storage import NotFound, Storage

Row = dict[str, Any]


class Writer(ABC):
    """One store call's output. `add` each row in order (`data`: the encoded image of an ok row, None for an
    error row), then `close`. When `close` returns, the data is durable; it returns the rows in groups, each
    to be listed by one manifest part written after it (so a listed sample is always stored). On failure
    `abort` discards what is not committed."""

    @abstractmethod
    def add(self, row: Row, data: bytes | None) -> None:
        """Take one row; ok rows get `image_uri` (and `offset` where the layout has one)."""

    @abstractmethod
    def close(self) -> list[list[Row]]:
        """Commit what is left; the groups of rows, each for one manifest part (none when nothing was added)."""

    @abstractmethod
    def abort(self) -> None:
        """Drop what is not committed (committed data stays: no manifest lists it, so a rerun redoes its rows)."""


class Layout(ABC):
    """A way of storing images: opens writers, and tells `batchgen inspect` how to verify what they wrote."""

    name: str
    data_prefix: str  # every data object of this layout is under it: `inspect` reports unlisted ones as orphans
    leftover_name: re.Pattern[str]  # an object name carrying a lease epoch: a stopped run's, not damage

    @abstractmethod
    def open(self, storage: Storage, fmt: str, epoch: int) -> Writer:
        """A writer for one store call of the run holding lease `epoch` (its names never repeat another run's)."""

    @abstractmethod
    def verify(self, storage: Storage, rows: list[Row], verify_hashes: bool) -> Iterator[str]:
        """Problems with the stored data of these ok manifest rows, each naming the sample and where it is."""


def layout_for(name: str, shard_samples: int = 1000, shard_bytes: int = 512 * 2**20) -> Layout:
    """The layout `output.layout` names, with the spec's roll-over limits for shard layouts."""
    from batchgen.writers.files import FilesLayout
    from batchgen.writers.shards import ParquetLayout, WebDatasetLayout

    if name == "files":
        return FilesLayout()
    if name == "webdataset":
        return WebDatasetLayout(shard_samples, shard_bytes)
    if name == "parquet":
        return ParquetLayout(shard_samples, shard_bytes)
    raise ValueError(f"`output.layout` must be one of ['files', 'webdataset', 'parquet'] but is {name!r}")


def stored_layout(storage: Storage) -> Layout:
    """The layout an existing output was written with, from its fingerprint (outputs older than layouts, or
    without a fingerprint, hold files)."""
    from batchgen.resume import FINGERPRINT_KEY

    try:
        recorded = json.loads(storage.get(FINGERPRINT_KEY))
    except NotFound:
        recorded = {}
    return layout_for(recorded.get("output", {}).get("layout") or "files")

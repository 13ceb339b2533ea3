"""The fetch stage: read and decode each row's init image and mask on CPU, before the rows reach a generator.

A row names its images by URI (a local path or s3://) or carries their bytes (a binary input column). Each
distinct image of a batch is read once, on a thread pool, through batchgen.storage (so S3 reads get the output's
retries and deadline), checked against the size limits, decoded with PIL and turned upright by its EXIF
orientation (as diffusers' load_image does): init images to RGB, masks to L (grayscale). The row then carries the
raw pixels, their size before any resizing (upright) and the sha256 of the bytes.
A missing, unreadable, corrupt or oversized image turns its row into an error row naming the field and the URI;
the rest of the batch goes on. An S3 endpoint that stays unreachable past the deadline fails the job instead,
as it does for outputs: every row would otherwise become an error.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
from PIL import Image, ImageOps

from batchgen.errors import RowError, StorageError
from batchgen.prompts import WORK_SCHEMA
from batchgen.rows import IMAGE_FIELDS, GenerationRequest
from batchgen.storage import (
    NotFound,
    ObjectTooLarge,
    Storage,
    StorageUnavailable,
    open_storage,
    split_object_uri,
)

logger = logging.getLogger(__name__)

MODES = {"init_image": "RGB", "mask_image": "L"}  # what each image field is decoded to


@dataclass(frozen=True)
class Fetched:
    """One decoded image: raw pixels (row-major, `mode`), (height, width) and the sha256 of the source bytes."""

    pixels: bytes
    size: tuple[int, int]
    sha256: str


class ImageFetcher:
    """Fetches and decodes the images of a batch of work rows (a callable Ray Data stage, testable without Ray)."""

    def __init__(self, retry_deadline_s: float = 300.0, workers: int = 8, max_bytes: int = 50 * 2**20,
                 max_pixels: int = 8192 * 8192):
        self.retry_deadline_s = retry_deadline_s
        self.workers = workers
        self.max_bytes = max_bytes
        self.max_pixels = max_pixels
        self._storages: dict[str, Storage] = {}  # root -> storage: one S3 client per bucket and worker

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_storages": {}}

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        wanted: dict[tuple[str, str], bytes | None] = {}  # (field, uri) -> inline bytes; each fetched once
        for row in rows:
            if row["status"] != "pending":
                continue
            for name in IMAGE_FIELDS:
                if row.get(name) is not None:
                    wanted.setdefault((name, row[name]), row.get(f"{name}_bytes"))
        with ThreadPoolExecutor(max(1, min(self.workers, len(wanted))), thread_name_prefix="fetch") as pool:
            futures = {key: pool.submit(self._fetch, *key, inline) for key, inline in wanted.items()}
            results = {key: future.result() for key, future in futures.items()}
        for row in rows:
            for name in IMAGE_FIELDS:
                row[f"{name}_bytes"] = None  # decoded now: no need to carry the encoded bytes on
                if row["status"] != "pending" or row.get(name) is None:
                    continue
                result = results[(name, row[name])]
                if isinstance(result, RowError):
                    row.update(status="error", error=str(result))
                    continue
                prefix = name.removesuffix("_image")
                row.update({f"{name}_sha256": result.sha256, f"{name}_size": list(result.size),
                            f"{prefix}_pixels": result.pixels})
        return pa.Table.from_pylist(rows, schema=WORK_SCHEMA)

    def _fetch(self, name: str, uri: str, inline: bytes | None) -> Fetched | RowError:
        """The decoded image, or the RowError its row gets. StorageError past the deadline propagates."""
        try:
            data = inline if inline is not None else self._read(name, uri)
            if len(data) > self.max_bytes:
                raise RowError(name, uri, f"must be at most {self.max_bytes} bytes (the image has {len(data)})")
            return self._decode(name, uri, data)
        except RowError as e:
            return e

    def _read(self, name: str, uri: str) -> bytes:
        """The object's bytes in one read (one GET on S3), refused past max_bytes from its length."""
        if uri.startswith("table:"):
            raise RowError(name, uri, "names bytes of an input table that this row does not carry")
        try:
            root, key = split_object_uri(uri)
        except ValueError:
            raise RowError(name, uri, "must be a valid local path or s3://bucket/key") from None
        if root not in self._storages:
            self._storages[root] = open_storage(root, retry_deadline_s=self.retry_deadline_s, max_workers=self.workers)
        try:
            return self._storages[root].get(key, max_bytes=self.max_bytes)
        except NotFound:
            raise RowError(name, uri, "must name an existing image (no such object)") from None
        except ObjectTooLarge as e:
            has = f"the object has {e.size}" if e.size is not None else "the object has more"
            raise RowError(name, uri, f"must be at most {self.max_bytes} bytes ({has})") from None
        except StorageUnavailable:  # retried until the deadline: the store is down, not this image
            raise
        except StorageError as e:
            raise RowError(name, uri, f"must be readable ({e})") from None

    def _decode(self, name: str, uri: str, data: bytes) -> Fetched:
        try:
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
                if width * height > self.max_pixels:
                    raise RowError(name, uri, f"must have at most {self.max_pixels} pixels (the image is "
                                   f"{width}x{height})")
                # Upright as its EXIF orientation says, as diffusers.utils.load_image hands it to a pipeline.
                decoded = ImageOps.exif_transpose(image).convert(MODES[name])
        except RowError:
            raise
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            raise RowError(name, uri, f"must be a readable image ({type(e).__name__}: {e})") from None
        return Fetched(decoded.tobytes(), (decoded.height, decoded.width), hashlib.sha256(data).hexdigest())


def request_with_images(req: GenerationRequest, fetcher: ImageFetcher | None = None) -> GenerationRequest:
    """The request of a manifest row (manifest.request_from_row) with the images it names fetched, so the row
    regenerates its image; raises the RowError its row would get (bytes from an input table are not refetched)."""
    fetcher = fetcher or ImageFetcher()
    values = {}
    for name in IMAGE_FIELDS:
        uri = getattr(req, name)
        if uri is not None:
            result = fetcher._fetch(name, uri, None)
            if isinstance(result, RowError):
                raise result
            recorded = getattr(req, f"{name}_sha256")
            if recorded is not None and recorded != result.sha256:
                raise RowError(name, uri, f"must be the image the manifest records (sha256 {recorded[:12]}...)")
            values.update({f"{name.removesuffix('_image')}_pixels": result.pixels, f"{name}_size": result.size})
    return dataclasses.replace(req, **values)


def fetch_images(batch: pa.Table, fetcher: ImageFetcher, nice: int) -> pa.Table:
    """The fetch stage's Ray Data function (the operator is named after it)."""
    from batchgen.stages import below_generators

    below_generators(nice)
    return fetcher(batch)

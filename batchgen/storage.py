"""Read and write job outputs under one root: a local directory or an s3://bucket/prefix URI."""

from __future__ import annotations

import hashlib
import logging
import os
import random
import re
import stat
import tempfile
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import boto3
from boto3.exceptions import RetriesExceededError as S3TransferRetriesExceededError
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, ConnectionError, HTTPClientError, SSLError

from batchgen.errors import JobConfigError, StorageError

logger = logging.getLogger(__name__)

_T = TypeVar("_T")
_SAFE_BYTES = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")
_MAX_PART_CHARS = 150
_HASH_CHARS = 20
_TEMP_NAME = re.compile(r"\..+\.tmp-[0-9a-f]{32}")
# ConditionalRequestConflict (409): another conditional write to the key is in flight; retried, one then gets 412.
_TRANSIENT_CODES = frozenset({"SlowDown", "RequestTimeout", "Throttling", "ThrottlingException",
                              "ConditionalRequestConflict"})
_EXISTS_CODES = frozenset({"PreconditionFailed", "412"})
_FIRST_BACKOFF_S = 0.25
_MAX_BACKOFF_S = 5.0
_CLIENT_LOCK = threading.Lock()  # boto3 client creation is rare; one lock keeps S3Storage picklable
_SESSIONS: dict[tuple[tuple[str, str], ...], boto3.session.Session] = {}


class NotFound(StorageError):
    """The object does not exist."""


class ObjectTooLarge(StorageError):
    """The object is larger than the reader's limit (`get(key, max_bytes)`); `size` is its size where known."""

    def __init__(self, message: str, size: int | None):
        super().__init__(message)
        self.size = size


class StorageUnavailable(StorageError):
    """The store kept failing with transient errors (unreachable, 5xx, throttling) until the retry deadline: the
    store is down, which says nothing about the object asked for."""


@dataclass(frozen=True)
class ObjectInfo:
    """One listed S3 object. The ETag is the MD5 of the bytes for single-part uploads; for multipart
    uploads it is derived from the parts' MD5s, so it is not a content hash but still changes with content."""

    key: str
    size: int
    etag: str


def object_key(part: str, *parts: str) -> str:
    """Join id parts into a key that stays under the output root and differs for every distinct input.

    Each part is UTF-8 encoded and every byte outside ``[A-Za-z0-9._-]`` becomes ``%XX`` (uppercase hex),
    so no part holds "/", "\\" or control characters; a leading "." becomes "%2E", so no part is "." or
    ".." or hidden. "~" never comes out of that encoding, so it marks the two other forms: the empty part
    is "~", and a part encoded longer than 150 characters becomes its first (at most) 128 characters, "~"
    and 20 hex digits of the SHA-256 of the whole part, unique up to an 80-bit hash collision. Hence
    ``object_key("a/b") == "a%2Fb"`` while ``object_key("a", "b") == "a/b"``."""
    return "/".join(_escape_part(each) for each in (part, *parts))


def _escape_part(part: str) -> str:
    raw = part.encode("utf-8", "surrogatepass")
    if not raw:
        return "~"
    escaped = "".join(chr(byte) if byte in _SAFE_BYTES else f"%{byte:02X}" for byte in raw)
    if escaped.startswith("."):
        escaped = "%2E" + escaped[1:]
    if len(escaped) <= _MAX_PART_CHARS:
        return escaped
    head = escaped[: _MAX_PART_CHARS - _HASH_CHARS - 2]
    cut = head.find("%", len(head) - 2)
    if cut != -1:  # do not split a %XX escape
        head = head[:cut]
    return f"{head}~{hashlib.sha256(raw).hexdigest()[:_HASH_CHARS]}"


def _temp_beside(path: Path) -> Path:
    """A unique hidden name next to `path` (matched by _TEMP_NAME, so `list` never shows it) for writing an
    object whole before it is moved or linked into place."""
    return path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")


def _check_key(key: str) -> None:
    if not key or key.startswith("/") or "\0" in key or {"", ".", ".."} & set(key.split("/")):
        raise ValueError(f"storage key must be a relative path without empty, '.' or '..' parts, got {key!r}")


def split_object_uri(uri: str) -> tuple[str, str]:
    """(root, key) of one object's URI, for `open_storage(root).get(key)`: s3://bucket/key -> ("s3://bucket", key);
    a local or file:// path (relative to the working directory, `~` expanded) -> ("/", the absolute path without
    its leading "/"). ValueError where no valid key remains."""
    if uri.startswith("s3://"):
        bucket, _, key = uri[len("s3://"):].partition("/")
        if not bucket:
            raise ValueError(f"object URI {uri!r} names no bucket")
        root = f"s3://{bucket}"
    else:
        root, key = "/", os.path.abspath(os.path.expanduser(uri.removeprefix("file://"))).lstrip("/")
    _check_key(key)
    return root, key


def open_storage(uri: str, *, retry_deadline_s: float = 120.0, max_workers: int = 16) -> Storage:
    """Open the output root `uri`: a local path, ``file://`` path or ``s3://bucket/prefix``."""
    if retry_deadline_s < 0:
        raise JobConfigError(f"`retry_deadline_s` must be >= 0 but is {retry_deadline_s}")
    if max_workers < 1:
        raise JobConfigError(f"`max_workers` must be >= 1 but is {max_workers}")
    scheme, separator, rest = uri.partition("://")
    scheme = scheme.lower() if separator else ""
    if scheme == "s3":
        return S3Storage(rest, retry_deadline_s=retry_deadline_s, max_workers=max_workers)
    if scheme not in ("", "file") or not uri:
        raise JobConfigError(f"unsupported output URI {uri!r}: use a local path, file://path or s3://bucket/prefix")
    return LocalStorage(rest if separator else uri, file_uri=scheme == "file", max_workers=max_workers)


class Storage(ABC):
    """Objects under one root, addressed by "/"-separated keys relative to it."""

    uri: str
    max_workers: int

    def uri_for(self, key: str) -> str:
        return f"{self.uri}/{key}"

    @abstractmethod
    def put(self, key: str, data: bytes, content_type: str | None = None) -> None:
        """Store `data` whole or not at all, replacing any object at `key`."""

    @abstractmethod
    def put_if_absent(self, key: str, data: bytes, content_type: str | None = None) -> bool:
        """Store `data` whole at `key` only if no object is there; True if this call created it. Of concurrent
        callers at most one gets True. A call whose first attempt created the object but whose reply was lost
        returns False on its retry: callers that must know who won read the object back."""

    @abstractmethod
    def get(self, key: str, max_bytes: int | None = None) -> bytes:
        """Return the object's bytes; raise `NotFound` when it does not exist and `ObjectTooLarge` when it has
        more than `max_bytes` (judged from its length before reading and from the bytes read, reading at most
        `max_bytes` + 1)."""

    @abstractmethod
    def size(self, key: str) -> int | None:
        """Return the object's size in bytes, or None when it does not exist."""

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[str]:
        """Yield the keys that start with `prefix`, at any depth, in sorted order."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object; a missing object is not an error."""

    @abstractmethod
    def open_write(self, key: str, content_type: str | None = None) -> AbstractContextManager[BinaryIO]:
        """A file to stream an object into, stored at `key` whole when the block exits cleanly and never
        otherwise: large objects (shards) are written without holding them in memory."""

    @abstractmethod
    def local_copy(self, key: str) -> AbstractContextManager[Path]:
        """A local file holding the object's bytes for the block's duration (the object itself when local)."""

    def exists(self, key: str) -> bool:
        return self.size(key) is not None

    def put_many(self, items: Iterable[tuple[str, bytes, str | None]]) -> None:
        """Put (key, data, content_type) items in parallel; raise the first failure once all are done."""
        with ThreadPoolExecutor(self.max_workers, thread_name_prefix="storage-put") as pool:
            futures = [pool.submit(self.put, key, data, content_type) for key, data, content_type in items]
            wait(futures, return_when=FIRST_EXCEPTION)
            for future in futures:
                future.cancel()
        errors = [f.exception() for f in futures if not f.cancelled() and f.exception() is not None]
        if len(errors) > 1:
            logger.warning("%d uploads under %s failed; raising the first", len(errors), self.uri)
        if errors:
            raise errors[0]


class LocalStorage(Storage):
    """A directory; `put` writes a hidden temp file beside the target and renames it into place."""

    def __init__(self, path: str, *, file_uri: bool = False, max_workers: int = 16):
        self.root = Path(path).expanduser().absolute()
        self.uri = f"file://{self.root}" if file_uri else str(self.root)
        self.max_workers = max_workers

    def _path(self, key: str) -> Path:
        _check_key(key)
        return self.root / key

    def put(self, key: str, data: bytes, content_type: str | None = None) -> None:
        path = self._path(key)
        temp = _temp_beside(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                temp.write_bytes(data)
                os.replace(temp, path)
            except BaseException:
                temp.unlink(missing_ok=True)
                raise
        except OSError as exc:
            raise StorageError(f"put {self.uri_for(key)} failed: {exc}") from exc

    def put_if_absent(self, key: str, data: bytes, content_type: str | None = None) -> bool:
        # Written whole under a temp name, then hard-linked to the key: link() fails if the key exists, and
        # the key never shows a partly written file.
        path = self._path(key)
        temp = _temp_beside(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                temp.write_bytes(data)
                os.link(temp, path)
            except FileExistsError:
                return False
            finally:
                temp.unlink(missing_ok=True)
        except OSError as exc:
            raise StorageError(f"create {self.uri_for(key)} failed: {exc}") from exc
        return True

    @contextmanager
    def open_write(self, key: str, content_type: str | None = None) -> Iterator[BinaryIO]:
        path = self._path(key)
        temp = _temp_beside(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(temp, "wb") as file:
                yield file
            os.replace(temp, path)
        except OSError as exc:
            raise StorageError(f"put {self.uri_for(key)} failed: {exc}") from exc
        finally:
            temp.unlink(missing_ok=True)

    @contextmanager
    def local_copy(self, key: str) -> Iterator[Path]:
        if self.size(key) is None:
            raise NotFound(f"get {self.uri_for(key)}: no such object")
        yield self._path(key)

    def get(self, key: str, max_bytes: int | None = None) -> bytes:
        try:
            with open(self._path(key), "rb") as file:
                if max_bytes is None:
                    return file.read()
                size = os.fstat(file.fileno()).st_size
                data = file.read(max_bytes + 1) if size <= max_bytes else b""
                if size > max_bytes or len(data) > max_bytes:
                    raise ObjectTooLarge(f"get {self.uri_for(key)}: more than {max_bytes} bytes",
                                         size if size > max_bytes else None)
                return data
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as exc:
            raise NotFound(f"get {self.uri_for(key)}: no such object") from exc
        except OSError as exc:
            raise StorageError(f"get {self.uri_for(key)} failed: {exc}") from exc

    def size(self, key: str) -> int | None:
        try:
            info = self._path(key).stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            raise StorageError(f"size {self.uri_for(key)} failed: {exc}") from exc
        return info.st_size if stat.S_ISREG(info.st_mode) else None

    def list(self, prefix: str = "") -> Iterator[str]:
        directory = prefix.rpartition("/")[0]
        if directory:
            _check_key(directory)

        def fail(exc: OSError) -> None:
            if not isinstance(exc, FileNotFoundError):
                raise StorageError(f"list {self.uri_for(prefix)} failed: {exc}") from exc

        keys = []
        for walked, _, names in os.walk(self.root / directory, onerror=fail):
            relative = Path(walked).relative_to(self.root).as_posix()
            for name in names:
                key = name if relative == "." else f"{relative}/{name}"
                if key.startswith(prefix) and not _TEMP_NAME.fullmatch(name):
                    keys.append(key)
        return iter(sorted(keys))

    def delete(self, key: str) -> None:
        try:
            self._path(key).unlink(missing_ok=True)
        except OSError as exc:
            raise StorageError(f"delete {self.uri_for(key)} failed: {exc}") from exc


class S3Storage(Storage):
    """A bucket prefix on any S3-compatible endpoint; endpoint, region and credentials come from the
    standard AWS environment and config files. Transient failures are retried until the deadline."""

    def __init__(self, bucket_and_prefix: str, *, retry_deadline_s: float = 120.0, max_workers: int = 16,
                 list_page_size: int = 1000, multipart_threshold: int = 8 * 2**20):
        bucket, _, prefix = bucket_and_prefix.partition("/")
        if not bucket:
            raise JobConfigError(f"output URI 's3://{bucket_and_prefix}' names no bucket")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.uri = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self.retry_deadline_s = retry_deadline_s
        self.max_workers = max_workers
        self.list_page_size = list_page_size
        self.multipart_threshold = multipart_threshold
        self._client: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_client": None}

    def _s3(self) -> Any:
        with _CLIENT_LOCK:
            if self._client is None:
                # One attempt per call: `_call` owns retrying, so the deadline bounds the whole operation
                # (botocore's own retries would add up to 3 x (connect + read timeout) past it).
                config = Config(retries={"mode": "standard", "max_attempts": 1}, connect_timeout=5,
                                read_timeout=60, max_pool_connections=self.max_workers)
                self._client = _session().client("s3", config=config)
            return self._client

    def _object_key(self, key: str) -> str:
        _check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _call(self, operation: str, key: str, request: Callable[[Any], _T]) -> _T:
        """Run `request(client)`, retrying unreachable-endpoint and 5xx/throttling errors with backoff until
        `retry_deadline_s`, checked between attempts (one attempt may overrun it by its connect/read timeout)."""
        started = time.monotonic()
        attempt = 0
        while True:
            attempt += 1
            try:
                return request(self._s3())
            except (BotoCoreError, ClientError) as exc:
                error = exc
            code = error.response.get("Error", {}).get("Code") if isinstance(error, ClientError) else None
            if code in ("NoSuchKey", "404", "NotFound"):
                raise NotFound(f"{operation} {self.uri_for(key)}: no such object") from error
            elapsed = time.monotonic() - started
            transient = _is_transient(error)
            if not transient or elapsed >= self.retry_deadline_s:
                tried = f" after {attempt} attempts in {elapsed:.1f}s" if attempt > 1 else ""
                kind = StorageUnavailable if transient else StorageError
                raise kind(f"{operation} {self.uri_for(key)} failed{tried}: {error}") from error
            backoff = random.uniform(0, min(_MAX_BACKOFF_S, _FIRST_BACKOFF_S * 2**attempt))
            delay = min(backoff, self.retry_deadline_s - elapsed)
            logger.warning("%s %s failed (attempt %d, retrying in %.1fs): %s",
                           operation, self.uri_for(key), attempt, delay, error)
            time.sleep(delay)

    def put(self, key: str, data: bytes, content_type: str | None = None) -> None:
        name = self._object_key(key)
        extra = {"ContentType": content_type} if content_type else {}
        self._call("put", key, lambda s3: s3.put_object(Bucket=self.bucket, Key=name, Body=data, **extra))

    def put_if_absent(self, key: str, data: bytes, content_type: str | None = None) -> bool:
        """A conditional PUT (`If-None-Match: *`): S3 answers 412 PreconditionFailed when the key exists."""
        name = self._object_key(key)
        extra = {"ContentType": content_type} if content_type else {}
        try:
            self._call("create", key, lambda s3: s3.put_object(Bucket=self.bucket, Key=name, Body=data,
                                                              IfNoneMatch="*", **extra))
        except StorageError as exc:
            cause = exc.__cause__
            if isinstance(cause, ClientError) and cause.response.get("Error", {}).get("Code") in _EXISTS_CODES:
                return False
            raise
        return True

    @contextmanager
    def open_write(self, key: str, content_type: str | None = None) -> Iterator[BinaryIO]:
        """Spooled to a local temp file, then uploaded by boto3's managed transfer: multipart above
        `multipart_threshold`, parts in parallel, never the whole object in memory. A failed attempt is retried
        whole from the file until `retry_deadline_s`; S3 shows the object only once the upload completes."""
        with tempfile.TemporaryFile(prefix="batchgen-upload-") as file:
            yield file
            name = self._object_key(key)
            extra = {"ContentType": content_type} if content_type else {}
            config = TransferConfig(multipart_threshold=self.multipart_threshold, max_concurrency=4)

            def upload(s3: Any) -> None:
                file.seek(0)
                s3.upload_fileobj(file, self.bucket, name, ExtraArgs=extra, Config=config)

            try:
                self._call("upload", key, upload)
            except S3TransferRetriesExceededError as exc:
                raise StorageError(f"upload {self.uri_for(key)} failed: {exc}") from exc

    @contextmanager
    def local_copy(self, key: str) -> Iterator[Path]:
        with tempfile.TemporaryDirectory(prefix="batchgen-get-") as directory:
            path = Path(directory) / "object"
            self.download(key, path)
            yield path

    def get(self, key: str, max_bytes: int | None = None) -> bytes:
        """One GET. With `max_bytes`, an object whose ContentLength is larger is refused without reading its
        body, and at most `max_bytes` + 1 bytes are read (a length that was missing or wrong is caught there)."""
        name = self._object_key(key)

        def read(s3: Any) -> bytes:
            response = s3.get_object(Bucket=self.bucket, Key=name)
            body = response["Body"]
            try:
                if max_bytes is None:
                    return body.read()
                size = response.get("ContentLength")
                data = body.read(max_bytes + 1) if size is None or size <= max_bytes else b""
            finally:
                body.close()
            if (size is not None and size > max_bytes) or len(data) > max_bytes:
                raise ObjectTooLarge(f"get {self.uri_for(key)}: more than {max_bytes} bytes",
                                     size if size is not None and size > max_bytes else None)
            return data

        return self._call("get", key, read)

    def size(self, key: str) -> int | None:
        name = self._object_key(key)
        try:
            head = self._call("size", key, lambda s3: s3.head_object(Bucket=self.bucket, Key=name))
        except NotFound:
            return None
        return int(head["ContentLength"])

    def list(self, prefix: str = "") -> Iterator[str]:
        for info in self.list_objects(prefix):
            yield info.key

    def list_objects(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Like `list`, with each object's size and ETag (both come with the listing: no extra requests)."""
        root = f"{self.prefix}/" if self.prefix else ""
        request = {"Bucket": self.bucket, "Prefix": root + prefix, "MaxKeys": self.list_page_size}
        while True:
            page = self._call("list", prefix, lambda s3: s3.list_objects_v2(**request))
            for item in page.get("Contents", []):
                yield ObjectInfo(item["Key"][len(root) :], int(item["Size"]), item.get("ETag", "").strip('"'))
            if not page.get("IsTruncated"):
                return
            request["ContinuationToken"] = page["NextContinuationToken"]

    def download(self, key: str, path: Path, concurrency: int = 4) -> None:
        """Stream the object into the file `path`: constant memory, `concurrency` ranged GETs at once for large
        objects (callers downloading several files at once keep their product within `max_workers`, the size
        of the connection pool)."""
        name = self._object_key(key)
        config = TransferConfig(max_concurrency=concurrency)
        try:
            self._call("download", key, lambda s3: s3.download_file(self.bucket, name, str(path), Config=config))
        except S3TransferRetriesExceededError as exc:
            raise StorageError(f"download {self.uri_for(key)} failed: {exc}") from exc

    def delete(self, key: str) -> None:
        name = self._object_key(key)
        self._call("delete", key, lambda s3: s3.delete_object(Bucket=self.bucket, Key=name))


def _session() -> boto3.session.Session:
    """One boto3 session per process and AWS environment (call under _CLIENT_LOCK: sessions are not thread-safe).

    A new session re-reads botocore's data files, about 80 ms of CPU, and Ray unpickles a fresh S3Storage
    for every store task, so per-storage sessions cost that much per stored batch; a client from a cached
    session costs about 4 ms."""
    key = tuple(sorted((name, value) for name, value in os.environ.items() if name.startswith("AWS_")))
    if key not in _SESSIONS:
        _SESSIONS[key] = boto3.session.Session()
    return _SESSIONS[key]


def _is_transient(error: Exception) -> bool:
    if isinstance(error, ClientError):
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        code = error.response.get("Error", {}).get("Code")
        return status >= 500 or status == 429 or code in _TRANSIENT_CODES
    return isinstance(error, (ConnectionError, HTTPClientError)) and not isinstance(error, SSLError)

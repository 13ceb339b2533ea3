"""Storage: the same contract on a local directory and on a real S3 server, keys, retries and failures."""

from __future__ import annotations

import logging
import os
import pickle
import random
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import boto3
import pytest

from batchgen.errors import JobConfigError, StorageError
from batchgen.storage import LocalStorage, NotFound, S3Storage, Storage, object_key, open_storage
from tests.s3server import S3Server, free_port, use_s3_endpoint

pytestmark = pytest.mark.timeout(60)

NASTY_IDS = [
    "../../etc/passwd", "a/b", "a%2Fb", "a\\b", "a b", "é", "e\u0301", "😀", "\u202eabc\u202c", "שלום",
    ".", "..", "...", ".hidden", "%2E", "", "~", "%", "\x00", "\n", "\x1b[31m", "\x7f", "\ud800",
    "CON", "x" * 10_000, "x" * 9_999 + "y", "é" * 5_000, "/", "//", "a/", "/a", "a..b", "-_.",
]


@pytest.fixture(params=["local", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "local":
        return open_storage(str(tmp_path / "out"))
    bucket = request.getfixturevalue("s3_bucket")
    return open_storage(f"s3://{bucket}/runs/1", retry_deadline_s=10)


def test_roundtrip_put_get_size_exists_delete(storage: Storage) -> None:
    assert storage.uri_for("a/b.png") == f"{storage.uri}/a/b.png"
    assert (storage.size("a/b.png"), storage.exists("a/b.png")) == (None, False)
    storage.put("a/b.png", b"\x89PNG" + bytes(range(256)), "image/png")
    assert storage.get("a/b.png") == b"\x89PNG" + bytes(range(256))
    assert (storage.size("a/b.png"), storage.exists("a/b.png")) == (260, True)
    storage.put("a/b.png", b"")
    assert (storage.get("a/b.png"), storage.size("a/b.png")) == (b"", 0)
    storage.delete("a/b.png")
    storage.delete("a/b.png")
    assert not storage.exists("a/b.png")
    with pytest.raises(NotFound, match="a/b.png"):
        storage.get("a/b.png")


def test_put_if_absent_creates_once_and_of_racing_creators_exactly_one_wins(storage: Storage) -> None:
    """On S3 this is a real `If-None-Match: *` PUT to moto, whose second create answers 412 PreconditionFailed."""
    assert storage.put_if_absent("lock/1.json", b"first", "application/json") is True
    assert storage.put_if_absent("lock/1.json", b"second") is False
    assert storage.get("lock/1.json") == b"first"
    storage.put("lock/1.json", b"overwritten")  # a plain put still replaces it
    assert storage.get("lock/1.json") == b"overwritten"

    winners: list[int] = []
    start = threading.Barrier(8)

    def create(n: int) -> None:
        start.wait()
        if storage.put_if_absent("lock/2.json", str(n).encode()):
            winners.append(n)

    threads = [threading.Thread(target=create, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(winners) == 1 and storage.get("lock/2.json") == str(winners[0]).encode()
    assert list(storage.list("lock/")) == ["lock/1.json", "lock/2.json"], "a losing create left a file"


def test_list_is_recursive_sorted_and_prefix_filtered(storage: Storage) -> None:
    for key in ["c", "b/2", "a/10", "ab", "a/1", "a/deep/er/x"]:
        storage.put(key, key.encode())
    assert list(storage.list()) == ["a/1", "a/10", "a/deep/er/x", "ab", "b/2", "c"]
    assert list(storage.list("a/")) == ["a/1", "a/10", "a/deep/er/x"]
    assert list(storage.list("a")) == ["a/1", "a/10", "a/deep/er/x", "ab"]
    assert list(storage.list("a/1")) == ["a/1", "a/10"]
    assert list(storage.list("zzz/")) == []


def test_put_many_writes_every_item(storage: Storage) -> None:
    items = [(f"shard/{i:03d}.bin", os.urandom(i), "application/octet-stream") for i in range(60)]
    storage.put_many(items)
    assert list(storage.list("shard/")) == [key for key, _, _ in items]
    assert all(storage.get(key) == data for key, data, _ in items)


def test_keys_that_could_escape_the_root_are_refused(storage: Storage) -> None:
    for key in ["../x", "/abs", "a/../../x", "a//b", "", "./a"]:
        with pytest.raises(ValueError, match="storage key"):
            storage.put(key, b"x")


def test_put_many_raises_the_failure_after_the_other_uploads_finish(tmp_path: Path) -> None:
    storage = open_storage(str(tmp_path), max_workers=4)
    storage.put("blocker", b"a file where a directory is needed")
    items = [(f"ok/{i}", b"x", None) for i in range(20)]
    items.insert(5, ("blocker/child", b"x", None))
    with pytest.raises(StorageError, match="put .*blocker/child failed"):
        storage.put_many(items)
    assert set(storage.list("ok/")) <= {f"ok/{i}" for i in range(20)}
    assert storage.get("ok/0") == b"x"


def test_local_put_leaves_no_temp_files_and_list_hides_stale_ones(tmp_path: Path) -> None:
    storage = open_storage(f"file://{tmp_path}")
    assert storage.uri == f"file://{tmp_path}"
    storage.put("d/img.png", b"old")
    (tmp_path / "d" / f".img.png.tmp-{uuid.uuid4().hex}").write_bytes(b"left by a crashed writer")
    with pytest.raises(TypeError):
        storage.put("d/img.png", "not bytes")  # type: ignore[arg-type]
    assert storage.get("d/img.png") == b"old"
    assert list(storage.list()) == ["d/img.png"]
    assert len(os.listdir(tmp_path / "d")) == 2


def test_object_key_keeps_plain_ids_readable() -> None:
    assert object_key("shard-0001", "img_0001.png") == "shard-0001/img_0001.png"
    assert object_key("a/b") == "a%2Fb" != object_key("a", "b") == "a/b"
    assert object_key("..", ".x", "") == "%2E./%2Ex/~"


def _assert_safe_and_distinct(inputs: list[tuple[str, ...]], root: Path) -> list[str]:
    keys = [object_key(*parts) for parts in inputs]
    for key in keys:
        segments = key.split("/")
        assert not key.startswith("/") and not {"", ".", ".."} & set(segments), key
        assert all(len(segment) <= 150 and segment.isascii() and segment.isprintable() for segment in segments)
        assert (root / key).resolve().is_relative_to(root.resolve())
    assert len(set(keys)) == len(set(inputs))
    return keys


def test_object_key_is_safe_and_injective_on_nasty_ids(tmp_path: Path) -> None:
    inputs = [(nasty,) for nasty in NASTY_IDS] + [(a, b) for a in NASTY_IDS[:12] for b in NASTY_IDS[:12]]
    keys = _assert_safe_and_distinct(inputs, tmp_path)
    # A file cannot also be a directory, so one-part and two-part keys go under separate roots.
    stored = [f"{len(parts)}/{key}" for parts, key in zip(inputs, keys, strict=True)]
    storage = LocalStorage(str(tmp_path / "out"))
    storage.put_many((key, key.encode(), None) for key in stored)
    assert list(storage.list()) == sorted(stored)
    assert all(storage.get(key) == key.encode() for key in stored)


def test_object_key_is_injective_on_random_ids(tmp_path: Path) -> None:
    rng = random.Random(20240611)
    alphabet = list("./\\ %~_-aZ09") + ["\x00", "\n", "\x7f", "é", "😀", "\u202e", "\ud800"]
    inputs = {
        tuple("".join(rng.choices(alphabet, k=rng.choice([0, 1, 2, 5, 60, 200]))) for _ in range(rng.randint(1, 3)))
        for _ in range(5000)
    }
    _assert_safe_and_distinct(sorted(inputs), tmp_path)


def test_s3_list_pages_and_stays_under_the_prefix(s3_bucket: str) -> None:
    client = boto3.client("s3")
    for outside in ["run", "run2/x", "other/run/y"]:
        client.put_object(Bucket=s3_bucket, Key=outside, Body=b"")
    storage = S3Storage(f"{s3_bucket}/run", list_page_size=7)
    keys = [f"k/{i:02d}" for i in range(30)]
    storage.put_many((key, b"v", None) for key in keys)
    pages = []
    storage._s3().meta.events.register("before-call.s3.ListObjectsV2", lambda **kw: pages.append(kw))
    assert list(storage.list()) == keys
    assert len(pages) == 5


def test_s3_list_past_one_thousand_keys(s3_bucket: str) -> None:
    storage = open_storage(f"s3://{s3_bucket}/big")
    keys = [object_key(f"{i:04d}") for i in range(1003)]
    storage.put_many((key, b"", None) for key in keys)
    assert list(storage.list()) == keys


def test_s3_storage_pickles_after_use_and_works_in_another_process(s3_bucket: str) -> None:
    storage = open_storage(f"s3://{s3_bucket}/p")
    storage.put("k", b"from parent")
    clone = pickle.loads(pickle.dumps(storage))
    assert clone.get("k") == b"from parent"
    script = "import pickle, sys; s = pickle.load(sys.stdin.buffer); s.put('child', s.get('k') + b' via child')"
    subprocess.run([sys.executable, "-c", script], input=pickle.dumps(storage), check=True, timeout=30)
    assert storage.get("child") == b"from parent via child"


def test_s3_put_survives_the_endpoint_going_down_for_3s(
    s3_server: S3Server, s3_bucket: str, caplog: pytest.LogCaptureFixture
) -> None:
    storage = open_storage(f"s3://{s3_bucket}/run", retry_deadline_s=30)
    storage.put("before", b"1")
    s3_server.stop()
    restart = threading.Timer(3.0, s3_server.start)
    restart.start()
    started = time.monotonic()
    try:
        storage.put("during", b"2")
    finally:
        restart.join()
    assert 3.0 <= time.monotonic() - started < 30
    assert storage.get("during") == b"2"
    assert any(r.levelno == logging.WARNING and "retrying" in r.getMessage() for r in caplog.records)


def test_s3_unreachable_past_the_deadline_raises_naming_the_uri(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    use_s3_endpoint(monkeypatch, f"http://127.0.0.1:{free_port()}")
    storage = open_storage("s3://bucket/run", retry_deadline_s=2)
    started = time.monotonic()
    with pytest.raises(StorageError, match=r"put s3://bucket/run/k failed after \d+ attempts") as failure:
        storage.put("k", b"x")
    assert 2 <= time.monotonic() - started < 10
    assert "Could not connect" in str(failure.value) and "testing" not in str(failure.value)
    assert any(r.levelno == logging.WARNING for r in caplog.records)


def test_s3_missing_bucket_fails_at_once(s3_server: S3Server) -> None:
    storage = open_storage(f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/run", retry_deadline_s=30)
    started = time.monotonic()
    with pytest.raises(StorageError, match="put s3://no-such-bucket-.*/run/k failed: .*NoSuchBucket"):
        storage.put("k", b"x")
    with pytest.raises(StorageError, match="NoSuchBucket") as failure:
        storage.get("k")
    assert not isinstance(failure.value, NotFound)
    assert time.monotonic() - started < 5


@contextmanager
def scripted_s3(monkeypatch: pytest.MonkeyPatch, errors: list[tuple[int, str]]) -> Iterator[list[bytes]]:
    """An HTTP server on 127.0.0.1 that answers the first requests with `errors`, then 200; yields the
    bodies of the requests it received."""
    received: list[bytes] = []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_PUT(self) -> None:
            received.append(self.rfile.read(int(self.headers["Content-Length"])))
            if len(received) <= len(errors):
                status, code = errors[len(received) - 1]
                body = f"<Error><Code>{code}</Code><Message>scripted</Message></Error>".encode()
            else:
                status, body = 200, b""
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    use_s3_endpoint(monkeypatch, f"http://127.0.0.1:{server.server_address[1]}")
    try:
        yield received
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("status,code", [(503, "SlowDown"), (500, "InternalError")])
def test_s3_retries_5xx_beyond_botocore_until_it_succeeds(
    monkeypatch: pytest.MonkeyPatch, status: int, code: str
) -> None:
    with scripted_s3(monkeypatch, [(status, code)] * 5) as received:
        open_storage("s3://bucket/run", retry_deadline_s=30).put("k", b"payload")
    assert received == [b"payload"] * 6


def test_s3_access_denied_is_not_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    denied = pytest.raises(StorageError, match="put s3://bucket/run/k failed: .*AccessDenied")
    with scripted_s3(monkeypatch, [(403, "AccessDenied")] * 10) as received, denied:
        open_storage("s3://bucket/run", retry_deadline_s=30).put("k", b"payload")
    assert len(received) == 1


@pytest.mark.parametrize("uri", ["gs://bucket/out", "http://host/out", "s3a://bucket/out", "", "s3://"])
def test_unsupported_uri_is_a_config_error(uri: str) -> None:
    with pytest.raises(JobConfigError, match=repr(uri) if uri != "s3://" else "names no bucket"):
        open_storage(uri)

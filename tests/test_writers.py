"""Output writers called directly (no Ray): WebDataset and Parquet shards, roll-over, verification, S3 outages."""

from __future__ import annotations

import contextlib
import hashlib
import json
import tarfile
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchgen.errors import StorageError
from batchgen.manifest import inspect_output, read_manifests
from batchgen.models.source import ModelFacts
from batchgen.prompts import WORK_SCHEMA
from batchgen.resume import FINGERPRINT_KEY
from batchgen.stages import GENERATED_SCHEMA, StoreStage
from batchgen.storage import S3Storage, Storage, open_storage
from batchgen.writers import layout_for
from batchgen.writers.shards import sample_name
from tests.jobs import decode
from tests.s3proxy import forwarding_proxy

pytestmark = pytest.mark.timeout(120)

MODEL = ModelFacts("m", None, "f" * 64, "float32")


def generated_rows(n: int, errors: tuple[int, ...] = (), side: int = 16) -> pa.Table:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        row = {name: None for name in WORK_SCHEMA.names}
        row.update(id=f"row.{i}/x", sample_index=i % 2, prompt=f"a fox number {i}", negative_prompt="", seed=i,
                   guidance_scale=5.0, steps=2, width=side, height=side, scheduler="ddim", eta=0.0, extra="{}",
                   skipped=0, truncated=False, generate_ms=1.0, batch_size=n, worker="w")
        if i in errors:
            row.update(status="error", error="`prompt` boom")
        else:
            row.update(status="ok", pixels=rng.integers(0, 255, (side, side, 3), dtype=np.uint8).tobytes())
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=GENERATED_SCHEMA)


def store(storage: Storage, layout: str, batch: pa.Table, **limits: int) -> dict:
    """One store call with `layout`, recording the layout in the fingerprint as a job does."""
    storage.put(FINGERPRINT_KEY, json.dumps({"output": {"layout": layout}}).encode())
    stage = StoreStage(storage, "png", 90, MODEL, "run1", 1, layout_for(layout, **limits))
    return stage(batch).to_pylist()[0]


def listed(storage: Storage) -> list[dict]:
    return [row for _, table in read_manifests(storage) for row in table.to_pylist()]


def shard_paths(root: Path, ext: str) -> list[Path]:
    return sorted((root / "shards").glob(f"*.{ext}"))


def test_webdataset_shards_roll_over_by_count_and_read_back_with_the_webdataset_library(tmp_path):
    import webdataset as wds

    storage = open_storage(str(tmp_path))
    summary = store(storage, "webdataset", generated_rows(7, errors=(3,)), shard_samples=3)
    assert (summary["ok"], summary["errors"]) == (6, 1)
    shards = shard_paths(tmp_path, "tar")
    rows = listed(storage)
    assert len(summary["manifest"].split(",")) == len(shards) == 2, "one manifest part per shard"
    ok = [r for r in rows if r["status"] == "ok"]
    assert sorted(Counter(r["image_uri"] for r in ok).values()) == [3, 3]
    assert {r["image_uri"] for r in ok} == {storage.uri_for(f"shards/{p.name}") for p in shards}
    # Each listed sample is at its recorded offset, with its recorded sha256.
    for row in ok:
        data = (tmp_path / row["image_uri"][len(storage.uri) + 1 :]).read_bytes()[row["offset"]:][: row["bytes"]]
        assert hashlib.sha256(data).hexdigest() == row["sha256"]
    samples = list(wds.WebDataset([str(p) for p in shards], shardshuffle=False, empty_check=False))
    assert len(samples) == 6
    by_id = {(r["id"], r["sample_index"]): r for r in ok}
    for sample in samples:
        meta = json.loads(sample["json"])
        row = by_id[meta["id"], meta["sample_index"]]
        assert sample["__key__"] == sample_name(row["id"], row["sample_index"])
        assert sample["txt"].decode() == row["prompt"] and meta["sha256"] == row["sha256"]
        assert hashlib.sha256(sample["png"]).hexdigest() == row["sha256"]
        assert decode(sample["png"]).shape == (16, 16, 3)
    assert inspect_output(storage).problems == [f"{storage.uri}/_SUCCESS is missing: the job has not completed"]


def test_shards_roll_over_by_bytes(tmp_path):
    storage = open_storage(str(tmp_path))
    batch = generated_rows(5)
    one = store(open_storage(str(tmp_path / "probe")), "webdataset", generated_rows(1))
    size = listed(open_storage(str(tmp_path / "probe")))[0]["bytes"]
    assert one["ok"] == 1
    # The limit is reached by the second image of each shard: shards of 2, 2 and 1 samples.
    store(storage, "webdataset", batch, shard_samples=100, shard_bytes=size + 1)
    counts = Counter(r["image_uri"] for r in listed(storage))
    assert sorted(counts.values()) == [1, 2, 2], counts
    for path in shard_paths(tmp_path, "tar"):
        with tarfile.open(path) as tar:
            assert len(tar.getnames()) == 3 * counts[storage.uri_for(f"shards/{path.name}")]


def test_inspect_names_the_sample_of_a_corrupted_shard(tmp_path):
    storage = open_storage(str(tmp_path))
    store(storage, "webdataset", generated_rows(6), shard_samples=3)
    assert not [p for p in inspect_output(storage).problems if "_SUCCESS" not in p]
    victim = sorted(listed(storage), key=lambda r: r["id"])[4]
    path = tmp_path / victim["image_uri"][len(storage.uri) + 1 :]
    data = bytearray(path.read_bytes())
    data[victim["offset"] + victim["bytes"] // 2] ^= 0xFF  # one bit pattern inside the image, headers intact
    path.write_bytes(bytes(data))
    problems = [p for p in inspect_output(storage).problems if "_SUCCESS" not in p]
    assert len(problems) == 1, problems
    assert f"id={victim['id']!r} sample={victim['sample_index']}" in problems[0] and "sha256 mismatch" in problems[0]
    assert victim["image_uri"] in problems[0]


def test_parquet_shards_hold_images_and_metadata_for_datasets_and_ray(tmp_path, ray_local, monkeypatch):
    import datasets
    import ray

    storage = open_storage(str(tmp_path))
    store(storage, "parquet", generated_rows(5, errors=(1,)), shard_samples=2)
    shards = shard_paths(tmp_path, "parquet")
    assert len(shards) == 2
    rows = {(r["id"], r["sample_index"]): r for r in listed(storage) if r["status"] == "ok"}
    assert not [p for p in inspect_output(storage).problems if "_SUCCESS" not in p]

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    hf = datasets.load_dataset("parquet", data_files=[str(p) for p in shards], split="train",
                               cache_dir=str(tmp_path / "hf-cache"))
    from_ray = ray.data.read_parquet([str(p) for p in shards]).take_all()
    for found in (list(hf), from_ray):
        assert len(found) == 4
        for sample in found:
            row = rows[sample["id"], sample["sample_index"]]
            assert hashlib.sha256(sample["image"]).hexdigest() == row["sha256"] == sample["sha256"]
            assert sample["prompt"] == row["prompt"] and sample["seed"] == row["seed"]
            assert decode(sample["image"]).shape == (16, 16, 3)
    # A corrupted image in a Parquet shard is found and named too.
    victim = rows["row.2/x", 0]
    table = pq.read_table(tmp_path / victim["image_uri"][len(storage.uri) + 1 :])
    images = table.column("image").to_pylist()
    images[victim["offset"]] = images[victim["offset"]][:-1] + b"\x00"
    table = table.set_column(table.schema.get_field_index("image"), "image", pa.array(images, pa.binary()))
    pq.write_table(table, tmp_path / victim["image_uri"][len(storage.uri) + 1 :])
    problems = [p for p in inspect_output(storage).problems if "_SUCCESS" not in p]
    assert problems == [f"sample id='row.2/x' sample=0: sha256 mismatch for row {victim['offset']} of shard "
                        f"{victim['image_uri']}"]


@contextlib.contextmanager
def proxy(upstream: str, on_first_part) -> Iterator[int]:
    """An HTTP proxy to `upstream` that calls `on_first_part()` when the first multipart UploadPart arrives,
    before forwarding it; a request it cannot forward gets its connection closed, as a dead endpoint does."""
    seen = threading.Event()

    def first_part(handler) -> bool:
        if "partNumber=" in handler.path and not seen.is_set():
            seen.set()
            on_first_part()
        return False

    with forwarding_proxy(upstream, first_part) as port:
        yield port
    assert seen.is_set(), "no multipart upload went through the proxy"


def s3_output(bucket: str, port: int, monkeypatch, deadline_s: float) -> S3Storage:
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    # A threshold of 1 byte: even these small test shards go up as multipart uploads.
    return S3Storage(f"{bucket}/out", retry_deadline_s=deadline_s, multipart_threshold=1)


def test_s3_outage_during_a_multipart_shard_upload_is_retried(s3_server, s3_bucket, monkeypatch, caplog):
    def outage() -> None:
        s3_server.stop(keep_objects=True)
        threading.Timer(3.0, s3_server.start).start()

    with proxy(s3_server.endpoint, outage) as port:
        storage = s3_output(s3_bucket, port, monkeypatch, deadline_s=60)
        summary = store(storage, "webdataset", generated_rows(4), shard_samples=4)
    assert summary["ok"] == 4
    assert any("upload" in r.message and "retrying in" in r.message for r in caplog.records)
    (row, *_) = listed(storage)
    data = storage.get(row["image_uri"][len(storage.uri) + 1 :])
    assert hashlib.sha256(data[row["offset"] : row["offset"] + row["bytes"]]).hexdigest() == row["sha256"]
    assert len(list(storage.list("shards/"))) == 1


def test_s3_outage_past_the_deadline_fails_cleanly_and_the_rows_are_stored_by_a_rerun(
    s3_server, s3_bucket, monkeypatch
):
    with proxy(s3_server.endpoint, lambda: s3_server.stop(keep_objects=True)) as port:
        storage = s3_output(s3_bucket, port, monkeypatch, deadline_s=2)
        try:
            with pytest.raises(StorageError, match=r"upload s3://.*/out/shards/e1-\w+-000000.tar failed after"):
                store(storage, "webdataset", generated_rows(4), shard_samples=4)
        finally:
            s3_server.start()
        assert list(storage.list("shards/")) == [] and list(storage.list("manifests/")) == []
        summary = store(storage, "webdataset", generated_rows(4), shard_samples=4)
        assert summary["ok"] == 4 and len(list(storage.list("shards/"))) == 1
        assert not [p for p in inspect_output(storage).problems if "_SUCCESS" not in p]

"""The Ray stages called directly, without a cluster: generator actor and encode+store stage."""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from batchgen.manifest import read_manifests
from batchgen.models.source import ModelFacts
from batchgen.prompts import WORK_SCHEMA
from batchgen.stages import GENERATED_SCHEMA, GeneratorActor, StoreStage
from batchgen.storage import open_storage
from batchgen.writers.files import image_key


def work_row(row_id: str, status: str = "pending", **fields) -> dict:
    row = {"id": row_id, "sample_index": 0, "prompt": f"a photo of {row_id}", "negative_prompt": "", "seed": 3,
           "guidance_scale": 5.0, "steps": 2, "width": 32, "height": 24, "scheduler": "ddim", "eta": 0.0,
           "status": status, "error": None, "extra": "{}", "skipped": 0}
    row.update(fields)
    return row


@pytest.fixture(scope="module")
def actor(tiny_model_dir):
    options = {"source": str(tiny_model_dir), "device": "cpu", "dtype": "auto"}
    return GeneratorActor(options, batch_size=4, torch_threads=1)


def test_generator_generates_pending_and_passes_others(actor):
    rows = [
        work_row("a"),
        work_row("bad", status="error", error="`steps` must be ..."),
        {"id": "", "sample_index": -1, "status": "tally", "skipped": 5},
        work_row("b", seed=4, steps=300_000),
    ]
    out = actor(pa.Table.from_pylist(rows, schema=WORK_SCHEMA)).to_pylist()
    assert [r["status"] for r in out] == ["ok", "error", "tally", "error"]
    assert len(out[0]["pixels"]) == 24 * 32 * 3 and out[0]["batch_size"] == 1 and out[0]["worker"]
    assert out[0]["dtype"] == "float32", "the dtype the worker resolved, not the spec's `auto`"
    assert out[1]["error"] == "`steps` must be ..." and out[1]["pixels"] is None
    assert out[2]["skipped"] == 5
    assert "`steps` must be an integer in [1, 1000] but is 300000" in out[3]["error"]


@pytest.mark.parametrize(("fmt", "ext"), [("png", "png"), ("jpeg", "jpg"), ("webp", "webp")])
def test_store_encodes_uploads_then_writes_manifest(tmp_path, fmt, ext):
    storage = open_storage(str(tmp_path / "out"))
    pixels = np.random.default_rng(0).integers(0, 255, (24, 32, 3), dtype=np.uint8)
    rows = [
        {**work_row("../../etc/passwd"), "status": "ok", "pixels": pixels.tobytes(), "truncated": False,
         "generate_ms": 1.0, "batch_size": 2, "worker": "w"},
        {**work_row("x"), "status": "error", "error": "boom"},
        {"id": "", "sample_index": -1, "status": "tally", "skipped": 2},
    ]
    stage = StoreStage(storage, fmt, 80, ModelFacts("m", None, "f" * 64, "float32"), "run1", 1)
    (summary,) = stage(pa.Table.from_pylist(rows, schema=GENERATED_SCHEMA)).to_pylist()
    assert (summary["ok"], summary["errors"], summary["skipped"]) == (1, 1, 2)
    ((part, table),) = list(read_manifests(storage))
    assert part == summary["manifest"]
    ok, error = table.to_pylist()
    key = ok["image_uri"][len(storage.uri) + 1 :]
    assert key.startswith("images/") and key.endswith(f".{ext}") and ".." not in key.split("/")
    data = storage.get(key)
    assert hashlib.sha256(data).hexdigest() == ok["sha256"] and len(data) == ok["bytes"]
    image = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert image.shape == (24, 32, 3)
    if fmt == "png":
        assert np.array_equal(image, pixels), "PNG is lossless"
    assert (error["status"], error["error"], error["image_uri"]) == ("error", "boom", None)
    assert ok["model_sha256"] == "f" * 64 and ok["run_id"] == "run1" and ok["upload_ms"] >= 0


def test_image_keys_stay_inside_and_unique():
    ids = ["a", "a/b", "a%2Fb", "../x", "..", ".", "", "é", "a b", "🦊", "\u202eabc", "x" * 5000]
    keys = [image_key(i, 0, "png", 1) for i in ids] + [image_key(i, 0, "png", 2) for i in ids]
    assert len(set(keys)) == 2 * len(ids), "unique per id and per lease epoch"
    for key in keys:
        parts = key.split("/")
        assert parts[0] == "images" and len(parts) == 3 and all(p not in ("", ".", "..") for p in parts)


def test_below_generators_raises_every_thread_and_never_lowers():
    """Linux niceness is per thread: every existing thread is raised, threads started later inherit it, and a
    thread already nicer than asked keeps its niceness. Run in a child so this test process keeps its own."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import os, threading
        from batchgen.stages import below_generators

        started = threading.Event(); stop = threading.Event()
        def idle():
            started.set(); stop.wait()
        early = threading.Thread(target=idle); early.start(); started.wait()
        os.setpriority(os.PRIO_PROCESS, early.native_id, 18)
        below_generators(7)
        below_generators(7)  # idempotent: os.nice would add up
        late = threading.Thread(target=stop.wait); late.start()
        nice = lambda tid: os.getpriority(os.PRIO_PROCESS, tid)
        print(nice(threading.get_native_id()), nice(early.native_id), nice(late.native_id))
        stop.set()
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["7", "18", "7"]


def test_a_failed_stream_reports_the_storage_error_not_the_botocore_line_under_it():
    """Ray hands a worker's exception over as traceback text: the message is batchgen's own line (any batchgen
    module's exception class), not the library error chained under it."""
    from batchgen.pipeline import _job_error

    text = ("Traceback (most recent call last):\n"
            "botocore.exceptions.EndpointConnectionError: Could not connect to the endpoint URL: \"http://x/k\"\n\n"
            "The above exception was the direct cause of the following exception:\n\n"
            "batchgen.storage.StorageUnavailable: size s3://b/out/k failed after 4 attempts in 3.1s: Could not "
            "connect to the endpoint URL: \"http://x/k\"\n")
    message = str(_job_error(RuntimeError(text)))
    assert message.startswith("job failed while running: size s3://b/out/k failed after 4 attempts"), message

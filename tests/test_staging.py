"""s3:// model sources on a real moto S3 server: stage once per node (also under concurrent starts), load through
the real loader, hash from the listing, and fail naming the URI."""

from __future__ import annotations

import multiprocessing
import re
from collections import Counter
from pathlib import Path

import boto3
import numpy as np
import pytest

from batchgen.engine import Engine, GenerationRequest
from batchgen.errors import ModelLoadError
from batchgen.models.loading import load_model, weights_sha256
from batchgen.models.staging import COMPLETE_MARKER, remote_model_sha256, stage_model
from batchgen.storage import S3Storage
from tests.jobs import prompts_table, run_cli, write_table
from tests.s3objects import upload_dir
from tests.stager import stage_in_process, tree_sha256

pytestmark = pytest.mark.timeout(120)

STAGERS = 4


def get_requests(s3_server, bucket: str, prefix: str) -> Counter:
    """GET requests per object key under bucket/prefix, from the moto server's request log."""
    log = s3_server._log_path.read_text(errors="replace")  # the fixture's own log of every request
    pattern = re.compile(rf'"GET /{re.escape(bucket)}/{re.escape(prefix)}/([^ ?]+) HTTP')
    return Counter(pattern.findall(log))


@pytest.fixture
def remote_model(tiny_model_dir, s3_bucket) -> str:
    return upload_dir(tiny_model_dir, s3_bucket, "models/tiny-sd15")


def test_stage_then_load_gives_the_local_models_images(remote_model, tiny_model_dir, tiny_model, tmp_path,
                                                       monkeypatch):
    monkeypatch.setenv("BATCHGEN_MODEL_CACHE", str(tmp_path / "cache"))
    staged = load_model(remote_model, device="cpu", dtype="float32")
    assert staged.source == remote_model, "manifests record the s3:// source, not the node's cache path"
    loaded_from = Path(staged.pipe.config._name_or_path)
    assert loaded_from.is_relative_to(tmp_path / "cache")
    assert (loaded_from.parent / COMPLETE_MARKER).is_file()
    assert staged.weights_sha256 == weights_sha256(tiny_model_dir), "every file arrived, byte for byte"
    request = GenerationRequest(prompt="a lighthouse", seed=11, steps=2, width=32, height=32)
    from_s3 = Engine(staged).generate([request])[0].image
    from_disk = Engine(tiny_model).generate([request])[0].image
    np.testing.assert_array_equal(from_s3, from_disk)

    def no_download(*args):
        raise AssertionError("a staged model was downloaded again")

    monkeypatch.setattr(S3Storage, "download", no_download)
    assert stage_model(remote_model) == loaded_from


def test_concurrent_stagers_download_once(remote_model, s3_server, s3_bucket, tiny_model_dir, tmp_path):
    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager, context.Pool(STAGERS) as pool:
        barrier = manager.Barrier(STAGERS)
        results = pool.starmap(stage_in_process, [(remote_model, str(tmp_path / "cache"), barrier)] * STAGERS)
    assert len(set(results)) == 1, results
    path, digest = results[0]
    assert digest == tree_sha256(tiny_model_dir)
    gets = get_requests(s3_server, s3_bucket, "models/tiny-sd15")
    files = sorted(p.relative_to(tiny_model_dir).as_posix() for p in tiny_model_dir.rglob("*") if p.is_file())
    assert sorted(gets) == files and set(gets.values()) == {1}, f"GETs per key: {gets}"
    assert not list(Path(path).parent.glob(".download-*")), "no temp dir left behind"


def test_changed_remote_model_gets_a_new_entry_and_hash(remote_model, s3_bucket, tmp_path):
    cache = tmp_path / "cache"
    first_hash, first = remote_model_sha256(remote_model), stage_model(remote_model, cache)
    assert remote_model_sha256(remote_model) == first_hash, "the hash is stable while nothing changes"
    config = first / "scheduler" / "scheduler_config.json"
    changed = config.read_text().replace("{", '{"_batchgen_test": 1, ', 1)
    boto3.client("s3").put_object(Bucket=s3_bucket, Key="models/tiny-sd15/scheduler/scheduler_config.json",
                                  Body=changed.encode())
    second_hash, second = remote_model_sha256(remote_model), stage_model(remote_model, cache)
    assert second_hash != first_hash and second != first
    assert (second / "scheduler" / "scheduler_config.json").read_text() == changed
    assert config.read_text() != changed, "the earlier entry is untouched"
    with pytest.raises(ModelLoadError, match="changed since the job started"):
        stage_model(remote_model, cache, expected_sha256=first_hash)
    assert stage_model(remote_model, cache, expected_sha256=second_hash) == second


def test_incomplete_entry_is_downloaded_again(remote_model, tmp_path):
    """The marker is written last: an entry without it (a node died mid-staging) is not trusted."""
    path = stage_model(remote_model, tmp_path / "cache")
    (path.parent / COMPLETE_MARKER).unlink()
    (path / "model_index.json").write_text("truncated")
    (path.parent / ".download-leftover").mkdir()
    assert stage_model(remote_model, tmp_path / "cache") == path
    assert (path / "model_index.json").read_text().startswith("{")
    assert (path.parent / COMPLETE_MARKER).is_file() and not (path.parent / ".download-leftover").exists()


def test_missing_or_non_model_prefix_fails_naming_the_uri(s3_bucket, tmp_path):
    missing = f"s3://{s3_bucket}/models/none"
    for call in (remote_model_sha256, lambda uri: stage_model(uri, tmp_path / "cache")):
        with pytest.raises(ModelLoadError, match=re.escape(missing)):
            call(missing)
    boto3.client("s3").put_object(Bucket=s3_bucket, Key="models/half/unet/config.json", Body=b"{}")
    with pytest.raises(ModelLoadError, match="has no model_index.json"):
        remote_model_sha256(f"s3://{s3_bucket}/models/half")
    with pytest.raises(ModelLoadError, match="no-such-bucket-batchgen"):
        remote_model_sha256("s3://no-such-bucket-batchgen/model")


def test_key_escaping_the_cache_entry_is_refused(s3_bucket, tmp_path):
    s3 = boto3.client("s3")
    s3.put_object(Bucket=s3_bucket, Key="models/evil/model_index.json", Body=b"{}")
    s3.put_object(Bucket=s3_bucket, Key="models/evil/unet/../../../escape.txt", Body=b"x")
    with pytest.raises(ModelLoadError, match="not a safe relative path"):
        stage_model(f"s3://{s3_bucket}/models/evil", tmp_path / "cache")
    assert not list(tmp_path.rglob("escape.txt"))


def test_validate_with_a_missing_s3_model_exits_2(s3_bucket, tmp_path):
    prompts = write_table(tmp_path / "p.parquet", prompts_table(2))
    missing = f"s3://{s3_bucket}/models/none"
    result = run_cli("validate", "--prompts", str(prompts), "--model", missing, "--output", str(tmp_path / "out"))
    assert result.returncode == 2, result.stderr
    assert missing in result.stderr


def test_validate_prints_the_remote_hash(remote_model, tmp_path):
    prompts = write_table(tmp_path / "p.parquet", prompts_table(2))
    result = run_cli("validate", "--prompts", str(prompts), "--model", remote_model, "--output", str(tmp_path / "o"))
    assert result.returncode == 0, result.stderr
    assert f"model: {remote_model} (sha256 {remote_model_sha256(remote_model)[:16]})" in result.stdout

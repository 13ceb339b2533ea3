"""Commits without a cluster, locally and on S3 (moto): manifest part names that no ids can make collide, and
fencing, i.e. a run whose lease was taken over changes nothing that is committed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from batchgen import stages
from batchgen.lease import LeaseLost, OutputLease
from batchgen.manifest import inspect_output, manifest_key, manifest_parts, read_manifests
from batchgen.stages import GENERATED_SCHEMA, ModelFacts, StoreStage
from batchgen.storage import Storage, open_storage
from tests.test_stages import work_row

pytestmark = pytest.mark.timeout(120)

MODEL = ModelFacts("m", None, "f" * 64, "float32")


@pytest.fixture(params=["local", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "local":
        return open_storage(str(tmp_path / "out"))
    return open_storage(f"s3://{request.getfixturevalue('s3_bucket')}/out", retry_deadline_s=10)


def generated(ids: list[str], level: int = 0) -> pa.Table:
    """Ok rows of 8x8 images whose pixels are `level` (a regenerated batch differs by a level, as between
    batch sizes)."""
    pixels = np.full((8, 8, 3), level, dtype=np.uint8).tobytes()
    rows = [{**work_row(i, width=8, height=8), "status": "ok", "pixels": pixels, "truncated": False,
             "generate_ms": 1.0, "batch_size": len(ids), "worker": "w"} for i in ids]
    return pa.Table.from_pylist(rows, schema=GENERATED_SCHEMA)


def snapshot(storage: Storage) -> dict[str, bytes]:
    return {key: storage.get(key) for key in storage.list() if not key.startswith("_batchgen/lease/")}


def separator_batches() -> list[list[str]]:
    """Batches of 1 to 5 ids built from the separators of the old part-name encoding ("\\x00" between id and
    sample, "\\x01" after each pair): each k-id batch is followed by a 1-id batch whose id is the k ids joined
    with those separators, which the old encoding named identically; plus ids made only of separators."""
    batches = []
    for size in (2, 3, 5):
        ids = [f"p{size}{j}" for j in range(size)]
        batches += [ids, ["\x000\x01".join(ids)]]
    batches += [["\x00", "\x01"], ["\x00\x01"], [""], ["\x000\x01", "0"], ["_", "%", "/"]]
    return batches


def test_ids_made_of_separator_characters_never_make_two_parts_share_a_name(storage: Storage) -> None:
    batches = separator_batches()
    stage = StoreStage(storage, "png", 90, MODEL, "run", 1)
    for ids in batches:
        stage(generated(ids))
    every_id = [i for ids in batches for i in ids]
    assert len(set(every_id)) == len(every_id)
    assert len(manifest_parts(storage)) == len(batches), "a part replaced another"
    listed = sorted(row["id"] for _, table in read_manifests(storage) for row in table.to_pylist())
    assert listed == sorted(every_id)
    report = inspect_output(storage)
    assert report.ok == len(every_id) and report.problems == [f"{storage.uri}/_SUCCESS is missing: the job has "
                                                              "not completed"]
    rows = [{"id": i, "sample_index": 0} for i in ["a", "b"]]
    assert manifest_key(rows, 1) == manifest_key(rows[::-1], 1), "named by the set of pairs, not their order"
    assert manifest_key(rows, 1) != manifest_key(rows, 2), "no two lease epochs share a part name"


def test_a_run_whose_lease_was_taken_over_changes_nothing_committed(
    storage: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The old holder's in-flight store tasks keep arriving after a takeover: here called with its epoch."""
    clock = [1000.0]
    old = OutputLease(storage, "old", timeout_s=10, clock=lambda: clock[0])
    old.acquire()
    old_stage = StoreStage(storage, "png", 90, MODEL, "old", old.epoch)
    old_stage(generated(["a", "b"], level=10))  # committed before the takeover

    clock[0] += 11  # the old driver stopped heartbeating: its lease is stale
    new = OutputLease(storage, "new", timeout_s=10, clock=lambda: clock[0])
    new.acquire()
    new_stage = StoreStage(storage, "png", 90, MODEL, "new", new.epoch)
    new_stage(generated(["c", "d"], level=21))
    committed = snapshot(storage)

    for late in (["c", "d"], ["e"], ["a", "b"]):  # the old run's late batches: redone, new, already committed
        with pytest.raises(LeaseLost, match="taken over"):
            old_stage(generated(late, level=99))
    assert snapshot(storage) == committed, "a fenced writer changed the output"

    # The one window fencing leaves: a late batch that passed its check just before the takeover commits after
    # it (here: the check skipped). Its image has a key of its own epoch, so nothing committed is overwritten;
    # the pair it duplicates resolves to the newer epoch's row.
    monkeypatch.setattr(stages, "check_fence", lambda storage, epoch: None)
    old_stage(generated(["c"], level=99))
    assert all(storage.get(key) == data for key, data in committed.items()), "a committed object changed"
    report = inspect_output(storage)
    assert (report.ok, report.superseded) == (4, 1)
    assert report.problems == [f"{storage.uri}/_SUCCESS is missing: the job has not completed"]

"""The reader without Ray: file discovery, column mapping, ids, seeds, samples, resume skipping."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchgen import prompts
from batchgen.errors import JobConfigError
from batchgen.prompts import DoneKeys, RowReader, derive_seed, describe_groups, plan_input, sample_key
from batchgen.rows import GROUP_FIELDS
from batchgen.spec import InputSpec, SamplingSpec
from tests.jobs import prompts_table, write_table


def read_all(plan, sampling=None, done=DoneKeys()) -> list[dict]:
    reader = RowReader(plan, sampling or SamplingSpec(), rows_per_read=4, done=done)
    return [row for task in plan.tasks for table in reader.read(task) for row in table.to_pylist()]


def test_directory_and_glob_find_the_same_files(tmp_path):
    write_table(tmp_path / "in" / "a.parquet", prompts_table(3))
    write_table(tmp_path / "in" / "sub" / "b.parquet", prompts_table(2, start=3))
    (tmp_path / "in" / "_SUCCESS").write_text("")
    (tmp_path / "in" / "notes.txt").write_text("not parquet")
    by_dir = plan_input(InputSpec(prompts=str(tmp_path / "in")))
    by_glob = plan_input(InputSpec(prompts=str(tmp_path / "in" / "**.parquet")))
    assert by_dir.rows == by_glob.rows == 5
    assert by_dir.files == by_glob.files and len(by_dir.files) == 2
    ids = [r["id"] for r in read_all(by_dir)]
    assert ids == ["a.parquet:0", "a.parquet:1", "a.parquet:2", "sub/b.parquet:0", "sub/b.parquet:1"]


def test_row_groups_become_separate_tasks_with_positional_ids(tmp_path):
    path = tmp_path / "p.parquet"
    import pyarrow.parquet as pq

    pq.write_table(prompts_table(10), path, row_group_size=4)
    plan = plan_input(InputSpec(prompts=str(path)))
    assert [(t.row_group, t.first_row) for t in plan.tasks] == [(0, 0), (1, 4), (2, 8)]
    assert [r["id"] for r in read_all(plan)] == [f"p.parquet:{i}" for i in range(10)]


def test_seeds_depend_only_on_job_seed_and_identity(tmp_path):
    first = write_table(tmp_path / "v1.parquet", prompts_table(3, id=["x", "y", "z"]))
    grown = write_table(tmp_path / "v2.parquet", prompts_table(5, id=["new", "x", "y", "other", "z"]))
    seeds_before = {r["id"]: r["seed"] for r in read_all(plan_input(InputSpec(prompts=str(first))))}
    seeds_after = {r["id"]: r["seed"] for r in read_all(plan_input(InputSpec(prompts=str(grown))))}
    assert all(seeds_after[k] == v for k, v in seeds_before.items()), "appending rows never moves seeds"
    assert seeds_before["x"] == derive_seed(0, "x", 0)
    other_job = read_all(plan_input(InputSpec(prompts=str(first))), SamplingSpec(seed=1))
    assert other_job[0]["seed"] != seeds_before["x"]


def test_num_images_expands_samples_and_resume_skips_done(tmp_path):
    path = write_table(tmp_path / "p.parquet", prompts_table(2, id=["a", "b"], num_images=[3, None]))
    plan = plan_input(InputSpec(prompts=str(path)))
    rows = read_all(plan, SamplingSpec(num_images=2))
    assert [(r["id"], r["sample_index"]) for r in rows] == [("a", 0), ("a", 1), ("a", 2), ("b", 0), ("b", 1)]
    assert len({r["seed"] for r in rows}) == 5
    done = DoneKeys([sample_key("a", 1), sample_key("b", 0)])
    again = read_all(plan, SamplingSpec(num_images=2), done)
    pending = [(r["id"], r["sample_index"]) for r in again if r["status"] == "pending"]
    assert pending == [("a", 0), ("a", 2), ("b", 1)]
    assert sum(r["skipped"] for r in again if r["status"] == "tally") == 2


def test_extra_columns_are_carried_and_mapping_applies(tmp_path):
    table = pa.table({"caption": ["a cat"], "cfg": [3.0], "license": ["cc-by"]})
    path = write_table(tmp_path / "p.parquet", table)
    plan = plan_input(InputSpec(prompts=str(path), columns={"caption": "prompt", "cfg": "guidance_scale"}))
    (row,) = read_all(plan)
    assert (row["prompt"], row["guidance_scale"], row["extra"]) == ("a cat", 3.0, '{"license": "cc-by"}')


def test_unknown_mapping_target_is_a_job_error():
    with pytest.raises(ValueError, match="maps to unknown field 'promt'"):
        InputSpec(columns={"caption": "promt"})


def test_missing_and_empty_inputs_are_job_errors(tmp_path):
    with pytest.raises(JobConfigError, match="does not exist"):
        plan_input(InputSpec(prompts=str(tmp_path / "nothing.parquet")))
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(JobConfigError, match="matches no Parquet files"):
        plan_input(InputSpec(prompts=str(tmp_path / "empty_dir")))
    empty = write_table(tmp_path / "e.parquet", prompts_table(0))
    with pytest.raises(JobConfigError, match="has no rows"):
        plan_input(InputSpec(prompts=str(empty)))


def test_duplicate_ids_are_a_job_error_listing_examples(tmp_path):
    path = write_table(tmp_path / "p.parquet", prompts_table(4, id=["a", "b", "a", "b"]))
    with pytest.raises(JobConfigError, match=r"unique ids but 2 repeat, e\.g\. \['a', 'b'\]"):
        plan_input(InputSpec(prompts=str(path)))


def test_done_keys_membership():
    keys = [sample_key(f"id-{i}", i % 3) for i in range(1000)]
    done = DoneKeys(keys[:500] + keys[:10])
    assert len(done) == 500
    assert all(k in done for k in keys[:500]) and not any(k in done for k in keys[500:])
    assert 0 not in DoneKeys() and 2**64 - 1 not in done


def test_describe_groups_counts_batch_by_batch_with_image_bytes(tmp_path, monkeypatch):
    """`batchgen validate` reads the group columns in batches (an init_image column of bytes is not held whole):
    the counts are those of the rows, whatever the batch size, and bytes count as an image."""
    n = 10
    table = pa.table({"prompt": [f"p{i}" for i in range(n)], "num_images": [1, 2] * 5,
                      "init_image": [b"\x89PNG" if i % 3 else None for i in range(n)],
                      "strength": [0.5 if i in (1, 2) else None for i in range(n)]})
    path = tmp_path / "p.parquet"
    pq.write_table(table, path, row_group_size=4)
    plan = plan_input(InputSpec(prompts=str(path)))
    counts = []
    for batch_rows in (3, 4096):
        monkeypatch.setattr(prompts, "DESCRIBE_BATCH_ROWS", batch_rows)
        counts.append(describe_groups(plan, SamplingSpec()))
    assert counts[0] == counts[1]
    images, groups = counts[0]
    assert images == 15
    by_image = {}
    for key, count in groups.items():
        fields = dict(zip(GROUP_FIELDS, key, strict=True))
        pair = fields["init_image"], fields["strength"]
        by_image[pair] = by_image.get(pair, 0) + count
    assert by_image == {(True, 0.5): 3, (True, 0.8): 6, (False, None): 6}, by_image

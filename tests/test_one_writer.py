"""One writer per output, end to end on the session's local Ray: runs started at once into one output (locally
and on S3) where one takes a dead driver's stale lease and the others refuse before any Ray work; a rerun with
nothing to do that never reaches Ray; an output inside its input; Ctrl-C; outputs batchgen did not make."""

from __future__ import annotations

import json
import time

import pytest
from click.testing import CliRunner

from batchgen import pipeline
from batchgen.cli import main
from batchgen.errors import JobConfigError
from batchgen.lease import LeaseHeld, OutputLease, latest_epoch, read_holder
from batchgen.manifest import SUCCESS_KEY
from batchgen.pipeline import plan_job, run_job
from batchgen.storage import open_storage
from tests.jobs import JobThread, assert_accounted, job_spec, prompts_table, run_cli, write_spec, write_table

pytestmark = pytest.mark.usefixtures("ray_local")

NOWHERE = "127.0.0.1:1"  # a Ray address that cannot be joined: a run that reaches init_ray fails with exit 1


@pytest.mark.timeout(300)
@pytest.mark.parametrize("where", ["local", "s3"])
def test_three_runs_at_once_into_one_output_one_writes_the_others_refuse_then_nothing_is_left(
    where, tiny_model_dir, tmp_path, request
):
    output = str(tmp_path / "out") if where == "local" else f"s3://{request.getfixturevalue('s3_bucket')}/out"
    prompts = write_table(tmp_path / "p.parquet", prompts_table(12))
    storage = open_storage(output)
    # A driver that died holding the lease: its last heartbeat is a minute old, its timeout 5 s.
    OutputLease(storage, "deaddriver", timeout_s=5, clock=lambda: time.time() - 60).acquire()

    jobs = [JobThread(job_spec(tiny_model_dir, str(prompts), output, **{"compute.batch_size": size}))
            for size in (2, 4, 4)]  # different batch sizes and equal ones
    for job in jobs:
        job.start()
    for job in jobs:
        job.join(240)
    assert not any(job.is_alive() for job in jobs)
    (winner,) = [job for job in jobs if job.error is None]
    losers = [job.error for job in jobs if job.error is not None]
    assert all(isinstance(e, LeaseHeld) and e.exit_code == 2 for e in losers), losers
    assert all(f"run {winner.summary['run_id']} (host" in str(e) and "last seen" in str(e) for e in losers), losers
    assert winner.summary["lease_epoch"] == 2 and winner.summary["generated"] == 12
    assert read_holder(storage, 2).released and latest_epoch(storage) == 2
    final = assert_accounted(storage, {(f"p.parquet:{i}", 0) for i in range(12)})
    assert all(row["run_id"] == winner.summary["run_id"] for row in final.values())

    spec = write_spec(tmp_path / "job.yaml", job_spec(tiny_model_dir, str(prompts), output))
    # While a run holds the lease, another refuses at once naming it, before reaching Ray.
    with OutputLease(storage, "liverun", timeout_s=60):
        refused = run_cli("run", str(spec), "--address", NOWHERE)
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert "is being written by run liverun" in refused.stderr and "last seen" in refused.stderr

    # One more run: everything is committed, so it exits 0 without starting (or joining) Ray.
    rerun = run_cli("run", str(spec), "--address", NOWHERE)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    summary = json.loads(storage.get(SUCCESS_KEY))
    assert (summary["generated"], summary["skipped_done"], summary["images_ok_total"]) == (0, 12, 12)
    assert assert_accounted(storage, final) == final, "the rerun changed a committed row"


@pytest.mark.timeout(240)
def test_an_output_inside_its_input_directory_or_glob_is_never_read_as_input(tiny_model_dir, tmp_path):
    data = tmp_path / "data"
    ids = [f"row-{i}" for i in range(6)]
    write_table(data / "p.parquet", prompts_table(6, id=ids))
    out = data / "out"  # its manifests are Parquet files with `id` and `prompt` columns
    run_job(job_spec(tiny_model_dir, str(data), str(out)))
    assert list((out / "manifests").glob("*.parquet"))

    for prompts in (str(data), str(data / "*.parquet")):  # fnmatch's * crosses "/": the glob matches them too
        assert plan_job(job_spec(tiny_model_dir, prompts, str(out))).input.files == [str(data / "p.parquet")]
        rerun = run_job(job_spec(tiny_model_dir, prompts, str(out)))
        assert (rerun["generated"], rerun["skipped_done"]) == (0, 6)  # resumable: nothing left to do
    assert_accounted(open_storage(str(out)), {(i, 0) for i in ids})

    with pytest.raises(JobConfigError, match="lies inside `output.uri`"):
        plan_job(job_spec(tiny_model_dir, str(out / "manifests"), str(out)))


def test_ctrl_c_exits_130_saying_how_to_resume_and_releases_the_lease(tiny_model_dir, tmp_path, monkeypatch):
    prompts = write_table(tmp_path / "p.parquet", prompts_table(2))
    out = tmp_path / "out"

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "start_ray", interrupted)  # the lease is held from here on
    result = CliRunner().invoke(main, ["run", str(write_spec(tmp_path / "job.yaml",
                                                             job_spec(tiny_model_dir, str(prompts), str(out))))])
    assert result.exit_code == 130
    assert "interrupted; run the same command again to resume" in result.stderr
    assert read_holder(open_storage(str(out)), 1).released


def test_a_success_file_batchgen_did_not_write_is_never_replaced(tiny_model_dir, tmp_path):
    prompts = write_table(tmp_path / "p.parquet", prompts_table(2))
    out = tmp_path / "someone_elses"
    out.mkdir()
    (out / "_SUCCESS").write_text("their marker")
    spec = write_spec(tmp_path / "job.yaml", job_spec(tiny_model_dir, str(prompts), str(out)))
    result = CliRunner().invoke(main, ["run", str(spec)])
    assert result.exit_code == 2 and "holds a _SUCCESS that batchgen did not write" in result.stderr
    assert (out / "_SUCCESS").read_text() == "their marker" and sorted(p.name for p in out.iterdir()) == ["_SUCCESS"]

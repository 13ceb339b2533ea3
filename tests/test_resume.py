"""Resume: a rerun into the same output skips what is committed, retries errors unless told not to, generates
appended rows and nothing else, and refuses settings that would mix differently made images."""

from __future__ import annotations

import json
import shutil
import time

import pyarrow as pa
import pytest
from click.testing import CliRunner

from batchgen import resume
from batchgen.cli import main
from batchgen.errors import JobConfigError
from batchgen.manifest import MANIFEST_PREFIX, SUCCESS_KEY, manifest_parts, write_success
from batchgen.pipeline import plan_job, run_job
from batchgen.resume import check_fingerprint
from batchgen.storage import open_storage
from tests.jobs import (
    JobThread,
    assert_accounted,
    job_spec,
    manifest_rows,
    prompts_table,
    success,
    write_spec,
    write_table,
)

pytestmark = pytest.mark.usefixtures("ray_local")


def prompts_v1(rows: int) -> pa.Table:
    """Row 3 is invalid (steps 0); row 7 is valid but its generation overflows (guidance 1e300 is inf in
    float32); row 0 asks for two images."""
    steps = [None] * rows
    steps[3] = 0
    guidance = [None] * rows
    guidance[7] = 1e300
    num_images = [None] * rows
    num_images[0] = 2
    return prompts_table(rows, steps=pa.array(steps, pa.int64()), guidance_scale=pa.array(guidance, pa.float64()),
                         num_images=pa.array(num_images, pa.int64()))


def expected_pairs(rows: int) -> set[tuple[str, int]]:
    return {("p.parquet:0", 1)} | {(f"p.parquet:{i}", 0) for i in range(rows)}


def assert_committed_in_order(out) -> None:
    """Images before the manifest that lists them, every manifest before _SUCCESS; no temp file left behind."""
    storage = open_storage(str(out))
    success_at = (out / SUCCESS_KEY).stat().st_mtime_ns
    for part in manifest_parts(storage):
        written = (out / part).stat().st_mtime_ns
        assert written <= success_at, f"{part} written after _SUCCESS"
        for row in manifest_rows_of(storage, part):
            if row["status"] == "ok":
                image = out / row["image_uri"][len(storage.uri) + 1 :]
                assert image.stat().st_mtime_ns <= written, f"{image} written after {part}, which lists it"
    assert not [p for p in out.rglob(".*") if ".tmp-" in p.name], "a write left its temp file"


def manifest_rows_of(storage, part: str) -> list[dict]:
    import io

    import pyarrow.parquet as pq

    return pq.read_table(io.BytesIO(storage.get(part))).to_pylist()


@pytest.mark.timeout(240)
def test_rerun_skips_committed_retries_errors_and_generates_only_appended_rows(tiny_model_dir, tmp_path):
    prompts = tmp_path / "in" / "p.parquet"
    out = tmp_path / "out"
    storage = open_storage(str(out))
    write_table(prompts, prompts_v1(16))
    spec = job_spec(tiny_model_dir, str(prompts), str(out), **{"compute.batch_size": 4})

    first = run_job(spec)
    rows = assert_accounted(storage, expected_pairs(16))
    assert (rows["p.parquet:3", 0]["status"], rows["p.parquet:7", 0]["status"]) == ("error", "error")
    assert "`steps` must be an integer in [1, 1000] but is 0" in rows["p.parquet:3", 0]["error"]
    assert "non-finite" in rows["p.parquet:7", 0]["error"]
    assert (first["generated"], first["skipped_done"], first["images_ok"], first["errors"]) == (17, 0, 15, 2)
    assert success(storage)["run_id"] == first["run_id"]
    assert_committed_in_order(out)
    parts = {part: (out / part).stat().st_mtime_ns for part in manifest_parts(storage)}
    images = {path: path.stat().st_mtime_ns for path in (out / "images").rglob("*.png")}

    # --no-retry-errors: everything is done, ok or error; nothing is generated, nothing is rewritten.
    cli = CliRunner().invoke(main, ["run", str(write_spec(tmp_path / "job.yaml", spec)), "--no-retry-errors"])
    assert cli.exit_code == 0, cli.output
    second = success(storage)
    assert (second["generated"], second["skipped_done"], second["images_ok_total"]) == (0, 17, 15)
    assert {part: (out / part).stat().st_mtime_ns for part in manifest_parts(storage)} == parts
    assert {path: path.stat().st_mtime_ns for path in (out / "images").rglob("*.png")} == images

    # Row 3 fixed in place and 8 rows appended: those 9 are generated, row 7 is retried (and fails again).
    table = prompts_v1(24)
    table = table.set_column(table.schema.get_field_index("steps"), "steps", pa.array([None] * 24, pa.int64()))
    guidance = [None] * 24
    guidance[7] = 1e300
    table = table.set_column(table.schema.get_field_index("guidance_scale"), "guidance_scale",
                             pa.array(guidance, pa.float64()))
    write_table(prompts, table)
    # A table rewritten under the same name is a changed input: refused naming the file, unless overridden.
    with pytest.raises(JobConfigError, match=r"input\.files\.p\.parquet: '\d+ bytes, modified \d+' in the output"):
        run_job(spec)
    spec = spec.model_copy(update={"output": spec.output.model_copy(update={"override_fingerprint": True})})
    job = JobThread(spec)
    job.start()
    # _SUCCESS is removed when a run starts, so an interrupted run never looks complete.
    wait_for_absent(storage, SUCCESS_KEY, job)
    third = job.result(timeout=180)
    rows = assert_accounted(storage, expected_pairs(24))
    assert (third["generated"], third["skipped_done"], third["images_ok"], third["errors"]) == (10, 15, 9, 1)
    assert (third["images_ok_total"], third["errors_total"]) == (24, 1)
    assert rows["p.parquet:3", 0]["status"] == "ok" and rows["p.parquet:7", 0]["status"] == "error"
    assert success(storage)["run_id"] == third["run_id"]
    (override,) = [json.loads(storage.get(key)) for key in storage.list("_batchgen/overrides/")]
    assert override["run_id"] == third["run_id"] and override["differences"][0].startswith("input.files.p.parquet: ")
    regenerated = {(r["id"], r["sample_index"]) for r in manifest_rows(storage) if r["run_id"] == third["run_id"]}
    assert regenerated == {("p.parquet:3", 0), ("p.parquet:7", 0)} | {(f"p.parquet:{i}", 0) for i in range(16, 24)}
    assert all((out / part).stat().st_mtime_ns == written for part, written in parts.items()), "old parts rewritten"
    assert all(path.stat().st_mtime_ns == written for path, written in images.items()), "committed images redone"
    assert_committed_in_order(out)

    # inspect reports a duplicate ok row and an orphan image (here planted by hand) and exits 1.
    duplicate = next(iter(parts))
    shutil.copy(out / duplicate, out / MANIFEST_PREFIX / "part-copy.parquet")
    (out / "images" / "00").mkdir(exist_ok=True)
    (out / "images" / "00" / "stray_0.png").write_bytes(b"not listed anywhere")
    report = CliRunner().invoke(main, ["inspect", str(out)])
    assert report.exit_code == 1
    assert "PROBLEM: duplicate ok rows for id=" in report.output and "part-copy.parquet" in report.output
    assert f"PROBLEM: orphan object {out}/images/00/stray_0.png" in report.output


def wait_for_absent(storage, key: str, job: JobThread) -> None:
    deadline = time.monotonic() + 60
    while storage.exists(key):
        assert job.is_alive() and time.monotonic() < deadline, f"{key} was never removed by the new run"
        time.sleep(0.02)


def test_changed_fingerprint_is_refused_naming_what_differs(tiny_model_dir, tmp_path, monkeypatch):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    prompts = write_table(tmp_path / "p.parquet", prompts_table(4))
    out = tmp_path / "out"
    storage = open_storage(str(out))
    base = {"output.format": "webp", "output.quality": 90}
    check_fingerprint(storage, plan_job(job_spec(model, str(prompts), str(out), **base)).fingerprint)
    write_success(storage, {"images_ok_total": 0})

    def refused(**changes) -> str:
        with pytest.raises(JobConfigError) as refusal:
            run_job(job_spec(model, str(prompts), str(out), **{**base, **changes}))
        return str(refusal.value)

    assert "sampling.steps: 2 in the output, 3 now" in refused(**{"sampling.steps": 3})
    assert "sampling.guidance_scale: 7.5 in the output, 2.0 now" in refused(**{"sampling.guidance_scale": 2.0})
    assert "sampling.scheduler: 'ddim' in the output, 'euler' now" in refused(**{"sampling.scheduler": "euler"})
    assert "sampling.seed: 5 in the output, 6 now" in refused(**{"sampling.seed": 6})
    assert "sampling.width: 32 in the output, 40 now" in refused(**{"sampling.width": 40})
    assert "output.format: 'webp' in the output, 'jpeg' now" in refused(**{"output.format": "jpeg"})
    assert "output.quality: 90 in the output, 80 now" in refused(**{"output.quality": 80})
    assert "model.dtype: 'float32' in the output, 'bfloat16' now" in refused(**{"model.dtype": "bfloat16"})
    with monkeypatch.context() as patched:  # a batchgen version that derives seeds differently
        original = resume.SEED_POLICY
        patched.setattr(resume, "SEED_POLICY", "sha512(seed, id)")
        assert f"seed_policy: {original!r} in the output, 'sha512(seed, id)' now" in refused()
    config = model / "unet" / "config.json"
    config.write_text(config.read_text() + " ")  # same weights tensors, different bytes: a different model
    message = refused()
    assert "model.sha256: '" in message and message.count("\n") == 1, message

    spec = write_spec(tmp_path / "job.yaml", job_spec(model, str(prompts), str(out), **base))
    cli = CliRunner().invoke(main, ["run", str(spec), "--steps", "9"])
    assert cli.exit_code == 2, cli.output
    assert "was made with different settings" in cli.stderr and "sampling.steps: 2 in the output, 9 now" in cli.stderr
    assert storage.exists(SUCCESS_KEY) and not storage.exists("_batchgen/job.yaml"), "a refused run wrote"

    # Settings that do not change pixels may change between runs.
    config.write_text(config.read_text()[:-1])
    for harmless in ({"compute.batch_size": 3}, {"output.retry_deadline_s": 5}, {"output.upload_workers": 2},
                     {"output.retry_errors": False}, {"compute.max_actors": 1, "compute.min_actors": 1}):
        check_fingerprint(storage, plan_job(job_spec(model, str(prompts), str(out), **base, **harmless)).fingerprint)
    moved = shutil.copytree(model, tmp_path / "elsewhere" / "model")  # same weights, another path
    check_fingerprint(storage, plan_job(job_spec(moved, str(prompts), str(out), **base)).fingerprint)

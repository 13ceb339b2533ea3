"""SD3 jobs: what the plan refuses before Ray starts, what the reader turns into error rows, and a job on S3 (moto)
with skip-layer guidance and without T5, killed and resumed."""

from __future__ import annotations

import numpy as np
import pytest

from batchgen.engine import Engine
from batchgen.errors import JobConfigError
from batchgen.manifest import request_from_row
from batchgen.models.loading import load_model
from batchgen.pipeline import plan_job, run_job
from batchgen.prompts import DoneKeys, RowReader, describe_groups, plan_input
from batchgen.resume import check_fingerprint
from batchgen.rows import GROUP_FIELDS
from batchgen.storage import open_storage
from tests.jobs import (
    assert_accounted,
    decode,
    job_spec,
    kill_run_after_manifests,
    prompts_table,
    run_cli,
    success,
    write_spec,
    write_table,
)
from tests.test_job import upload_table

SLG = {"layers": [1, 2], "scale": 2.8, "start": 0.01, "stop": 0.6}


def plan(model_dir, tmp_path, **overrides):
    prompts = write_table(tmp_path / "p.parquet", prompts_table(2))
    return plan_job(job_spec(model_dir, str(prompts), str(tmp_path / "out"), **overrides))


def test_plan_reads_the_sd3_model_and_resolves_its_job_options(tiny_sd35_dir, tmp_path):
    job = plan(tiny_sd35_dir, tmp_path, **{"sampling.skip_layer_guidance": SLG, "model.text_encoder_3": False})
    rules = job.rules
    assert (rules.family, rules.model_scheduler, rules.schedulers) == ("stable-diffusion-3", "euler",
                                                                       ("model", "euler", "heun"))
    assert (rules.vae_scale_factor, rules.patch_size, rules.denoiser_layers) == (8, 2, 4)
    assert job.model_options["skip_components"] == ("text_encoder_3", "tokenizer_3")
    assert job.model.dropped_components == "text_encoder_3,tokenizer_3"
    assert job.fingerprint["model"]["text_encoder_3"] is False
    sampling = job.fingerprint["sampling"]
    assert (sampling["max_sequence_length"], sampling["skip_layer_guidance"]) == (256, SLG), "unset = what runs"
    images, groups = describe_groups(job.input, job.spec.sampling, rules)  # what `batchgen validate` prints
    assert images == 2 and len(groups) == 1
    key = dict(zip(GROUP_FIELDS, next(iter(groups)), strict=True))
    assert {name: key[name] for name in ("steps", "scheduler", "eta", "max_sequence_length", "skip_guidance_layers",
                                         "skip_layer_guidance_start", "skip_layer_guidance_stop")} == {
        "steps": 2, "scheduler": "euler", "eta": None, "max_sequence_length": 256, "skip_guidance_layers": (1, 2),
        "skip_layer_guidance_start": 0.01, "skip_layer_guidance_stop": 0.6}
    default = plan(tiny_sd35_dir, tmp_path / "2")
    assert default.model.dropped_components is None and default.fingerprint["model"]["text_encoder_3"] is True


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"sampling.scheduler": "dpmpp_2m_karras"}, "`sampling.scheduler` must be one of ['model', 'euler', 'heun'] "
         "for a stable-diffusion-3 model but is 'dpmpp_2m_karras'"),
        ({"sampling.max_sequence_length": 513}, "`sampling.max_sequence_length` input should be less than or equal "
         "to 512 (got 513)"),
        ({"sampling.skip_layer_guidance": {"layers": [7, 8, 9]}}, "`sampling.skip_layer_guidance.layers` must index "
         "layers of this model's transformer, which has 4 (0 to 3) but is (7, 8, 9)"),
        ({"sampling.skip_layer_guidance": {"layers": [1], "start": 0.5, "stop": 0.2}},
         "`start` (0.5) must be below `stop` (0.2)"),
    ],
)
def test_plan_refuses_bad_sd3_options_naming_them(tiny_sd3_dir, tmp_path, overrides, message):
    with pytest.raises(JobConfigError) as error:
        plan(tiny_sd3_dir, tmp_path, **overrides)
    assert message in str(error.value) and error.value.exit_code == 2


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"sampling.skip_layer_guidance": {"layers": [1]}},
         "`sampling.skip_layer_guidance.layers` is (1,), but a stable-diffusion model does not use it"),
        ({"sampling.max_sequence_length": 77},
         "`sampling.max_sequence_length` is 77, but a stable-diffusion model does not use it"),
        ({"model.text_encoder_3": False}, "`model.text_encoder_3` is False, but model"),
        ({"model.text_encoder_3_device": "cpu"}, "`model.text_encoder_3_device` is 'cpu', but model"),
    ],
)
def test_plan_refuses_sd3_options_on_a_model_without_them(tiny_model_dir, tmp_path, overrides, message):
    with pytest.raises(JobConfigError) as error:
        plan(tiny_model_dir, tmp_path, **overrides)
    assert message in str(error.value)


def test_heun_is_refused_where_the_config_shifts_dynamically(tiny_sd3_dynamic_dir, tmp_path):
    with pytest.raises(JobConfigError, match=r"must be one of \['model', 'euler'\] .* but is 'heun'"):
        plan(tiny_sd3_dynamic_dir, tmp_path, **{"sampling.scheduler": "heun"})


def test_bad_rows_become_error_rows_naming_field_value_and_rule(tiny_sd3_dir, tmp_path):
    job = plan(tiny_sd3_dir, tmp_path)
    table = prompts_table(4, width=[40, None, None, 48], scheduler=[None, "ddim", "heun", None],
                          prompt_3=[None, None, "t5 only", None])
    path = write_table(tmp_path / "rows.parquet", table)
    input_plan = plan_input(job.spec.input.model_copy(update={"prompts": str(path)}), job.rules)
    reader = RowReader(input_plan, job.spec.sampling, 8, DoneKeys(), job.rules)
    rows = [r for task in input_plan.tasks for t in reader.read(task) for r in t.to_pylist()]
    assert [r["status"] for r in rows] == ["error", "error", "pending", "pending"]
    assert rows[0]["error"] == ("`width` must be divisible by 16 (the VAE's factor 8 x the transformer's patch size "
                                "2) but is 40")
    assert rows[1]["error"] == ("`scheduler` must be one of ['model', 'euler', 'heun'] for a stable-diffusion-3 "
                                "model but is 'ddim'")
    assert (rows[2]["prompt_3"], rows[2]["max_sequence_length"], rows[2]["eta"]) == ("t5 only", 256, None)
    assert rows[3]["scheduler"] == "euler", "`model` is recorded as the name it stands for"


@pytest.mark.timeout(600)
@pytest.mark.usefixtures("ray_local")
def test_sd35_job_on_s3_killed_then_resumed_records_its_options(tiny_sd35_dir, s3_server, s3_bucket, tmp_path):
    n = 48  # 24 batches of 2: on a quiet machine a 6-batch job finished before the kill landed
    ids = [f"r{i:02d}" for i in range(n)]
    guidance = [1.0] + [None] * (n - 1)
    prompts = upload_table(s3_bucket, "in/p.parquet", prompts_table(n, id=ids, guidance_scale=guidance,
                                                                      prompt_2=["ink"] + [None] * (n - 1)))
    output = f"s3://{s3_bucket}/sd35"
    options = {"sampling.steps": 8, "sampling.max_sequence_length": 32, "sampling.skip_layer_guidance": SLG,
               "model.text_encoder_3": False, "compute.batch_size": 2, "output.lease_timeout_s": 3}
    spec = job_spec(tiny_sd35_dir, prompts, output, **options)
    storage = open_storage(output)
    # The first run is killed (its driver and its own Ray) once two batches are committed; its lease goes stale
    # after 3 s, so the second run takes the output over at once.
    kill_run_after_manifests(write_spec(tmp_path / "job.yaml", spec), storage, tmp_path / "killed.log", timeout=420)
    expected = {(i, 0) for i in ids}
    before = assert_accounted(storage, expected, finished=False)
    assert 0 < len(before) < n

    longer = job_spec(tiny_sd35_dir, prompts, output, **{**options, "sampling.max_sequence_length": 64})
    with pytest.raises(JobConfigError, match="sampling.max_sequence_length: 32 in the output, 64 now"):
        check_fingerprint(storage, plan_job(longer).fingerprint)
    run_job(spec)
    final = assert_accounted(storage, expected)
    assert all(r["status"] == "ok" for r in final.values())
    assert (success(storage)["skipped_done"], success(storage)["generated"]) == (len(before), n - len(before))
    assert all(before[k]["sha256"] == final[k]["sha256"] for k in before), "committed images were redone"
    row = final["r01", 0]
    assert (row["max_sequence_length"], row["skip_guidance_layers"], row["skip_layer_guidance_scale"],
            row["skip_layer_guidance_start"], row["skip_layer_guidance_stop"]) == (32, [1, 2], 2.8, 0.01, 0.6)
    assert (row["dropped_components"], row["scheduler"], row["eta"]) == ("text_encoder_3,tokenizer_3", "euler", None)
    assert run_cli("inspect", output).returncode == 0
    # A manifest row and its model, loaded as the row says (T5 dropped), regenerate the stored image.
    model = load_model(row["model"], device="cpu", dtype=row["dtype"],
                       skip_components=tuple(row["dropped_components"].split(",")))
    for key in (("r00", 0), ("r01", 0)):  # r00: no CFG, so no skip-layer guidance; r01: both
        again = Engine(model).generate([request_from_row(final[key])])[0].image
        stored = decode(storage.get(final[key]["image_uri"][len(storage.uri) + 1 :]))
        assert np.abs(again.astype(int) - stored.astype(int)).max() <= 1

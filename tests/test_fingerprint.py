"""The fingerprint, without a cluster: every field that changes pixels (derived from the spec's sections, so new
fields count without a list to update), the actors' device class and dtype, the input's identity; each change
refused naming its field before any work; the override recorded."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest
from click.testing import CliRunner

from batchgen.cli import load_job, main
from batchgen.errors import JobConfigError
from batchgen.lease import latest_epoch, read_holder
from batchgen.pipeline import plan_job, run_job
from batchgen.resume import (
    FINGERPRINT_KEY,
    NOT_FINGERPRINTED,
    NOT_FINGERPRINTED_SECTIONS,
    OVERRIDES_PREFIX,
    check_fingerprint,
)
from batchgen.spec import JobSpec
from batchgen.storage import open_storage
from tests.jobs import job_spec, prompts_table, write_spec, write_table

BASE = {"output.format": "webp", "output.quality": 90}
# A different valid value for fields whose type alone does not give one.
CHANGED = {"sampling.scheduler": "euler", "sampling.width": 40, "sampling.height": 40, "model.dtype": "bfloat16",
           "model.device": "cuda", "model.revision": "v2", "output.format": "jpeg",
           "input.columns": {"prompt": "prompt"}, "output.layout": "webdataset"}


# Fields this file's sd15 model cannot take, each refused by name in the test given.
SD3_REFUSED = "test_sd3_jobs.py::test_plan_refuses_sd3_options_on_a_model_without_them"
COVERED_ELSEWHERE = {"model.refiner": "test_sdxl_jobs.py::test_sdxl_refiner_job_killed_then_resumed_exactly_once",
                     "model.text_encoder_3": SD3_REFUSED, "model.text_encoder_3_device": SD3_REFUSED,
                     "sampling.max_sequence_length": SD3_REFUSED, "sampling.skip_layer_guidance": SD3_REFUSED}


def fingerprinted_fields(spec: JobSpec) -> dict[str, Any]:
    """Every field of every section the fingerprint covers, with its current value."""
    fields = {}
    for section, values in spec.model_dump(mode="json").items():
        if section in NOT_FINGERPRINTED_SECTIONS:
            continue
        for name, value in values.items():
            if name not in NOT_FINGERPRINTED.get(section, ()):
                fields[f"{section}.{name}"] = value
    return fields


def changed(field: str, value: Any) -> Any:
    if field in CHANGED:
        return CHANGED[field]
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, str):
        return value + "x"
    raise AssertionError(f"add a changed value for {field} ({value!r}) to CHANGED")


@pytest.fixture
def recorded(tiny_model_dir, tmp_path):
    """An output whose fingerprint was recorded by a job on a directory input."""
    write_table(tmp_path / "in" / "p.parquet", prompts_table(4))
    out = tmp_path / "out"
    spec = job_spec(tiny_model_dir, str(tmp_path / "in"), str(out), **BASE)
    check_fingerprint(open_storage(str(out)), plan_job(spec).fingerprint)
    return spec, open_storage(str(out))


def test_each_fingerprinted_field_changed_alone_is_refused_naming_it(tiny_model_dir, tmp_path, recorded):
    spec, storage = recorded
    fields = fingerprinted_fields(spec)
    assert {"sampling.steps", "sampling.eta", "sampling.negative_prompt", "model.dtype", "model.device",
            "output.format", "output.quality", "input.columns"} <= set(fields)
    for field, value in fields.items():
        if field in COVERED_ELSEWHERE:
            continue
        with pytest.raises(JobConfigError) as refusal:
            run_job(job_spec(tiny_model_dir, spec.input.prompts, spec.output.uri,
                             **{**BASE, field: changed(field, value)}))
        message = str(refusal.value)
        assert f"\n  {field}" in message and "in the output" in message, (field, message)
    epoch = latest_epoch(storage)
    assert epoch == len(set(fields) - set(COVERED_ELSEWHERE)) and read_holder(storage, epoch).released, (
        "each refused run released its lease")
    assert not storage.exists("_batchgen/job.yaml") and not list(storage.list("manifests/")), "a refused run wrote"


def test_the_actors_device_class_and_dtype_count_not_the_words_that_asked_for_them(tiny_model_dir, tmp_path,
                                                                                  recorded):
    spec, storage = recorded  # recorded with device cpu, dtype float32
    plan = lambda **changes: plan_job(job_spec(tiny_model_dir, spec.input.prompts, spec.output.uri,  # noqa: E731
                                               **BASE, **changes)).fingerprint
    # auto on actors without a GPU resolves to what was recorded: accepted.
    check_fingerprint(storage, plan(**{"model.device": "auto", "model.dtype": "auto", "compute.gpus_per_actor": 0}))
    with pytest.raises(JobConfigError) as refusal:  # the same words on GPU actors: CUDA float16
        check_fingerprint(storage, plan(**{"model.device": "auto", "model.dtype": "auto",
                                           "compute.gpus_per_actor": 1}))
    assert "model.device: 'cpu' in the output, 'cuda' now" in str(refusal.value)
    assert "model.dtype: 'float32' in the output, 'float16' now" in str(refusal.value)
    # Unknown before the cluster is sized (auto without gpus_per_actor): not refused yet, not recorded either.
    assert check_fingerprint(storage, plan(**{"model.device": "auto", "model.dtype": "auto"})) == []


def test_a_changed_input_file_is_refused_an_added_one_is_not_and_the_override_is_recorded(tiny_model_dir, tmp_path,
                                                                                         recorded):
    spec, storage = recorded
    source = tmp_path / "in" / "p.parquet"
    write_table(tmp_path / "in" / "q.parquet", prompts_table(3, start=10))  # new rows in a new file
    check_fingerprint(storage, plan_job(spec).fingerprint)
    assert "q.parquet" in json.loads(storage.get(FINGERPRINT_KEY))["input"]["files"]

    stat = source.stat()
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # rewritten: same size, new mtime
    current = plan_job(spec).fingerprint
    with pytest.raises(JobConfigError, match=r"\n  input\.files\.p\.parquet: '\d+ bytes, modified \d+' in the output"):
        check_fingerprint(storage, current)
    lines = check_fingerprint(storage, current, override=True, epoch=7, run_id="knowing")
    assert lines and lines[0].startswith("input.files.p.parquet: ")
    record = json.loads(storage.get(f"{OVERRIDES_PREFIX}{7:010d}.json"))
    assert (record["run_id"], record["differences"]) == ("knowing", lines)
    assert record["previous"]["input"]["files"]["p.parquet"] != current["input"]["files"]["p.parquet"]
    check_fingerprint(storage, current)  # the overridden fingerprint is the output's from now on


def test_override_flag_sets_the_spec_field_and_its_absence_keeps_the_spec(tiny_model_dir, tmp_path):
    assert load_job(None, {"override_fingerprint": True}).output.override_fingerprint is True
    spec = write_spec(tmp_path / "job.yaml", job_spec(tiny_model_dir, "p.parquet", "out",
                                                      **{"output.override_fingerprint": True}))
    assert load_job(str(spec), {"override_fingerprint": None}).output.override_fingerprint is True
    assert "--override-fingerprint" in CliRunner().invoke(main, ["run", "--help"]).output

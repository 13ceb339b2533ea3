"""The row contract: schemas, request, group key and reader all derive from the one declaration."""

from __future__ import annotations

import dataclasses

import pytest

from batchgen.errors import JobConfigError
from batchgen.manifest import MANIFEST_SCHEMA, request_from_row
from batchgen.models.families import FAMILIES
from batchgen.models.schedulers import model_scheduler_name
from batchgen.pipeline import prepare_model
from batchgen.prompts import WORK_SCHEMA, DoneKeys, RowReader, plan_input
from batchgen.rows import FIELDS, GROUP_FIELDS, GenerationRequest, arrow_type, group_value
from batchgen.spec import InputSpec, SamplingSpec, load_spec
from batchgen.stages import GENERATED_SCHEMA
from tests.jobs import prompts_table, write_table


def test_every_declared_field_reaches_schemas_request_and_columns():
    request_fields = [f.name for f in dataclasses.fields(GenerationRequest)]
    assert request_fields == [f.name for f in FIELDS]
    for f in FIELDS:
        assert WORK_SCHEMA.field(f.name).type == GENERATED_SCHEMA.field(f.name).type == arrow_type(f.kind)
        assert (f.name in MANIFEST_SCHEMA.names) == f.manifest
        assert (f.name in InputSpec.model_fields["columns"].description.split(": ", 1)[1].split(", ")) == f.column
    req = GenerationRequest(prompt="p", seed=1, steps=3, scheduler="euler")
    assert req.group_key() == tuple(group_value(name, getattr(req, name)) for name in GROUP_FIELDS)
    masked = dataclasses.replace(req, init_image="a.png", strength=0.5, mask_image="m.png")
    assert masked.group_key() != dataclasses.replace(masked, mask_image=None).group_key()
    assert masked.group_key() == dataclasses.replace(masked, init_image="b.png", mask_image="n.png").group_key()
    assert "steps" in GROUP_FIELDS and "guidance_scale" not in GROUP_FIELDS


def test_manifest_row_back_to_request_keeps_pairs_and_defaults():
    row = {"prompt": "p", "seed": 3, "steps": 2, "width": 64, "height": 32, "scheduler": "ddim", "eta": 0.0,
           "negative_prompt": "", "guidance_scale": 5.0, "original_size": [128, 256], "prompt_2": None,
           "model": "m", "status": "ok"}
    req = request_from_row(row)
    assert req.original_size == (128, 256) and req.prompt_2 is None
    assert req.value("target_size") == (32, 64) and req.value("crops_coords_top_left") == (0, 0)


def test_checkpoint_scheduler_names():
    assert model_scheduler_name({"_class_name": "PNDMScheduler", "skip_prk_steps": True}) == "pndm"
    assert model_scheduler_name({"_class_name": "EulerDiscreteScheduler"}) == "euler"
    assert model_scheduler_name({"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "dpmsolver++",
                                 "solver_order": 2, "use_karras_sigmas": True}) == "dpmpp_2m"
    assert model_scheduler_name({"_class_name": "KDPM2DiscreteScheduler"}) == "model"


def test_plan_reads_family_and_own_scheduler_without_loading(tiny_model_dir, tmp_path):
    spec = load_spec(None, {"model.source": str(tiny_model_dir)})
    assert spec.sampling.scheduler == "model"
    _, facts, rules = prepare_model(spec)
    assert (rules.family, rules.model_scheduler, rules.vae_scale_factor) == ("stable-diffusion", "ddim", 8)
    assert "prompt_2" not in rules.fields and len(facts.sha256) == 64
    path = write_table(tmp_path / "p.parquet", prompts_table(2, prompt_2=["x", None], scheduler=["model", "euler"]))
    plan = plan_input(InputSpec(prompts=str(path)), rules)
    assert plan.extra_columns == ["prompt_2"], "a field its family does not use is carried, not read"
    reader = RowReader(plan, SamplingSpec(), 4, DoneKeys(), rules)
    rows = [r for task in plan.tasks for t in reader.read(task) for r in t.to_pylist()]
    assert [r["scheduler"] for r in rows] == ["ddim", "euler"], "`model` is recorded as the name it stands for"
    assert all(r["prompt_2"] is None and r["original_size"] is None for r in rows)
    with pytest.raises(JobConfigError, match=r"maps to \['prompt_2'\], which a stable-diffusion model does not use"):
        plan_input(InputSpec(prompts=str(path), columns={"prompt_2": "prompt_2"}), rules)


def test_every_family_reads_the_common_fields():
    for family in FAMILIES:
        assert {"prompt", "seed", "steps", "width", "height", "scheduler"} <= family.fields

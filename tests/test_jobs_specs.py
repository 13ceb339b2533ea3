"""The ready specs in jobs/ pass `batchgen validate` with every field they set; only the locations they name
(S3 buckets, a real checkpoint) are swapped for local stand-ins. And the sweep helper behind eval_sweep.yaml."""

from __future__ import annotations

import io
import re
import shlex

import boto3
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from batchgen.cli import main
from batchgen.errors import JobConfigError
from batchgen.spec import load_spec
from batchgen.sweep import expand_sweep, read_prompt_list, write_table
from tests.jobs import REPO, prompts_table, run_cli
from tests.jobs import write_table as write_parquet

pytestmark = pytest.mark.timeout(120)

JOBS = REPO / "jobs"


def validate(spec: str, prompts, model, output) -> str:
    result = run_cli("validate", spec, "--prompts", str(prompts), "--model", str(model), "--output", str(output))
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.parametrize("name", ["demo.yaml", "synthetic_dataset.yaml", "eval_sweep.yaml"])
def test_spec_parses(name):
    load_spec(JOBS / name)


def test_synthetic_dataset(tiny_model_dir, tmp_path):
    spec = load_spec(JOBS / "synthetic_dataset.yaml")
    assert spec.output.uri.startswith("s3://") and spec.output.format == "webp"
    assert spec.model.source.startswith("s3://") and spec.sampling.num_images > 1
    assert spec.compute.max_actors > 1 and spec.compute.gpus_per_actor is None, "one actor per GPU"
    captions = prompts_table(40).rename_columns(["caption"]).append_column("source", [["web"] * 40])
    prompts = write_parquet(tmp_path / "captions" / "part-0.parquet", captions)
    out = validate("jobs/synthetic_dataset.yaml", prompts.parent, tiny_model_dir, tmp_path / "out")
    assert f"images: {40 * spec.sampling.num_images}" in out
    assert "carried: ['source']" in out and "(webp)" in out
    assert "(30, 512, 512, 'dpmpp_2m_karras', 0.0)" in out
    assert "generator actors: 1-4" in out and "batch size 16" in out


def documented_sweep_command() -> list[str]:
    lines = [line for line in (JOBS / "eval_sweep.yaml").read_text().splitlines()
             if line.lstrip("# ").startswith("batchgen sweep ")]
    assert len(lines) == 1, "eval_sweep.yaml documents one `batchgen sweep` command"
    return shlex.split(lines[0].lstrip("# "))


def test_eval_sweep_with_its_documented_sweep_table(tiny_model_dir, tmp_path):
    command = documented_sweep_command()
    spec = load_spec(JOBS / "eval_sweep.yaml")
    assert command[3] == spec.input.prompts, "the command writes the table the spec reads"
    table = tmp_path / "sweep.parquet"
    made = run_cli(*command[1:3], str(table), *command[4:])
    assert made.returncode == 0, made.stderr
    count = int(re.search(r"wrote (\d+) rows", made.stdout).group(1))
    schedulers = command[command.index("--schedulers") + 1].split(",")
    out = validate("jobs/eval_sweep.yaml", table, tiny_model_dir, tmp_path / "out")
    assert f"images: {count}" in out
    assert f"sub-batch groups (steps, width, height, scheduler, eta): {len(schedulers)}" in out
    for scheduler in schedulers:
        assert f"(30, 512, 512, '{scheduler}', 0.0): {count // len(schedulers)} images" in out


def test_demo(tiny_model_dir, tmp_path):
    out = validate("jobs/demo.yaml", load_spec(JOBS / "demo.yaml").input.prompts, tiny_model_dir, tmp_path / "o")
    assert "images: 50" in out


def test_expand_sweep_is_the_full_grid_scheduler_major():
    table = expand_sweep(["a cat", "a dog"], [3.0, 7.5], ["ddim", "euler_a"], [0, 1, 2])
    rows = table.to_pylist()
    assert len(rows) == 2 * 2 * 2 * 3 and len({r["id"] for r in rows}) == len(rows)
    cells = {(r["prompt"], r["guidance_scale"], r["scheduler"], r["seed"]) for r in rows}
    assert len(cells) == len(rows)
    assert [r["scheduler"] for r in rows] == ["ddim"] * 12 + ["euler_a"] * 12
    assert rows[0] == {"id": "p000-g3-ddim-s0", "prompt": "a cat", "guidance_scale": 3.0, "scheduler": "ddim",
                       "seed": 0, "prompt_index": 0}
    assert expand_sweep(["a cat", "a dog"], [3.0], ["ddim"], [0]).column("id").to_pylist() == \
        ["p000-g3-ddim-s0", "p001-g3-ddim-s0"], "a cell's id does not depend on the other axes"


@pytest.mark.parametrize(("axes", "message"), [
    (([7.5], ["warp"], [0]), "'warp'"),
    (([float("nan")], ["ddim"], [0]), "nan"),
    (([7.5], ["ddim"], [-1]), "-1"),
    (([7.5, 7.5], ["ddim"], [0]), "twice"),
    (([], ["ddim"], [0]), "at least one"),
])
def test_bad_sweep_axes_are_named(axes, message):
    with pytest.raises(JobConfigError, match=re.escape(message)):
        expand_sweep(["a cat"], *axes)


def test_sweep_reads_text_and_parquet_and_writes_s3(tmp_path, s3_bucket):
    text = tmp_path / "p.txt"
    text.write_text("# comment\n\na cat\n  a dog  \n")
    assert read_prompt_list(str(text)) == ["a cat", "a dog"]
    parquet = write_parquet(tmp_path / "p.parquet", prompts_table(3))
    assert read_prompt_list(str(parquet)) == prompts_table(3).column("prompt").to_pylist()
    table = expand_sweep(["a cat"], [5.0], ["ddim"], [0, 1])
    assert write_table(table, f"s3://{s3_bucket}/sweeps/s.parquet") == f"s3://{s3_bucket}/sweeps/s.parquet"
    body = boto3.client("s3").get_object(Bucket=s3_bucket, Key="sweeps/s.parquet")["Body"].read()
    assert pq.read_table(io.BytesIO(body)).equals(table)


def test_sweep_cli_exits_2_naming_the_bad_value(tmp_path):
    text = tmp_path / "p.txt"
    text.write_text("a cat\n")
    result = CliRunner().invoke(main, ["sweep", str(text), str(tmp_path / "s.parquet"), "--guidance-scales", "5",
                                       "--schedulers", "ddim,warp", "--seeds", "0"])
    assert result.exit_code == 2 and "'warp'" in result.output
    assert not (tmp_path / "s.parquet").exists()

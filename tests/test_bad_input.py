"""Bad input: a job-level problem stops the job before any work with exit code 2 and a message naming the file
and column; a bad row becomes an error row naming the field and value while every valid row gets its image."""

from __future__ import annotations

import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from batchgen.cli import main
from batchgen.pipeline import run_job
from batchgen.storage import open_storage
from tests.jobs import assert_accounted, decode, job_spec, manifest_rows, prompts_table, write_spec, write_table

pytestmark = pytest.mark.usefixtures("ray_local")


def run(tmp_path: Path, model: Path, prompts: Path, **overrides) -> tuple[int, str]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    spec = write_spec(tmp_path / "job.yaml", job_spec(model, str(prompts), str(tmp_path / "out"), **overrides))
    result = CliRunner().invoke(main, ["run", str(spec)])
    return result.exit_code, result.stderr


def corrupt_pages(path: Path, rows: int) -> Path:
    """A Parquet file whose footer reads but whose data pages do not: only reading the rows finds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(prompts_table(rows), path, compression="none", use_dictionary=False)
    data = bytearray(path.read_bytes())
    data[8:400] = b"\xff" * 392
    path.write_bytes(bytes(data))
    return path


def job_level_cases(root: Path) -> dict[str, tuple[Path, dict, list[str]]]:
    """name -> (input, spec overrides, what the message must name)."""
    cases: dict[str, tuple[Path, dict, list[str]]] = {}

    def case(name: str, overrides: dict, *named: str, **files: pa.Table | bytes) -> None:
        folder = root / name
        for file, content in files.items():
            path = folder / f"{file}.parquet"
            if isinstance(content, bytes):
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(content)
            else:
                write_table(path, content)
        cases[name] = (folder, overrides, list(named))

    case("missing_prompt", {}, "a.parquet", "'prompt'", a=prompts_table(3).rename_columns(["text"]))
    case("renamed_mapped_column", {"input.columns": {"caption": "prompt"}}, "a.parquet", "'caption'",
         a=prompts_table(3).rename_columns(["text"]))
    case("mapped_optional_column_absent", {"input.columns": {"cfg": "guidance_scale"}}, "'cfg'",
         a=prompts_table(3, guidance=[1.0, 2.0, 3.0]))
    case("two_columns_one_field", {"input.columns": {"caption": "prompt"}}, "a.parquet", "'caption'", "'prompt'",
         a=prompts_table(2, caption=["x", "y"]))
    case("garbage_file", {}, "b.parquet", "magic bytes", a=prompts_table(2), b=b"PAR1 this is not parquet")
    case("empty_file", {}, "b.parquet", "0 bytes", a=prompts_table(2), b=b"")
    case("conflicting_types", {}, "'steps'", "a.parquet", "b.parquet", a=prompts_table(2, steps=[2, 3]),
         b=prompts_table(2, steps=["2", "3"]))
    case("file_without_prompt", {}, "b.parquet", "'prompt'", a=prompts_table(2), b=pa.table({"caption": ["x"]}))
    case("duplicate_ids", {}, "'id'", "'dup'", "a.parquet", "b.parquet", a=prompts_table(2, id=["dup", "u1"]),
         b=prompts_table(2, id=["u2", "dup"]))
    return cases


def test_job_level_input_errors_exit_2_naming_file_and_column_before_any_work(tiny_model_dir, tmp_path):
    for name, (prompts, overrides, named) in job_level_cases(tmp_path / "inputs").items():
        out = tmp_path / name
        code, stderr = run(out, tiny_model_dir, prompts, **overrides)
        assert code == 2, (name, stderr)
        assert "batchgen: invalid job:" in stderr, (name, stderr)
        assert all(part in stderr for part in named), (name, named, stderr)
        assert not (out / "out").exists(), f"{name}: an invalid job wrote output"


@pytest.mark.timeout(120)
def test_unreadable_data_pages_fail_the_job_naming_the_file(tiny_model_dir, tmp_path):
    prompts = corrupt_pages(tmp_path / "in" / "p.parquet", 50)
    assert pq.ParquetFile(prompts).metadata.num_rows == 50, "the footer still reads"
    code, stderr = run(tmp_path, tiny_model_dir, prompts.parent)
    assert code == 1, stderr
    assert f"cannot read Parquet file '{prompts}' (row group 0)" in stderr, stderr
    assert not (tmp_path / "out" / "_SUCCESS").exists()


NASTY_IDS = ["../../etc/passwd", "a/b", "a%2Fb", "a b", "é", "e\u0301", "😀", "שלום", "..", ".hidden", "CON",
             "x" * 300, "tab\there", "nul\x00byte", "-_."]
GOOD_PROMPTS = {
    "long": "a lighthouse at dusk, " * 476,  # about 10,000 characters: truncated by the text encoder
    "emoji": "🦊 a fox in the snow ❄️",
    "rtl": "שלום עולם مرحبا بالعالم",
    "control": "a \x1b[31mred\x1b[0m fox\x00 on\ta\nnew line\r\x7f",
}
BAD_ROWS = {  # id -> (column overrides, field named in the error, value shown)
    "prompt-null": ({"prompt": None}, "prompt", "None"),
    "prompt-empty": ({"prompt": ""}, "prompt", "''"),
    "prompt-blank": ({"prompt": " \t\n"}, "prompt", "' \\t\\n'"),
    "width-zero": ({"width": 0}, "width", "0"),
    "width-negative": ({"width": -64}, "width", "-64"),
    "width-huge": ({"width": 2**40}, "width", str(2**40)),
    "height-not-8": ({"height": 30}, "height", "30"),
    "guidance-nan": ({"guidance_scale": math.nan}, "guidance_scale", "nan"),
    "guidance-inf": ({"guidance_scale": math.inf}, "guidance_scale", "inf"),
    "guidance-negative": ({"guidance_scale": -1.0}, "guidance_scale", "-1.0"),
    "steps-zero": ({"steps": 0}, "steps", "0"),
    "steps-10000": ({"steps": 10_000}, "steps", "10000"),
    "seed-negative": ({"seed": -1}, "seed", "-1"),
}


def bad_input_table() -> pa.Table:
    rows = [{"id": i, "prompt": f"a fox number {n}"} for n, i in enumerate(NASTY_IDS)]
    rows += [{"id": f"prompt-{name}", "prompt": prompt} for name, prompt in GOOD_PROMPTS.items()]
    rows += [{"id": i, "prompt": "a fox", **values} for i, (values, _, _) in BAD_ROWS.items()]
    rows.append({"id": None, "prompt": "a fox without an id"})  # takes its position as id
    schema = pa.schema([("id", pa.string()), ("prompt", pa.string()), ("width", pa.int64()), ("height", pa.int64()),
                        ("guidance_scale", pa.float64()), ("steps", pa.int64()), ("seed", pa.int64())])
    return pa.Table.from_pylist(rows, schema=schema)


@pytest.mark.timeout(240)
def test_bad_rows_become_error_rows_and_every_valid_row_gets_its_image(tiny_model_dir, tmp_path):
    prompts = tmp_path / "in"
    write_table(prompts / "a.parquet", bad_input_table())
    # A second file with only a prompt column: its rows take the defaults, and their positions as ids.
    write_table(prompts / "b.parquet", prompts_table(3))
    out = tmp_path / "out"
    summary = run_job(job_spec(tiny_model_dir, str(prompts), str(out), **{"compute.batch_size": 8}))

    storage = open_storage(str(out))
    no_id = f"a.parquet:{len(NASTY_IDS) + len(GOOD_PROMPTS) + len(BAD_ROWS)}"
    good = {*NASTY_IDS, *(f"prompt-{n}" for n in GOOD_PROMPTS), no_id, "b.parquet:0", "b.parquet:1", "b.parquet:2"}
    rows = assert_accounted(storage, {(i, 0) for i in good | set(BAD_ROWS)})
    for row_id, (_, field, shown) in BAD_ROWS.items():
        row = rows[row_id, 0]
        assert row["status"] == "error" and row["image_uri"] is None, row_id
        assert f"`{field}` " in row["error"] and f"but is {shown}" in row["error"], (row_id, row["error"])
    for row_id in good:
        assert rows[row_id, 0]["status"] == "ok", (row_id, rows[row_id, 0]["error"])
    for name, prompt in GOOD_PROMPTS.items():
        assert rows[f"prompt-{name}", 0]["prompt"] == prompt, "the manifest keeps the prompt exactly"
    assert rows["prompt-long", 0]["truncated"] and not rows["prompt-emoji", 0]["truncated"]
    # Every id, however nasty, has its own key inside the output's images/ folder.
    paths = [Path(rows[i, 0]["image_uri"]) for i in good]
    assert len(set(paths)) == len(good) == len(list(storage.list("images/")))
    for path in paths:
        assert path.resolve().is_relative_to((out / "images").resolve()) and path.is_file()
        assert decode(path.read_bytes()).shape == (32, 32, 3)
    assert (summary["images_ok"], summary["errors"]) == (len(good), len(BAD_ROWS))

    again = run_job(job_spec(tiny_model_dir, str(prompts), str(out), **{"compute.batch_size": 8}))
    assert (again["generated"], again["errors"], again["skipped_done"]) == (len(BAD_ROWS), len(BAD_ROWS), len(good))
    assert_accounted(storage, {(i, 0) for i in good | set(BAD_ROWS)})
    assert len(manifest_rows(storage)) == len(good) + 2 * len(BAD_ROWS)


@pytest.mark.timeout(120)
def test_non_string_prompts_become_error_rows(tiny_model_dir, tmp_path):
    prompts = write_table(tmp_path / "p.parquet", pa.table({"id": ["n", "b"], "prompt": [42, None]}))
    summary = run_job(job_spec(tiny_model_dir, str(prompts), str(tmp_path / "out")))
    rows = assert_accounted(open_storage(str(tmp_path / "out")), {("n", 0), ("b", 0)})
    assert "`prompt` must be a non-empty string but is 42" in rows["n", 0]["error"]
    assert "`prompt` must be a non-empty string but is None" in rows["b", 0]["error"]
    assert (summary["images_ok"], summary["errors"]) == (0, 2)

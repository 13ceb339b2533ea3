"""The Ray Data API: the README's example runs as written, and `generate` makes the job's images."""

from __future__ import annotations

import hashlib
import os
import re

import pyarrow.parquet as pq
import pytest

from tests.jobs import REPO, decode, prompts_table, write_table

pytestmark = [pytest.mark.usefixtures("ray_local"), pytest.mark.timeout(240)]


def readme_example() -> str:
    text = (REPO / "README.md").read_text()
    match = re.search(r"<!-- api-example -->\n```python\n(.*?)```", text, re.S)
    assert match, "README.md lost its API example"
    return match.group(1)


def test_the_readme_example_generates_scores_filters_and_writes(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    os.symlink(tiny_model_dir, tmp_path / "models" / "tiny-sd15")
    ids = [f"cap-{i}" for i in range(6)]
    write_table(tmp_path / "prompts.parquet", prompts_table(6, id=ids, source=["web"] * 6))
    exec(compile(readme_example(), "README.md", "exec"), {"__name__": "readme_example"})

    table = pq.read_table(tmp_path / "out" / "scored")
    rows = table.to_pylist()
    assert rows, "the filter kept nothing: the example shows no output"
    assert all(r["score"] > 0.25 and r["status"] == "ok" for r in rows)
    assert {(r["id"], r["sample_index"]) for r in rows} <= {(i, k) for i in ids for k in (0, 1)}
    for row in rows:
        assert hashlib.sha256(row["image"]).hexdigest() == row["sha256"]
        assert decode(row["image"]).shape == (32, 32, 3)
        assert row["model_sha256"] and row["steps"] == 2 and row["extra"] == '{"source": "web"}'

    # The job on the same rows and settings makes the same images (float32 pixels may differ by one level
    # between batch compositions).
    from batchgen.pipeline import run_job
    from batchgen.storage import open_storage
    from tests.jobs import job_spec, manifest_rows

    run_job(job_spec(tiny_model_dir, str(tmp_path / "prompts.parquet"), str(tmp_path / "job"), **{
        "sampling.seed": 0, "sampling.num_images": 2, "sampling.steps": 2}))
    storage = open_storage(str(tmp_path / "job"))
    made = {(r["id"], r["sample_index"]): r for r in manifest_rows(storage)}
    for row in rows:
        job_row = made[row["id"], row["sample_index"]]
        assert job_row["seed"] == row["seed"]
        job_image = decode(storage.get(job_row["image_uri"][len(storage.uri) + 1 :])).astype(int)
        assert abs(job_image - decode(row["image"]).astype(int)).max() <= 1


def test_generate_fetches_init_images_and_masks(tiny_model, tiny_model_dir, tmp_path, monkeypatch):
    """Init images as local files (absolute, and relative to the caller's folder), a mask, and a missing file,
    through the same fetch stage as a job: the missing one is an error row naming the field and the URI."""
    import numpy as np
    import ray

    import batchgen
    from batchgen.engine import Engine
    from batchgen.fetch import request_with_images
    from batchgen.manifest import request_from_row
    from tests.test_img2img_job import png

    monkeypatch.chdir(tmp_path)
    photo = png(1, (40, 48))
    (tmp_path / "photo.png").write_bytes(photo)
    (tmp_path / "mask.png").write_bytes(png(2, (32, 32), mode="L"))
    missing = f"/tmp/batchgen-missing-{os.getpid()}.png"  # short: RowError shortens values past 80 characters
    rows = [
        {"id": "file", "prompt": "a fox", "seed": 3, "image": str(tmp_path / "photo.png"), "mask": None},
        {"id": "masked", "prompt": "an owl", "seed": 4, "image": "photo.png", "mask": "mask.png"},
        {"id": "missing", "prompt": "an owl", "seed": 5, "image": missing, "mask": None},
    ]
    images = batchgen.generate(ray.data.from_items(rows), {
        "model": {"source": str(tiny_model_dir), "device": "cpu", "dtype": "float32"},
        "input": {"columns": {"image": "init_image", "mask": "mask_image"}},
        "sampling": {"steps": 4, "width": 32, "height": 32},
        "compute": {"batch_size": 4, "cpus_per_actor": 0.5},
    })
    out = {row["id"]: row for row in images.take_all()}

    assert out["missing"]["status"] == "error" and out["missing"]["image"] is None
    assert out["missing"]["error"] == f"`init_image` must name an existing image (no such object) but is {missing!r}"
    for name in ("file", "masked"):
        assert out[name]["status"] == "ok", out[name]["error"]
        assert out[name]["init_image_sha256"] == hashlib.sha256(photo).hexdigest()
        assert out[name]["init_image_size"] == [40, 48]
    assert out["masked"]["init_image"] == str(tmp_path / "photo.png"), "relative to the caller's folder"
    assert out["masked"]["mask_image_sha256"] and out["masked"]["strength"] == 1.0
    # The images started from the fetched pixels: a manifest row and the images it names regenerate them.
    engine = Engine(tiny_model)
    for name in ("file", "masked"):
        again = engine.generate([request_with_images(request_from_row(out[name]))])[0]
        assert np.abs(again.image.astype(int) - decode(out[name]["image"]).astype(int)).max() <= 1


def test_generate_names_image_bytes_by_row_id_and_column():
    """A binary column carries the image itself (no Ray needed to see how its rows are named)."""
    import pyarrow as pa

    from batchgen.api import _work_rows
    from batchgen.rows import COMMON_FIELDS, IMG2IMG_FIELDS, Rules
    from batchgen.spec import SamplingSpec

    batch = pa.table({"id": ["a"], "prompt": ["a fox"], "raw": [b"\x89PNG..."]})
    rules = Rules(COMMON_FIELDS | IMG2IMG_FIELDS)
    row = _work_rows(batch, {"raw": "init_image"}, SamplingSpec(), rules, "/").to_pylist()[0]
    assert (row["init_image"], row["init_image_bytes"]) == ("table:a:raw", b"\x89PNG...")


def test_generate_refuses_an_image_column_the_model_does_not_use():
    """A mask for a model without inpainting would travel in `extra` and be ignored: refused, as a job refuses it."""
    import pyarrow as pa

    from batchgen.api import _work_rows
    from batchgen.errors import JobConfigError
    from batchgen.rows import COMMON_FIELDS, IMG2IMG_FIELDS, Rules
    from batchgen.spec import SamplingSpec

    batch = pa.table({"id": ["a"], "prompt": ["a fox"], "init_image": ["a.png"], "hole": ["m.png"]})
    rules = Rules(COMMON_FIELDS | IMG2IMG_FIELDS - {"mask_image"}, family="stable-diffusion-3")
    with pytest.raises(JobConfigError, match="column 'hole' is an image a stable-diffusion-3 model does not use"):
        _work_rows(batch, {"hole": "mask_image"}, SamplingSpec(), rules, "/")
    assert _work_rows(batch.drop_columns(["hole"]), {}, SamplingSpec(), rules, "/").num_rows == 1


def test_a_long_value_in_a_row_error_keeps_both_ends():
    from batchgen.errors import RowError

    uri = "s3://bucket/" + "deep/" * 30 + "the-image-that-failed.png"
    message = str(RowError("init_image", uri, "cannot be read"))
    assert "s3://bucket/" in message and "the-image-that-failed.png'" in message and len(message) < 140

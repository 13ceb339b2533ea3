"""The fetch stage without Ray: decoding, limits, error rows naming field and URI, bytes columns, relative paths."""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from batchgen.fetch import ImageFetcher
from batchgen.models.families import FAMILIES
from batchgen.prompts import WORK_SCHEMA, DoneKeys, RowReader, plan_input
from batchgen.spec import InputSpec, SamplingSpec
from tests.jobs import prompts_table, write_table

SD = FAMILIES[0].rules()


def png(width: int = 12, height: int = 8, mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(width * height)
    shape = (height, width, 3) if mode == "RGB" else (height, width)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode).save(buffer, format="PNG")
    return buffer.getvalue()


def work(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist([{"id": str(n), "sample_index": 0, "status": "pending", "prompt": "p", "seed": n,
                                  "strength": 0.8, **row} for n, row in enumerate(rows)], schema=WORK_SCHEMA)


def test_local_images_decoded_with_size_and_hash(tmp_path):
    init, mask = tmp_path / "a.png", tmp_path / "m.png"
    init.write_bytes(png(12, 8))
    mask.write_bytes(png(12, 8, mode="RGB"))  # an RGB mask becomes L, as the mask processor would make it
    rows = ImageFetcher()(work([{"init_image": str(init), "mask_image": str(mask)},
                                {"init_image": f"file://{init}"}])).to_pylist()
    first = rows[0]
    assert first["status"] == "pending"
    assert first["init_image_size"] == [8, 12] and first["mask_image_size"] == [8, 12]
    assert first["init_image_sha256"] == hashlib.sha256(init.read_bytes()).hexdigest()
    expected = np.asarray(Image.open(init).convert("RGB"))
    assert np.array_equal(np.frombuffer(first["init_pixels"], np.uint8).reshape(8, 12, 3), expected)
    assert len(first["mask_pixels"]) == 8 * 12
    assert rows[1]["init_pixels"] == first["init_pixels"] and rows[1]["mask_pixels"] is None


def oriented(fmt: str, mode: str, orientation: int) -> bytes:
    """An asymmetric 12x8 (width x height) image whose EXIF says to rotate it (6: 90 degrees clockwise)."""
    pixels = np.arange(8 * 12 * 3, dtype=np.uint8).reshape(8, 12, 3) * 2
    image = Image.fromarray(pixels).convert(mode)
    exif = Image.Exif()
    exif[0x0112] = orientation  # the Orientation tag
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, exif=exif.tobytes())
    return buffer.getvalue()


def test_exif_orientation_is_applied_as_diffusers_load_image_does(tmp_path):
    from diffusers.utils import load_image

    init, mask = tmp_path / "photo.jpg", tmp_path / "mask.png"
    init.write_bytes(oriented("JPEG", "RGB", 6))
    mask.write_bytes(oriented("PNG", "L", 8))
    row = ImageFetcher()(work([{"init_image": str(init), "mask_image": str(mask)}])).to_pylist()[0]
    assert row["status"] == "pending"
    assert row["init_image_size"] == [12, 8] and row["mask_image_size"] == [12, 8], "upright: 8 wide, 12 high"
    theirs = np.asarray(load_image(str(init)))
    assert theirs.shape == (12, 8, 3)
    assert np.array_equal(np.frombuffer(row["init_pixels"], np.uint8).reshape(12, 8, 3), theirs)
    upright_mask = np.asarray(load_image(str(mask), convert_method=lambda image: image.convert("L")))
    assert np.array_equal(np.frombuffer(row["mask_pixels"], np.uint8).reshape(12, 8), upright_mask)


def test_bad_images_become_error_rows_naming_field_and_uri(tmp_path):
    good, corrupt, truncated = tmp_path / "good.png", tmp_path / "corrupt.png", tmp_path / "cut.png"
    good.write_bytes(png())
    corrupt.write_bytes(b"definitely not an image")
    truncated.write_bytes(png(20, 20)[:200])
    big = tmp_path / "big.png"
    big.write_bytes(png(40, 40))
    missing = tmp_path / "nope.png"
    rows = ImageFetcher(max_bytes=4000, max_pixels=30 * 30)(work([
        {"init_image": str(good)},
        {"init_image": str(corrupt)},
        {"init_image": str(good), "mask_image": str(truncated)},
        {"init_image": str(missing)},
        {"init_image": str(big)},
        {"init_image": "table:in.parquet:3:image"},
        {"init_image": str(good), "status": "error", "error": "`seed` ..."},
    ])).to_pylist()
    assert [r["status"] for r in rows] == ["pending"] + ["error"] * 6
    assert rows[1]["error"].startswith("`init_image` must be a readable image (UnidentifiedImageError")
    assert str(corrupt) in rows[1]["error"]
    assert rows[2]["error"].startswith("`mask_image` must be a readable image") and str(truncated) in rows[2]["error"]
    assert rows[3]["error"] == f"`init_image` must name an existing image (no such object) but is '{missing}'"
    assert rows[4]["error"].startswith("`init_image` must be at most") and str(big) in rows[4]["error"]
    assert "names bytes of an input table" in rows[5]["error"]
    assert rows[6]["error"] == "`seed` ..." and rows[6]["init_pixels"] is None, "non-pending rows are passed on"


def test_oversized_pixels_are_refused_before_decoding(tmp_path):
    path = tmp_path / "wide.png"
    path.write_bytes(png(64, 64))
    row = ImageFetcher(max_pixels=64 * 63)(work([{"init_image": str(path)}])).to_pylist()[0]
    assert row["error"] == f"`init_image` must have at most 4032 pixels (the image is 64x64) but is '{path}'"


def test_s3_images_and_missing_keys(s3_server, s3_bucket):
    import boto3

    boto3.client("s3").put_object(Bucket=s3_bucket, Key="img/a.png", Body=png())
    rows = ImageFetcher(retry_deadline_s=5)(work([{"init_image": f"s3://{s3_bucket}/img/a.png"},
                                                  {"init_image": f"s3://{s3_bucket}/img/b.png"}])).to_pylist()
    assert rows[0]["status"] == "pending" and rows[0]["init_image_size"] == [8, 12]
    assert rows[1]["error"] == (f"`init_image` must name an existing image (no such object) but is "
                                f"'s3://{s3_bucket}/img/b.png'")


def test_an_s3_image_is_one_get_and_an_oversized_one_is_refused_from_its_length(s3_server, s3_bucket):
    import boto3

    from batchgen.storage import _session

    big = png(40, 40)
    boto3.client("s3").put_object(Bucket=s3_bucket, Key="img/small.png", Body=png())
    boto3.client("s3").put_object(Bucket=s3_bucket, Key="img/big.png", Body=big)
    calls = []

    def record(model, **_):
        calls.append(model.name)

    _session().events.register("before-call.s3", record)  # clients made from now on report their calls
    try:
        rows = ImageFetcher(retry_deadline_s=5, max_bytes=4000)(work([
            {"init_image": f"s3://{s3_bucket}/img/small.png"}, {"init_image": f"s3://{s3_bucket}/img/big.png"}]))
    finally:
        _session().events.unregister("before-call.s3", record)
    small, oversized = rows.to_pylist()
    assert small["status"] == "pending" and small["init_image_size"] == [8, 12]
    assert oversized["error"] == (f"`init_image` must be at most 4000 bytes (the object has {len(big)}) but is "
                                  f"'s3://{s3_bucket}/img/big.png'")
    assert sorted(calls) == ["GetObject", "GetObject"], "one request per image, no HEAD first"

    def drop_length(parsed, **_):
        parsed.pop("ContentLength", None)

    _session().events.register("after-call.s3.GetObject", drop_length)  # a response without a length
    try:
        row = ImageFetcher(retry_deadline_s=5, max_bytes=4000)(work([{"init_image": f"s3://{s3_bucket}/img/big.png"}]))
    finally:
        _session().events.unregister("after-call.s3.GetObject", drop_length)
    assert row.to_pylist()[0]["error"].startswith("`init_image` must be at most 4000 bytes (the object has more)")


def test_unreachable_s3_fails_the_batch_after_the_deadline(s3_server, s3_bucket):
    from batchgen.errors import StorageError

    s3_server.stop(keep_objects=True)
    try:
        with pytest.raises(StorageError, match="after"):
            ImageFetcher(retry_deadline_s=1)(work([{"init_image": f"s3://{s3_bucket}/img/a.png"}]))
    finally:
        s3_server.start()


def test_reader_carries_bytes_columns_and_resolves_relative_paths(tmp_path):
    (tmp_path / "data" / "img").mkdir(parents=True)
    data = png()
    (tmp_path / "data" / "img" / "a.png").write_bytes(png(6, 6))
    table = prompts_table(3, image=["img/a.png", "/abs/b.png", None], raw=[data, None, data])
    path = write_table(tmp_path / "data" / "p.parquet", table)
    plan = plan_input(InputSpec(prompts=str(path), columns={"image": "init_image", "raw": "mask_image"}), SD)
    reader = RowReader(plan, SamplingSpec(), 8, DoneKeys(), SD)
    rows = [r for task in plan.tasks for t in reader.read(task) for r in t.to_pylist()]
    assert rows[0]["init_image"] == f"{tmp_path}/data/img/a.png" and rows[0]["strength"] == 1.0
    assert rows[0]["mask_image"] == "table:p.parquet:0:raw" and rows[0]["mask_image_bytes"] == data
    assert rows[1]["init_image"] == "/abs/b.png" and rows[1]["strength"] == 0.8
    assert rows[2]["status"] == "error"
    assert rows[2]["error"] == "`mask_image` must be null when `init_image` is but is 'table:p.parquet:2:raw'"
    fetched = ImageFetcher()(pa.Table.from_pylist(rows[:1], schema=WORK_SCHEMA)).to_pylist()[0]
    assert fetched["status"] == "pending" and fetched["init_image_size"] == [6, 6]
    assert fetched["mask_image_sha256"] == hashlib.sha256(data).hexdigest() and fetched["mask_image_bytes"] is None

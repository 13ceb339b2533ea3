"""The Ray Data API: `generate(ds, spec)` maps a Dataset of prompt rows to a Dataset of images and metadata."""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa

from batchgen.errors import JobConfigError
from batchgen.prompts import WORK_SCHEMA, DoneKeys, InputPlan, RowReader
from batchgen.rows import IMAGE_FIELDS, Rules, column_fields
from batchgen.spec import JobSpec, SamplingSpec, load_spec
from batchgen.stages import ENCODED_SCHEMA, EncodeStage

# What `generate` yields: the manifest's columns (how each image was made) and the encoded image.
GENERATED_IMAGES_SCHEMA = ENCODED_SCHEMA.remove(ENCODED_SCHEMA.get_field_index("skipped"))


def generate(ds: Any, spec: JobSpec | Mapping[str, Any] | str | Path) -> Any:
    """A lazy Dataset with one row per (id, sample) of `ds`'s rows: the manifest's columns (prompt, seed, steps,
    scheduler, model and its sha256, status, error, sha256, bytes...) plus `image`, the encoded PNG/JPEG/WebP
    bytes (null where `status` is "error"; `error` names the bad field and value).

    `ds` needs `prompt` and `id` columns (renamed through the spec's `input.columns`: {caption: prompt}); the
    other per-row fields of a job's input (negative_prompt, seed, guidance_scale, steps, width, height,
    scheduler, eta, num_images, init_image, mask_image, strength...) are optional, and other columns travel in
    `extra` (JSON). Init images and masks are fetched and decoded on CPU as in a job (`input.fetch_*` and
    `input.max_image_*` apply); a relative path is relative to the caller's working directory, and bytes are
    recorded as `table:<id>:<column>`. `spec` is a JobSpec, its YAML path or a nested mapping of its sections;
    `model`, `sampling`, `compute` and `output.format` / `output.quality` apply, `input.prompts` and `output.uri`
    do not (write the Dataset where you like). Images are as the same spec's `batchgen run` makes them: seeds
    derive from (sampling.seed, id, sample)."""
    from batchgen.pipeline import (
        LIGHT_TASK_CPUS,
        add_fetch,
        add_generator,
        cluster_totals,
        init_ray,
        prepare_model,
        size_compute,
    )

    spec = _as_spec(spec)
    model_options, model, rules = prepare_model(spec)
    init_ray(spec.compute.address)
    resources = size_compute(spec.compute, *cluster_totals())
    columns = dict(spec.input.columns)
    fields = _input_fields(ds, columns, rules)
    ds = ds.map_batches(_work_rows, batch_format="pyarrow", num_cpus=LIGHT_TASK_CPUS,
                        fn_kwargs={"columns": columns, "sampling": spec.sampling, "rules": rules,
                                   "folder": os.getcwd()})
    ds = add_fetch(ds, fields, spec)
    ds = add_generator(ds, model_options, spec.compute, resources)
    encoder = EncodeStage(spec.output.format, spec.output.quality, model, uuid.uuid4().hex[:12])
    return ds.map_batches(_encode, fn_kwargs={"encoder": encoder}, batch_size=None, batch_format="pyarrow",
                          num_cpus=spec.compute.cpus_per_storage_task)


def _as_spec(spec: JobSpec | Mapping[str, Any] | str | Path) -> JobSpec:
    if isinstance(spec, JobSpec):
        return spec
    if isinstance(spec, (str, Path)):
        return load_spec(spec)
    return load_spec(None, dict(_dotted(spec)))


def _dotted(tree: Mapping[str, Any], prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, Mapping) and key != "columns":
            yield from _dotted(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _input_fields(ds: Any, columns: dict[str, str], rules: Rules) -> set[str] | None:
    """The row fields `ds`'s columns map to, where its schema is known without running it (None otherwise)."""
    names = ds.columns(fetch_if_missing=False)
    if names is None:
        return None
    _refuse_unused_images(names, columns, rules)
    return {columns.get(name, name) for name in names} & column_fields(rules)


def _refuse_unused_images(names: list[str], columns: dict[str, str], rules: Rules) -> None:
    """An image column the model cannot use (a mask for SD3) would travel in `extra` and be silently ignored, as
    the job's plan_input refuses too."""
    usable = column_fields(rules)
    for name in names:
        if columns.get(name, name) in IMAGE_FIELDS and columns.get(name, name) not in usable:
            raise JobConfigError(f"generate(): column {name!r} is an image a {rules.family} model does not use; "
                                 f"its fields: {sorted(usable)}")


def _work_rows(batch: pa.Table, columns: dict[str, str], sampling: SamplingSpec, rules: Rules,
               folder: str) -> pa.Table:
    """A batch of the user's rows -> work rows (one per sample, or an error row), as the job's reader makes;
    relative image paths are relative to `folder`."""
    field_of = {source: target for source, target in columns.items()}
    usable = column_fields(rules)
    _refuse_unused_images(batch.column_names, columns, rules)
    mapped = {field_of.get(name, name): name for name in batch.column_names if field_of.get(name, name) in usable}
    for required in ("prompt", "id"):
        if required not in mapped:
            raise JobConfigError(f"generate(): the dataset has no `{required}` column (columns: {batch.column_names}); "
                                 f"rename one with the spec's input.columns")
    extras = [name for name in batch.column_names if field_of.get(name, name) not in usable]
    reader = RowReader(InputPlan("", [], [], batch.num_rows, mapped, extras, {}), sampling, batch.num_rows, DoneKeys(),
                       rules)
    rows = [row for raw in batch.to_pylist()
            for row in reader.work_rows(raw, "" if raw[mapped["id"]] is None else str(raw[mapped["id"]]), folder)]
    return pa.Table.from_pylist(rows, schema=WORK_SCHEMA)


def _encode(batch: pa.Table, encoder: EncodeStage) -> pa.Table:
    rows = [row for row in encoder.encode_rows(batch.to_pylist()) if row["status"] != "tally"]
    return pa.Table.from_pylist(rows, schema=GENERATED_IMAGES_SCHEMA)

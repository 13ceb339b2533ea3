"""Reading prompt tables: find the Parquet files, check them before Ray starts, turn rows into work rows."""

from __future__ import annotations

import fnmatch
import hashlib
import itertools
import json
import logging
import math
import os
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from batchgen.errors import BatchgenError, JobConfigError, RowError
from batchgen.rows import (
    FIELD,
    GROUP_FIELDS,
    IMAGE_FIELDS,
    INPUT_FIELDS,
    MAX_IMAGES_PER_ROW,
    MAX_SEED,
    Rules,
    arrow_fields,
    column_fields,
    group_value,
    resolve_fields,
    to_int,
)
from batchgen.spec import InputSpec, SamplingSpec

logger = logging.getLogger(__name__)

# Every row field's rules, for a reader given no model (tests; `batchgen validate` passes the model's).
ANY_MODEL = Rules(frozenset(FIELD))

# What flows from the reader to the generator: the row fields, plus `status`: pending (to generate), error
# (invalid row) or tally (no image: one row per read batch carrying in `skipped` how many samples resume skipped),
# and the encoded bytes of images given in binary columns, until the fetch stage decodes them.
WORK_SCHEMA = pa.schema(
    [("id", pa.string()), ("sample_index", pa.int64()), *arrow_fields(),
     ("status", pa.string()), ("error", pa.string()), ("extra", pa.string()), ("skipped", pa.int64()),
     *((f"{name}_bytes", pa.binary()) for name in IMAGE_FIELDS)]
)


def filesystem_for(uri: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and path; S3 endpoint and region from the standard AWS environment."""
    if uri.startswith("s3://"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        options: dict[str, Any] = {"region": os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")}
        if endpoint:
            parsed = urlparse(endpoint)
            options.update(endpoint_override=parsed.netloc or parsed.path, scheme=parsed.scheme or "https")
        return pafs.S3FileSystem(**options), uri[len("s3://") :]
    if "://" in uri and not uri.startswith("file://"):
        raise JobConfigError(f"`input.prompts` {uri!r}: unsupported scheme (use a local path or s3://)")
    return pafs.LocalFileSystem(), os.path.abspath(uri.removeprefix("file://"))


def list_input_files(uri: str, exclude: str | None = None) -> tuple[pafs.FileSystem, str, list[str]]:
    """(filesystem, root, sorted Parquet files) for a file, a directory (recursive) or a glob. Files under the
    `exclude` URI (the job's own output, which holds Parquet manifests) are never listed, so an output inside
    the input directory, or matched by its glob, stays resumable; an input that lies inside it is refused."""
    fs, path = filesystem_for(uri)
    skipped = _output_path(exclude, uri)
    if skipped is not None and _under(path.split("*")[0].split("?")[0].split("[")[0].rstrip("/") or "/", skipped):
        raise JobConfigError(f"`input.prompts` {uri!r} lies inside `output.uri` {exclude!r}: the job would read its "
                             "own manifests as prompts")
    if any(ch in path for ch in "*?["):
        root = path[: min(path.find(ch) for ch in "*?[" if ch in path)].rsplit("/", 1)[0]
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
        files = [i.path for i in infos if i.type == pafs.FileType.File and fnmatch.fnmatch(i.path, path)]
    else:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise JobConfigError(f"`input.prompts` {uri!r} does not exist")
        if info.type == pafs.FileType.File:
            return fs, path.rsplit("/", 1)[0], [path]
        root = path
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
        files = [
            i.path
            for i in infos
            if i.type == pafs.FileType.File
            and not os.path.basename(i.path).startswith((".", "_"))
            and i.path.endswith((".parquet", ".pq"))
        ]
    if skipped is not None:
        inside = [f for f in files if _under(f, skipped)]
        if inside:
            logger.warning("input %s: skipping %d files inside the job's output %s", uri, len(inside), exclude)
            files = [f for f in files if not _under(f, skipped)]
    if not files:
        raise JobConfigError(f"`input.prompts` {uri!r} matches no Parquet files")
    return fs, root, sorted(files)


def _output_path(output: str | None, input_uri: str) -> str | None:
    """The output's path in the input's filesystem, or None where they cannot overlap (S3 and local)."""
    if output is None or output.startswith("s3://") != input_uri.startswith("s3://"):
        return None
    if output.startswith("s3://"):
        return output[len("s3://") :].rstrip("/")
    return os.path.abspath(os.path.expanduser(output.removeprefix("file://")))


def _under(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def file_identity(fs: pafs.FileSystem, root: str, files: list[str]) -> dict[str, str]:
    """What identifies each input file's bytes without reading them: its size and modification time, keyed by
    its path under the input root (the part of a position id that names the file)."""
    identity = {}
    for info in fs.get_file_info(files):
        key = info.path[len(root) :].lstrip("/") or os.path.basename(info.path)
        modified = info.mtime_ns if info.mtime_ns is not None else "unknown"
        identity[key] = f"{info.size} bytes, modified {modified}"
    return identity


@dataclass(frozen=True)
class ReadTask:
    """One row group of one file: the unit the reader streams."""

    path: str
    file_key: str
    row_group: int
    first_row: int
    rows: int


@dataclass(frozen=True)
class InputPlan:
    uri: str
    files: list[str]
    tasks: list[ReadTask]
    rows: int
    columns: dict[str, str]  # batchgen field -> input column
    extra_columns: list[str]
    identity: dict[str, str]  # file key -> size and modification time (file_identity)


def plan_input(spec: InputSpec, rules: Rules = ANY_MODEL, output: str | None = None) -> InputPlan:
    """Check every file's footer (no row data) and map columns; job-level problems raise JobConfigError. Columns
    named after a field the model's family does not use are carried like any other column, except images (an
    ignored mask or init image would change what the rows mean). Files inside the
    `output` URI are not input (list_input_files)."""
    fs, root, files = list_input_files(spec.prompts, exclude=output)
    field_of = {source: target for source, target in spec.columns.items()}
    usable = column_fields(rules)
    unused = sorted({target for target in field_of.values() if target not in usable})
    if unused:
        raise JobConfigError(f"`input.columns` maps to {unused}, which a {rules.family} model does not use; "
                             f"its fields: {sorted(usable)}")
    tasks: list[ReadTask] = []
    rows = 0
    types: dict[str, tuple[pa.DataType, str]] = {}
    mapped: dict[str, str] = {}
    extras: list[str] = []
    for path in files:
        try:
            with fs.open_input_file(path) as f:
                meta = pq.ParquetFile(f).metadata
                schema = meta.schema.to_arrow_schema()
        except (OSError, pa.ArrowException) as e:
            raise JobConfigError(f"cannot read Parquet file {path!r}: {e}") from None
        names = [field_of.get(name, name) for name in schema.names]
        if "prompt" not in names:
            wanted = next((s for s, t in field_of.items() if t == "prompt"), "prompt")
            raise JobConfigError(f"input file {path!r} has no column {wanted!r} (columns: {schema.names})")
        for name in set(names) & usable:
            sources = [column for column, mapped_to in zip(schema.names, names, strict=True) if mapped_to == name]
            if len(sources) > 1:
                raise JobConfigError(f"input file {path!r}: columns {sources} all map to field {name!r}; only one may")
        for name, field in zip(names, schema, strict=True):
            if name in types and types[name][0] != field.type:
                raise JobConfigError(
                    f"column {field.name!r} is {field.type} in {path!r} but {types[name][0]} in {types[name][1]!r}"
                )
            types.setdefault(name, (field.type, path))
            if name in usable:
                if mapped.setdefault(name, field.name) != field.name:
                    raise JobConfigError(f"field {name!r} is column {field.name!r} in {path!r} but column "
                                         f"{mapped[name]!r} in {types[name][1]!r}")
            elif name in IMAGE_FIELDS:  # carried into `extra`, a mask would be silently ignored
                raise JobConfigError(f"input file {path!r} has column {field.name!r}, an image a {rules.family} "
                                     f"model does not use; its fields: {sorted(usable)}")
            elif name not in extras:
                extras.append(name)
        file_key = path[len(root) :].lstrip("/") or os.path.basename(path)
        first = 0
        for group in range(meta.num_row_groups):
            count = meta.row_group(group).num_rows
            if count:
                tasks.append(ReadTask(path, file_key, group, first, count))
            first += count
        rows += meta.num_rows
    if rows == 0:
        raise JobConfigError(f"`input.prompts` {spec.prompts!r} has no rows")
    absent = sorted(source for source, target in field_of.items() if mapped.get(target) != source)
    if absent:
        raise JobConfigError(f"`input.columns` maps {absent} but no input file has such a column "
                             f"(columns: {sorted(set(mapped.values()) | set(extras))})")
    plan = InputPlan(spec.prompts, files, tasks, rows, mapped, extras, file_identity(fs, root, files))
    if "id" in mapped:
        check_unique_ids(plan, fs)
    return plan


def check_unique_ids(plan: InputPlan, fs: pafs.FileSystem) -> None:
    """Duplicate ids are a job-level error: read only the id column and compare 64-bit hashes of the ids the
    reader gives rows (its position, `file:row`, for a null id or a file without the column)."""
    column = plan.columns["id"]
    file_keys = {task.path: task.file_key for task in plan.tasks}
    ids: list[str] = []
    files: list[str] = []
    for path, file_key in file_keys.items():
        with fs.open_input_file(path) as f:
            parquet = pq.ParquetFile(f)
            if column in parquet.schema_arrow.names:
                values = parquet.read(columns=[column]).column(0).to_pylist()
            else:
                values = [None] * parquet.metadata.num_rows
        ids.extend(str(v) if v is not None else f"{file_key}:{row}" for row, v in enumerate(values))
        files.extend([file_key] * len(values))
    hashes = np.fromiter((hash64(i) for i in ids), dtype=np.uint64, count=len(ids))
    unique, counts = np.unique(hashes, return_counts=True)
    repeated = set(unique[counts > 1].tolist())
    if repeated:
        examples = sorted({i for i, h in zip(ids, hashes.tolist(), strict=True) if h in repeated})
        where = sorted({f for f, h in zip(files, hashes.tolist(), strict=True) if h in repeated})
        raise JobConfigError(
            f"column {column!r} must hold unique ids but {len(repeated)} repeat, e.g. {examples[:5]} (in {where[:5]})"
        )


def hash64(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


def sample_key(row_id: str, sample_index: int) -> int:
    """64-bit key of one (id, sample): what resume compares."""
    return hash64(f"{row_id}\x00{sample_index}")


class DoneKeys:
    """The (id, sample) keys a run skips, as a sorted uint64 array: 8 bytes a key where a Python set of
    ints takes about ten times that, so resuming a job of millions of images keeps the driver small."""

    def __init__(self, keys: np.ndarray | list[int] = ()):
        self.keys = np.unique(np.asarray(keys, dtype=np.uint64))

    def __len__(self) -> int:
        return len(self.keys)

    def __contains__(self, key: int) -> bool:
        index = int(np.searchsorted(self.keys, np.uint64(key)))
        return index < len(self.keys) and int(self.keys[index]) == key


def all_done(plan: InputPlan, sampling: SamplingSpec, done: DoneKeys) -> bool:
    """Whether every (id, sample) the input asks for is in `done`, so a run would generate nothing."""
    return committed_pairs(plan, sampling, done) is not None


def committed_pairs(plan: InputPlan, sampling: SamplingSpec, done: DoneKeys) -> int | None:
    """How many (id, sample) pairs the input asks for, when every one is in `done`; None (at the first that is
    not) otherwise. Reads only the id and num_images columns; a row whose num_images is invalid asks for sample 0
    (its error row)."""
    if len(done) < plan.rows:  # every row asks for at least one pair
        return None
    pairs = 0
    for task, table, wanted in _id_columns(plan):
        ids = table.column(wanted["id"]).to_pylist() if "id" in wanted else [None] * table.num_rows
        counts = table.column(wanted["num_images"]).to_pylist() if "num_images" in wanted else [None] * len(ids)
        for row, (raw_id, count) in enumerate(zip(ids, counts, strict=True), task.first_row):
            row_id = str(raw_id) if raw_id is not None else f"{task.file_key}:{row}"
            try:
                count = sampling.num_images if count is None else to_int("num_images", count)
            except RowError:
                count = 1
            if not 1 <= count <= MAX_IMAGES_PER_ROW:
                count = 1
            if any(sample_key(row_id, k) not in done for k in range(count)):
                return None
            pairs += count
    return pairs


def _id_columns(plan: InputPlan):
    """(task, its row group's id and num_images columns, field -> column) for the plan's tasks in order (a window
    of the input, batchgen.windows, is some of them), each input file opened once for its run of row groups."""
    fs, _ = filesystem_for(plan.uri)
    for path, tasks in itertools.groupby(plan.tasks, key=lambda task: task.path):
        with fs.open_input_file(path) as f:
            parquet = pq.ParquetFile(f)
            present = set(parquet.schema_arrow.names)
            wanted = {field: column for field, column in plan.columns.items()
                      if field in INPUT_FIELDS and column in present}
            for task in tasks:
                yield task, parquet.read_row_group(task.row_group, columns=list(wanted.values())), wanted


def derive_seed(job_seed: int, row_id: str, sample_index: int) -> int:
    """Depends only on the job seed and the row's identity, so new rows never shift other rows' seeds."""
    digest = hashlib.sha256(f"{job_seed}\x00{row_id}\x00{sample_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & MAX_SEED


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, bytes):
        return value.hex()
    return value


class RowReader:
    """Turns one ReadTask into work rows: mapped columns, defaults, ids, seeds, samples, validation."""

    def __init__(self, plan: InputPlan, sampling: SamplingSpec, rows_per_read: int, done: DoneKeys,
                 rules: Rules = ANY_MODEL):
        self.plan = plan
        self.sampling = sampling
        self.rows_per_read = rows_per_read
        self.done = done
        self.rules = rules

    def read(self, task: ReadTask):
        """Yields WORK_SCHEMA tables, one per `rows_per_read` input rows. Rows whose (id, sample) is done are
        skipped, invalid ones too (`done` holds error rows when they are not to be retried)."""
        index = task.first_row
        folder = task.path.rsplit("/", 1)[0]
        folder = f"s3://{folder}" if self.plan.uri.startswith("s3://") else folder
        for batch in self._batches(task):
            out: list[dict[str, Any]] = []
            skipped = 0
            for raw in batch.to_pylist():
                for row in self.work_rows(raw, f"{task.file_key}:{index}", folder):
                    if sample_key(row["id"], row["sample_index"]) in self.done:
                        skipped += 1
                    else:
                        out.append(row)
                index += 1
            if skipped:
                out.append({"id": "", "sample_index": -1, "status": "tally", "skipped": skipped})
            yield pa.Table.from_pylist(out, schema=WORK_SCHEMA)

    def _batches(self, task: ReadTask):
        """The task's record batches. Only footers were checked before the job started: a data page that
        cannot be read fails the job here, naming the file."""
        fs, _ = filesystem_for(self.plan.uri)
        try:
            with fs.open_input_file(task.path) as f:
                yield from pq.ParquetFile(f).iter_batches(batch_size=self.rows_per_read, row_groups=[task.row_group])
        except (OSError, pa.ArrowException) as e:
            raise BatchgenError(f"cannot read Parquet file {task.path!r} (row group {task.row_group}): {e}") from None

    def work_rows(self, raw: dict[str, Any], position: str, folder: str | None = None) -> list[dict[str, Any]]:
        """One input row -> one work row per sample, or a single error row naming the bad field. Relative image
        paths are relative to `folder`, the folder of the row's input file."""
        values = {field: raw.get(column) for field, column in self.plan.columns.items()}
        extra = json.dumps({c: _jsonable(raw.get(c)) for c in self.plan.extra_columns}, default=str)
        raw_id = values.get("id")
        row_id = str(raw_id) if raw_id is not None else position
        base: dict[str, Any] = {"id": row_id, "extra": extra, "skipped": 0}
        for name in IMAGE_FIELDS:
            if isinstance(values.get(name), (bytes, bytearray)):  # the image itself: named by where it was read
                base[f"{name}_bytes"] = bytes(values[name])
                values[name] = f"table:{position}:{self.plan.columns[name]}"
            elif isinstance(values.get(name), str) and folder and not _is_absolute(values[name]):
                values[name] = f"{folder}/{values[name]}"
        try:
            count = self.sampling.num_images if values.get("num_images") is None else (
                to_int("num_images", values["num_images"])
            )
            if not 1 <= count <= MAX_IMAGES_PER_ROW:
                raise RowError("num_images", count, f"must be in [1, {MAX_IMAGES_PER_ROW}]")
            fields = self._fields(values)
        except RowError as e:
            return [{**base, "sample_index": 0, "prompt": _safe_text(values.get("prompt")), "status": "error",
                     "error": str(e)}]
        row_seed = values.get("seed")
        rows = []
        for k in range(count):
            seed = int(row_seed) + k if row_seed is not None else derive_seed(self.sampling.seed, row_id, k)
            row = {**base, **fields, "sample_index": k, "seed": seed, "status": "pending"}
            if seed > MAX_SEED:
                error = RowError("seed", seed, f"must be an integer in [0, {MAX_SEED}]")
                row.update(status="error", error=str(error), seed=None)
            rows.append(row)
        return rows

    def _fields(self, values: dict[str, Any]) -> dict[str, Any]:
        if values.get("seed") is not None:
            seed = to_int("seed", values["seed"])
            if seed < 0:
                raise RowError("seed", seed, f"must be an integer in [0, {MAX_SEED}]")
        return resolve_fields(values, self.sampling, self.rules)


def _is_absolute(uri: str) -> bool:
    return "://" in uri or uri.startswith(("/", "~", "table:")) or not uri.strip()


def _safe_text(value: Any) -> str | None:
    return value if isinstance(value, str) else None if value is None else repr(value)[:200]


DESCRIBE_BATCH_ROWS = 4096


def describe_groups(plan: InputPlan, sampling: SamplingSpec, rules: Rules = ANY_MODEL) -> tuple[int, dict[tuple, int]]:
    """(images, images per sub-batch group (the row fields in GROUP_FIELDS)): reads only those columns."""
    fs, _ = filesystem_for(plan.uri)
    images = 0
    groups: dict[tuple, int] = {}
    for path in plan.files:
        with fs.open_input_file(path) as f:
            parquet = pq.ParquetFile(f)
            present = set(parquet.schema_arrow.names)
            needed = (*GROUP_FIELDS, *(FIELD[g].requires for g in GROUP_FIELDS if FIELD[g].requires), "num_images")
            wanted = {field: column for field, column in plan.columns.items() if field in needed and column in present}
            # Batch by batch: an image column holding the images' bytes would otherwise sit whole on the driver.
            for batch in parquet.iter_batches(batch_size=DESCRIBE_BATCH_ROWS, columns=list(wanted.values())):
                values = {field: batch.column(column).to_pylist() for field, column in wanted.items()}
                for i in range(batch.num_rows):
                    count = values["num_images"][i] if "num_images" in values else None
                    count = sampling.num_images if count is None else count
                    if not isinstance(count, int):
                        continue  # an error row: no images
                    row = {g: values[g][i] for g in values if g != "num_images"}
                    row.update({g: "table" for g in IMAGE_FIELDS if isinstance(row.get(g), bytes)})
                    try:
                        resolved = resolve_fields({"prompt": "-", **row}, sampling, rules)
                    except RowError:
                        continue  # an error row: no images
                    key = tuple(group_value(g, resolved.get(g)) for g in GROUP_FIELDS)
                    images += count
                    groups[key] = groups.get(key, 0) + count
    return images, groups

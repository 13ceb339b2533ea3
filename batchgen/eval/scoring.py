"""The scoring stage: a Ray Data pipeline fetch -> score (actors that load the scorers once) -> write, over any
batchgen output, into a Parquet table beside the manifests (`scores/part-*.parquet`; manifests are untouched).

A score row is (id, sample_index, image_sha256, scorer, weights_sha256, value | features): long, so a scorer
added later adds rows, not columns. An image is scored by a scorer once per (image sha256, weights sha256): a
rerun, or a run after a crash, scores only what is missing, and a regenerated image or a changed scorer is
scored again. A reference set for FID/KID is scored (features only) into its own table, named by the hash of
its listing; it is marked complete once every image of it is in.
"""

from __future__ import annotations

import hashlib
import io
import logging
import tarfile
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from batchgen.errors import BatchgenError, JobConfigError
from batchgen.eval.scorers import CLIP_SCORE, FEATURES, Scorers, decode_rgb
from batchgen.eval.spec import ScoringSpec
from batchgen.manifest import read_manifests
from batchgen.storage import NotFound, S3Storage, Storage, open_storage

logger = logging.getLogger(__name__)

SCORES_PREFIX = "scores/"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
SCORE_SCHEMA = pa.schema([
    ("id", pa.string()), ("sample_index", pa.int64()), ("image_sha256", pa.string()), ("scorer", pa.string()),
    ("weights_sha256", pa.string()), ("value", pa.float64()), ("features", pa.list_(pa.float32())),
    ("run_id", pa.string()), ("scored_at", pa.float64()),
])
WORK_SCHEMA = pa.schema([
    ("output", pa.string()), ("root", pa.string()), ("key", pa.string()), ("id", pa.string()),
    ("sample_index", pa.int64()), ("image_sha256", pa.string()), ("prompt", pa.string()),
    ("wanted", pa.list_(pa.string())), ("data", pa.binary()),
])
SUMMARY_SCHEMA = pa.schema([("output", pa.string()), ("images", pa.int64()), ("part", pa.string())])


@dataclass
class Collection:
    """Images to score (keys under `root`) and the output whose scores/ receives their rows."""

    name: str
    output: str
    root: str
    items: list[dict[str, Any]]
    scorers: list[str]
    complete_marker: str | None = None  # for reference sets: written once all of it is scored
    pending: list[dict[str, Any]] = field(default_factory=list)


def manifest_collection(name: str, output: str, hashes: dict[str, str]) -> Collection:
    """The ok images of a batchgen output, each with its prompt (for CLIP score)."""
    storage = open_storage(output)
    prefix = storage.uri_for("")
    items: dict[tuple[str, int], dict[str, Any]] = {}
    for _, table in read_manifests(storage, ["id", "sample_index", "prompt", "image_uri", "sha256", "status"]):
        for row in table.to_pylist():
            if row["status"] == "ok" and row["image_uri"].startswith(prefix):
                items[(row["id"], row["sample_index"])] = {
                    "id": row["id"], "sample_index": row["sample_index"], "key": row["image_uri"][len(prefix):],
                    "prompt": row["prompt"], "image_sha256": row["sha256"]}
    return Collection(name, storage.uri, storage.uri, list(items.values()), sorted(hashes))


def reference_collection(reference: str, into: Storage, hashes: dict[str, str]) -> Collection:
    """A reference image set (a folder or s3:// prefix of images or WebDataset .tar shards): features only, scored
    into `into`/_eval/reference/{listing hash}. Each image or shard is one item (a shard's images are read by the
    fetch stage)."""
    source = open_storage(reference)
    digest = hashlib.sha256()
    keys = []
    if isinstance(source, S3Storage):
        for info in source.list_objects():
            if info.key.lower().endswith((*IMAGE_SUFFIXES, ".tar")):
                keys.append(info.key)
                digest.update(f"{info.key}\t{info.size}\t{info.etag}\n".encode())
    else:
        if not source.root.is_dir():
            raise JobConfigError(f"`scoring.fid.reference` {reference!r} does not exist or is not a folder")
        for key in source.list():
            if key.lower().endswith((*IMAGE_SUFFIXES, ".tar")):
                keys.append(key)
                digest.update(f"{key}\t{source.size(key)}\n".encode())
    if not keys:
        raise JobConfigError(f"`scoring.fid.reference` {reference!r} holds no images ({', '.join(IMAGE_SUFFIXES)}) "
                             f"and no .tar shards: FID and KID need a non-empty reference set")
    output = into.uri_for(f"_eval/reference/{digest.hexdigest()[:24]}")
    items = [{"id": k, "sample_index": 0, "key": k, "prompt": None, "image_sha256": ""} for k in keys]
    marker = f"_COMPLETE-{hashes[FEATURES][:24]}"
    return Collection("reference", output, source.uri, items, [FEATURES], marker)


def read_scores(output: str | Storage, columns: list[str] | None = None) -> pa.Table:
    """Every score row of an output, oldest first: a reader keeping the last row per (id, sample_index, scorer,
    weights_sha256) keeps the latest (a crashed run's retried batch, or a reference shard read twice)."""
    storage = open_storage(output) if isinstance(output, str) else output
    wanted = columns or SCORE_SCHEMA.names
    tables = []
    for key in storage.list(SCORES_PREFIX):
        if key.endswith(".parquet"):
            tables.append(pq.read_table(io.BytesIO(storage.get(key)), columns=wanted))
    if not tables:
        return SCORE_SCHEMA.empty_table().select(wanted)
    table = pa.concat_tables(tables)
    if "scored_at" in wanted and table.num_rows:
        table = table.sort_by("scored_at")
    return table


def find_pending(collection: Collection, hashes: dict[str, str]) -> list[dict[str, Any]]:
    """Items still missing a scorer's row for their current image and weights, with the scorers they miss."""
    storage = open_storage(collection.output)
    if collection.complete_marker and storage.exists(collection.complete_marker):
        return []
    done = read_scores(storage, ["id", "sample_index", "image_sha256", "scorer", "weights_sha256"]).to_pydict()
    scored = {(i, s, h, name) for i, s, h, name, w in zip(done["id"], done["sample_index"], done["image_sha256"],
                                                          done["scorer"], done["weights_sha256"], strict=True)
              if hashes.get(name) == w}
    pending = []
    for item in collection.items:
        wanted = [name for name in collection.scorers
                  if (name != CLIP_SCORE or item["prompt"] is not None)
                  and (item["id"], item["sample_index"], item["image_sha256"], name) not in scored]
        if wanted:
            pending.append({**item, "output": collection.output, "root": collection.root, "wanted": wanted})
    return pending


def fetch_images(batch: pa.Table) -> pa.Table:
    """The fetch stage: each item's image bytes; a WebDataset shard becomes one row per image in it."""
    rows = []
    storages: dict[str, Storage] = {}
    for row in batch.to_pylist():
        storage = storages.setdefault(row["root"], open_storage(row["root"]))
        try:
            data = storage.get(row["key"])
        except NotFound:
            raise BatchgenError(f"image {storage.uri_for(row['key'])} is listed but missing") from None
        if not row["key"].endswith(".tar"):
            rows.append({**row, "data": data})
            continue
        with tarfile.open(fileobj=io.BytesIO(data)) as shard:
            for member in shard.getmembers():
                if member.isfile() and member.name.lower().endswith(IMAGE_SUFFIXES):
                    image = shard.extractfile(member)
                    assert image is not None
                    rows.append({**row, "id": f"{row['key']}/{member.name}", "data": image.read()})
    return pa.Table.from_pylist(rows, schema=WORK_SCHEMA)


class ScorerActor:
    """Loads the scorers once; each call scores a batch of fetched images into score rows."""

    def __init__(self, spec: ScoringSpec, hashes: dict[str, str], torch_threads: int):
        import torch

        torch.set_num_threads(torch_threads)  # Ray sets OMP_NUM_THREADS=1 in workers
        self.scorers = Scorers(spec, hashes)
        self.hashes = hashes
        self.run_id = uuid.uuid4().hex[:12]

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        images = [decode_rgb(r["data"]) for r in rows]
        results = self.scorers.score(images, [r["prompt"] for r in rows], [set(r["wanted"]) for r in rows])
        now = time.time()
        out = []
        for row, result in zip(rows, results, strict=True):
            for name in row["wanted"]:
                value = result.get(name)
                features = value.tolist() if name == FEATURES else None
                out.append({"output": row["output"], "id": row["id"], "sample_index": row["sample_index"],
                            "image_sha256": row["image_sha256"], "scorer": name,
                            "weights_sha256": self.hashes[name], "value": None if name == FEATURES else value,
                            "features": features, "run_id": self.run_id, "scored_at": now})
        return pa.Table.from_pylist(out, schema=SCORE_SCHEMA.insert(0, pa.field("output", pa.string())))


def write_scores(batch: pa.Table) -> pa.Table:
    """One Parquet part per output per batch, named by its rows, so a retried batch overwrites its own part."""
    summaries = []
    for output in sorted(set(batch.column("output").to_pylist())):
        rows = batch.filter(pa.compute.equal(batch.column("output"), output)).drop_columns(["output"])
        digest = hashlib.sha256()
        for i, s, name, run in zip(*(rows.column(c).to_pylist() for c in ("id", "sample_index", "scorer", "run_id")),
                                   strict=True):
            digest.update(f"{i}\x00{s}\x00{name}\x00{run}\x01".encode())
        key = f"{SCORES_PREFIX}part-{digest.hexdigest()[:32]}.parquet"
        buffer = io.BytesIO()
        pq.write_table(rows, buffer, compression="zstd")
        open_storage(output).put(key, buffer.getvalue(), "application/vnd.apache.parquet")
        images = len(set(zip(rows.column("id").to_pylist(), rows.column("sample_index").to_pylist(), strict=True)))
        summaries.append({"output": output, "images": images, "part": key})
    return pa.Table.from_pylist(summaries, schema=SUMMARY_SCHEMA)


def actor_resources(spec: ScoringSpec, cluster_cpus: float, cluster_gpus: float) -> tuple[float, float, int]:
    """(gpus, cpus, torch threads) per scorer actor: a GPU each when there are GPUs; on CPU-only clusters a share
    that leaves the fetch and write tasks half a CPU."""
    gpus = spec.gpus_per_actor if spec.gpus_per_actor is not None else (1.0 if cluster_gpus > 0 else 0.0)
    if spec.cpus_per_actor is not None:
        cpus = spec.cpus_per_actor
    elif gpus > 0:
        cpus = 1.0
    else:
        cpus = round(max(0.1, min(1.0, (cluster_cpus - 0.5) / spec.actors)), 2)
    threads = max(1, int(cpus)) if gpus > 0 else max(1, int(cluster_cpus // spec.actors))
    return gpus, cpus, threads


def score_collections(collections: list[Collection], spec: ScoringSpec, hashes: dict[str, str],
                      address: str | None = None) -> dict[str, int]:
    """Score every pending image of every collection in one pipeline (the scorers load once per actor); returns
    images scored per collection name. Nothing pending: Ray is not started."""
    for collection in collections:
        collection.pending = find_pending(collection, hashes)
        logger.info("scoring %s: %d of %d images pending", collection.name, len(collection.pending),
                    len(collection.items))
    work = [row for c in collections for row in c.pending]
    counts = {c.name: 0 for c in collections}
    if work:
        import ray

        from batchgen.pipeline import init_ray

        init_ray(address)
        from ray.data import DataContext

        from batchgen.readahead import CONFIG_KEY

        # A generation job before this one left its prompt read-ahead cap on the shared DataContext; this pipeline
        # has no prompt reader to cap.
        DataContext.get_current().set_config(CONFIG_KEY, None)
        totals = ray.cluster_resources()
        gpus, cpus, threads = actor_resources(spec, float(totals.get("CPU", 0)), float(totals.get("GPU", 0)))
        by_output = {c.output: c.name for c in collections}
        ds = ray.data.from_items(work, override_num_blocks=max(1, min(len(work) // spec.batch_size, 64)))
        ds = ds.map_batches(fetch_images, batch_size=spec.batch_size, batch_format="pyarrow", num_cpus=0.25)
        ds = ds.map_batches(ScorerActor, fn_constructor_kwargs={"spec": spec, "hashes": hashes,
                                                                "torch_threads": threads},
                            batch_size=spec.batch_size, batch_format="pyarrow", num_cpus=cpus, num_gpus=gpus,
                            compute=ray.data.ActorPoolStrategy(size=spec.actors))
        ds = ds.map_batches(write_scores, batch_size=None, batch_format="pyarrow", num_cpus=0.25)
        from batchgen.pipeline import Progress

        progress = Progress(len(work))  # the same periodic line (and live bar) as generation
        try:
            for summary in ds.iter_rows():
                counts[by_output[summary["output"]]] += summary["images"]
                progress.update(summary["images"])
        except Exception as e:  # Ray wraps stage failures: one BatchgenError with the stage's message
            from batchgen.pipeline import _job_error

            raise _job_error(e) from e
    for collection in collections:
        if collection.complete_marker:
            open_storage(collection.output).put(collection.complete_marker, b"", "text/plain")
    return counts


"""Export an evaluation's images into other suites' folder layouts, so their own scorers run on them:
- `flat`: {arm}/{prompt_id}_{seed}.png;
- `geneval`: {arm}/{prompt index:05d}/metadata.jsonl + samples/{seed index:04d}.png (GenEval's evaluate_images.py
  input; metadata.jsonl is the prompt's metadata line from the prompt set, e.g. GenEval's own
  evaluation_metadata.jsonl entries);
- `t2i-compbench`: {arm}/samples/{prompt}_{index:06d}.png (T2I-CompBench's scripts read the prompt back from the
  file name, up to the last underscore).
Images are re-encoded as PNG when stored in another format; files already exported are skipped."""

from __future__ import annotations

import io
import json
import logging
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from batchgen.errors import JobConfigError
from batchgen.eval.results import Results
from batchgen.storage import Storage, object_key, open_storage

logger = logging.getLogger(__name__)

LAYOUTS = ("flat", "geneval", "t2i-compbench")


def _png(data: bytes) -> bytes:
    if data.startswith(b"\x89PNG"):
        return data
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        out = io.BytesIO()
        image.convert("RGB").save(out, "PNG")
    return out.getvalue()


def plan_export(results: Results, layout: str) -> tuple[list[tuple[str, str, str]], dict[str, bytes]]:
    """([(dest key, arm output, image uri)], {dest key: small file bytes})."""
    if layout not in LAYOUTS:
        raise JobConfigError(f"export layout must be one of {list(LAYOUTS)} but is {layout!r}")
    copies: list[tuple[str, str, str]] = []
    files: dict[str, bytes] = {}
    for arm in results.arms:
        rows = sorted(arm.rows, key=lambda r: (r["prompt_set"], r["prompt_id"], int(r["seed"])))
        if layout == "flat":
            for row in rows:
                copies.append((object_key(arm.name, f"{row['prompt_id']}_{row['seed']}.png"), arm.output,
                               row["image_uri"]))
        elif layout == "geneval":
            by_prompt: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
            for row in rows:
                by_prompt[(row["prompt_set"], row["prompt_id"])].append(row)
            for index, (_, samples) in enumerate(sorted(by_prompt.items())):
                folder = f"{index:05d}"
                metadata = json.loads(samples[0]["metadata"]) if samples[0].get("metadata") else {}
                metadata.setdefault("prompt", samples[0]["prompt"])
                files[object_key(arm.name, folder, "metadata.jsonl")] = (json.dumps(metadata) + "\n").encode()
                for k, row in enumerate(samples):
                    copies.append((object_key(arm.name, folder, "samples", f"{k:04d}.png"), arm.output,
                                   row["image_uri"]))
        else:
            for index, row in enumerate(rows):
                # The prompt as written (spaces kept: the suite parses it back), minus what a file name cannot hold.
                name = "".join(" " if ch in "/\\\0" or ord(ch) < 32 else ch for ch in row["prompt"]).strip()[:180]
                copies.append((f"{object_key(arm.name)}/samples/{name}_{index:06d}.png", arm.output,
                               row["image_uri"]))
    return copies, files


def export(results: Results, dest: str, layout: str, workers: int = 16) -> int:
    """Write the layout under `dest`; returns how many images were copied."""
    copies, files = plan_export(results, layout)
    target = open_storage(dest)
    for key, data in files.items():
        target.put(key, data, "application/jsonl")
    existing = set(target.list())
    sources: dict[str, Storage] = {}

    def one(item: tuple[str, str, str]) -> None:
        key, output, uri = item
        if output not in sources:
            sources[output] = open_storage(output)
        source = sources[output]
        target.put(key, _png(source.get(uri[len(source.uri_for("")):])), "image/png")

    todo = [c for c in copies if c[0] not in existing]
    with ThreadPoolExecutor(workers, thread_name_prefix="export") as pool:
        list(pool.map(one, todo))
    logger.info("exported %d images (%d already there) to %s", len(todo), len(copies) - len(todo), target.uri)
    return len(todo)

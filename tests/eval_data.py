"""A synthetic evaluation root (arms.json, per-arm images, manifests and scores) written without Ray or models:
for report tests and bench/report_scale.py. Every file is in its real format, written by batchgen's own
writers where it has one (manifests)."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from batchgen.eval.arms import ARMS_KEY
from batchgen.eval.scorers import AESTHETIC, CLIP_SCORE
from batchgen.eval.scoring import SCORE_SCHEMA, SCORES_PREFIX
from batchgen.manifest import write_manifest
from batchgen.storage import open_storage

CATEGORIES = ["animals", "objects", "scenes", "text"]


def synthetic_image(rng: np.random.Generator, side: int) -> bytes:
    """A smooth colour field with some noise: compresses like a photo rather than like pure noise."""
    y, x = np.mgrid[0:side, 0:side] / side
    base = rng.uniform(0, 255, 3)
    slope = rng.uniform(-120, 120, (2, 3))
    pixels = base + x[..., None] * slope[0] + y[..., None] * slope[1] + rng.normal(0, 12, (side, side, 3))
    out = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(out, "PNG")
    return out.getvalue()


def write_synthetic_eval(root: Path, guidance: list[float], schedulers: list[str], prompts: int, seeds: int,
                         side: int = 64, failed_arm: str | None = None, seed: int = 0) -> dict[str, object]:
    """len(guidance) x len(schedulers) arms x prompts x seeds images; returns counts."""
    rng = np.random.default_rng(seed)
    storage = open_storage(str(root))
    entries = []
    for scheduler in schedulers:
        for scale in guidance:
            name = f"g{scale:g}-{scheduler}"
            arm = open_storage(str(root / "arms" / name))
            rows, scores = [], []
            for p in range(prompts):
                category = CATEGORIES[p % len(CATEGORIES)]
                for s in range(seeds):
                    row_id = f"set/{p:05d}/s{s}"
                    data = synthetic_image(rng, side)
                    key = f"images/{hashlib.sha256(row_id.encode()).hexdigest()[:2]}/{p:05d}_{s}.png"
                    arm.put(key, data, "image/png")
                    rows.append({
                        "id": row_id, "sample_index": 0, "prompt": f"a {category} prompt number {p}",
                        "negative_prompt": "", "seed": s, "steps": 30, "guidance_scale": scale,
                        "scheduler": scheduler, "eta": 0.0, "width": side, "height": side,
                        "model": "/models/synthetic", "model_sha256": "0" * 64, "dtype": "float16",
                        "image_uri": arm.uri_for(key), "sha256": hashlib.sha256(data).hexdigest(),
                        "bytes": len(data), "format": "png", "status": "ok", "truncated": False,
                        "generate_ms": 900.0, "batch_size": 8, "worker": "synthetic:1", "run_id": "synthetic",
                        "extra": json.dumps({"prompt_set": "set", "prompt_id": f"{p:05d}", "category": category}),
                    })
                    for metric, centre in ((CLIP_SCORE, 25 + scale), (AESTHETIC, 5 - 0.1 * scale)):
                        scores.append({"id": row_id, "sample_index": 0, "image_sha256": rows[-1]["sha256"],
                                       "scorer": metric, "weights_sha256": "synthetic",
                                       "value": float(rng.normal(centre, 2)), "features": None,
                                       "run_id": "synthetic", "scored_at": 0.0})
            for start in range(0, len(rows), 256):
                write_manifest(arm, rows[start:start + 256], epoch=1)
            buffer = io.BytesIO()
            pq.write_table(pa.Table.from_pylist(scores, schema=SCORE_SCHEMA), buffer)
            arm.put(f"{SCORES_PREFIX}part-synthetic.parquet", buffer.getvalue())
            entries.append({"name": name, "output": arm.uri, "status": "ok", "error": None,
                            "settings": {"guidance_scale": scale, "scheduler": scheduler}})
    if failed_arm:
        entries.append({"name": failed_arm, "output": str(root / "arms" / failed_arm), "status": "failed",
                        "error": "model directory '/models/missing' does not exist or is not a directory",
                        "settings": {"model": "/models/missing"}})
    listing = {"baseline": entries[0]["name"], "arms": entries,
               "scorers": {CLIP_SCORE: "synthetic", AESTHETIC: "synthetic"}}
    storage.put(ARMS_KEY, json.dumps(listing).encode(), "application/json")
    return {"arms": len(entries), "images": len(guidance) * len(schedulers) * prompts * seeds}

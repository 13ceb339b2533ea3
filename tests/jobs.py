"""Helpers and fixtures for end-to-end job tests: a local Ray, prompt tables, specs sized for 2 cores."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from batchgen.spec import JobSpec, load_spec

REPO = Path(__file__).resolve().parent.parent

PROMPT_WORDS = ["lighthouse", "ramen", "fox", "garden", "harbor", "robot", "canyon", "owl", "teapot", "glacier"]


def prompts_table(n: int, start: int = 0, **columns: list[Any]) -> pa.Table:
    data: dict[str, Any] = {
        "prompt": [f"a {PROMPT_WORDS[i % len(PROMPT_WORDS)]} number {i}" for i in range(start, start + n)]
    }
    data.update(columns)
    return pa.table(data)


def write_table(path: Path, table: pa.Table) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def job_spec(model_dir: Path, prompts: str, output: str, **overrides: Any) -> JobSpec:
    """Small images and few steps; two actors of 0.4 CPU so the reader and the store stage always run."""
    values = {
        "input.prompts": prompts,
        "output.uri": output,
        "model.source": str(model_dir),
        "model.device": "cpu",
        "model.dtype": "float32",
        "sampling.steps": 2,
        "sampling.width": 32,
        "sampling.height": 32,
        "sampling.seed": 5,
        "compute.batch_size": 8,
        "compute.min_actors": 2,
        "compute.max_actors": 2,
        "compute.cpus_per_actor": 0.4,
        "compute.torch_threads": 1,
        "compute.no_progress_timeout_s": 120,
    }
    values.update(overrides)
    return load_spec(None, values)


def decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "batchgen", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
        env=env,
    )


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """One local Ray for the session: 2 CPUs, as on the CI machine. Started after the S3 server so its
    workers inherit the AWS endpoint settings, as a cluster's nodes carry their own AWS configuration."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()

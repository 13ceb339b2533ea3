"""Ray's read and store workers unpickle functions from batchgen.pipeline and batchgen.stages: importing those
must not import torch or diffusers (about 2.7 s of CPU and 400 MB of memory per worker process)."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(60)


def test_pipeline_and_stages_import_without_torch():
    code = (
        "import sys; import batchgen.pipeline, batchgen.stages, batchgen.prompts, batchgen.manifest, "
        "batchgen.spec, batchgen.requests; "
        "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_engine_still_exports_the_request_names():
    from batchgen import engine, requests

    assert engine.GenerationRequest is requests.GenerationRequest
    assert engine.validate_request is requests.validate_request
    assert engine.MAX_SEED == requests.MAX_SEED

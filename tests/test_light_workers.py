"""Ray's read and store workers unpickle functions from batchgen.pipeline and batchgen.stages, and the driver
only checks and hashes the model: importing those must not import torch or diffusers (about 2.7 s of CPU
and 300-400 MB of memory per process). Only the generator actor loads them."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(60)


def test_driver_and_worker_modules_import_without_torch():
    code = (
        "import sys; import batchgen.cli, batchgen.pipeline, batchgen.stages, batchgen.prompts, batchgen.manifest, "
        "batchgen.spec, batchgen.rows, batchgen.models.loading, batchgen.models.families, batchgen.models.source, "
        "batchgen.models.staging, batchgen.models.plan; "
        "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_engine_still_exports_the_request_names():
    from batchgen import engine, rows

    assert engine.GenerationRequest is rows.GenerationRequest
    assert engine.validate_request is rows.validate_request
    assert engine.MAX_SEED == rows.MAX_SEED


def test_job_control_commands_stay_light():
    """`batchgen status|logs|stop` import batchgen.submit to talk to the Jobs API: no data or model stack."""
    code = (
        "import sys; import batchgen.cli, batchgen.submit; "
        "print(sorted(m for m in ('torch', 'pyarrow', 'PIL', 'boto3') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"

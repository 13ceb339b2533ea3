"""Session fixtures: tiny random-weight models built by batchgen itself, loaded through the real loader."""

from __future__ import annotations

import pytest

from batchgen.models.tiny import make_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("models") / "sd15", "sd15")


@pytest.fixture(scope="session")
def tiny_v_model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("models") / "sd2v", "sd2-v")


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    from batchgen.models.loading import load_model

    return load_model(str(tiny_model_dir), device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def tiny_v_model(tiny_v_model_dir):
    from batchgen.models.loading import load_model

    return load_model(str(tiny_v_model_dir), device="cpu", dtype="float32")

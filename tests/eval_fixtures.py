"""Session fixtures for evaluation tests: tiny random-weight scorers built by batchgen.eval.tiny."""

from __future__ import annotations

import pytest

from batchgen.eval.tiny import make_tiny_scorers


@pytest.fixture(scope="session")
def tiny_scorers(tmp_path_factory):
    return make_tiny_scorers(tmp_path_factory.mktemp("scorers"))

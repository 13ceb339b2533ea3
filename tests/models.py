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


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("models") / "sdxl", "sdxl")


@pytest.fixture(scope="session")
def tiny_refiner_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("models") / "sdxl-refiner", "sdxl-refiner")


@pytest.fixture(scope="session")
def tiny_sdxl(tiny_sdxl_dir):
    from batchgen.models.loading import load_model

    return load_model(str(tiny_sdxl_dir), device="cpu", dtype="float32")


REFINER_START = 0.5


@pytest.fixture(scope="session")
def tiny_sdxl_refined(tiny_sdxl_dir, tiny_refiner_dir):
    """The tiny SDXL base with the tiny refiner from half the schedule on."""
    from batchgen.models.loading import load_model

    return load_model(str(tiny_sdxl_dir), device="cpu", dtype="float32",
                      refiner={"source": str(tiny_refiner_dir), "start": REFINER_START})


@pytest.fixture(scope="session")
def tiny_inpaint_model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("models") / "sd15-inpaint", "sd15-inpaint")


@pytest.fixture(scope="session")
def tiny_inpaint_model(tiny_inpaint_model_dir):
    from batchgen.models.loading import load_model

    return load_model(str(tiny_inpaint_model_dir), device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def tiny_sdxl_inpaint_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("models") / "sdxl-inpaint", "sdxl-inpaint")


@pytest.fixture(scope="session")
def tiny_sdxl_inpaint(tiny_sdxl_inpaint_dir):
    from batchgen.models.loading import load_model

    return load_model(str(tiny_sdxl_inpaint_dir), device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def tiny_sd3_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("models") / "sd3", "sd3")


@pytest.fixture(scope="session")
def tiny_sd35_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("models") / "sd35", "sd35")


@pytest.fixture(scope="session")
def tiny_sd3_dynamic_dir(tiny_sd3_dir, tmp_path_factory):
    """The tiny SD3 with dynamic shifting (`mu` from the image size) instead of its static shift."""
    import json
    import shutil

    path = tmp_path_factory.mktemp("models") / "sd3-dynamic"
    shutil.copytree(tiny_sd3_dir, path)
    config_file = path / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    config.update(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=4,
                  max_image_seq_len=64)
    config_file.write_text(json.dumps(config))
    return path


@pytest.fixture(scope="session")
def tiny_sd3(tiny_sd3_dir):
    from batchgen.models.loading import load_model

    return load_model(str(tiny_sd3_dir), device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def tiny_sd35(tiny_sd35_dir):
    from batchgen.models.loading import load_model

    return load_model(str(tiny_sd35_dir), device="cpu", dtype="float32")

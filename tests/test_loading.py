"""The real loading path on tiny models: safetensors only, clear errors naming the path and the part."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file

from batchgen.errors import ModelLoadError
from batchgen.models.loading import check_model_dir, load_model, weights_sha256
from batchgen.models.tiny import make_tiny_model


@pytest.fixture
def model_copy(tiny_model_dir, tmp_path):
    return shutil.copytree(tiny_model_dir, tmp_path / "model")


def test_tiny_model_is_small_deterministic_and_safetensors(tiny_model_dir, tmp_path):
    files = [p for p in tiny_model_dir.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 10 * 2**20
    weights = [p for p in files if p.suffix in (".safetensors", ".bin")]
    assert weights and all(p.suffix == ".safetensors" for p in weights)
    again = make_tiny_model(tmp_path / "again")
    assert weights_sha256(again) == weights_sha256(tiny_model_dir)


def test_v_model_is_v_prediction(tiny_v_model):
    assert tiny_v_model.pipe.scheduler.config.prediction_type == "v_prediction"
    assert tiny_v_model.pipe.unet.config.use_linear_projection


def test_loaded_model_facts(tiny_model, tiny_model_dir):
    assert tiny_model.device == torch.device("cpu")
    assert tiny_model.dtype == torch.float32
    assert tiny_model.weights_sha256 == weights_sha256(tiny_model_dir)
    assert tiny_model.adapter.vae_scale_factor == 8
    assert tiny_model.adapter.max_prompt_tokens == 77


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_dtypes(tiny_model_dir, dtype):
    model = load_model(str(tiny_model_dir), device="cpu", dtype=dtype)
    assert model.pipe.unet.dtype == getattr(torch, dtype)


def test_weights_hash_changes_with_weights(model_copy):
    before = weights_sha256(model_copy)
    path = model_copy / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(path)
    name = next(iter(tensors))
    tensors[name] = tensors[name] + 1
    from safetensors.torch import save_file

    save_file(tensors, path)
    assert weights_sha256(model_copy) != before


def test_missing_directory(tmp_path):
    with pytest.raises(ModelLoadError, match=r"'.*nowhere' does not exist"):
        load_model(str(tmp_path / "nowhere"), device="cpu")


def test_missing_model_index(model_copy):
    (model_copy / "model_index.json").unlink()
    with pytest.raises(ModelLoadError, match="has no model_index.json"):
        load_model(str(model_copy), device="cpu")


def test_malformed_model_index(model_copy):
    (model_copy / "model_index.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="model_index.json' is not valid JSON"):
        load_model(str(model_copy), device="cpu")


def test_missing_component(model_copy):
    shutil.rmtree(model_copy / "vae")
    with pytest.raises(ModelLoadError, match="lists component 'vae' but has no vae/"):
        load_model(str(model_copy), device="cpu")


def test_a_model_component_without_weights_is_found_on_the_driver_with_exit_2(model_copy, tmp_path):
    """Found by check_model_dir, which the driver runs before Ray starts (the README promises exit 2)."""
    from click.testing import CliRunner

    from batchgen.cli import main
    from tests.jobs import job_spec, prompts_table, write_spec, write_table

    (model_copy / "text_encoder" / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="component 'text_encoder' .* has a config.json but no weights file"):
        check_model_dir(model_copy)
    prompts = write_table(tmp_path / "p.parquet", prompts_table(2))
    spec = write_spec(tmp_path / "job.yaml", job_spec(model_copy, str(prompts), str(tmp_path / "out")))
    result = CliRunner().invoke(main, ["run", str(spec), "--address", "127.0.0.1:1"])  # Ray would fail with 1
    assert result.exit_code == 2 and "'text_encoder'" in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()


def pickle_unet(model_copy):
    unet = model_copy / "unet"
    state = load_file(unet / "diffusion_pytorch_model.safetensors")
    torch.save(state, unet / "diffusion_pytorch_model.bin")
    (unet / "diffusion_pytorch_model.safetensors").unlink()


def test_pickle_weights_refused_by_default(model_copy):
    pickle_unet(model_copy)
    with pytest.raises(ModelLoadError, match="component 'unet' .* has only pickle weights"):
        load_model(str(model_copy), device="cpu")


def test_pickle_weights_load_when_allowed_with_warning(model_copy, caplog, tiny_model):
    pickle_unet(model_copy)
    with caplog.at_level(logging.WARNING, logger="batchgen.models.loading"):
        model = load_model(str(model_copy), device="cpu", allow_pickle=True)
    assert "allow_pickle" in caplog.text
    reference = tiny_model.pipe.unet.state_dict()
    for name, value in model.pipe.unet.state_dict().items():
        assert torch.equal(value, reference[name])


def test_bad_dtype(tiny_model_dir):
    with pytest.raises(ModelLoadError, match="`dtype` must be one of .* but is 'float8'"):
        load_model(str(tiny_model_dir), device="cpu", dtype="float8")


def test_unknown_hub_id_names_it(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="cannot load model 'no-such-org/no-such-model' as a hub id"):
        load_model("no-such-org/no-such-model", device="cpu")

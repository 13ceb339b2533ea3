"""Build tiny random-weight diffusion pipelines with the real classes, for tests, demos and benchmarks."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

FAMILIES = ("sd15", "sd2-v")
INIT_SEED = 0

# Shapes: (unet channels, cross-attention dim, text layers). "tiny" is the test model (< 10 MB);
# "bench" is SD-shaped but small enough that one batch takes about a second on two CPU cores.
SIZES = {
    "tiny": {"unet_channels": (32, 64), "text_dim": 32, "text_layers": 2, "vae_channels": (8, 8, 16, 16)},
    "bench": {"unet_channels": (64, 128), "text_dim": 128, "text_layers": 4, "vae_channels": (16, 16, 32, 32)},
}


def _byte_vocab() -> list[str]:
    """The 256 printable stand-ins that byte-level BPE uses for raw bytes (GPT-2's table)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def write_tokenizer(directory: Path) -> None:
    """A CLIP byte-level BPE tokenizer over single characters (no merges): every byte is a token."""
    directory.mkdir(parents=True, exist_ok=True)
    chars = _byte_vocab()
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    (directory / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "do_lower_case": True,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (directory / "special_tokens_map.json").write_text(
        json.dumps({k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")})
    )


def build_pipeline(family: str = "sd15", size: str = "tiny"):
    """Random-weight StableDiffusionPipeline with deterministic weights (fixed init seed)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    if family not in FAMILIES:
        raise ValueError(f"`family` must be one of {FAMILIES} but is {family!r}")
    if size not in SIZES:
        raise ValueError(f"`size` must be one of {tuple(SIZES)} but is {size!r}")
    shape = SIZES[size]
    v_prediction = family == "sd2-v"
    text_dim = shape["text_dim"]

    torch.manual_seed(INIT_SEED)
    unet = UNet2DConditionModel(
        block_out_channels=shape["unet_channels"],
        layers_per_block=2 if size == "bench" else 1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=text_dim,
        attention_head_dim=(2, 4) if v_prediction else 8,
        use_linear_projection=v_prediction,
        norm_num_groups=32,
    )
    torch.manual_seed(INIT_SEED + 1)
    vae_channels = shape["vae_channels"]
    vae = AutoencoderKL(
        block_out_channels=vae_channels,
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(vae_channels),
        latent_channels=4,
        norm_num_groups=8,
        layers_per_block=1,
        sample_size=64,
    )
    torch.manual_seed(INIT_SEED + 2)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=512,
            eos_token_id=513,
            pad_token_id=513,
            hidden_size=text_dim,
            intermediate_size=text_dim * 2,
            num_attention_heads=4,
            num_hidden_layers=shape["text_layers"],
            vocab_size=514,
            max_position_embeddings=77,
            hidden_act="gelu" if v_prediction else "quick_gelu",
            projection_dim=text_dim,
        )
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="v_prediction" if v_prediction else "epsilon",
        timestep_spacing="leading",
    )
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizer(Path(tmp))
        tokenizer = CLIPTokenizer.from_pretrained(tmp)
    return StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def make_tiny_model(directory: str | Path, family: str = "sd15", size: str = "tiny") -> Path:
    """Write a random-weight pipeline in diffusers layout with safetensors weights; returns the path."""
    from transformers.utils import logging as transformers_logging

    path = Path(directory)
    pipe = build_pipeline(family, size)
    transformers_logging.disable_progress_bar()  # a per-shard bar for a 4 MB model is noise
    pipe.save_pretrained(path, safe_serialization=True)
    # Our own tokenizer files, so the saved tokenizer is exactly what write_tokenizer defines.
    write_tokenizer(path / "tokenizer")
    logger.info("wrote %s %s model to %s", size, family, path)
    return path

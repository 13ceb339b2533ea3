"""Build tiny random-weight diffusion pipelines with the real classes, for tests, demos and benchmarks."""

from __future__ import annotations

import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)

# The one list of tiny families (spec and CLI read it; this module imports torch only where it builds).
# sd15-inpaint, sdxl-inpaint: a 9-channel inpainting UNet.
FAMILIES = ("sd15", "sd2-v", "sd15-inpaint", "sdxl", "sdxl-refiner", "sdxl-inpaint", "sd3", "sd35")
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


def clip_tokenizer():
    """The tokenizer write_tokenizer defines, loaded as a saved model's would be."""
    import tempfile

    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizer(Path(tmp))
        return CLIPTokenizer.from_pretrained(tmp)


def build_pipeline(family: str = "sd15", size: str = "tiny"):
    """Random-weight pipeline of the family's real classes with deterministic weights (fixed init seeds);
    sd15-inpaint and sdxl-inpaint are a StableDiffusionInpaintPipeline and a StableDiffusionXLInpaintPipeline."""
    import torch
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionInpaintPipeline,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    if family not in FAMILIES:
        raise ValueError(f"`family` must be one of {FAMILIES} but is {family!r}")
    if size not in SIZES:
        raise ValueError(f"`size` must be one of {tuple(SIZES)} but is {size!r}")
    if family.startswith("sdxl"):
        if size != "tiny":
            raise ValueError(f"`size` {size!r}: SDXL tiny models come in one size, 'tiny'")
        return build_sdxl_pipeline(refiner=family == "sdxl-refiner", inpaint=family == "sdxl-inpaint")
    if family in ("sd3", "sd35"):
        if size != "tiny":
            raise ValueError(f"`size` {size!r}: SD3 tiny models come in one size, 'tiny'")
        from batchgen.models.tiny_sd3 import build_sd3_pipeline

        return build_sd3_pipeline(sd35=family == "sd35")
    shape = SIZES[size]
    v_prediction = family == "sd2-v"
    text_dim = shape["text_dim"]

    torch.manual_seed(INIT_SEED)
    unet = UNet2DConditionModel(
        block_out_channels=shape["unet_channels"],
        layers_per_block=2 if size == "bench" else 1,
        sample_size=8,
        in_channels=9 if family == "sd15-inpaint" else 4,
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
    pipeline_class = StableDiffusionInpaintPipeline if family == "sd15-inpaint" else StableDiffusionPipeline
    return pipeline_class(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer(),
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
    # Our own tokenizer files, so the saved CLIP tokenizers are exactly what write_tokenizer defines.
    for name in ("tokenizer", "tokenizer_2"):
        if getattr(pipe, name, None) is not None:
            write_tokenizer(path / name)
    logger.info("wrote %s %s model to %s", size, family, path)
    return path


# SDXL at the sizes of diffusers' own SDXL tests (UNet channels (2, 4), CLIP hidden 32), with our tokenizer.
SDXL_TEXT = {"hidden_size": 32, "intermediate_size": 37, "layer_norm_eps": 1e-05, "num_attention_heads": 4,
             "num_hidden_layers": 5, "hidden_act": "gelu", "projection_dim": 32}
TIME_EMBED_DIM = 8


def _sdxl_unet(cross_attention_dim: int, time_ids: int, seed: int, in_channels: int = 4):
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=(2, 4), layers_per_block=2, sample_size=32, in_channels=in_channels, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED_DIM, transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=time_ids * TIME_EMBED_DIM + SDXL_TEXT["projection_dim"],
        cross_attention_dim=cross_attention_dim, norm_num_groups=1,
    )


def _sdxl_shared(seed: int = INIT_SEED + 10):
    """text_encoder_2 and the VAE, which base and refiner share (same seeds: byte-identical weights). The VAE
    carries per-channel latents_mean/std, so decoding exercises them; force_upcast as SDXL's VAE."""
    import torch
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    text_encoder_2 = CLIPTextModelWithProjection(
        CLIPTextConfig(bos_token_id=512, eos_token_id=513, pad_token_id=513, vocab_size=514,
                       max_position_embeddings=77, **SDXL_TEXT))
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4, sample_size=128,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        scaling_factor=0.13025, force_upcast=True, latents_mean=[0.1, -0.2, 0.05, 0.0],
        latents_std=[1.1, 0.9, 1.0, 1.2],
    )
    return text_encoder_2, vae


def build_sdxl_pipeline(refiner: bool = False, inpaint: bool = False):
    """A StableDiffusionXLPipeline (two CLIP encoders, zeros for empty negatives); with `refiner`, a
    StableDiffusionXLImg2ImgPipeline shaped as SDXL's refiner (text_encoder_2 only, aesthetic-score time ids); with
    `inpaint`, a StableDiffusionXLInpaintPipeline like the base but with a 9-channel UNet (latents, mask,
    masked-image latents), as SDXL's inpainting checkpoints."""
    import torch
    from diffusers import (
        EulerDiscreteScheduler,
        StableDiffusionXLImg2ImgPipeline,
        StableDiffusionXLInpaintPipeline,
        StableDiffusionXLPipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    text_encoder_2, vae = _sdxl_shared()
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, steps_offset=1,
                                       beta_schedule="scaled_linear", timestep_spacing="leading")
    if refiner:
        unet = _sdxl_unet(SDXL_TEXT["hidden_size"], 5, INIT_SEED + 20)
        return StableDiffusionXLImg2ImgPipeline(
            vae=vae, text_encoder=None, text_encoder_2=text_encoder_2, tokenizer=None, tokenizer_2=clip_tokenizer(),
            unet=unet, scheduler=scheduler, requires_aesthetics_score=True, force_zeros_for_empty_prompt=False)
    torch.manual_seed(INIT_SEED + 12)
    text_encoder = CLIPTextModel(CLIPTextConfig(bos_token_id=512, eos_token_id=513, pad_token_id=513,
                                                vocab_size=514, max_position_embeddings=77, **SDXL_TEXT))
    unet = _sdxl_unet(2 * SDXL_TEXT["hidden_size"], 6, INIT_SEED + 13, in_channels=9 if inpaint else 4)
    pipeline_class = StableDiffusionXLInpaintPipeline if inpaint else StableDiffusionXLPipeline
    return pipeline_class(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=clip_tokenizer(),
        tokenizer_2=clip_tokenizer(), unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True,
        add_watermarker=False)

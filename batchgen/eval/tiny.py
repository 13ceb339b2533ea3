"""Tiny random-weight scorer models built with the real classes and saved in their real formats, for tests and
the demo: a CLIPModel directory (weights, tokenizer files, image processor), an aesthetic MLP head and a
TorchScript feature extractor. They load through the same paths as real checkpoints."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

logger = logging.getLogger(__name__)

INIT_SEED = 0
CLIP_IMAGE_SIZE = 32


def make_tiny_clip(directory: str | Path) -> Path:
    """A CLIPModel with a 16-dim joint space, saved with save_pretrained (safetensors) plus tokenizer files and a
    CLIPImageProcessor config, so `CLIPModel/CLIPTokenizer/CLIPImageProcessor.from_pretrained(dir)` load it."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from batchgen.models.tiny import write_tokenizer

    path = Path(directory)
    # The byte-level tokenizer: 256 bytes x 2 forms, then <|startoftext|> = 512, <|endoftext|> = 513. CLIP pools
    # the text at the eos token's position: its config must name the tokenizer's eos id.
    text = {"vocab_size": 514, "bos_token_id": 512, "eos_token_id": 513, "pad_token_id": 513, "hidden_size": 32,
            "intermediate_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2, "max_position_embeddings": 77}
    vision = {"image_size": CLIP_IMAGE_SIZE, "patch_size": 8, "hidden_size": 32, "intermediate_size": 64,
              "num_attention_heads": 4, "num_hidden_layers": 2}
    torch.manual_seed(INIT_SEED)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()
    model.save_pretrained(path, safe_serialization=True)
    write_tokenizer(path)
    CLIPImageProcessor(size={"shortest_edge": CLIP_IMAGE_SIZE},
                       crop_size={"height": CLIP_IMAGE_SIZE, "width": CLIP_IMAGE_SIZE}).save_pretrained(path)
    logger.info("wrote tiny CLIP scorer to %s", path)
    return path


def make_tiny_aesthetic(path: str | Path, embed_dim: int = 16) -> Path:
    """An MLP head in the LAION aesthetic predictor's layout (Linear layers at `layers.{0,2,4}`, dropout between,
    no activations), saved as safetensors."""
    from safetensors.torch import save_file

    torch.manual_seed(INIT_SEED + 1)
    layers = nn.Sequential(nn.Linear(embed_dim, 32), nn.Dropout(0.2), nn.Linear(32, 16), nn.Dropout(0.1),
                           nn.Linear(16, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({f"layers.{k}": v.contiguous() for k, v in layers.state_dict().items()}, str(path))
    return path


class TinyExtractor(nn.Module):
    """uint8 NCHW images -> 16 features, as an Inception FID extractor takes uint8 images and returns features."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images.float() / 127.5 - 1.0)


def make_tiny_extractor(path: str | Path) -> Path:
    """TinyExtractor as a TorchScript archive: what `scoring.fid.extractor` loads with torch.jit.load."""
    torch.manual_seed(INIT_SEED + 2)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.save(torch.jit.script(TinyExtractor().eval()), str(path))
    return path


def make_tiny_scorers(directory: str | Path) -> dict[str, Path]:
    """All three under `directory`: clip/, aesthetic.safetensors, extractor.pt."""
    root = Path(directory)
    return {"clip": make_tiny_clip(root / "clip"), "aesthetic": make_tiny_aesthetic(root / "aesthetic.safetensors"),
            "extractor": make_tiny_extractor(root / "extractor.pt")}

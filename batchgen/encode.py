"""Image encoding: uint8 pixels to PNG, JPEG or WebP bytes, on CPU workers, never on the generator."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp"}
CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


def encode_image(pixels: np.ndarray, fmt: str, quality: int = 90) -> bytes:
    """Encode an (H, W, 3) uint8 array. PNG is lossless; quality applies to JPEG and WebP."""
    image = Image.fromarray(pixels, mode="RGB") if pixels.ndim == 3 else Image.fromarray(pixels)
    buffer = io.BytesIO()
    if fmt == "png":
        image.save(buffer, format="PNG", compress_level=6)
    elif fmt == "jpeg":
        image.save(buffer, format="JPEG", quality=quality)
    elif fmt == "webp":
        image.save(buffer, format="WEBP", quality=quality, method=4)
    else:
        raise ValueError(f"`format` must be one of {sorted(EXTENSIONS)} but is {fmt!r}")
    return buffer.getvalue()

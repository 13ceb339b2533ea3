"""batchgen: distributed batch image generation with diffusion models on Ray Data."""

__version__ = "0.1.0"

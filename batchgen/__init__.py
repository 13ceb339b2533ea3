"""batchgen: distributed batch image generation with diffusion models on Ray Data."""

from batchgen.console import quiet_benign_warnings

__version__ = "0.1.0"

# In every process that imports batchgen, Ray workers included (they run no CLI): see batchgen.console.
quiet_benign_warnings()

"""batchgen: distributed batch image generation with diffusion models on Ray Data."""

from batchgen.console import quiet_benign_warnings

__version__ = "0.1.0"

# In every process that imports batchgen, Ray workers included (they run no CLI): see batchgen.console.
quiet_benign_warnings()


def generate(ds, spec):
    """Map a Ray Dataset of prompt rows to a Dataset of images and their metadata: see batchgen.api.generate."""
    from batchgen.api import generate as _generate  # Ray and the stages load on first use, not on import

    return _generate(ds, spec)

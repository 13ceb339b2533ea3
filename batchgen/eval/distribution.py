"""FID and KID of an arm's images against a reference set, from the feature vectors the scoring stage stored.

The maths is torchmetrics' (FrechetInceptionDistance, KernelInceptionDistance), fed with the stored features
through an identity `feature` module: torchmetrics accepts any nn.Module as its extractor, so no Inception is
downloaded, and the extractor itself ran batched on the scoring actors.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from batchgen.eval.scorers import FEATURES
from batchgen.eval.scoring import read_scores
from batchgen.eval.spec import FidSpec


@dataclass(frozen=True)
class SetMetrics:
    fid: float
    kid_mean: float
    kid_std: float
    images: int
    reference_images: int


class FeatureIdentity(torch.nn.Module):
    """Features in, features out; `num_features` spares torchmetrics a probe with a dummy image."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.num_features = dim

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def stored_features(output: str, weights_sha256: str) -> np.ndarray:
    """(N, D) float64: the latest feature vector of each image scored with these extractor weights."""
    table = read_scores(output, ["id", "sample_index", "scorer", "weights_sha256", "features", "scored_at"])
    latest: dict[tuple[str, int], list[float]] = {}
    for row in table.to_pylist():
        if row["scorer"] == FEATURES and row["weights_sha256"] == weights_sha256:
            latest[(row["id"], row["sample_index"])] = row["features"]
    if not latest:
        return np.zeros((0, 0))
    return np.asarray([latest[k] for k in sorted(latest)], dtype=np.float64)


def fid_kid(images: np.ndarray, reference: np.ndarray, spec: FidSpec, seed: int = 0) -> SetMetrics:
    """torchmetrics' FID and KID of two feature sets (KID's subset size capped at the smaller set)."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    dim = images.shape[1]
    subset = min(spec.kid_subset_size, len(images), len(reference))
    fid = FrechetInceptionDistance(feature=FeatureIdentity(dim))
    torch.manual_seed(seed)  # KID draws its subsets with torch's generator
    with warnings.catch_warnings():  # "KID keeps every feature in memory": it is given them all anyway
        warnings.simplefilter("ignore", UserWarning)
        kid = KernelInceptionDistance(feature=FeatureIdentity(dim), subsets=spec.kid_subsets, subset_size=subset)
    real, fake = torch.from_numpy(reference), torch.from_numpy(images)
    for metric in (fid, kid):
        metric.update(real, real=True)
        metric.update(fake, real=False)
    kid_mean, kid_std = kid.compute()
    return SetMetrics(float(fid.compute()), float(kid_mean), float(kid_std), len(images), len(reference))

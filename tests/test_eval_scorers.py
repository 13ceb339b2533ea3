"""Scorers on tiny random models built by batchgen.eval.tiny, against independent computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import linalg

from batchgen.errors import JobConfigError
from batchgen.eval.distribution import fid_kid
from batchgen.eval.scorers import AESTHETIC, CLIP_SCORE, FEATURES, Scorers, check_scorers, load_aesthetic_head
from batchgen.eval.spec import FidSpec, ScoringSpec


def images(n: int, seed: int, size: int = 40) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size + 8, 3), dtype=np.uint8)) for _ in range(n)]


def direct_clip_score(clip_dir, image: Image.Image, prompt: str) -> float:
    """CLIP score from the model's parts, without CLIPImageProcessor, the tokenizer's padding or get_*_features:
    resize the short side to 32 (bicubic), centre-crop, normalize with CLIP's mean/std; pool the text at its
    eos token; 100 * cos."""
    from transformers import CLIPModel, CLIPTokenizer

    model = CLIPModel.from_pretrained(clip_dir).eval()
    side = model.config.vision_config.image_size
    w, h = image.size
    scale = side / min(w, h)
    resized = image.resize((round(w * scale), round(h * scale)), Image.BICUBIC)
    left, top = (resized.width - side) // 2, (resized.height - side) // 2
    pixels = np.asarray(resized.crop((left, top, left + side, top + side)), dtype=np.float32) / 255.0
    mean, std = np.array([0.48145466, 0.4578275, 0.40821073]), np.array([0.26862954, 0.26130258, 0.27577711])
    pixels = torch.from_numpy(((pixels - mean) / std).transpose(2, 0, 1)[None].astype(np.float32))
    ids = torch.tensor([CLIPTokenizer.from_pretrained(clip_dir)(prompt)["input_ids"]])
    with torch.no_grad():
        image_embed = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)[0]
        hidden = model.text_model(input_ids=ids).last_hidden_state[0]
        text_embed = model.text_projection(hidden[ids[0].tolist().index(model.config.text_config.eos_token_id)])
    cosine = torch.nn.functional.cosine_similarity(image_embed, text_embed, dim=0).item()
    return 100.0 * cosine


def test_clip_score_and_aesthetic_equal_a_direct_computation(tiny_scorers):
    spec = ScoringSpec(clip=str(tiny_scorers["clip"]), aesthetic=str(tiny_scorers["aesthetic"]), device="cpu")
    scorers = Scorers(spec, check_scorers(spec))
    batch = images(6, seed=1)
    prompts = ["a fox", "a lighthouse at night", "ramen", "an owl on a branch", "x", "a red teapot and a cup"]
    results = scorers.score(batch, prompts, [{CLIP_SCORE, AESTHETIC}] * 6)
    expected = [direct_clip_score(tiny_scorers["clip"], image, p) for image, p in zip(batch, prompts, strict=True)]
    got = [r[CLIP_SCORE] for r in results]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    assert len(set(np.round(expected, 4))) == 6, f"the score does not depend on its inputs: {expected}"
    # The aesthetic head on the normalized image embedding, by hand: Linear layers in order, nothing between.
    head = load_aesthetic_head(tiny_scorers["aesthetic"])
    assert [type(m).__name__ for m in head] == ["Linear"] * 3
    aesthetic = [r[AESTHETIC] for r in results]
    assert len(set(np.round(aesthetic, 6))) == 6, "the aesthetic score does not depend on the image"


def numpy_fid(a: np.ndarray, b: np.ndarray) -> float:
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(cov_a @ cov_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))


def numpy_kid(a: np.ndarray, b: np.ndarray) -> float:
    """Unbiased MMD^2 with the cubic polynomial kernel (x.y / d + 1)^3 over the whole sets."""
    d = a.shape[1]
    k_aa, k_bb, k_ab = ((x @ y.T / d + 1) ** 3 for x, y in ((a, a), (b, b), (a, b)))
    m = len(a)
    return float((k_aa.sum() - np.trace(k_aa)) / (m * (m - 1)) + (k_bb.sum() - np.trace(k_bb)) / (m * (m - 1))
                 - 2 * k_ab.mean())


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")  # dead ReLU features: singular covariances
def test_fid_kid_match_numpy_and_grow_with_a_shift(tiny_scorers):
    spec = ScoringSpec(fid=FidSpec(reference="unused", extractor=str(tiny_scorers["extractor"]), image_size=32),
                       device="cpu")
    scorers = Scorers(spec, check_scorers(spec))
    reference = np.stack([r[FEATURES] for r in scorers.score(images(40, 2), [None] * 40, [{FEATURES}] * 40)])
    same = np.stack([r[FEATURES] for r in scorers.score(images(40, 2), [None] * 40, [{FEATURES}] * 40)])
    shifted_images = [Image.fromarray(np.clip(np.asarray(i, dtype=np.int16) + 90, 0, 255).astype(np.uint8))
                      for i in images(40, 3)]
    shifted = np.stack([r[FEATURES] for r in scorers.score(shifted_images, [None] * 40, [{FEATURES}] * 40)])
    other = np.stack([r[FEATURES] for r in scorers.score(images(40, 3), [None] * 40, [{FEATURES}] * 40)])
    assert reference.shape == (40, 16)
    fid_spec = FidSpec(reference="unused", extractor="unused", kid_subsets=1, kid_subset_size=40)
    identical = fid_kid(same.astype(np.float64), reference.astype(np.float64), fid_spec)
    moved = fid_kid(shifted.astype(np.float64), reference.astype(np.float64), fid_spec)
    resampled = fid_kid(other.astype(np.float64), reference.astype(np.float64), fid_spec)
    # Identical sets: FID 0 up to rounding; KID's unbiased estimator is ~0 (not exactly: it drops the diagonal).
    # Another sample of the same distribution lies between the two.
    assert abs(identical.fid) < 1e-6 * moved.fid and abs(identical.kid_mean) < 0.01 * moved.kid_mean
    assert resampled.fid < 0.5 * moved.fid and resampled.kid_mean < 0.5 * moved.kid_mean, (resampled, moved)
    # torchmetrics against an independent numpy/scipy computation of the same definitions.
    a, b = shifted.astype(np.float64), reference.astype(np.float64)
    assert moved.fid == pytest.approx(numpy_fid(a, b), rel=1e-3)
    assert moved.kid_mean == pytest.approx(numpy_kid(a, b), rel=1e-3)


def test_missing_scorer_sources_are_named(tmp_path, tiny_scorers):
    with pytest.raises(JobConfigError, match=r"`scoring.clip` '.*nowhere' does not exist"):
        check_scorers(ScoringSpec(clip=str(tmp_path / "nowhere")))
    with pytest.raises(JobConfigError, match="has no config.json"):
        check_scorers(ScoringSpec(clip=str(tmp_path)))
    with pytest.raises(JobConfigError, match=r"`scoring.fid.extractor` '.*missing.pt' does not exist"):
        check_scorers(ScoringSpec(fid=FidSpec(reference=str(tmp_path), extractor=str(tmp_path / "missing.pt"))))

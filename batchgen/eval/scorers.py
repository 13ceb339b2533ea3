"""The per-image scorers: CLIP score and an aesthetic head over CLIP image embeddings, and an image feature
extractor for FID/KID. Sources are checked and hashed on the driver; `Scorers` loads them once in an actor."""

from __future__ import annotations

import hashlib
import io
import logging
from pathlib import Path
from typing import Any

import numpy as np

from batchgen.errors import JobConfigError
from batchgen.eval.spec import ScoringSpec
from batchgen.storage import S3Storage, open_storage

logger = logging.getLogger(__name__)

CLIP_SCORE = "clip_score"
AESTHETIC = "aesthetic"
FEATURES = "features"  # not a metric: the extractor's feature vector, kept for FID/KID
METRICS = (CLIP_SCORE, AESTHETIC)
HIGHER_IS_BETTER = {CLIP_SCORE: True, AESTHETIC: True, "fid": False, "kid": False}
CACHE_DIR = Path("~/.cache/batchgen/scorers")


def _remote_objects(uri: str) -> tuple[S3Storage, list[Any]]:
    storage = open_storage(uri)
    assert isinstance(storage, S3Storage)
    return storage, sorted((o for o in storage.list_objects() if not o.key.endswith("/")), key=lambda o: o.key)


def source_sha256(uri: str, field: str, directory: bool) -> str:
    """sha256 over a local file's bytes or a directory's files (names and bytes); for s3://, over the listing's
    keys, sizes and ETags (no download). A missing source is a JobConfigError naming the field."""
    digest = hashlib.sha256()
    if uri.startswith("s3://"):
        parent, _, name = uri.rstrip("/").rpartition("/")
        storage, objects = _remote_objects(uri if directory else parent)
        if not directory:
            objects = [o for o in objects if o.key == name]
        if not objects:
            raise JobConfigError(f"`{field}` {uri!r} does not exist (no objects under it)")
        for o in objects:
            digest.update(f"{o.key}\t{o.size}\t{o.etag}\n".encode())
        return digest.hexdigest()
    path = Path(uri).expanduser()
    if directory and not path.is_dir():
        raise JobConfigError(f"`{field}` {uri!r} does not exist or is not a directory")
    if not directory and not path.is_file():
        raise JobConfigError(f"`{field}` {uri!r} does not exist or is not a file")
    files = sorted(p for p in path.rglob("*") if p.is_file()) if directory else [path]
    for file in files:
        digest.update(str(file.relative_to(path) if directory else file.name).encode())
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):  # checkpoints are GBs: never whole in memory
                digest.update(chunk)
    return digest.hexdigest()


def check_scorers(spec: ScoringSpec) -> dict[str, str]:
    """Scorer name -> weights sha256, for every scorer the spec asks for; fails naming a missing source."""
    hashes: dict[str, str] = {}
    if spec.clip:
        clip = source_sha256(spec.clip, "scoring.clip", directory=True)
        if not spec.clip.startswith("s3://") and not (Path(spec.clip).expanduser() / "config.json").is_file():
            raise JobConfigError(f"`scoring.clip` {spec.clip!r} has no config.json (not a transformers CLIPModel)")
        hashes[CLIP_SCORE] = clip
        if spec.aesthetic:
            head = source_sha256(spec.aesthetic, "scoring.aesthetic", directory=False)
            hashes[AESTHETIC] = hashlib.sha256(f"{clip}\n{head}".encode()).hexdigest()
    if spec.fid:
        extractor = source_sha256(spec.fid.extractor, "scoring.fid.extractor", directory=False)
        options = repr((spec.fid.image_size, sorted(spec.fid.call_kwargs.items())))
        hashes[FEATURES] = hashlib.sha256(f"{extractor}\n{options}".encode()).hexdigest()
    return hashes


def local_copy(uri: str, digest: str, directory: bool) -> Path:
    """A local path for a scorer source: itself, or a node-local copy of an s3:// file or folder named by its
    listing hash (a changed source gets a new copy; processes on one node download it once, under a lock)."""
    if not uri.startswith("s3://"):
        return Path(uri).expanduser()
    from filelock import FileLock

    entry = CACHE_DIR.expanduser() / digest[:32]
    target = entry / uri.rstrip("/").rsplit("/", 1)[-1]
    entry.mkdir(parents=True, exist_ok=True)
    with FileLock(entry / ".lock"):
        if not (entry / "COMPLETE").is_file():
            if directory:
                storage, objects = _remote_objects(uri)
                files = [(o.key, target / o.key) for o in objects]
            else:
                parent, _, name = uri.rstrip("/").rpartition("/")
                storage, files = open_storage(parent), [(name, target)]
            for key, path in files:
                path.parent.mkdir(parents=True, exist_ok=True)
                storage.download(key, path)
            (entry / "COMPLETE").write_text(uri)
    return target


def decode_rgb(data: bytes) -> Any:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB")


class Scorers:
    """The scorers one actor holds, loaded once: `score` runs every one asked for on a batch of images."""

    def __init__(self, spec: ScoringSpec, hashes: dict[str, str]):
        import torch
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
        auto = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(auto if spec.device == "auto" else spec.device)
        self.spec = spec
        self.clip = self.tokenizer = self.processor = self.head = self.extractor = None
        if spec.clip:
            from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

            path = local_copy(spec.clip, hashes[CLIP_SCORE], directory=True)
            self.clip = CLIPModel.from_pretrained(path, use_safetensors=True).eval().to(self.device)
            self.tokenizer = CLIPTokenizer.from_pretrained(path)
            self.processor = CLIPImageProcessor.from_pretrained(path)
            self.max_tokens = self.clip.config.text_config.max_position_embeddings
        if spec.aesthetic:
            path = local_copy(spec.aesthetic, hashes[AESTHETIC], directory=False)
            self.head = load_aesthetic_head(path).to(self.device)
        if spec.fid:
            path = local_copy(spec.fid.extractor, hashes[FEATURES], directory=False)
            self.extractor = torch.jit.load(str(path), map_location=self.device).eval()

    def score(self, images: list[Any], prompts: list[str | None], wanted: list[set[str]]) -> list[dict[str, Any]]:
        """One {scorer: value} per image: floats for metrics, float32 vectors for FEATURES. CLIP score is 100 x the
        cosine of the image and prompt embeddings, not clamped at 0 as Hessel et al.'s CLIPScore is: a clamp biases
        means and ties the worst images at 0 (clamp the values to compare with published figures)."""
        import torch

        results: list[dict[str, Any]] = [{} for _ in images]
        with torch.inference_mode():
            clip_rows = [i for i, w in enumerate(wanted) if w & {CLIP_SCORE, AESTHETIC}]
            if clip_rows and self.clip is not None:
                pixels = self.processor(images=[images[i] for i in clip_rows], return_tensors="pt")["pixel_values"]
                embeddings = _pooled(self.clip.get_image_features(pixel_values=pixels.to(self.device)))
                embeddings = embeddings / embeddings.norm(dim=-1, keepdim=True)
                if self.head is not None:
                    aesthetic = self.head(embeddings).squeeze(-1).double().cpu().numpy()
                    for k, i in enumerate(clip_rows):
                        results[i][AESTHETIC] = float(aesthetic[k])
                text_rows = [k for k, i in enumerate(clip_rows) if prompts[i] is not None]
                if text_rows:
                    tokens = self.tokenizer([prompts[clip_rows[k]] for k in text_rows], padding=True,
                                            truncation=True, max_length=self.max_tokens, return_tensors="pt")
                    text = _pooled(self.clip.get_text_features(input_ids=tokens["input_ids"].to(self.device),
                                                               attention_mask=tokens["attention_mask"].to(self.device)))
                    text = text / text.norm(dim=-1, keepdim=True)
                    cosine = (embeddings[text_rows] * text).sum(-1).double().cpu().numpy()
                    for k, c in zip(text_rows, cosine, strict=True):
                        results[clip_rows[k]][CLIP_SCORE] = 100.0 * float(c)
            feature_rows = [i for i, w in enumerate(wanted) if FEATURES in w]
            if feature_rows and self.extractor is not None:
                batch = torch.from_numpy(np.stack([extractor_input(images[i], self.spec.fid.image_size)
                                                   for i in feature_rows])).to(self.device)
                features = self.extractor(batch, **self.spec.fid.call_kwargs)
                features = features.reshape(len(feature_rows), -1).float().cpu().numpy()
                for k, i in enumerate(feature_rows):
                    results[i][FEATURES] = features[k]
        return results


def _pooled(output: Any) -> Any:
    """transformers 5 returns a model output from get_*_features; 4.x returned the projected tensor."""
    return output.pooler_output if hasattr(output, "pooler_output") else output


def extractor_input(image: Any, size: int) -> np.ndarray:
    """uint8 CHW at size x size (bicubic): the same for generated and reference images."""
    from PIL import Image

    resized = image.resize((size, size), Image.BICUBIC) if image.size != (size, size) else image
    return np.ascontiguousarray(np.asarray(resized, dtype=np.uint8).transpose(2, 0, 1))


def load_aesthetic_head(path: Path) -> Any:
    """The Linear layers of a LAION-style predictor (`layers.N.weight/bias`), applied in order of N; its dropouts
    hold no weights and are identity at inference, and it has no activations."""
    import torch
    from safetensors.torch import load_file

    try:
        state = load_file(str(path))
    except Exception as e:  # noqa: BLE001 - any unreadable file is a config error naming it
        raise JobConfigError(f"`scoring.aesthetic` {str(path)!r} is not a safetensors file: {e}") from None
    indices = sorted({int(k.split(".")[1]) for k in state if k.startswith("layers.") and k.endswith(".weight")})
    if not indices:
        raise JobConfigError(f"`scoring.aesthetic` {str(path)!r} holds no `layers.N.weight` tensors")
    linears = []
    for n in indices:
        weight = state[f"layers.{n}.weight"]
        layer = torch.nn.Linear(weight.shape[1], weight.shape[0])
        layer.load_state_dict({"weight": weight, "bias": state[f"layers.{n}.bias"]})
        linears.append(layer)
    return torch.nn.Sequential(*linears).eval()

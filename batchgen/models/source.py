"""What a model source is (local directory, hub id, s3:// URI), its small config files, and its provenance.

The one place that decides the kind of a source: the driver uses it to check, hash and read a model without
loading weights, the loader to find the files, the manifests to record where the pixels came from.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from batchgen.errors import ModelLoadError

Kind = Literal["local", "hub", "s3"]


@dataclass(frozen=True)
class ModelSource:
    """A model location as the user named it, classified once."""

    source: str
    kind: Kind
    revision: str | None = None

    @property
    def path(self) -> Path:
        return Path(self.source).expanduser()

    def read_json(self, name: str) -> dict[str, Any]:
        """A config file of the pipeline (`model_index.json`, `scheduler/scheduler_config.json`): no weights read."""
        try:
            if self.kind == "local":
                text = (self.path / name).read_text()
            elif self.kind == "s3":
                from batchgen.storage import open_storage

                text = open_storage(self.source).get(name).decode()
            else:
                from huggingface_hub import hf_hub_download

                text = Path(hf_hub_download(self.source, name, revision=self.revision)).read_text()
            return json.loads(text)
        except Exception as e:  # noqa: BLE001 - any failure to read a config file means the same to the user
            raise ModelLoadError(f"cannot read {name} of model {self.source!r}: {e}") from None

    def sha256(self, allow_pickle: bool = False) -> str:
        """The weights' identity for manifests and the resume fingerprint; checks a local directory first.
        A hub id has none here (its revision identifies it; the actors hash their download)."""
        if self.kind == "s3":
            from batchgen.models.staging import remote_model_sha256

            return remote_model_sha256(self.source)
        if self.kind == "local":
            from batchgen.models.loading import check_model_dir, weights_sha256

            check_model_dir(self.path, allow_pickle)
            return weights_sha256(self.path)
        return ""


def model_source(source: str, revision: str | None = None, *, absolute: bool = False) -> ModelSource:
    """s3:// is a remote diffusers directory; an existing path, or one written as a path, is local; anything else
    is a hub id. `absolute` resolves a local path (the driver does, so actors on other directories agree)."""
    if source.startswith("s3://"):
        return ModelSource(source, "s3", revision)
    local = Path(source).expanduser()
    if local.exists() or source.startswith((".", "/", "~")):
        return ModelSource(str(local.resolve()) if absolute else source, "local", None)
    return ModelSource(source, "hub", revision)


# Manifest columns about the model (name, row-contract kind), in order; null where there is no refiner, and
# where the model ran with every component it has.
MODEL_COLUMNS = (("model", "text"), ("model_revision", "text"), ("model_sha256", "text"), ("dtype", "text"),
                 ("refiner", "text"), ("refiner_sha256", "text"), ("refiner_start", "float"),
                 ("dropped_components", "text"))


@dataclass(frozen=True)
class ModelFacts:
    """What every manifest row records about the model (and the refiner that finished its images, if any)."""

    source: str
    revision: str | None
    sha256: str
    dtype: str
    refiner: str | None = None
    refiner_sha256: str | None = None
    refiner_start: float | None = None
    dropped_components: str | None = None  # comma-separated components not loaded (SD3 without T5)

    def manifest_record(self) -> dict[str, Any]:
        return {"model": self.source, "model_revision": self.revision, "model_sha256": self.sha256,
                "dtype": self.dtype, "refiner": self.refiner, "refiner_sha256": self.refiner_sha256,
                "refiner_start": self.refiner_start, "dropped_components": self.dropped_components}

"""Job options only some families take (SD3's T5 switches, T5 length, skip-layer guidance), checked on the driver
against the model's family and config files before Ray starts, and turned into load options for the actors."""

from __future__ import annotations

from typing import Any

from batchgen.errors import JobConfigError, RowError
from batchgen.models.source import ModelSource
from batchgen.rows import FIELDS, Rules, job_value
from batchgen.spec import ModelSpec, SamplingSpec

# The T5 encoder and its tokenizer: what `model.text_encoder_3: false` leaves unloaded.
T5_COMPONENTS = ("text_encoder_3", "tokenizer_3")


def check_job_fields(sampling: SamplingSpec, rules: Rules) -> None:
    """Job-only row fields (no input column) set in `sampling`: refused on a family that does not read them,
    else checked with the field's own rule against this model (e.g. skip-layer indices against its blocks)."""
    for f in FIELDS:
        if f.column or f.sampling is None:
            continue
        value = job_value(sampling, f.sampling)
        if value is None:
            continue
        where = f"sampling.{f.sampling}"
        if f.name not in rules.fields:
            raise JobConfigError(f"`{where}` is {value!r}, but a {rules.family} model does not use it")
        try:
            f.check(f.name, value, rules)
        except RowError as e:
            raise JobConfigError(f"`{where}` {e.reason} but is {value!r}") from None


def component_options(m: ModelSpec, where: ModelSource) -> dict[str, Any]:
    """load_model options for the T5 switches; JobConfigError where the model has no T5 to drop or move."""
    if m.text_encoder_3 and m.text_encoder_3_device is None:
        return {}
    index = where.read_json("model_index.json")
    if not isinstance(index.get("text_encoder_3"), list) or index["text_encoder_3"][0] is None:
        option = "text_encoder_3" if not m.text_encoder_3 else "text_encoder_3_device"
        value = m.text_encoder_3 if not m.text_encoder_3 else m.text_encoder_3_device
        raise JobConfigError(f"`model.{option}` is {value!r}, but model {where.source!r} has no text_encoder_3")
    if not m.text_encoder_3:
        return {"skip_components": T5_COMPONENTS}
    return {"component_devices": {"text_encoder_3": m.text_encoder_3_device}}

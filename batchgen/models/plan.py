"""The model side of a job plan, on the driver, without loading weights: source, hash, family, rules, refiner.

Everything family-dependent that can be wrong in a job (a scheduler the family rejects, a refiner that is not
one or does not match the base) fails here with exit code 2, before Ray starts.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from batchgen.errors import JobConfigError
from batchgen.models.families import Family, family_for
from batchgen.models.options import check_job_fields, component_options
from batchgen.models.source import ModelFacts, ModelSource, model_source
from batchgen.rows import Rules
from batchgen.spec import ModelSpec, SamplingSpec

logger = logging.getLogger(__name__)

# What base and refiner must agree on: the refiner continues from the base's latents (the VAE's latent space)
# and is conditioned by its own copy of the second text encoder.
COMPATIBLE = {
    "vae": ("latent_channels", "scaling_factor", "shift_factor", "latents_mean", "latents_std", "block_out_channels"),
    "text_encoder_2": ("hidden_size", "projection_dim", "vocab_size"),
}


def plan_model(m: ModelSpec, sampling: SamplingSpec) -> tuple[dict[str, Any], ModelFacts, Rules]:
    """(options for load_model on the actors, what manifests record, the rules the reader applies)."""
    if m.make_tiny_if_missing and not Path(m.source).expanduser().exists():
        from batchgen.models.tiny import make_tiny_model

        logger.info("building tiny %s model at %s", m.make_tiny_if_missing, m.source)
        make_tiny_model(Path(m.source).expanduser(), m.make_tiny_if_missing)
    where = model_source(m.source, m.revision, absolute=True)
    digest = where.sha256(m.allow_pickle)
    pipeline = where.read_json("model_index.json").get("_class_name", "")
    try:
        family = family_for(pipeline)
    except ValueError as e:
        raise JobConfigError(f"`model.source` {m.source!r}: {e}") from None
    vae = where.read_json("vae/config.json")
    rules = family.rules(2 ** (len(vae["block_out_channels"]) - 1), refined=m.refiner is not None,
                         scheduler_config=where.read_json("scheduler/scheduler_config.json"),
                         denoiser_config=where.read_json(f"{family.denoiser}/config.json"), pipeline=pipeline)
    check_job_fields(sampling, rules)
    components = component_options(m, where)
    if sampling.scheduler not in rules.schedulers:
        raise JobConfigError(f"`sampling.scheduler` must be one of {list(rules.schedulers)} for a {family.name} "
                             f"model but is {sampling.scheduler!r}")
    options = {"source": where.source, "revision": m.revision, "dtype": m.dtype, "device": m.device,
               "allow_pickle": m.allow_pickle, "vae_batch_size": m.vae_batch_size,
               "channels_last": m.channels_last, "compile_denoiser": m.compile_denoiser, **components}
    if where.kind == "s3":
        options["expected_sha256"] = digest  # actors refuse a model replaced after the driver hashed it
    dropped = ",".join(components.get("skip_components", ())) or None
    facts = ModelFacts(where.source, m.revision, digest, m.dtype, dropped_components=dropped)
    if m.refiner is not None:
        if rules.needs:
            raise JobConfigError(f"`model.refiner`: a base followed by a refiner starts from noise, but "
                                 f"{m.source!r} is a {pipeline} that needs {' and '.join(rules.needs)} on every row")
        refiner = model_source(m.refiner.source, m.refiner.revision, absolute=True)
        refiner_digest = refiner.sha256(m.allow_pickle)
        check_refiner(family, where, refiner)
        options["refiner"] = {"source": refiner.source, "revision": m.refiner.revision, "start": m.refiner.start,
                              "expected_sha256": refiner_digest if refiner.kind == "s3" else None}
        facts = ModelFacts(where.source, m.revision, digest, m.dtype, refiner.source, refiner_digest,
                           m.refiner.start, dropped)
    return options, facts, rules


def check_refiner(family: Family, base: ModelSource, refiner: ModelSource) -> None:
    """The refiner must be one of the family's refiner pipelines and share the base's latent space and
    second text encoder shape; JobConfigError naming both models otherwise."""
    if not family.refiner_pipelines:
        raise JobConfigError(f"`model.refiner`: a {family.name} model ({base.source!r}) takes no refiner")
    kind = refiner.read_json("model_index.json").get("_class_name")
    if kind not in family.refiner_pipelines:
        raise JobConfigError(f"`model.refiner.source` {refiner.source!r} is a {kind}, not a refiner for the "
                             f"{family.name} base {base.source!r} (expected one of {list(family.refiner_pipelines)})")
    for component, keys in COMPATIBLE.items():
        ours, theirs = base.read_json(f"{component}/config.json"), refiner.read_json(f"{component}/config.json")
        for key in keys:
            if ours.get(key) != theirs.get(key):
                raise JobConfigError(
                    f"refiner {refiner.source!r} is incompatible with base {base.source!r}: {component} {key} is "
                    f"{theirs.get(key)!r} in the refiner but {ours.get(key)!r} in the base")

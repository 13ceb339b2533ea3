"""The `batchgen` command line: run, validate, inspect, make-tiny-model. Logging is configured here only."""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

import click

from batchgen.errors import BatchgenError, JobConfigError

logger = logging.getLogger("batchgen")

# flag name -> dotted spec field
RUN_FLAGS: dict[str, str] = {
    "prompts": "input.prompts",
    "output": "output.uri",
    "model": "model.source",
    "batch_size": "compute.batch_size",
    "steps": "sampling.steps",
    "guidance_scale": "sampling.guidance_scale",
    "scheduler": "sampling.scheduler",
    "seed": "sampling.seed",
    "width": "sampling.width",
    "height": "sampling.height",
    "num_images": "sampling.num_images",
    "format": "output.format",
    "quality": "output.quality",
    "address": "compute.address",
    "min_actors": "compute.min_actors",
    "max_actors": "compute.max_actors",
    "retry_errors": "output.retry_errors",
}


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    for noisy in ("ray", "botocore", "urllib3", "filelock", "diffusers", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def job_options(command):
    """The flags shared by run, validate and submit; each overrides the spec field it names."""
    options = [
        click.argument("spec", required=False, type=click.Path(dir_okay=False)),
        click.option("--prompts", help="Parquet prompt table: file, directory, glob or s3:// URI."),
        click.option("--output", help="Output directory or s3://bucket/prefix."),
        click.option("--model", help="Local diffusers directory, hub id or s3:// URI."),
        click.option("--batch-size", type=int, help="Rows per generator call."),
        click.option("--steps", type=int, help="Denoising steps for rows without a steps column."),
        click.option("--guidance-scale", type=float, help="CFG scale for rows without a guidance_scale column."),
        click.option("--scheduler", help="Scheduler for rows without a scheduler column."),
        click.option("--seed", type=int, help="Job seed (rows without a seed derive theirs from it)."),
        click.option("--width", type=int),
        click.option("--height", type=int),
        click.option("--num-images", type=int, help="Images per row for rows without num_images."),
        click.option("--format", type=click.Choice(["png", "jpeg", "webp"])),
        click.option("--quality", type=int, help="JPEG/WebP quality."),
        click.option("--address", help="Ray address (default: RAY_ADDRESS or a local Ray)."),
        click.option("--min-actors", type=int),
        click.option("--max-actors", type=int),
        click.option("--retry-errors/--no-retry-errors", default=None,
                     help="On resume, regenerate rows whose last attempt failed (default: yes)."),
        click.option("-v", "--verbose", is_flag=True),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def load_job(spec: str | None, flags: dict[str, Any]):
    from batchgen.spec import load_spec

    return load_spec(spec, {RUN_FLAGS[name]: value for name, value in flags.items() if name in RUN_FLAGS})


def fail(error: Exception) -> None:
    code = error.exit_code if isinstance(error, BatchgenError) else 1
    kind = "invalid job" if isinstance(error, JobConfigError) else "job failed"
    click.echo(f"batchgen: {kind}: {error}", err=True)
    sys.exit(code)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Batch image generation with diffusion models on Ray."""


@main.command()
@job_options
def run(spec, verbose, **flags):
    """Generate every image of a job; resumes into an existing output."""
    setup_logging(verbose)
    try:
        from batchgen.pipeline import run_job

        job = load_job(spec, flags)
        summary = run_job(job)
    except Exception as e:  # noqa: BLE001 - every failure ends in a message and an exit code
        logger.debug("failure", exc_info=True)
        fail(e)
    click.echo(json.dumps(summary, indent=2))
    click.echo(f"images in {summary['output']}/images, manifests in {summary['output']}/manifests")


@main.command()
@job_options
def validate(spec, verbose, **flags):
    """Check a job and print its plan without generating."""
    setup_logging(verbose)
    try:
        import torch

        from batchgen.pipeline import plan_job, size_compute
        from batchgen.prompts import describe_groups

        job = load_job(spec, flags)
        plan = plan_job(job)
        images, groups = describe_groups(plan.input, job.sampling)
        import os

        gpus = torch.cuda.device_count()
        resources = size_compute(job.compute, float(os.cpu_count() or 1), float(gpus))
    except Exception as e:  # noqa: BLE001
        fail(e)
    click.echo(f"input: {plan.input.uri} ({len(plan.input.files)} files, {plan.input.rows} rows, "
               f"{len(plan.input.tasks)} read tasks)")
    click.echo(f"columns: {plan.input.columns}; carried: {plan.input.extra_columns}")
    click.echo(f"images: {images}")
    click.echo(f"model: {plan.model.source} (sha256 {plan.model.sha256[:16] or 'resolved on load'})")
    click.echo(f"output: {job.output.uri} ({job.output.format})")
    click.echo(f"sub-batch groups (steps, width, height, scheduler, eta): {len(groups)}")
    for key, count in sorted(groups.items(), key=lambda kv: -kv[1])[:20]:
        click.echo(f"  {key}: {count} images")
    click.echo(f"generator actors: {resources.min_actors}-{resources.max_actors}, each {resources.cpus_per_actor} CPU, "
               f"{resources.gpus_per_actor:g} GPU, {resources.torch_threads} torch threads; batch size "
               f"{job.compute.batch_size} (sized for this machine; a cluster is sized when the job starts)")


@main.command()
@click.argument("output")
@click.option("--no-hashes", is_flag=True, help="Check sizes only, not sha256 (faster).")
def inspect(output, no_hashes):
    """Print a finished job's summary and verify every stored image against its manifest row."""
    setup_logging(False)
    try:
        from batchgen.manifest import inspect_output
        from batchgen.storage import open_storage

        report = inspect_output(open_storage(output), verify_hashes=not no_hashes)
    except Exception as e:  # noqa: BLE001
        fail(e)
    click.echo(json.dumps(report.success, indent=2) if report.success else "no _SUCCESS")
    click.echo(f"manifests: {report.parts} parts, {report.rows} rows, {report.ok} ok, {report.errors} errors")
    for problem in report.problems[:50]:
        click.echo(f"PROBLEM: {problem}")
    if len(report.problems) > 50:
        click.echo(f"... and {len(report.problems) - 50} more problems")
    click.echo("verified: every ok row's object matches" if report.healthy else f"{len(report.problems)} problems")
    sys.exit(0 if report.healthy else 1)


@main.command("make-tiny-model")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--family", type=click.Choice(["sd15", "sd2-v"]), default="sd15", show_default=True)
@click.option("--size", type=click.Choice(["tiny", "bench"]), default="tiny", show_default=True,
              help="tiny: < 10 MB test model; bench: SD-shaped, about a second per batch on 2 CPU cores.")
def make_tiny_model_command(directory, family, size):
    """Write a random-weight diffusers pipeline (real classes, safetensors) for tests and demos."""
    setup_logging(False)
    from batchgen.tiny import make_tiny_model

    path = make_tiny_model(directory, family, size)
    click.echo(str(path))

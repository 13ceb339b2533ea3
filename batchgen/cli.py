"""The `batchgen` command line: run, validate, inspect, make-tiny-model; submit, status, logs, stop for Ray
clusters; sweep; eval, score, report, export, make-tiny-scorers (batchgen.eval.cli). Logging is configured here
only."""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

import click

from batchgen.errors import BatchgenError, JobConfigError
from batchgen.models.tiny import FAMILIES as TINY_FAMILIES

logger = logging.getLogger("batchgen")

# flag name -> dotted spec field
RUN_FLAGS: dict[str, str] = {
    "prompts": "input.prompts",
    "output": "output.uri",
    "model": "model.source",
    "refiner": "model.refiner.source",
    "refiner_start": "model.refiner.start",
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
    "override_fingerprint": "output.override_fingerprint",
}


def setup_logging(verbose: bool, starts_ray: bool = False):
    """One logging setup; for commands that start Ray (`starts_ray`) also the console's quieting (see
    batchgen.console). Returns the live progress bar when stdout is a terminal."""
    from batchgen.console import native_stderr_to_file, quiet_ray_data_console, setup_console

    if starts_ray and not verbose:
        native_stderr_to_file()
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    for noisy in ("ray", "botocore", "urllib3", "filelock", "diffusers", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    bar = setup_console(verbose)
    if starts_ray:
        quiet_ray_data_console()
    return bar


def job_options(command):
    """The flags shared by run, validate and submit; each overrides the spec field it names."""
    options = [
        click.argument("spec", required=False, type=click.Path(dir_okay=False)),
        click.option("--prompts", help="Parquet prompt table: file, directory, glob or s3:// URI."),
        click.option("--output", help="Output directory or s3://bucket/prefix."),
        click.option("--model", help="Local diffusers directory, hub id or s3:// URI."),
        click.option("--refiner", help="SDXL refiner (directory, hub id or s3:// URI) that finishes each image."),
        click.option("--refiner-start", type=float, help="Fraction of the steps the base runs before the refiner."),
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
        click.option("--address", help="Ray address (default: RAY_ADDRESS or a local Ray); for submit, the "
                     "dashboard URL (default: RAY_ADDRESS or http://127.0.0.1:8265)."),
        click.option("--min-actors", type=int),
        click.option("--max-actors", type=int),
        click.option("--retry-errors/--no-retry-errors", default=None,
                     help="On resume, regenerate rows whose last attempt failed (default: yes)."),
        click.option("--override-fingerprint", is_flag=True, default=None,
                     help="Continue into an output made with different settings (recorded in its _batchgen/)."),
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
    bar = setup_logging(verbose, starts_ray=True)
    try:
        from batchgen.pipeline import run_job

        job = load_job(spec, flags)
        summary = run_job(job)
    except KeyboardInterrupt:
        # Committed images stay; the lease was released on the way out, so the same command resumes at once.
        click.echo("\nbatchgen: interrupted; run the same command again to resume (committed images are kept)",
                   err=True)
        sys.exit(130)
    except Exception as e:  # noqa: BLE001 - every failure ends in a message and an exit code
        logger.debug("failure", exc_info=True)
        fail(e)
    finally:
        if bar:
            bar.finish()
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
        images, groups = describe_groups(plan.input, job.sampling, plan.rules)
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
    if plan.model.refiner:
        click.echo(f"refiner: {plan.model.refiner} (sha256 {plan.model.refiner_sha256[:16] or 'resolved on load'}), "
                   f"from {plan.model.refiner_start:g} of the schedule")
    click.echo(f"output: {job.output.uri} ({job.output.format})")
    from batchgen.rows import GROUP_FIELDS

    click.echo(f"model family: {plan.rules.family}; schedulers: {', '.join(plan.rules.schedulers)}")
    # Only the group fields some row sets: the others (another family's, or img2img's on a text-only job) are
    # null or False ("no image") in every key and would only widen each line.
    shown = [i for i, _ in enumerate(GROUP_FIELDS) if any(key[i] is not None and key[i] is not False for key in groups)]
    click.echo(f"sub-batch groups ({', '.join(GROUP_FIELDS[i] for i in shown)}): {len(groups)}")
    for key, count in sorted(groups.items(), key=lambda kv: -kv[1])[:20]:
        click.echo(f"  {tuple(key[i] for i in shown)}: {count} images")
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
    if report.superseded:
        click.echo(f"superseded: {report.superseded} ok rows of runs whose lease was taken over (images intact; "
                   "the newer run's row counts)")
    if report.leftovers:
        click.echo(f"leftovers: {len(report.leftovers)} uncommitted images of interrupted runs (listed by no "
                   f"manifest, safe to delete), e.g. {report.leftovers[0]}")
    for problem in report.problems[:50]:
        click.echo(f"PROBLEM: {problem}")
    if len(report.problems) > 50:
        click.echo(f"... and {len(report.problems) - 50} more problems")
    click.echo("verified: every ok row's object matches" if report.healthy else f"{len(report.problems)} problems")
    sys.exit(0 if report.healthy else 1)


@main.command("make-tiny-model")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--family", type=click.Choice(TINY_FAMILIES), default="sd15", show_default=True,
              help="sd15-inpaint, sdxl-inpaint: an inpainting model (9-channel UNet).")
@click.option("--size", type=click.Choice(["tiny", "bench"]), default="tiny", show_default=True,
              help="tiny: < 10 MB test model; bench: SD-shaped, about a second per batch on 2 CPU cores.")
def make_tiny_model_command(directory, family, size):
    """Write a random-weight diffusers pipeline (real classes, safetensors) for tests and demos."""
    setup_logging(False)
    from batchgen.models.tiny import make_tiny_model

    path = make_tiny_model(directory, family, size)
    click.echo(str(path))


def cluster_address(command):
    return click.option("--address", help="Dashboard URL of the Ray cluster (default: RAY_ADDRESS or "
                        "http://127.0.0.1:8265).")(command)


def follow_job(client, job_id: str) -> None:
    """Stream the job's log to stdout and exit with its result."""
    from batchgen.submit import exit_code, follow

    try:
        status = follow(client, job_id, lambda text: click.echo(text, nl=False))
    except KeyboardInterrupt:
        click.echo(f"\nbatchgen: stopped following; job {job_id} keeps running (batchgen stop {job_id})", err=True)
        sys.exit(130)
    except Exception as e:  # noqa: BLE001
        fail(e)
    click.echo(f"batchgen: job {job_id} {status}", err=True)
    sys.exit(exit_code(status))


@main.command()
@job_options
@click.option("--follow", is_flag=True, help="Stream the job's log and exit with its result (0 succeeded, 1 not).")
@click.option("--ship-package/--no-ship-package", default=True, show_default=True,
              help="Upload this batchgen package with the job; --no-ship-package uses the one in the cluster's image.")
@click.option("--forward-s3-env/--no-forward-s3-env", default=True, show_default=True,
              help="Send your AWS_ENDPOINT_URL(_S3) and AWS(_DEFAULT)_REGION with the job, overriding the nodes' "
                   "own (never credentials); turn off when you reach S3 through another endpoint than they do.")
@click.option("--check-inputs/--no-check-inputs", default=True, show_default=True,
              help="Check the prompt table, model and output from here before submitting; skip it for local "
                   "paths that exist only on the cluster's nodes (the spec's fields are always checked).")
def submit(spec, verbose, follow, ship_package, forward_s3_env, check_inputs, address, **flags):
    """Run a job on a Ray cluster through its Jobs API; prints the job id."""
    setup_logging(verbose)
    try:
        from batchgen.pipeline import plan_job
        from batchgen.submit import connect, dashboard_address, submit_job

        job = load_job(spec, flags)
        if check_inputs:
            plan_job(job)
        client = connect(dashboard_address(address))
        job_id = submit_job(client, job, ship_package=ship_package, forward_s3_env=forward_s3_env, verbose=verbose)
    except Exception as e:  # noqa: BLE001
        logger.debug("failure", exc_info=True)
        fail(e)
    click.echo(job_id)
    logger.info("submitted; `batchgen logs -f %s` follows it, `batchgen stop %s` stops it", job_id, job_id)
    if follow:
        follow_job(client, job_id)


@main.command()
@click.argument("job_id")
@cluster_address
def status(job_id, address):
    """Print a submitted job's state as JSON."""
    setup_logging(False)
    try:
        from batchgen.submit import connect, dashboard_address, describe

        details = describe(connect(dashboard_address(address)), job_id)
    except Exception as e:  # noqa: BLE001
        fail(e)
    click.echo(json.dumps(details, indent=2))


@main.command()
@click.argument("job_id")
@cluster_address
@click.option("-f", "--follow", is_flag=True, help="Stream until the job ends and exit with its result.")
def logs(job_id, address, follow):
    """Print a submitted job's driver log."""
    setup_logging(False)
    try:
        from batchgen.submit import connect, dashboard_address, job_logs

        client = connect(dashboard_address(address))
        text = "" if follow else job_logs(client, job_id)
    except Exception as e:  # noqa: BLE001
        fail(e)
    if follow:
        follow_job(client, job_id)
    click.echo(text, nl=False)


@main.command()
@click.argument("job_id")
@cluster_address
def stop(job_id, address):
    """Stop a submitted job (its driver and every task and actor it started)."""
    setup_logging(False)
    try:
        from batchgen.submit import connect, dashboard_address, stop_job

        stopped = stop_job(connect(dashboard_address(address)), job_id)
    except Exception as e:  # noqa: BLE001
        fail(e)
    click.echo(f"stop requested for job {job_id}" if stopped else f"job {job_id} had already ended")


def number_list(kind):
    def parse(ctx, param, value):
        try:
            return [kind(item) for item in value.split(",") if item.strip()]
        except ValueError:
            raise click.BadParameter(f"expected comma-separated {kind.__name__}s, got {value!r}") from None

    return parse


@main.command()
@click.argument("prompts", type=click.Path(dir_okay=False))
@click.argument("output")
@click.option("--guidance-scales", required=True, callback=number_list(float), help="e.g. 3,5,7.5")
@click.option("--schedulers", required=True, callback=lambda ctx, param, value: [
    s.strip() for s in value.split(",") if s.strip()], help="e.g. ddim,euler_a,dpmpp_2m_karras")
@click.option("--seeds", required=True, callback=number_list(int), help="e.g. 0,1,2,3")
def sweep(prompts, output, guidance_scales, schedulers, seeds):
    """Write a prompt table with one row per (prompt, guidance scale, scheduler, seed) for a sweep job.

    PROMPTS is a text file (one prompt per line, # comments) or a Parquet file with a prompt column;
    OUTPUT is a .parquet path or s3:// URI, to use as the job's input.prompts."""
    setup_logging(False)
    try:
        from batchgen.sweep import expand_sweep, read_prompt_list, write_table

        prompt_list = read_prompt_list(prompts)
        table = expand_sweep(prompt_list, guidance_scales, schedulers, seeds)
        where = write_table(table, output)
    except Exception as e:  # noqa: BLE001
        fail(e)
    click.echo(f"wrote {table.num_rows} rows ({len(prompt_list)} prompts x {len(guidance_scales)} guidance scales "
               f"x {len(schedulers)} schedulers x {len(seeds)} seeds) to {where}")


def _register_eval_commands() -> None:
    from batchgen.eval.cli import COMMANDS

    for command in COMMANDS:
        main.add_command(command)


_register_eval_commands()

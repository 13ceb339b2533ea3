"""Cluster jobs through the Ray Jobs API: submit a resolved spec with the package, follow it, status, logs, stop.

What travels with a job (its runtime_env):
- `working_dir`: a temp dir holding only the resolved spec (`job.yaml`, every flag folded in), so the driver
  runs `python -m batchgen run job.yaml` from it on the head node.
- `py_modules`: the batchgen package directory the submitter validated with, zipped and uploaded through
  the dashboard (a few hundred kB). It needs no package index, so it works on clusters without egress;
  the third-party dependencies (torch, diffusers, ...) come from the nodes' image, which installs them
  with batchgen (infra/Dockerfile). `ship_package=False` runs the batchgen installed in the image instead.
  pip-installing per job would need an index or a wheel upload, and minutes of resolving on every node.
- `env_vars`: the S3 endpoint and region of the submitter (`FORWARDED_ENV`), never credentials: nodes get
  theirs from their own identity (IRSA, instance profiles) or their own environment (infra/README.md).
  They override the nodes' own settings, so `forward_s3_env=False` is for submitters that reach S3 through
  another endpoint than the nodes do (a port-forwarded MinIO, say).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import batchgen
from batchgen.errors import BatchgenError
from batchgen.models.source import model_source
from batchgen.spec import JobSpec, dump_spec

logger = logging.getLogger(__name__)

DEFAULT_DASHBOARD = "http://127.0.0.1:8265"
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION")
SPEC_FILE = "job.yaml"
SUCCEEDED, FAILED, STOPPED = "SUCCEEDED", "FAILED", "STOPPED"
FINAL_STATES = (SUCCEEDED, FAILED, STOPPED)


class ClusterError(BatchgenError):
    """The Ray job server cannot be reached, or refused a request (unknown job id, bad runtime_env)."""


@dataclass(frozen=True)
class Submission:
    """Everything sent to the job server besides the uploaded directories' contents."""

    entrypoint: str
    runtime_env: dict[str, Any]
    metadata: dict[str, str]


def dashboard_address(address: str | None) -> str:
    """--address, else RAY_ADDRESS, else the local default: the dashboard's HTTP address."""
    return address or os.environ.get("RAY_ADDRESS") or DEFAULT_DASHBOARD


def connect(address: str):
    """A JobSubmissionClient; it asks the server for its version, so an unreachable address fails here."""
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except Exception as e:  # noqa: BLE001 - requests, Ray and URL errors all mean "cannot use this address"
        raise ClusterError(f"cannot reach the Ray job server at {address}: {e}") from e


def _ask(what: str, request: Callable[[], Any]) -> Any:
    try:
        return request()
    except Exception as e:  # noqa: BLE001 - the SDK raises RuntimeError for HTTP errors, requests' own otherwise
        raise ClusterError(f"{what}: {e}") from e


def for_cluster(spec: JobSpec) -> JobSpec:
    """The spec as the cluster's driver must read it: local paths made absolute (the driver runs in another
    directory), and no Ray address (a submitted driver joins the cluster it was submitted to)."""

    def absolute(path: str) -> str:
        return path if "://" in path else str(Path(path).expanduser().absolute())

    def model_path(source: str) -> str:  # a local directory; a hub id or s3:// URI stays as it is
        return absolute(source) if model_source(source).kind == "local" else source

    refiner = spec.model.refiner
    if refiner is not None:
        refiner = refiner.model_copy(update={"source": model_path(refiner.source)})
    if spec.compute.address:
        logger.info("ignoring compute.address %r: a submitted job runs on the cluster it is submitted to",
                    spec.compute.address)
    return spec.model_copy(update={
        "input": spec.input.model_copy(update={"prompts": absolute(spec.input.prompts)}),
        "model": spec.model.model_copy(update={"source": model_path(spec.model.source), "refiner": refiner}),
        "output": spec.output.model_copy(update={"uri": absolute(spec.output.uri)}),
        "compute": spec.compute.model_copy(update={"address": None}),
    })


def build_submission(spec: JobSpec, spec_dir: Path, *, ship_package: bool = True, forward_s3_env: bool = True,
                     verbose: bool = False, environ: Mapping[str, str] = os.environ) -> Submission:
    """Write the resolved spec into `spec_dir` (the job's working_dir) and describe the submission."""
    from batchgen.pipeline import WORKER_ENV  # here, so that status, logs and stop do not import the pipeline

    spec = for_cluster(spec)
    (spec_dir / SPEC_FILE).write_text(dump_spec(spec))
    command = ["python", "-m", "batchgen", "run", SPEC_FILE, *(["-v"] if verbose else [])]
    env_vars = {name: environ[name] for name in FORWARDED_ENV if forward_s3_env and environ.get(name)}
    env_vars.update(WORKER_ENV)
    runtime_env: dict[str, Any] = {"working_dir": str(spec_dir), "env_vars": env_vars}
    if ship_package:
        runtime_env["py_modules"] = [str(Path(batchgen.__file__).parent)]
        runtime_env["excludes"] = ["__pycache__/", "*.pyc"]
    metadata = {"batchgen_output": spec.output.uri, "batchgen_model": spec.model.source}
    return Submission(shlex.join(command), runtime_env, metadata)


def submit_job(client, spec: JobSpec, *, ship_package: bool = True, forward_s3_env: bool = True,
               verbose: bool = False) -> str:
    """Submit the job; the runtime_env's directories are uploaded before this returns. Returns the job id."""
    with tempfile.TemporaryDirectory(prefix="batchgen-submit-") as spec_dir:
        submission = build_submission(spec, Path(spec_dir), ship_package=ship_package,
                                      forward_s3_env=forward_s3_env, verbose=verbose)
        logger.info("submitting `%s` with env %s", submission.entrypoint, sorted(submission.runtime_env["env_vars"]))
        return _ask("submitting the job failed", lambda: client.submit_job(
            entrypoint=submission.entrypoint, runtime_env=submission.runtime_env, metadata=submission.metadata,
        ))


def follow(client, job_id: str, write: Callable[[str], Any], poll_s: float = 1.0) -> str:
    """Stream the job's log through `write` until it ends; returns its final state."""

    async def stream() -> None:
        async for lines in client.tail_job_logs(job_id):
            write(lines)

    try:
        asyncio.run(stream())
    except Exception as e:  # noqa: BLE001 - a dropped stream (port-forward gone) must not decide the outcome
        logger.warning("log stream of job %s ended early (%s); waiting for the job to finish", job_id, e)
    return wait(client, job_id, poll_s)


def wait(client, job_id: str, poll_s: float = 1.0) -> str:
    """Poll until the job reaches a final state, and return it."""
    while True:
        status = str(_ask(f"status of job {job_id}", lambda: client.get_job_status(job_id)))
        if status in FINAL_STATES:
            return status
        time.sleep(poll_s)


def describe(client, job_id: str) -> dict[str, Any]:
    """The job's state and what it runs, as a JSON-ready dict."""
    info = _ask(f"job {job_id}", lambda: client.get_job_info(job_id))
    return {
        "job_id": info.submission_id or info.job_id,
        "status": str(info.status),
        "message": info.message,
        "entrypoint": info.entrypoint,
        "metadata": info.metadata,
        "start_time": info.start_time,
        "end_time": info.end_time,
        "driver_exit_code": info.driver_exit_code,
    }


def job_logs(client, job_id: str) -> str:
    return _ask(f"logs of job {job_id}", lambda: client.get_job_logs(job_id))


def stop_job(client, job_id: str) -> bool:
    """Ask the job to stop; False when it had already ended."""
    return bool(_ask(f"stopping job {job_id}", lambda: client.stop_job(job_id)))


def exit_code(status: str) -> int:
    return 0 if status == SUCCEEDED else 1

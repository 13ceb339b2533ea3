"""`batchgen submit` and friends without a cluster: what is sent to the Jobs API, what is never sent, local
validation before any contact, and the exit codes of --follow. tests/test_multinode.py submits for real."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

import batchgen
from batchgen import submit as jobs
from batchgen.cli import main
from batchgen.pipeline import WORKER_ENV
from batchgen.spec import JobSpec, load_spec
from tests.jobs import job_spec, prompts_table, run_cli, write_table
from tests.s3server import free_port

pytestmark = pytest.mark.timeout(120)

SECRETS = {
    "AWS_ACCESS_KEY_ID": "AKIAFAKEFAKEFAKE0001",
    "AWS_SECRET_ACCESS_KEY": "fake-secret-never-sent-9c1b",
    "AWS_SESSION_TOKEN": "fake-session-token-never-sent",
    "HF_TOKEN": "hf_fake_token_never_sent",
}


class FakeJobServer:
    """Records submissions (with the spec as uploaded) and plays back a status sequence and a log."""

    def __init__(self, statuses=("PENDING", "RUNNING", "SUCCEEDED"), log_chunks=("line 1\n", "line 2\n"),
                 stream_error: Exception | None = None):
        self.statuses = list(statuses)
        self.log_chunks = list(log_chunks)
        self.stream_error = stream_error
        self.submitted: list[dict] = []
        self.uploaded_spec = ""

    def submit_job(self, **kwargs):
        self.submitted.append(kwargs)
        self.uploaded_spec = (Path(kwargs["runtime_env"]["working_dir"]) / jobs.SPEC_FILE).read_text()
        return "raysubmit_fake1"

    def get_job_status(self, job_id):
        return self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]

    async def tail_job_logs(self, job_id):
        for chunk in self.log_chunks:
            yield chunk
        if self.stream_error:
            raise self.stream_error


@pytest.fixture
def local_job(tiny_model_dir, tmp_path):
    prompts = write_table(tmp_path / "p.parquet", prompts_table(4))
    return job_spec(tiny_model_dir, str(prompts), str(tmp_path / "out"))


def test_submission_carries_spec_package_and_endpoint_but_no_secret(local_job, monkeypatch):
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://minio.internal:9000")
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    server = FakeJobServer()
    assert jobs.submit_job(server, local_job) == "raysubmit_fake1"

    sent = server.submitted[0]
    assert sent["entrypoint"] == f"python -m batchgen run {jobs.SPEC_FILE}"
    env_vars = sent["runtime_env"]["env_vars"]
    assert env_vars["AWS_ENDPOINT_URL"] == "http://minio.internal:9000" and env_vars["AWS_REGION"] == "eu-west-1"
    assert "AWS_ENDPOINT_URL_S3" not in env_vars, "unset variables are not sent as empty strings"
    assert sent["runtime_env"]["py_modules"] == [str(Path(batchgen.__file__).parent)]
    everything = json.dumps(sent, default=str) + server.uploaded_spec
    for name, value in SECRETS.items():
        assert value not in everything and name not in everything
    assert JobSpec.model_validate(yaml.safe_load(server.uploaded_spec)) == jobs.for_cluster(local_job)
    assert not Path(sent["runtime_env"]["working_dir"]).exists(), "the temp spec dir is removed after upload"


def test_cluster_spec_has_absolute_paths_and_no_ray_address(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_table(tmp_path / "in" / "p.parquet", prompts_table(2))
    spec = load_spec(None, {"input.prompts": "in/p.parquet", "output.uri": "out", "model.source": "./m",
                            "compute.address": "ray://elsewhere:10001"})
    resolved = jobs.for_cluster(spec)
    assert resolved.input.prompts == str(tmp_path / "in" / "p.parquet")
    assert resolved.output.uri == str(tmp_path / "out") and resolved.model.source == str(tmp_path / "m")
    assert resolved.compute.address is None
    hub = jobs.for_cluster(load_spec(None, {"model.source": "org/sd-model", "output.uri": "s3://b/run"}))
    assert hub.model.source == "org/sd-model" and hub.output.uri == "s3://b/run", "URIs and hub ids stay"


def test_no_ship_package_and_no_forwarded_endpoint(local_job, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://localhost:9000")
    server = FakeJobServer()
    jobs.submit_job(server, local_job, ship_package=False, forward_s3_env=False, verbose=True)
    assert "py_modules" not in server.submitted[0]["runtime_env"], "the cluster image's batchgen runs"
    assert server.submitted[0]["runtime_env"]["env_vars"] == WORKER_ENV
    assert server.submitted[0]["entrypoint"].endswith(" -v")


def test_follow_streams_logs_and_returns_the_final_state():
    written: list[str] = []
    assert jobs.follow(FakeJobServer(), "j", written.append, poll_s=0) == "SUCCEEDED"
    assert written == ["line 1\n", "line 2\n"]
    dropped = FakeJobServer(statuses=("RUNNING", "RUNNING", "FAILED"), stream_error=RuntimeError("ws closed"))
    assert jobs.follow(dropped, "j", written.append, poll_s=0) == "FAILED", "a dropped stream waits for the end"
    assert [jobs.exit_code(s) for s in ("SUCCEEDED", "FAILED", "STOPPED")] == [0, 1, 1]


@pytest.mark.parametrize(("final", "code"), [("SUCCEEDED", 0), ("FAILED", 1), ("STOPPED", 1)])
def test_submit_follow_exits_with_the_jobs_result(local_job, tmp_path, monkeypatch, final, code):
    server = FakeJobServer(statuses=("RUNNING", final), log_chunks=("driver says hi\n",))
    addresses = []
    monkeypatch.setattr(jobs, "connect", lambda address: addresses.append(address) or server)
    monkeypatch.setenv("RAY_ADDRESS", "http://head.example:8265")
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump(local_job.model_dump(mode="json")))
    result = CliRunner().invoke(main, ["submit", str(spec), "--follow", "--steps", "3"])
    assert result.exit_code == code, result.output
    assert result.stdout.startswith("raysubmit_fake1\n") and "driver says hi" in result.stdout
    assert addresses == ["http://head.example:8265"], "--address defaults to RAY_ADDRESS"
    assert yaml.safe_load(server.uploaded_spec)["sampling"]["steps"] == 3, "flags are folded into the spec"


def test_invalid_job_exits_2_before_contacting_the_cluster(tmp_path, tiny_model_dir):
    unreachable = f"http://127.0.0.1:{free_port()}"
    bad_flag = run_cli("submit", "--width", "100", "--address", unreachable)
    assert bad_flag.returncode == 2 and "sampling.width" in bad_flag.stderr
    prompts = write_table(tmp_path / "p.parquet", prompts_table(3).rename_columns(["text"]))
    bad_input = run_cli("submit", "--prompts", str(prompts), "--model", str(tiny_model_dir), "--address", unreachable)
    assert bad_input.returncode == 2 and "has no column 'prompt'" in bad_input.stderr
    for result in (bad_flag, bad_input):
        assert "job server" not in result.stderr and not result.stdout


def test_unreachable_cluster_exits_1_naming_the_address(local_job, monkeypatch):
    unreachable = f"http://127.0.0.1:{free_port()}"
    runner = CliRunner()
    for args in (["status", "raysubmit_x"], ["logs", "raysubmit_x"], ["stop", "raysubmit_x"]):
        result = runner.invoke(main, [*args, "--address", unreachable])
        assert result.exit_code == 1 and f"cannot reach the Ray job server at {unreachable}" in result.output

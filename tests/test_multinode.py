"""A real two-node Ray cluster on this machine: `batchgen submit --follow` through the Jobs API, generator
actors pinned to the node that has the accelerator resource, model, prompts and output on S3 (moto).

The nodes are separate `ray start` processes with their own ports and temp dirs, so they never meet another
Ray on the machine; each `ray start` runs in a new session and is torn down by that session id, never with
`ray stop` (which stops every Ray on the machine).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import yaml

from batchgen.manifest import read_manifests
from batchgen.storage import open_storage
from tests.jobs import prompts_table, run_cli
from tests.s3objects import upload_dir, upload_table
from tests.s3server import free_port

RAY = Path(sys.executable).with_name("ray")
ACCELERATOR = "accelerator"
SUBMITTER_SECRET = "fake-submitter-secret-4f0c9a"


class LocalCluster:
    """A head node and worker nodes on 127.0.0.1, each a `ray start` in its own process session."""

    def __init__(self, env: dict[str, str]):
        self.root = Path(tempfile.mkdtemp(prefix="bg-ray-", dir="/tmp"))  # short: Ray's socket paths must fit
        self.env = env
        self.sessions: list[int] = []
        self.gcs = ""
        self.dashboard = ""

    def _start(self, name: str, args: list[str]) -> None:
        ports = {flag: free_port() for flag in ("--node-manager-port", "--object-manager-port",
                                                 "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
                                                 "--metrics-export-port", "--runtime-env-agent-port")}
        command = [str(RAY), "start", *args, "--node-ip-address", "127.0.0.1", "--temp-dir", str(self.root / name),
                   "--disable-usage-stats", "--min-worker-port", "0", "--max-worker-port", "0",
                   *(item for flag, port in ports.items() for item in (flag, str(port)))]
        with open(self.root / f"{name}.log", "wb") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                       start_new_session=True)
        self.sessions.append(process.pid)  # its daemons stay in the session after `ray start` exits
        if process.wait(timeout=90) != 0:
            raise RuntimeError(f"ray start {name} failed:\n{(self.root / f'{name}.log').read_text()[-3000:]}")

    def start_head(self, num_cpus: int) -> None:
        gcs_port, dashboard_port = free_port(), free_port()
        self._start("head", ["--head", "--port", str(gcs_port), "--num-cpus", str(num_cpus), "--num-gpus", "0",
                             "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port),
                             "--ray-client-server-port", str(free_port())])
        self.gcs = f"127.0.0.1:{gcs_port}"
        self.dashboard = f"http://127.0.0.1:{dashboard_port}"

    def add_node(self, name: str, num_cpus: int, resources: dict[str, float]) -> None:
        self._start(name, ["--address", self.gcs, "--num-cpus", str(num_cpus), "--num-gpus", "0",
                           "--resources", json.dumps(resources)])

    def processes(self) -> list[psutil.Process]:
        found = []
        for process in psutil.process_iter():
            with contextlib.suppress(psutil.Error, ProcessLookupError, PermissionError):
                if os.getsid(process.pid) in self.sessions:
                    found.append(process)
        return found

    def teardown(self) -> None:
        """SIGTERM every process of our sessions, SIGKILL what is left after 5 s."""
        for _ in range(2):  # a dying raylet may still spawn a worker: sweep twice
            processes = self.processes()
            for process in processes:
                with contextlib.suppress(psutil.Error):
                    process.send_signal(signal.SIGTERM)
            _, alive = psutil.wait_procs(processes, timeout=5)
            for process in alive:
                with contextlib.suppress(psutil.Error):
                    process.kill()
            psutil.wait_procs(alive, timeout=5)
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def cluster(s3_server, tmp_path) -> Iterator[LocalCluster]:
    """Head: 2 CPUs, no accelerator. Worker: 1 CPU and the accelerator. Both have S3 credentials (a node's
    own identity) but no endpoint: the job reaches moto only through the endpoint that submit forwards."""
    env = {name: value for name, value in os.environ.items()
           if not name.startswith(("AWS_ENDPOINT_URL", "RAY_", "BATCHGEN_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # `python` in entrypoints
    # Ray turns token auth on when it finds ~/.ray/auth_token, which other local Rays on this machine create;
    # this loopback cluster lives for one test, so it runs without (the SDK sends tokens where a cluster uses them).
    env["RAY_AUTH_MODE"] = "disabled"
    cluster = LocalCluster(env)
    try:
        cluster.env = {**env, "BATCHGEN_MODEL_CACHE": str(tmp_path / "cache-head")}
        cluster.start_head(num_cpus=2)
        cluster.env = {**env, "BATCHGEN_MODEL_CACHE": str(tmp_path / "cache-worker")}
        cluster.add_node("worker", num_cpus=1, resources={ACCELERATOR: 1})
        yield cluster
    finally:
        cluster.teardown()
    assert not cluster.processes(), "a Ray process of the test cluster survived teardown"


@pytest.mark.timeout(300)
def test_submit_to_two_node_cluster(cluster, s3_bucket, s3_server, tiny_model_dir, tmp_path):
    started = time.monotonic()
    model = upload_dir(tiny_model_dir, s3_bucket, "models/tiny-sd15")
    prompts = upload_table(s3_bucket, "prompts/p.parquet", prompts_table(16))
    output = f"s3://{s3_bucket}/out"
    spec = tmp_path / "cluster_job.yaml"
    spec.write_text(yaml.safe_dump({
        "input": {"prompts": prompts},
        "model": {"source": model, "device": "cpu", "dtype": "float32"},
        "sampling": {"steps": 2, "width": 32, "height": 32, "seed": 3},
        "output": {"uri": output, "format": "png"},
        "compute": {"batch_size": 8, "min_actors": 1, "max_actors": 1, "cpus_per_actor": 0.5,
                    "torch_threads": 1, "accelerator_resource": ACCELERATOR, "no_progress_timeout_s": 120},
    }))
    submitter_env = {**os.environ, "AWS_SECRET_ACCESS_KEY": SUBMITTER_SECRET, "RAY_AUTH_MODE": "disabled"}
    result = run_cli("submit", str(spec), "--address", cluster.dashboard, "--follow", env=submitter_env, timeout=200)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    job_id = result.stdout.splitlines()[0].strip()
    assert "images_ok" in result.stdout, "--follow streams the driver's log, which ends with the summary"
    print(f"job {job_id} done {time.monotonic() - started:.0f}s after the cluster was up; its log:\n{result.stdout}")

    from ray.job_submission import JobSubmissionClient
    from ray.util.state import list_actors, list_nodes

    info = JobSubmissionClient(cluster.dashboard).get_job_info(job_id)
    assert info.status == "SUCCEEDED"
    sent = json.dumps({"entrypoint": info.entrypoint, "runtime_env": info.runtime_env, "metadata": info.metadata})
    assert SUBMITTER_SECRET not in sent and "AWS_SECRET_ACCESS_KEY" not in sent
    assert SUBMITTER_SECRET not in result.stdout + result.stderr
    assert info.runtime_env["env_vars"]["AWS_ENDPOINT_URL"] == s3_server.endpoint

    nodes = {n.node_id: n for n in list_nodes(address=cluster.dashboard)}
    worker_node = next(i for i, n in nodes.items() if n.resources_total.get(ACCELERATOR))
    assert info.driver_node_id != worker_node, "the driver runs on the head"
    actors = list_actors(address=cluster.dashboard, filters=[("job_id", "=", info.job_id)], detail=True,
                         raise_on_missing_output=False)
    generators = {a.pid: a.node_id for a in actors if "GeneratorActor" in (a.class_name + (a.repr_name or ""))}
    assert generators and set(generators.values()) == {worker_node}, generators

    rows = [row for _, table in read_manifests(open_storage(output)) for row in table.to_pylist()]
    assert len(rows) == 16 and all(r["status"] == "ok" for r in rows)
    pids = {int(r["worker"].rsplit(":", 1)[1]) for r in rows}
    assert pids <= set(generators), f"images made by {pids}, generator actors {generators}"
    assert (tmp_path / "cache-worker").is_dir() and not (tmp_path / "cache-head").exists(), \
        "only the node that ran a generator staged the model"
    assert run_cli("inspect", output).returncode == 0

    status = run_cli("status", job_id, "--address", cluster.dashboard)
    assert status.returncode == 0 and json.loads(status.stdout)["status"] == "SUCCEEDED"
    logs = run_cli("logs", job_id, "--address", cluster.dashboard)
    assert logs.returncode == 0 and "images_ok" in logs.stdout
    assert run_cli("stop", job_id, "--address", cluster.dashboard).stdout.strip().endswith("had already ended")

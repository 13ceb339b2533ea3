"""Shared by the benchmark programs: machine facts, a moto S3 server, job runs with per-process CPU and memory."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "bench" / "out"
BIN = Path(sys.executable).parent
WORDS = ["lighthouse", "ramen", "fox", "garden", "harbor", "robot", "canyon", "owl", "teapot", "glacier"]


def machine() -> dict[str, Any]:
    """What a figure depends on: CPU, cores, memory and library versions."""
    from importlib.metadata import version

    cpu = platform.processor() or ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "versions": {n: version(n) for n in ("torch", "diffusers", "transformers", "ray", "pyarrow", "moto")},
    }


def load1() -> float:
    return round(os.getloadavg()[0], 2)


def busy_cpu_s() -> float:
    """CPU seconds the whole machine has spent busy since boot (all cores)."""
    t = psutil.cpu_times()
    return t.user + t.nice + t.system + getattr(t, "irq", 0) + getattr(t, "softirq", 0) + getattr(t, "steal", 0)


def own_cpu_s() -> float:
    t = psutil.Process().cpu_times()
    return t.user + t.system


def other_cores(seconds: float = 3.0) -> float:
    """Cores that processes outside this one keep busy, averaged over `seconds`."""
    busy, own = busy_cpu_s(), own_cpu_s()
    time.sleep(seconds)
    return max(0.0, (busy_cpu_s() - busy) - (own_cpu_s() - own)) / seconds


def wait_quiet(max_cores: float = 0.3, timeout_s: float = 1200.0) -> float:
    """Wait until other processes (other engineers' test runs) use at most `max_cores`; returns what they use.

    Gives up after `timeout_s` and measures anyway: the figure then carries the load next to it."""
    deadline = time.monotonic() + timeout_s
    while True:
        cores = other_cores()
        if cores <= max_cores or time.monotonic() > deadline:
            return round(cores, 2)
        print(f"  machine busy ({cores:.2f} cores used by other processes); waiting", file=sys.stderr, flush=True)
        time.sleep(10)


def add_quiet_options(parser: argparse.ArgumentParser, max_attempts: int) -> None:
    """The options of a benchmark that measures only on a quiet machine and redoes busy repeats."""
    parser.add_argument("--max-other-cores", type=float, default=0.3,
                        help="wait before each repeat until other processes use at most this many cores")
    parser.add_argument("--max-busy-cores", type=float, default=0.4,
                        help="reject a repeat in which other processes used more cores than this (and try again)")
    parser.add_argument("--max-attempts", type=int, default=max_attempts)


def quiet_repeats(repeats: list[dict[str, Any]], rejected: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The repeats to report: the quiet ones, else (with a warning) the busy ones."""
    if repeats:
        return repeats
    print("warning: every attempt ran on a busy machine; the figures below come from busy attempts",
          file=sys.stderr)
    return rejected


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def prompts(n: int, start: int = 0) -> list[str]:
    return [f"a {WORDS[i % len(WORDS)]} at dusk, study number {i}" for i in range(start, start + n)]


def write_prompts(path: Path, n: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"prompt": prompts(n)}), path, row_group_size=max(1, min(n, 10_000)))
    return path


def bench_model(size: str = "bench", family: str = "sd15") -> Path:
    """The random-weight model the benchmarks share, built once under bench/out/models/."""
    from batchgen.models.tiny import make_tiny_model

    path = OUT / "models" / f"{size}-{family}"
    if not (path / "model_index.json").is_file():
        make_tiny_model(path, family, size)
    return path


def job(model_dir: Path, prompts_uri: str, output_uri: str, *, steps: int, px: int, guidance: float,
        batch_size: int, threads: int, fmt: str = "png", **compute: Any) -> dict[str, Any]:
    """A batchgen job spec (as YAML data) for the benchmarks: DDIM, CPU, float32, one job seed."""
    return {
        "input": {"prompts": prompts_uri},
        "model": {"source": str(model_dir), "device": "cpu", "dtype": "float32"},
        "sampling": {"steps": steps, "width": px, "height": px, "guidance_scale": guidance, "scheduler": "ddim",
                     "seed": 0},
        "output": {"uri": output_uri, "format": fmt},
        "compute": {"batch_size": batch_size, "torch_threads": threads, **compute},
    }


def write_spec(path: Path, spec: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def save(name: str, data: dict[str, Any]) -> Path:
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, default=str))
    return path


def table(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> str:
    """A fixed-width text table; columns are (key, header, format spec)."""
    cells = [[h for _, h, _ in columns]]
    for row in rows:
        cells.append([format(row[k], f) if row.get(k) is not None else "-" for k, _, f in columns])
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(line, widths, strict=True)) for line in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


class MotoServer:
    """A moto_server subprocess on 127.0.0.1 (what Ray's own S3 tests use); clients connect to it directly."""

    def __init__(self, log: Path):
        # A killed benchmark must still stop its server: SIGTERM unwinds through the callers' `finally`.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            self.process = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)],
                                            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 1):
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"moto_server did not answer within 30 s; see {log}")

    @property
    def env(self) -> dict[str, str]:
        """The environment that points boto3 and pyarrow at this server with fake credentials."""
        missing = str(Path(os.devnull) / "missing")
        env = {k: v for k, v in os.environ.items() if k not in ("AWS_PROFILE", "AWS_SESSION_TOKEN",
                                                                   "AWS_ENDPOINT_URL_S3")}
        env.update(AWS_ENDPOINT_URL=self.endpoint, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                   AWS_DEFAULT_REGION="us-east-1", AWS_CONFIG_FILE=missing, AWS_SHARED_CREDENTIALS_FILE=missing)
        return env

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id="testing", aws_secret_access_key="testing")

    def bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def put_prompts(self, bucket: str, counts: Sequence[int]) -> None:
        """s3://bucket/prompts/{n}.parquet with the first n benchmark prompts, for each n."""
        client = self.client()
        for n in counts:
            buffer = io.BytesIO()
            pq.write_table(pa.table({"prompt": prompts(n)}), buffer)
            client.put_object(Bucket=bucket, Key=f"prompts/{n}.parquet", Body=buffer.getvalue())


    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.process.terminate()
        self.process.wait(timeout=10)

    def __enter__(self) -> MotoServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# (needles, role), by priority: a process is what the most specific title it ever had says (a Ray worker
# starts as ray::IDLE, then runs tasks or becomes an actor).
_ROLES = [
    (("spawn_main",), "window driver"),  # batchgen.windows: a window's Ray Data execution, a child of the driver
    (("GeneratorActor",), "generator actor"),
    (("PredictCallable",), "baseline actor"),
    (("_StatsActor", "_AutoscalingCoordinatorActor", "ActorLocationTracker", "SplitCoordinator"),
     "ray data internal actors"),
    (("raylet",), "raylet"),
    (("gcs_server",), "gcs_server"),
    (("moto_server",), "moto_server"),
    (("dashboard", "Dashboard", "agent", "Agent"), "ray dashboard/agents"),
    (("log_monitor",), "ray log_monitor"),
    (("monitor.py",), "ray monitor"),
    # Task workers and idle workers are one pool (an idle worker of the short run may run tasks in the long one).
    (("MapBatches", "StreamingRepartition", "Map(", "ReadParquet", "FromPandas", "ray::IDLE", "default_worker",
      "setup_worker"), "ray task workers"),
]


def _role(titles: list[str]) -> str:
    for needles, role in _ROLES:
        if any(needle in title for title in titles for needle in needles):
            return role
    return "other"


@dataclass
class ProcessStats:
    pid: int
    role: str
    titles: list[str] = field(default_factory=list)
    cpu_s: float = 0.0
    peak_rss_mib: float = 0.0
    rss_mib_samples: list[tuple[float, float]] = field(default_factory=list)


class TreeMonitor:
    """Polls a process tree: CPU seconds, peak RSS (the kernel's high-water mark) and title changes per process.

    The kernel's VmHWM is exact whatever the polling interval; polling only decides how fresh the last
    reading of a process is when it exits.
    """

    def __init__(self, root_pid: int, interval_s: float = 0.5, extra_pids: Sequence[int] = ()):
        self.root = psutil.Process(root_pid)
        self.extra = [psutil.Process(p) for p in extra_pids]
        self.interval_s = interval_s
        self.stats: dict[int, ProcessStats] = {}
        self.events: list[tuple[float, int, str]] = []  # (time, pid, new title)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        # CPU already spent when the watch starts (by the root, extras and existing children) is not counted.
        existing = [self.root, *self.extra, *self.root.children(recursive=True)]
        self._base = {p.pid: sum(p.cpu_times()[:2]) for p in existing}

    def start(self) -> TreeMonitor:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.poll()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.poll()
            self._stop.wait(self.interval_s)

    def poll(self) -> None:
        now = time.time()
        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.Error:  # the root has exited
            procs = []
        procs += self.extra
        for proc in procs:
            try:
                with proc.oneshot():
                    title = " ".join(proc.cmdline()).strip()[:200] or proc.name()
                    cpu = sum(proc.cpu_times()[:2]) - self._base.get(proc.pid, 0.0)
                    rss = proc.memory_info().rss / 2**20
                hwm = status_mib(proc.pid)
            except (psutil.Error, OSError):
                continue
            stats = self.stats.get(proc.pid)
            if stats is None:
                stats = self.stats[proc.pid] = ProcessStats(proc.pid, "other")
            if not stats.titles or stats.titles[-1] != title:
                stats.titles.append(title)
                self.events.append((now, proc.pid, title))
                stats.role = "driver" if proc.pid == self.root.pid else _role(stats.titles)
            stats.cpu_s = max(stats.cpu_s, cpu)
            stats.peak_rss_mib = max(stats.peak_rss_mib, hwm or rss)
            stats.rss_mib_samples.append((now, rss))

    def processes(self) -> list[dict[str, Any]]:
        """Every process seen: role, CPU seconds, peak RSS and its distinct titles (for the JSON record)."""
        return [{"pid": st.pid, "role": st.role, "cpu_s": round(st.cpu_s, 2), "peak_rss_mib": round(st.peak_rss_mib),
                 "titles": list(dict.fromkeys(t[:100] for t in st.titles))[:8]}
                for st in sorted(self.stats.values(), key=lambda st: -st.cpu_s)]

    def cpu_by_role(self) -> dict[str, float]:
        totals: dict[str, float] = {}
        for s in self.stats.values():
            totals[s.role] = totals.get(s.role, 0.0) + s.cpu_s
        return {k: round(v, 1) for k, v in sorted(totals.items(), key=lambda kv: -kv[1])}


def status_mib(pid: int, field: str = "VmHWM") -> float | None:
    """A memory field of /proc/PID/status in MiB: VmHWM (peak RSS, the default) or VmRSS (now)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    return None


@dataclass
class JobRun:
    """One `batchgen run` command: its wall time, summary and what each of its processes used."""

    command: list[str]
    started: float
    wall_s: float
    summary: dict[str, Any]
    monitor: TreeMonitor
    other_cores: float  # cores used by processes outside the job (and this program) while it ran


def run_batchgen(spec: Path, env: dict[str, str] | None = None, monitor_interval_s: float = 0.5,
                 extra_pids: Sequence[int] = (), log: Path | None = None) -> JobRun:
    """Run `batchgen run SPEC` as a user would, watching its process tree; fail loudly on a non-zero exit."""
    command = [str(BIN / "batchgen"), "run", str(spec)]
    log = log or spec.with_suffix(".log")
    busy_before, own_before = busy_cpu_s(), own_cpu_s()
    started = time.time()
    with open(log, "w") as err:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
        monitor = TreeMonitor(process.pid, monitor_interval_s, extra_pids).start()
        stdout, _ = process.communicate()
    wall = time.time() - started
    monitor.stop()
    tree = sum(s.cpu_s for s in monitor.stats.values())
    outside = (busy_cpu_s() - busy_before) - tree - (own_cpu_s() - own_before)
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {process.returncode}; see {log}")
    summary = json.loads(stdout[: stdout.rindex("}") + 1])
    return JobRun(command, started, wall, summary, monitor, max(0.0, outside) / wall)


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)

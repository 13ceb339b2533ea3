"""Pytest fixtures: a real moto_server subprocess that speaks S3 on 127.0.0.1, and a fresh bucket per test."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

MOTO_SERVER = Path(sys.executable).with_name("moto_server")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def use_s3_endpoint(env: pytest.MonkeyPatch, endpoint: str) -> None:
    """Point boto3 at `endpoint` with fake credentials, ignoring the developer's AWS profile and files."""
    env.setenv("AWS_ENDPOINT_URL", endpoint)
    env.setenv("AWS_ACCESS_KEY_ID", "testing")
    env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    env.setenv("AWS_DEFAULT_REGION", "us-east-1")
    missing = str(Path(os.devnull) / "missing")
    env.setenv("AWS_CONFIG_FILE", missing)
    env.setenv("AWS_SHARED_CREDENTIALS_FILE", missing)
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        env.delenv(name, raising=False)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):  # shutdown wakes a thread blocked on the socket; close alone does not
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


class S3Server:
    """moto_server behind a TCP forwarder that owns the public port, so the port survives restarts.

    `stop()` closes the public port and every open connection, then kills moto's process group: clients
    see reset and refused connections, as with a crashed server. `start()` launches a fresh moto, which
    has lost every object written before, recreates the buckets that existed at `stop()`, and only then
    reopens the same port, so no client ever reaches a server without its buckets. `stop(keep_objects=True)`
    is a network outage instead: clients see the same resets and refusals, but moto keeps running, and
    `start()` only reopens the port, every object still there.
    """

    def __init__(self, log_path: Path):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._log_path = log_path
        self._moto: subprocess.Popen[bytes] | None = None
        self._moto_port = 0
        self._listener: socket.socket | None = None
        self._connections: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._buckets: list[str] = []

    def start(self) -> None:
        """Start the server unless it is running; returns once it answers on `endpoint`."""
        if self._listener is not None:
            return
        if self._moto is None:
            self._start_moto()
        self._listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, args=(self._listener,), daemon=True).start()

    def _start_moto(self) -> None:
        self._moto_port = free_port()
        with open(self._log_path, "ab") as log:
            self._moto = subprocess.Popen(
                [str(MOTO_SERVER), "-H", "127.0.0.1", "-p", str(self._moto_port)],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, "MOTO_PORT": str(self.port)},
            )
        try:
            self._wait_for_moto()
            moto = self._moto_client()
            for bucket in self._buckets:
                moto.create_bucket(Bucket=bucket)
        except BaseException:
            self._kill_moto()
            raise

    def stop(self, *, keep_objects: bool = False) -> None:
        """Make the endpoint unreachable (idempotent); kill moto unless `keep_objects`."""
        if self._moto is not None and self._moto.poll() is None and not keep_objects:
            with contextlib.suppress(BotoCoreError, ClientError):  # a crashed moto has no buckets to keep
                self._buckets = [b["Name"] for b in self._moto_client().list_buckets()["Buckets"]]
        if self._listener is not None:
            _close(self._listener)
            self._listener = None
        with self._lock:
            connections, self._connections = self._connections, set()
        for sock in connections:
            _close(sock)
        if not keep_objects:
            self._kill_moto()

    def _moto_client(self) -> Any:
        return boto3.client(
            "s3", endpoint_url=f"http://127.0.0.1:{self._moto_port}", region_name="us-east-1",
            aws_access_key_id="testing", aws_secret_access_key="testing",
            config=Config(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=10),
        )

    def _wait_for_moto(self) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self._moto is not None
            if self._moto.poll() is not None:
                raise RuntimeError(f"moto_server exited with {self._moto.returncode}; see {self._log_path}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self._moto_port), 1):
                return
            time.sleep(0.05)
        raise RuntimeError(f"moto_server did not answer within 30 s; see {self._log_path}")

    def _kill_moto(self) -> None:
        if self._moto is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._moto.pid, signal.SIGTERM)
            try:
                self._moto.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self._moto.pid, signal.SIGKILL)
        self._moto.wait()
        self._moto = None

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # stop() closed the listener
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self._moto_port))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._connections.update((client, upstream))
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        with self._lock:
            self._connections.difference_update((source, sink))
        _close(source)
        _close(sink)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A moto S3 server for the whole session; boto3 in this process and its children points at it."""
    server = S3Server(tmp_path_factory.mktemp("moto") / "moto_server.log")
    with pytest.MonkeyPatch.context() as env:
        try:
            server.start()
            use_s3_endpoint(env, server.endpoint)
            yield server
        finally:
            server.stop()


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> str:
    """A new, empty bucket; restarts the server if an earlier test left it stopped."""
    s3_server.start()
    name = f"test-{uuid.uuid4().hex[:16]}"
    boto3.client("s3").create_bucket(Bucket=name)
    return name

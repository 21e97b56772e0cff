"""The real broker binary as a subprocess, for the tests.

The binary comes from ``TIDINGS_BIN`` (default: the repository's
``target/debug/tidings``, else ``tidings`` on ``PATH``). Each broker listens
on 127.0.0.1 with port 0 (the port is read from its first stdout line) and
keeps its data in a folder of the test's.
"""

from __future__ import annotations

import os
import queue
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

REPO = Path(__file__).resolve().parents[3]
STARTUP_TIMEOUT = 20.0
SHUTDOWN_TIMEOUT = 30.0


def broker_binary() -> str:
    """The broker binary to test against."""
    if env := os.environ.get("TIDINGS_BIN"):
        return env
    built = REPO / "target" / "debug" / "tidings"
    if built.is_file():
        return str(built)
    found = shutil.which("tidings")
    if found is None:
        pytest.fail("no tidings binary: set TIDINGS_BIN or run `cargo build`")
    return found


class Broker:
    """A ``tidings serve`` process on 127.0.0.1 and a free port."""

    def __init__(self, data_dir: Path, *extra: str) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = data_dir / "broker.log"
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [
                broker_binary(),
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--data-dir",
                str(data_dir / "db"),
                "--poll-interval",
                "100ms",
                "--maintenance-interval",
                "100ms",
                *extra,
            ],
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
        )
        lines: queue.SimpleQueue[str] = queue.SimpleQueue()
        assert self.process.stdout is not None
        stdout = self.process.stdout
        threading.Thread(target=lambda: lines.put(stdout.readline()), daemon=True).start()
        try:
            line = lines.get(timeout=STARTUP_TIMEOUT)
        except queue.Empty:
            line = ""
        prefix = "tidings listening on "
        if not line.startswith(prefix):
            self.process.kill()
            self.process.wait()
            raise RuntimeError(f"broker did not start (stdout {line!r}): {self.log_path.read_text()}")
        self.address = line[len(prefix) :].strip()
        self.url = f"http://{self.address}"
        self._wait_until_serving()

    def _wait_until_serving(self) -> None:
        # The broker prints its address once bound, then opens its storage
        # and installs its SIGTERM handler; a SIGTERM before that would kill
        # it outright. Tests start once it answers a health check.
        deadline = time.monotonic() + STARTUP_TIMEOUT
        with grpc.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                try:
                    status = stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                    if status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"broker not serving: {self.log_path.read_text()}")
                time.sleep(0.02)

    def stop(self) -> int:
        """Stops the broker with SIGTERM (graceful drain); returns its exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(SHUTDOWN_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        if self.process.stdout is not None:
            self.process.stdout.close()
        return self.process.returncode

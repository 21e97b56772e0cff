"""The real broker binary as a subprocess, for the tests.

The binary comes from ``TIDINGS_BIN`` (default: the repository's
``target/debug/tidings``, else ``tidings`` on ``PATH``). Each broker listens
on 127.0.0.1 with port 0 (the port is read from its first stdout line) and
keeps its data in a folder of the test's.

A broker may also serve TLS (certificates made by ``clients/test-certs.sh``)
and access control (an access file written for it): see :class:`Secure`.
With ``TIDINGS_TEST_SECURE=1`` every test's broker does, with an admin token
(:data:`ADMIN_TOKEN`) for the test's client.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import tidings

REPO = Path(__file__).resolve().parents[3]
STARTUP_TIMEOUT = 20.0
SHUTDOWN_TIMEOUT = 30.0

SECURE_MODE = os.environ.get("TIDINGS_TEST_SECURE") == "1"
"""Whether every test's broker serves TLS and access control."""
ADMIN_TOKEN = "tidings-test-admin-token"
"""The token of the ``tests`` principal (admin) of :func:`default_access`."""


def token_hash(token: str) -> str:
    """A token as the access file lists it."""
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()


def default_access() -> dict[str, Any]:
    """The access file of the secure mode: the test's client is admin."""
    return {"principals": [{"name": "tests", "tokens": [token_hash(ADMIN_TOKEN)], "admin": True}]}


@dataclass(frozen=True)
class Certs:
    """The files of ``clients/test-certs.sh``: a CA, the broker's
    certificate (localhost, 127.0.0.1), a client certificate
    (``client.tidings.test``) and a CA that signed none of them."""

    dir: Path

    @classmethod
    def make(cls, directory: Path) -> Certs:
        """Runs ``clients/test-certs.sh`` into ``directory``."""
        if shutil.which("openssl") is None:
            pytest.fail("the secure tests need the openssl command")
        subprocess.run(["bash", str(REPO / "clients" / "test-certs.sh"), str(directory)], check=True)
        return cls(directory)

    @property
    def ca(self) -> Path:
        return self.dir / "ca.pem"

    @property
    def server_cert(self) -> Path:
        return self.dir / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.dir / "server.key"

    @property
    def client_cert(self) -> Path:
        return self.dir / "client.pem"

    @property
    def client_key(self) -> Path:
        return self.dir / "client.key"

    @property
    def other_ca(self) -> Path:
        return self.dir / "other-ca.pem"

    def client_tls(self, *, mutual: bool = False) -> tidings.TLS:
        """Client settings trusting the test CA (with the client certificate
        when ``mutual``)."""
        if mutual:
            return tidings.TLS(ca=self.ca, cert=self.client_cert, key=self.client_key)
        return tidings.TLS(ca=self.ca)


@dataclass(frozen=True)
class Secure:
    """How a broker is secured.

    Attributes:
        certs: The certificates it serves (TLS on) and whose CA signs client
            certificates; ``None``: plain text.
        client_auth: ``--tls-client-auth``: ``optional`` (a token or a
            client certificate) or ``required`` (mutual TLS).
        access: The access file's content; ``None``: no access control.
    """

    certs: Certs | None
    client_auth: str = "optional"
    access: Mapping[str, Any] | None = field(default_factory=default_access)

    def flags(self, data_dir: Path) -> list[str]:
        flags: list[str] = []
        if self.certs is not None:
            flags += [
                "--tls-cert",
                str(self.certs.server_cert),
                "--tls-key",
                str(self.certs.server_key),
                "--tls-ca",
                str(self.certs.ca),
                "--tls-client-auth",
                self.client_auth,
            ]
        if self.access is not None:
            access_file = data_dir / "access.json"
            access_file.write_text(json.dumps(self.access))
            flags += ["--access-file", str(access_file)]
        return flags


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
    """A ``tidings serve`` process on 127.0.0.1 and a free port, plain or
    secured (``secure``)."""

    def __init__(self, data_dir: Path, *extra: str, secure: Secure | None = None) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self.secure = secure
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
                *(secure.flags(data_dir) if secure else []),
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
        self.tls = secure is not None and secure.certs is not None
        self.url = f"{'https' if self.tls else 'http'}://{self.address}"
        self._wait_until_serving()

    def client_args(self, *, token: str | None = ADMIN_TOKEN, mutual: bool | None = None) -> dict[str, Any]:
        """Keyword arguments of :class:`tidings.Client` for this broker:
        TLS trusting the test CA (with the client certificate when
        ``mutual``, by default when it is required) and, with access
        control, ``token``."""
        args: dict[str, Any] = {}
        if self.secure is not None and self.secure.certs is not None:
            if mutual is None:
                mutual = self.secure.client_auth == "required"
            args["tls"] = self.secure.certs.client_tls(mutual=mutual)
        if self.secure is not None and self.secure.access is not None and token is not None:
            args["token"] = token
        return args

    def client(self, *, timeout: float = 10, **overrides: Any) -> tidings.Client:
        """A client of this broker (see :meth:`client_args`)."""
        return tidings.Client(self.url if self.tls else self.address, timeout=timeout, **self.client_args(**overrides))

    def channel(self) -> grpc.Channel:
        """A raw grpcio channel to this broker with the test's credentials."""
        return self.client().channel

    def producer_args(self) -> Sequence[str]:
        """The TypeScript test producer's connection flags for this broker."""
        args = ["--broker", self.url]
        client = self.client_args()
        if "tls" in client:
            args += ["--ca", str(client["tls"].ca)]
        if "token" in client:
            args += ["--token", client["token"]]
        return args

    def _wait_until_serving(self) -> None:
        # The broker prints its address once bound, then opens its storage
        # and installs its SIGTERM handler; a SIGTERM before that would kill
        # it outright. Tests start once it answers a health check.
        deadline = time.monotonic() + STARTUP_TIMEOUT
        # Health is open: no token needed, only the TLS settings.
        with self.client(token=None) as client:
            stub = health_pb2_grpc.HealthStub(client.channel)
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

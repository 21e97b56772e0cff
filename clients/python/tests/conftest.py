"""Fixtures: a real tidings broker per test, and a client connected to it.

With ``TIDINGS_TEST_SECURE=1`` each test's broker serves TLS (test
certificates) and access control, and its client sends an admin token over
TLS: the whole suite then runs against a secured broker.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from support import SECURE_MODE, Broker, Certs, Secure

import tidings


def pytest_report_header() -> str:
    return f"tidings broker: {'TLS + access control (TIDINGS_TEST_SECURE=1)' if SECURE_MODE else 'plain text'}"


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    """Test certificates (made once per session)."""
    return Certs.make(tmp_path_factory.mktemp("certs"))


@pytest.fixture
def start_broker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[..., Broker]]:
    """Starts brokers (extra ``serve`` flags as arguments, ``secure=`` to
    choose how it is secured; by default as the mode says); each must shut
    down cleanly with exit code 0 at the end of the test."""
    started: list[Broker] = []

    def start(*extra: str, secure: Secure | None = None) -> Broker:
        if secure is None and SECURE_MODE:
            secure = Secure(request.getfixturevalue("certs"))
        b = Broker(tmp_path / f"broker-{len(started)}", *extra, secure=secure)
        started.append(b)
        return b

    yield start
    for b in started:
        code = b.stop()
        assert code == 0, f"broker exited with {code}: {b.log_path.read_text()[-4000:]}"


@pytest.fixture
def broker(start_broker: Callable[..., Broker]) -> Broker:
    """A fresh broker for one test."""
    return start_broker()


@pytest.fixture
def client(broker: Broker) -> Iterator[tidings.Client]:
    """A client connected to the test's broker (with the mode's credentials)."""
    with broker.client(timeout=10) as c:
        yield c


@pytest.fixture(scope="session")
def span_exporter() -> InMemorySpanExporter:
    """The OpenTelemetry SDK as the global tracer provider (it can be set
    only once per process), exporting every ended span to memory."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return exporter


@pytest.fixture
def spans(span_exporter: InMemorySpanExporter) -> InMemorySpanExporter:
    """The spans ended during the test (``get_finished_spans()``), with
    tracing on."""
    span_exporter.clear()
    return span_exporter

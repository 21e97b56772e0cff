"""Fixtures: a real tidings broker per test, and a client connected to it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support import Broker

import tidings


@pytest.fixture
def start_broker(tmp_path: Path) -> Iterator[Callable[..., Broker]]:
    """Starts brokers (extra ``serve`` flags as arguments); each must shut
    down cleanly with exit code 0 at the end of the test."""
    started: list[Broker] = []

    def start(*extra: str) -> Broker:
        b = Broker(tmp_path / f"broker-{len(started)}", *extra)
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
    """A client connected to the test's broker."""
    with tidings.Client(broker.address, timeout=10) as c:
        yield c

"""A TypeScript producer and a Python consumer exchange 10,000 messages
through one broker: none lost, none processed twice.

The producer is ``clients/typescript/dist/test/support/producer.js`` (built
by ``npm run build`` in ``clients/typescript``); it publishes over a
pipelined stream and republishes some messages with the same ids. The
consumer uses the inbox with SQLite and makes deliveries repeat: it fails
some messages on their first attempt (rolled back and nacked) and drops the
ack of others after their commit (redelivered when the lease ends, then
skipped as duplicates).

A second, smaller exchange checks trace context across the languages: the
producer publishes inside an OpenTelemetry span (``--trace``), and the
Python inbox runs every handler in a child span of it.

Skipped when Node.js or the built producer is missing, unless
``TIDINGS_REQUIRE_CROSS_LANGUAGE=1`` (as in CI), which makes that a failure.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from support import REPO, Broker

import tidings

COUNT = 10_000
PRODUCER = REPO / "clients" / "typescript" / "dist" / "test" / "support" / "producer.js"


def fails_first(n: int) -> bool:
    """Messages whose handler fails on the first attempt."""
    return n % 97 == 0


def loses_first_ack(n: int) -> bool:
    """Messages whose first ack is lost after the commit."""
    return n % 89 == 0 and not fails_first(n)


class DroppedAck:
    """A delivery whose ack is lost, as when the consumer stops right after
    its commit."""

    def __init__(self, delivery: tidings.Delivery) -> None:
        self._delivery = delivery

    def __getattr__(self, name: str) -> Any:
        return getattr(self._delivery, name)

    def ack(self) -> None:
        pass


def producer_command(
    broker: Broker, ids_file: Path, *, count: int = COUNT, republish: int = 300, trace: bool = False
) -> list[str]:
    node = shutil.which("node")
    missing = "node is not on PATH" if node is None else None
    if node is not None and not PRODUCER.is_file():
        missing = f"{PRODUCER} is not built (npm ci && npm run build in clients/typescript)"
    if missing:
        if os.environ.get("TIDINGS_REQUIRE_CROSS_LANGUAGE") == "1":
            pytest.fail(missing)
        pytest.skip(missing)
    return [
        str(node),
        str(PRODUCER),
        *broker.producer_args(),
        "--topic",
        "orders",
        "--count",
        str(count),
        "--ids-file",
        str(ids_file),
        "--republish",
        str(republish),
        *(["--trace"] if trace else []),
    ]


@pytest.mark.timeout(300)
def test_typescript_producer_python_consumer_exactly_once(
    broker: Broker, client: tidings.Client, tmp_path: Path
) -> None:
    client.create_topic("orders")
    client.create_subscription(
        "fulfilment",
        "orders",
        start="earliest",
        ack_deadline=timedelta(seconds=3),
        min_backoff=timedelta(milliseconds=50),
        max_backoff=timedelta(milliseconds=200),
    )
    ids_file = tmp_path / "ids.txt"
    command = producer_command(broker, ids_file)

    db = sqlite3.connect(tmp_path / "consumer.db")
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute("CREATE TABLE shipments (n INTEGER NOT NULL, message_id TEXT NOT NULL)")
    db.commit()
    inbox = tidings.Inbox(db, "fulfilment")
    inbox.create_table()

    def ship(delivery: tidings.Delivery, conn: sqlite3.Connection) -> None:
        n = json.loads(delivery.payload)["n"]
        conn.execute("INSERT INTO shipments (n, message_id) VALUES (?, ?)", (n, delivery.id))
        if fails_first(n) and delivery.attempt == 1:
            raise RuntimeError(f"warehouse offline for {n}")

    expected_failures = sum(fails_first(n) for n in range(COUNT))
    expected_lost_acks = sum(loses_first_ack(n) for n in range(COUNT))
    results = {r: 0 for r in tidings.InboxResult}
    duplicates_of_lost_acks = 0

    producer = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        with client.subscribe("fulfilment", max_outstanding_messages=200) as stream:
            while time.monotonic() < deadline:
                finished = (
                    results[tidings.InboxResult.PROCESSED] == COUNT
                    and duplicates_of_lost_acks >= expected_lost_acks
                    and producer.poll() is not None
                )
                # Once everything is in, wait a quiet second for strays.
                delivery = stream.receive(timeout=1.0 if finished else 5.0)
                if delivery is None:
                    if finished:
                        break
                    continue
                n = json.loads(delivery.payload)["n"]
                target = DroppedAck(delivery) if loses_first_ack(n) and delivery.attempt == 1 else delivery
                result = inbox.handle(target, ship)
                results[result] += 1
                if result is tidings.InboxResult.DUPLICATE and loses_first_ack(n):
                    duplicates_of_lost_acks += 1
        stdout, stderr = producer.communicate(timeout=60)
    finally:
        if producer.poll() is None:
            producer.kill()
            producer.wait()

    assert producer.returncode == 0, stderr
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary == {
        "published": COUNT,
        "republished": 300,
        "duplicates": 300,
        "first_sequence": 1,
        "last_sequence": COUNT,
    }

    # None lost, none processed twice.
    sent_ids = set(ids_file.read_text().split())
    assert len(sent_ids) == COUNT
    rows = db.execute("SELECT n, message_id FROM shipments").fetchall()
    assert len(rows) == COUNT, "every message was shipped exactly once"
    assert sorted(n for n, _ in rows) == list(range(COUNT))
    assert {message_id for _, message_id in rows} == sent_ids
    assert db.execute("SELECT COUNT(*) FROM tidings_inbox").fetchone() == (COUNT,)

    # The repeats really happened and were absorbed by the inbox.
    assert results[tidings.InboxResult.PROCESSED] == COUNT
    assert results[tidings.InboxResult.FAILED] == expected_failures
    assert duplicates_of_lost_acks == expected_lost_acks
    assert results[tidings.InboxResult.DUPLICATE] >= expected_lost_acks

    stats = client.subscription_stats("fulfilment")
    assert (stats.backlog, stats.in_flight) == (0, 0)
    assert stats.redelivered >= expected_failures + expected_lost_acks
    db.close()


@pytest.mark.timeout(120)
def test_typescript_producer_span_is_the_parent_of_python_handler_spans(
    broker: Broker, client: tidings.Client, spans: InMemorySpanExporter, tmp_path: Path
) -> None:
    count = 50
    client.create_topic("orders")
    client.create_subscription("fulfilment", "orders", start="earliest")
    ids_file = tmp_path / "ids.txt"
    done = subprocess.run(
        producer_command(broker, ids_file, count=count, republish=10, trace=True),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert (summary["published"], summary["duplicates"]) == (count, 10)
    producer_trace, producer_span = int(summary["trace_id"], 16), int(summary["span_id"], 16)

    db = sqlite3.connect(tmp_path / "consumer.db")
    inbox = tidings.Inbox(db, "fulfilment")
    inbox.create_table()
    handler_spans: dict[str, trace.SpanContext] = {}

    def ship(delivery: tidings.Delivery, conn: sqlite3.Connection) -> None:
        handler_spans[delivery.id] = trace.get_current_span().get_span_context()

    with client.subscribe("fulfilment") as stream:
        for _ in range(count):
            delivery = stream.receive(timeout=10)
            assert delivery is not None
            traceparent = delivery.message.attributes.get("traceparent", "")
            assert traceparent.startswith(f"00-{producer_trace:032x}-{producer_span:016x}-"), traceparent
            assert inbox.handle(delivery, ship) is tidings.InboxResult.PROCESSED
    db.close()

    assert set(handler_spans) == set(ids_file.read_text().split())
    process = [s for s in spans.get_finished_spans() if s.name == "process orders"]
    assert len(process) == count
    for span in process:
        assert span.context.trace_id == producer_trace
        assert span.parent is not None and span.parent.span_id == producer_span
        assert span.parent.is_remote
        assert handler_spans[str(span.attributes["messaging.message.id"])] == span.context

"""Trace context: publishing writes the current span as the W3C
``traceparent`` (and ``tracestate``) attributes, a consumer gets the
producer's span back with ``message_context``, and the inbox runs handlers
in a child span of it."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode, TraceFlags, TraceState
from support import Broker

import tidings

WAIT = 10.0
tracer = trace.get_tracer("tidings-tests")


def receive_all(stream: tidings.MessageStream, count: int) -> dict[str, tidings.Delivery]:
    """The next ``count`` deliveries of a stream, by message id."""
    found: dict[str, tidings.Delivery] = {}
    while len(found) < count:
        delivery = stream.receive(timeout=WAIT)
        assert delivery is not None, f"{len(found)} of {count} messages arrived"
        found[delivery.id] = delivery
    return found


def traceparent(trace_id: int, span_id: int, flags: int = 1) -> str:
    return f"00-{trace_id:032x}-{span_id:016x}-{flags:02x}"


def parse(value: str) -> tuple[int, int]:
    """The trace id and span id of a ``traceparent``."""
    version, trace_id, span_id, flags = value.split("-")
    assert (version, len(trace_id), len(span_id), len(flags)) == ("00", 32, 16, 2), value
    return int(trace_id, 16), int(span_id, 16)


def process_spans(spans: InMemorySpanExporter) -> dict[str, ReadableSpan]:
    """The inbox's consumer spans, by message id."""
    return {
        str(s.attributes["messaging.message.id"]): s
        for s in spans.get_finished_spans()
        if s.name.startswith("process ") and s.attributes is not None
    }


def test_publishing_in_a_span_writes_its_traceparent_and_the_handler_span_is_its_child(
    client: tidings.Client, spans: InMemorySpanExporter, tmp_path: Path
) -> None:
    client.create_topic("orders")
    client.create_subscription("billing", "orders", start="earliest")
    unary, streamed, untraced = (tidings.message("orders", name) for name in ("unary", "streamed", "untraced"))

    with tracer.start_as_current_span("place order") as producer:
        client.publish([unary])
        with client.publish_stream() as stream:
            stream.publish([streamed]).result(timeout=WAIT)
    client.publish([untraced])
    producer_context = producer.get_span_context()
    assert dict(unary.attributes) == {}, "the caller's message is left as it was"

    stream = client.subscribe("billing")
    deliveries = receive_all(stream, 3)
    for m in (unary, streamed):
        attributes = deliveries[m.id].message.attributes
        assert parse(attributes["traceparent"]) == (producer_context.trace_id, producer_context.span_id)
        assert "tracestate" not in attributes, "an empty tracestate is not written"
    assert "traceparent" not in deliveries[untraced.id].message.attributes
    assert "tracestate" not in deliveries[untraced.id].message.attributes

    # The consumer side: the producer's span as the parent of a new span.
    parent = trace.get_current_span(tidings.message_context(deliveries[unary.id])).get_span_context()
    assert (parent.trace_id, parent.span_id, parent.is_remote) == (
        producer_context.trace_id,
        producer_context.span_id,
        True,
    )

    # The inbox runs each handler in a consumer span, child of the producer's.
    db = sqlite3.connect(tmp_path / "app.db")
    inbox = tidings.Inbox(db, "billing")
    inbox.create_table()
    current: dict[str, trace.SpanContext] = {}

    def record(delivery: tidings.Delivery, conn: Any) -> None:
        current[delivery.id] = trace.get_current_span().get_span_context()

    for delivery in deliveries.values():
        assert inbox.handle(delivery, record) is tidings.InboxResult.PROCESSED
    stream.close()
    db.close()

    handled = process_spans(spans)
    for m in (unary, streamed):
        span = handled[m.id]
        assert span.name == "process orders"
        assert span.kind is SpanKind.CONSUMER
        assert span.context.trace_id == producer_context.trace_id
        assert span.parent is not None and span.parent.span_id == producer_context.span_id
        assert current[m.id] == span.context, "the handler runs inside the span"
        assert span.attributes is not None
        assert span.attributes["messaging.destination.name"] == "orders"
        assert span.attributes["messaging.destination.subscription.name"] == "billing"
        assert span.attributes["tidings.inbox.result"] == "processed"
    # Without a traceparent the handler span starts a trace of its own.
    assert handled[untraced.id].parent is None
    assert handled[untraced.id].context.trace_id != producer_context.trace_id


def test_tracestate_travels_and_explicit_or_malformed_traceparents_are_kept(
    client: tidings.Client, spans: InMemorySpanExporter, tmp_path: Path
) -> None:
    client.create_topic("orders")
    client.create_subscription("billing", "orders", start="earliest")
    upstream = trace.NonRecordingSpan(
        trace.SpanContext(
            trace_id=0x4BF92F3577B34DA6A3CE929D0E0E4736,
            span_id=0x00F067AA0BA902B7,
            is_remote=True,
            trace_flags=TraceFlags(TraceFlags.SAMPLED),
            trace_state=TraceState([("vendor", "opaque")]),
        )
    )
    explicit = traceparent(0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331)
    messages = {
        "implicit": tidings.message("orders", "implicit"),
        "explicit": tidings.message("orders", "explicit", attributes={"traceparent": explicit}),
        "garbage": tidings.message("orders", "garbage", attributes={"traceparent": "not a traceparent"}),
        "zeros": tidings.message("orders", "zeros", attributes={"traceparent": traceparent(0, 0)}),
        "version ff": tidings.message(
            "orders", "version ff", attributes={"traceparent": "ff" + explicit[2:], "tracestate": "a=b"}
        ),
    }
    with tracer.start_as_current_span("checkout", context=trace.set_span_in_context(upstream)) as producer:
        client.publish(messages.values())
    producer_context = producer.get_span_context()

    stream = client.subscribe("billing")
    deliveries = receive_all(stream, len(messages))
    received = {name: dict(deliveries[m.id].message.attributes) for name, m in messages.items()}
    assert received["implicit"] == {
        "traceparent": traceparent(producer_context.trace_id, producer_context.span_id),
        "tracestate": "vendor=opaque",
    }
    # What the user wrote is never overwritten, valid or not.
    for name, m in messages.items():
        if name != "implicit":
            assert received[name] == dict(m.attributes)

    # The tracestate comes back with the producer's span.
    implicit_parent = trace.get_current_span(tidings.message_context(deliveries[messages["implicit"].id]))
    assert implicit_parent.get_span_context().trace_state.get("vendor") == "opaque"
    # A malformed traceparent is ignored: the base context comes back as it is.
    base = trace.set_span_in_context(upstream)
    for name in ("garbage", "zeros", "version ff"):
        assert tidings.message_context(deliveries[messages[name].id], base) is base

    db = sqlite3.connect(tmp_path / "app.db")
    inbox = tidings.Inbox(db, "billing")
    inbox.create_table()

    def fail_garbage(delivery: tidings.Delivery, conn: Any) -> None:
        if delivery.payload == b"garbage":
            raise ValueError("no such customer")

    results = {name: inbox.handle(deliveries[m.id], fail_garbage) for name, m in messages.items()}
    stream.close()
    db.close()
    assert results["garbage"] is tidings.InboxResult.FAILED
    assert {r for name, r in results.items() if name != "garbage"} == {tidings.InboxResult.PROCESSED}

    handled = process_spans(spans)
    assert handled[messages["implicit"].id].parent.span_id == producer_context.span_id  # type: ignore[union-attr]
    explicit_span = handled[messages["explicit"].id]
    assert (explicit_span.context.trace_id, explicit_span.parent.span_id) == parse(explicit)  # type: ignore[union-attr]
    for name in ("garbage", "zeros", "version ff"):
        assert handled[messages[name].id].parent is None, name
    failed = handled[messages["garbage"].id]
    assert failed.status.status_code is StatusCode.ERROR
    assert failed.status.description == "ValueError: no such customer"
    assert [e.name for e in failed.events] == ["exception"]
    assert failed.attributes is not None and failed.attributes["tidings.inbox.result"] == "failed"


NO_OPENTELEMETRY = textwrap.dedent(
    """
    import json, sqlite3, sys
    sys.modules["opentelemetry"] = None  # as if the otel extra were not installed
    import tidings
    from tidings import tracing

    args = json.loads(sys.argv[1])
    tls = tidings.TLS(ca=args["ca"]) if args["ca"] else None
    with tidings.Client(args["target"], tls=tls, token=args["token"], timeout=10) as client:
        assert not tracing.available()
        client.create_topic("orders")
        client.create_subscription("billing", "orders", start="earliest")
        [sent] = client.publish([tidings.message("orders", "x")])
        with client.publish_stream() as stream:
            stream.publish([tidings.message("orders", "y")]).result(timeout=10)
        db = sqlite3.connect(":memory:")
        inbox = tidings.Inbox(db, "billing")
        inbox.create_table()
        with client.subscribe("billing") as stream:
            for _ in range(2):
                delivery = stream.receive(timeout=10)
                assert dict(delivery.message.attributes) == {}
                assert inbox.handle(delivery, lambda d, c: None) is tidings.InboxResult.PROCESSED
        try:
            tidings.message_context(delivery)
        except ModuleNotFoundError as e:
            assert "tidings-client[otel]" in str(e), e
        else:
            raise AssertionError("message_context without opentelemetry")
    print("ok")
    """
)


def test_without_opentelemetry_publishing_and_the_inbox_work_untraced(broker: Broker) -> None:
    client_args = broker.client_args()
    args = {
        "target": broker.url if broker.tls else broker.address,
        "ca": str(client_args["tls"].ca) if "tls" in client_args else None,
        "token": client_args.get("token"),
    }
    done = subprocess.run(
        [sys.executable, "-c", NO_OPENTELEMETRY, json.dumps(args)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"

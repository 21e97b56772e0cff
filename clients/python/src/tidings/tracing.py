"""Trace context in message attributes (W3C Trace Context, OpenTelemetry).

Publishing writes the current span's context into each message as the
``traceparent`` attribute (and ``tracestate`` when it is not empty), in the
W3C Trace Context header formats, unless the message has a ``traceparent``
already. The broker carries attributes unchanged, so a consumer in any
language can make its handler span a child of the producer's span:
:func:`message_context` gives the OpenTelemetry context to start it in, and
:class:`tidings.Inbox` does so by itself.

OpenTelemetry is optional (``pip install 'tidings-client[otel]'``, which
brings ``opentelemetry-api``): without it, publishing adds nothing and the
inbox runs handlers without spans. With the API but no SDK configured, the
current span is never valid, so nothing is injected either.

The W3C propagator is used directly, not the globally configured one
(``opentelemetry.propagate``): the attribute names and formats are part of
the tidings contract, shared by every client and the broker's own relay,
whatever propagators (B3, Jaeger, ...) the application configured for its
HTTP calls.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
from collections.abc import Iterable, Iterator, Mapping, MutableMapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.trace import Span

    from tidings.subscriber import Delivery
    from tidings.v1.message_pb2 import Message

TRACEPARENT = "traceparent"
"""The attribute holding the W3C ``traceparent`` of the publisher's span."""
TRACESTATE = "tracestate"
"""The attribute holding the W3C ``tracestate`` (only when not empty)."""

_TRACER_NAME = "tidings"

try:
    from opentelemetry import context as _context
    from opentelemetry import trace as _trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
except ImportError:  # the optional `otel` extra is not installed
    _context = None  # type: ignore[assignment]
    _trace = None  # type: ignore[assignment]
    _propagator = None
else:
    _propagator = TraceContextTextMapPropagator()


def available() -> bool:
    """Whether ``opentelemetry-api`` is installed (the ``otel`` extra)."""
    return _propagator is not None


def current_trace_attributes() -> dict[str, str]:
    """The ``traceparent`` (and non-empty ``tracestate``) of the current
    span, or an empty dict when OpenTelemetry is missing or there is no
    valid current span."""
    if _propagator is None:
        return {}
    if not _trace.get_current_span().get_span_context().is_valid:
        return {}
    carrier: dict[str, str] = {}
    _propagator.inject(carrier)
    return {k: v for k, v in carrier.items() if k in (TRACEPARENT, TRACESTATE) and v}


def inject_trace_context(messages: Iterable[Message]) -> None:
    """Adds the current span's trace context (see
    :func:`current_trace_attributes`) to the attributes of each message
    that has no ``traceparent``; an attribute already set is never
    overwritten. Modifies the messages: give it a request's copies."""
    trace = current_trace_attributes()
    if not trace:
        return
    for message in messages:
        add_trace_context(message.attributes, trace)


def add_trace_context(attributes: MutableMapping[str, str], trace: Mapping[str, str]) -> None:
    """Adds ``trace`` (from :func:`current_trace_attributes`) to a message's
    attributes unless it has a ``traceparent`` already; an attribute the
    user set is never overwritten."""
    if not trace or TRACEPARENT in attributes:
        return
    for key, value in trace.items():
        if key not in attributes:
            attributes[key] = value


def message_context(source: Delivery | Message, context: Context | None = None) -> Context:
    """The OpenTelemetry context to process a received message in: its
    current span is the producer's (a remote, non-recording span made from
    the message's ``traceparent`` and ``tracestate`` attributes), so a span
    started in it is the producer span's child.

    Args:
        source: A :class:`~tidings.Delivery` or a ``tidings.v1.Message``
            (e.g. from :meth:`~tidings.Client.peek`).
        context: The context to add the producer's span to; by default the
            current one (so baggage and the like are kept). Returned as it
            is when the message has no ``traceparent`` or a malformed one.

    Returns:
        An ``opentelemetry.context.Context``; use it as
        ``tracer.start_as_current_span(name, context=...)`` or attach it.

    Raises:
        ModuleNotFoundError: ``opentelemetry-api`` is not installed
            (install ``tidings-client[otel]``).

    Example::

        with client.subscribe("billing") as stream:
            for delivery in stream:
                parent = tidings.message_context(delivery)
                with tracer.start_as_current_span("bill", context=parent, kind=SpanKind.CONSUMER):
                    bill(delivery)
                delivery.ack()
    """
    if _propagator is None:
        raise ModuleNotFoundError(
            "tidings.message_context needs opentelemetry-api: pip install 'tidings-client[otel]'",
            name="opentelemetry",
        )
    message = getattr(source, "message", source)
    base = _context.get_current() if context is None else context
    try:
        return _propagator.extract(dict(message.attributes), context=base)
    except Exception:  # a malformed attribute must not fail the consumer
        return base


@contextlib.contextmanager
def consumer_span(delivery: Delivery, subscription: str) -> Iterator[Span | None]:
    """Runs a block in a ``process <topic>`` consumer span, child of the
    message's trace context (see :func:`message_context`) and current while
    the block runs; yields ``None`` without OpenTelemetry.

    An exception leaving the block is recorded on the span and sets its
    status to error.
    """
    if _propagator is None:
        yield None
        return
    message = delivery.message
    attributes: dict[str, Any] = {
        "messaging.system": "tidings",
        "messaging.operation.name": "process",
        "messaging.operation.type": "process",
        "messaging.destination.name": message.topic,
        "messaging.destination.subscription.name": subscription,
        "messaging.message.id": message.id,
        "tidings.message.sequence": message.sequence,
        "tidings.delivery.attempt": delivery.attempt,
    }
    if message.key:
        attributes["tidings.message.key"] = message.key
    tracer = _trace.get_tracer(_TRACER_NAME, _version())
    with tracer.start_as_current_span(
        f"process {message.topic}",
        context=message_context(delivery),
        kind=_trace.SpanKind.CONSUMER,
        attributes=attributes,
    ) as span:
        yield span


def mark_failed(span: Span | None, error: BaseException) -> None:
    """Records a handler's failure on its span (from :func:`consumer_span`)."""
    if span is None:
        return
    span.record_exception(error)
    span.set_status(_trace.Status(_trace.StatusCode.ERROR, f"{type(error).__name__}: {error}"))


@functools.cache
def _version() -> str:
    try:
        return importlib.metadata.version("tidings-client")
    except importlib.metadata.PackageNotFoundError:
        return ""

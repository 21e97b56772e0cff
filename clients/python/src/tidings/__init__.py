"""Python client of the tidings message broker.

Generated gRPC code for the ``tidings.v1`` API lives in :mod:`tidings.v1`
(``message_pb2``, ``publisher_pb2_grpc``, ...); this package adds a small
layer on top:

- :class:`Client`: admin calls, :meth:`Client.publish` (a batch, one commit),
  :meth:`Client.publish_stream` (pipelined), :meth:`Client.subscribe` (a
  :class:`MessageStream` of :class:`Delivery` objects to ack, nack or extend)
  and :meth:`Client.health`.
- :func:`message`: builds a message with a fresh UUID id.
- :class:`Inbox`: processes each delivery once with a DB-API connection.
- :class:`TLS`: TLS and mutual TLS settings of a :class:`Client` (with a
  bearer token for a broker with access control).
- :func:`message_context`: the OpenTelemetry context of a received message,
  whose span is the producer's. Publishing writes the current span into the
  ``traceparent`` and ``tracestate`` attributes (W3C Trace Context), and the
  inbox runs handlers in a child span of it, when ``opentelemetry-api`` is
  installed (the ``otel`` extra): see :mod:`tidings.tracing`.
"""

from tidings.client import Client
from tidings.credentials import TLS
from tidings.errors import AckRefused, StreamClosed, TidingsError
from tidings.inbox import Inbox, InboxResult
from tidings.publisher import Message, PublishResult, PublishStream, message
from tidings.subscriber import Delivery, MessageStream
from tidings.tracing import message_context

__all__ = [
    "AckRefused",
    "Client",
    "Delivery",
    "Inbox",
    "InboxResult",
    "Message",
    "MessageStream",
    "PublishResult",
    "PublishStream",
    "StreamClosed",
    "TLS",
    "TidingsError",
    "message",
    "message_context",
]

"""The broker client: admin calls, publishing, subscribing, health."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta
from typing import Literal, TypeVar

import grpc
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tidings.credentials import TLS, open_channel, with_token
from tidings.errors import TidingsError
from tidings.publisher import Message, PublishResult, PublishStream
from tidings.subscriber import MessageStream
from tidings.tracing import inject_trace_context
from tidings.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    publisher_pb2,
    publisher_pb2_grpc,
    subscriber_pb2,
    subscriber_pb2_grpc,
)

DEFAULT_TARGET = "127.0.0.1:50051"

_Response = TypeVar("_Response")


def _duration(value: timedelta) -> Duration:
    d = Duration()
    d.FromTimedelta(value)
    return d


class Client:
    """A connection to a tidings broker: gRPC over HTTP/2, plain text or TLS.

    Args:
        target: ``host:port`` of the broker. An ``http://`` prefix is
            accepted and dropped; an ``https://`` prefix turns TLS on (with
            ``tls=None``, the default roots are trusted).
        timeout: Deadline in seconds for unary calls.
        channel: An existing channel to use instead of opening one; it is
            then not closed by :meth:`close`. Cannot be combined with
            ``tls`` (``token`` is added to its calls).
        tls: TLS settings (:class:`tidings.TLS`: the CA bundle, a client
            certificate and key for mutual TLS, a server name), or ``True``
            for TLS trusting the default roots. ``None`` (the default): TLS
            only for an ``https://`` target.
        token: A bearer token, sent as ``authorization: Bearer <token>`` with
            every call (unary, streaming and health) to a broker with access
            control (``tidings serve --access-file``). Over TLS it is sent as
            grpcio call credentials; over plain text (a broker on loopback)
            by an interceptor.

    The raw generated stubs are available as :attr:`publisher`,
    :attr:`subscriber`, :attr:`admin` and :attr:`health_stub` for calls this
    layer does not wrap (Seek, dead letters, ...); they share the channel
    and so the credentials.

    Raises:
        ValueError: ``tls`` with an ``http://`` target or with ``channel``,
            an empty token, a client certificate without its key, or a PEM
            file that cannot be read.

    Example::

        with tidings.Client("127.0.0.1:50051") as client:
            client.publish([tidings.message("orders", b'{"order": 42}')])

        # TLS and a token; mutual TLS adds cert= and key= to TLS(...).
        tls = tidings.TLS(ca="ca.pem")
        with tidings.Client("https://broker.internal:50051", tls=tls, token=token) as client:
            client.publish([tidings.message("orders", b'{"order": 42}')])
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float = 30.0,
        channel: grpc.Channel | None = None,
        tls: TLS | bool | None = None,
        token: str | None = None,
    ) -> None:
        if token is not None and not token.strip():
            raise ValueError("token is empty")
        if target.startswith("https://"):
            self.target = target.removeprefix("https://")
            if tls is None or tls is True:
                tls = TLS()
            elif tls is False:
                raise ValueError(f"tls=False contradicts the https:// target {target!r}")
        else:
            self.target = target.removeprefix("http://")
            if tls is not None and tls is not False and target.startswith("http://"):
                raise ValueError(f"TLS was asked for with the plain-text target {target!r} (use https://)")
        settings = TLS() if tls is True else (tls or None)
        if channel is not None and settings is not None:
            raise ValueError("tls cannot be combined with channel (make the channel secure yourself)")
        self.timeout = timeout
        self.tls = settings
        self._own_channel = channel is None
        if channel is None:
            self.channel = open_channel(self.target, settings, token)
        else:
            self.channel = with_token(channel, token)
        self.publisher = publisher_pb2_grpc.PublisherServiceStub(self.channel)
        self.subscriber = subscriber_pb2_grpc.SubscriberServiceStub(self.channel)
        self.admin = admin_pb2_grpc.AdminServiceStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)

    def close(self) -> None:
        """Closes the channel (if this client opened it)."""
        if self._own_channel:
            self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _unary(self, method: Callable[..., _Response], request: object) -> _Response:
        """Calls a unary stub method with the client's deadline, raising
        :class:`TidingsError` on failure."""
        try:
            return method(request, timeout=self.timeout)
        except grpc.RpcError as e:
            raise TidingsError.from_rpc(e) from None

    # -- admin ------------------------------------------------------------

    def create_topic(
        self,
        name: str,
        *,
        retention: timedelta | None = None,
        max_age: timedelta | None = None,
        exist_ok: bool = False,
    ) -> admin_pb2.Topic:
        """Creates a topic.

        Args:
            name: 1 to 255 letters, digits, ``.``, ``_`` or ``-``.
            retention: Keep acked messages this long (for replay with Seek).
            max_age: Expire messages older than this even if not acked.
            exist_ok: If the topic exists already, return it (as stored,
                settings unchanged) instead of failing.

        Returns:
            The topic as stored.

        Raises:
            TidingsError: ``ALREADY_EXISTS`` if the name is taken (unless
                ``exist_ok``), ``INVALID_ARGUMENT`` for a bad name.
        """
        topic = admin_pb2.Topic(name=name)
        if retention is not None:
            topic.retention.CopyFrom(_duration(retention))
        if max_age is not None:
            topic.max_age.CopyFrom(_duration(max_age))
        try:
            return self._unary(self.admin.CreateTopic, admin_pb2.CreateTopicRequest(topic=topic)).topic
        except TidingsError as e:
            if not (exist_ok and e.code == grpc.StatusCode.ALREADY_EXISTS):
                raise
        return self._unary(self.admin.GetTopic, admin_pb2.GetTopicRequest(name=name)).topic

    def create_subscription(
        self,
        name: str,
        topic: str,
        *,
        start: Literal["earliest", "latest"] | datetime = "latest",
        ack_deadline: timedelta | None = None,
        max_attempts: int = 0,
        min_backoff: timedelta | None = None,
        max_backoff: timedelta | None = None,
        dead_letter_topic: str = "",
        ordered: bool = False,
        exist_ok: bool = False,
    ) -> admin_pb2.Subscription:
        """Creates a subscription: an independent stream of every message of
        ``topic``.

        Args:
            name: The subscription name.
            topic: The topic it reads.
            start: ``"earliest"`` (every message still stored), ``"latest"``
                (only messages published from now on) or a time.
            ack_deadline: Lease length (broker default 30 s).
            max_attempts: Deliveries before dead-lettering (default 10).
            min_backoff: Redelivery backoff after the first failure (default
                1 s), doubled per attempt.
            max_backoff: Longest backoff (default 10 min).
            dead_letter_topic: Topic that receives dead-lettered messages.
            ordered: Deliver each ordering key's messages one at a time.
            exist_ok: If the subscription exists already, return it (as
                stored, settings unchanged) instead of failing.

        Returns:
            The subscription as stored.

        Raises:
            TidingsError: ``NOT_FOUND`` for an unknown topic,
                ``ALREADY_EXISTS`` if the name is taken (unless ``exist_ok``).
        """
        sub = admin_pb2.Subscription(
            name=name,
            topic=topic,
            max_attempts=max_attempts,
            dead_letter_topic=dead_letter_topic,
            ordered=ordered,
        )
        if isinstance(start, datetime):
            stamp = Timestamp()
            stamp.FromDatetime(start)
            sub.start_time.CopyFrom(stamp)
        elif start == "earliest":
            sub.start_position = admin_pb2.START_POSITION_EARLIEST
        elif start == "latest":
            sub.start_position = admin_pb2.START_POSITION_LATEST
        else:
            raise ValueError(f"start must be 'earliest', 'latest' or a datetime, not {start!r}")
        for field, value in (
            ("ack_deadline", ack_deadline),
            ("min_backoff", min_backoff),
            ("max_backoff", max_backoff),
        ):
            if value is not None:
                getattr(sub, field).CopyFrom(_duration(value))
        request = admin_pb2.CreateSubscriptionRequest(subscription=sub)
        try:
            return self._unary(self.admin.CreateSubscription, request).subscription
        except TidingsError as e:
            if not (exist_ok and e.code == grpc.StatusCode.ALREADY_EXISTS):
                raise
        return self._unary(self.admin.GetSubscription, admin_pb2.GetSubscriptionRequest(name=name)).subscription

    def subscription_stats(self, subscription: str) -> admin_pb2.SubscriptionStats:
        """Counters and gauges of a subscription (backlog, in flight, acked,
        redelivered, dead-lettered, ...)."""
        request = admin_pb2.GetSubscriptionStatsRequest(subscription=subscription)
        return self._unary(self.admin.GetSubscriptionStats, request).stats

    # -- publishing -------------------------------------------------------

    def publish(self, messages: Iterable[Message], *, retries: int = 3) -> list[PublishResult]:
        """Publishes a batch of messages in one commit.

        Messages without a ``traceparent`` attribute get the current
        OpenTelemetry span's (see :mod:`tidings.tracing`), when there is
        one and ``opentelemetry-api`` is installed.

        Retryable failures (``UNAVAILABLE``) are retried with exponential
        backoff, which is safe because message ids make publishing
        idempotent: a message that was stored before the failure comes back
        with ``duplicate=True``.

        Args:
            messages: The messages (see :func:`tidings.message`), each naming
                its topic.
            retries: Retries after a retryable failure.

        Returns:
            One result per message, in order: ``id``, ``sequence`` and
            ``duplicate`` (true when the id had already been published to
            that topic; ``sequence`` is then the original's).

        Raises:
            TidingsError: e.g. ``INVALID_ARGUMENT`` naming the bad message,
                ``NOT_FOUND`` for an unknown topic. A batch with any bad
                message stores none of it.
        """
        # The request holds copies of the messages: the current span's trace
        # context is added to those, leaving the caller's objects as they are.
        request = publisher_pb2.PublishRequest(messages=list(messages))
        inject_trace_context(request.messages)
        delay = 0.1
        for attempt in range(retries + 1):
            try:
                return list(self._unary(self.publisher.Publish, request).results)
            except TidingsError as e:
                if not e.retryable or attempt == retries:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
        raise AssertionError("unreachable")

    def publish_stream(self, *, max_in_flight: int = 16) -> PublishStream:
        """Opens a pipelined publish stream (see :class:`PublishStream`).

        Args:
            max_in_flight: Most batches sent and not yet answered.
        """
        return PublishStream(self.publisher, max_in_flight)

    # -- subscribing ------------------------------------------------------

    def subscribe(
        self,
        subscription: str,
        *,
        max_outstanding_messages: int = 0,
        max_outstanding_bytes: int = 0,
    ) -> MessageStream:
        """Opens a streaming subscription (see :class:`MessageStream`).

        Args:
            subscription: The subscription name.
            max_outstanding_messages: Flow control: most unsettled messages
                on the stream (0: the broker's default, 1000).
            max_outstanding_bytes: Flow control: most unsettled payload bytes
                (0: the broker's default, 100 MiB).
        """
        return MessageStream(
            self.subscriber,
            subscription,
            max_outstanding_messages=max_outstanding_messages,
            max_outstanding_bytes=max_outstanding_bytes,
        )

    def ack(self, subscription: str, ack_ids: Iterable[str]) -> list[subscriber_pb2.AckOutcome]:
        """Acknowledges deliveries with a unary call.

        Returns:
            One outcome per ack id.

        Raises:
            TidingsError: ``FAILED_PRECONDITION`` if any ack id was stale or
                unknown (the message names the first; the others were
                committed).
        """
        request = subscriber_pb2.AckRequest(subscription=subscription, ack_ids=list(ack_ids))
        return list(self._unary(self.subscriber.Ack, request).outcomes)

    def peek(self, subscription: str, max_messages: int = 100) -> list[subscriber_pb2.PeekedMessage]:
        """The messages waiting on a subscription, oldest first, without
        leasing them: no attempt, counter or lease changes.

        Args:
            subscription: The subscription name.
            max_messages: Most messages to return (pages are followed).

        Returns:
            Up to ``max_messages`` ``PeekedMessage``: ``message``, ``state``
            (``MESSAGE_STATE_NEW``, ``READY``, ``BACKOFF``, ``LEASED`` or
            ``HELD``), ``attempts``, ``available_time`` and
            ``last_failure_reason``.
        """
        found: list[subscriber_pb2.PeekedMessage] = []
        token = ""
        while len(found) < max_messages:
            request = subscriber_pb2.PeekRequest(
                subscription=subscription,
                page_size=min(max_messages - len(found), 1000),
                page_token=token,
            )
            response = self._unary(self.subscriber.Peek, request)
            found.extend(response.messages)
            token = response.next_page_token
            if not token:
                break
        return found[:max_messages]

    # -- health -----------------------------------------------------------

    def health(self, service: str = "") -> str:
        """Checks health with the standard ``grpc.health.v1`` service.

        Args:
            service: ``""`` for the server, or a service name such as
                ``"tidings.v1.PublisherService"``.

        Returns:
            The status name: ``"SERVING"``, ``"NOT_SERVING"`` (storage
            failing or the broker draining) or ``"UNKNOWN"``.
        """
        response = self._unary(self.health_stub.Check, health_pb2.HealthCheckRequest(service=service))
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

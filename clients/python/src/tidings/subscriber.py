"""Subscribing: the streaming pull as an iterator of deliveries."""

from __future__ import annotations

import collections
import queue
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from datetime import datetime, timedelta, timezone

import grpc
from google.protobuf.duration_pb2 import Duration

from tidings.errors import AckRefused, StreamClosed, TidingsError
from tidings.v1 import message_pb2, subscriber_pb2, subscriber_pb2_grpc

_CLOSE = object()
_END = object()

# How many queued acks, nacks and extensions go into one request at most.
_MAX_BATCH = 1000

_OPERATIONS = {
    "ack": subscriber_pb2.ACK_OPERATION_ACK,
    "nack": subscriber_pb2.ACK_OPERATION_NACK,
    "extend": subscriber_pb2.ACK_OPERATION_EXTEND,
}


def _duration(value: timedelta) -> Duration:
    d = Duration()
    d.FromTimedelta(value)
    return d


class Delivery:
    """A message leased to this consumer.

    Settle it with :meth:`ack` once processed, :meth:`nack` to have it
    redelivered (with ``attempt + 1``), or :meth:`extend` for more time. If
    the lease ends first, the broker redelivers the message and refuses a
    late ack as stale.

    The settling methods send at once and return a
    :class:`concurrent.futures.Future` that resolves when the broker has
    committed the operation, or fails with :class:`~tidings.AckRefused`.
    Ignoring the future is fine when the outcome does not matter.

    Attributes:
        message: The ``tidings.v1.Message`` as stored (id, topic, key,
            payload, attributes, sequence, times).
        ack_id: Token of this lease.
        attempt: Delivery attempt, 1 for the first delivery.
        lease_deadline: When the lease ends unless extended (UTC).
    """

    __slots__ = ("message", "ack_id", "attempt", "lease_deadline", "_stream")

    def __init__(self, received: subscriber_pb2.ReceivedMessage, stream: MessageStream) -> None:
        self.message: message_pb2.Message = received.message
        self.ack_id: str = received.ack_id
        self.attempt: int = received.attempt
        self.lease_deadline: datetime = received.lease_deadline.ToDatetime(tzinfo=timezone.utc)
        self._stream = stream

    @property
    def id(self) -> str:
        """The message id (the producer's UUID)."""
        return self.message.id

    @property
    def payload(self) -> bytes:
        """The message body."""
        return self.message.payload

    @property
    def sequence(self) -> int:
        """The message's sequence number in its topic."""
        return self.message.sequence

    def ack(self) -> Future[None]:
        """Acknowledges the message: it will not be delivered again."""
        return self._stream._send("ack", self.ack_id, self.ack_id)

    def nack(self, *, delay: timedelta | None = None, reason: str = "") -> Future[None]:
        """Gives the message back for redelivery.

        Args:
            delay: Redeliver no sooner than this; by default the
                subscription's backoff applies.
            reason: Why processing failed; kept if the message ends up
                dead-lettered.
        """
        nack = subscriber_pb2.Nack(ack_id=self.ack_id, reason=reason)
        if delay is not None:
            nack.delay.CopyFrom(_duration(delay))
        return self._stream._send("nack", self.ack_id, nack)

    def extend(self, extension: timedelta) -> Future[datetime]:
        """Moves the lease deadline to now + ``extension``.

        Returns:
            A future of the new deadline.
        """
        ext = subscriber_pb2.LeaseExtension(ack_id=self.ack_id, extension=_duration(extension))
        return self._stream._send("extend", self.ack_id, ext)

    def __repr__(self) -> str:
        return f"Delivery(id={self.id!r}, sequence={self.sequence}, attempt={self.attempt})"


class MessageStream:
    """A ``Subscribe`` stream: iterate over it to receive :class:`Delivery`
    objects, settle each with ``ack``, ``nack`` or ``extend``.

    A background thread reads the stream, so outcomes of acks arrive while
    the application is busy; acks queued meanwhile are sent together in one
    request. Iteration ends after :meth:`close`, and raises
    :class:`~tidings.TidingsError` if the stream fails (e.g. ``NOT_FOUND``
    for an unknown subscription, or ``UNAVAILABLE`` when the broker shuts
    down: open a new stream then; unsettled messages are redelivered).

    Use it as a context manager::

        with client.subscribe("billing") as stream:
            for delivery in stream:
                handle(delivery.payload)
                delivery.ack()

    Closing ends the stream after the broker has answered the operations
    already sent; messages delivered but not settled are released for
    redelivery.
    """

    def __init__(
        self,
        stub: subscriber_pb2_grpc.SubscriberServiceStub,
        subscription: str,
        *,
        max_outstanding_messages: int = 0,
        max_outstanding_bytes: int = 0,
    ) -> None:
        self.subscription = subscription
        self._requests: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._deliveries: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._pending: dict[tuple[int, str], collections.deque[Future]] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._ended = False
        self._error: BaseException | None = None
        first = subscriber_pb2.SubscribeRequest(
            subscription=subscription,
            max_outstanding_messages=max_outstanding_messages,
            max_outstanding_bytes=max_outstanding_bytes,
        )
        self._call = stub.Subscribe(self._request_iterator(first))
        self._reader = threading.Thread(target=self._read, name=f"tidings-subscribe-{subscription}", daemon=True)
        self._reader.start()

    # -- requests ---------------------------------------------------------

    def _request_iterator(self, first: subscriber_pb2.SubscribeRequest) -> Iterator[subscriber_pb2.SubscribeRequest]:
        yield first
        while True:
            item = self._requests.get()
            if item is _CLOSE:
                return
            request = subscriber_pb2.SubscribeRequest()
            done = False
            count = 0
            while True:
                self._add(request, item)
                count += 1
                if count >= _MAX_BATCH:
                    break
                try:
                    item = self._requests.get_nowait()
                except queue.Empty:
                    break
                if item is _CLOSE:
                    done = True
                    break
            yield request
            if done:
                return

    @staticmethod
    def _add(request: subscriber_pb2.SubscribeRequest, item: object) -> None:
        if isinstance(item, str):
            request.ack_ids.append(item)
        elif isinstance(item, subscriber_pb2.Nack):
            request.nacks.append(item)
        elif isinstance(item, subscriber_pb2.LeaseExtension):
            request.extensions.append(item)
        elif isinstance(item, subscriber_pb2.SubscribeRequest):
            request.MergeFrom(item)
        else:  # pragma: no cover - internal misuse
            raise TypeError(f"unexpected stream request item {item!r}")

    def _send(self, operation: str, ack_id: str, item: object) -> Future:
        future: Future = Future()
        future.set_running_or_notify_cancel()
        with self._lock:
            if self._ended or self._closed:
                future.set_exception(self._error or StreamClosed("the subscription stream is closed"))
                return future
            self._pending.setdefault((_OPERATIONS[operation], ack_id), collections.deque()).append(future)
            self._requests.put(item)
        return future

    def set_flow_control(self, *, max_outstanding_messages: int = 0, max_outstanding_bytes: int = 0) -> None:
        """Changes the stream's flow control (0 keeps the current value).

        Args:
            max_outstanding_messages: At most this many unsettled messages.
            max_outstanding_bytes: At most this many unsettled payload bytes.
        """
        with self._lock:
            if self._ended or self._closed:
                raise self._error or StreamClosed("the subscription stream is closed")
            self._requests.put(
                subscriber_pb2.SubscribeRequest(
                    max_outstanding_messages=max_outstanding_messages,
                    max_outstanding_bytes=max_outstanding_bytes,
                )
            )

    # -- responses --------------------------------------------------------

    def _read(self) -> None:
        error: BaseException | None = None
        try:
            for response in self._call:
                for received in response.messages:
                    self._deliveries.put(Delivery(received, self))
                for outcome in response.outcomes:
                    self._resolve(outcome)
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.CANCELLED or not self._closed:
                error = TidingsError.from_rpc(e)
        with self._lock:
            self._ended = True
            self._error = error
            pending = [f for futures in self._pending.values() for f in futures]
            self._pending.clear()
        for future in pending:
            future.set_exception(error or StreamClosed("the stream ended before the broker answered"))
        self._deliveries.put(_END)

    def _resolve(self, outcome: subscriber_pb2.AckOutcome) -> None:
        with self._lock:
            futures = self._pending.get((outcome.operation, outcome.ack_id))
            future = futures.popleft() if futures else None
            if futures is not None and not futures:
                del self._pending[(outcome.operation, outcome.ack_id)]
        if future is None:
            return
        if outcome.result != subscriber_pb2.ACK_RESULT_OK:
            future.set_exception(AckRefused.from_outcome(outcome))
        elif outcome.operation == subscriber_pb2.ACK_OPERATION_EXTEND:
            future.set_result(outcome.lease_deadline.ToDatetime(tzinfo=timezone.utc))
        else:
            future.set_result(None)

    # -- iteration --------------------------------------------------------

    def receive(self, timeout: float | None = None) -> Delivery | None:
        """Waits for the next delivery.

        Args:
            timeout: Seconds to wait; ``None`` waits until one arrives or the
                stream ends.

        Returns:
            The delivery, or ``None`` on timeout or once the stream has
            ended after :meth:`close`.

        Raises:
            TidingsError: The stream failed.
        """
        try:
            item = self._deliveries.get(timeout=timeout)
        except queue.Empty:
            return None
        if item is _END:
            self._deliveries.put(_END)  # keep later calls returning at once
            if self._error is not None:
                raise self._error
            return None
        assert isinstance(item, Delivery)
        return item

    def __iter__(self) -> Iterator[Delivery]:
        while (delivery := self.receive()) is not None:
            yield delivery

    def close(self, timeout: float | None = 10.0) -> None:
        """Ends the stream once the broker has answered what was sent.

        Args:
            timeout: Seconds to wait for the broker to finish; after that the
                call is cancelled.
        """
        with self._lock:
            if not self._closed:
                self._closed = True
                self._requests.put(_CLOSE)
        self._reader.join(timeout)
        if self._reader.is_alive():
            self._call.cancel()
            self._reader.join()

    def __enter__(self) -> MessageStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

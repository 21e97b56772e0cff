"""Publishing: building messages and the pipelined publish stream."""

from __future__ import annotations

import collections
import queue
import threading
import uuid
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import Future
from datetime import datetime

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from tidings.errors import StreamClosed, TidingsError
from tidings.tracing import inject_trace_context
from tidings.v1 import message_pb2, publisher_pb2, publisher_pb2_grpc

Message = message_pb2.Message
PublishResult = publisher_pb2.PublishResult

_CLOSE = object()


def message(
    topic: str,
    payload: bytes | str,
    *,
    id: str | None = None,
    key: str = "",
    attributes: Mapping[str, str] | None = None,
    create_time: datetime | None = None,
) -> Message:
    """Builds a message to publish.

    Args:
        topic: The topic to publish to.
        payload: The body; ``str`` is encoded as UTF-8.
        id: The idempotency key, a UUID. A fresh random UUID when omitted.
            Keep the id when retrying: the broker stores a message id once per
            topic and answers a repeat with ``duplicate=True``.
        key: Optional ordering key (see ordered subscriptions).
        attributes: Optional string attributes. ``traceparent`` and
            ``tracestate`` are the W3C trace context: publishing fills them
            in from the current OpenTelemetry span unless ``traceparent`` is
            given (see :mod:`tidings.tracing`).
        create_time: When the producer created the message, e.g. the commit
            time of the outbox row.

    Returns:
        A ``tidings.v1.Message`` ready for :meth:`tidings.Client.publish`.
    """
    msg = Message(
        id=id or str(uuid.uuid4()),
        topic=topic,
        key=key,
        payload=payload.encode() if isinstance(payload, str) else payload,
        attributes=dict(attributes or {}),
    )
    if create_time is not None:
        stamp = Timestamp()
        stamp.FromDatetime(create_time)
        msg.create_time.CopyFrom(stamp)
    return msg


class PublishStream:
    """A pipelined publish stream (``PublishStream`` RPC).

    Each :meth:`publish` sends one batch and returns at once with a future of
    the batch's results; the broker answers the batches in order, each after
    its commit, while later batches are already on the way. At most
    ``max_in_flight`` batches are unanswered at a time: :meth:`publish` blocks
    while the window is full.

    Use it as a context manager; leaving the block waits for every answer::

        with client.publish_stream() as stream:
            futures = [stream.publish(batch) for batch in batches]
        results = [f.result() for f in futures]

    If the stream fails, every unanswered future fails with the
    :class:`~tidings.TidingsError` and later :meth:`publish` calls raise it.
    Republishing the unanswered batches (with the same ids) is safe.
    """

    def __init__(self, stub: publisher_pb2_grpc.PublisherServiceStub, max_in_flight: int = 16) -> None:
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        self._requests: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._pending: collections.deque[Future[list[PublishResult]]] = collections.deque()
        self._lock = threading.Lock()
        self._window = threading.BoundedSemaphore(max_in_flight)
        self._closed = False
        self._error: BaseException | None = None
        self._call = stub.PublishStream(self._request_iterator())
        self._reader = threading.Thread(target=self._read, name="tidings-publish-stream", daemon=True)
        self._reader.start()

    def _request_iterator(self) -> Iterator[publisher_pb2.PublishStreamRequest]:
        while True:
            item = self._requests.get()
            if item is _CLOSE:
                return
            assert isinstance(item, publisher_pb2.PublishStreamRequest)
            yield item

    def _read(self) -> None:
        error: BaseException = StreamClosed("the publish stream ended before answering")
        try:
            for response in self._call:
                with self._lock:
                    future = self._pending.popleft()
                self._window.release()
                future.set_result(list(response.results))
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.CANCELLED or not self._closed:
                error = TidingsError.from_rpc(e)
        except IndexError:
            error = StreamClosed("the broker answered more batches than were sent")
        with self._lock:
            self._error = error
            pending = list(self._pending)
            self._pending.clear()
        for future in pending:
            self._window.release()
            future.set_exception(error)

    def publish(self, messages: Iterable[Message]) -> Future[list[PublishResult]]:
        """Sends one batch (one commit on the broker).

        Messages without a ``traceparent`` attribute get the trace context
        of the span current in the calling thread (see :mod:`tidings.tracing`).

        Args:
            messages: Messages to publish, each naming its topic.

        Returns:
            A future of the results, one per message in order, resolved when
            the broker has committed the batch.

        Raises:
            TidingsError: The stream failed earlier.
            StreamClosed: The stream was closed.
        """
        # The request holds copies: the trace context goes into those, in
        # the caller's thread, whose current span is the publisher's.
        request = publisher_pb2.PublishStreamRequest(messages=list(messages))
        inject_trace_context(request.messages)
        self._window.acquire()
        with self._lock:
            if self._error is not None or self._closed:
                self._window.release()
                raise self._error or StreamClosed("the publish stream is closed")
            future: Future[list[PublishResult]] = Future()
            future.set_running_or_notify_cancel()
            self._pending.append(future)
            self._requests.put(request)
        return future

    def close(self, timeout: float | None = 30.0) -> None:
        """Ends the stream after the broker has answered every batch sent.

        Args:
            timeout: Seconds to wait for the outstanding answers; after that
                the call is cancelled and unanswered futures fail.
        """
        with self._lock:
            if not self._closed:
                self._closed = True
                self._requests.put(_CLOSE)
        self._reader.join(timeout)
        if self._reader.is_alive():
            self._call.cancel()
            self._reader.join()

    def __enter__(self) -> PublishStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

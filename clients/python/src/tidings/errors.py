"""Exceptions raised by the tidings client."""

from __future__ import annotations

import grpc

from tidings.v1 import subscriber_pb2


class TidingsError(Exception):
    """A call to the broker failed with a gRPC status.

    Attributes:
        code: The gRPC status code, e.g. ``grpc.StatusCode.INVALID_ARGUMENT``.
        message: The broker's description of the problem.
    """

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message

    @property
    def retryable(self) -> bool:
        """True when the same call may succeed if tried again (the broker is
        draining, restarting or briefly unreachable)."""
        return self.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)

    @classmethod
    def from_rpc(cls, error: grpc.RpcError) -> TidingsError:
        """Builds a ``TidingsError`` from the ``grpc.RpcError`` of a failed call."""
        code = error.code() if hasattr(error, "code") else None
        details = error.details() if hasattr(error, "details") else None
        return cls(code or grpc.StatusCode.UNKNOWN, details or str(error))


class AckRefused(Exception):
    """The broker refused an ack, nack or lease extension sent on a stream.

    ``STALE``: the lease had expired or the message was leased again since, so
    the message will be (or was) delivered again. ``UNKNOWN``: no such
    delivery (malformed ack id, already acked, or purged).

    Attributes:
        ack_id: The refused ack id.
        operation: ``"ack"``, ``"nack"`` or ``"extend"``.
        result: ``"STALE"`` or ``"UNKNOWN"``.
        detail: The broker's explanation.
    """

    def __init__(self, ack_id: str, operation: str, result: str, detail: str) -> None:
        super().__init__(f"{operation} refused ({result}): {detail}")
        self.ack_id = ack_id
        self.operation = operation
        self.result = result
        self.detail = detail

    @classmethod
    def from_outcome(cls, outcome: subscriber_pb2.AckOutcome) -> AckRefused:
        """Builds the exception from a refused ``AckOutcome``."""
        operation = subscriber_pb2.AckOperation.Name(outcome.operation)
        result = subscriber_pb2.AckResult.Name(outcome.result)
        return cls(
            outcome.ack_id,
            operation.removeprefix("ACK_OPERATION_").lower(),
            result.removeprefix("ACK_RESULT_"),
            outcome.detail,
        )


class StreamClosed(Exception):
    """The stream ended before the broker answered this operation."""

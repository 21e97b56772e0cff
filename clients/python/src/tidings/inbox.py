"""The idempotent inbox: process each message once with a SQL database.

The broker delivers at least once: a message is redelivered when its ack is
lost, late, or the consumer crashes between its database commit and the ack.
The inbox makes the effect exactly once by recording each processed message
id in the same transaction as the handler's writes, in the table the Rust
crate ships (``migrations/inbox/``), so that consumers in any language can
share it and prune it by the broker's ``ack_watermark``::

    CREATE TABLE tidings_inbox (
        subscription TEXT NOT NULL,
        message_id   TEXT NOT NULL,
        sequence     BIGINT NOT NULL,
        processed_at TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP,
        PRIMARY KEY (subscription, message_id)
    );
    CREATE INDEX tidings_inbox_sequence ON tidings_inbox (subscription, sequence);

For each delivery: insert the id first (a conflict means it was processed
already: skip the handler), run the handler with the same connection and
transaction, commit, then ack. A handler error rolls back and nacks the
delivery with the error as reason.

With OpenTelemetry installed (the ``otel`` extra), each delivery is handled
in a ``process <topic>`` consumer span whose parent is the producer's span,
from the message's ``traceparent`` attribute (see :mod:`tidings.tracing`).
"""

from __future__ import annotations

import enum
import logging
import re
import sqlite3
import sys
from collections.abc import Callable
from typing import Any

from tidings import tracing
from tidings.subscriber import Delivery

log = logging.getLogger("tidings.inbox")

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?$")

_PLACEHOLDERS = {
    "qmark": ("?", "?", "?"),
    "format": ("%s", "%s", "%s"),
    "pyformat": ("%s", "%s", "%s"),
    "numeric": (":1", ":2", ":3"),
    "named": (":subscription", ":message_id", ":sequence"),
}


class InboxResult(enum.Enum):
    """What :meth:`Inbox.handle` did with a delivery."""

    PROCESSED = "processed"
    """The handler ran and its writes were committed; the delivery was acked."""
    DUPLICATE = "duplicate"
    """The message id was already recorded: the handler was skipped and the
    delivery acked."""
    FAILED = "failed"
    """The handler raised: its writes were rolled back and the delivery
    nacked with the error as reason."""


def _paramstyle(connection: Any) -> str:
    module = sys.modules.get(type(connection).__module__.split(".")[0])
    style = getattr(module, "paramstyle", "qmark")
    if style not in _PLACEHOLDERS:
        raise ValueError(f"unsupported DB-API paramstyle {style!r}")
    return style


class Inbox:
    """Exactly-once processing of a subscription's messages on one DB-API
    connection (``sqlite3``, ``psycopg`` 3, ``psycopg2``, ...).

    The connection must be in transactional mode (not autocommit) and is
    used for one delivery at a time; use one inbox per connection and per
    thread.

    Args:
        connection: A DB-API 2.0 connection.
        subscription: The subscription whose message ids are recorded (the
            same message may be processed once per subscription).
        table: Name of the inbox table.

    Example::

        inbox = tidings.Inbox(conn, "billing")
        inbox.create_table()
        with client.subscribe("billing") as stream:
            for delivery in stream:
                inbox.handle(delivery, charge)  # charge(delivery, conn)
    """

    def __init__(self, connection: Any, subscription: str, *, table: str = "tidings_inbox") -> None:
        if not _IDENTIFIER.match(table):
            raise ValueError(f"table {table!r} is not a plain SQL identifier")
        if isinstance(connection, sqlite3.Connection) and connection.isolation_level is None:
            raise ValueError("the sqlite3 connection is in autocommit mode (isolation_level=None)")
        if getattr(connection, "autocommit", False) is True:
            raise ValueError("the connection is in autocommit mode")
        self.connection = connection
        self.subscription = subscription
        self.table = table
        self._style = _paramstyle(connection)
        sub, mid, seq = _PLACEHOLDERS[self._style]
        self._insert = (
            f"INSERT INTO {table} (subscription, message_id, sequence) VALUES ({sub}, {mid}, {seq}) "
            "ON CONFLICT (subscription, message_id) DO NOTHING"
        )
        self._select = f"SELECT 1 FROM {table} WHERE subscription = {sub} AND message_id = {mid}"

    def _params(self, message_id: str, sequence: int | None = None) -> Any:
        if self._style == "named":
            named = {"subscription": self.subscription, "message_id": message_id}
            if sequence is not None:
                named["sequence"] = sequence
            return named
        if sequence is None:
            return (self.subscription, message_id)
        return (self.subscription, message_id, sequence)

    def create_table(self) -> None:
        """Creates the inbox table and its index if they do not exist, and
        commits. The crate's ``migrations/inbox/`` make the same table."""
        cursor = self.connection.cursor()
        try:
            cursor.execute(
                f"CREATE TABLE IF NOT EXISTS {self.table} ("
                "subscription TEXT NOT NULL, "
                "message_id TEXT NOT NULL, "
                "sequence BIGINT NOT NULL, "
                "processed_at TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP, "
                "PRIMARY KEY (subscription, message_id))"
            )
            index = self.table.replace(".", "_") + "_sequence"
            cursor.execute(f"CREATE INDEX IF NOT EXISTS {index} ON {self.table} (subscription, sequence)")
        finally:
            cursor.close()
        self.connection.commit()

    def processed(self, message_id: str) -> bool:
        """Whether the message id is recorded as processed (reads in the
        connection's current transaction)."""
        cursor = self.connection.cursor()
        try:
            cursor.execute(self._select, self._params(message_id))
            return cursor.fetchone() is not None
        finally:
            cursor.close()

    def handle(self, delivery: Delivery, handler: Callable[[Delivery, Any], object]) -> InboxResult:
        """Processes one delivery at most once.

        Args:
            delivery: The delivery from a :class:`~tidings.MessageStream`.
            handler: Called as ``handler(delivery, connection)`` inside the
                transaction that records the message id; it must not commit
                or roll back. Raising makes the delivery fail. With
                OpenTelemetry, it runs in the delivery's ``process <topic>``
                span, a child of the producer's span.

        Returns:
            What happened (see :class:`InboxResult`). The ack or nack is sent
            without waiting for its outcome: if it is lost or refused as
            stale, the message comes again and is skipped as a duplicate.

        Raises:
            Exception: Database errors of the inbox's own statements or of
                the commit, after rolling back; the delivery is then left to
                be redelivered.
        """
        with tracing.consumer_span(delivery, self.subscription) as span:
            result = self._handle(delivery, handler, span)
            if span is not None:
                span.set_attribute("tidings.inbox.result", result.value)
            return result

    def _handle(
        self, delivery: Delivery, handler: Callable[[Delivery, Any], object], span: tracing.Span | None
    ) -> InboxResult:
        conn = self.connection
        try:
            cursor = conn.cursor()
            try:
                cursor.execute(self._insert, self._params(delivery.id, delivery.sequence))
                inserted = cursor.rowcount == 1
            finally:
                cursor.close()
        except BaseException:
            conn.rollback()
            raise
        if not inserted:
            conn.rollback()
            delivery.ack()
            return InboxResult.DUPLICATE
        try:
            handler(delivery, conn)
        except Exception as e:  # the handler's failure is the message's
            conn.rollback()
            log.warning("handler failed for message %s (attempt %d): %s", delivery.id, delivery.attempt, e)
            tracing.mark_failed(span, e)
            delivery.nack(reason=f"{type(e).__name__}: {e}")
            return InboxResult.FAILED
        except BaseException:
            conn.rollback()
            raise
        try:
            conn.commit()
        except BaseException:
            conn.rollback()
            raise
        delivery.ack()
        return InboxResult.PROCESSED

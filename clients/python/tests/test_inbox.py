"""The inbox: each message processed once, in the handler's transaction,
with sqlite3 and with PostgreSQL through psycopg."""

from __future__ import annotations

import os
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

import tidings
from tidings.v1 import admin_pb2

# PostgreSQL for the psycopg case: TIDINGS_TEST_POSTGRES (a libpq connection
# string) or the local server; skipped when unreachable unless the variable
# is set.
POSTGRES_DSN = os.environ.get("TIDINGS_TEST_POSTGRES", "host=127.0.0.1 port=5432 user=postgres dbname=test")


@dataclass
class Database:
    """A connection plus what the test needs to write its own table."""

    connection: Any
    placeholder: str
    inbox_table: str
    ledger: str


@pytest.fixture(params=["sqlite3", "psycopg"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    if request.param == "sqlite3":
        conn = sqlite3.connect(tmp_path / "app.db")
        conn.execute("PRAGMA journal_mode=WAL")
        yield Database(conn, "?", "tidings_inbox", "ledger")
        conn.close()
        return
    psycopg = pytest.importorskip("psycopg")
    try:
        conn = psycopg.connect(POSTGRES_DSN, connect_timeout=5)
    except psycopg.OperationalError as e:
        if "TIDINGS_TEST_POSTGRES" in os.environ:
            raise
        pytest.skip(f"PostgreSQL not reachable: {e}")
    suffix = uuid.uuid4().hex[:12]
    database = Database(conn, "%s", f"tidings_inbox_{suffix}", f"ledger_{suffix}")
    yield database
    conn.rollback()
    conn.execute(f"DROP TABLE IF EXISTS {database.inbox_table}")
    conn.execute(f"DROP TABLE IF EXISTS {database.ledger}")
    conn.commit()
    conn.close()


class DroppedAck:
    """A delivery whose ack is lost, as when the consumer crashes right
    after its commit: the broker redelivers it once the lease ends."""

    def __init__(self, delivery: tidings.Delivery) -> None:
        self._delivery = delivery

    def __getattr__(self, name: str) -> Any:
        return getattr(self._delivery, name)

    def ack(self) -> None:
        pass


def count(db: Database, sql: str, *params: object) -> int:
    cursor = db.connection.cursor()
    cursor.execute(sql, params)
    (n,) = cursor.fetchone()
    cursor.close()
    return n


def test_each_message_is_processed_once_despite_redeliveries(client: tidings.Client, db: Database) -> None:
    client.create_topic("payments")
    client.create_subscription(
        "ledger",
        "payments",
        start="earliest",
        ack_deadline=timedelta(milliseconds=300),
        min_backoff=timedelta(milliseconds=10),
    )
    sent = client.publish([tidings.message("payments", str(amount)) for amount in range(1, 7)])
    ids = {r.id for r in sent}

    conn = db.connection
    cursor = conn.cursor()
    cursor.execute(f"CREATE TABLE {db.ledger} (message_id TEXT NOT NULL, amount INTEGER NOT NULL)")
    cursor.close()
    conn.commit()
    inbox = tidings.Inbox(conn, "ledger", table=db.inbox_table)
    inbox.create_table()

    def book(delivery: tidings.Delivery, connection: Any) -> None:
        amount = int(delivery.payload)
        cur = connection.cursor()
        cur.execute(
            f"INSERT INTO {db.ledger} (message_id, amount) VALUES ({db.placeholder}, {db.placeholder})",
            (delivery.id, amount),
        )
        cur.close()
        if amount == 3 and delivery.attempt == 1:
            raise ValueError("card declined")  # after a write: it must be rolled back

    outcomes: list[tuple[int, int, tidings.InboxResult]] = []
    done = False
    deadline = time.monotonic() + 20
    with client.subscribe("ledger") as stream:
        while time.monotonic() < deadline:
            delivery = stream.receive(timeout=0.7 if done else 5)
            if delivery is None:
                if done:
                    break  # quiet: nothing more is redelivered
                continue
            amount = int(delivery.payload)
            target = DroppedAck(delivery) if amount == 5 and delivery.attempt == 1 else delivery
            outcomes.append((amount, delivery.attempt, inbox.handle(target, book)))
            done = {(5, 2, tidings.InboxResult.DUPLICATE), (3, 2, tidings.InboxResult.PROCESSED)} <= set(outcomes)

    P, D, F = tidings.InboxResult.PROCESSED, tidings.InboxResult.DUPLICATE, tidings.InboxResult.FAILED
    assert sorted(outcomes) == [(1, 1, P), (2, 1, P), (3, 1, F), (3, 2, P), (4, 1, P), (5, 1, P), (5, 2, D), (6, 1, P)]

    # One ledger row per message, the failed attempt's write rolled back.
    assert count(db, f"SELECT COUNT(*) FROM {db.ledger}") == 6
    assert count(db, f"SELECT COUNT(DISTINCT message_id) FROM {db.ledger}") == 6
    assert count(db, f"SELECT SUM(amount) FROM {db.ledger}") == 21
    assert count(db, f"SELECT COUNT(*) FROM {db.inbox_table} WHERE subscription = {db.placeholder}", "ledger") == 6
    assert all(inbox.processed(i) for i in ids)
    conn.rollback()
    stats = client.subscription_stats("ledger")
    assert (stats.acked, stats.backlog, stats.redelivered) == (6, 0, 2)


def test_a_failing_handler_nacks_with_the_error_as_reason(client: tidings.Client, db: Database) -> None:
    client.create_topic("payments")
    client.create_subscription("ledger", "payments", start="earliest", max_attempts=1)
    [sent] = client.publish([tidings.message("payments", "x")])
    inbox = tidings.Inbox(db.connection, "ledger", table=db.inbox_table)
    inbox.create_table()

    def fail(delivery: tidings.Delivery, connection: Any) -> None:
        raise RuntimeError("ledger is closed")

    with client.subscribe("ledger") as stream:
        delivery = stream.receive(timeout=10)
        assert delivery is not None
        assert inbox.handle(delivery, fail) is tidings.InboxResult.FAILED

    assert not inbox.processed(sent.id), "the inbox row was rolled back"
    db.connection.rollback()
    # With max_attempts=1 the nack dead-letters the message, keeping the reason.
    letters = wait_for(lambda: client.admin.ListDeadLetters(admin_pb2.ListDeadLettersRequest(subscription="ledger")))
    [letter] = letters.dead_letters
    assert letter.message.id == sent.id
    assert letter.last_failure_reason == "RuntimeError: ledger is closed"


def test_the_same_message_is_processed_once_per_subscription(client: tidings.Client, tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "app.db")
    client.create_topic("t")
    for name in ("a", "b"):
        client.create_subscription(name, "t", start="earliest")
    [sent] = client.publish([tidings.message("t", "x")])
    handled = []
    for name in ("a", "b"):
        inbox = tidings.Inbox(conn, name)
        inbox.create_table()
        with client.subscribe(name) as stream:
            delivery = stream.receive(timeout=10)
            assert delivery is not None and delivery.id == sent.id
            result = inbox.handle(delivery, lambda d, c, name=name: handled.append(name))
            assert result is tidings.InboxResult.PROCESSED
    assert handled == ["a", "b"]
    conn.close()


def test_autocommit_connections_are_refused(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "app.db", isolation_level=None)
    with pytest.raises(ValueError, match="autocommit"):
        tidings.Inbox(conn, "s")
    with pytest.raises(ValueError, match="identifier"):
        tidings.Inbox(sqlite3.connect(":memory:"), "s", table="inbox; DROP TABLE x")
    conn.close()


def wait_for(fetch: Callable[[], Any], timeout: float = 10.0) -> Any:
    """Polls ``fetch`` until its result has dead letters."""
    deadline = time.monotonic() + timeout
    while True:
        result = fetch()
        if result.dead_letters or time.monotonic() > deadline:
            return result
        time.sleep(0.05)


def test_the_table_is_the_one_the_crate_ships(tmp_path: Path) -> None:
    # A consumer in Python and one in Rust may share a database: the crate's
    # migration runs cleanly on a table this helper made, and the other way
    # round, and rows carry the sequence number pruning needs.
    migration = Path(__file__).parents[3] / "migrations" / "inbox" / "sqlite.sql"
    first = sqlite3.connect(tmp_path / "python-first.db")
    tidings.Inbox(first, "billing").create_table()
    first.executescript(migration.read_text())
    second = sqlite3.connect(tmp_path / "crate-first.db")
    second.executescript(migration.read_text())
    tidings.Inbox(second, "billing").create_table()
    for conn in (first, second):
        columns = [row[1] for row in conn.execute("PRAGMA table_info(tidings_inbox)")]
        assert columns == ["subscription", "message_id", "sequence", "processed_at"]
        conn.close()

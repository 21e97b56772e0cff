#!/usr/bin/env python3
"""Service A of the example: an orders service in Python, standard library only.

Each order is written together with its notification, in one transaction:
a row in `orders` and a row in `tidings_outbox` (plain SQL, no tidings
library). `tidings relay --database-url sqlite://A.db` moves the outbox to
the broker. The message is "ORDER_ID CUSTOMER N" with the customer as its
ordering key; N counts each customer's orders from 1.

Runs until SIGTERM or Ctrl-C (or --count orders), then prints how many
orders it committed.
"""

import argparse
import os
import random
import signal
import sqlite3
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
MIGRATION = os.path.join(HERE, "..", "migrations", "outbox", "sqlite.sql")

SCHEMA = """
CREATE TABLE IF NOT EXISTS orders (
    id       TEXT PRIMARY KEY,
    customer TEXT NOT NULL,
    n        INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS customers (
    customer TEXT PRIMARY KEY,
    n        INTEGER NOT NULL
);
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", required=True, help="SQLite file of service A")
    parser.add_argument("--rate", type=float, default=200.0, help="orders per second")
    parser.add_argument("--customers", type=int, default=20)
    parser.add_argument("--count", type=int, default=0, help="stop after this many (0: never)")
    args = parser.parse_args()

    stopping = False

    def stop(_signum, _frame):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    # Autocommit mode: the transactions below are explicit.
    db = sqlite3.connect(args.db, timeout=30, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    with open(MIGRATION, encoding="utf-8") as f:
        db.executescript(f.read())
    db.executescript(SCHEMA)

    committed = 0
    started = time.monotonic()
    while not stopping and (args.count == 0 or committed < args.count):
        customer = f"customer-{random.randrange(args.customers)}"
        order_id = str(uuid.uuid4())
        db.execute("BEGIN IMMEDIATE")
        try:
            (n,) = db.execute(
                "INSERT INTO customers (customer, n) VALUES (?, 1) "
                "ON CONFLICT (customer) DO UPDATE SET n = n + 1 RETURNING n",
                (customer,),
            ).fetchone()
            db.execute(
                "INSERT INTO orders (id, customer, n) VALUES (?, ?, ?)",
                (order_id, customer, n),
            )
            # The notification, in the same transaction as the order.
            db.execute(
                "INSERT INTO tidings_outbox (topic, key, payload) VALUES ('orders', ?, ?)",
                (customer, f"{order_id} {customer} {n}".encode()),
            )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        committed += 1
        pause = started + committed / args.rate - time.monotonic()
        if pause > 0:
            time.sleep(pause)
    print(f"committed {committed} orders", flush=True)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Compares service A's orders with service B's shipments.

Waits (up to --wait seconds) until A's outbox is empty and B has caught up,
then prints what was lost, doubled, invented and reordered, and exits 1
unless all four are 0.
"""

import argparse
import sqlite3
import sys
import time


def counts(a: str, b: str):
    with sqlite3.connect(a, timeout=30) as da, sqlite3.connect(b, timeout=30) as db:
        orders = {row[0] for row in da.execute("SELECT id FROM orders")}
        pending = da.execute("SELECT count(*) FROM tidings_outbox").fetchone()[0]
        shipped = [row[0] for row in db.execute("SELECT order_id FROM shipments")]
        violations = db.execute("SELECT count(*) FROM order_violations").fetchone()[0]
    return orders, pending, shipped, violations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--orders", required=True, help="service A's SQLite file")
    parser.add_argument("--shipments", required=True, help="service B's SQLite file")
    parser.add_argument("--wait", type=float, default=0.0)
    args = parser.parse_args()

    deadline = time.monotonic() + args.wait
    while True:
        orders, pending, shipped, violations = counts(args.orders, args.shipments)
        caught_up = pending == 0 and set(shipped) >= orders
        if caught_up or time.monotonic() >= deadline:
            break
        time.sleep(0.5)

    distinct = set(shipped)
    lost = len(orders - distinct)
    doubled = len(shipped) - len(distinct)
    invented = len(distinct - orders)
    print(
        f"orders: {len(orders)}, shipments: {len(shipped)}, outbox pending: {pending}, "
        f"lost: {lost}, doubled: {doubled}, invented: {invented}, out of order: {violations}"
    )
    sys.exit(0 if (lost, doubled, invented, violations) == (0, 0, 0, 0) and orders else 1)


if __name__ == "__main__":
    main()

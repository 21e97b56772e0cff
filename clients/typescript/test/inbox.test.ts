/** The inbox with better-sqlite3: each message processed once, in the handler's transaction. */
import assert from "node:assert/strict";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import Database from "better-sqlite3";
import { Inbox, InboxResult, message, type Delivery } from "../src/index.js";
import { TEST_TIMEOUT, text, withBroker } from "./support/harness.js";

/** A fresh on-disk SQLite database, removed after `body`. */
async function withDatabase(body: (db: Database.Database) => Promise<void>): Promise<void> {
  const dir = mkdtempSync(join(tmpdir(), "tidings-inbox-"));
  const db = new Database(join(dir, "app.db"));
  db.pragma("journal_mode = WAL");
  try {
    await body(db);
  } finally {
    db.close();
    rmSync(dir, { recursive: true, force: true });
  }
}

/**
 * A delivery whose ack is lost, as when the consumer stops right after its
 * commit: the broker redelivers it once the lease ends.
 */
function droppingAck(delivery: Delivery): Delivery {
  return new Proxy(delivery, {
    get(target, property, receiver) {
      if (property === "ack") return () => Promise.resolve();
      const value = Reflect.get(target, property, receiver);
      return typeof value === "function" ? value.bind(target) : value;
    },
  });
}

test("each message is processed once despite redeliveries", { timeout: TEST_TIMEOUT }, () =>
  withBroker((client) =>
    withDatabase(async (db) => {
      await client.createTopic("payments");
      await client.createSubscription("ledger", "payments", { start: "earliest", ackDeadlineMs: 300, minBackoffMs: 10 });
      const sent = await client.publish([1, 2, 3, 4, 5, 6].map((amount) => message("payments", String(amount))));

      db.exec("CREATE TABLE ledger (message_id TEXT NOT NULL, amount INTEGER NOT NULL)");
      const inbox = new Inbox(db, "ledger");
      inbox.createTable();
      const book = db.prepare("INSERT INTO ledger (message_id, amount) VALUES (?, ?)");

      const outcomes: string[] = [];
      const stream = client.subscribe("ledger");
      const deadline = Date.now() + 20_000;
      let done = false;
      while (Date.now() < deadline) {
        const delivery = await stream.receive(done ? 700 : 5000);
        if (!delivery) {
          if (done) break; // quiet: nothing more is redelivered
          continue;
        }
        const amount = Number(text(delivery.payload));
        const target = amount === 5 && delivery.attempt === 1 ? droppingAck(delivery) : delivery;
        const result = await inbox.handle(target, async (d) => {
          book.run(d.id, amount);
          await new Promise((resolve) => setImmediate(resolve)); // async handlers are fine
          if (amount === 3 && d.attempt === 1) throw new Error("card declined"); // after a write: rolled back
        });
        outcomes.push(`${amount}/${delivery.attempt}/${result}`);
        done = outcomes.includes("5/2/duplicate") && outcomes.includes("3/2/processed");
      }
      await stream.close();

      assert.deepEqual(outcomes.sort(), [
        "1/1/processed",
        "2/1/processed",
        "3/1/failed",
        "3/2/processed",
        "4/1/processed",
        "5/1/processed",
        "5/2/duplicate",
        "6/1/processed",
      ]);
      const row = db.prepare("SELECT COUNT(*) AS n, COUNT(DISTINCT message_id) AS ids, SUM(amount) AS total FROM ledger").get();
      assert.deepEqual(row, { n: 6, ids: 6, total: 21 });
      assert.equal((db.prepare("SELECT COUNT(*) AS n FROM tidings_inbox WHERE subscription = 'ledger'").get() as { n: number }).n, 6);
      assert.ok(sent.every((r) => inbox.processed(r.id)));
      const stats = await client.subscriptionStats("ledger");
      assert.deepEqual([stats.acked, stats.backlog, stats.redelivered], [6n, 0n, 2n]);
    }),
  ),
);

test("a failing handler nacks with the error as reason", { timeout: TEST_TIMEOUT }, () =>
  withBroker((client) =>
    withDatabase(async (db) => {
      await client.createTopic("payments");
      await client.createSubscription("ledger", "payments", { start: "earliest", maxAttempts: 1 });
      const [sent] = await client.publish([message("payments", "x")]);
      const inbox = new Inbox(db, "ledger");
      inbox.createTable();

      const stream = client.subscribe("ledger");
      const delivery = await stream.receive(10_000);
      assert.ok(delivery);
      const result = await inbox.handle(delivery, () => {
        throw new RangeError("ledger is closed");
      });
      assert.equal(result, InboxResult.Failed);
      await stream.close();
      assert.equal(inbox.processed(sent.id), false, "the inbox row was rolled back");
      assert.equal(db.inTransaction, false);

      // With maxAttempts 1 the nack dead-letters the message, keeping the reason.
      let letters = await client.admin.listDeadLetters({ subscription: "ledger" });
      for (let i = 0; i < 100 && letters.deadLetters.length === 0; i++) {
        await new Promise((resolve) => setTimeout(resolve, 50));
        letters = await client.admin.listDeadLetters({ subscription: "ledger" });
      }
      assert.equal(letters.deadLetters.length, 1);
      assert.equal(letters.deadLetters[0].message?.id, sent.id);
      assert.equal(letters.deadLetters[0].lastFailureReason, "RangeError: ledger is closed");
    }),
  ),
);

test("a bad table name is refused", () => {
  const db = new Database(":memory:");
  assert.throws(() => new Inbox(db, "s", "inbox; DROP TABLE x"), RangeError);
  db.close();
});

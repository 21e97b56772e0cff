/**
 * A client without `@opentelemetry/api` (test/trace-optional.test.ts runs
 * it with a preload that makes the package unresolvable): publishing, the
 * publish stream and the inbox work and add no trace context, and
 * `messageContext` says what to install. Prints `ok`; exits non-zero on any
 * failure.
 *
 *   node dist/test/support/untraced.js '{"baseUrl": "http://127.0.0.1:PORT", ...}'
 *
 * The argument is the JSON of the `TidingsClient` options.
 */
import assert from "node:assert/strict";
import { createRequire } from "node:module";
import Database from "better-sqlite3";
import { Inbox, InboxResult, TidingsClient, message, messageContext } from "../../src/index.js";

assert.throws(() => createRequire(import.meta.url).resolve("@opentelemetry/api"), "require cannot find the API");
await assert.rejects(import("@opentelemetry/api"), "import cannot find the API");

const client = new TidingsClient(JSON.parse(process.argv[2]));
try {
  await client.createTopic("orders");
  await client.createSubscription("billing", "orders", { start: "earliest" });
  await client.publish([message("orders", "unary")]);
  const stream = client.publishStream();
  await stream.publish([message("orders", "streamed")]);
  await stream.close();

  const db = new Database(":memory:");
  const inbox = new Inbox(db, "billing");
  inbox.createTable();
  const subscription = client.subscribe("billing");
  for (let i = 0; i < 2; i++) {
    const delivery = await subscription.receive(10_000);
    assert.ok(delivery, "a delivery arrived");
    assert.deepEqual(delivery.message.attributes, {});
    assert.equal(await inbox.handle(delivery, () => undefined), InboxResult.Processed);
    assert.throws(() => messageContext(delivery), /npm install @opentelemetry\/api/);
  }
  await subscription.close();
  db.close();
  console.log("ok");
} finally {
  client.close();
}

/** Publishing: idempotent ids, batches, the pipelined stream, bad input. */
import assert from "node:assert/strict";
import { randomUUID } from "node:crypto";
import { test } from "node:test";
import { create } from "@bufbuild/protobuf";
import { Code, ConnectError, message } from "../src/index.js";
import { MessageSchema } from "../src/gen/tidings/v1/message_pb.js";
import { TEST_TIMEOUT, withBroker } from "./support/harness.js";

test("a retried id is a duplicate with the original sequence", { timeout: TEST_TIMEOUT }, () =>
  withBroker(async (client) => {
    await client.createTopic("orders");
    const batch = [0, 1, 2].map((i) => message("orders", `order ${i}`));

    const first = await client.publish(batch);
    assert.deepEqual(
      first.map((r) => r.id),
      batch.map((m) => m.id),
    );
    assert.deepEqual(
      first.map((r) => r.sequence),
      [1n, 2n, 3n],
    );
    assert.ok(first.every((r) => !r.duplicate));

    // The producer retries the same batch: nothing new is stored.
    const retried = await client.publish(batch);
    assert.deepEqual(
      retried.map((r) => [r.duplicate, r.sequence]),
      [
        [true, 1n],
        [true, 2n],
        [true, 3n],
      ],
    );

    const mixed = await client.publish([batch[0], message("orders", "order 3")]);
    assert.deepEqual(
      mixed.map((r) => [r.duplicate, r.sequence]),
      [
        [true, 1n],
        [false, 4n],
      ],
    );
    const { topic } = await client.admin.getTopic({ name: "orders" });
    assert.equal(topic?.lastSequence, 4n);
  }),
);

test("the same id on another topic is a new message", { timeout: TEST_TIMEOUT }, () =>
  withBroker(async (client) => {
    await client.createTopic("a");
    await client.createTopic("b");
    const id = randomUUID();
    const results = await client.publish([message("a", "x", { id }), message("b", "x", { id })]);
    assert.deepEqual(
      results.map((r) => [r.sequence, r.duplicate]),
      [
        [1n, false],
        [1n, false],
      ],
    );
  }),
);

test("the publish stream answers batches in order and dedups", { timeout: TEST_TIMEOUT }, () =>
  withBroker(async (client) => {
    await client.createTopic("events");
    const batches = Array.from({ length: 20 }, (_, b) =>
      Array.from({ length: 50 }, (_, i) => message("events", `${b}/${i}`, { key: `k${i % 3}` })),
    );
    const stream = client.publishStream(4);
    const answers = batches.map((batch) => stream.publish(batch));
    const again = stream.publish(batches[3]);
    await stream.close();
    const results = await Promise.all(answers);
    assert.deepEqual(
      results.flat().map((r) => r.sequence),
      Array.from({ length: 1000 }, (_, i) => BigInt(i + 1)),
    );
    assert.deepEqual(
      results[7].map((r) => r.id),
      batches[7].map((m) => m.id),
    );
    const repeated = await again;
    assert.ok(repeated.every((r) => r.duplicate));
    assert.deepEqual(
      repeated.map((r) => r.sequence),
      results[3].map((r) => r.sequence),
    );
  }),
);

test("a bad batch on the stream rejects with the status", { timeout: TEST_TIMEOUT }, () =>
  withBroker(async (client) => {
    await client.createTopic("events");
    const stream = client.publishStream();
    const ok = stream.publish([message("events", "fine")]);
    const bad = stream.publish([message("events", "x", { id: "nope" })]);
    assert.equal((await ok)[0].sequence, 1n);
    await assert.rejects(bad, (e: unknown) => {
      const err = ConnectError.from(e);
      assert.equal(err.code, Code.InvalidArgument);
      assert.match(err.rawMessage, /request 1: .*not a UUID/);
      return true;
    });
    await stream.close();
  }),
);

test("bad input is refused with a status naming the problem", { timeout: TEST_TIMEOUT }, () =>
  withBroker(async (client) => {
    await client.createTopic("orders");

    await assert.rejects(client.publish([message("orders", "x", { id: "not-a-uuid" })]), (e: unknown) => {
      assert.ok(e instanceof ConnectError);
      assert.equal(e.code, Code.InvalidArgument);
      assert.match(e.rawMessage, /not a UUID/);
      assert.match(e.rawMessage, /not-a-uuid/);
      return true;
    });

    // A batch with one bad message stores none of it.
    const good = message("orders", "ok");
    const noId = create(MessageSchema, { topic: "orders", payload: new TextEncoder().encode("no id") });
    await assert.rejects(client.publish([good, noId]), { code: Code.InvalidArgument });
    assert.equal((await client.publish([good]))[0].duplicate, false);

    await assert.rejects(client.publish([message("no-such-topic", "x")]), (e: unknown) => {
      const err = ConnectError.from(e);
      assert.equal(err.code, Code.NotFound);
      assert.match(err.rawMessage, /no-such-topic/);
      return true;
    });
    await assert.rejects(client.createTopic("bad name!"), { code: Code.InvalidArgument });
    await assert.rejects(client.createTopic("orders"), { code: Code.AlreadyExists });
    assert.equal((await client.createTopic("orders", { existOk: true })).lastSequence, 1n);
    await client.createSubscription("billing", "orders", { ackDeadlineMs: 7000 });
    const again = await client.createSubscription("billing", "orders", { ackDeadlineMs: 1000, existOk: true });
    assert.equal(again.ackDeadline?.seconds, 7n, "the stored settings are returned");
    await assert.rejects(client.createSubscription("shipping", "no-such-topic"), { code: Code.NotFound });
  }),
);

/** Subscribing: stream acks, nack redelivery, stale acks, lease extension. */
import assert from "node:assert/strict";
import { test } from "node:test";
import { AckRefused, Code, ConnectError, StreamClosed, message, type Delivery, type MessageStream } from "../src/index.js";
import { MessageState } from "../src/gen/tidings/v1/subscriber_pb.js";
import { TEST_TIMEOUT, sleep, text, withBroker } from "./support/harness.js";

/** Waits up to 10 s for the next delivery. */
async function receive(stream: MessageStream): Promise<Delivery> {
  const delivery = await stream.receive(10_000);
  assert.ok(delivery, "a delivery within 10 s");
  return delivery;
}

test("a stream delivers every message and acks commit", { timeout: TEST_TIMEOUT }, () =>
  withBroker(async (client) => {
    await client.createTopic("orders");
    await client.createSubscription("billing", "orders", { start: "earliest" });
    const sent = await client.publish(
      [0, 1, 2, 3, 4].map((i) => message("orders", `order ${i}`, { attributes: { n: String(i) } })),
    );

    const stream = client.subscribe("billing");
    const deliveries: Delivery[] = [];
    for await (const delivery of stream) {
      deliveries.push(delivery);
      if (deliveries.length === 5) break;
    }
    assert.deepEqual(
      deliveries.map((d) => d.id),
      sent.map((r) => r.id),
    );
    assert.deepEqual(
      deliveries.map((d) => d.sequence),
      sent.map((r) => r.sequence),
    );
    assert.equal(text(deliveries[2].payload), "order 2");
    assert.equal(deliveries[2].message.attributes.n, "2");
    assert.ok(deliveries.every((d) => d.attempt === 1));
    await Promise.all(deliveries.map((d) => d.ack()));
    const stats = await client.subscriptionStats("billing");
    assert.deepEqual([stats.acked, stats.backlog, stats.inFlight], [5n, 0n, 0n]);
    await stream.close();
    await assert.rejects(deliveries[0].ack(), StreamClosed);

    // Acked messages are not delivered again, on a new stream either.
    const again = client.subscribe("billing");
    assert.equal(await again.receive(500), undefined);
    await again.close();
  }),
);

test("a nacked message is redelivered with the next attempt", { timeout: TEST_TIMEOUT }, () =>
  withBroker(async (client) => {
    await client.createTopic("orders");
    await client.createSubscription("billing", "orders", { start: "earliest", minBackoffMs: 50 });
    const [sent] = await client.publish([message("orders", "flaky")]);

    const stream = client.subscribe("billing");
    const first = await receive(stream);
    assert.deepEqual([first.id, first.attempt], [sent.id, 1]);
    const nackedAt = Date.now();
    await first.nack({ delayMs: 300, reason: "database busy" });

    const second = await receive(stream);
    assert.ok(Date.now() - nackedAt >= 290, "the nack delay was honoured");
    assert.deepEqual([second.id, second.sequence, second.attempt], [sent.id, sent.sequence, 2]);
    assert.notEqual(second.ackId, first.ackId);

    // Without a delay the subscription's backoff applies.
    await second.nack({ reason: "still busy" });
    const third = await receive(stream);
    assert.equal(third.attempt, 3);
    await third.ack();
    await stream.close();

    const stats = await client.subscriptionStats("billing");
    assert.deepEqual([stats.redelivered, stats.acked, stats.backlog], [2n, 1n, 0n]);
  }),
);

test("an ack after the lease expired is refused as stale", { timeout: TEST_TIMEOUT }, () =>
  withBroker(async (client) => {
    await client.createTopic("orders");
    // Redelivery waits out a 500 ms backoff, so the second lease is fresh when
    // it arrives; a lease of a second leaves its ack time on a loaded machine.
    await client.createSubscription("billing", "orders", {
      start: "earliest",
      ackDeadlineMs: 1000,
      minBackoffMs: 500,
      maxBackoffMs: 500,
    });
    const [sent] = await client.publish([message("orders", "slow")]);

    const stream = client.subscribe("billing");
    const first = await receive(stream);
    await sleep(1500); // the 1 s lease runs out
    await assert.rejects(first.ack(), (e: unknown) => {
      assert.ok(e instanceof AckRefused);
      assert.equal(e.result, "STALE");
      assert.equal(e.operation, "ack");
      assert.equal(e.ackId, first.ackId);
      assert.ok(e.detail.length > 0);
      return true;
    });

    // The message comes again, and the new lease can be acked.
    const second = await receive(stream);
    assert.deepEqual([second.id, second.attempt], [sent.id, 2]);
    await second.ack();
    await stream.close();

    // The unary Ack refuses a stale ack id with FAILED_PRECONDITION.
    await assert.rejects(client.ack("billing", [first.ackId]), (e: unknown) => {
      const err = ConnectError.from(e);
      assert.equal(err.code, Code.FailedPrecondition);
      assert.match(err.rawMessage, /refused/);
      return true;
    });
    assert.equal((await client.subscriptionStats("billing")).acked, 1n);
  }),
);

test("extending a lease keeps the ack valid", { timeout: TEST_TIMEOUT }, () =>
  withBroker(async (client) => {
    await client.createTopic("orders");
    await client.createSubscription("billing", "orders", { start: "earliest", ackDeadlineMs: 300 });
    await client.publish([message("orders", "long job")]);

    const stream = client.subscribe("billing");
    const delivery = await receive(stream);
    const deadline = await delivery.extend(5000);
    assert.ok(deadline.getTime() > delivery.leaseDeadline.getTime() + 3000);
    await sleep(600); // past the original deadline
    await delivery.ack();
    assert.equal(await stream.receive(300), undefined, "not redelivered");
    await stream.close();
    assert.equal((await client.subscriptionStats("billing")).redelivered, 0n);
  }),
);

test("a second ack of the same delivery is refused as unknown", { timeout: TEST_TIMEOUT }, () =>
  withBroker(async (client) => {
    await client.createTopic("orders");
    await client.createSubscription("billing", "orders", { start: "earliest" });
    await client.publish([message("orders", "x")]);
    const stream = client.subscribe("billing");
    const delivery = await receive(stream);
    await delivery.ack();
    await assert.rejects(delivery.ack(), (e: unknown) => e instanceof AckRefused && e.result === "UNKNOWN");
    await stream.close();
  }),
);

test("subscribing to an unknown subscription fails with NotFound", { timeout: TEST_TIMEOUT }, () =>
  withBroker(async (client) => {
    const stream = client.subscribe("nobody");
    await assert.rejects(stream.receive(10_000), (e: unknown) => {
      const err = ConnectError.from(e);
      assert.equal(err.code, Code.NotFound);
      assert.match(err.rawMessage, /nobody/);
      return true;
    });
    await stream.close();
  }),
);

test("peek shows waiting messages without leasing them", { timeout: TEST_TIMEOUT }, () =>
  withBroker(async (client) => {
    await client.createTopic("orders");
    await client.createSubscription("billing", "orders", { start: "earliest", maxAttempts: 1 });
    await client.publish([0, 1, 2].map((i) => message("orders", `order ${i}`)));

    const first = await client.peek("billing", 2);
    const again = await client.peek("billing");
    assert.deepEqual(
      first.map((p) => p.message?.sequence),
      [1n, 2n],
    );
    assert.equal(again.length, 3);
    assert.ok(again.every((p) => p.state === MessageState.NEW && p.attempts === 0));
    const stats = await client.subscriptionStats("billing");
    assert.deepEqual([stats.delivered, stats.backlog, stats.inFlight], [0n, 3n, 0n]);

    // With max_attempts 1, a counted look would have dead-lettered it.
    const stream = client.subscribe("billing");
    const delivery = await receive(stream);
    assert.deepEqual([delivery.sequence, delivery.attempt], [1n, 1]);
    const leased = await client.peek("billing", 1);
    assert.equal(leased[0].state, MessageState.LEASED);
    assert.equal(leased[0].attempts, 1);
    await stream.close();
  }),
);

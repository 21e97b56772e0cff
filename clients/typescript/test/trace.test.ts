/**
 * Trace context with an OpenTelemetry SDK registered: publishing writes the
 * active span as the W3C `traceparent` (and `tracestate`) attributes,
 * `messageContext` gives the producer's span back, and the inbox runs
 * handlers in a child span of it.
 */
import assert from "node:assert/strict";
import { test } from "node:test";
import {
  SpanKind,
  SpanStatusCode,
  TraceFlags,
  context,
  createTraceState,
  trace,
  type SpanContext,
} from "@opentelemetry/api";
import { AsyncLocalStorageContextManager } from "@opentelemetry/context-async-hooks";
import {
  BasicTracerProvider,
  InMemorySpanExporter,
  SimpleSpanProcessor,
  type ReadableSpan,
} from "@opentelemetry/sdk-trace-base";
import Database from "better-sqlite3";
import { Inbox, InboxResult, message, messageContext, type Delivery, type MessageStream } from "../src/index.js";
import { TEST_TIMEOUT, text, withBroker } from "./support/harness.js";

const exporter = new InMemorySpanExporter();
trace.setGlobalTracerProvider(new BasicTracerProvider({ spanProcessors: [new SimpleSpanProcessor(exporter)] }));
context.setGlobalContextManager(new AsyncLocalStorageContextManager().enable());
const tracer = trace.getTracer("tidings-tests");

/** The next `count` deliveries of a stream, by message id. */
async function receiveAll(stream: MessageStream, count: number): Promise<Map<string, Delivery>> {
  const found = new Map<string, Delivery>();
  while (found.size < count) {
    const delivery = await stream.receive(10_000);
    assert.ok(delivery, `${found.size} of ${count} messages arrived`);
    found.set(delivery.id, delivery);
  }
  return found;
}

/** The trace id and span id of a `traceparent`. */
function parse(value: string | undefined): [string, string] {
  const [version, traceId, spanId, flags] = (value ?? "").split("-");
  assert.deepEqual([version, traceId?.length, spanId?.length, flags?.length], ["00", 32, 16, 2], value);
  return [traceId, spanId];
}

/** The inbox's consumer spans, by message id. */
function processSpans(): Map<string, ReadableSpan> {
  return new Map(
    exporter
      .getFinishedSpans()
      .filter((s) => s.name.startsWith("process "))
      .map((s) => [String(s.attributes["messaging.message.id"]), s]),
  );
}

test("publishing in a span writes its traceparent and the handler span is its child", { timeout: TEST_TIMEOUT }, () =>
  withBroker(async (client) => {
    exporter.reset();
    await client.createTopic("orders");
    await client.createSubscription("billing", "orders", { start: "earliest" });
    const [unary, streamed, untraced] = ["unary", "streamed", "untraced"].map((name) => message("orders", name));

    const producer = await tracer.startActiveSpan("place order", async (span) => {
      await client.publish([unary]);
      const stream = client.publishStream();
      await stream.publish([streamed]);
      await stream.close();
      span.end();
      return span.spanContext();
    });
    await client.publish([untraced]);
    assert.deepEqual(unary.attributes, {}, "the caller's message is left as it was");

    const stream = client.subscribe("billing");
    const deliveries = await receiveAll(stream, 3);
    for (const m of [unary, streamed]) {
      const attributes = deliveries.get(m.id)!.message.attributes;
      assert.deepEqual(parse(attributes.traceparent), [producer.traceId, producer.spanId]);
      assert.equal(attributes.tracestate, undefined, "an empty tracestate is not written");
    }
    assert.deepEqual(deliveries.get(untraced.id)!.message.attributes, {});

    // The consumer side: the producer's span as the parent of a new span.
    const parent = trace.getSpanContext(messageContext(deliveries.get(unary.id)!));
    assert.deepEqual(
      [parent?.traceId, parent?.spanId, parent?.isRemote],
      [producer.traceId, producer.spanId, true],
    );

    // The inbox runs each handler in a consumer span, child of the producer's.
    const db = new Database(":memory:");
    const inbox = new Inbox(db, "billing");
    inbox.createTable();
    const active = new Map<string, SpanContext | undefined>();
    for (const delivery of deliveries.values()) {
      const result = await inbox.handle(delivery, async (d) => {
        await new Promise((resolve) => setImmediate(resolve)); // across an await too
        active.set(d.id, trace.getActiveSpan()?.spanContext());
      });
      assert.equal(result, InboxResult.Processed);
    }
    await stream.close();
    db.close();

    const handled = processSpans();
    for (const m of [unary, streamed]) {
      const span = handled.get(m.id)!;
      assert.equal(span.name, "process orders");
      assert.equal(span.kind, SpanKind.CONSUMER);
      assert.equal(span.spanContext().traceId, producer.traceId);
      assert.equal(span.parentSpanContext?.spanId, producer.spanId);
      assert.deepEqual(active.get(m.id), span.spanContext(), "the handler runs inside the span");
      assert.equal(span.attributes["messaging.destination.name"], "orders");
      assert.equal(span.attributes["messaging.destination.subscription.name"], "billing");
      assert.equal(span.attributes["tidings.inbox.result"], "processed");
    }
    // Without a traceparent the handler span starts a trace of its own.
    assert.equal(handled.get(untraced.id)!.parentSpanContext, undefined);
    assert.notEqual(handled.get(untraced.id)!.spanContext().traceId, producer.traceId);
  }),
);

test("tracestate travels; explicit or malformed traceparents are kept", { timeout: TEST_TIMEOUT }, () =>
  withBroker(async (client) => {
    exporter.reset();
    await client.createTopic("orders");
    await client.createSubscription("billing", "orders", { start: "earliest" });
    const upstream = trace.setSpanContext(context.active(), {
      traceId: "4bf92f3577b34da6a3ce929d0e0e4736",
      spanId: "00f067aa0ba902b7",
      traceFlags: TraceFlags.SAMPLED,
      isRemote: true,
      traceState: createTraceState("vendor=opaque"),
    });
    const explicit = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    const messages: Record<string, ReturnType<typeof message>> = {
      implicit: message("orders", "implicit"),
      explicit: message("orders", "explicit", { attributes: { traceparent: explicit } }),
      garbage: message("orders", "garbage", { attributes: { traceparent: "not a traceparent" } }),
      zeros: message("orders", "zeros", {
        attributes: { traceparent: "00-00000000000000000000000000000000-0000000000000000-01" },
      }),
      "version ff": message("orders", "version ff", {
        attributes: { traceparent: `ff${explicit.slice(2)}`, tracestate: "a=b" },
      }),
      "version 00 with more": message("orders", "version 00 with more", {
        attributes: { traceparent: `${explicit}-extra` },
      }),
    };
    const producer = await tracer.startActiveSpan("checkout", {}, upstream, async (span) => {
      await client.publish(Object.values(messages));
      span.end();
      return span.spanContext();
    });

    const stream = client.subscribe("billing");
    const deliveries = await receiveAll(stream, Object.keys(messages).length);
    const received = (name: string) => deliveries.get(messages[name].id)!;
    assert.deepEqual(received("implicit").message.attributes, {
      traceparent: `00-${producer.traceId}-${producer.spanId}-01`,
      tracestate: "vendor=opaque",
    });
    // What the user wrote is never overwritten, valid or not.
    for (const name of Object.keys(messages).filter((n) => n !== "implicit")) {
      assert.deepEqual(received(name).message.attributes, messages[name].attributes, name);
    }

    // The tracestate comes back with the producer's span.
    assert.equal(trace.getSpanContext(messageContext(received("implicit")))?.traceState?.get("vendor"), "opaque");
    // A malformed traceparent is ignored: the base context comes back as it is.
    const malformed = ["garbage", "zeros", "version ff", "version 00 with more"];
    for (const name of malformed) assert.equal(messageContext(received(name), upstream), upstream, name);

    const db = new Database(":memory:");
    const inbox = new Inbox(db, "billing");
    inbox.createTable();
    const results: Record<string, InboxResult> = {};
    for (const name of Object.keys(messages)) {
      results[name] = await inbox.handle(received(name), (d) => {
        if (text(d.payload) === "garbage") throw new RangeError("no such customer");
      });
    }
    await stream.close();
    db.close();
    assert.equal(results.garbage, InboxResult.Failed);
    for (const name of Object.keys(messages).filter((n) => n !== "garbage")) {
      assert.equal(results[name], InboxResult.Processed, name);
    }

    const handled = processSpans();
    assert.equal(handled.get(messages.implicit.id)!.parentSpanContext?.spanId, producer.spanId);
    const explicitSpan = handled.get(messages.explicit.id)!;
    assert.deepEqual([explicitSpan.spanContext().traceId, explicitSpan.parentSpanContext?.spanId], parse(explicit));
    for (const name of malformed) assert.equal(handled.get(messages[name].id)!.parentSpanContext, undefined, name);
    const failed = handled.get(messages.garbage.id)!;
    assert.equal(failed.status.code, SpanStatusCode.ERROR);
    assert.equal(failed.status.message, "RangeError: no such customer");
    assert.deepEqual(
      failed.events.map((e) => e.name),
      ["exception"],
    );
    assert.equal(failed.attributes["tidings.inbox.result"], "failed");
  }),
);

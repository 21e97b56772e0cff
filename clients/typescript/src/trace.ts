/**
 * Trace context in message attributes (W3C Trace Context, OpenTelemetry).
 *
 * Publishing writes the active span's context into each message as the
 * `traceparent` attribute (and `tracestate` when it is not empty), in the
 * W3C Trace Context header formats, unless the message has a `traceparent`
 * already. The broker carries attributes unchanged, so a consumer in any
 * language can make its handler span a child of the producer's span:
 * {@link messageContext} gives the OpenTelemetry context to start it in,
 * and the {@link Inbox} does so by itself.
 *
 * `@opentelemetry/api` is an optional peer dependency, loaded if the
 * application has it: a library must use the application's copy of the API,
 * since the API only works with the tracer provider and context manager
 * registered through a compatible copy. Without it, publishing adds
 * nothing and the inbox runs handlers without spans; with it but no tracer
 * provider registered, there is no valid active span, so nothing is added
 * either.
 *
 * The W3C formats are written here rather than through the globally
 * registered propagator (which is a no-op until an SDK registers one, and
 * may be B3 or another): the attribute names and formats are part of the
 * tidings contract, shared by every client and the broker's relay.
 */
import { createRequire } from "node:module";
import type * as OpenTelemetry from "@opentelemetry/api";
import type { Context, Span, SpanContext } from "@opentelemetry/api";
import type { Message } from "./gen/tidings/v1/message_pb.js";
import type { Delivery } from "./subscriber.js";

/** The attribute holding the W3C `traceparent` of the publisher's span. */
export const TRACEPARENT = "traceparent";
/** The attribute holding the W3C `tracestate` (only when not empty). */
export const TRACESTATE = "tracestate";

const TRACER_NAME = "@tidings/client";

/** The application's `@opentelemetry/api`, if it has one. */
const api: typeof OpenTelemetry | undefined = (() => {
  try {
    return createRequire(import.meta.url)("@opentelemetry/api") as typeof OpenTelemetry;
  } catch (e) {
    if ((e as { code?: unknown }).code === "MODULE_NOT_FOUND") return undefined;
    throw e;
  }
})();

/** Whether `@opentelemetry/api` is installed. */
export function tracingAvailable(): boolean {
  return api !== undefined;
}

/**
 * The `traceparent` of version 00: `00-<32 hex trace id>-<16 hex span
 * id>-<2 hex flags>`; later versions may append fields after a `-`. All-zero
 * ids and version `ff` are invalid.
 */
const TRACEPARENT_FORMAT =
  /^[ \t]*((?!ff)[\da-f]{2})-((?![0]{32})[\da-f]{32})-((?![0]{16})[\da-f]{16})-([\da-f]{2})(-.*)?[ \t]*$/;

/** The span context of a `traceparent` value, or undefined if malformed. */
function parseTraceparent(value: string): SpanContext | undefined {
  if (value.length > 512) return undefined;
  const match = TRACEPARENT_FORMAT.exec(value);
  if (!match || (match[1] === "00" && match[5] !== undefined)) return undefined;
  return { traceId: match[2], spanId: match[3], traceFlags: parseInt(match[4], 16), isRemote: true };
}

/**
 * The `traceparent` (and non-empty `tracestate`) attributes of the active
 * span, or undefined when `@opentelemetry/api` is missing or there is no
 * valid active span.
 */
export function activeTraceAttributes(): Record<string, string> | undefined {
  if (!api) return undefined;
  const span = api.trace.getSpanContext(api.context.active());
  if (!span || !api.isSpanContextValid(span)) return undefined;
  const flags = (span.traceFlags & 0xff).toString(16).padStart(2, "0");
  const attributes: Record<string, string> = { [TRACEPARENT]: `00-${span.traceId}-${span.spanId}-${flags}` };
  const state = span.traceState?.serialize();
  if (state) attributes[TRACESTATE] = state;
  return attributes;
}

/**
 * The messages to send for a publish: those without a `traceparent` get the
 * active span's trace context, as copies (the caller's objects are left as
 * they are); an attribute already set is never overwritten.
 *
 * @internal
 */
export function withTraceContext(messages: Message[]): Message[] {
  const trace = activeTraceAttributes();
  if (!trace) return messages;
  return messages.map((m) =>
    Object.hasOwn(m.attributes, TRACEPARENT) ? m : { ...m, attributes: { ...trace, ...m.attributes } },
  );
}

function loaded(): typeof OpenTelemetry {
  if (!api) {
    throw new Error("messageContext needs @opentelemetry/api: npm install @opentelemetry/api");
  }
  return api;
}

/**
 * The OpenTelemetry context to process a received message in: its span is
 * the producer's (a remote, non-recording span made from the message's
 * `traceparent` and `tracestate` attributes), so a span started in it is
 * the producer span's child.
 *
 * ```ts
 * for await (const delivery of client.subscribe("billing")) {
 *   const parent = messageContext(delivery);
 *   await tracer.startActiveSpan("bill", { kind: SpanKind.CONSUMER }, parent, async (span) => {
 *     await bill(delivery);
 *     span.end();
 *   });
 *   await delivery.ack();
 * }
 * ```
 *
 * @param source - A {@link Delivery}, or a `Message` (e.g. from `peek`).
 * @param base - The context to add the producer's span to; by default the
 *   active one. Returned as it is when the message has no `traceparent` or
 *   a malformed one.
 * @throws `Error` if `@opentelemetry/api` is not installed.
 */
export function messageContext(source: Delivery | Message, base?: Context): Context {
  const otel = loaded();
  const context = base ?? otel.context.active();
  const attributes = "ackId" in source ? source.message.attributes : source.attributes;
  const traceparent = attributes[TRACEPARENT];
  if (typeof traceparent !== "string") return context;
  const parent = parseTraceparent(traceparent);
  if (!parent) return context;
  const state = attributes[TRACESTATE];
  if (typeof state === "string" && state !== "") {
    try {
      parent.traceState = otel.createTraceState(state);
    } catch {
      // A malformed tracestate is dropped; the traceparent still holds.
    }
  }
  return otel.trace.setSpanContext(context, parent);
}

/**
 * Runs `body` in a `process <topic>` consumer span, child of the message's
 * trace context (see {@link messageContext}) and active while it runs;
 * without `@opentelemetry/api`, runs it with no span. An exception from
 * `body` is recorded on the span.
 *
 * @internal
 */
export function inConsumerSpan<T>(
  delivery: Delivery,
  subscription: string,
  body: (span: Span | undefined) => Promise<T>,
): Promise<T> {
  if (!api) return body(undefined);
  const otel = api;
  const message = delivery.message;
  const attributes: OpenTelemetry.Attributes = {
    "messaging.system": "tidings",
    "messaging.operation.name": "process",
    "messaging.operation.type": "process",
    "messaging.destination.name": message.topic,
    "messaging.destination.subscription.name": subscription,
    "messaging.message.id": message.id,
    "tidings.message.sequence": Number(message.sequence),
    "tidings.delivery.attempt": delivery.attempt,
  };
  if (message.key) attributes["tidings.message.key"] = message.key;
  const tracer = otel.trace.getTracer(TRACER_NAME);
  const options = { kind: otel.SpanKind.CONSUMER, attributes };
  return tracer.startActiveSpan(`process ${message.topic}`, options, messageContext(delivery), async (span) => {
    try {
      return await body(span);
    } catch (e) {
      markFailed(span, e);
      throw e;
    } finally {
      span.end();
    }
  });
}

/**
 * Records a handler's failure on its span (from {@link inConsumerSpan}).
 *
 * @internal
 */
export function markFailed(span: Span | undefined, error: unknown): void {
  if (!span || !api) return;
  const description = error instanceof Error ? `${error.name}: ${error.message}` : String(error);
  span.recordException(error instanceof Error ? error : description);
  span.setStatus({ code: api.SpanStatusCode.ERROR, message: description });
}

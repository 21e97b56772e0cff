/**
 * TypeScript client of the tidings message broker.
 *
 * Generated code for the `tidings.v1` API (Connect-ES) is under `./gen/`;
 * this module adds a small layer on top: {@link TidingsClient} (admin calls,
 * `publish`, `publishStream`, `subscribe`, `peek`, `health`), {@link message} (a
 * message with a fresh UUID id), {@link Inbox} (each delivery processed
 * once with a SQLite database) and {@link messageContext} (the
 * OpenTelemetry context of a received message, whose span is the
 * producer's: publishing writes the active span into the W3C `traceparent`
 * and `tracestate` attributes when `@opentelemetry/api` is installed).
 *
 * @packageDocumentation
 */

export { Code, ConnectError } from "@connectrpc/connect";
export {
  TidingsClient,
  DEFAULT_BASE_URL,
  type ClientOptions,
  type HealthStatus,
  type SubscriptionOptions,
  type TlsOptions,
  type TopicOptions,
} from "./client.js";
export { AckRefused, StreamClosed } from "./errors.js";
export { Inbox, InboxResult, type InboxHandler, type SqliteDatabase } from "./inbox.js";
export { PublishStream, message, type MessageOptions } from "./publisher.js";
export { Delivery, MessageStream, type FlowControl, type NackOptions } from "./subscriber.js";
export { TRACEPARENT, TRACESTATE, messageContext } from "./trace.js";
export type { Message } from "./gen/tidings/v1/message_pb.js";
export type { PublishResult } from "./gen/tidings/v1/publisher_pb.js";
export type { Subscription, SubscriptionStats, Topic } from "./gen/tidings/v1/admin_pb.js";
export type { AckOutcome, PeekedMessage } from "./gen/tidings/v1/subscriber_pb.js";
export { MessageState } from "./gen/tidings/v1/subscriber_pb.js";

import { randomUUID } from "node:crypto";
import { create } from "@bufbuild/protobuf";
import { timestampFromDate } from "@bufbuild/protobuf/wkt";
import type { Client } from "@connectrpc/connect";
import { MessageSchema, type Message } from "./gen/tidings/v1/message_pb.js";
import { PublisherService, type PublishResult } from "./gen/tidings/v1/publisher_pb.js";
import { StreamClosed } from "./errors.js";
import { AsyncQueue, settleable } from "./queue.js";
import { withTraceContext } from "./trace.js";

/** Optional fields of {@link message}. */
export interface MessageOptions {
  /**
   * The idempotency key, a UUID; a fresh random one when omitted. Keep the
   * id when retrying: the broker stores an id once per topic and answers a
   * repeat with `duplicate: true`.
   */
  id?: string;
  /** Ordering key (see ordered subscriptions). */
  key?: string;
  /**
   * Free-form string attributes. `traceparent` and `tracestate` are the W3C
   * trace context: publishing fills them in from the active OpenTelemetry
   * span unless `traceparent` is given.
   */
  attributes?: Record<string, string>;
  /** When the producer created the message, e.g. its outbox row's commit. */
  createTime?: Date;
}

const encoder = new TextEncoder();

/**
 * Builds a message to publish.
 *
 * @param topic - The topic to publish to.
 * @param payload - The body; a string is encoded as UTF-8.
 * @param options - Id, ordering key, attributes, creation time.
 */
export function message(topic: string, payload: Uint8Array | string, options: MessageOptions = {}): Message {
  return create(MessageSchema, {
    id: options.id ?? randomUUID(),
    topic,
    key: options.key ?? "",
    payload: typeof payload === "string" ? encoder.encode(payload) : payload,
    attributes: options.attributes ?? {},
    createTime: options.createTime ? timestampFromDate(options.createTime) : undefined,
  });
}

/**
 * A pipelined publish stream (the `PublishStream` RPC).
 *
 * Each {@link PublishStream.publish} sends one batch and resolves with its
 * results once the broker has committed it; later batches are sent without
 * waiting, up to `maxInFlight` unanswered batches (further calls wait for a
 * slot, keeping their order). {@link PublishStream.close} sends the batches
 * still waiting and resolves once all are answered. If the stream fails, every unanswered batch
 * rejects with the error (a `ConnectError`) and later calls reject too;
 * republishing unanswered batches with the same ids is safe.
 *
 * ```ts
 * const stream = client.publishStream();
 * const answers = batches.map((batch) => stream.publish(batch));
 * await stream.close();
 * ```
 */
export class PublishStream {
  private readonly requests = new AsyncQueue<Message[]>();
  private readonly pending: Array<ReturnType<typeof settleable<PublishResult[]>>> = [];
  private readonly slotWaiters: Array<() => void> = [];
  private readonly abort = new AbortController();
  private readonly reader: Promise<void>;
  private error: unknown = undefined;
  private closed = false;
  private inFlight = 0;

  /** @internal Use `TidingsClient.publishStream()`. */
  constructor(
    publisher: Client<typeof PublisherService>,
    private readonly maxInFlight = 16,
  ) {
    if (maxInFlight < 1) throw new RangeError("maxInFlight must be at least 1");
    const requests = this.requests;
    async function* outbound() {
      for (;;) {
        const next = await requests.next();
        if (!next || next.done) return;
        yield { messages: next.value };
      }
    }
    const responses = publisher.publishStream(outbound(), { signal: this.abort.signal });
    this.reader = this.read(responses);
  }

  private async read(responses: AsyncIterable<{ results: PublishResult[] }>): Promise<void> {
    let error: unknown = new StreamClosed("the publish stream ended before answering");
    try {
      for await (const response of responses) {
        const answer = this.pending.shift();
        if (!answer) {
          error = new StreamClosed("the broker answered more batches than were sent");
          break;
        }
        answer.resolve(response.results);
        const next = this.slotWaiters.shift();
        if (next) next();
        else this.inFlight--;
      }
    } catch (e) {
      error = e;
    }
    this.error = error;
    this.requests.end();
    for (const answer of this.pending.splice(0)) answer.reject(error);
    for (const wake of this.slotWaiters.splice(0)) wake();
  }

  /**
   * Sends one batch (one commit on the broker). Messages without a
   * `traceparent` attribute are sent with the active OpenTelemetry span's
   * (see {@link TidingsClient.publish}).
   *
   * @param messages - Messages to publish, each naming its topic.
   * @returns The results, one per message in order, after the commit.
   */
  async publish(messages: Message[]): Promise<PublishResult[]> {
    // Read before the first await: the active span is the caller's.
    messages = withTraceContext(messages);
    if (this.error !== undefined) throw this.error;
    if (this.closed) throw new StreamClosed("the publish stream is closed");
    if (this.inFlight >= this.maxInFlight || this.slotWaiters.length > 0) {
      // The slot is handed over by the answer that frees it, in call order.
      await new Promise<void>((wake) => this.slotWaiters.push(wake));
    } else {
      this.inFlight++;
    }
    if (this.error !== undefined) throw this.error;
    const answer = settleable<PublishResult[]>();
    this.pending.push(answer);
    this.requests.push(messages);
    // close() waits for batches that were waiting for a slot.
    if (this.closed && this.slotWaiters.length === 0) this.requests.end();
    return answer.promise;
  }

  /**
   * Ends the stream once every batch sent is answered.
   *
   * @param timeoutMs - How long to wait for the answers before cancelling
   *   the call (unanswered batches then reject).
   */
  async close(timeoutMs = 30_000): Promise<void> {
    if (!this.closed) {
      this.closed = true;
      if (this.slotWaiters.length === 0) this.requests.end();
    }
    const timer = setTimeout(() => this.abort.abort(), timeoutMs);
    try {
      await this.reader;
    } finally {
      clearTimeout(timer);
    }
  }
}

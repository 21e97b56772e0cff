import { create } from "@bufbuild/protobuf";
import { durationFromMs, timestampDate } from "@bufbuild/protobuf/wkt";
import type { Client } from "@connectrpc/connect";
import type { Message } from "./gen/tidings/v1/message_pb.js";
import {
  AckOperation,
  AckResult,
  LeaseExtensionSchema,
  NackSchema,
  SubscribeRequestSchema,
  SubscriberService,
  type AckOutcome,
  type LeaseExtension,
  type Nack,
  type ReceivedMessage,
  type SubscribeRequest,
  type SubscribeResponse,
} from "./gen/tidings/v1/subscriber_pb.js";
import { AckRefused, StreamClosed } from "./errors.js";
import { AsyncQueue, handled, settleable } from "./queue.js";

/** Most acks, nacks and extensions sent in one request. */
const MAX_BATCH = 1000;

/** Flow control of a subscription stream (0 or absent: the broker's default). */
export interface FlowControl {
  /** At most this many unsettled messages on the stream (default 1000). */
  maxOutstandingMessages?: number;
  /** At most this many unsettled payload bytes (default 100 MiB). */
  maxOutstandingBytes?: number;
}

/** Options of {@link Delivery.nack}. */
export interface NackOptions {
  /** Redeliver no sooner than this; by default the subscription's backoff. */
  delayMs?: number;
  /** Why processing failed; kept if the message ends up dead-lettered. */
  reason?: string;
}

/** One item for the request side of the stream. */
type Operation =
  | { kind: "ack"; ackId: string }
  | { kind: "nack"; nack: Nack }
  | { kind: "extend"; extension: LeaseExtension }
  | { kind: "flow"; flow: FlowControl };

/**
 * A message leased to this consumer. Settle it with {@link Delivery.ack}
 * once processed, {@link Delivery.nack} to have it redelivered (with
 * `attempt + 1`), or {@link Delivery.extend} for more time. If the lease
 * ends first, the broker redelivers the message and refuses a late ack as
 * stale.
 *
 * The settling methods send at once and resolve when the broker has
 * committed the operation, or reject with {@link AckRefused}. Not awaiting
 * them is fine when the outcome does not matter.
 */
export class Delivery {
  /** The message as stored (id, topic, key, payload, attributes, sequence, times). */
  readonly message: Message;
  /** Token of this lease. */
  readonly ackId: string;
  /** Delivery attempt, 1 for the first delivery. */
  readonly attempt: number;
  /** When the lease ends unless extended. */
  readonly leaseDeadline: Date;

  /** @internal */
  constructor(
    received: ReceivedMessage,
    private readonly stream: MessageStream,
  ) {
    if (!received.message) throw new TypeError("a delivery without a message");
    this.message = received.message;
    this.ackId = received.ackId;
    this.attempt = received.attempt;
    this.leaseDeadline = received.leaseDeadline ? timestampDate(received.leaseDeadline) : new Date(0);
  }

  /** The message id (the producer's UUID). */
  get id(): string {
    return this.message.id;
  }

  /** The message body. */
  get payload(): Uint8Array {
    return this.message.payload;
  }

  /** The message's sequence number in its topic. */
  get sequence(): bigint {
    return this.message.sequence;
  }

  /** Acknowledges the message: it will not be delivered again. */
  ack(): Promise<void> {
    return handled(
      this.stream.settle(AckOperation.ACK, this.ackId, { kind: "ack", ackId: this.ackId }).then(() => undefined),
    );
  }

  /** Gives the message back for redelivery. */
  nack(options: NackOptions = {}): Promise<void> {
    const nack = create(NackSchema, {
      ackId: this.ackId,
      reason: options.reason ?? "",
      delay: options.delayMs === undefined ? undefined : durationFromMs(options.delayMs),
    });
    return handled(this.stream.settle(AckOperation.NACK, this.ackId, { kind: "nack", nack }).then(() => undefined));
  }

  /**
   * Moves the lease deadline to now + `extensionMs`.
   *
   * @returns The new deadline.
   */
  extend(extensionMs: number): Promise<Date> {
    const extension = create(LeaseExtensionSchema, { ackId: this.ackId, extension: durationFromMs(extensionMs) });
    return handled(
      this.stream
        .settle(AckOperation.EXTEND, this.ackId, { kind: "extend", extension })
        .then((outcome) => (outcome.leaseDeadline ? timestampDate(outcome.leaseDeadline) : new Date(0))),
    );
  }
}

/**
 * A `Subscribe` stream: iterate over it with `for await` to receive
 * {@link Delivery} objects, and settle each one.
 *
 * Acks queued while a request is being sent go together in the next one.
 * Iteration ends after {@link MessageStream.close}, and throws the call's
 * `ConnectError` if the stream fails (e.g. `NotFound` for an unknown
 * subscription, or `Unavailable` when the broker shuts down: open a new
 * stream then; unsettled messages are redelivered).
 *
 * ```ts
 * const stream = client.subscribe("billing");
 * for await (const delivery of stream) {
 *   handle(delivery.payload);
 *   await delivery.ack();
 * }
 * ```
 */
export class MessageStream implements AsyncIterable<Delivery> {
  private readonly requests = new AsyncQueue<Operation>();
  private readonly deliveries = new AsyncQueue<Delivery>();
  private readonly pending = new Map<string, Array<ReturnType<typeof settleable<AckOutcome>>>>();
  private readonly abort = new AbortController();
  private readonly reader: Promise<void>;
  private closed = false;
  private ended = false;
  private error: unknown = undefined;

  /** @internal Use `TidingsClient.subscribe()`. */
  constructor(
    subscriber: Client<typeof SubscriberService>,
    /** The subscription name. */
    readonly subscription: string,
    flow: FlowControl = {},
  ) {
    const first = create(SubscribeRequestSchema, {
      subscription,
      maxOutstandingMessages: flow.maxOutstandingMessages ?? 0,
      maxOutstandingBytes: BigInt(flow.maxOutstandingBytes ?? 0),
    });
    const responses = subscriber.subscribe(this.outbound(first), { signal: this.abort.signal });
    this.reader = this.read(responses);
  }

  private async *outbound(first: SubscribeRequest): AsyncGenerator<SubscribeRequest> {
    yield first;
    for (;;) {
      const next = await this.requests.next();
      if (!next || next.done) return;
      const request = create(SubscribeRequestSchema);
      let op: Operation | undefined = next.value;
      for (let n = 0; op !== undefined && n < MAX_BATCH; n++) {
        switch (op.kind) {
          case "ack":
            request.ackIds.push(op.ackId);
            break;
          case "nack":
            request.nacks.push(op.nack);
            break;
          case "extend":
            request.extensions.push(op.extension);
            break;
          case "flow":
            request.maxOutstandingMessages = op.flow.maxOutstandingMessages ?? 0;
            request.maxOutstandingBytes = BigInt(op.flow.maxOutstandingBytes ?? 0);
            break;
        }
        op = n + 1 < MAX_BATCH ? this.requests.tryShift() : undefined;
      }
      yield request;
    }
  }

  private async read(responses: AsyncIterable<SubscribeResponse>): Promise<void> {
    let error: unknown = undefined;
    try {
      for await (const response of responses) {
        for (const received of response.messages) this.deliveries.push(new Delivery(received, this));
        for (const outcome of response.outcomes) this.resolve(outcome);
      }
    } catch (e) {
      if (!(this.closed && this.abort.signal.aborted)) error = e;
    }
    this.ended = true;
    this.error = error;
    this.requests.end();
    const failure = error ?? new StreamClosed("the stream ended before the broker answered");
    for (const waiters of this.pending.values()) for (const w of waiters) w.reject(failure);
    this.pending.clear();
    this.deliveries.end(error);
  }

  private resolve(outcome: AckOutcome): void {
    const key = `${outcome.operation}/${outcome.ackId}`;
    const waiters = this.pending.get(key);
    const waiter = waiters?.shift();
    if (waiters && waiters.length === 0) this.pending.delete(key);
    if (!waiter) return;
    if (outcome.result === AckResult.OK) waiter.resolve(outcome);
    else waiter.reject(AckRefused.fromOutcome(outcome));
  }

  /** @internal Sends an ack, nack or extension and awaits its outcome. */
  settle(operation: AckOperation, ackId: string, op: Operation): Promise<AckOutcome> {
    const waiter = settleable<AckOutcome>();
    if (this.ended || this.closed) {
      waiter.reject(this.error ?? new StreamClosed("the subscription stream is closed"));
      return waiter.promise;
    }
    const key = `${operation}/${ackId}`;
    const waiters = this.pending.get(key);
    if (waiters) waiters.push(waiter);
    else this.pending.set(key, [waiter]);
    this.requests.push(op);
    return waiter.promise;
  }

  /** Changes the stream's flow control (0 or absent keeps the current value). */
  setFlowControl(flow: FlowControl): void {
    if (this.ended || this.closed) throw this.error ?? new StreamClosed("the subscription stream is closed");
    this.requests.push({ kind: "flow", flow });
  }

  /**
   * Waits for the next delivery.
   *
   * @param timeoutMs - How long to wait; forever when omitted.
   * @returns The delivery, or `undefined` on timeout or once the stream has
   *   ended after {@link MessageStream.close}.
   * @throws The call's `ConnectError` if the stream failed.
   */
  async receive(timeoutMs?: number): Promise<Delivery | undefined> {
    const next = await this.deliveries.next(timeoutMs);
    return next && !next.done ? next.value : undefined;
  }

  /**
   * Yields deliveries until the stream ends after {@link MessageStream.close}
   * (leaving a `for await` loop early does not close the stream); throws the
   * call's `ConnectError` if the stream fails.
   */
  async *[Symbol.asyncIterator](): AsyncIterator<Delivery> {
    for (;;) {
      const delivery = await this.receive();
      if (delivery === undefined) return;
      yield delivery;
    }
  }

  /**
   * Ends the stream once the broker has answered what was sent; messages
   * delivered but not settled are released for redelivery.
   *
   * @param timeoutMs - How long to wait for the broker before cancelling.
   */
  async close(timeoutMs = 10_000): Promise<void> {
    if (!this.closed) {
      this.closed = true;
      this.requests.end();
    }
    const timer = setTimeout(() => this.abort.abort(), timeoutMs);
    try {
      await this.reader;
    } finally {
      clearTimeout(timer);
    }
  }
}

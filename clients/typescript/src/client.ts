import { create } from "@bufbuild/protobuf";
import { durationFromMs, timestampFromDate } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError, createClient, type Client, type Interceptor, type Transport } from "@connectrpc/connect";
import { createGrpcTransport, Http2SessionManager } from "@connectrpc/connect-node";
import { Health, HealthCheckResponse_ServingStatus } from "./gen/grpc/health/v1/health_pb.js";
import {
  AdminService,
  StartPosition,
  SubscriptionSchema,
  TopicSchema,
  type Subscription,
  type SubscriptionStats,
  type Topic,
} from "./gen/tidings/v1/admin_pb.js";
import type { Message } from "./gen/tidings/v1/message_pb.js";
import { PublisherService, type PublishResult } from "./gen/tidings/v1/publisher_pb.js";
import { SubscriberService, type AckOutcome, type PeekedMessage } from "./gen/tidings/v1/subscriber_pb.js";
import { PublishStream } from "./publisher.js";
import { MessageStream, type FlowControl } from "./subscriber.js";
import { withTraceContext } from "./trace.js";

/** The broker's default address. */
export const DEFAULT_BASE_URL = "http://127.0.0.1:50051";

/**
 * TLS settings of {@link TidingsClient}: PEM data (a string or a Buffer, as
 * Node's `tls` module takes them; read files with `readFileSync`).
 */
export interface TlsOptions {
  /** The CA bundle that signs the broker's certificate (default: Node's built-in roots). */
  ca?: string | Buffer;
  /** The client's certificate chain, for a broker that asks for one (mutual TLS); needs `key`. */
  cert?: string | Buffer;
  /** The private key of `cert`. */
  key?: string | Buffer;
  /**
   * The name to check the broker's certificate against (and to send as
   * SNI), when it differs from the host of `baseUrl`.
   */
  serverName?: string;
}

/** Options of {@link TidingsClient}. */
export interface ClientOptions {
  /**
   * The broker: `http://host:port` (plain-text HTTP/2) or `https://host:port`
   * (TLS; see `tls`). Default `http://127.0.0.1:50051`.
   */
  baseUrl?: string;
  /** Deadline of unary calls in milliseconds (default 30 s). */
  timeoutMs?: number;
  /**
   * TLS settings (CA bundle, client certificate and key for mutual TLS,
   * server name). Needs an `https://` base URL, which without this option
   * trusts Node's built-in roots.
   */
  tls?: TlsOptions;
  /**
   * A bearer token for a broker with access control: sent as
   * `authorization: Bearer <token>` with every call, streams and health
   * included.
   */
  token?: string;
  /**
   * A transport to use instead of the client's own gRPC transport (with
   * your own interceptors, say); {@link TidingsClient.close} leaves it open.
   * Cannot be combined with `tls` or `token`.
   */
  transport?: Transport;
}

/** Options of {@link TidingsClient.createTopic}. */
export interface TopicOptions {
  /** Keep acked messages this long, for replay with Seek. */
  retentionMs?: number;
  /** Expire messages older than this even if not acked. */
  maxAgeMs?: number;
  /** If the topic exists already, return it (settings unchanged) instead of failing. */
  existOk?: boolean;
}

/** Options of {@link TidingsClient.createSubscription}. */
export interface SubscriptionOptions {
  /** `"earliest"` (every message still stored), `"latest"` (the default: only new messages) or a time. */
  start?: "earliest" | "latest" | Date;
  /** Lease length (broker default 30 s). */
  ackDeadlineMs?: number;
  /** Deliveries before dead-lettering (default 10). */
  maxAttempts?: number;
  /** Redelivery backoff after the first failure (default 1 s), doubled per attempt. */
  minBackoffMs?: number;
  /** Longest backoff (default 10 min). */
  maxBackoffMs?: number;
  /** Topic that receives dead-lettered messages. */
  deadLetterTopic?: string;
  /** Deliver each ordering key's messages one at a time. */
  ordered?: boolean;
  /** If the subscription exists already, return it (settings unchanged) instead of failing. */
  existOk?: boolean;
}

/** Health status names of the standard `grpc.health.v1` service. */
export type HealthStatus = keyof typeof HealthCheckResponse_ServingStatus;

/** An interceptor that sends the bearer token with every call. */
function bearerToken(token: string): Interceptor {
  const value = `Bearer ${token}`;
  return (next) => (request) => {
    request.header.set("authorization", value);
    return next(request);
  };
}

/** The transport of a client's own: plain text or TLS, with the token if any. */
function ownTransport(options: ClientOptions): { transport: Transport; sessions: Http2SessionManager } {
  const baseUrl = options.baseUrl ?? DEFAULT_BASE_URL;
  const secure = baseUrl.startsWith("https://");
  if (options.tls && !secure) {
    throw new Error(`TLS was asked for with the plain-text base URL ${baseUrl} (use https://)`);
  }
  if (options.token !== undefined && options.token.trim() === "") throw new Error("the token is empty");
  const tls = options.tls ?? {};
  if ((tls.cert === undefined) !== (tls.key === undefined)) {
    throw new Error("TLS: cert and key go together (mutual TLS needs both)");
  }
  const nodeOptions = secure
    ? { ca: tls.ca, cert: tls.cert, key: tls.key, servername: tls.serverName }
    : undefined;
  const sessions = new Http2SessionManager(baseUrl, undefined, nodeOptions);
  const interceptors = options.token === undefined ? [] : [bearerToken(options.token)];
  return { transport: createGrpcTransport({ baseUrl, sessionManager: sessions, interceptors }), sessions };
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/**
 * A connection to a tidings broker over gRPC (HTTP/2, Connect-ES).
 *
 * The generated Connect clients are available as {@link TidingsClient.publisher},
 * {@link TidingsClient.subscriber}, {@link TidingsClient.admin} and
 * {@link TidingsClient.healthService} for calls this layer does not wrap
 * (Seek, dead letters, ...). Failed calls reject with a `ConnectError`
 * whose `code` is the gRPC status and `rawMessage` the broker's text.
 *
 * ```ts
 * const client = new TidingsClient({ baseUrl: "http://127.0.0.1:50051" });
 * await client.publish([message("orders", JSON.stringify({ order: 42 }))]);
 * client.close();
 *
 * // TLS and a token; mutual TLS adds cert and key to tls.
 * const secured = new TidingsClient({
 *   baseUrl: "https://broker.internal:50051",
 *   tls: { ca: readFileSync("ca.pem") },
 *   token: process.env.TIDINGS_TOKEN,
 * });
 * ```
 *
 * @throws `Error` for contradictory options: `tls` with an `http://` base
 *   URL, `tls` or `token` with `transport`, a certificate without its key,
 *   an empty token.
 */
export class TidingsClient {
  /** Generated client of `tidings.v1.PublisherService`. */
  readonly publisher: Client<typeof PublisherService>;
  /** Generated client of `tidings.v1.SubscriberService`. */
  readonly subscriber: Client<typeof SubscriberService>;
  /** Generated client of `tidings.v1.AdminService`. */
  readonly admin: Client<typeof AdminService>;
  /** Generated client of `grpc.health.v1.Health`. */
  readonly healthService: Client<typeof Health>;
  /** Deadline of unary calls in milliseconds. */
  readonly timeoutMs: number;
  private readonly sessions?: Http2SessionManager;

  constructor(options: ClientOptions = {}) {
    this.timeoutMs = options.timeoutMs ?? 30_000;
    let transport = options.transport;
    if (transport) {
      if (options.tls || options.token !== undefined) {
        throw new Error("tls and token cannot be combined with transport (give them to your transport)");
      }
    } else {
      const own = ownTransport(options);
      transport = own.transport;
      this.sessions = own.sessions;
    }
    this.publisher = createClient(PublisherService, transport);
    this.subscriber = createClient(SubscriberService, transport);
    this.admin = createClient(AdminService, transport);
    this.healthService = createClient(Health, transport);
  }

  /** Closes the connection (streams still open fail). */
  close(): void {
    this.sessions?.abort();
  }

  /**
   * Creates a topic.
   *
   * @param name - 1 to 255 letters, digits, `.`, `_` or `-`.
   * @returns The topic as stored.
   * @throws `ConnectError` with `AlreadyExists` if the name is taken (unless
   *   `existOk`), `InvalidArgument` for a bad name.
   */
  async createTopic(name: string, options: TopicOptions = {}): Promise<Topic> {
    const topic = create(TopicSchema, {
      name,
      retention: options.retentionMs === undefined ? undefined : durationFromMs(options.retentionMs),
      maxAge: options.maxAgeMs === undefined ? undefined : durationFromMs(options.maxAgeMs),
    });
    const callOptions = { timeoutMs: this.timeoutMs };
    try {
      const response = await this.admin.createTopic({ topic }, callOptions);
      return response.topic ?? topic;
    } catch (e) {
      if (!(options.existOk && ConnectError.from(e).code === Code.AlreadyExists)) throw e;
    }
    return (await this.admin.getTopic({ name }, callOptions)).topic ?? topic;
  }

  /**
   * Creates a subscription: an independent stream of every message of `topic`.
   *
   * @returns The subscription as stored.
   * @throws `ConnectError` with `NotFound` for an unknown topic,
   *   `AlreadyExists` if the name is taken (unless `existOk`).
   */
  async createSubscription(name: string, topic: string, options: SubscriptionOptions = {}): Promise<Subscription> {
    const start = options.start ?? "latest";
    const ms = (value: number | undefined) => (value === undefined ? undefined : durationFromMs(value));
    const subscription = create(SubscriptionSchema, {
      name,
      topic,
      ackDeadline: ms(options.ackDeadlineMs),
      maxAttempts: options.maxAttempts ?? 0,
      minBackoff: ms(options.minBackoffMs),
      maxBackoff: ms(options.maxBackoffMs),
      deadLetterTopic: options.deadLetterTopic ?? "",
      ordered: options.ordered ?? false,
      start:
        start instanceof Date
          ? { case: "startTime", value: timestampFromDate(start) }
          : { case: "startPosition", value: start === "earliest" ? StartPosition.EARLIEST : StartPosition.LATEST },
    });
    const callOptions = { timeoutMs: this.timeoutMs };
    try {
      const response = await this.admin.createSubscription({ subscription }, callOptions);
      return response.subscription ?? subscription;
    } catch (e) {
      if (!(options.existOk && ConnectError.from(e).code === Code.AlreadyExists)) throw e;
    }
    return (await this.admin.getSubscription({ name }, callOptions)).subscription ?? subscription;
  }

  /** Counters and gauges of a subscription (backlog, in flight, acked, redelivered, ...). */
  async subscriptionStats(subscription: string): Promise<SubscriptionStats> {
    const response = await this.admin.getSubscriptionStats({ subscription }, { timeoutMs: this.timeoutMs });
    if (!response.stats) throw new ConnectError("the broker sent no stats", Code.Internal);
    return response.stats;
  }

  /**
   * Publishes a batch of messages in one commit.
   *
   * Messages without a `traceparent` attribute are sent with the active
   * OpenTelemetry span's (see {@link messageContext}), when
   * `@opentelemetry/api` is installed and a span is active; the objects
   * passed in are not modified.
   *
   * `Unavailable` failures are retried with exponential backoff, which is
   * safe because message ids make publishing idempotent: a message stored
   * before the failure comes back with `duplicate: true`.
   *
   * @param messages - The messages (see {@link message}), each naming its topic.
   * @param retries - Retries after an `Unavailable` failure.
   * @returns One result per message, in order: `id`, `sequence`, and
   *   `duplicate` (the id had already been published to that topic;
   *   `sequence` is then the original's).
   * @throws `ConnectError`, e.g. `InvalidArgument` naming the bad message or
   *   `NotFound` for an unknown topic; a batch with any bad message stores
   *   none of it.
   */
  async publish(messages: Message[], retries = 3): Promise<PublishResult[]> {
    // Read before the first await: the active span is the caller's.
    messages = withTraceContext(messages);
    let delay = 100;
    for (let attempt = 0; ; attempt++) {
      try {
        const response = await this.publisher.publish({ messages }, { timeoutMs: this.timeoutMs });
        return response.results;
      } catch (e) {
        if (attempt >= retries || ConnectError.from(e).code !== Code.Unavailable) throw e;
        await sleep(delay);
        delay = Math.min(delay * 2, 5000);
      }
    }
  }

  /**
   * Opens a pipelined publish stream (see {@link PublishStream}).
   *
   * @param maxInFlight - Most batches sent and not yet answered.
   */
  publishStream(maxInFlight = 16): PublishStream {
    return new PublishStream(this.publisher, maxInFlight);
  }

  /**
   * Opens a streaming subscription (see {@link MessageStream}).
   *
   * @param subscription - The subscription name.
   * @param flow - Flow control: most unsettled messages and bytes.
   */
  subscribe(subscription: string, flow: FlowControl = {}): MessageStream {
    return new MessageStream(this.subscriber, subscription, flow);
  }

  /**
   * Acknowledges deliveries with a unary call.
   *
   * @returns One outcome per ack id.
   * @throws `ConnectError` with `FailedPrecondition` if any ack id was stale
   *   or unknown (the message names the first; the others were committed).
   */
  async ack(subscription: string, ackIds: string[]): Promise<AckOutcome[]> {
    const response = await this.subscriber.ack({ subscription, ackIds }, { timeoutMs: this.timeoutMs });
    return response.outcomes;
  }

  /**
   * The messages waiting on a subscription, oldest first, without leasing
   * them: no attempt, counter or lease changes.
   *
   * @param maxMessages - Most messages to return (pages are followed).
   * @returns `PeekedMessage`s: `message`, `state` (`MessageState.NEW`,
   *   `READY`, `BACKOFF`, `LEASED` or `HELD`), `attempts`, `availableTime`
   *   and `lastFailureReason`.
   */
  async peek(subscription: string, maxMessages = 100): Promise<PeekedMessage[]> {
    const found: PeekedMessage[] = [];
    let pageToken = "";
    while (found.length < maxMessages) {
      const pageSize = Math.min(maxMessages - found.length, 1000);
      const response = await this.subscriber.peek({ subscription, pageSize, pageToken }, { timeoutMs: this.timeoutMs });
      found.push(...response.messages);
      pageToken = response.nextPageToken;
      if (!pageToken) break;
    }
    return found.slice(0, maxMessages);
  }

  /**
   * Checks health with the standard `grpc.health.v1` service.
   *
   * @param service - `""` for the server, or a service name such as
   *   `"tidings.v1.PublisherService"`.
   * @returns `"SERVING"`, `"NOT_SERVING"` (storage failing or the broker
   *   draining) or `"UNKNOWN"`.
   * @throws `ConnectError` with `NotFound` for an unknown service.
   */
  async health(service = ""): Promise<HealthStatus> {
    const response = await this.healthService.check({ service }, { timeoutMs: this.timeoutMs });
    return HealthCheckResponse_ServingStatus[response.status] as HealthStatus;
  }
}

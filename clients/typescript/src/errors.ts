import { AckOperation, AckResult, type AckOutcome } from "./gen/tidings/v1/subscriber_pb.js";

/**
 * The broker refused an ack, nack or lease extension sent on a stream.
 *
 * `STALE`: the lease had expired or the message was leased again since, so
 * the message will be (or was) delivered again. `UNKNOWN`: no such delivery
 * (malformed ack id, already acked, or purged).
 */
export class AckRefused extends Error {
  override readonly name = "AckRefused";

  /**
   * @param ackId - The refused ack id.
   * @param operation - `"ack"`, `"nack"` or `"extend"`.
   * @param result - `"STALE"` or `"UNKNOWN"`.
   * @param detail - The broker's explanation.
   */
  constructor(
    readonly ackId: string,
    readonly operation: "ack" | "nack" | "extend",
    readonly result: "STALE" | "UNKNOWN",
    readonly detail: string,
  ) {
    super(`${operation} refused (${result}): ${detail}`);
  }

  /** Builds the error from a refused outcome. */
  static fromOutcome(outcome: AckOutcome): AckRefused {
    const operation =
      outcome.operation === AckOperation.NACK ? "nack" : outcome.operation === AckOperation.EXTEND ? "extend" : "ack";
    const result = outcome.result === AckResult.STALE ? "STALE" : "UNKNOWN";
    return new AckRefused(outcome.ackId, operation, result, outcome.detail);
  }
}

/** The stream ended (or was closed) before the broker answered. */
export class StreamClosed extends Error {
  override readonly name = "StreamClosed";
}

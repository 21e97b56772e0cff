import type { Span } from "@opentelemetry/api";
import type { Delivery } from "./subscriber.js";
import { inConsumerSpan, markFailed } from "./trace.js";

/**
 * The part of a synchronous SQLite connection the inbox uses; a
 * `better-sqlite3` `Database` fits.
 */
export interface SqliteDatabase {
  /** Runs SQL without parameters. */
  exec(sql: string): unknown;
  /** Prepares a statement. */
  prepare(sql: string): {
    run(...params: unknown[]): { changes: number | bigint };
    get(...params: unknown[]): unknown;
  };
  /** Whether a transaction is open. */
  readonly inTransaction: boolean;
}

/** What {@link Inbox.handle} did with a delivery. */
export enum InboxResult {
  /** The handler ran and its writes were committed; the delivery was acked. */
  Processed = "processed",
  /** The message id was already recorded: the handler was skipped and the delivery acked. */
  Duplicate = "duplicate",
  /** The handler threw: its writes were rolled back and the delivery nacked with the error as reason. */
  Failed = "failed",
}

/**
 * Processes one message inside the inbox's transaction, with the same
 * connection. It must not commit or roll back; throwing fails the delivery.
 */
export type InboxHandler<Db extends SqliteDatabase> = (delivery: Delivery, db: Db) => unknown | Promise<unknown>;

const IDENTIFIER = /^[A-Za-z_][A-Za-z0-9_]*$/;

/**
 * Exactly-once processing of a subscription's messages with a SQLite
 * database (e.g. `better-sqlite3`).
 *
 * The broker delivers at least once: a message comes again when its ack is
 * lost, late, or the consumer stops between its commit and the ack. The
 * inbox records each processed message id in the same transaction as the
 * handler's writes, in the table the Rust crate ships (`migrations/inbox/`),
 * so that consumers in any language share it and prune it by the broker's
 * `ack_watermark`:
 *
 * ```sql
 * CREATE TABLE tidings_inbox (
 *   subscription TEXT NOT NULL,
 *   message_id   TEXT NOT NULL,
 *   sequence     BIGINT NOT NULL,
 *   processed_at TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP,
 *   PRIMARY KEY (subscription, message_id)
 * );
 * CREATE INDEX tidings_inbox_sequence ON tidings_inbox (subscription, sequence);
 * ```
 *
 * For each delivery: begin, insert the id (a conflict means it was
 * processed already: skip the handler), run the handler, commit, then ack.
 * A handler error rolls back and nacks with the error as reason.
 *
 * With `@opentelemetry/api` installed, each delivery is handled in a
 * `process <topic>` consumer span (active while the handler runs) whose
 * parent is the producer's span, from the message's `traceparent`
 * attribute (see {@link messageContext}).
 *
 * Calls to {@link Inbox.handle} on one inbox run one at a time (the handler
 * may be async); do not write through the same connection elsewhere
 * meanwhile.
 *
 * ```ts
 * const inbox = new Inbox(db, "billing");
 * inbox.createTable();
 * for await (const delivery of client.subscribe("billing")) {
 *   await inbox.handle(delivery, (d, db) => db.prepare("INSERT ...").run(...));
 * }
 * ```
 */
export class Inbox<Db extends SqliteDatabase = SqliteDatabase> {
  private readonly insert: string;
  private readonly select: string;
  private queue: Promise<unknown> = Promise.resolve();

  /**
   * @param db - The connection (not inside a transaction).
   * @param subscription - The subscription whose message ids are recorded
   *   (a message may be processed once per subscription).
   * @param table - Name of the inbox table.
   */
  constructor(
    readonly db: Db,
    readonly subscription: string,
    readonly table = "tidings_inbox",
  ) {
    if (!IDENTIFIER.test(table)) throw new RangeError(`table ${JSON.stringify(table)} is not a plain SQL identifier`);
    this.insert =
      `INSERT INTO ${table} (subscription, message_id, sequence) VALUES (?, ?, ?) ` +
      "ON CONFLICT (subscription, message_id) DO NOTHING";
    this.select = `SELECT 1 FROM ${table} WHERE subscription = ? AND message_id = ?`;
  }

  /** Creates the inbox table and its index if they do not exist (the same
   * table as the crate's `migrations/inbox/`). */
  createTable(): void {
    this.db.exec(
      `CREATE TABLE IF NOT EXISTS ${this.table} (` +
        "subscription TEXT NOT NULL, " +
        "message_id TEXT NOT NULL, " +
        "sequence BIGINT NOT NULL, " +
        "processed_at TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP, " +
        "PRIMARY KEY (subscription, message_id)); " +
        `CREATE INDEX IF NOT EXISTS ${this.table.replace(".", "_")}_sequence ON ${this.table} (subscription, sequence)`,
    );
  }

  /** Whether the message id is recorded as processed. */
  processed(messageId: string): boolean {
    return this.db.prepare(this.select).get(this.subscription, messageId) !== undefined;
  }

  /**
   * Processes one delivery at most once.
   *
   * The ack or nack is sent without waiting for its outcome: if it is lost
   * or refused as stale, the message comes again and is skipped as a
   * duplicate.
   *
   * @returns What happened (see {@link InboxResult}).
   * @throws Database errors of the inbox's own statements or of the commit,
   *   after rolling back; the delivery is then left to be redelivered.
   */
  handle(delivery: Delivery, handler: InboxHandler<Db>): Promise<InboxResult> {
    const run = this.queue.then(() => this.handleNow(delivery, handler));
    this.queue = run.catch(() => {});
    return run;
  }

  private handleNow(delivery: Delivery, handler: InboxHandler<Db>): Promise<InboxResult> {
    return inConsumerSpan(delivery, this.subscription, async (span) => {
      const result = await this.process(delivery, handler, span);
      span?.setAttribute("tidings.inbox.result", result);
      return result;
    });
  }

  private async process(delivery: Delivery, handler: InboxHandler<Db>, span: Span | undefined): Promise<InboxResult> {
    const db = this.db;
    db.exec("BEGIN IMMEDIATE");
    let claimed: boolean;
    try {
      claimed = Number(db.prepare(this.insert).run(this.subscription, delivery.id, delivery.sequence).changes) === 1;
    } catch (e) {
      db.exec("ROLLBACK");
      throw e;
    }
    if (!claimed) {
      db.exec("ROLLBACK");
      void delivery.ack();
      return InboxResult.Duplicate;
    }
    try {
      await handler(delivery, db);
    } catch (e) {
      if (db.inTransaction) db.exec("ROLLBACK");
      const reason = e instanceof Error ? `${e.name}: ${e.message}` : String(e);
      markFailed(span, e);
      void delivery.nack({ reason });
      return InboxResult.Failed;
    }
    try {
      db.exec("COMMIT");
    } catch (e) {
      if (db.inTransaction) db.exec("ROLLBACK");
      throw e;
    }
    void delivery.ack();
    return InboxResult.Processed;
  }
}

-- tidings inbox for SQLite. Idempotent: run it with any migration tool, or
-- let `tidings::inbox::Inbox::migrate` run it.
--
-- A consumer records each message it processes here, in the same
-- transaction as the handler's own writes:
--
--   BEGIN;
--   INSERT INTO tidings_inbox (subscription, message_id, sequence)
--     VALUES ('shipping', '0190...', 42) ON CONFLICT DO NOTHING;
--   -- no row inserted (changes() = 0): a duplicate, processed before; skip
--   -- the handler; one row inserted: run the handler's writes
--   COMMIT;   -- then ack the delivery
--
-- A row may be deleted once the subscription's ack_watermark (in the
-- broker's GetSubscriptionStats) is at or above its sequence: the broker
-- cannot deliver that message again, short of a Seek back.

CREATE TABLE IF NOT EXISTS tidings_inbox (
    -- The subscription the message was delivered on: a message is processed
    -- once per subscription.
    subscription TEXT    NOT NULL,
    -- The message id (the UUID the producer chose), in its text form.
    message_id   TEXT    NOT NULL,
    -- The message's sequence number in its topic, for pruning.
    sequence     INTEGER NOT NULL,
    -- UTC, 'YYYY-MM-DD HH:MM:SS.SSS': sorts as text.
    processed_at TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%d %H:%M:%f', 'now')),
    PRIMARY KEY (subscription, message_id)
);

-- Pruning by watermark walks a subscription's rows in sequence order.
CREATE INDEX IF NOT EXISTS tidings_inbox_sequence
    ON tidings_inbox (subscription, sequence);

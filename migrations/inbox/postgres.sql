-- tidings inbox for PostgreSQL. Idempotent: run it with any migration tool,
-- or let `tidings::inbox::Inbox::migrate` run it.
--
-- A consumer records each message it processes here, in the same
-- transaction as the handler's own writes:
--
--   BEGIN;
--   INSERT INTO tidings_inbox (subscription, message_id, sequence)
--     VALUES ('shipping', '0190...', 42) ON CONFLICT DO NOTHING;
--   -- no row inserted: a duplicate, processed before; skip the handler
--   -- one row inserted: run the handler's writes
--   COMMIT;   -- then ack the delivery
--
-- A row may be deleted once the subscription's ack_watermark (in the
-- broker's GetSubscriptionStats) is at or above its sequence: the broker
-- cannot deliver that message again, short of a Seek back.

CREATE TABLE IF NOT EXISTS tidings_inbox (
    -- The subscription the message was delivered on: a message is processed
    -- once per subscription.
    subscription text        NOT NULL,
    -- The message id (the UUID the producer chose), in its text form.
    message_id   text        NOT NULL,
    -- The message's sequence number in its topic, for pruning.
    sequence     bigint      NOT NULL,
    processed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (subscription, message_id)
);

-- Pruning by watermark walks a subscription's rows in sequence order.
CREATE INDEX IF NOT EXISTS tidings_inbox_sequence
    ON tidings_inbox (subscription, sequence);

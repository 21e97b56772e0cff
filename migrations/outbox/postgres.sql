-- tidings outbox for PostgreSQL (11 or later). Idempotent: run it with any
-- migration tool, or let `tidings relay` / `tidings::outbox::Outbox::migrate`
-- run it. An application enqueues a notification by inserting a row in the
-- same transaction as its own change:
--
--   INSERT INTO tidings_outbox (topic, key, payload) VALUES ('orders', 'customer-7', '...');
--
-- Every other column has a default. The relay publishes rows to the broker in
-- `seq` order and deletes each row only after the broker has durably stored
-- its message.

CREATE SEQUENCE IF NOT EXISTS tidings_outbox_seq;

-- A time-ordered UUID (version 7): 48 bits of Unix milliseconds, then random
-- bits. gen_random_uuid() sets the variant and version 4 (0100); two more
-- bits make the version 7 (0111).
CREATE OR REPLACE FUNCTION tidings_uuid_v7() RETURNS uuid
LANGUAGE sql VOLATILE AS $$
  SELECT encode(
    set_bit(set_bit(
      overlay(uuid_send(gen_random_uuid())
              PLACING substring(int8send((extract(epoch FROM clock_timestamp()) * 1000)::bigint) FROM 3)
              FROM 1 FOR 6),
      52, 1), 53, 1)
  , 'hex')::uuid
$$;

CREATE TABLE IF NOT EXISTS tidings_outbox (
    -- Publish order. Set by the trigger below at insert, after the key lock.
    seq         bigint PRIMARY KEY,
    -- The message id, end to end: the broker deduplicates on it.
    id          uuid NOT NULL DEFAULT tidings_uuid_v7(),
    topic       text NOT NULL,
    -- Ordering key; NULL or '' for none.
    key         text,
    payload     bytea NOT NULL,
    -- A JSON object of string values, or NULL.
    attributes  jsonb,
    created_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    -- Set by the relay when the broker refused the message (unknown topic,
    -- payload over the limit): the row waits until not_before, and so do the
    -- later rows of its key.
    attempts    integer NOT NULL DEFAULT 0,
    last_error  text,
    not_before  timestamptz
);

CREATE INDEX IF NOT EXISTS tidings_outbox_held
    ON tidings_outbox (topic, key, seq) WHERE not_before IS NOT NULL;

-- Commit order within a key: a transaction inserting a row with a key holds a
-- transaction-scoped advisory lock on (topic, key) until it ends, and takes
-- its sequence number only after the lock. So a row never becomes visible
-- after a later row of its key: a late commit cannot be reordered or skipped.
-- (The two-integer form of advisory locks does not overlap the one-integer
-- form applications usually use.)
CREATE OR REPLACE FUNCTION tidings_outbox_before_insert() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  IF NEW.key IS NOT NULL AND NEW.key <> '' THEN
    PERFORM pg_advisory_xact_lock(1953066081, hashtext(NEW.topic || ' ' || NEW.key));
  END IF;
  NEW.seq := nextval('tidings_outbox_seq');
  RETURN NEW;
END
$$;

-- Wakes relays waiting with LISTEN tidings_outbox; PostgreSQL delivers it at
-- commit and never for a rolled-back transaction.
CREATE OR REPLACE FUNCTION tidings_outbox_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  PERFORM pg_notify('tidings_outbox', '');
  RETURN NULL;
END
$$;

DO $$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgname = 'tidings_outbox_seq'
                 AND tgrelid = 'tidings_outbox'::regclass) THEN
    CREATE TRIGGER tidings_outbox_seq BEFORE INSERT ON tidings_outbox
      FOR EACH ROW EXECUTE FUNCTION tidings_outbox_before_insert();
  END IF;
  IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgname = 'tidings_outbox_notify'
                 AND tgrelid = 'tidings_outbox'::regclass) THEN
    CREATE TRIGGER tidings_outbox_notify AFTER INSERT ON tidings_outbox
      FOR EACH STATEMENT EXECUTE FUNCTION tidings_outbox_notify();
  END IF;
END
$$;

-- One row per running relay: what `tidings stats --outbox` reports.
CREATE TABLE IF NOT EXISTS tidings_outbox_relays (
    relay            text PRIMARY KEY,
    started_at       timestamptz NOT NULL,
    heartbeat_at     timestamptz NOT NULL,
    leader           boolean NOT NULL,
    published        bigint NOT NULL,
    last_publish_at  timestamptz,
    last_error       text
);

-- How often the relay writes its row, in microseconds: `tidings stats`
-- counts a relay whose heartbeat is older than three of these as gone (a
-- relay killed with SIGKILL never removes its row). NULL in rows of relays
-- older than this column; stats judge those by the default interval (5 s).
ALTER TABLE tidings_outbox_relays ADD COLUMN IF NOT EXISTS heartbeat_interval_us bigint;

-- tidings outbox for SQLite (3.35 or later). Idempotent: run it with any
-- migration tool, or let `tidings relay` / `tidings::outbox::Outbox::migrate`
-- run it. An application enqueues a notification by inserting a row in the
-- same transaction as its own change:
--
--   INSERT INTO tidings_outbox (topic, key, payload) VALUES ('orders', 'customer-7', '...');
--
-- Every other column has a default. The relay publishes rows to the broker in
-- `seq` order and deletes each row only after the broker has durably stored
-- its message. SQLite runs one write transaction at a time, so `seq` order is
-- commit order.

CREATE TABLE IF NOT EXISTS tidings_outbox (
    -- Publish order (the rowid); never reused, so an id is never confused.
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    -- The message id, end to end: the broker deduplicates on it. The default
    -- is a time-ordered UUID (version 7): 48 bits of Unix milliseconds, then
    -- random bits with the version and variant set.
    id          TEXT NOT NULL DEFAULT (
                  substr(printf('%012x', CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)), 1, 8) || '-' ||
                  substr(printf('%012x', CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)), 9, 4) || '-7' ||
                  substr(lower(hex(randomblob(2))), 2, 3) || '-' ||
                  substr('89ab', 1 + (abs(random()) % 4), 1) ||
                  substr(lower(hex(randomblob(2))), 2, 3) || '-' ||
                  lower(hex(randomblob(6)))),
    topic       TEXT NOT NULL,
    -- Ordering key; NULL or '' for none.
    key         TEXT,
    -- Bytes; a TEXT value is sent as its UTF-8 bytes.
    payload     BLOB NOT NULL,
    -- A JSON object of string values, or NULL.
    attributes  TEXT,
    -- Unix microseconds.
    created_at  INTEGER NOT NULL DEFAULT (CAST((julianday('now') - 2440587.5) * 86400000000.0 AS INTEGER)),
    -- Set by the relay when the broker refused the message (unknown topic,
    -- payload over the limit): the row waits until not_before (Unix
    -- microseconds), and so do the later rows of its key.
    attempts    INTEGER NOT NULL DEFAULT 0,
    last_error  TEXT,
    not_before  INTEGER
);

CREATE INDEX IF NOT EXISTS tidings_outbox_held
    ON tidings_outbox (topic, key, seq) WHERE not_before IS NOT NULL;

-- One row per running relay: what `tidings stats --outbox` reports.
-- Times are Unix microseconds. heartbeat_interval_us is how often the relay
-- writes its row: `tidings stats` counts a relay whose heartbeat is older
-- than three of these as gone (a relay killed with SIGKILL never removes its
-- row); NULL (a relay older than the column) is judged by the default, 5 s.
--
-- SQLite has no ADD COLUMN IF NOT EXISTS, so this file cannot add the
-- column to a table an older tidings created; `Outbox::migrate` (and so
-- `tidings relay`) adds it. Running this file with your own tool on such a
-- database, run once by hand as well:
--
--   ALTER TABLE tidings_outbox_relays ADD COLUMN heartbeat_interval_us INTEGER;
CREATE TABLE IF NOT EXISTS tidings_outbox_relays (
    relay                  TEXT PRIMARY KEY,
    started_at             INTEGER NOT NULL,
    heartbeat_at           INTEGER NOT NULL,
    leader                 INTEGER NOT NULL,
    published              INTEGER NOT NULL,
    last_publish_at        INTEGER,
    last_error             TEXT,
    heartbeat_interval_us  INTEGER
);

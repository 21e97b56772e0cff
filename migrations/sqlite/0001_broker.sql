-- tidings broker schema, SQLite. Instants are microseconds since the Unix
-- epoch, durations microseconds.

CREATE TABLE topics (
    id            INTEGER PRIMARY KEY,
    name          TEXT    NOT NULL UNIQUE,
    created_at    INTEGER NOT NULL,
    retention_us  INTEGER NOT NULL DEFAULT 0,
    max_age_us    INTEGER NOT NULL DEFAULT 0,
    last_seq      INTEGER NOT NULL DEFAULT 0,
    expired_count INTEGER NOT NULL DEFAULT 0
);

-- Each message once per topic, in sequence order: appends only touch the
-- right edge of the B-tree.
CREATE TABLE messages (
    topic_id     INTEGER NOT NULL,
    seq          INTEGER NOT NULL,
    id           BLOB    NOT NULL,
    key          TEXT,
    payload      BLOB    NOT NULL,
    attributes   BLOB,
    created_at   INTEGER,
    published_at INTEGER NOT NULL,
    PRIMARY KEY (topic_id, seq)
) WITHOUT ROWID;

-- Publish idempotency: outlives the message for the dedup window.
CREATE TABLE dedup (
    topic_id     INTEGER NOT NULL,
    id           BLOB    NOT NULL,
    seq          INTEGER NOT NULL,
    published_at INTEGER NOT NULL,
    PRIMARY KEY (topic_id, id)
) WITHOUT ROWID;
CREATE INDEX dedup_by_time ON dedup (published_at);

CREATE TABLE subscriptions (
    id                INTEGER PRIMARY KEY,
    name              TEXT    NOT NULL UNIQUE,
    topic_id          INTEGER NOT NULL REFERENCES topics (id),
    created_at        INTEGER NOT NULL,
    ack_deadline_us   INTEGER NOT NULL,
    max_attempts      INTEGER NOT NULL,
    min_backoff_us    INTEGER NOT NULL,
    max_backoff_us    INTEGER NOT NULL,
    dead_letter_topic TEXT,
    ordered           INTEGER NOT NULL,
    -- Every message with seq <= cursor has a row in deliveries or is done.
    cursor            INTEGER NOT NULL,
    delivered         INTEGER NOT NULL DEFAULT 0,
    acked             INTEGER NOT NULL DEFAULT 0,
    redelivered       INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX subscriptions_by_topic ON subscriptions (topic_id);

-- Per-subscription state of messages past nobody's ack: leased (state 1,
-- available_at = lease deadline), waiting (state 0, available_at = when it may
-- be delivered), dead (state 2, available_at = when it died). Acked messages
-- have no row.
CREATE TABLE deliveries (
    sub_id           INTEGER NOT NULL,
    seq              INTEGER NOT NULL,
    state            INTEGER NOT NULL,
    attempt          INTEGER NOT NULL,
    available_at     INTEGER NOT NULL,
    lease            INTEGER NOT NULL DEFAULT 0,
    first_delivery_at INTEGER,
    last_delivery_at INTEGER,
    reason           TEXT,
    key              TEXT,
    PRIMARY KEY (sub_id, seq)
) WITHOUT ROWID;
CREATE INDEX deliveries_due ON deliveries (sub_id, state, available_at);
CREATE INDEX deliveries_by_key ON deliveries (sub_id, key, seq) WHERE key IS NOT NULL;

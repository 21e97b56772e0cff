-- tidings broker schema, PostgreSQL. Instants are microseconds since the Unix
-- epoch, durations microseconds. Several broker instances share one database.

CREATE TABLE topics (
    id            BIGSERIAL PRIMARY KEY,
    name          TEXT   NOT NULL UNIQUE,
    created_at    BIGINT NOT NULL,
    retention_us  BIGINT NOT NULL DEFAULT 0,
    max_age_us    BIGINT NOT NULL DEFAULT 0,
    -- The per-topic counter. Publishing locks this row until commit, so
    -- sequence numbers of a topic commit in order across instances.
    last_seq      BIGINT NOT NULL DEFAULT 0,
    expired_count BIGINT NOT NULL DEFAULT 0
);

CREATE TABLE messages (
    topic_id     BIGINT NOT NULL,
    seq          BIGINT NOT NULL,
    id           BYTEA  NOT NULL,
    key          TEXT,
    payload      BYTEA  NOT NULL,
    attributes   BYTEA,
    created_at   BIGINT,
    published_at BIGINT NOT NULL,
    PRIMARY KEY (topic_id, seq)
);

CREATE TABLE dedup (
    topic_id     BIGINT NOT NULL,
    id           BYTEA  NOT NULL,
    seq          BIGINT NOT NULL,
    published_at BIGINT NOT NULL,
    PRIMARY KEY (topic_id, id)
);
CREATE INDEX dedup_by_time ON dedup (published_at);

CREATE TABLE subscriptions (
    id                BIGSERIAL PRIMARY KEY,
    name              TEXT    NOT NULL UNIQUE,
    topic_id          BIGINT  NOT NULL REFERENCES topics (id),
    created_at        BIGINT  NOT NULL,
    ack_deadline_us   BIGINT  NOT NULL,
    max_attempts      INTEGER NOT NULL,
    min_backoff_us    BIGINT  NOT NULL,
    max_backoff_us    BIGINT  NOT NULL,
    dead_letter_topic TEXT,
    ordered           BOOLEAN NOT NULL,
    -- Every message with seq <= cursor has a row in deliveries or is done.
    -- Leasing new messages locks this row until commit.
    cursor            BIGINT  NOT NULL,
    delivered         BIGINT  NOT NULL DEFAULT 0,
    acked             BIGINT  NOT NULL DEFAULT 0,
    redelivered       BIGINT  NOT NULL DEFAULT 0
);
CREATE INDEX subscriptions_by_topic ON subscriptions (topic_id);

-- As in SQLite: state 0 waiting (available_at = when it may be delivered),
-- 1 leased (available_at = lease deadline), 2 dead (available_at = when it
-- died). Acked messages have no row.
CREATE TABLE deliveries (
    sub_id            BIGINT  NOT NULL,
    seq               BIGINT  NOT NULL,
    state             BIGINT  NOT NULL,
    attempt           INTEGER NOT NULL,
    available_at      BIGINT  NOT NULL,
    lease             BIGINT  NOT NULL DEFAULT 0,
    first_delivery_at BIGINT,
    last_delivery_at  BIGINT,
    reason            TEXT,
    key               TEXT,
    PRIMARY KEY (sub_id, seq)
);
CREATE INDEX deliveries_due ON deliveries (sub_id, state, available_at);
CREATE INDEX deliveries_by_key ON deliveries (sub_id, key, seq) WHERE key IS NOT NULL;

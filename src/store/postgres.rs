//! The PostgreSQL backend, for several broker instances on one database:
//! connecting, migrations, the listener that turns other instances' NOTIFYs
//! into local wake-ups, and PostgreSQL's SQL for each statement of
//! [`Backend`]. The schema is in `migrations/postgres/`.
//!
//! The database is shared (`EXCLUSIVE` is false), so the locks are real:
//! publishing locks the topic's row (the per-topic counter), so sequence
//! numbers of a topic commit in order; leasing new messages locks the
//! subscription's row; redeliveries, expiries and acks lock the delivery
//! rows they touch (`FOR UPDATE SKIP LOCKED` where another instance may hold
//! them). Id lists are passed as arrays and unpacked with `unnest`, each
//! element looked up on its own by key (see `locked_rows!`). The `sql`
//! module holds the text of the statements written once in `statements.rs`;
//! the statements that pass lists are written here.

use std::collections::HashMap;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgConnection, PgPoolOptions, PgRow};
use sqlx::{Connection, Row};
use tokio::sync::watch;
use uuid::Uuid;

use super::backend::{Backend, Earlier, KeyOrderRow, LeaseState, split_key_order};
use super::common::{
    CHUNK, DeliveryCounts, DeliveryRow, SubRow, TopicRow, Touched, dead_letter_from_row,
    decode_err, encode_attributes, message_from_row, peeked_from_row, runs_behind, uuid_from,
};
use super::held::HeldMessages;
use super::listener::{Heard, ListenCheck, WatchedListener};
use super::reader::Reader;
use super::writer::Writer;
use super::{Notifier, StoreConfig};
use crate::error::{Error, Result};
use crate::model::{
    DeadLetter, Micros, NewMessage, PeekedMessage, StoredMessage, SubscriptionSettings, micros,
    now_micros,
};

/// Schema versions, applied in order at open.
const MIGRATIONS: &[(i64, &str)] = &[
    (1, include_str!("../../migrations/postgres/0001_broker.sql")),
    (
        2,
        include_str!("../../migrations/postgres/0002_leases_by_deadline.sql"),
    ),
    (
        3,
        include_str!("../../migrations/postgres/0003_out_of_turn.sql"),
    ),
];

// How a statement finds the rows of an id list: each id is a key lookup of
// its own, `CROSS JOIN LATERAL (SELECT … WHERE <the whole key> = … LIMIT 1)`
// (or `FOR UPDATE`, which also keeps the subquery apart). A plain join
// (`unnest(…) JOIN t ON …`, `IN (SELECT unnest(…))`, `= ANY`) leaves the
// plan to the statistics: on a table never analysed, or analysed while
// nearly empty, PostgreSQL takes the subscription (or topic) for a few rows,
// reads all of it and matches every id against every row, so each ack cost
// more the longer the backlog (issue 16, item 3). A lateral subquery with
// LIMIT or FOR UPDATE is never merged into a join, and an equality on every
// column of a unique index is one row whatever the statistics say.
//
// UPDATE and DELETE cannot be written that way, so they find the rows' ctids
// like that and change the rows by ctid (a TID scan). That is only right for
// rows this transaction has locked in an earlier statement: an unlocked row
// may get a new version, and so a new ctid, after the statement's snapshot.
/// Where-clause of an UPDATE or DELETE of the subscription `$sub`'s rows
/// `$seqs`, which the transaction has locked in an earlier statement.
macro_rules! locked_rows {
    ($sub:literal, $seqs:literal) => {
        concat!(
            "ctid = ANY(ARRAY(SELECT r.ctid FROM unnest(",
            $seqs,
            "::BIGINT[]) AS u(seq) CROSS JOIN LATERAL (SELECT ctid FROM deliveries \
             WHERE sub_id = ",
            $sub,
            " AND seq = u.seq LIMIT 1) r))"
        )
    };
}

/// The NOTIFY channel instances wake each other on.
const CHANNEL: &str = "tidings";

/// Advisory lock keys: migrations, and one maintenance round at a time.
const MIGRATION_LOCK: i64 = 0x7469_6469_6e67_0001;
const MAINTENANCE_LOCK: i64 = 0x7469_6469_6e67_0002;

type Conn = PgConnection;

fn db_err(e: sqlx::Error) -> Error {
    e.into()
}

/// Opens the database at `url`, migrates it, and returns the writer (to be
/// run as a task), the reader and the listener.
pub(super) async fn open(
    url: &str,
    config: &StoreConfig,
    notifier: Notifier,
    healthy: watch::Sender<bool>,
) -> Result<(Writer<Postgres>, Reader<Postgres>, Listener)> {
    let options: PgConnectOptions = url
        .parse()
        .map_err(|e| Error::InvalidArgument(format!("bad database URL: {e}")))?;
    // Every statement here is a keyed lookup or a short range scan, and has
    // to stay one as tables grow: left to itself, the planner turns a
    // lookup of a few thousand ids into a hash join over the whole dedup
    // table once the batch is large enough, and publishing slows down as the
    // table grows. So this connection plans nested loops over indexes. Both
    // this and keeping list lookups unprepared are needed: with either one
    // alone, tidings bench on a fresh database fell to 12,000 msgs/s or
    // less (a generic plan made on the empty table took seconds a query).
    let options = options
        .statement_cache_capacity(1024)
        .options([
            ("enable_hashjoin", "off"),
            ("enable_mergejoin", "off"),
            ("random_page_cost", "1.1"),
        ])
        .options(crate::config::postgres_session_bounds(
            config.statement_timeout,
            config.commit_timeout,
        ));
    let connect_timeout = config.connect_timeout;
    let mut conn = connect(&options, connect_timeout).await?;
    migrate(&mut conn).await?;
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut conn)
        .await
        .map_err(db_err)?;
    // A read waits at most this long for a connection, so a dead link fails
    // reads with `Unavailable` instead of hanging them.
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(connect_timeout)
        .connect_with(options.clone())
        .await
        .map_err(db_err)?;
    let check = ListenCheck {
        interval: config.listen_check_interval,
        bound: config.commit_timeout,
    };
    let listener = WatchedListener::connect(&pool, CHANNEL, check)
        .await
        .map_err(db_err)?;
    let writer = Writer::new(
        Postgres {
            conn,
            options,
            pid,
            broken: false,
            connect_timeout,
        },
        config.dedup_window,
        notifier.clone(),
        healthy,
    );
    Ok((
        writer,
        Reader::new(pool, config.commit_timeout),
        Listener {
            listener,
            notifier,
            own_pid: pid,
        },
    ))
}

/// Connects within `timeout`.
///
/// Fails with `Unavailable` if the server refuses, fails or does not answer
/// in time (a link that drops packets never answers at all).
async fn connect(options: &PgConnectOptions, timeout: Duration) -> Result<PgConnection> {
    match tokio::time::timeout(timeout, PgConnection::connect_with(options)).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => Err(Error::Unavailable(format!(
            "cannot connect to PostgreSQL: {e}"
        ))),
        Err(_) => Err(Error::Unavailable(format!(
            "cannot connect to PostgreSQL: no answer within {:?} (connect_timeout)",
            timeout
        ))),
    }
}

/// Applies pending migrations under an advisory lock, so that instances
/// starting together do not race.
pub(super) async fn migrate(conn: &mut PgConnection) -> Result<()> {
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(MIGRATION_LOCK)
        .execute(&mut *conn)
        .await
        .map_err(db_err)?;
    let result = migrate_locked(conn).await;
    let _ = sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(MIGRATION_LOCK)
        .execute(&mut *conn)
        .await;
    result
}

async fn migrate_locked(conn: &mut PgConnection) -> Result<()> {
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS tidings_migrations \
         (version BIGINT PRIMARY KEY, applied_at BIGINT NOT NULL)",
    )
    .execute(&mut *conn)
    .await
    .map_err(db_err)?;
    let current: i64 =
        sqlx::query_scalar("SELECT coalesce(max(version), 0)::BIGINT FROM tidings_migrations")
            .fetch_one(&mut *conn)
            .await
            .map_err(db_err)?;
    for &(version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > current) {
        let mut tx = conn.begin().await.map_err(db_err)?;
        sqlx::raw_sql(sql).execute(&mut *tx).await.map_err(db_err)?;
        sqlx::query("INSERT INTO tidings_migrations (version, applied_at) VALUES ($1, $2)")
            .bind(version)
            .bind(now_micros())
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
        tx.commit().await.map_err(db_err)?;
        tracing::info!(version, "applied PostgreSQL migration");
    }
    Ok(())
}

/// Turns other instances' notifications into local wake-ups.
pub(super) struct Listener {
    listener: WatchedListener,
    notifier: Notifier,
    own_pid: i32,
}

impl Listener {
    /// Runs until `alive` reports the store closed.
    pub(super) async fn run(mut self, alive: impl Fn() -> bool) {
        let mut check = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                received = self.listener.recv() => match received {
                    Ok(Heard::Notification(n)) => {
                        if n.process_id() as i32 != self.own_pid {
                            self.notifier.notify_raw(n.payload());
                        }
                    }
                    // Notifications sent while the old connection was dead
                    // are lost: every waiter looks again.
                    Ok(Heard::Replaced) => self.notifier.notify_all(),
                    Err(e) => {
                        if !alive() {
                            return;
                        }
                        // The listener reconnects on the next call; waiters
                        // fall back to polling meanwhile.
                        tracing::warn!(error = %e, "LISTEN connection failed; reconnecting");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                },
                _ = check.tick() => {
                    if !alive() {
                        return;
                    }
                }
            }
        }
    }
}

/// PostgreSQL's text of the statements written once in `statements.rs`,
/// which binds them in the order `$1`, `$2`, ...
mod sql {
    pub(super) const TOPIC: &str =
        concat!("SELECT ", topic_columns!(), " FROM topics WHERE name = $1");
    pub(super) const LIST_TOPICS: &str = concat!(
        "SELECT ",
        topic_columns!(),
        " FROM topics WHERE name > $1 ORDER BY name LIMIT $2"
    );
    pub(super) const INSERT_TOPIC: &str = concat!(
        "INSERT INTO topics (name, created_at, retention_us, max_age_us) \
         VALUES ($1, $2, $3, $4) ON CONFLICT (name) DO NOTHING RETURNING ",
        topic_columns!()
    );
    // The per-topic counter: publishers of a topic take turns on this lock,
    // so its sequence numbers commit in order.
    pub(super) const LOCK_TOPIC: &str = "SELECT last_seq FROM topics WHERE id = $1 FOR UPDATE";
    pub(super) const LAST_SEQ: &str = "SELECT last_seq FROM topics WHERE id = $1";
    pub(super) const SET_LAST_SEQ: &str = "UPDATE topics SET last_seq = $1 WHERE id = $2";
    pub(super) const SET_TOPIC_SETTINGS: &str =
        "UPDATE topics SET retention_us = $1, max_age_us = $2 WHERE id = $3";
    pub(super) const DELETE_TOPIC: [&str; 3] = [
        "DELETE FROM messages WHERE topic_id = $1",
        "DELETE FROM dedup WHERE topic_id = $1",
        "DELETE FROM topics WHERE id = $1",
    ];
    pub(super) const MESSAGES_AFTER: &str = concat!(
        "SELECT ",
        message_columns!(),
        " FROM messages m WHERE m.topic_id = $1 AND m.seq > $2 ORDER BY m.seq LIMIT $3"
    );
    pub(super) const MESSAGE_AT: &str = concat!(
        "SELECT ",
        message_columns!(),
        " FROM messages m WHERE m.topic_id = $1 AND m.seq = $2"
    );
    pub(super) const FIRST_SEQ_AT: &str =
        "SELECT min(seq) FROM messages WHERE topic_id = $1 AND published_at >= $2";
    pub(super) const FIRST_SEQ: &str = "SELECT min(seq) FROM messages WHERE topic_id = $1";
    pub(super) const PUBLISHED_AT: &str =
        "SELECT published_at FROM messages WHERE topic_id = $1 AND seq = $2";
    pub(super) const SUB: &str = concat!(
        "SELECT ",
        sub_columns!(),
        " FROM subscriptions s JOIN topics t ON t.id = s.topic_id WHERE s.name = $1"
    );
    pub(super) const LIST_SUBS: &str = concat!(
        "SELECT ",
        sub_columns!(),
        " FROM subscriptions s JOIN topics t ON t.id = s.topic_id \
         WHERE s.name > $1 AND ($2::TEXT IS NULL OR t.name = $2) ORDER BY s.name LIMIT $3"
    );
    pub(super) const SUB_NAMES: &str = "SELECT name FROM subscriptions \
         WHERE $1::BIGINT IS NULL OR topic_id = $1 ORDER BY name";
    pub(super) const DEAD_LETTER_USERS: &str = "SELECT name FROM subscriptions \
         WHERE dead_letter_topic = $1 ORDER BY name LIMIT $2";
    pub(super) const INSERT_SUB: &str = "INSERT INTO subscriptions (name, topic_id, created_at, ack_deadline_us, max_attempts, \
         min_backoff_us, max_backoff_us, dead_letter_topic, ordered, cursor) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) ON CONFLICT (name) DO NOTHING";
    // Instances lease new messages of a subscription in turns on this lock.
    pub(super) const LOCK_CURSOR: &str =
        "SELECT cursor FROM subscriptions WHERE id = $1 FOR UPDATE";
    pub(super) const SET_SUB_SETTINGS: &str = "UPDATE subscriptions SET ack_deadline_us = $1, max_attempts = $2, \
         min_backoff_us = $3, max_backoff_us = $4, dead_letter_topic = $5, ordered = $6 \
         WHERE id = $7";
    pub(super) const DELETE_SUB: [&str; 2] = [
        "DELETE FROM deliveries WHERE sub_id = $1",
        "DELETE FROM subscriptions WHERE id = $1",
    ];
    pub(super) const ADVANCE: &str = "UPDATE subscriptions SET cursor = coalesce($1, cursor), \
         delivered = delivered + $2, redelivered = redelivered + $3 WHERE id = $4";
    pub(super) const ADD_ACKED: &str = "UPDATE subscriptions SET acked = acked + $1 WHERE id = $2";
    pub(super) const DROP_FROM: &str =
        "DELETE FROM deliveries WHERE sub_id = $1 AND (state IN (0, 1) OR seq >= $2)";
    pub(super) const SET_CURSOR: &str = "UPDATE subscriptions SET cursor = $1 WHERE id = $2";
    pub(super) const COUNTERS: &str = "SELECT s.delivered, s.acked, s.redelivered, t.last_seq FROM subscriptions s \
         JOIN topics t ON t.id = s.topic_id WHERE s.id = $1";
    // Rows another instance is leasing right now are skipped. A due row
    // is its key's head unless a row out of turn (a redriven dead letter, a
    // row let go when ordering was switched off) is in progress before it,
    // so only those are looked for, on their own small index (migration
    // 3). Looking for any earlier row of the key in progress walked the
    // dead index entries of every message of the key acked since the last
    // VACUUM, for every due row: a lease cost more the more messages had
    // been consumed (issue 16, item 3).
    pub(super) const DUE_ORDERED: &str = concat!(
        "SELECT d.attempt, ",
        message_columns!(),
        " FROM deliveries d \
         JOIN messages m ON m.topic_id = $3 AND m.seq = d.seq \
         WHERE d.sub_id = $1 AND d.state = 0 AND d.available_at <= $2 \
         AND (d.key IS NULL OR NOT EXISTS (SELECT 1 FROM deliveries e \
           WHERE e.sub_id = d.sub_id AND e.key = d.key AND e.seq < d.seq \
           AND e.state IN (0, 1) AND e.out_of_turn)) \
         ORDER BY d.seq LIMIT $4 FOR UPDATE OF d SKIP LOCKED"
    );
    pub(super) const DUE: &str = concat!(
        "SELECT d.attempt, ",
        message_columns!(),
        " FROM deliveries d \
         JOIN messages m ON m.topic_id = $3 AND m.seq = d.seq \
         WHERE d.sub_id = $1 AND d.state = 0 AND d.available_at <= $2 \
         ORDER BY d.available_at LIMIT $4 FOR UPDATE OF d SKIP LOCKED"
    );
    pub(super) const NEXT_DUE: &str = "SELECT min(available_at) FROM deliveries \
         WHERE sub_id = $1 AND state IN (0, 1) AND available_at > $2";
    pub(super) const EXPIRED_LEASES: &str = "SELECT seq, attempt, available_at FROM deliveries \
         WHERE sub_id = $1 AND state = 1 AND available_at <= $2 LIMIT $3 \
         FOR UPDATE SKIP LOCKED";
    pub(super) const SET_WAITING: &str = "UPDATE deliveries SET state = 0, available_at = $1, reason = coalesce($2, reason) \
         WHERE sub_id = $3 AND seq = $4";
    pub(super) const SET_DEADLINE: &str =
        "UPDATE deliveries SET available_at = $1 WHERE sub_id = $2 AND seq = $3";
    pub(super) const SET_DEAD: &str = "UPDATE deliveries SET state = 2, available_at = $1, \
         reason = $2 WHERE sub_id = $3 AND seq = $4";
    pub(super) const DELIVERY_COUNTS: &str = "SELECT count(*) FILTER (WHERE state = 1 AND available_at > $1), \
         count(*) FILTER (WHERE state IN (0, 1)), count(*) FILTER (WHERE state = 2), \
         min(seq) FILTER (WHERE state IN (0, 1)), min(seq) \
         FROM deliveries WHERE sub_id = $2";
    pub(super) const BLOCKED_KEY_COUNT: &str = "SELECT count(DISTINCT key) FROM deliveries WHERE sub_id = $1 AND state = 0 \
         AND attempt > 0 AND key IS NOT NULL";
    pub(super) const BLOCKED_KEYS: &str = "SELECT DISTINCT key FROM deliveries WHERE sub_id = $1 AND state = 0 \
         AND attempt > 0 AND key IS NOT NULL ORDER BY key LIMIT $2";
    pub(super) const DEAD_LETTERS: &str = concat!(
        "SELECT ",
        dead_letter_columns!(),
        " FROM deliveries d \
         JOIN messages m ON m.topic_id = $1 AND m.seq = d.seq \
         WHERE d.sub_id = $2 AND d.state = 2 AND d.seq > $3 ORDER BY d.seq LIMIT $4"
    );
    pub(super) const UNDONE: &str = concat!(
        "SELECT ",
        dead_letter_columns!(),
        ", d.state FROM deliveries d \
         JOIN messages m ON m.topic_id = $1 AND m.seq = d.seq \
         WHERE d.sub_id = $2 AND d.state IN (0, 1) AND d.seq > $3 ORDER BY d.seq LIMIT $4"
    );
    pub(super) const TOPIC_GAUGES: &str = "SELECT t.name, t.last_seq, \
         (SELECT min(m.seq) FROM messages m WHERE m.topic_id = t.id), t.expired_count \
         FROM topics t ORDER BY t.name";
    // As `DELIVERY_COUNTS` and `BLOCKED_KEY_COUNT` of every subscription at
    // once, and the publish time of `oldest_unacked` (in `common.rs`).
    pub(super) const SUBSCRIPTION_GAUGES: &str = "WITH d AS (SELECT sub_id, \
         count(*) FILTER (WHERE state = 1 AND available_at > $1) AS leased, \
         count(*) FILTER (WHERE state IN (0, 1)) AS undone, \
         count(*) FILTER (WHERE state = 2) AS dead, \
         min(seq) FILTER (WHERE state IN (0, 1)) AS first_undone, min(seq) AS first_any, \
         count(DISTINCT key) FILTER (WHERE state = 0 AND attempt > 0) AS blocked \
         FROM deliveries GROUP BY sub_id) \
         SELECT s.name, t.name, s.cursor, t.last_seq, s.delivered, s.acked, s.redelivered, \
         coalesce(d.leased, 0), coalesce(d.undone, 0), coalesce(d.dead, 0), \
         d.first_undone, d.first_any, CASE WHEN s.ordered THEN coalesce(d.blocked, 0) ELSE 0 END, \
         (SELECT m.published_at FROM messages m WHERE m.topic_id = s.topic_id AND m.seq = \
           CASE WHEN s.cursor < t.last_seq THEN least(coalesce(d.first_undone, s.cursor + 1), s.cursor + 1) \
           ELSE d.first_undone END) \
         FROM subscriptions s JOIN topics t ON t.id = s.topic_id \
         LEFT JOIN d ON d.sub_id = s.id ORDER BY s.name";
    pub(super) const DEAD_COUNT: &str =
        "SELECT count(*) FROM deliveries WHERE sub_id = $1 AND state = 2";
    pub(super) const LOW_WATER: &str = "SELECT min(least(coalesce((SELECT min(seq) FROM deliveries d \
         WHERE d.sub_id = s.id), s.cursor + 1), s.cursor + 1)) \
         FROM subscriptions s WHERE s.topic_id = $1";
    pub(super) const DELETE_MESSAGES: &str = "DELETE FROM messages WHERE topic_id = $1 \
         AND seq >= $2 AND seq < $3 AND published_at <= $4";
    pub(super) const ANY_MESSAGE_IN: &str = "SELECT EXISTS (SELECT 1 FROM messages \
         WHERE topic_id = $1 AND seq >= $2 AND seq < $3)";
    pub(super) const MESSAGE_TIMES: &str = "SELECT seq, published_at FROM messages \
         WHERE topic_id = $1 AND seq >= $2 ORDER BY seq LIMIT $3";
    pub(super) const NEXT_DEADLINE: &str =
        "SELECT min(available_at) FROM deliveries WHERE sub_id = $1 AND state = 1";
    // Maintenance's one look for expired leases across subscriptions, on
    // the index of leased rows by deadline (`deliveries_leased`, migration
    // 2); bounded by rows, so a backlog in one subscription does not make
    // it read them all.
    pub(super) const SUBS_WITH_EXPIRED_LEASES: &str = "SELECT s.name FROM (SELECT sub_id \
         FROM deliveries WHERE state = 1 AND available_at <= $1 ORDER BY available_at LIMIT $2) d \
         JOIN subscriptions s ON s.id = d.sub_id";
    pub(super) const EXPIRE_MESSAGES: &str =
        "DELETE FROM messages WHERE topic_id = $1 AND seq <= $2";
    pub(super) const EXPIRE_DELIVERIES: &str = "DELETE FROM deliveries WHERE seq <= $2 \
         AND sub_id IN (SELECT id FROM subscriptions WHERE topic_id = $1)";
    pub(super) const MOVE_CURSORS_PAST: &str = "UPDATE subscriptions \
         SET cursor = greatest(cursor, $1) WHERE topic_id = $2 RETURNING name";
    pub(super) const COUNT_EXPIRED: &str =
        "UPDATE topics SET expired_count = expired_count + $1 WHERE id = $2";
    // 9223372036854775807 is `HELD`. Every keyed row in progress is out
    // of turn from here on: should ordering be switched on again, a key's
    // rows let go wait for its earlier ones in progress (`DUE_ORDERED`).
    pub(super) const RELEASE_HELD: &str = "UPDATE deliveries SET available_at = \
         CASE WHEN available_at = 9223372036854775807 THEN $1 ELSE available_at END, \
         out_of_turn = true WHERE sub_id = $2 AND key IS NOT NULL AND state IN (0, 1)";
    pub(super) const HEAL_HELD: &str = "UPDATE deliveries h SET available_at = $1 \
         WHERE h.available_at = 9223372036854775807 \
         AND h.sub_id IN (SELECT id FROM subscriptions WHERE topic_id = $2) \
         AND NOT EXISTS (SELECT 1 FROM deliveries e WHERE e.sub_id = h.sub_id \
         AND e.key = h.key AND e.seq < h.seq AND e.state IN (0, 1))";
    pub(super) const PRUNE_DEDUP: &str = "DELETE FROM dedup WHERE (topic_id, id) IN \
         (SELECT topic_id, id FROM dedup WHERE published_at < $1 LIMIT $2)";
}

/// This instance's write connection.
pub(super) struct Postgres {
    conn: PgConnection,
    options: PgConnectOptions,
    pid: i32,
    /// The connection cannot be trusted (a group on it timed out or failed
    /// and it could not be rolled back): the next group reconnects first.
    broken: bool,
    connect_timeout: Duration,
}

impl Postgres {
    /// Replaces the connection, within the connect timeout.
    ///
    /// Fails with `Unavailable` if PostgreSQL cannot be reached; the old
    /// connection stays marked broken.
    async fn reconnect(&mut self) -> Result<()> {
        let mut conn = connect(&self.options, self.connect_timeout).await?;
        let pid = tokio::time::timeout(
            self.connect_timeout,
            sqlx::query_scalar::<_, i32>("SELECT pg_backend_pid()").fetch_one(&mut conn),
        )
        .await;
        let Ok(Ok(pid)) = pid else {
            return Err(Error::Unavailable(
                "PostgreSQL accepted a connection but did not answer on it".into(),
            ));
        };
        // Dropping the old connection only closes its socket: nothing waits
        // on a link that may be dead.
        self.conn = conn;
        self.pid = pid;
        self.broken = false;
        tracing::info!(pid, "reconnected to PostgreSQL");
        Ok(())
    }
}

impl Backend for Postgres {
    shared_statements!();

    type Db = sqlx::Postgres;

    const EXCLUSIVE: bool = false;

    fn conn(&mut self) -> &mut Conn {
        &mut self.conn
    }

    async fn begin(&mut self) -> Result<()> {
        if self.broken {
            self.reconnect().await?;
        }
        sqlx::query("BEGIN").execute(&mut self.conn).await?;
        Ok(())
    }

    async fn commit(&mut self, touched: &Touched) -> Result<()> {
        // Other instances learn of this group's changes when it commits:
        // PostgreSQL delivers notifications at COMMIT, once per distinct
        // payload, so one group sends at most one per topic and subscription.
        let keys: Vec<String> = touched
            .topics
            .iter()
            .map(|t| Notifier::key('t', t))
            .chain(touched.subs.iter().map(|s| Notifier::key('s', s)))
            .collect();
        if !keys.is_empty() {
            sqlx::query("SELECT pg_notify($1, k) FROM unnest($2::TEXT[]) AS k")
                .bind(CHANNEL)
                .bind(keys)
                .execute(&mut self.conn)
                .await?;
        }
        sqlx::query("COMMIT").execute(&mut self.conn).await?;
        Ok(())
    }

    fn distrust(&mut self) {
        self.broken = true;
    }

    async fn recover(&mut self) -> bool {
        if !self.broken {
            // A statement failed on a connection that still answers: roll
            // back and keep it, unless even that does not answer in time.
            let rollback = sqlx::query("ROLLBACK").execute(&mut self.conn);
            if let Ok(Ok(_)) = tokio::time::timeout(self.connect_timeout, rollback).await {
                return false;
            }
            self.broken = true;
        }
        // A connection that timed out may be mid-statement on a dead link:
        // never wait on it again. If PostgreSQL cannot be reached now, the
        // next group tries again.
        if let Err(e) = self.reconnect().await {
            tracing::debug!(error = %e, "PostgreSQL is unreachable");
        }
        true
    }

    async fn rollback(&mut self) -> bool {
        let rollback = sqlx::query("ROLLBACK").execute(&mut self.conn);
        matches!(
            tokio::time::timeout(self.connect_timeout, rollback).await,
            Ok(Ok(_))
        )
    }

    async fn close(self) {
        if let Err(e) = self.conn.close().await {
            tracing::warn!(error = %e, "closing the database connection failed");
        }
    }

    async fn try_maintenance_lock(c: &mut Conn) -> Result<bool> {
        Ok(sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)")
            .bind(MAINTENANCE_LOCK)
            .fetch_one(c)
            .await?)
    }

    async fn dedup_lookup(c: &mut Conn, topic_id: i64, ids: &[Uuid]) -> Result<Vec<(Uuid, i64)>> {
        let mut known = Vec::new();
        for chunk in ids.chunks(CHUNK) {
            let ids: Vec<Vec<u8>> = chunk.iter().map(|id| id.as_bytes().to_vec()).collect();
            // Statements that look up a list are not kept prepared
            // (`persistent(false)`): the generic plan PostgreSQL settles on
            // for a prepared statement is made from the table's size at the
            // time, and one made while the table was small scans the whole
            // topic once it is large. Unprepared, each is planned for the
            // list and the table as they are.
            // Each id a key lookup (see `locked_rows!`).
            let rows: Vec<(Vec<u8>, i64)> = sqlx::query_as(
                "SELECT d.id, d.seq FROM unnest($2::BYTEA[]) AS u(id) CROSS JOIN LATERAL \
                 (SELECT id, seq FROM dedup WHERE topic_id = $1 AND id = u.id LIMIT 1) d",
            )
            .persistent(false)
            .bind(topic_id)
            .bind(ids)
            .fetch_all(&mut *c)
            .await?;
            for (id, seq) in rows {
                known.push((uuid_from(&id)?, seq));
            }
        }
        Ok(known)
    }

    async fn insert_messages(
        c: &mut Conn,
        topic_id: i64,
        messages: &[(&NewMessage, i64)],
        now: Micros,
    ) -> Result<()> {
        for chunk in messages.chunks(CHUNK) {
            let seqs: Vec<i64> = chunk.iter().map(|(_, s)| *s).collect();
            let ids: Vec<Vec<u8>> = chunk
                .iter()
                .map(|(m, _)| m.id.as_bytes().to_vec())
                .collect();
            let keys: Vec<Option<String>> = chunk.iter().map(|(m, _)| m.key.clone()).collect();
            let payloads: Vec<Vec<u8>> = chunk.iter().map(|(m, _)| m.payload.clone()).collect();
            let attributes: Vec<Option<Vec<u8>>> = chunk
                .iter()
                .map(|(m, _)| encode_attributes(&m.attributes))
                .collect();
            let created: Vec<Option<i64>> = chunk.iter().map(|(m, _)| m.created_at).collect();
            sqlx::query(
                "INSERT INTO messages (topic_id, seq, id, key, payload, attributes, created_at, \
                 published_at) SELECT $1, s, i, k, p, a, c, $8 FROM UNNEST($2::BIGINT[], \
                 $3::BYTEA[], $4::TEXT[], $5::BYTEA[], $6::BYTEA[], $7::BIGINT[]) AS u(s, i, k, p, a, c)",
            )
            .bind(topic_id)
            .bind(&seqs)
            .bind(&ids)
            .bind(keys)
            .bind(payloads)
            .bind(attributes)
            .bind(created)
            .bind(now)
            .execute(&mut *c)
            .await?;
            sqlx::query(
                "INSERT INTO dedup (topic_id, id, seq, published_at) \
                 SELECT $1, i, s, $4 FROM UNNEST($2::BYTEA[], $3::BIGINT[]) AS u(i, s)",
            )
            .bind(topic_id)
            .bind(ids)
            .bind(seqs)
            .bind(now)
            .execute(&mut *c)
            .await?;
        }
        Ok(())
    }

    async fn insert_deliveries(c: &mut Conn, sub_id: i64, rows: &[DeliveryRow]) -> Result<()> {
        let seqs: Vec<i64> = rows.iter().map(|r| r.0).collect();
        let states: Vec<i64> = rows.iter().map(|r| r.1).collect();
        let attempts: Vec<i32> = rows.iter().map(|r| r.2).collect();
        let availables: Vec<i64> = rows.iter().map(|r| r.3).collect();
        let leases: Vec<i64> = rows.iter().map(|r| r.4).collect();
        let delivered_at: Vec<Option<i64>> = rows.iter().map(|r| r.5).collect();
        let keys: Vec<Option<String>> = rows.iter().map(|r| r.6.clone()).collect();
        sqlx::query(
            "INSERT INTO deliveries (sub_id, seq, state, attempt, available_at, lease, \
             first_delivery_at, last_delivery_at, key) \
             SELECT $1, s, st, a, av, l, d, d, k FROM UNNEST($2::BIGINT[], $3::BIGINT[], \
             $4::INTEGER[], $5::BIGINT[], $6::BIGINT[], $7::BIGINT[], $8::TEXT[]) \
             AS u(s, st, a, av, l, d, k)",
        )
        .bind(sub_id)
        .bind(seqs)
        .bind(states)
        .bind(attempts)
        .bind(availables)
        .bind(leases)
        .bind(delivered_at)
        .bind(keys)
        .execute(c)
        .await?;
        Ok(())
    }

    async fn keys_in_progress(
        c: &mut Conn,
        sub_id: i64,
        keys: &[String],
        holder: i64,
        now: Micros,
    ) -> Result<HashMap<String, i64>> {
        if keys.is_empty() {
            return Ok(HashMap::new());
        }
        // One probe per key that stops at its first row in progress, so
        // the cost does not grow with the messages a key holds back. As an
        // EXISTS, PostgreSQL could turn it into a join that reads every row
        // in progress of the subscription (see `locked_rows!`). The order
        // keeps the probe on `deliveries_by_key` (a plain LIMIT 1 may scan
        // the table from its start, past the rows acked since the last
        // VACUUM), newest first: a key's newest row is the one in progress,
        // and its acked rows' dead index entries are the oldest. A key
        // whose newest row in progress is leased by `holder` is that
        // stream's (issue 14); leased by another until after `now`, that
        // one's.
        let blocked: Vec<(String, i64)> = sqlx::query_as(
            "SELECT u.key, p.holder FROM unnest($2::TEXT[]) AS u(key) CROSS JOIN LATERAL \
             (SELECT CASE WHEN d.state = 1 AND d.available_at > $4 THEN d.lease >> 24 \
             ELSE 0 END AS holder FROM deliveries d WHERE d.sub_id = $1 AND d.key = u.key \
             AND d.state IN (0, 1) ORDER BY d.seq DESC LIMIT 1) p \
             WHERE $3 = 0 OR p.holder <> $3",
        )
        .persistent(false)
        .bind(sub_id)
        .bind(keys)
        .bind(holder)
        .bind(now)
        .fetch_all(c)
        .await?;
        Ok(blocked.into_iter().collect())
    }

    async fn deliveries(
        c: &mut Conn,
        sub_id: i64,
        seqs: &[i64],
    ) -> Result<HashMap<i64, LeaseState>> {
        let mut rows = HashMap::new();
        for chunk in seqs.chunks(CHUNK) {
            let found: Vec<(i64, i64, i64, i64, i32)> = sqlx::query_as(
                "SELECT d.seq, d.state, d.lease, d.available_at, d.attempt \
                 FROM unnest($2::BIGINT[]) AS u(seq) CROSS JOIN LATERAL \
                 (SELECT seq, state, lease, available_at, attempt FROM deliveries \
                 WHERE sub_id = $1 AND seq = u.seq FOR UPDATE) d",
            )
            .persistent(false)
            .bind(sub_id)
            .bind(chunk)
            .fetch_all(&mut *c)
            .await?;
            for (seq, state, lease, available_at, attempt) in found {
                rows.insert(seq, (state, lease, available_at, attempt));
            }
        }
        Ok(rows)
    }

    async fn promote_next(c: &mut Conn, sub_id: i64, seqs: &[i64], now: Micros) -> Result<()> {
        // Each row of `seqs` (key lookup), the first row in progress after
        // it of its key (`deliveries_by_key`), and that row, locked, if it
        // is held; then the locked rows are made due. Every step is a keyed
        // lookup per element of a short list: as one UPDATE … FROM, or as
        // joins, a planner without statistics (a fresh table) walked every
        // row of the subscription (see `locked_rows!`). No condition on
        // `available_at` in the UPDATE for the same reason.
        let next: Vec<i64> = sqlx::query_scalar(
            "SELECT h.seq FROM unnest($2::BIGINT[]) AS u(seq) \
             CROSS JOIN LATERAL (SELECT seq, key FROM deliveries \
             WHERE sub_id = $1 AND seq = u.seq LIMIT 1) d \
             CROSS JOIN LATERAL (SELECT e.seq FROM deliveries e WHERE e.sub_id = $1 \
             AND e.key = d.key AND e.seq > d.seq AND e.state IN (0, 1) ORDER BY e.seq LIMIT 1) n \
             CROSS JOIN LATERAL (SELECT seq FROM deliveries WHERE sub_id = $1 AND seq = n.seq \
             AND available_at = 9223372036854775807 FOR UPDATE) h",
        )
        .persistent(false)
        .bind(sub_id)
        .bind(seqs)
        .fetch_all(&mut *c)
        .await?;
        if next.is_empty() {
            return Ok(());
        }
        sqlx::query(concat!(
            "UPDATE deliveries SET available_at = $3 WHERE ",
            locked_rows!("$1", "$2")
        ))
        .persistent(false)
        .bind(sub_id)
        .bind(next)
        .bind(now)
        .execute(c)
        .await?;
        Ok(())
    }

    async fn earlier_in_progress(c: &mut Conn, sub_id: i64, seqs: &[i64]) -> Result<Earlier> {
        // Keyed lookups per element, as `promote_next`; newest first down
        // `deliveries_by_key` from each row, as `keys_in_progress`.
        let found: Vec<(i64, String, Option<i64>)> = sqlx::query_as(
            "SELECT d.seq, d.key, p.seq FROM unnest($2::BIGINT[]) AS u(seq) \
             CROSS JOIN LATERAL (SELECT seq, key, last_delivery_at FROM deliveries \
             WHERE sub_id = $1 AND seq = u.seq LIMIT 1) d \
             LEFT JOIN LATERAL (SELECT e.seq FROM deliveries e WHERE e.sub_id = $1 \
             AND e.key = d.key AND e.seq < d.seq AND e.state IN (0, 1) \
             AND coalesce(e.last_delivery_at, 0) <= coalesce(d.last_delivery_at, 0) \
             ORDER BY e.seq DESC LIMIT 1) p ON true WHERE d.key IS NOT NULL",
        )
        .persistent(false)
        .bind(sub_id)
        .bind(seqs)
        .fetch_all(c)
        .await?;
        Ok(found
            .into_iter()
            .map(|(seq, key, earlier)| (seq, (key, earlier)))
            .collect())
    }

    async fn deliveries_in_key_order(
        c: &mut Conn,
        sub_id: i64,
        seqs: &[i64],
    ) -> Result<(HashMap<i64, LeaseState>, Earlier)> {
        let mut rows = HashMap::new();
        let mut earlier = HashMap::new();
        for chunk in seqs.chunks(CHUNK) {
            // `deliveries` (its rows locked) and `earlier_in_progress` in
            // one statement.
            let found: Vec<KeyOrderRow> = sqlx::query_as(
                "SELECT d.seq, d.state, d.lease, d.available_at, d.attempt, d.key, p.seq \
                 FROM unnest($2::BIGINT[]) AS u(seq) CROSS JOIN LATERAL \
                 (SELECT seq, state, lease, available_at, attempt, key, last_delivery_at \
                 FROM deliveries WHERE sub_id = $1 AND seq = u.seq FOR UPDATE) d \
                 LEFT JOIN LATERAL (SELECT e.seq FROM deliveries e WHERE e.sub_id = $1 \
                 AND d.key IS NOT NULL AND e.key = d.key AND e.seq < d.seq \
                 AND e.state IN (0, 1) \
                 AND coalesce(e.last_delivery_at, 0) <= coalesce(d.last_delivery_at, 0) \
                 ORDER BY e.seq DESC LIMIT 1) p ON true",
            )
            .persistent(false)
            .bind(sub_id)
            .bind(chunk)
            .fetch_all(&mut *c)
            .await?;
            split_key_order(found, &mut rows, &mut earlier);
        }
        Ok((rows, earlier))
    }

    async fn lease_run(
        c: &mut Conn,
        sub_id: i64,
        seqs: &[i64],
        deadline: Micros,
        token: i64,
        now: Micros,
    ) -> Result<()> {
        // The rows were locked by `held_followers`.
        sqlx::query(concat!(
            "UPDATE deliveries SET state = 1, attempt = attempt + 1, available_at = $1, \
             lease = $2, first_delivery_at = coalesce(first_delivery_at, $3), \
             last_delivery_at = $3, reason = NULL WHERE ",
            locked_rows!("$4", "$5")
        ))
        .persistent(false)
        .bind(deadline)
        .bind(token)
        .bind(now)
        .bind(sub_id)
        .bind(seqs)
        .execute(c)
        .await?;
        Ok(())
    }

    async fn hold_from(c: &mut Conn, sub_id: i64, key: &str, from: i64) -> Result<Vec<i64>> {
        // 9223372036854775807 is `HELD`.
        let held = sqlx::query_scalar(
            "UPDATE deliveries SET attempt = CASE WHEN state = 1 THEN attempt - 1 ELSE attempt END, \
             state = 0, available_at = 9223372036854775807 WHERE sub_id = $1 AND key = $2 \
             AND seq >= $3 AND state IN (0, 1) AND available_at <> 9223372036854775807 \
             RETURNING seq",
        )
        .persistent(false)
        .bind(sub_id)
        .bind(key)
        .bind(from)
        .fetch_all(c)
        .await?;
        Ok(held)
    }

    async fn held_after(
        c: &mut Conn,
        sub_id: i64,
        runs: &[(String, i64, i64)],
    ) -> Result<Vec<(String, bool)>> {
        // Forward from the run on the key index (the rows after it are in
        // progress, not acked ones' dead entries); only rows marked out of
        // turn are looked for before it, on their own index, as in
        // `DUE_ORDERED`.
        let keys: Vec<&str> = runs.iter().map(|(k, _, _)| k.as_str()).collect();
        let firsts: Vec<i64> = runs.iter().map(|(_, f, _)| *f).collect();
        let lasts: Vec<i64> = runs.iter().map(|(_, _, l)| *l).collect();
        let found = sqlx::query_as(
            "SELECT u.key, EXISTS (SELECT 1 FROM deliveries e WHERE e.sub_id = $1 \
             AND e.key = u.key AND e.seq < u.first AND e.state IN (0, 1) AND e.out_of_turn) \
             FROM unnest($2::TEXT[], $3::BIGINT[], $4::BIGINT[]) AS u(key, first, last) \
             WHERE (SELECT e.available_at FROM deliveries e WHERE e.sub_id = $1 \
             AND e.key = u.key AND e.seq > u.last AND e.state IN (0, 1) \
             ORDER BY e.seq LIMIT 1) = 9223372036854775807",
        )
        .persistent(false)
        .bind(sub_id)
        .bind(keys)
        .bind(firsts)
        .bind(lasts)
        .fetch_all(c)
        .await?;
        Ok(found)
    }

    async fn held_followers(
        c: &mut Conn,
        sub: &SubRow,
        heads: &[(String, i64)],
        per_key: i64,
        holder: i64,
        now: Micros,
        _known: &mut HeldMessages,
    ) -> Result<HashMap<String, Vec<(i32, StoredMessage)>>> {
        // The writer of a shared database keeps no messages (`known`).
        if heads.is_empty() {
            return Ok(HashMap::new());
        }
        // One walk of `deliveries_by_key` per head, from the head on, at
        // most `per_key` rows (locked): a key's backlog is never read whole.
        let keys: Vec<&str> = heads.iter().map(|(k, _)| k.as_str()).collect();
        let seqs: Vec<i64> = heads.iter().map(|(_, s)| *s).collect();
        let rows = sqlx::query(concat!(
            "SELECT f.key, f.available_at, f.attempt, ",
            message_columns!(),
            " FROM unnest($3::TEXT[], $4::BIGINT[]) AS h(key, seq) \
             CROSS JOIN LATERAL (SELECT d.key, d.seq, d.available_at, d.attempt \
             FROM deliveries d WHERE d.sub_id = $1 AND d.key = h.key AND d.seq > h.seq \
             AND d.state IN (0, 1) AND ($6 = 0 OR EXISTS (SELECT 1 FROM deliveries o \
             WHERE o.sub_id = $1 AND o.seq = h.seq AND o.state = 1 AND (o.lease >> 24) = $6 \
             AND o.available_at > $7)) \
             ORDER BY d.seq LIMIT $5 FOR UPDATE) f \
             JOIN messages m ON m.topic_id = $2 AND m.seq = f.seq ORDER BY f.seq"
        ))
        .persistent(false)
        .bind(sub.id)
        .bind(sub.topic_id)
        .bind(&keys)
        .bind(&seqs)
        .bind(per_key)
        .bind(holder)
        .bind(now)
        .fetch_all(c)
        .await?;
        followers(&rows, heads, &sub.topic)
    }

    async fn release(c: &mut Conn, sub_id: i64, seqs: &[i64], now: Micros) -> Result<()> {
        // The rows were locked by `deliveries` (the lease check).
        sqlx::query(concat!(
            "UPDATE deliveries SET state = 0, available_at = $1, attempt = attempt - 1 WHERE ",
            locked_rows!("$2", "$3")
        ))
        .persistent(false)
        .bind(now)
        .bind(sub_id)
        .bind(seqs)
        .execute(c)
        .await?;
        Ok(())
    }

    async fn delete_deliveries(c: &mut Conn, sub_id: i64, seqs: &[i64]) -> Result<()> {
        // The rows were locked by `deliveries` (the lease check).
        sqlx::query(concat!(
            "DELETE FROM deliveries WHERE ",
            locked_rows!("$1", "$2")
        ))
        .persistent(false)
        .bind(sub_id)
        .bind(seqs)
        .execute(c)
        .await?;
        Ok(())
    }

    async fn redrive(c: &mut Conn, sub_id: i64, seqs: &[i64], now: Micros) -> Result<i64> {
        // A redriven dead letter is out of turn: its key's later messages
        // went ahead when it died, and those not yet leased wait for it
        // (`sql::DUE_ORDERED`).
        let done = sqlx::query(
            "UPDATE deliveries SET state = 0, attempt = 0, available_at = $1, reason = NULL, \
             out_of_turn = true WHERE sub_id = $2 AND state = 2 AND (cardinality($3::BIGINT[]) = 0 \
             OR seq IN (SELECT unnest($3::BIGINT[])))",
        )
        .persistent(false)
        .bind(now)
        .bind(sub_id)
        .bind(seqs)
        .execute(c)
        .await?;
        Ok(done.rows_affected() as i64)
    }

    async fn purge(c: &mut Conn, sub_id: i64, seqs: &[i64]) -> Result<i64> {
        let done = sqlx::query(
            "DELETE FROM deliveries WHERE sub_id = $1 AND state = 2 \
             AND (cardinality($2::BIGINT[]) = 0 OR seq IN (SELECT unnest($2::BIGINT[])))",
        )
        .persistent(false)
        .bind(sub_id)
        .bind(seqs)
        .execute(c)
        .await?;
        Ok(done.rows_affected() as i64)
    }
}

/// [`runs_behind`] of rows that read (key, `available_at`, attempt, then
/// the message's columns), in sequence order.
fn followers(
    rows: &[PgRow],
    heads: &[(String, i64)],
    topic: &str,
) -> Result<HashMap<String, Vec<(i32, StoredMessage)>>> {
    let mut walked = Vec::with_capacity(rows.len());
    for row in rows {
        let key: String = row.try_get(0).map_err(decode_err)?;
        let seq: i64 = row.try_get(3).map_err(decode_err)?;
        let available_at: i64 = row.try_get(1).map_err(decode_err)?;
        walked.push((key, seq, available_at, row));
    }
    let mut runs = HashMap::new();
    for (key, run) in runs_behind(walked, heads) {
        let mut messages = Vec::with_capacity(run.len());
        for row in run {
            let attempt: i32 = row.try_get(2).map_err(decode_err)?;
            messages.push((attempt, message_from_row(row, 3, topic)?));
        }
        runs.insert(key, messages);
    }
    Ok(runs)
}

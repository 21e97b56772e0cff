//! The SQLite backend: opening the database file, the checkpointer, and
//! SQLite's SQL for each statement of [`Backend`] (the `sql` module, and the
//! statements that pass lists, as placeholder lists or as one JSON array).
//! The schema is in `migrations/sqlite/`. One writer owns the file
//! (`EXCLUSIVE`), so "locks" are plain reads here.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{AssertSqlSafe, Connection, Row};
use tokio::sync::watch;
use uuid::Uuid;

use super::backend::{Backend, Earlier, KeyOrderRow, LeaseState, split_key_order};
use super::common::{
    CHUNK, DeliveryCounts, DeliveryRow, LogLimit, SubRow, TopicRow, Touched, dead_letter_from_row,
    encode_attributes, message_from_row, peeked_from_row, runs_behind, uuid_from,
};
use super::datadir::{DirLock, LOCK_WAIT, LOW_SPACE, Space};
use super::held::HeldMessages;
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
    (1, include_str!("../../migrations/sqlite/0001_broker.sql")),
    (
        2,
        include_str!("../../migrations/sqlite/0002_messages_rowid.sql"),
    ),
];

/// The database file in the data directory.
const DB_FILE: &str = "tidings.db";

/// The WAL is cut back to this size when the writer starts it over after a
/// checkpoint (`journal_size_limit`), so a burst does not leave a large file
/// behind; an idle store's WAL is emptied entirely by the checkpointer.
const WAL_SIZE_LIMIT: i64 = 16 << 20;

type Conn = SqliteConnection;

fn placeholders(n: usize) -> String {
    vec!["?"; n].join(",")
}

/// A list passed to a statement as one JSON array, read back with
/// `json_each`: the statement's text is the same whatever the list's length,
/// so it is prepared once and cached, and binding it is one parameter
/// (sqlx looks each numbered `?N` placeholder up by index, a walk of the
/// statement's list of names: a long list of them costs the square of its
/// length to bind, which profiled at 7% of the writer's time on ordered
/// subscriptions with 1,000 keys).
fn json_list(encoded: serde_json::Result<String>) -> Result<String> {
    encoded.map_err(|e| Error::Storage(format!("encoding a list: {e}")))
}

/// A row a held-run walk found: sequence, `available_at`, attempt.
type WalkRow = (i64, i64, i32);

/// Rows a statement returned as one JSON array of arrays (built with
/// `json_group_array`), decoded.
fn json_rows<T: serde::de::DeserializeOwned>(text: String) -> Result<Vec<T>> {
    serde_json::from_str(&text).map_err(|e| Error::Storage(format!("decoding rows: {e}")))
}

fn values(columns: usize, rows: usize) -> String {
    let row = format!("({})", placeholders(columns));
    vec![row; rows].join(",")
}

/// True for SQLite's "database or disk is full" (`SQLITE_FULL`).
fn is_disk_full(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.code().as_deref() == Some("13"))
}

/// The writer's connection to the database file.
pub(super) struct Sqlite {
    conn: SqliteConnection,
    space: Arc<Space>,
    /// Dropped last: the folder stays this broker's until the writer's
    /// connection is closed.
    _lock: DirLock,
}

/// Opens the database, migrates it, and returns the writer (to be run as a
/// task), the reader, the checkpointer and the disk space watch.
///
/// Fails with `FailedPrecondition` if another broker holds the folder, and
/// with `Unavailable` if it cannot be created, locked or opened.
pub(super) async fn open(
    data_dir: &Path,
    config: &StoreConfig,
    notifier: Notifier,
    healthy: watch::Sender<bool>,
) -> Result<(Writer<Sqlite>, Reader<Sqlite>, Checkpointer, Arc<Space>)> {
    tokio::fs::create_dir_all(&data_dir).await.map_err(|e| {
        Error::Unavailable(format!(
            "cannot create data directory {}: {e}",
            data_dir.display()
        ))
    })?;
    // Before the database is touched: a second broker on this folder would
    // run a second writer with its own caches beside ours.
    let lock = DirLock::take_within(data_dir, LOCK_WAIT).await?;
    // A full disk gives its reserve up before migrations need to write.
    let space = Space::open(data_dir, config.disk_reserve).await;
    let path = data_dir.join(DB_FILE);
    let options = SqliteConnectOptions::new()
        .filename(&path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(if config.fsync {
            SqliteSynchronous::Full
        } else {
            SqliteSynchronous::Normal
        })
        .busy_timeout(Duration::from_secs(10))
        .statement_cache_capacity(1024)
        .pragma("cache_size", "-8192")
        .pragma("temp_store", "memory");
    // The checkpointer below copies the WAL into the database off the commit
    // path; the writer checkpoints itself only if the WAL grows past this
    // many pages (a backstop, about 80 MB). Starting the WAL over, the
    // writer cuts it back to `WAL_SIZE_LIMIT`.
    let writer_options = options
        .clone()
        .pragma("wal_autocheckpoint", "20000")
        .pragma("journal_size_limit", WAL_SIZE_LIMIT.to_string());
    let mut conn = SqliteConnection::connect_with(&writer_options)
        .await
        .map_err(|e| Error::Unavailable(format!("cannot open {}: {e}", path.display())))?;
    migrate(&mut conn).await?;
    // The checkpointer never waits for a lock: a checkpoint that would
    // block the writer or wait for readers is left for the next round.
    let checkpointer = SqliteConnection::connect_with(
        &options
            .clone()
            .busy_timeout(Duration::ZERO)
            .pragma("journal_size_limit", WAL_SIZE_LIMIT.to_string()),
    )
    .await?;
    let pool = SqlitePoolOptions::new()
        .max_connections(4)
        .connect_with(options.read_only(true))
        .await?;
    let writer = Writer::new(
        Sqlite {
            conn,
            space: Arc::clone(&space),
            _lock: lock,
        },
        config.dedup_window,
        notifier,
        healthy,
    );
    Ok((
        writer,
        Reader::new(pool, config.commit_timeout),
        Checkpointer::new(checkpointer, Arc::clone(&space)).await?,
        space,
    ))
}

/// Copies committed WAL pages into the database file on its own connection,
/// so that commits do not wait for checkpoints; empties the WAL when the
/// store is idle (or the disk is full); and measures free space for
/// [`Space`] each round.
pub(super) struct Checkpointer {
    conn: SqliteConnection,
    space: Arc<Space>,
    page_size: u64,
    /// The WAL's frame count at the last round, to tell an idle store.
    last_frames: i64,
    failures: LogLimit,
}

/// How often a checkpoint that keeps failing is logged again.
const CHECKPOINT_LOG_AGAIN: Duration = Duration::from_secs(30);

impl Checkpointer {
    async fn new(mut conn: SqliteConnection, space: Arc<Space>) -> Result<Checkpointer> {
        let page_size: i64 = sqlx::query_scalar("PRAGMA page_size")
            .fetch_one(&mut conn)
            .await?;
        Ok(Checkpointer {
            conn,
            space,
            page_size: page_size.max(0) as u64,
            last_frames: -1,
            failures: LogLimit::new(CHECKPOINT_LOG_AGAIN),
        })
    }

    /// Checkpoints every `interval` until `alive` reports the store closed.
    pub(super) async fn run(mut self, alive: impl Fn() -> bool, interval: Duration) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if !alive() {
                break;
            }
            self.round().await;
        }
        let _ = self.conn.close().await;
    }

    /// One round: a passive checkpoint (never blocks the writer); a
    /// truncating one if everything was copied and the store is idle or the
    /// disk is full; then a look at the disk. A checkpoint that would grow
    /// the database file past the free space (less the floor) waits, and
    /// the disk counts as full: it would fail half-way and take the space
    /// that acks need.
    async fn round(&mut self) {
        match self.growth_fits().await {
            // Unknown this round: nothing is decided, nothing copied.
            None => return,
            Some(false) => {
                self.space.settle(false).await;
                return;
            }
            Some(true) => {}
        }
        let full = *self.space.watch().borrow();
        match self.checkpoint("PRAGMA wal_checkpoint(PASSIVE)").await {
            Ok((frames, copied)) => {
                let idle = frames == self.last_frames;
                self.last_frames = frames;
                if frames > 0 && copied == frames && (idle || full) {
                    // With nothing left to copy this only waits for no
                    // reader and no writer (it never waits: no busy
                    // timeout), then cuts the WAL to nothing.
                    if let Ok((0, _)) = self.checkpoint("PRAGMA wal_checkpoint(TRUNCATE)").await {
                        self.last_frames = 0;
                    }
                }
            }
            Err(e) => {
                self.failed(&e);
                if is_disk_full(&e) {
                    self.space.settle(false).await;
                    return;
                }
            }
        }
        self.space.settle(true).await;
    }

    /// Whether a full checkpoint leaves at least the floor free: the
    /// database file grows to the newest snapshot's size. `None` if the
    /// size cannot be read now (the checkpointer never waits for a lock).
    async fn growth_fits(&mut self) -> Option<bool> {
        let pages: i64 = sqlx::query_scalar("PRAGMA page_count")
            .fetch_one(&mut self.conn)
            .await
            .ok()?;
        let target = (pages.max(0) as u64).saturating_mul(self.page_size);
        // What the file holds on disk, not its length: a checkpoint that
        // failed half-way may have left it longer than its blocks.
        let current = std::fs::metadata(self.space.dir().join(DB_FILE)).map_or(0, |m| {
            #[cfg(unix)]
            {
                use std::os::unix::fs::MetadataExt;
                m.len().min(m.blocks().saturating_mul(512))
            }
            #[cfg(not(unix))]
            {
                m.len()
            }
        });
        let growth = target.saturating_sub(current);
        Some(
            growth == 0
                || self
                    .space
                    .free()
                    .is_some_and(|free| free >= growth + LOW_SPACE),
        )
    }

    /// Runs a checkpoint pragma; returns the WAL's frames and how many of
    /// them are in the database now. A checkpoint that could not get its
    /// locks is not a failure: it counts as copying nothing.
    async fn checkpoint(&mut self, pragma: &'static str) -> Result<(i64, i64), sqlx::Error> {
        let (busy, frames, copied): (i64, i64, i64) =
            sqlx::query_as(pragma).fetch_one(&mut self.conn).await?;
        if busy != 0 {
            return Ok((frames.max(0), 0));
        }
        Ok((frames.max(0), copied.max(0)))
    }

    fn failed(&mut self, e: &sqlx::Error) {
        if matches!(e, sqlx::Error::Database(d) if matches!(d.code().as_deref(), Some("5" | "6" | "517")))
        {
            // Busy or locked: the writer's backstop is checkpointing.
            return;
        }
        if is_disk_full(e) {
            self.space.disk_full("a WAL checkpoint failed");
        }
        if let Some(unlogged) = self.failures.hit(std::time::Instant::now()) {
            tracing::warn!(
                error = %e,
                failures_since_last_report = unlogged,
                "WAL checkpoint failed; the writer's backstop will checkpoint"
            );
        }
    }
}

async fn migrate(conn: &mut SqliteConnection) -> Result<()> {
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS tidings_migrations \
         (version INTEGER PRIMARY KEY, applied_at INTEGER NOT NULL)",
    )
    .execute(&mut *conn)
    .await?;
    let current: i64 =
        sqlx::query_scalar("SELECT coalesce(max(version), 0) FROM tidings_migrations")
            .fetch_one(&mut *conn)
            .await?;
    for &(version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > current) {
        let mut tx = conn.begin().await?;
        sqlx::raw_sql(sql).execute(&mut *tx).await?;
        sqlx::query("INSERT INTO tidings_migrations (version, applied_at) VALUES (?, ?)")
            .bind(version)
            .bind(now_micros())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        tracing::info!(version, "applied SQLite migration");
    }
    Ok(())
}

/// Runs `sql` (whose `{}` becomes the list's placeholders) for each chunk of
/// `seqs`, after binding `sub_id` (and `now` first, if given); returns the
/// rows affected.
async fn for_seqs(
    c: &mut Conn,
    sql: &str,
    now: Option<Micros>,
    sub_id: i64,
    seqs: &[i64],
) -> Result<u64> {
    let mut affected = 0;
    for chunk in seqs.chunks(CHUNK) {
        let sql = sql.replace("{}", &placeholders(chunk.len()));
        let mut q = sqlx::query(AssertSqlSafe(sql));
        if let Some(now) = now {
            q = q.bind(now);
        }
        q = q.bind(sub_id);
        for seq in chunk {
            q = q.bind(*seq);
        }
        affected += q.execute(&mut *c).await?.rows_affected();
    }
    Ok(affected)
}

/// Runs `sql` on all dead letters, or on those in `seqs` if it is not empty.
async fn for_dead(
    c: &mut Conn,
    sql: &str,
    now: Option<Micros>,
    sub_id: i64,
    seqs: &[i64],
) -> Result<i64> {
    if seqs.is_empty() {
        let mut q = sqlx::query(AssertSqlSafe(sql.to_owned()));
        if let Some(now) = now {
            q = q.bind(now);
        }
        return Ok(q.bind(sub_id).execute(c).await?.rows_affected() as i64);
    }
    let sql = format!("{sql} AND seq IN ({{}})");
    Ok(for_seqs(c, &sql, now, sub_id, seqs).await? as i64)
}

/// SQLite's text of the statements written once in `statements.rs`, which
/// binds them in the order of their placeholders.
///
/// A LIMIT is written `LIMIT ? + 0` throughout, never as a bare parameter:
/// SQLite plans a bare one as the integer bound to it, and so prepares the
/// statement again whenever a different number is bound (profiled at 6% of
/// an ordered run's samples, most of it the held-run walk's 32-way UNION).
mod sql {
    pub(super) const TOPIC: &str =
        concat!("SELECT ", topic_columns!(), " FROM topics WHERE name = ?");
    pub(super) const LIST_TOPICS: &str = concat!(
        "SELECT ",
        topic_columns!(),
        " FROM topics WHERE name > ? ORDER BY name LIMIT ? + 0"
    );
    pub(super) const INSERT_TOPIC: &str = concat!(
        "INSERT INTO topics (name, created_at, retention_us, max_age_us) VALUES (?, ?, ?, ?) \
         ON CONFLICT (name) DO NOTHING RETURNING ",
        topic_columns!()
    );
    // One writer: the topic's row needs no lock.
    pub(super) const LOCK_TOPIC: &str = "SELECT last_seq FROM topics WHERE id = ?";
    pub(super) const LAST_SEQ: &str = "SELECT last_seq FROM topics WHERE id = ?";
    pub(super) const SET_LAST_SEQ: &str = "UPDATE topics SET last_seq = ? WHERE id = ?";
    pub(super) const SET_TOPIC_SETTINGS: &str =
        "UPDATE topics SET retention_us = ?, max_age_us = ? WHERE id = ?";
    pub(super) const DELETE_TOPIC: [&str; 3] = [
        "DELETE FROM messages WHERE topic_id = ?",
        "DELETE FROM dedup WHERE topic_id = ?",
        "DELETE FROM topics WHERE id = ?",
    ];
    pub(super) const MESSAGES_AFTER: &str = concat!(
        "SELECT ",
        message_columns!(),
        " FROM messages m WHERE m.topic_id = ? AND m.seq > ? ORDER BY m.seq LIMIT ? + 0"
    );
    pub(super) const MESSAGE_AT: &str = concat!(
        "SELECT ",
        message_columns!(),
        " FROM messages m WHERE m.topic_id = ? AND m.seq = ?"
    );
    pub(super) const FIRST_SEQ_AT: &str =
        "SELECT min(seq) FROM messages WHERE topic_id = ? AND published_at >= ?";
    pub(super) const FIRST_SEQ: &str = "SELECT min(seq) FROM messages WHERE topic_id = ?";
    pub(super) const PUBLISHED_AT: &str =
        "SELECT published_at FROM messages WHERE topic_id = ? AND seq = ?";
    pub(super) const SUB: &str = concat!(
        "SELECT ",
        sub_columns!(),
        " FROM subscriptions s JOIN topics t ON t.id = s.topic_id WHERE s.name = ?"
    );
    pub(super) const LIST_SUBS: &str = concat!(
        "SELECT ",
        sub_columns!(),
        " FROM subscriptions s JOIN topics t ON t.id = s.topic_id \
         WHERE s.name > ?1 AND (?2 IS NULL OR t.name = ?2) ORDER BY s.name LIMIT ?3 + 0"
    );
    pub(super) const SUB_NAMES: &str =
        "SELECT name FROM subscriptions WHERE ?1 IS NULL OR topic_id = ?1 ORDER BY name";
    pub(super) const DEAD_LETTER_USERS: &str =
        "SELECT name FROM subscriptions WHERE dead_letter_topic = ?1 ORDER BY name LIMIT ?2 + 0";
    pub(super) const INSERT_SUB: &str = "INSERT INTO subscriptions (name, topic_id, created_at, ack_deadline_us, max_attempts, \
         min_backoff_us, max_backoff_us, dead_letter_topic, ordered, cursor) \
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (name) DO NOTHING";
    // One writer: the subscription's row needs no lock.
    pub(super) const LOCK_CURSOR: &str = "SELECT cursor FROM subscriptions WHERE id = ?";
    pub(super) const SET_SUB_SETTINGS: &str = "UPDATE subscriptions SET ack_deadline_us = ?, max_attempts = ?, min_backoff_us = ?, \
         max_backoff_us = ?, dead_letter_topic = ?, ordered = ? WHERE id = ?";
    pub(super) const DELETE_SUB: [&str; 2] = [
        "DELETE FROM deliveries WHERE sub_id = ?",
        "DELETE FROM subscriptions WHERE id = ?",
    ];
    pub(super) const ADVANCE: &str = "UPDATE subscriptions SET cursor = coalesce(?, cursor), delivered = delivered + ?, \
         redelivered = redelivered + ? WHERE id = ?";
    pub(super) const ADD_ACKED: &str = "UPDATE subscriptions SET acked = acked + ? WHERE id = ?";
    pub(super) const DROP_FROM: &str =
        "DELETE FROM deliveries WHERE sub_id = ? AND (state IN (0, 1) OR seq >= ?)";
    pub(super) const SET_CURSOR: &str = "UPDATE subscriptions SET cursor = ? WHERE id = ?";
    pub(super) const COUNTERS: &str = "SELECT s.delivered, s.acked, s.redelivered, t.last_seq FROM subscriptions s \
         JOIN topics t ON t.id = s.topic_id WHERE s.id = ?";
    pub(super) const DUE_ORDERED: &str = concat!(
        // The planner, left to itself, walks the subscription's rows in
        // sequence order, held messages included; the due index looks only
        // at what is due (held messages are never due, see `HELD`).
        "SELECT d.attempt, ",
        message_columns!(),
        " FROM deliveries d INDEXED BY deliveries_due \
         JOIN messages m ON m.topic_id = ?3 AND m.seq = d.seq \
         WHERE d.sub_id = ?1 AND d.state = 0 AND d.available_at <= ?2 \
         AND (d.key IS NULL OR NOT EXISTS (SELECT 1 FROM deliveries e \
           INDEXED BY deliveries_by_key WHERE e.sub_id = d.sub_id AND e.key IS NOT NULL \
           AND e.key = d.key AND e.seq < d.seq AND e.state IN (0, 1))) \
         ORDER BY d.seq LIMIT ?4 + 0"
    );
    pub(super) const DUE: &str = concat!(
        "SELECT d.attempt, ",
        message_columns!(),
        " FROM deliveries d \
         JOIN messages m ON m.topic_id = ?3 AND m.seq = d.seq \
         WHERE d.sub_id = ?1 AND d.state = 0 AND d.available_at <= ?2 \
         ORDER BY d.available_at LIMIT ?4 + 0"
    );
    pub(super) const NEXT_DUE: &str = "SELECT min(available_at) FROM deliveries \
         WHERE sub_id = ? AND state IN (0, 1) AND available_at > ?";
    pub(super) const EXPIRED_LEASES: &str = "SELECT seq, attempt, available_at FROM deliveries \
         WHERE sub_id = ? AND state = 1 AND available_at <= ? LIMIT ? + 0";
    pub(super) const SET_WAITING: &str = "UPDATE deliveries SET state = 0, available_at = ?, reason = coalesce(?, reason) \
         WHERE sub_id = ? AND seq = ?";
    pub(super) const SET_DEADLINE: &str =
        "UPDATE deliveries SET available_at = ? WHERE sub_id = ? AND seq = ?";
    pub(super) const SET_DEAD: &str = "UPDATE deliveries SET state = 2, available_at = ?, \
         reason = ? WHERE sub_id = ? AND seq = ?";
    pub(super) const DELIVERY_COUNTS: &str = "SELECT coalesce(sum(state = 1 AND available_at > ?), 0), \
         coalesce(sum(state IN (0, 1)), 0), coalesce(sum(state = 2), 0), \
         min(CASE WHEN state IN (0, 1) THEN seq END), min(seq) \
         FROM deliveries WHERE sub_id = ?";
    pub(super) const BLOCKED_KEY_COUNT: &str = "SELECT count(DISTINCT key) FROM deliveries WHERE sub_id = ? AND state = 0 \
         AND attempt > 0 AND key IS NOT NULL";
    pub(super) const BLOCKED_KEYS: &str = "SELECT DISTINCT key FROM deliveries WHERE sub_id = ? AND state = 0 \
         AND attempt > 0 AND key IS NOT NULL ORDER BY key LIMIT ? + 0";
    pub(super) const DEAD_LETTERS: &str = concat!(
        "SELECT ",
        dead_letter_columns!(),
        " FROM deliveries d \
         JOIN messages m ON m.topic_id = ? AND m.seq = d.seq \
         WHERE d.sub_id = ? AND d.state = 2 AND d.seq > ? ORDER BY d.seq LIMIT ? + 0"
    );
    pub(super) const UNDONE: &str = concat!(
        "SELECT ",
        dead_letter_columns!(),
        ", d.state FROM deliveries d \
         JOIN messages m ON m.topic_id = ? AND m.seq = d.seq \
         WHERE d.sub_id = ? AND d.state IN (0, 1) AND d.seq > ? ORDER BY d.seq LIMIT ? + 0"
    );
    pub(super) const TOPIC_GAUGES: &str = "SELECT t.name, t.last_seq, \
         (SELECT min(m.seq) FROM messages m WHERE m.topic_id = t.id), t.expired_count \
         FROM topics t ORDER BY t.name";
    // As `DELIVERY_COUNTS` and `BLOCKED_KEY_COUNT` of every subscription at
    // once, and the publish time of `oldest_unacked` (in `common.rs`).
    pub(super) const SUBSCRIPTION_GAUGES: &str = "WITH d AS (SELECT sub_id, \
         coalesce(sum(state = 1 AND available_at > ?1), 0) AS leased, \
         coalesce(sum(state IN (0, 1)), 0) AS undone, coalesce(sum(state = 2), 0) AS dead, \
         min(CASE WHEN state IN (0, 1) THEN seq END) AS first_undone, min(seq) AS first_any, \
         count(DISTINCT CASE WHEN state = 0 AND attempt > 0 THEN key END) AS blocked \
         FROM deliveries GROUP BY sub_id) \
         SELECT s.name, t.name, s.cursor, t.last_seq, s.delivered, s.acked, s.redelivered, \
         coalesce(d.leased, 0), coalesce(d.undone, 0), coalesce(d.dead, 0), \
         d.first_undone, d.first_any, CASE WHEN s.ordered THEN coalesce(d.blocked, 0) ELSE 0 END, \
         (SELECT m.published_at FROM messages m WHERE m.topic_id = s.topic_id AND m.seq = \
           CASE WHEN s.cursor < t.last_seq THEN min(coalesce(d.first_undone, s.cursor + 1), s.cursor + 1) \
           ELSE d.first_undone END) \
         FROM subscriptions s JOIN topics t ON t.id = s.topic_id \
         LEFT JOIN d ON d.sub_id = s.id ORDER BY s.name";
    pub(super) const DEAD_COUNT: &str =
        "SELECT count(*) FROM deliveries WHERE sub_id = ? AND state = 2";
    pub(super) const LOW_WATER: &str = "SELECT min(min(coalesce((SELECT min(seq) FROM deliveries d \
         WHERE d.sub_id = s.id), s.cursor + 1), s.cursor + 1)) \
         FROM subscriptions s WHERE s.topic_id = ?";
    pub(super) const DELETE_MESSAGES: &str = "DELETE FROM messages WHERE topic_id = ? \
         AND seq >= ? AND seq < ? AND published_at <= ?";
    pub(super) const ANY_MESSAGE_IN: &str =
        "SELECT EXISTS (SELECT 1 FROM messages WHERE topic_id = ? AND seq >= ? AND seq < ?)";
    pub(super) const MESSAGE_TIMES: &str = "SELECT seq, published_at FROM messages \
         WHERE topic_id = ? AND seq >= ? ORDER BY seq LIMIT ? + 0";
    pub(super) const NEXT_DEADLINE: &str =
        "SELECT min(available_at) FROM deliveries WHERE sub_id = ? AND state = 1";
    // Not run here: the one writer notes its leases' deadlines in memory
    // (`sweep.rs`), so SQLite keeps no index of leases by deadline alone,
    // and this would read every delivery.
    pub(super) const SUBS_WITH_EXPIRED_LEASES: &str = "SELECT s.name FROM (SELECT sub_id \
         FROM deliveries WHERE state = 1 AND available_at <= ? ORDER BY available_at LIMIT ? + 0) d \
         JOIN subscriptions s ON s.id = d.sub_id";
    pub(super) const EXPIRE_MESSAGES: &str = "DELETE FROM messages WHERE topic_id = ? AND seq <= ?";
    pub(super) const EXPIRE_DELIVERIES: &str = "DELETE FROM deliveries WHERE seq <= ?2 \
         AND sub_id IN (SELECT id FROM subscriptions WHERE topic_id = ?1)";
    pub(super) const MOVE_CURSORS_PAST: &str =
        "UPDATE subscriptions SET cursor = max(cursor, ?) WHERE topic_id = ? RETURNING name";
    pub(super) const COUNT_EXPIRED: &str =
        "UPDATE topics SET expired_count = expired_count + ? WHERE id = ?";
    // 9223372036854775807 is `HELD`.
    pub(super) const RELEASE_HELD: &str = "UPDATE deliveries SET available_at = ? \
         WHERE sub_id = ? AND available_at = 9223372036854775807";
    pub(super) const HEAL_HELD: &str = "UPDATE deliveries SET available_at = ?1 \
         WHERE available_at = 9223372036854775807 \
         AND sub_id IN (SELECT id FROM subscriptions WHERE topic_id = ?2) \
         AND NOT EXISTS (SELECT 1 FROM deliveries e INDEXED BY deliveries_by_key \
         WHERE e.sub_id = deliveries.sub_id AND e.key IS NOT NULL AND e.key = deliveries.key \
         AND e.seq < deliveries.seq AND e.state IN (0, 1))";
    pub(super) const PRUNE_DEDUP: &str = "DELETE FROM dedup WHERE (topic_id, id) IN \
         (SELECT topic_id, id FROM dedup WHERE published_at < ? LIMIT ? + 0)";
}

impl Backend for Sqlite {
    shared_statements!();

    type Db = sqlx::Sqlite;

    const EXCLUSIVE: bool = true;

    fn conn(&mut self) -> &mut Conn {
        &mut self.conn
    }

    async fn begin(&mut self) -> Result<()> {
        sqlx::query("BEGIN IMMEDIATE")
            .execute(&mut self.conn)
            .await?;
        Ok(())
    }

    async fn commit(&mut self, _touched: &Touched) -> Result<()> {
        sqlx::query("COMMIT").execute(&mut self.conn).await?;
        Ok(())
    }

    async fn recover(&mut self) -> bool {
        let _ = sqlx::query("ROLLBACK").execute(&mut self.conn).await;
        // A group that failed for want of disk space gives the reserve up,
        // so that acks, deletions and checkpoints can free more.
        self.space.after_failure();
        true
    }

    async fn rollback(&mut self) -> bool {
        // SQLite may have rolled the transaction back itself already; then
        // ROLLBACK fails with "no transaction is active", which is as good.
        let _ = sqlx::query("ROLLBACK").execute(&mut self.conn).await;
        true
    }

    async fn close(mut self) {
        // A clean shutdown leaves an empty WAL behind, not the last burst's.
        if let Err(e) = sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
            .execute(&mut self.conn)
            .await
        {
            tracing::warn!(error = %e, "the last WAL checkpoint failed");
        }
        if let Err(e) = self.conn.close().await {
            tracing::warn!(error = %e, "closing the database failed");
        }
    }

    async fn try_maintenance_lock(_c: &mut Conn) -> Result<bool> {
        Ok(true)
    }

    async fn dedup_lookup(c: &mut Conn, topic_id: i64, ids: &[Uuid]) -> Result<Vec<(Uuid, i64)>> {
        let mut known = Vec::new();
        for chunk in ids.chunks(CHUNK) {
            let sql = format!(
                "SELECT id, seq FROM dedup WHERE topic_id = ? AND id IN ({})",
                placeholders(chunk.len())
            );
            let mut q = sqlx::query(AssertSqlSafe(sql)).bind(topic_id);
            for id in chunk {
                q = q.bind(id.as_bytes().to_vec());
            }
            for r in q.fetch_all(&mut *c).await? {
                let id: Vec<u8> = r.try_get(0)?;
                known.push((uuid_from(&id)?, r.try_get(1)?));
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
            let sql = format!(
                "INSERT INTO messages (topic_id, seq, id, key, payload, attributes, created_at, \
                 published_at) VALUES {}",
                values(8, chunk.len())
            );
            let mut q = sqlx::query(AssertSqlSafe(sql));
            for (m, seq) in chunk {
                q = q
                    .bind(topic_id)
                    .bind(*seq)
                    .bind(m.id.as_bytes().to_vec())
                    .bind(m.key.clone())
                    .bind(m.payload.clone())
                    .bind(encode_attributes(&m.attributes))
                    .bind(m.created_at)
                    .bind(now);
            }
            q.execute(&mut *c).await?;
            let sql = format!(
                "INSERT INTO dedup (topic_id, id, seq, published_at) VALUES {}",
                values(4, chunk.len())
            );
            let mut q = sqlx::query(AssertSqlSafe(sql));
            for (m, seq) in chunk {
                q = q
                    .bind(topic_id)
                    .bind(m.id.as_bytes().to_vec())
                    .bind(*seq)
                    .bind(now);
            }
            q.execute(&mut *c).await?;
        }
        Ok(())
    }

    async fn insert_deliveries(c: &mut Conn, sub_id: i64, rows: &[DeliveryRow]) -> Result<()> {
        for chunk in rows.chunks(CHUNK) {
            let sql = format!(
                "INSERT INTO deliveries (sub_id, seq, state, attempt, available_at, lease, \
                 first_delivery_at, last_delivery_at, key) VALUES {}",
                values(9, chunk.len())
            );
            let mut q = sqlx::query(AssertSqlSafe(sql));
            for (seq, state, attempt, available_at, lease, at, key) in chunk {
                q = q
                    .bind(sub_id)
                    .bind(*seq)
                    .bind(*state)
                    .bind(*attempt)
                    .bind(*available_at)
                    .bind(*lease)
                    .bind(*at)
                    .bind(*at)
                    .bind(key.clone());
            }
            q.execute(&mut *c).await?;
        }
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
        // One probe per key that stops at its newest row in progress, so
        // the cost does not grow with the messages a key holds back; no
        // row: the key is free; its newest leased by `holder`: the key is
        // that stream's; leased by another until after `now`: that one's.
        // The rows are sifted here: a filter on the probe's result in SQL
        // would run the probe again for each term.
        // Each probe's answer comes with its key's place in `keys`.
        let probes: Vec<(usize, Option<i64>)> = json_rows(
            sqlx::query_scalar(
                "SELECT json_group_array(json_array(j.key, (SELECT CASE WHEN d.state = 1 \
                 AND d.available_at > ?2 THEN d.lease >> 24 ELSE 0 END \
                 FROM deliveries d INDEXED BY deliveries_by_key \
                 WHERE d.sub_id = ?1 AND d.key IS NOT NULL AND d.key = j.value \
                 AND d.state IN (0, 1) ORDER BY d.seq DESC LIMIT 1))) FROM json_each(?3) j",
            )
            .bind(sub_id)
            .bind(now)
            .bind(json_list(serde_json::to_string(keys))?)
            .fetch_one(&mut *c)
            .await?,
        )?;
        Ok(probes
            .into_iter()
            .filter_map(|(i, found)| {
                let key = keys.get(i)?;
                found
                    .filter(|&h| holder == 0 || h != holder)
                    .map(|h| (key.clone(), h))
            })
            .collect())
    }

    async fn deliveries(
        c: &mut Conn,
        sub_id: i64,
        seqs: &[i64],
    ) -> Result<HashMap<i64, LeaseState>> {
        if seqs.is_empty() {
            return Ok(HashMap::new());
        }
        let found: Vec<(i64, i64, i64, i64, i32)> = json_rows(
            sqlx::query_scalar(
                "SELECT json_group_array(json_array(seq, state, lease, available_at, attempt)) \
                 FROM deliveries WHERE sub_id = ?1 AND seq IN (SELECT value FROM json_each(?2))",
            )
            .bind(sub_id)
            .bind(json_list(serde_json::to_string(seqs))?)
            .fetch_one(&mut *c)
            .await?,
        )?;
        Ok(found
            .into_iter()
            .map(|(seq, state, lease, available_at, attempt)| {
                (seq, (state, lease, available_at, attempt))
            })
            .collect())
    }

    async fn promote_next(c: &mut Conn, sub_id: i64, seqs: &[i64], now: Micros) -> Result<()> {
        if seqs.is_empty() {
            return Ok(());
        }
        // No `d.key IS NOT NULL` here: SQLite would read it as a range on
        // the key index and walk every row of the subscription.
        sqlx::query(
            "UPDATE deliveries SET available_at = ?1 WHERE sub_id = ?2 \
             AND available_at = 9223372036854775807 AND seq IN (SELECT (SELECT e.seq \
             FROM deliveries e INDEXED BY deliveries_by_key WHERE e.sub_id = d.sub_id \
             AND e.key IS NOT NULL AND e.key = d.key AND e.seq > d.seq \
             AND e.state IN (0, 1) ORDER BY e.seq LIMIT 1) FROM deliveries d \
             WHERE d.sub_id = ?2 AND d.seq IN (SELECT value FROM json_each(?3)))",
        )
        .bind(now)
        .bind(sub_id)
        .bind(json_list(serde_json::to_string(seqs))?)
        .execute(&mut *c)
        .await?;
        Ok(())
    }

    async fn earlier_in_progress(c: &mut Conn, sub_id: i64, seqs: &[i64]) -> Result<Earlier> {
        // SQLite takes no row locks: the ack check's statement, less the
        // leases.
        Ok(Self::deliveries_in_key_order(c, sub_id, seqs).await?.1)
    }

    async fn deliveries_in_key_order(
        c: &mut Conn,
        sub_id: i64,
        seqs: &[i64],
    ) -> Result<(HashMap<i64, LeaseState>, Earlier)> {
        if seqs.is_empty() {
            return Ok((HashMap::new(), HashMap::new()));
        }
        // `deliveries` and `earlier_in_progress` in one statement.
        let found: Vec<KeyOrderRow> = json_rows(
            sqlx::query_scalar(
                "SELECT json_group_array(json_array(d.seq, d.state, d.lease, d.available_at, \
                 d.attempt, d.key, (SELECT e.seq FROM deliveries e INDEXED BY deliveries_by_key \
                 WHERE e.sub_id = d.sub_id AND e.key IS NOT NULL AND e.key = d.key \
                 AND e.seq < d.seq AND e.state IN (0, 1) \
                 AND coalesce(e.last_delivery_at, 0) <= coalesce(d.last_delivery_at, 0) \
                 ORDER BY e.seq DESC LIMIT 1))) \
                 FROM deliveries d WHERE d.sub_id = ?1 AND d.seq IN (SELECT value FROM json_each(?2))",
            )
            .bind(sub_id)
            .bind(json_list(serde_json::to_string(seqs))?)
            .fetch_one(&mut *c)
            .await?,
        )?;
        let mut rows = HashMap::new();
        let mut earlier = HashMap::new();
        split_key_order(found, &mut rows, &mut earlier);
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
        if seqs.is_empty() {
            return Ok(());
        }
        sqlx::query(
            "UPDATE deliveries SET state = 1, attempt = attempt + 1, available_at = ?1, \
             lease = ?2, first_delivery_at = coalesce(first_delivery_at, ?3), \
             last_delivery_at = ?3, reason = NULL WHERE sub_id = ?4 \
             AND seq IN (SELECT value FROM json_each(?5))",
        )
        .bind(deadline)
        .bind(token)
        .bind(now)
        .bind(sub_id)
        .bind(json_list(serde_json::to_string(seqs))?)
        .execute(&mut *c)
        .await?;
        Ok(())
    }

    async fn hold_from(c: &mut Conn, sub_id: i64, key: &str, from: i64) -> Result<Vec<i64>> {
        // 9223372036854775807 is `HELD`.
        let held = sqlx::query_scalar(
            "UPDATE deliveries SET attempt = CASE WHEN state = 1 THEN attempt - 1 ELSE attempt END, \
             state = 0, available_at = 9223372036854775807 WHERE sub_id = ?1 \
             AND key IS NOT NULL AND key = ?2 AND seq >= ?3 AND state IN (0, 1) \
             AND available_at <> 9223372036854775807 RETURNING seq",
        )
        .bind(sub_id)
        .bind(key)
        .bind(from)
        .fetch_all(&mut *c)
        .await?;
        Ok(held)
    }

    async fn held_after(
        c: &mut Conn,
        sub_id: i64,
        runs: &[(String, i64, i64)],
    ) -> Result<Vec<(String, bool)>> {
        // SQLite removes an acked row's index entries at once, so any row
        // of the key in progress before the run counts (those in turn were
        // acked before it: only rows out of turn are left).
        if runs.is_empty() {
            return Ok(Vec::new());
        }
        // Each run found comes back as its place in `runs`.
        let found: Vec<(usize, i64)> = json_rows(
            sqlx::query_scalar(
                "SELECT json_group_array(json_array(r.i, EXISTS (SELECT 1 FROM deliveries e \
                 INDEXED BY deliveries_by_key WHERE e.sub_id = ?1 AND e.key IS NOT NULL \
                 AND e.key = r.k AND e.seq < r.first AND e.state IN (0, 1)))) \
                 FROM (SELECT key AS i, value ->> 0 AS k, value ->> 1 AS first, \
                 value ->> 2 AS last FROM json_each(?2)) r \
                 WHERE (SELECT e.available_at FROM deliveries e INDEXED BY deliveries_by_key \
                 WHERE e.sub_id = ?1 AND e.key IS NOT NULL AND e.key = r.k \
                 AND e.seq > r.last AND e.state IN (0, 1) ORDER BY e.seq LIMIT 1) \
                 = 9223372036854775807",
            )
            .bind(sub_id)
            .bind(json_list(serde_json::to_string(runs))?)
            .fetch_one(&mut *c)
            .await?,
        )?;
        Ok(found
            .into_iter()
            .filter_map(|(i, out_of_turn)| Some((runs.get(i)?.0.clone(), out_of_turn != 0)))
            .collect())
    }

    async fn held_followers(
        c: &mut Conn,
        sub: &SubRow,
        heads: &[(String, i64)],
        per_key: i64,
        holder: i64,
        now: Micros,
        known: &mut HeldMessages,
    ) -> Result<HashMap<String, Vec<(i32, StoredMessage)>>> {
        if heads.is_empty() {
            return Ok(HashMap::new());
        }
        // One walk of `deliveries_by_key` per head, from the head on, at
        // most `per_key` rows: a key's backlog is never read whole. All the
        // heads go in one statement, as one JSON array; each walk answers
        // its rows (sequence, `available_at`, attempt) as one JSON array,
        // with the head's place in `heads`. The walks read no message: the
        // messages of the runs kept are read afterwards, in one statement.
        let found: Vec<(usize, Vec<WalkRow>)> = json_rows(
            sqlx::query_scalar(
                "SELECT json_group_array(json_array(j.key, json((SELECT \
                 json_group_array(json_array(w.seq, w.available_at, w.attempt)) FROM \
                 (SELECT d.seq, d.available_at, d.attempt FROM deliveries d \
                 INDEXED BY deliveries_by_key WHERE d.sub_id = ?1 AND d.key IS NOT NULL \
                 AND d.key = j.value ->> 0 AND d.seq > j.value ->> 1 AND d.state IN (0, 1) \
                 ORDER BY d.seq LIMIT ?2 + 0) w)))) FROM json_each(?5) j \
                 WHERE ?3 = 0 OR EXISTS (SELECT 1 FROM deliveries h WHERE h.sub_id = ?1 \
                 AND h.seq = j.value ->> 1 AND h.state = 1 AND (h.lease >> 24) = ?3 \
                 AND h.available_at > ?4)",
            )
            .bind(sub.id)
            .bind(per_key)
            .bind(holder)
            .bind(now)
            .bind(json_list(serde_json::to_string(heads))?)
            .fetch_one(&mut *c)
            .await?,
        )?;
        let mut walked = Vec::new();
        for (i, rows) in found {
            let Some((key, _)) = heads.get(i) else {
                continue;
            };
            walked.extend(rows.into_iter().map(|(seq, available_at, attempt)| {
                (key.as_str(), seq, available_at, (seq, attempt))
            }));
        }
        // Each key's rows in sequence order.
        walked.sort_unstable_by_key(|&(_, seq, _, _)| seq);
        let runs = runs_behind(walked, heads);
        // The messages the writer kept when it held them back need no read.
        let mut messages = HashMap::new();
        let mut unknown = Vec::new();
        for &(seq, _) in runs.values().flatten() {
            match known.take(sub.topic_id, seq) {
                Some(message) => {
                    messages.insert(seq, message);
                }
                None => unknown.push(seq),
            }
        }
        if !unknown.is_empty() {
            let rows = sqlx::query(concat!(
                "SELECT ",
                message_columns!(),
                " FROM messages m WHERE m.topic_id = ?1 \
                 AND m.seq IN (SELECT value FROM json_each(?2))"
            ))
            .bind(sub.topic_id)
            .bind(json_list(serde_json::to_string(&unknown))?)
            .fetch_all(&mut *c)
            .await?;
            for row in &rows {
                let message = message_from_row(row, 0, &sub.topic)?;
                messages.insert(message.sequence, message);
            }
        }
        // A run stops before a message that is gone (it cannot be handed
        // on, and nothing after it may go first).
        Ok(runs
            .into_iter()
            .filter_map(|(key, run)| {
                let run: Vec<(i32, StoredMessage)> = run
                    .into_iter()
                    .map_while(|(seq, attempt)| Some((attempt, messages.remove(&seq)?)))
                    .collect();
                (!run.is_empty()).then(|| (key.to_owned(), run))
            })
            .collect())
    }

    async fn release(c: &mut Conn, sub_id: i64, seqs: &[i64], now: Micros) -> Result<()> {
        let sql = "UPDATE deliveries SET state = 0, available_at = ?, attempt = attempt - 1 \
             WHERE sub_id = ? AND seq IN ({})";
        for_seqs(c, sql, Some(now), sub_id, seqs).await?;
        Ok(())
    }

    async fn delete_deliveries(c: &mut Conn, sub_id: i64, seqs: &[i64]) -> Result<()> {
        let sql = "DELETE FROM deliveries WHERE sub_id = ? AND seq IN ({})";
        for_seqs(c, sql, None, sub_id, seqs).await?;
        Ok(())
    }

    async fn redrive(c: &mut Conn, sub_id: i64, seqs: &[i64], now: Micros) -> Result<i64> {
        let sql = "UPDATE deliveries SET state = 0, attempt = 0, available_at = ?, reason = NULL \
                   WHERE sub_id = ? AND state = 2";
        for_dead(c, sql, Some(now), sub_id, seqs).await
    }

    async fn purge(c: &mut Conn, sub_id: i64, seqs: &[i64]) -> Result<i64> {
        let sql = "DELETE FROM deliveries WHERE sub_id = ? AND state = 2";
        for_dead(c, sql, None, sub_id, seqs).await
    }
}

#[cfg(test)]
mod tests {
    /// Every LIMIT in the SQLite SQL of the broker, the outbox and the
    /// inbox is an expression, not a bare parameter (see the `sql` module).
    #[test]
    fn no_limit_is_a_bare_parameter() {
        let sources = [
            ("store/sqlite.rs", include_str!("sqlite.rs")),
            ("outbox/sqlite.rs", include_str!("../outbox/sqlite.rs")),
            ("inbox/sqlite.rs", include_str!("../inbox/sqlite.rs")),
        ];
        // Put together, so that this text does not match itself.
        let needle = ["LIMIT", " ?"].concat();
        let mut limits = 0;
        for (file, text) in sources {
            for (at, _) in text.match_indices(&needle) {
                let rest = &text[at + needle.len()..];
                let rest = rest.trim_start_matches(|c: char| c.is_ascii_digit());
                assert!(
                    rest.starts_with(" + 0"),
                    "{file}: a bare parameter as a LIMIT: {}",
                    &text[at..(at + 24).min(text.len())]
                );
                limits += 1;
            }
        }
        assert!(limits > 10, "the LIMITs were found: {limits}");
    }
}

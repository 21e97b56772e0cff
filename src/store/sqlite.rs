//! The SQLite backend: opening the database file, the checkpointer, and
//! SQLite's SQL for each statement of [`Backend`]. The schema is in
//! `migrations/sqlite/`. One writer owns the file (`EXCLUSIVE`), so
//! "locks" are plain reads here.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{AssertSqlSafe, Connection, Row};
use tokio::sync::watch;
use uuid::Uuid;

use super::backend::{Backend, LeaseState};
use super::common::{
    CHUNK, DeliveryCounts, DeliveryRow, MESSAGE_COLUMNS, SubRow, TopicRow, Touched,
    dead_letter_from_row, encode_attributes, message_from_row, uuid_from,
};
use super::reader::Reader;
use super::writer::Writer;
use super::{Notifier, StoreConfig};
use crate::error::{Error, Result};
use crate::model::{
    DeadLetter, Micros, NewMessage, StoredMessage, SubscriptionSettings, micros, now_micros,
};

/// Schema versions, applied in order at open.
const MIGRATIONS: &[(i64, &str)] = &[(1, include_str!("../../migrations/sqlite/0001_broker.sql"))];

type Conn = SqliteConnection;

fn placeholders(n: usize) -> String {
    vec!["?"; n].join(",")
}

fn values(columns: usize, rows: usize) -> String {
    let row = format!("({})", placeholders(columns));
    vec![row; rows].join(",")
}

/// The writer's connection to the database file.
pub(super) struct Sqlite {
    conn: SqliteConnection,
}

/// Opens the database, migrates it, and returns the writer (to be run as a
/// task), the reader and the checkpointer.
pub(super) async fn open(
    config: &StoreConfig,
    notifier: Notifier,
    healthy: watch::Sender<bool>,
) -> Result<(Writer<Sqlite>, Reader<Sqlite>, Checkpointer)> {
    tokio::fs::create_dir_all(&config.data_dir)
        .await
        .map_err(|e| {
            Error::Unavailable(format!(
                "cannot create data directory {}: {e}",
                config.data_dir.display()
            ))
        })?;
    let path = config.data_dir.join("tidings.db");
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
    // many pages (a backstop, about 80 MB).
    let writer_options = options.clone().pragma("wal_autocheckpoint", "20000");
    let mut conn = SqliteConnection::connect_with(&writer_options)
        .await
        .map_err(|e| Error::Unavailable(format!("cannot open {}: {e}", path.display())))?;
    migrate(&mut conn).await?;
    let checkpointer = SqliteConnection::connect_with(&options).await?;
    let pool = SqlitePoolOptions::new()
        .max_connections(4)
        .connect_with(options.read_only(true))
        .await?;
    let writer = Writer::new(Sqlite { conn }, config.dedup_window, notifier, healthy);
    Ok((
        writer,
        Reader::new(pool),
        Checkpointer { conn: checkpointer },
    ))
}

/// Copies committed WAL pages into the database file on its own connection,
/// so that commits do not wait for checkpoints.
pub(super) struct Checkpointer {
    conn: SqliteConnection,
}

impl Checkpointer {
    /// Checkpoints every `interval` until `alive` reports the store closed.
    pub(super) async fn run(mut self, alive: impl Fn() -> bool, interval: Duration) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if !alive() {
                break;
            }
            if let Err(e) = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
                .execute(&mut self.conn)
                .await
            {
                tracing::warn!(error = %e, "WAL checkpoint failed; the writer's backstop will checkpoint");
            }
        }
        let _ = self.conn.close().await;
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

/// Runs `sql` with `id` as its one parameter.
async fn run_with_id(c: &mut Conn, sql: &'static str, id: i64) -> Result<u64> {
    Ok(sqlx::query(sql).bind(id).execute(c).await?.rows_affected())
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

fn topic_rows(rows: &[SqliteRow]) -> Result<Vec<TopicRow>> {
    rows.iter().map(TopicRow::from_row).collect()
}

fn messages(rows: &[SqliteRow], at: usize, topic: &str) -> Result<Vec<StoredMessage>> {
    rows.iter()
        .map(|r| message_from_row(r, at, topic))
        .collect()
}

impl Backend for Sqlite {
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
        true
    }

    async fn close(self) {
        if let Err(e) = self.conn.close().await {
            tracing::warn!(error = %e, "closing the database failed");
        }
    }

    async fn try_maintenance_lock(_c: &mut Conn) -> Result<bool> {
        Ok(true)
    }

    // ---- topics ----

    async fn topic(c: &mut Conn, name: &str) -> Result<Option<TopicRow>> {
        let sql = format!("SELECT {} FROM topics WHERE name = ?", TopicRow::COLUMNS);
        let row = sqlx::query(AssertSqlSafe(sql))
            .bind(name)
            .fetch_optional(c)
            .await?;
        row.as_ref().map(TopicRow::from_row).transpose()
    }

    async fn list_topics(c: &mut Conn, after: &str, limit: i64) -> Result<Vec<TopicRow>> {
        let sql = format!(
            "SELECT {} FROM topics WHERE name > ? ORDER BY name LIMIT ?",
            TopicRow::COLUMNS
        );
        let rows = sqlx::query(AssertSqlSafe(sql))
            .bind(after)
            .bind(limit)
            .fetch_all(c)
            .await?;
        topic_rows(&rows)
    }

    async fn insert_topic(
        c: &mut Conn,
        name: &str,
        retention_us: i64,
        max_age_us: i64,
        now: Micros,
    ) -> Result<Option<TopicRow>> {
        let sql = format!(
            "INSERT INTO topics (name, created_at, retention_us, max_age_us) VALUES (?, ?, ?, ?) \
             ON CONFLICT (name) DO NOTHING RETURNING {}",
            TopicRow::COLUMNS
        );
        let row = sqlx::query(AssertSqlSafe(sql))
            .bind(name)
            .bind(now)
            .bind(retention_us)
            .bind(max_age_us)
            .fetch_optional(c)
            .await?;
        row.as_ref().map(TopicRow::from_row).transpose()
    }

    async fn lock_topic(c: &mut Conn, topic_id: i64) -> Result<i64> {
        Self::last_seq(c, topic_id).await
    }

    async fn last_seq(c: &mut Conn, topic_id: i64) -> Result<i64> {
        Ok(
            sqlx::query_scalar("SELECT last_seq FROM topics WHERE id = ?")
                .bind(topic_id)
                .fetch_one(c)
                .await?,
        )
    }

    async fn set_last_seq(c: &mut Conn, topic_id: i64, seq: i64) -> Result<()> {
        sqlx::query("UPDATE topics SET last_seq = ? WHERE id = ?")
            .bind(seq)
            .bind(topic_id)
            .execute(c)
            .await?;
        Ok(())
    }

    async fn set_topic_settings(
        c: &mut Conn,
        topic_id: i64,
        retention_us: i64,
        max_age_us: i64,
    ) -> Result<()> {
        sqlx::query("UPDATE topics SET retention_us = ?, max_age_us = ? WHERE id = ?")
            .bind(retention_us)
            .bind(max_age_us)
            .bind(topic_id)
            .execute(c)
            .await?;
        Ok(())
    }

    async fn delete_topic(c: &mut Conn, topic_id: i64) -> Result<()> {
        run_with_id(c, "DELETE FROM messages WHERE topic_id = ?", topic_id).await?;
        run_with_id(c, "DELETE FROM dedup WHERE topic_id = ?", topic_id).await?;
        run_with_id(c, "DELETE FROM topics WHERE id = ?", topic_id).await?;
        Ok(())
    }

    // ---- messages ----

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

    async fn messages_after(
        c: &mut Conn,
        topic_id: i64,
        topic: &str,
        after: i64,
        limit: i64,
    ) -> Result<Vec<StoredMessage>> {
        let sql = format!(
            "SELECT {MESSAGE_COLUMNS} FROM messages m WHERE m.topic_id = ? AND m.seq > ? \
             ORDER BY m.seq LIMIT ?"
        );
        let rows = sqlx::query(AssertSqlSafe(sql))
            .bind(topic_id)
            .bind(after)
            .bind(limit)
            .fetch_all(c)
            .await?;
        messages(&rows, 0, topic)
    }

    async fn message_at(
        c: &mut Conn,
        topic_id: i64,
        topic: &str,
        seq: i64,
    ) -> Result<Option<StoredMessage>> {
        let sql =
            format!("SELECT {MESSAGE_COLUMNS} FROM messages m WHERE m.topic_id = ? AND m.seq = ?");
        let row = sqlx::query(AssertSqlSafe(sql))
            .bind(topic_id)
            .bind(seq)
            .fetch_optional(c)
            .await?;
        row.map(|r| message_from_row(&r, 0, topic)).transpose()
    }

    async fn first_seq_at(c: &mut Conn, topic_id: i64, time: Micros) -> Result<Option<i64>> {
        Ok(sqlx::query_scalar(
            "SELECT min(seq) FROM messages WHERE topic_id = ? AND published_at >= ?",
        )
        .bind(topic_id)
        .bind(time)
        .fetch_one(c)
        .await?)
    }

    async fn first_seq(c: &mut Conn, topic_id: i64) -> Result<Option<i64>> {
        Ok(
            sqlx::query_scalar("SELECT min(seq) FROM messages WHERE topic_id = ?")
                .bind(topic_id)
                .fetch_one(c)
                .await?,
        )
    }

    async fn published_at(c: &mut Conn, topic_id: i64, seq: i64) -> Result<Option<Micros>> {
        Ok(
            sqlx::query_scalar("SELECT published_at FROM messages WHERE topic_id = ? AND seq = ?")
                .bind(topic_id)
                .bind(seq)
                .fetch_optional(c)
                .await?,
        )
    }

    // ---- subscriptions ----

    async fn sub(c: &mut Conn, name: &str) -> Result<Option<SubRow>> {
        let sql = format!(
            "SELECT {} FROM subscriptions s JOIN topics t ON t.id = s.topic_id WHERE s.name = ?",
            SubRow::COLUMNS
        );
        let row = sqlx::query(AssertSqlSafe(sql))
            .bind(name)
            .fetch_optional(c)
            .await?;
        row.as_ref().map(SubRow::from_row).transpose()
    }

    async fn list_subs(
        c: &mut Conn,
        topic: Option<&str>,
        after: &str,
        limit: i64,
    ) -> Result<Vec<SubRow>> {
        let sql = format!(
            "SELECT {} FROM subscriptions s JOIN topics t ON t.id = s.topic_id \
             WHERE s.name > ? AND (? IS NULL OR t.name = ?) ORDER BY s.name LIMIT ?",
            SubRow::COLUMNS
        );
        let rows = sqlx::query(AssertSqlSafe(sql))
            .bind(after)
            .bind(topic)
            .bind(topic)
            .bind(limit)
            .fetch_all(c)
            .await?;
        rows.iter().map(SubRow::from_row).collect()
    }

    async fn sub_names(c: &mut Conn, topic_id: Option<i64>) -> Result<Vec<String>> {
        Ok(sqlx::query_scalar(
            "SELECT name FROM subscriptions WHERE ?1 IS NULL OR topic_id = ?1 ORDER BY name",
        )
        .bind(topic_id)
        .fetch_all(c)
        .await?)
    }

    async fn insert_sub(
        c: &mut Conn,
        name: &str,
        topic_id: i64,
        s: &SubscriptionSettings,
        cursor: i64,
        now: Micros,
    ) -> Result<bool> {
        let done = sqlx::query(
            "INSERT INTO subscriptions (name, topic_id, created_at, ack_deadline_us, max_attempts, \
             min_backoff_us, max_backoff_us, dead_letter_topic, ordered, cursor) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (name) DO NOTHING",
        )
        .bind(name)
        .bind(topic_id)
        .bind(now)
        .bind(micros(s.ack_deadline))
        .bind(s.max_attempts)
        .bind(micros(s.min_backoff))
        .bind(micros(s.max_backoff))
        .bind(s.dead_letter_topic.clone())
        .bind(s.ordered)
        .bind(cursor)
        .execute(c)
        .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn lock_cursor(c: &mut Conn, sub_id: i64) -> Result<i64> {
        Ok(
            sqlx::query_scalar("SELECT cursor FROM subscriptions WHERE id = ?")
                .bind(sub_id)
                .fetch_one(c)
                .await?,
        )
    }

    async fn set_sub_settings(c: &mut Conn, sub_id: i64, s: &SubscriptionSettings) -> Result<()> {
        sqlx::query(
            "UPDATE subscriptions SET ack_deadline_us = ?, max_attempts = ?, min_backoff_us = ?, \
             max_backoff_us = ?, dead_letter_topic = ?, ordered = ? WHERE id = ?",
        )
        .bind(micros(s.ack_deadline))
        .bind(s.max_attempts)
        .bind(micros(s.min_backoff))
        .bind(micros(s.max_backoff))
        .bind(s.dead_letter_topic.clone())
        .bind(s.ordered)
        .bind(sub_id)
        .execute(c)
        .await?;
        Ok(())
    }

    async fn delete_sub(c: &mut Conn, sub_id: i64) -> Result<()> {
        run_with_id(c, "DELETE FROM deliveries WHERE sub_id = ?", sub_id).await?;
        run_with_id(c, "DELETE FROM subscriptions WHERE id = ?", sub_id).await?;
        Ok(())
    }

    async fn advance(
        c: &mut Conn,
        sub_id: i64,
        cursor: Option<i64>,
        delivered: i64,
        redelivered: i64,
    ) -> Result<()> {
        sqlx::query(
            "UPDATE subscriptions SET cursor = coalesce(?, cursor), delivered = delivered + ?, \
             redelivered = redelivered + ? WHERE id = ?",
        )
        .bind(cursor)
        .bind(delivered)
        .bind(redelivered)
        .bind(sub_id)
        .execute(c)
        .await?;
        Ok(())
    }

    async fn add_acked(c: &mut Conn, sub_id: i64, count: i64) -> Result<()> {
        sqlx::query("UPDATE subscriptions SET acked = acked + ? WHERE id = ?")
            .bind(count)
            .bind(sub_id)
            .execute(c)
            .await?;
        Ok(())
    }

    async fn reset_cursor(c: &mut Conn, sub_id: i64, next: i64) -> Result<()> {
        sqlx::query("DELETE FROM deliveries WHERE sub_id = ? AND (state IN (0, 1) OR seq >= ?)")
            .bind(sub_id)
            .bind(next)
            .execute(&mut *c)
            .await?;
        sqlx::query("UPDATE subscriptions SET cursor = ? WHERE id = ?")
            .bind(next - 1)
            .bind(sub_id)
            .execute(c)
            .await?;
        Ok(())
    }

    async fn counters(c: &mut Conn, sub_id: i64) -> Result<(i64, i64, i64, i64)> {
        Ok(sqlx::query_as(
            "SELECT s.delivered, s.acked, s.redelivered, t.last_seq FROM subscriptions s \
             JOIN topics t ON t.id = s.topic_id WHERE s.id = ?",
        )
        .bind(sub_id)
        .fetch_one(c)
        .await?)
    }

    // ---- deliveries ----

    async fn due_redeliveries(
        c: &mut Conn,
        sub: &SubRow,
        now: Micros,
        limit: i64,
    ) -> Result<Vec<(i32, StoredMessage)>> {
        let sql = if sub.settings.ordered {
            format!(
                "SELECT d.attempt, {MESSAGE_COLUMNS} FROM deliveries d \
                 JOIN messages m ON m.topic_id = ?3 AND m.seq = d.seq \
                 WHERE d.sub_id = ?1 AND d.state = 0 AND d.available_at <= ?2 \
                 AND (d.key IS NULL OR NOT EXISTS (SELECT 1 FROM deliveries e \
                   WHERE e.sub_id = d.sub_id AND e.key = d.key AND e.seq < d.seq \
                   AND e.state IN (0, 1))) \
                 ORDER BY d.seq LIMIT ?4"
            )
        } else {
            format!(
                "SELECT d.attempt, {MESSAGE_COLUMNS} FROM deliveries d \
                 JOIN messages m ON m.topic_id = ?3 AND m.seq = d.seq \
                 WHERE d.sub_id = ?1 AND d.state = 0 AND d.available_at <= ?2 \
                 ORDER BY d.available_at LIMIT ?4"
            )
        };
        let rows = sqlx::query(AssertSqlSafe(sql))
            .bind(sub.id)
            .bind(now)
            .bind(sub.topic_id)
            .bind(limit)
            .fetch_all(c)
            .await?;
        rows.iter()
            .map(|r| Ok((r.try_get(0)?, message_from_row(r, 1, &sub.topic)?)))
            .collect()
    }

    async fn lease_again(
        c: &mut Conn,
        sub_id: i64,
        seq: i64,
        attempt: i32,
        deadline: Micros,
        token: i64,
        now: Micros,
    ) -> Result<()> {
        sqlx::query(
            "UPDATE deliveries SET state = 1, attempt = ?, available_at = ?, lease = ?, \
             first_delivery_at = coalesce(first_delivery_at, ?), last_delivery_at = ?, \
             reason = NULL WHERE sub_id = ? AND seq = ?",
        )
        .bind(attempt)
        .bind(deadline)
        .bind(token)
        .bind(now)
        .bind(now)
        .bind(sub_id)
        .bind(seq)
        .execute(c)
        .await?;
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
    ) -> Result<HashSet<String>> {
        let mut blocked = HashSet::new();
        for chunk in keys.chunks(CHUNK) {
            let sql = format!(
                "SELECT DISTINCT key FROM deliveries WHERE sub_id = ? AND state IN (0, 1) \
                 AND key IN ({})",
                placeholders(chunk.len())
            );
            let mut q = sqlx::query_scalar::<_, String>(AssertSqlSafe(sql)).bind(sub_id);
            for k in chunk {
                q = q.bind(k.clone());
            }
            blocked.extend(q.fetch_all(&mut *c).await?);
        }
        Ok(blocked)
    }

    async fn next_due(c: &mut Conn, sub_id: i64, now: Micros) -> Result<Option<Micros>> {
        Ok(sqlx::query_scalar(
            "SELECT min(available_at) FROM deliveries \
             WHERE sub_id = ? AND state IN (0, 1) AND available_at > ?",
        )
        .bind(sub_id)
        .bind(now)
        .fetch_one(c)
        .await?)
    }

    async fn expired_leases(
        c: &mut Conn,
        sub_id: i64,
        now: Micros,
        limit: i64,
    ) -> Result<Vec<(i64, i32, Micros)>> {
        Ok(sqlx::query_as(
            "SELECT seq, attempt, available_at FROM deliveries \
             WHERE sub_id = ? AND state = 1 AND available_at <= ? LIMIT ?",
        )
        .bind(sub_id)
        .bind(now)
        .bind(limit)
        .fetch_all(c)
        .await?)
    }

    async fn deliveries(
        c: &mut Conn,
        sub_id: i64,
        seqs: &[i64],
    ) -> Result<HashMap<i64, LeaseState>> {
        let mut rows = HashMap::new();
        for chunk in seqs.chunks(CHUNK) {
            let sql = format!(
                "SELECT seq, state, lease, available_at, attempt FROM deliveries \
                 WHERE sub_id = ? AND seq IN ({})",
                placeholders(chunk.len())
            );
            let mut q =
                sqlx::query_as::<_, (i64, i64, i64, i64, i32)>(AssertSqlSafe(sql)).bind(sub_id);
            for seq in chunk {
                q = q.bind(*seq);
            }
            for (seq, state, lease, available_at, attempt) in q.fetch_all(&mut *c).await? {
                rows.insert(seq, (state, lease, available_at, attempt));
            }
        }
        Ok(rows)
    }

    async fn set_waiting(
        c: &mut Conn,
        sub_id: i64,
        seq: i64,
        at: Micros,
        reason: Option<&str>,
    ) -> Result<()> {
        sqlx::query(
            "UPDATE deliveries SET state = 0, available_at = ?, reason = coalesce(?, reason) \
             WHERE sub_id = ? AND seq = ?",
        )
        .bind(at)
        .bind(reason)
        .bind(sub_id)
        .bind(seq)
        .execute(c)
        .await?;
        Ok(())
    }

    async fn release(c: &mut Conn, sub_id: i64, seqs: &[i64], now: Micros) -> Result<()> {
        let sql =
            "UPDATE deliveries SET state = 0, available_at = ? WHERE sub_id = ? AND seq IN ({})";
        for_seqs(c, sql, Some(now), sub_id, seqs).await?;
        Ok(())
    }

    async fn set_deadline(c: &mut Conn, sub_id: i64, seq: i64, deadline: Micros) -> Result<()> {
        sqlx::query("UPDATE deliveries SET available_at = ? WHERE sub_id = ? AND seq = ?")
            .bind(deadline)
            .bind(sub_id)
            .bind(seq)
            .execute(c)
            .await?;
        Ok(())
    }

    async fn set_dead(
        c: &mut Conn,
        sub_id: i64,
        seq: i64,
        now: Micros,
        reason: &str,
    ) -> Result<()> {
        sqlx::query(
            "UPDATE deliveries SET state = 2, available_at = ?, reason = ? \
             WHERE sub_id = ? AND seq = ?",
        )
        .bind(now)
        .bind(reason)
        .bind(sub_id)
        .bind(seq)
        .execute(c)
        .await?;
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

    async fn delivery_counts(c: &mut Conn, sub_id: i64, now: Micros) -> Result<DeliveryCounts> {
        let (in_flight, undone, dead, first_undone, first_any) = sqlx::query_as(
            "SELECT coalesce(sum(state = 1 AND available_at > ?), 0), \
             coalesce(sum(state IN (0, 1)), 0), coalesce(sum(state = 2), 0), \
             min(CASE WHEN state IN (0, 1) THEN seq END), min(seq) \
             FROM deliveries WHERE sub_id = ?",
        )
        .bind(now)
        .bind(sub_id)
        .fetch_one(c)
        .await?;
        Ok(DeliveryCounts {
            in_flight,
            undone,
            dead,
            first_undone,
            first_any,
        })
    }

    async fn blocked_keys(c: &mut Conn, sub_id: i64, sample: i64) -> Result<(i64, Vec<String>)> {
        let count: i64 = sqlx::query_scalar(
            "SELECT count(DISTINCT key) FROM deliveries WHERE sub_id = ? AND state = 0 \
             AND attempt > 0 AND key IS NOT NULL",
        )
        .bind(sub_id)
        .fetch_one(&mut *c)
        .await?;
        let keys = sqlx::query_scalar(
            "SELECT DISTINCT key FROM deliveries WHERE sub_id = ? AND state = 0 \
             AND attempt > 0 AND key IS NOT NULL ORDER BY key LIMIT ?",
        )
        .bind(sub_id)
        .bind(sample)
        .fetch_all(c)
        .await?;
        Ok((count, keys))
    }

    async fn dead_letters(
        c: &mut Conn,
        sub: &SubRow,
        after: i64,
        limit: i64,
    ) -> Result<Vec<DeadLetter>> {
        let sql = format!(
            "SELECT d.attempt, d.first_delivery_at, d.last_delivery_at, d.reason, d.available_at, \
             {MESSAGE_COLUMNS} FROM deliveries d \
             JOIN messages m ON m.topic_id = ? AND m.seq = d.seq \
             WHERE d.sub_id = ? AND d.state = 2 AND d.seq > ? ORDER BY d.seq LIMIT ?"
        );
        let rows = sqlx::query(AssertSqlSafe(sql))
            .bind(sub.topic_id)
            .bind(sub.id)
            .bind(after)
            .bind(limit)
            .fetch_all(c)
            .await?;
        rows.iter()
            .map(|r| dead_letter_from_row(r, &sub.topic))
            .collect()
    }

    async fn dead_count(c: &mut Conn, sub_id: i64) -> Result<i64> {
        Ok(
            sqlx::query_scalar("SELECT count(*) FROM deliveries WHERE sub_id = ? AND state = 2")
                .bind(sub_id)
                .fetch_one(c)
                .await?,
        )
    }

    // ---- maintenance ----

    async fn low_water(c: &mut Conn, topic_id: i64) -> Result<Option<i64>> {
        Ok(sqlx::query_scalar(
            "SELECT min(min(coalesce((SELECT min(seq) FROM deliveries d \
             WHERE d.sub_id = s.id), s.cursor + 1), s.cursor + 1)) \
             FROM subscriptions s WHERE s.topic_id = ?",
        )
        .bind(topic_id)
        .fetch_one(c)
        .await?)
    }

    async fn delete_messages(
        c: &mut Conn,
        topic_id: i64,
        from: i64,
        to: i64,
        cutoff: Micros,
    ) -> Result<u64> {
        let done = sqlx::query(
            "DELETE FROM messages WHERE topic_id = ? AND seq >= ? AND seq < ? \
             AND published_at <= ?",
        )
        .bind(topic_id)
        .bind(from)
        .bind(to)
        .bind(cutoff)
        .execute(c)
        .await?;
        Ok(done.rows_affected())
    }

    async fn any_message_in(c: &mut Conn, topic_id: i64, from: i64, to: i64) -> Result<bool> {
        Ok(sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM messages WHERE topic_id = ? AND seq >= ? AND seq < ?)",
        )
        .bind(topic_id)
        .bind(from)
        .bind(to)
        .fetch_one(c)
        .await?)
    }

    async fn message_times(c: &mut Conn, topic_id: i64, limit: i64) -> Result<Vec<(i64, Micros)>> {
        Ok(sqlx::query_as(
            "SELECT seq, published_at FROM messages WHERE topic_id = ? ORDER BY seq LIMIT ?",
        )
        .bind(topic_id)
        .bind(limit)
        .fetch_all(c)
        .await?)
    }

    async fn expire_through(
        c: &mut Conn,
        topic_id: i64,
        last: i64,
        unacked: i64,
    ) -> Result<Vec<String>> {
        sqlx::query("DELETE FROM messages WHERE topic_id = ? AND seq <= ?")
            .bind(topic_id)
            .bind(last)
            .execute(&mut *c)
            .await?;
        sqlx::query(
            "DELETE FROM deliveries WHERE seq <= ?2 AND sub_id IN \
             (SELECT id FROM subscriptions WHERE topic_id = ?1)",
        )
        .bind(topic_id)
        .bind(last)
        .execute(&mut *c)
        .await?;
        let names = sqlx::query_scalar(
            "UPDATE subscriptions SET cursor = max(cursor, ?) WHERE topic_id = ? RETURNING name",
        )
        .bind(last)
        .bind(topic_id)
        .fetch_all(&mut *c)
        .await?;
        sqlx::query("UPDATE topics SET expired_count = expired_count + ? WHERE id = ?")
            .bind(unacked)
            .bind(topic_id)
            .execute(c)
            .await?;
        Ok(names)
    }

    async fn prune_dedup(c: &mut Conn, before: Micros, limit: i64) -> Result<u64> {
        let done = sqlx::query(
            "DELETE FROM dedup WHERE (topic_id, id) IN \
             (SELECT topic_id, id FROM dedup WHERE published_at < ? LIMIT ?)",
        )
        .bind(before)
        .bind(limit)
        .execute(c)
        .await?;
        Ok(done.rows_affected())
    }
}

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
//! them). Id lists are passed as arrays and joined through `unnest`.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgConnection, PgListener, PgPoolOptions, PgRow};
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
const MIGRATIONS: &[(i64, &str)] =
    &[(1, include_str!("../../migrations/postgres/0001_broker.sql"))];

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
    let options = options.statement_cache_capacity(1024).options([
        ("enable_hashjoin", "off"),
        ("enable_mergejoin", "off"),
        ("random_page_cost", "1.1"),
    ]);
    let mut conn = PgConnection::connect_with(&options)
        .await
        .map_err(|e| Error::Unavailable(format!("cannot connect to PostgreSQL: {e}")))?;
    migrate(&mut conn).await?;
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut conn)
        .await
        .map_err(db_err)?;
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .connect_with(options.clone())
        .await
        .map_err(db_err)?;
    let mut listener = PgListener::connect_with(&pool).await.map_err(db_err)?;
    listener.listen(CHANNEL).await.map_err(db_err)?;
    let writer = Writer::new(
        Postgres { conn, options, pid },
        config.dedup_window,
        notifier.clone(),
        healthy,
    );
    Ok((
        writer,
        Reader::new(pool),
        Listener {
            listener,
            notifier,
            own_pid: pid,
        },
    ))
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
    listener: PgListener,
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
                    Ok(n) => {
                        if n.process_id() as i32 != self.own_pid {
                            self.notifier.notify_raw(n.payload());
                        }
                    }
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

/// This instance's write connection.
pub(super) struct Postgres {
    conn: PgConnection,
    options: PgConnectOptions,
    pid: i32,
}

impl Postgres {
    /// Replaces a broken connection.
    async fn reconnect(&mut self) {
        match PgConnection::connect_with(&self.options).await {
            Ok(mut conn) => {
                if let Ok(pid) = sqlx::query_scalar::<_, i32>("SELECT pg_backend_pid()")
                    .fetch_one(&mut conn)
                    .await
                {
                    self.pid = pid;
                }
                self.conn = conn;
                tracing::info!(pid = self.pid, "reconnected to PostgreSQL");
            }
            Err(e) => tracing::warn!(error = %e, "PostgreSQL is unreachable"),
        }
    }
}

fn topic_rows(rows: &[PgRow]) -> Result<Vec<TopicRow>> {
    rows.iter().map(TopicRow::from_row).collect()
}

/// Runs `sql` with `id` as its one parameter.
async fn run_with_id(c: &mut Conn, sql: &'static str, id: i64) -> Result<u64> {
    Ok(sqlx::query(sql).bind(id).execute(c).await?.rows_affected())
}

impl Backend for Postgres {
    type Db = sqlx::Postgres;

    const EXCLUSIVE: bool = false;

    fn conn(&mut self) -> &mut Conn {
        &mut self.conn
    }

    async fn begin(&mut self) -> Result<()> {
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

    async fn recover(&mut self) -> bool {
        if sqlx::query("ROLLBACK")
            .execute(&mut self.conn)
            .await
            .is_ok()
        {
            return false;
        }
        self.reconnect().await;
        true
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

    // ---- topics ----

    async fn topic(c: &mut Conn, name: &str) -> Result<Option<TopicRow>> {
        let sql = format!("SELECT {} FROM topics WHERE name = $1", TopicRow::COLUMNS);
        let row = sqlx::query(AssertSqlSafe(sql))
            .bind(name)
            .fetch_optional(c)
            .await?;
        row.as_ref().map(TopicRow::from_row).transpose()
    }

    async fn list_topics(c: &mut Conn, after: &str, limit: i64) -> Result<Vec<TopicRow>> {
        let sql = format!(
            "SELECT {} FROM topics WHERE name > $1 ORDER BY name LIMIT $2",
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
            "INSERT INTO topics (name, created_at, retention_us, max_age_us) \
             VALUES ($1, $2, $3, $4) ON CONFLICT (name) DO NOTHING RETURNING {}",
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
        Ok(
            sqlx::query_scalar("SELECT last_seq FROM topics WHERE id = $1 FOR UPDATE")
                .bind(topic_id)
                .fetch_one(c)
                .await?,
        )
    }

    async fn last_seq(c: &mut Conn, topic_id: i64) -> Result<i64> {
        Ok(
            sqlx::query_scalar("SELECT last_seq FROM topics WHERE id = $1")
                .bind(topic_id)
                .fetch_one(c)
                .await?,
        )
    }

    async fn set_last_seq(c: &mut Conn, topic_id: i64, seq: i64) -> Result<()> {
        sqlx::query("UPDATE topics SET last_seq = $1 WHERE id = $2")
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
        sqlx::query("UPDATE topics SET retention_us = $1, max_age_us = $2 WHERE id = $3")
            .bind(retention_us)
            .bind(max_age_us)
            .bind(topic_id)
            .execute(c)
            .await?;
        Ok(())
    }

    async fn delete_topic(c: &mut Conn, topic_id: i64) -> Result<()> {
        run_with_id(c, "DELETE FROM messages WHERE topic_id = $1", topic_id).await?;
        run_with_id(c, "DELETE FROM dedup WHERE topic_id = $1", topic_id).await?;
        run_with_id(c, "DELETE FROM topics WHERE id = $1", topic_id).await?;
        Ok(())
    }

    // ---- messages ----

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
            let rows: Vec<(Vec<u8>, i64)> = sqlx::query_as(
                "SELECT d.id, d.seq FROM unnest($2::BYTEA[]) AS u(id) \
                 JOIN dedup d ON d.topic_id = $1 AND d.id = u.id",
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

    async fn messages_after(
        c: &mut Conn,
        topic_id: i64,
        topic: &str,
        after: i64,
        limit: i64,
    ) -> Result<Vec<StoredMessage>> {
        let sql = format!(
            "SELECT {MESSAGE_COLUMNS} FROM messages m WHERE m.topic_id = $1 AND m.seq > $2 \
             ORDER BY m.seq LIMIT $3"
        );
        let rows = sqlx::query(AssertSqlSafe(sql))
            .bind(topic_id)
            .bind(after)
            .bind(limit)
            .fetch_all(c)
            .await?;
        rows.iter().map(|r| message_from_row(r, 0, topic)).collect()
    }

    async fn message_at(
        c: &mut Conn,
        topic_id: i64,
        topic: &str,
        seq: i64,
    ) -> Result<Option<StoredMessage>> {
        let sql = format!(
            "SELECT {MESSAGE_COLUMNS} FROM messages m WHERE m.topic_id = $1 AND m.seq = $2"
        );
        let row = sqlx::query(AssertSqlSafe(sql))
            .bind(topic_id)
            .bind(seq)
            .fetch_optional(c)
            .await?;
        row.map(|r| message_from_row(&r, 0, topic)).transpose()
    }

    async fn first_seq_at(c: &mut Conn, topic_id: i64, time: Micros) -> Result<Option<i64>> {
        Ok(sqlx::query_scalar(
            "SELECT min(seq) FROM messages WHERE topic_id = $1 AND published_at >= $2",
        )
        .bind(topic_id)
        .bind(time)
        .fetch_one(c)
        .await?)
    }

    async fn first_seq(c: &mut Conn, topic_id: i64) -> Result<Option<i64>> {
        Ok(
            sqlx::query_scalar("SELECT min(seq) FROM messages WHERE topic_id = $1")
                .bind(topic_id)
                .fetch_one(c)
                .await?,
        )
    }

    async fn published_at(c: &mut Conn, topic_id: i64, seq: i64) -> Result<Option<Micros>> {
        Ok(
            sqlx::query_scalar(
                "SELECT published_at FROM messages WHERE topic_id = $1 AND seq = $2",
            )
            .bind(topic_id)
            .bind(seq)
            .fetch_optional(c)
            .await?,
        )
    }

    // ---- subscriptions ----

    async fn sub(c: &mut Conn, name: &str) -> Result<Option<SubRow>> {
        let sql = format!(
            "SELECT {} FROM subscriptions s JOIN topics t ON t.id = s.topic_id WHERE s.name = $1",
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
             WHERE s.name > $1 AND ($2::TEXT IS NULL OR t.name = $2) ORDER BY s.name LIMIT $3",
            SubRow::COLUMNS
        );
        let rows = sqlx::query(AssertSqlSafe(sql))
            .bind(after)
            .bind(topic)
            .bind(limit)
            .fetch_all(c)
            .await?;
        rows.iter().map(SubRow::from_row).collect()
    }

    async fn sub_names(c: &mut Conn, topic_id: Option<i64>) -> Result<Vec<String>> {
        Ok(sqlx::query_scalar(
            "SELECT name FROM subscriptions WHERE $1::BIGINT IS NULL OR topic_id = $1 \
             ORDER BY name",
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
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) ON CONFLICT (name) DO NOTHING",
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
            sqlx::query_scalar("SELECT cursor FROM subscriptions WHERE id = $1 FOR UPDATE")
                .bind(sub_id)
                .fetch_one(c)
                .await?,
        )
    }

    async fn set_sub_settings(c: &mut Conn, sub_id: i64, s: &SubscriptionSettings) -> Result<()> {
        sqlx::query(
            "UPDATE subscriptions SET ack_deadline_us = $1, max_attempts = $2, \
             min_backoff_us = $3, max_backoff_us = $4, dead_letter_topic = $5, ordered = $6 \
             WHERE id = $7",
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
        run_with_id(c, "DELETE FROM deliveries WHERE sub_id = $1", sub_id).await?;
        run_with_id(c, "DELETE FROM subscriptions WHERE id = $1", sub_id).await?;
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
            "UPDATE subscriptions SET cursor = coalesce($1, cursor), \
             delivered = delivered + $2, redelivered = redelivered + $3 WHERE id = $4",
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
        sqlx::query("UPDATE subscriptions SET acked = acked + $1 WHERE id = $2")
            .bind(count)
            .bind(sub_id)
            .execute(c)
            .await?;
        Ok(())
    }

    async fn reset_cursor(c: &mut Conn, sub_id: i64, next: i64) -> Result<()> {
        sqlx::query("DELETE FROM deliveries WHERE sub_id = $1 AND (state IN (0, 1) OR seq >= $2)")
            .bind(sub_id)
            .bind(next)
            .execute(&mut *c)
            .await?;
        sqlx::query("UPDATE subscriptions SET cursor = $1 WHERE id = $2")
            .bind(next - 1)
            .bind(sub_id)
            .execute(c)
            .await?;
        Ok(())
    }

    async fn counters(c: &mut Conn, sub_id: i64) -> Result<(i64, i64, i64, i64)> {
        Ok(sqlx::query_as(
            "SELECT s.delivered, s.acked, s.redelivered, t.last_seq FROM subscriptions s \
             JOIN topics t ON t.id = s.topic_id WHERE s.id = $1",
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
                 JOIN messages m ON m.topic_id = $3 AND m.seq = d.seq \
                 WHERE d.sub_id = $1 AND d.state = 0 AND d.available_at <= $2 \
                 AND (d.key IS NULL OR NOT EXISTS (SELECT 1 FROM deliveries e \
                   WHERE e.sub_id = d.sub_id AND e.key = d.key AND e.seq < d.seq \
                   AND e.state IN (0, 1))) \
                 ORDER BY d.seq LIMIT $4 FOR UPDATE OF d SKIP LOCKED"
            )
        } else {
            format!(
                "SELECT d.attempt, {MESSAGE_COLUMNS} FROM deliveries d \
                 JOIN messages m ON m.topic_id = $3 AND m.seq = d.seq \
                 WHERE d.sub_id = $1 AND d.state = 0 AND d.available_at <= $2 \
                 ORDER BY d.available_at LIMIT $4 FOR UPDATE OF d SKIP LOCKED"
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
            "UPDATE deliveries SET state = 1, attempt = $1, available_at = $2, lease = $3, \
             first_delivery_at = coalesce(first_delivery_at, $4), last_delivery_at = $4, \
             reason = NULL WHERE sub_id = $5 AND seq = $6",
        )
        .bind(attempt)
        .bind(deadline)
        .bind(token)
        .bind(now)
        .bind(sub_id)
        .bind(seq)
        .execute(c)
        .await?;
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
    ) -> Result<HashSet<String>> {
        if keys.is_empty() {
            return Ok(HashSet::new());
        }
        let blocked: Vec<String> = sqlx::query_scalar(
            "SELECT DISTINCT d.key FROM unnest($2::TEXT[]) AS u(key) \
             JOIN deliveries d ON d.sub_id = $1 AND d.key = u.key AND d.state IN (0, 1)",
        )
        .persistent(false)
        .bind(sub_id)
        .bind(keys)
        .fetch_all(c)
        .await?;
        Ok(blocked.into_iter().collect())
    }

    async fn next_due(c: &mut Conn, sub_id: i64, now: Micros) -> Result<Option<Micros>> {
        Ok(sqlx::query_scalar(
            "SELECT min(available_at) FROM deliveries \
             WHERE sub_id = $1 AND state IN (0, 1) AND available_at > $2",
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
             WHERE sub_id = $1 AND state = 1 AND available_at <= $2 LIMIT $3 \
             FOR UPDATE SKIP LOCKED",
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
            let found: Vec<(i64, i64, i64, i64, i32)> = sqlx::query_as(
                "SELECT d.seq, d.state, d.lease, d.available_at, d.attempt \
                 FROM unnest($2::BIGINT[]) AS u(seq) \
                 JOIN deliveries d ON d.sub_id = $1 AND d.seq = u.seq FOR UPDATE OF d",
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

    async fn set_waiting(
        c: &mut Conn,
        sub_id: i64,
        seq: i64,
        at: Micros,
        reason: Option<&str>,
    ) -> Result<()> {
        sqlx::query(
            "UPDATE deliveries SET state = 0, available_at = $1, reason = coalesce($2, reason) \
             WHERE sub_id = $3 AND seq = $4",
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
        sqlx::query(
            "UPDATE deliveries d SET state = 0, available_at = $1 \
             FROM unnest($3::BIGINT[]) AS u(seq) WHERE d.sub_id = $2 AND d.seq = u.seq",
        )
        .persistent(false)
        .bind(now)
        .bind(sub_id)
        .bind(seqs)
        .execute(c)
        .await?;
        Ok(())
    }

    async fn set_deadline(c: &mut Conn, sub_id: i64, seq: i64, deadline: Micros) -> Result<()> {
        sqlx::query("UPDATE deliveries SET available_at = $1 WHERE sub_id = $2 AND seq = $3")
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
            "UPDATE deliveries SET state = 2, available_at = $1, reason = $2 \
             WHERE sub_id = $3 AND seq = $4",
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
        sqlx::query(
            "DELETE FROM deliveries d USING unnest($2::BIGINT[]) AS u(seq) \
             WHERE d.sub_id = $1 AND d.seq = u.seq",
        )
        .persistent(false)
        .bind(sub_id)
        .bind(seqs)
        .execute(c)
        .await?;
        Ok(())
    }

    async fn redrive(c: &mut Conn, sub_id: i64, seqs: &[i64], now: Micros) -> Result<i64> {
        let done = sqlx::query(
            "UPDATE deliveries SET state = 0, attempt = 0, available_at = $1, reason = NULL \
             WHERE sub_id = $2 AND state = 2 AND (cardinality($3::BIGINT[]) = 0 \
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

    async fn delivery_counts(c: &mut Conn, sub_id: i64, now: Micros) -> Result<DeliveryCounts> {
        let (in_flight, undone, dead, first_undone, first_any) = sqlx::query_as(
            "SELECT count(*) FILTER (WHERE state = 1 AND available_at > $1), \
             count(*) FILTER (WHERE state IN (0, 1)), count(*) FILTER (WHERE state = 2), \
             min(seq) FILTER (WHERE state IN (0, 1)), min(seq) \
             FROM deliveries WHERE sub_id = $2",
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
            "SELECT count(DISTINCT key) FROM deliveries WHERE sub_id = $1 AND state = 0 \
             AND attempt > 0 AND key IS NOT NULL",
        )
        .bind(sub_id)
        .fetch_one(&mut *c)
        .await?;
        let keys = sqlx::query_scalar(
            "SELECT DISTINCT key FROM deliveries WHERE sub_id = $1 AND state = 0 \
             AND attempt > 0 AND key IS NOT NULL ORDER BY key LIMIT $2",
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
             JOIN messages m ON m.topic_id = $1 AND m.seq = d.seq \
             WHERE d.sub_id = $2 AND d.state = 2 AND d.seq > $3 ORDER BY d.seq LIMIT $4"
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
            sqlx::query_scalar("SELECT count(*) FROM deliveries WHERE sub_id = $1 AND state = 2")
                .bind(sub_id)
                .fetch_one(c)
                .await?,
        )
    }

    // ---- maintenance ----

    async fn low_water(c: &mut Conn, topic_id: i64) -> Result<Option<i64>> {
        Ok(sqlx::query_scalar(
            "SELECT min(least(coalesce((SELECT min(seq) FROM deliveries d \
             WHERE d.sub_id = s.id), s.cursor + 1), s.cursor + 1)) \
             FROM subscriptions s WHERE s.topic_id = $1",
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
            "DELETE FROM messages WHERE topic_id = $1 AND seq >= $2 AND seq < $3 \
             AND published_at <= $4",
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
            "SELECT EXISTS (SELECT 1 FROM messages WHERE topic_id = $1 AND seq >= $2 \
             AND seq < $3)",
        )
        .bind(topic_id)
        .bind(from)
        .bind(to)
        .fetch_one(c)
        .await?)
    }

    async fn message_times(c: &mut Conn, topic_id: i64, limit: i64) -> Result<Vec<(i64, Micros)>> {
        Ok(sqlx::query_as(
            "SELECT seq, published_at FROM messages WHERE topic_id = $1 ORDER BY seq LIMIT $2",
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
        sqlx::query("DELETE FROM messages WHERE topic_id = $1 AND seq <= $2")
            .bind(topic_id)
            .bind(last)
            .execute(&mut *c)
            .await?;
        sqlx::query(
            "DELETE FROM deliveries WHERE seq <= $2 AND sub_id IN \
             (SELECT id FROM subscriptions WHERE topic_id = $1)",
        )
        .bind(topic_id)
        .bind(last)
        .execute(&mut *c)
        .await?;
        let names = sqlx::query_scalar(
            "UPDATE subscriptions SET cursor = greatest(cursor, $1) WHERE topic_id = $2 \
             RETURNING name",
        )
        .bind(last)
        .bind(topic_id)
        .fetch_all(&mut *c)
        .await?;
        sqlx::query("UPDATE topics SET expired_count = expired_count + $1 WHERE id = $2")
            .bind(unacked)
            .bind(topic_id)
            .execute(c)
            .await?;
        Ok(names)
    }

    async fn prune_dedup(c: &mut Conn, before: Micros, limit: i64) -> Result<u64> {
        let done = sqlx::query(
            "DELETE FROM dedup WHERE (topic_id, id) IN \
             (SELECT topic_id, id FROM dedup WHERE published_at < $1 LIMIT $2)",
        )
        .bind(before)
        .bind(limit)
        .execute(c)
        .await?;
        Ok(done.rows_affected())
    }
}

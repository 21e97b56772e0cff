//! The outbox's SQL for SQLite (beside `migrations/outbox/sqlite.sql`).

use std::str::FromStr;
use std::time::{Duration, SystemTime};

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};
use sqlx::{Sqlite, Transaction};

use super::{NewRow, OutboxStats, RelayStatus, Row};
use crate::error::{Error, Result};
use crate::model::{now_micros, time_micros};

/// Rows per INSERT statement (5 parameters each, far below SQLite's limit).
const INSERT_CHUNK: usize = 200;

pub(super) async fn connect(url: &str) -> Result<SqlitePool> {
    let options = SqliteConnectOptions::from_str(url)
        .map_err(|e| Error::InvalidArgument(format!("bad outbox database URL {url}: {e}")))?
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .busy_timeout(Duration::from_secs(10));
    SqlitePoolOptions::new()
        .max_connections(2)
        .connect_with(options)
        .await
        .map_err(|e| Error::Unavailable(format!("cannot open the outbox database: {e}")))
}

pub(super) async fn migrate(pool: &SqlitePool) -> Result<()> {
    let mut tx = pool.begin().await?;
    sqlx::raw_sql(super::SQLITE_MIGRATION)
        .execute(&mut *tx)
        .await?;
    // A table an older tidings created lacks this column, and SQLite has no
    // ADD COLUMN IF NOT EXISTS for the SQL file to say it with.
    let has_interval: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pragma_table_info('tidings_outbox_relays') \
                        WHERE name = 'heartbeat_interval_us')",
    )
    .fetch_one(&mut *tx)
    .await?;
    if !has_interval {
        sqlx::query("ALTER TABLE tidings_outbox_relays ADD COLUMN heartbeat_interval_us INTEGER")
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(())
}

pub(super) async fn insert(tx: &mut Transaction<'_, Sqlite>, rows: &[NewRow]) -> Result<()> {
    for chunk in rows.chunks(INSERT_CHUNK) {
        let values = vec!["(?, ?, ?, ?, ?)"; chunk.len()].join(", ");
        let sql = format!(
            "INSERT INTO tidings_outbox (id, topic, key, payload, attributes) VALUES {values}"
        );
        // Only the number of placeholders varies.
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
        for r in chunk {
            query = query
                .bind(r.id.as_str())
                .bind(r.topic.as_str())
                .bind(r.key.as_deref())
                .bind(r.payload.as_slice())
                .bind(r.attributes.as_deref());
        }
        query.execute(&mut **tx).await?;
    }
    Ok(())
}

pub(super) async fn fetch(
    pool: &SqlitePool,
    after: i64,
    limit: usize,
    _passed: &super::Passed,
) -> Result<Vec<Row>> {
    // Every pending row, held ones too (flagged not ready): the relay skips
    // a held row and, for the rest of its sweep, the later rows of its key
    // (see relay.rs). Nothing below `after` is read again: SQLite's write
    // transactions take turns, so no row commits after a later number.
    let now = now_micros();
    let rows = sqlx::query(
        "SELECT o.seq, o.id, o.topic, coalesce(o.key, ''), CAST(o.payload AS BLOB), o.attributes, \
                o.attempts, (o.not_before IS NULL OR o.not_before <= ?2) \
         FROM tidings_outbox o WHERE o.seq > ?1 ORDER BY o.seq LIMIT ?3 + 0",
    )
    .bind(after)
    .bind(now)
    .bind(i64::try_from(limit).unwrap_or(i64::MAX))
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(super::row_from)
        .collect::<Result<_, sqlx::Error>>()
        .map_err(Error::from)
}

pub(super) async fn delete(pool: &SqlitePool, seqs: &[i64]) -> Result<()> {
    let list = serde_json::to_string(seqs)
        .map_err(|e| Error::Storage(format!("encoding sequence numbers: {e}")))?;
    sqlx::query("DELETE FROM tidings_outbox WHERE seq IN (SELECT value FROM json_each(?))")
        .bind(list)
        .execute(pool)
        .await?;
    Ok(())
}

pub(super) async fn hold(
    pool: &SqlitePool,
    row: &Row,
    error: &str,
    wait_micros: i64,
    whole_topic: bool,
) -> Result<()> {
    let until = now_micros().saturating_add(wait_micros);
    let sql = if whole_topic {
        "UPDATE tidings_outbox SET attempts = attempts + 1, last_error = ?2, not_before = ?3 \
         WHERE topic = ?4"
    } else {
        "UPDATE tidings_outbox SET attempts = attempts + 1, last_error = ?2, not_before = ?3 \
         WHERE seq = ?1"
    };
    sqlx::query(sql)
        .bind(row.seq)
        .bind(error)
        .bind(until)
        .bind(&row.topic)
        .execute(pool)
        .await?;
    Ok(())
}

pub(super) async fn stats(pool: &SqlitePool) -> Result<OutboxStats> {
    let head = sqlx::query(
        "SELECT (SELECT count(*) FROM tidings_outbox), \
                (SELECT count(*) FROM tidings_outbox WHERE not_before IS NOT NULL), \
                (SELECT created_at FROM tidings_outbox ORDER BY seq LIMIT 1), \
                (SELECT last_error FROM tidings_outbox WHERE not_before IS NOT NULL \
                 ORDER BY seq LIMIT 1)",
    )
    .fetch_one(pool)
    .await?;
    let relays = sqlx::query(
        "SELECT relay, leader, published, last_publish_at, heartbeat_at, last_error, \
                heartbeat_interval_us, max(?1 - heartbeat_at, 0) \
         FROM tidings_outbox_relays ORDER BY relay",
    )
    .bind(now_micros())
    .fetch_all(pool)
    .await?;
    Ok(super::stats_from(&head, &relays)?)
}

pub(super) async fn report(
    pool: &SqlitePool,
    relay: &str,
    status: &RelayStatus,
    started: SystemTime,
    heartbeat_interval_us: i64,
) -> Result<()> {
    let now = now_micros();
    let mut tx = pool.begin().await?;
    // Reports of relays silent for a day are dropped (they were killed).
    sqlx::query("DELETE FROM tidings_outbox_relays WHERE heartbeat_at < ?")
        .bind(now - 86_400_000_000)
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "INSERT INTO tidings_outbox_relays \
           (relay, started_at, heartbeat_at, leader, published, last_publish_at, last_error, \
            heartbeat_interval_us) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) \
         ON CONFLICT (relay) DO UPDATE SET heartbeat_at = ?3, leader = ?4, published = ?5, \
           last_publish_at = ?6, last_error = ?7, heartbeat_interval_us = ?8",
    )
    .bind(relay)
    .bind(time_micros(started))
    .bind(now)
    .bind(status.leader)
    .bind(i64::try_from(status.published).unwrap_or(i64::MAX))
    .bind(status.last_publish.map(time_micros))
    .bind(status.last_error.as_deref())
    .bind(heartbeat_interval_us)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}

pub(super) async fn retire(pool: &SqlitePool, relay: &str) -> Result<()> {
    sqlx::query("DELETE FROM tidings_outbox_relays WHERE relay = ?")
        .bind(relay)
        .execute(pool)
        .await?;
    Ok(())
}

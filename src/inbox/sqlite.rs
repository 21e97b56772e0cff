//! The inbox's SQL for SQLite; the schema is `migrations/inbox/sqlite.sql`.
//! `inbox_database!` in `mod.rs` binds and runs these statements.

use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteSynchronous,
};

use super::{SQLITE_MIGRATION, Savepoint};
use crate::error::{Error, Result};

/// None: a failed statement leaves a SQLite transaction usable, and one
/// that SQLite rolled back itself (a full disk, say) fails its COMMIT.
pub(super) const ALIVE_CHECK: Option<&str> = None;

/// Records an id; the conflict target names the primary key, so only a
/// duplicate id does nothing and any other failure stays an error. As the
/// transaction's first write, it takes SQLite's write lock until the
/// transaction ends.
pub(super) const RECORD: &str = "INSERT INTO tidings_inbox (subscription, message_id, sequence) VALUES (?1, ?2, ?3) \
     ON CONFLICT (subscription, message_id) DO NOTHING";

/// [`RECORD`] after a savepoint step, in one call (SQLite runs several
/// statements with arguments, each taking its numbered ones): a returned
/// row means the id is new. `rows_affected` cannot tell, since SQLite
/// reports the last data change for a statement that makes none.
pub(super) fn record_in_savepoint(step: Savepoint) -> Option<&'static str> {
    macro_rules! record_returning {
        ($($before:literal),*) => {
            concat!($($before, "; ",)* "INSERT INTO tidings_inbox (subscription, message_id, sequence) \
                VALUES (?1, ?2, ?3) ON CONFLICT (subscription, message_id) DO NOTHING RETURNING 1")
        };
    }
    match step {
        Savepoint::Open => Some(record_returning!("SAVEPOINT tidings_delivery")),
        Savepoint::ReleaseAndOpen => Some(record_returning!(
            "RELEASE SAVEPOINT tidings_delivery",
            "SAVEPOINT tidings_delivery"
        )),
        Savepoint::Undo => None,
    }
}

/// Records a batch's ids in one statement (issue 14), passed as one JSON
/// array of `[id, sequence]` pairs; returns those that were not there.
/// (`WHERE true` keeps SQLite from reading `ON CONFLICT` as a join's `ON`.)
pub(super) async fn record_all(
    conn: &mut SqliteConnection,
    subscription: &str,
    ids: &[(&str, i64)],
) -> Result<Vec<String>> {
    let batch = serde_json::to_string(ids).map_err(|e| Error::Storage(e.to_string()))?;
    sqlx::query_scalar(
        "INSERT INTO tidings_inbox (subscription, message_id, sequence) \
         SELECT ?1, json_extract(value, '$[0]'), json_extract(value, '$[1]') \
         FROM json_each(?2) WHERE true \
         ON CONFLICT (subscription, message_id) DO NOTHING RETURNING message_id",
    )
    .bind(subscription)
    .bind(batch)
    .fetch_all(conn)
    .await
    .map_err(Error::from)
}

/// Deletes the rows of `ids`: those [`record_all`] wrote for deliveries
/// whose work did not stay.
pub(super) async fn forget_all(
    conn: &mut SqliteConnection,
    subscription: &str,
    ids: &[String],
) -> Result<()> {
    let ids = serde_json::to_string(ids).map_err(|e| Error::Storage(e.to_string()))?;
    sqlx::query(
        "DELETE FROM tidings_inbox WHERE subscription = ?1 \
         AND message_id IN (SELECT value FROM json_each(?2))",
    )
    .bind(subscription)
    .bind(ids)
    .execute(conn)
    .await
    .map_err(Error::from)?;
    Ok(())
}

/// One batch of rows at or below the watermark.
pub(super) const PRUNE_THROUGH: &str = "DELETE FROM tidings_inbox WHERE subscription = ?1 \
     AND message_id IN (SELECT message_id FROM tidings_inbox \
     WHERE subscription = ?1 AND sequence <= ?2 LIMIT ?3 + 0)";

/// One batch of rows older than ?2 seconds. `processed_at` is UTC text that
/// sorts in time order, and the cutoff is written the same way.
pub(super) const PRUNE_OLDER_THAN: &str = "DELETE FROM tidings_inbox WHERE subscription = ?1 \
     AND message_id IN (SELECT message_id FROM tidings_inbox WHERE subscription = ?1 \
     AND processed_at < strftime('%Y-%m-%d %H:%M:%f', 'now', printf('-%.3f seconds', ?2)) \
     LIMIT ?3 + 0)";

pub(super) const FORGET_FROM: &str =
    "DELETE FROM tidings_inbox WHERE subscription = ?1 AND sequence >= ?2";

pub(super) const CONTAINS: &str =
    "SELECT COUNT(*) FROM tidings_inbox WHERE subscription = ?1 AND message_id = ?2";

pub(super) async fn connect(url: &str) -> Result<SqlitePool> {
    let options = SqliteConnectOptions::from_str(url)
        .map_err(|e| Error::InvalidArgument(format!("bad database URL: {e}")))?
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .busy_timeout(Duration::from_secs(30));
    SqlitePoolOptions::new()
        .max_connections(1)
        .connect_with(options)
        .await
        .map_err(Error::from)
}

pub(super) async fn migrate(pool: &SqlitePool) -> Result<()> {
    sqlx::raw_sql(SQLITE_MIGRATION)
        .execute(pool)
        .await
        .map_err(Error::from)?;
    Ok(())
}

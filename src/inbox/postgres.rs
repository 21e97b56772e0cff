//! The inbox's SQL for PostgreSQL; the schema is `migrations/inbox/postgres.sql`.
//! `inbox_database!` in `mod.rs` binds and runs these statements.

use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions};

use super::{POSTGRES_MIGRATION, Savepoint};
use crate::config::DatabaseTimeouts;
use crate::error::{Error, Result};

/// A statement that fails in a transaction a failed statement aborted,
/// whose COMMIT would roll back without an error.
pub(super) const ALIVE_CHECK: Option<&str> = Some("SELECT 1");

/// Records an id; the conflict target names the primary key, so only a
/// duplicate id does nothing and any other failure stays an error. If
/// another transaction recorded the id and has not ended, this waits for it.
pub(super) const RECORD: &str = "INSERT INTO tidings_inbox (subscription, message_id, sequence) VALUES ($1, $2, $3) \
     ON CONFLICT (subscription, message_id) DO NOTHING";

/// PostgreSQL prepares one statement per call: a savepoint step and the
/// record, bound, are two round trips (only a delivery whose id its batch
/// met before records this way; the others are recorded by [`record_all`]).
pub(super) fn record_in_savepoint(_step: Savepoint) -> Option<&'static str> {
    None
}

/// Records a batch's ids in one statement (issue 14); returns those that
/// were not there. Waits, as [`RECORD`] does, for another transaction
/// holding one of them.
pub(super) async fn record_all(
    conn: &mut PgConnection,
    subscription: &str,
    ids: &[(&str, i64)],
) -> Result<Vec<String>> {
    let (message_ids, sequences): (Vec<&str>, Vec<i64>) = ids.iter().copied().unzip();
    sqlx::query_scalar(
        "INSERT INTO tidings_inbox (subscription, message_id, sequence) \
         SELECT $1, id, seq FROM unnest($2::text[], $3::bigint[]) AS batch(id, seq) \
         ON CONFLICT (subscription, message_id) DO NOTHING RETURNING message_id",
    )
    .bind(subscription)
    .bind(message_ids)
    .bind(sequences)
    .fetch_all(conn)
    .await
    .map_err(Error::from)
}

/// Deletes the rows of `ids`: those [`record_all`] wrote for deliveries
/// whose work did not stay.
pub(super) async fn forget_all(
    conn: &mut PgConnection,
    subscription: &str,
    ids: &[String],
) -> Result<()> {
    sqlx::query(
        "DELETE FROM tidings_inbox WHERE subscription = $1 AND message_id = ANY($2::text[])",
    )
    .bind(subscription)
    .bind(ids)
    .execute(conn)
    .await
    .map_err(Error::from)?;
    Ok(())
}

/// One batch of rows at or below the watermark.
pub(super) const PRUNE_THROUGH: &str = "DELETE FROM tidings_inbox WHERE subscription = $1 \
     AND message_id IN (SELECT message_id FROM tidings_inbox \
     WHERE subscription = $1 AND sequence <= $2 LIMIT $3)";

/// One batch of rows older than $2 seconds.
pub(super) const PRUNE_OLDER_THAN: &str = "DELETE FROM tidings_inbox WHERE subscription = $1 \
     AND message_id IN (SELECT message_id FROM tidings_inbox WHERE subscription = $1 \
     AND processed_at < now() - make_interval(secs => $2) LIMIT $3)";

pub(super) const FORGET_FROM: &str =
    "DELETE FROM tidings_inbox WHERE subscription = $1 AND sequence >= $2";

pub(super) const CONTAINS: &str =
    "SELECT COUNT(*) FROM tidings_inbox WHERE subscription = $1 AND message_id = $2";

/// Serialises concurrent migrations: two `CREATE TABLE IF NOT EXISTS` racing
/// on PostgreSQL can both pass the check and one then fails on the catalog's
/// unique index. (Any constant works; this one spells "tidinbox".)
const MIGRATION_LOCK: i64 = 0x7469_6469_6e62_6f78;

/// Opens the inbox's pool: a transaction waits at most the default connect
/// bound for a connection, and the server probes the link of an idle
/// session. Statement, lock and idle-in-transaction times are left to the
/// application: its handlers run their own work in the inbox transaction
/// (and may wait, by design, for another consumer's hold on an id).
pub(super) async fn connect(url: &str) -> Result<PgPool> {
    let timeouts = DatabaseTimeouts::default();
    let options: PgConnectOptions = url
        .parse()
        .map_err(|e| Error::InvalidArgument(format!("bad database URL: {e}")))?;
    let keepalives = timeouts
        .postgres_options()
        .into_iter()
        .filter(|(name, _)| name.starts_with("tcp_"));
    let options = options.options(keepalives);
    PgPoolOptions::new()
        .max_connections(16)
        .acquire_timeout(timeouts.connect)
        .connect_with(options)
        .await
        .map_err(Error::from)
}

pub(super) async fn migrate(pool: &PgPool) -> Result<()> {
    let mut tx = pool.begin().await.map_err(Error::from)?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(MIGRATION_LOCK)
        .execute(&mut *tx)
        .await
        .map_err(Error::from)?;
    sqlx::raw_sql(POSTGRES_MIGRATION)
        .execute(&mut *tx)
        .await
        .map_err(Error::from)?;
    tx.commit().await.map_err(Error::from)
}

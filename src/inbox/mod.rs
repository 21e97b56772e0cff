//! The inbox: the `tidings_inbox` table in the consumer's own database, which
//! turns at-least-once delivery into effectively-once processing.
//!
//! A consumer records each message id in the same transaction as its
//! handler's writes ([`Inbox::record`]); a redelivered message finds its id
//! there and is skipped. Rows are pruned once the broker's `ack_watermark`
//! for the subscription has passed them ([`Inbox::prune_through`]): no
//! message at or below the watermark can be delivered again, short of a Seek
//! back. [`crate::consumer`] runs all of this for a handler.
//!
//! The SQL of each backend is in `postgres.rs` and `sqlite.rs`, beside the
//! plain migrations in `migrations/inbox/`.

#[cfg(feature = "postgres")]
mod postgres;
#[cfg(feature = "sqlite")]
mod sqlite;

use std::collections::HashSet;
use std::time::Duration;

#[cfg(feature = "postgres")]
use sqlx::Postgres;
#[cfg(feature = "sqlite")]
use sqlx::Sqlite;
use sqlx::{Pool, Transaction};
use uuid::Uuid;

use crate::error::{Error, Result};

/// The inbox migration for PostgreSQL (`migrations/inbox/postgres.sql`).
pub const POSTGRES_MIGRATION: &str = include_str!("../../migrations/inbox/postgres.sql");
/// The inbox migration for SQLite (`migrations/inbox/sqlite.sql`).
pub const SQLITE_MIGRATION: &str = include_str!("../../migrations/inbox/sqlite.sql");

/// Rows deleted per statement when pruning, so that pruning never holds the
/// database's locks for long (on SQLite it shares the one writer with the
/// handlers).
const PRUNE_BATCH: i64 = 1000;

/// What [`Inbox::record`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    /// The id was not there: it is now, in the caller's transaction. Run the
    /// handler.
    New,
    /// The id was there already (the unique key conflicted): the message was
    /// processed before. Skip the handler and ack.
    Duplicate,
}

/// The consumer runtime's steps around each delivery of a batch, within
/// the batch's one transaction (issue 14). Both backends speak the same
/// standard savepoint SQL.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Savepoint {
    /// Opens the delivery's savepoint (the batch's first delivery).
    Open,
    /// Releases the previous delivery's savepoint (it succeeded, its work
    /// stays in the transaction) and opens the next one: one round trip.
    ReleaseAndOpen,
    /// Undoes everything since the savepoint opened (the delivery's inbox
    /// row and its handler's writes) and releases it, so the transaction
    /// goes on with the next delivery as if this one had never run.
    Undo,
}

impl Savepoint {
    /// A name the handler's own nested transactions (sqlx names them
    /// `_sqlx_savepoint_N`) never take.
    fn sql(self) -> &'static str {
        match self {
            Savepoint::Open => "SAVEPOINT tidings_delivery",
            Savepoint::ReleaseAndOpen => {
                "RELEASE SAVEPOINT tidings_delivery; SAVEPOINT tidings_delivery"
            }
            Savepoint::Undo => {
                "ROLLBACK TO SAVEPOINT tidings_delivery; RELEASE SAVEPOINT tidings_delivery"
            }
        }
    }
}

/// Databases that hold an inbox: PostgreSQL and SQLite.
pub trait InboxDatabase: sqlx::Database + sealed::Sealed {
    #[doc(hidden)]
    const ALIVE_CHECK: Option<&'static str>;
    #[doc(hidden)]
    fn connect(url: &str) -> impl Future<Output = Result<Pool<Self>>> + Send;
    #[doc(hidden)]
    fn migrate(pool: &Pool<Self>) -> impl Future<Output = Result<()>> + Send;
    #[doc(hidden)]
    fn record(
        tx: &mut Transaction<'_, Self>,
        subscription: &str,
        message_id: &str,
        sequence: i64,
    ) -> impl Future<Output = Result<Recorded>> + Send;
    #[doc(hidden)]
    fn open_and_record(
        tx: &mut Transaction<'_, Self>,
        step: Savepoint,
        subscription: &str,
        message_id: &str,
        sequence: i64,
    ) -> impl Future<Output = Result<Result<Recorded>>> + Send;
    #[doc(hidden)]
    fn record_all(
        tx: &mut Transaction<'_, Self>,
        subscription: &str,
        ids: &[(&str, i64)],
    ) -> impl Future<Output = Result<Vec<String>>> + Send;
    #[doc(hidden)]
    fn forget_all(
        tx: &mut Transaction<'_, Self>,
        subscription: &str,
        ids: &[String],
    ) -> impl Future<Output = Result<()>> + Send;
    #[doc(hidden)]
    fn execute(
        tx: &mut Transaction<'_, Self>,
        sql: &'static str,
    ) -> impl Future<Output = Result<()>> + Send;
    #[doc(hidden)]
    fn prune_through(
        pool: &Pool<Self>,
        subscription: &str,
        watermark: i64,
        limit: i64,
    ) -> impl Future<Output = Result<u64>> + Send;
    #[doc(hidden)]
    fn prune_older_than(
        pool: &Pool<Self>,
        subscription: &str,
        age: Duration,
        limit: i64,
    ) -> impl Future<Output = Result<u64>> + Send;
    #[doc(hidden)]
    fn forget_from(
        pool: &Pool<Self>,
        subscription: &str,
        sequence: i64,
    ) -> impl Future<Output = Result<u64>> + Send;
    #[doc(hidden)]
    fn contains(
        pool: &Pool<Self>,
        subscription: &str,
        message_id: &str,
    ) -> impl Future<Output = Result<bool>> + Send;
}

mod sealed {
    pub trait Sealed {}
    #[cfg(feature = "postgres")]
    impl Sealed for sqlx::Postgres {}
    #[cfg(feature = "sqlite")]
    impl Sealed for sqlx::Sqlite {}
}

/// Implements [`InboxDatabase`] for `$db` with the statements of module
/// `$sql` (`ALIVE_CHECK`, `RECORD`, `PRUNE_THROUGH`, `PRUNE_OLDER_THAN`, `FORGET_FROM`,
/// `CONTAINS` and `record_in_savepoint`) and its
/// `connect`, `migrate`, `record_all` and `forget_all`. The statements differ per
/// backend; how they are bound and read does not.
macro_rules! inbox_database {
    ($db:ty, $sql:ident) => {
        impl InboxDatabase for $db {
            const ALIVE_CHECK: Option<&'static str> = $sql::ALIVE_CHECK;

            fn connect(url: &str) -> impl Future<Output = Result<Pool<Self>>> + Send {
                $sql::connect(url)
            }

            fn migrate(pool: &Pool<Self>) -> impl Future<Output = Result<()>> + Send {
                $sql::migrate(pool)
            }

            async fn record(
                tx: &mut Transaction<'_, Self>,
                subscription: &str,
                message_id: &str,
                sequence: i64,
            ) -> Result<Recorded> {
                let done = sqlx::query($sql::RECORD)
                    .bind(subscription)
                    .bind(message_id)
                    .bind(sequence)
                    .execute(&mut **tx)
                    .await
                    .map_err(Error::from)?;
                // The statement does nothing on a conflict of the primary
                // key (and only of it): no row means a duplicate.
                Ok(if done.rows_affected() == 1 {
                    Recorded::New
                } else {
                    Recorded::Duplicate
                })
            }

            async fn open_and_record(
                tx: &mut Transaction<'_, Self>,
                step: Savepoint,
                subscription: &str,
                message_id: &str,
                sequence: i64,
            ) -> Result<Result<Recorded>> {
                let Some(sql) = $sql::record_in_savepoint(step) else {
                    Self::execute(tx, step.sql()).await?;
                    return Ok(Self::record(tx, subscription, message_id, sequence).await);
                };
                // One round trip. A failure may come from the savepoint
                // step as well as the record, so it gives up the
                // transaction. The statements run to the end: a statement
                // left in progress would block the next RELEASE.
                let rows = sqlx::query(sql)
                    .bind(subscription)
                    .bind(message_id)
                    .bind(sequence)
                    .fetch_all(&mut **tx)
                    .await
                    .map_err(Error::from)?;
                Ok(Ok(if rows.is_empty() {
                    Recorded::Duplicate
                } else {
                    Recorded::New
                }))
            }

            async fn record_all(
                tx: &mut Transaction<'_, Self>,
                subscription: &str,
                ids: &[(&str, i64)],
            ) -> Result<Vec<String>> {
                $sql::record_all(&mut **tx, subscription, ids).await
            }

            async fn forget_all(
                tx: &mut Transaction<'_, Self>,
                subscription: &str,
                ids: &[String],
            ) -> Result<()> {
                $sql::forget_all(&mut **tx, subscription, ids).await
            }

            async fn execute(tx: &mut Transaction<'_, Self>, sql: &'static str) -> Result<()> {
                // Unprepared, so that one call may carry several statements.
                sqlx::raw_sql(sql)
                    .execute(&mut **tx)
                    .await
                    .map_err(Error::from)?;
                Ok(())
            }

            async fn prune_through(
                pool: &Pool<Self>,
                subscription: &str,
                watermark: i64,
                limit: i64,
            ) -> Result<u64> {
                let done = sqlx::query($sql::PRUNE_THROUGH)
                    .bind(subscription)
                    .bind(watermark)
                    .bind(limit)
                    .execute(pool)
                    .await
                    .map_err(Error::from)?;
                Ok(done.rows_affected())
            }

            async fn prune_older_than(
                pool: &Pool<Self>,
                subscription: &str,
                age: Duration,
                limit: i64,
            ) -> Result<u64> {
                let done = sqlx::query($sql::PRUNE_OLDER_THAN)
                    .bind(subscription)
                    .bind(age.as_secs_f64())
                    .bind(limit)
                    .execute(pool)
                    .await
                    .map_err(Error::from)?;
                Ok(done.rows_affected())
            }

            async fn forget_from(
                pool: &Pool<Self>,
                subscription: &str,
                sequence: i64,
            ) -> Result<u64> {
                let done = sqlx::query($sql::FORGET_FROM)
                    .bind(subscription)
                    .bind(sequence)
                    .execute(pool)
                    .await
                    .map_err(Error::from)?;
                Ok(done.rows_affected())
            }

            async fn contains(
                pool: &Pool<Self>,
                subscription: &str,
                message_id: &str,
            ) -> Result<bool> {
                let n: i64 = sqlx::query_scalar($sql::CONTAINS)
                    .bind(subscription)
                    .bind(message_id)
                    .fetch_one(pool)
                    .await
                    .map_err(Error::from)?;
                Ok(n > 0)
            }
        }
    };
}

#[cfg(feature = "postgres")]
inbox_database!(Postgres, postgres);
#[cfg(feature = "sqlite")]
inbox_database!(Sqlite, sqlite);

/// The inbox of one consumer database: a connection pool to it.
///
/// Cloning is cheap and shares the pool.
pub struct Inbox<DB: InboxDatabase> {
    pool: Pool<DB>,
}

impl<DB: InboxDatabase> Clone for Inbox<DB> {
    fn clone(&self) -> Self {
        Inbox {
            pool: self.pool.clone(),
        }
    }
}

impl<DB: InboxDatabase> std::fmt::Debug for Inbox<DB> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The pool's options may hold a password; show only the backend.
        f.debug_struct("Inbox")
            .field("database", &DB::NAME)
            .finish_non_exhaustive()
    }
}

impl<DB: InboxDatabase> Inbox<DB> {
    /// An inbox on the application's own pool.
    pub fn new(pool: Pool<DB>) -> Self {
        Inbox { pool }
    }

    /// Opens a pool on `url` (`postgres://...`, or `sqlite://PATH`, created if
    /// missing). PostgreSQL: up to 16 connections. SQLite: WAL,
    /// `synchronous=FULL` (a commit survives power loss, which an ack after
    /// it relies on) and one connection, because SQLite has one writer and
    /// every inbox transaction writes first: more connections would only
    /// wait on each other's locks.
    ///
    /// Fails if the URL is malformed or the database is unreachable.
    pub async fn connect(url: &str) -> Result<Self> {
        Ok(Inbox {
            pool: DB::connect(url).await?,
        })
    }

    /// The pool, for the application's own queries.
    pub fn pool(&self) -> &Pool<DB> {
        &self.pool
    }

    /// Creates `tidings_inbox` and its index if missing (the SQL of
    /// [`POSTGRES_MIGRATION`] or [`SQLITE_MIGRATION`]). Safe to run at every
    /// start, by several processes at once.
    ///
    /// Fails if the database refuses the statements.
    pub async fn migrate(&self) -> Result<()> {
        DB::migrate(&self.pool).await
    }

    /// Begins a transaction on the inbox's pool.
    ///
    /// Fails if no connection can be had.
    pub async fn begin(&self) -> Result<Transaction<'static, DB>> {
        self.pool.begin().await.map_err(Error::from)
    }

    /// Records that `subscription` processes `message_id` (with its
    /// `sequence`) in the caller's transaction, which must be the one of the
    /// handler's writes. Returns [`Recorded::Duplicate`] if the id is
    /// recorded already; only the unique-key conflict counts as that, any
    /// other failure is an error.
    ///
    /// On PostgreSQL, if another transaction recorded the same id and has
    /// not finished, this waits for it: its commit makes this a duplicate,
    /// its rollback lets this one go on.
    ///
    /// Fails on any database error; the transaction should then roll back.
    pub async fn record(
        tx: &mut Transaction<'_, DB>,
        subscription: &str,
        message_id: Uuid,
        sequence: i64,
    ) -> Result<Recorded> {
        DB::record(tx, subscription, &message_id.to_string(), sequence).await
    }

    /// Fails if `tx` can no longer commit: on PostgreSQL a transaction in
    /// which a statement failed is aborted, and its COMMIT would roll back
    /// without an error. The consumer runtime checks before each commit.
    pub(crate) async fn check_alive(tx: &mut Transaction<'_, DB>) -> Result<()> {
        match DB::ALIVE_CHECK {
            Some(sql) => DB::execute(tx, sql).await,
            None => Ok(()),
        }
    }

    /// Runs one savepoint step of the consumer runtime in `tx`.
    ///
    /// Fails on any database error; the transaction should then roll back.
    pub(crate) async fn savepoint(tx: &mut Transaction<'_, DB>, step: Savepoint) -> Result<()> {
        DB::execute(tx, step.sql()).await
    }

    /// Opens a delivery's savepoint (`step`: [`Savepoint::Open`] or
    /// [`Savepoint::ReleaseAndOpen`]) and records the id in it, as
    /// [`Inbox::record`] does: in one round trip where the backend takes
    /// several statements with arguments (SQLite), in two otherwise.
    ///
    /// Fails (the outer result) when the savepoint may not have opened, so
    /// that rolling back to it could undo the previous delivery's work: the
    /// transaction must then roll back. The inner result is the record's,
    /// within the open savepoint.
    pub(crate) async fn open_and_record(
        tx: &mut Transaction<'_, DB>,
        step: Savepoint,
        subscription: &str,
        message_id: Uuid,
        sequence: i64,
    ) -> Result<Result<Recorded>> {
        debug_assert!(step != Savepoint::Undo);
        DB::open_and_record(tx, step, subscription, &message_id.to_string(), sequence).await
    }

    /// Records the ids of a batch's deliveries (`(id, sequence)`, each id
    /// once) in `tx` in one statement, as [`Inbox::record`] does each;
    /// returns those that were new. The others were processed before.
    ///
    /// Fails on any database error; the transaction should then roll back.
    pub(crate) async fn record_all(
        tx: &mut Transaction<'_, DB>,
        subscription: &str,
        ids: &[(&str, i64)],
    ) -> Result<HashSet<String>> {
        Ok(DB::record_all(tx, subscription, ids)
            .await?
            .into_iter()
            .collect())
    }

    /// Deletes the rows of `ids` in `tx`: rows [`Inbox::record_all`] wrote
    /// for deliveries whose work is not to stay.
    ///
    /// Fails on any database error; the transaction should then roll back.
    pub(crate) async fn forget_all(
        tx: &mut Transaction<'_, DB>,
        subscription: &str,
        ids: &[String],
    ) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        DB::forget_all(tx, subscription, ids).await
    }

    /// Deletes the rows of `subscription` with a sequence at or below
    /// `watermark`, in batches; returns how many went. Pass the broker's
    /// `ack_watermark` for the subscription: no message at or below it can
    /// be delivered again (dead letters stay above it, since a redrive
    /// delivers them again), so no id that could come back is forgotten.
    ///
    /// Fails on a database error; batches deleted before it stay deleted.
    pub async fn prune_through(&self, subscription: &str, watermark: i64) -> Result<u64> {
        let mut total = 0;
        loop {
            let n = DB::prune_through(&self.pool, subscription, watermark, PRUNE_BATCH).await?;
            total += n;
            if n < PRUNE_BATCH as u64 {
                return Ok(total);
            }
        }
    }

    /// Deletes the rows of `subscription` processed more than `age` ago,
    /// whatever their sequence; returns how many went. This is the fallback
    /// for a consumer that cannot read the watermark, and it is a guess: a
    /// message whose row is gone runs its handler again if it comes back
    /// (its ack was lost and the broker redelivers it after `age`, or it was
    /// dead-lettered after its commit and is redriven after `age`).
    ///
    /// Fails on a database error; batches deleted before it stay deleted.
    pub async fn prune_older_than(&self, subscription: &str, age: Duration) -> Result<u64> {
        let mut total = 0;
        loop {
            let n = DB::prune_older_than(&self.pool, subscription, age, PRUNE_BATCH).await?;
            total += n;
            if n < PRUNE_BATCH as u64 {
                return Ok(total);
            }
        }
    }

    /// Forgets the rows of `subscription` from `sequence` on, so that a
    /// replay from there (an admin `Seek` back to `sequence`, made after
    /// this call) runs the handler for every message again instead of
    /// skipping those still recorded. Returns how many rows went.
    ///
    /// Fails on a database error.
    pub async fn forget_from(&self, subscription: &str, sequence: i64) -> Result<u64> {
        DB::forget_from(&self.pool, subscription, sequence).await
    }

    /// True if `subscription` has `message_id` recorded.
    ///
    /// Fails on a database error.
    pub async fn contains(&self, subscription: &str, message_id: Uuid) -> Result<bool> {
        DB::contains(&self.pool, subscription, &message_id.to_string()).await
    }
}

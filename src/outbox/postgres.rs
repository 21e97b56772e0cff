//! The outbox's SQL for PostgreSQL (beside `migrations/outbox/postgres.sql`).

use std::time::{Duration, SystemTime};

use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions};
use sqlx::{Postgres, Transaction};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::{NewRow, OutboxStats, RelayStatus, Row};
use crate::config::DatabaseTimeouts;
use crate::error::{Error, Result};
use crate::model::time_micros;
use crate::store::listener::{ListenCheck, WatchedListener};

/// The channel the insert trigger notifies.
pub(super) const CHANNEL: &str = "tidings_outbox";

/// Advisory lock class of the relays (the two-integer form); object 0 is the
/// leader lock, object -1 serializes migrations. The insert trigger's per-key
/// locks use class 1953066081 with hashes as objects, so they never meet
/// these.
const LOCK_CLASS: i32 = 1_953_066_082;
const LEADER: i32 = 0;
const MIGRATING: i32 = -1;

pub(super) async fn connect(url: &str, timeouts: &DatabaseTimeouts) -> Result<PgPool> {
    let options: PgConnectOptions = url.parse().map_err(|e| {
        Error::InvalidArgument(format!(
            "bad outbox database URL {}: {e}",
            crate::store::redact(url)
        ))
    })?;
    let options = options.options(timeouts.postgres_options());
    PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(timeouts.connect)
        .connect_with(options)
        .await
        .map_err(|e| Error::Unavailable(format!("cannot connect to the outbox database: {e}")))
}

pub(super) async fn migrate(pool: &PgPool) -> Result<()> {
    let mut conn = pool.acquire().await?;
    sqlx::query("SELECT pg_advisory_lock($1, $2)")
        .bind(LOCK_CLASS)
        .bind(MIGRATING)
        .execute(&mut *conn)
        .await?;
    let result = sqlx::raw_sql(super::POSTGRES_MIGRATION)
        .execute(&mut *conn)
        .await;
    let _ = sqlx::query("SELECT pg_advisory_unlock($1, $2)")
        .bind(LOCK_CLASS)
        .bind(MIGRATING)
        .execute(&mut *conn)
        .await;
    result?;
    Ok(())
}

pub(super) async fn insert(tx: &mut Transaction<'_, Postgres>, rows: &[NewRow]) -> Result<()> {
    // One statement for the batch; WITH ORDINALITY keeps the caller's order,
    // which the row trigger turns into sequence numbers.
    sqlx::query(
        "INSERT INTO tidings_outbox (id, topic, key, payload, attributes) \
         SELECT u.id::uuid, u.topic, u.key, u.payload, u.attributes::jsonb \
         FROM UNNEST($1::text[], $2::text[], $3::text[], $4::bytea[], $5::text[]) \
              WITH ORDINALITY AS u(id, topic, key, payload, attributes, n) \
         ORDER BY u.n",
    )
    .bind(rows.iter().map(|r| r.id.as_str()).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.topic.as_str()).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.key.as_deref()).collect::<Vec<_>>())
    .bind(
        rows.iter()
            .map(|r| r.payload.as_slice())
            .collect::<Vec<_>>(),
    )
    .bind(
        rows.iter()
            .map(|r| r.attributes.as_deref())
            .collect::<Vec<_>>(),
    )
    .execute(&mut **tx)
    .await?;
    Ok(())
}

pub(super) async fn fetch(
    pool: &PgPool,
    after: i64,
    limit: usize,
    passed: &super::Passed,
) -> Result<Vec<Row>> {
    // Every pending row, held ones too (flagged not ready): the relay skips
    // a held row and, for the rest of its sweep, the later rows of its key
    // (see relay.rs). With the rows after the cursor come, in one snapshot
    // and in number order, those that committed after the sweep passed
    // their numbers (`Passed`): a key's next row is committed only after
    // them, so no read finds it without them. Each part walks the primary
    // key: below the sweep's first row only rows that committed late are
    // left (what else is there was deleted before), and the gaps are few.
    macro_rules! columns {
        () => {
            "SELECT o.seq, o.id::text, o.topic, coalesce(o.key, ''), o.payload, \
             o.attributes::text, o.attempts, (o.not_before IS NULL OR o.not_before <= now()) \
             FROM tidings_outbox o"
        };
    }
    let rows = sqlx::query(concat!(
        "SELECT * FROM ((",
        columns!(),
        " WHERE o.seq < $3 AND o.seq <> ALL($4::BIGINT[]) ORDER BY o.seq LIMIT $2) \
         UNION ALL (",
        columns!(),
        " WHERE o.seq = ANY($5::BIGINT[])) UNION ALL (",
        columns!(),
        " WHERE o.seq > $1 ORDER BY o.seq LIMIT $2)) r ORDER BY 1 LIMIT $2"
    ))
    .bind(after)
    .bind(i64::try_from(limit).unwrap_or(i64::MAX))
    .bind(passed.below)
    .bind(&passed.read_below)
    .bind(&passed.gaps)
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(super::row_from)
        .collect::<Result<_, sqlx::Error>>()
        .map_err(Error::from)
}

pub(super) async fn delete(pool: &PgPool, seqs: &[i64]) -> Result<()> {
    let (Some(&low), Some(&high)) = (seqs.iter().min(), seqs.iter().max()) else {
        return Ok(());
    };
    // The usual delete is dense: the rows of answered batches, numbered
    // close together. Then one scan of the key range, each row checked
    // against the list, costs far less than a key lookup per row: `seq + 0`
    // keeps the list out of the index condition (one descent per element),
    // and the list, a constant in this one-shot statement's plan, is hashed
    // once. Rows of the range not in the list (held, skipped, committed
    // late) stay. A sparse list (after a sweep from the lowest row) would
    // make the scan walk rows it does not delete: a lookup per row then.
    let span = i128::from(high) - i128::from(low) + 1;
    // Not prepared: the plan is made with the list's values.
    let query = if span <= 2 * seqs.len() as i128 {
        sqlx::query(
            "DELETE FROM tidings_outbox \
             WHERE seq BETWEEN $2 AND $3 AND seq + 0 = ANY($1::BIGINT[])",
        )
        .bind(seqs)
        .bind(low)
        .bind(high)
    } else {
        sqlx::query(
            "DELETE FROM tidings_outbox o USING unnest($1::BIGINT[]) AS u(seq) \
             WHERE o.seq = u.seq",
        )
        .bind(seqs)
    };
    query.persistent(false).execute(pool).await?;
    Ok(())
}

pub(super) async fn hold(
    pool: &PgPool,
    row: &Row,
    error: &str,
    wait_micros: i64,
    whole_topic: bool,
) -> Result<()> {
    // The database's clock, which `fetch` compares with.
    let sql = if whole_topic {
        "UPDATE tidings_outbox SET attempts = attempts + 1, last_error = $2, \
         not_before = now() + make_interval(secs => $3::float8 / 1e6) WHERE topic = $4"
    } else {
        "UPDATE tidings_outbox SET attempts = attempts + 1, last_error = $2, \
         not_before = now() + make_interval(secs => $3::float8 / 1e6) WHERE seq = $1"
    };
    sqlx::query(sql)
        .bind(row.seq)
        .bind(error)
        .bind(wait_micros)
        .bind(&row.topic)
        .execute(pool)
        .await?;
    Ok(())
}

pub(super) async fn stats(pool: &PgPool) -> Result<OutboxStats> {
    let head = sqlx::query(
        "SELECT (SELECT count(*) FROM tidings_outbox), \
                (SELECT count(*) FROM tidings_outbox WHERE not_before IS NOT NULL), \
                (SELECT (extract(epoch FROM created_at) * 1e6)::bigint FROM tidings_outbox \
                 ORDER BY seq LIMIT 1), \
                (SELECT last_error FROM tidings_outbox WHERE not_before IS NOT NULL \
                 ORDER BY seq LIMIT 1)",
    )
    .fetch_one(pool)
    .await?;
    let relays = sqlx::query(
        "SELECT relay, leader, published, (extract(epoch FROM last_publish_at) * 1e6)::bigint, \
                (extract(epoch FROM heartbeat_at) * 1e6)::bigint, last_error, \
                heartbeat_interval_us, \
                greatest((extract(epoch FROM now() - heartbeat_at) * 1e6)::bigint, 0) \
         FROM tidings_outbox_relays ORDER BY relay",
    )
    .fetch_all(pool)
    .await?;
    Ok(super::stats_from(&head, &relays)?)
}

pub(super) async fn report(
    pool: &PgPool,
    relay: &str,
    status: &RelayStatus,
    started: SystemTime,
    heartbeat_interval_us: i64,
) -> Result<()> {
    // Reports of relays silent for a day are dropped (they were killed).
    sqlx::query(
        "WITH gone AS (DELETE FROM tidings_outbox_relays \
                       WHERE heartbeat_at < now() - interval '1 day') \
         INSERT INTO tidings_outbox_relays \
           (relay, started_at, heartbeat_at, leader, published, last_publish_at, last_error, \
            heartbeat_interval_us) \
         VALUES ($1, to_timestamp($2::float8 / 1e6), now(), $3, $4, \
                 to_timestamp($5::float8 / 1e6), $6, $7) \
         ON CONFLICT (relay) DO UPDATE SET heartbeat_at = now(), leader = $3, published = $4, \
           last_publish_at = to_timestamp($5::float8 / 1e6), last_error = $6, \
           heartbeat_interval_us = $7",
    )
    .bind(relay)
    .bind(time_micros(started))
    .bind(status.leader)
    .bind(i64::try_from(status.published).unwrap_or(i64::MAX))
    .bind(status.last_publish.map(time_micros))
    .bind(status.last_error.as_deref())
    .bind(heartbeat_interval_us)
    .execute(pool)
    .await?;
    Ok(())
}

pub(super) async fn retire(pool: &PgPool, relay: &str) -> Result<()> {
    sqlx::query("DELETE FROM tidings_outbox_relays WHERE relay = $1")
        .bind(relay)
        .execute(pool)
        .await?;
    Ok(())
}

/// How a relay keeps or seeks the leader lock.
#[derive(Debug, Clone, Copy)]
pub(super) struct LeaderTiming {
    /// How often a standby tries to take the lock.
    pub(super) try_every: Duration,
    /// The server ends the leader's lock session once it has been silent
    /// this long (`idle_session_timeout`, `tcp_user_timeout`), so a frozen
    /// leader's lock goes within it; the leader checks its lock at a third
    /// of it, each check bounded by a third as well (or `operation`, if
    /// shorter), so it steps down before the server can end its session.
    pub(super) lease: Duration,
    /// The bound of one database operation.
    pub(super) operation: Duration,
}

/// The leader lock, kept by its own task: a session-level advisory lock on
/// a connection of its own, released when that session ends, so also when
/// the relay's process dies or the server ends a silent session. The task
/// checks the lock on a timer of its own, whatever the relay is doing, and
/// ends with this handle (the connection closes, the lock goes).
#[derive(Debug)]
pub(super) struct Leadership {
    leading: watch::Receiver<bool>,
    task: JoinHandle<()>,
}

impl Drop for Leadership {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Leadership {
    /// Starts seeking the lock on connections from `pool`.
    pub(super) fn start(pool: PgPool, timing: LeaderTiming) -> Leadership {
        let (tx, leading) = watch::channel(false);
        let task = tokio::spawn(keep_lead(pool, timing, tx));
        Leadership { leading, task }
    }

    /// Whether this relay holds the lock, as of its last check.
    pub(super) fn leading(&self) -> bool {
        *self.leading.borrow()
    }

    /// Resolves once this relay holds the lock.
    pub(super) async fn taken(&self) {
        let mut leading = self.leading.clone();
        let _ = leading.wait_for(|l| *l).await;
    }
}

async fn keep_lead(pool: PgPool, timing: LeaderTiming, leading: watch::Sender<bool>) {
    let check_every = timing.lease / 3;
    let bound = timing.operation.min(check_every);
    let mut conn: Option<PgConnection> = None;
    loop {
        let held = *leading.borrow();
        let checked = match tokio::time::timeout(bound, check(&pool, &mut conn, held, timing)).await
        {
            Ok(checked) => checked,
            Err(_) => Err(Error::Unavailable(format!(
                "the leader lock's connection did not answer within {bound:?}"
            ))),
        };
        let now = match checked {
            Ok(now) => now,
            Err(e) => {
                if held {
                    tracing::warn!(error = %e, "lost the relay leader lock's connection; standing by");
                }
                // A connection that failed or froze is dropped: if the
                // server still holds its session, the session ends within
                // `lease`, and the lock with it.
                conn = None;
                false
            }
        };
        leading.send_if_modified(|l| std::mem::replace(l, now) != now);
        let wait = if now { check_every } else { timing.try_every };
        tokio::time::sleep(wait).await;
    }
}

/// Checks a held lock's session answers, or tries to take the lock.
async fn check(
    pool: &PgPool,
    conn: &mut Option<PgConnection>,
    held: bool,
    timing: LeaderTiming,
) -> Result<bool> {
    let c = match conn {
        Some(c) => c,
        // Detached: the pool must never hand a connection holding the lock
        // to anyone else.
        None => conn.insert(pool.acquire().await?.detach()),
    };
    if held {
        sqlx::query("SELECT 1").execute(&mut *c).await?;
        return Ok(true);
    }
    let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1, $2)")
        .bind(LOCK_CLASS)
        .bind(LEADER)
        .fetch_one(&mut *c)
        .await?;
    if got {
        // The server ends this session (and so releases the lock) once it
        // is idle, or its unacknowledged bytes wait, longer than `lease`:
        // a leader whose link froze without a reset loses the lock within
        // it, where TCP keepalive alone would keep it as long as anything
        // on the path still answers. The leader checks at a third of it.
        // (idle_session_timeout came with PostgreSQL 14, tcp_user_timeout
        // with 12; older servers skip them.)
        sqlx::query(
            "SELECT CASE WHEN current_setting('server_version_num')::int >= 140000 \
                    THEN set_config('idle_session_timeout', $1, false) END, \
                    CASE WHEN current_setting('server_version_num')::int >= 120000 \
                    THEN set_config('tcp_user_timeout', $1, false) END",
        )
        .bind(crate::config::pg_millis(timing.lease))
        .execute(&mut *c)
        .await?;
    }
    Ok(got)
}

/// A listener on the insert trigger's channel, checked for life.
pub(super) async fn listen(pool: &PgPool, check: ListenCheck) -> Result<WatchedListener> {
    Ok(WatchedListener::connect(pool, CHANNEL, check).await?)
}

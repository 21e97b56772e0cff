//! The outbox: the `tidings_outbox` table in the application's own database,
//! enqueueing into the caller's transaction, and the [`Relay`] that moves
//! committed rows to the broker.
//!
//! The contract: a message enqueued in a transaction that commits reaches
//! the broker (the relay retries until the broker confirms); one enqueued in
//! a transaction that rolls back never does. The outbox never commits on its
//! own: the caller's transaction decides.

#[cfg(feature = "postgres")]
mod postgres;
mod relay;
#[cfg(feature = "sqlite")]
mod sqlite;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use sqlx::Transaction;
#[cfg(feature = "postgres")]
use sqlx::{PgPool, Postgres};
#[cfg(feature = "sqlite")]
use sqlx::{Sqlite, SqlitePool};
use tokio::sync::Notify;
use uuid::Uuid;

pub use crate::client::Outgoing as Message;
use crate::config::DatabaseTimeouts;
use crate::error::{Error, Result};
use crate::model::validate_name;
pub use relay::{MAX_PIPELINE, Relay, RelayConfig, RelayStatus};

/// The outbox migration for PostgreSQL (`migrations/outbox/postgres.sql`).
pub const POSTGRES_MIGRATION: &str = include_str!("../../migrations/outbox/postgres.sql");
/// The outbox migration for SQLite (`migrations/outbox/sqlite.sql`).
pub const SQLITE_MIGRATION: &str = include_str!("../../migrations/outbox/sqlite.sql");

/// Enqueues `message` into the caller's transaction; it reaches the broker
/// if and only if that transaction commits. Returns the message id, which is
/// the id the broker and every consumer see.
///
/// Fails with `InvalidArgument` for a bad topic name, a NUL character in the
/// ordering key or an attribute, or an empty attribute name (the broker
/// would refuse the message), or a storage error (then the caller's
/// transaction should roll back).
pub async fn enqueue<DB: OutboxDatabase>(
    tx: &mut Transaction<'_, DB>,
    message: &Message,
) -> Result<Uuid> {
    enqueue_all(tx, std::slice::from_ref(message)).await?;
    Ok(message.id)
}

/// Enqueues several messages into the caller's transaction, in this order.
///
/// Fails as [`enqueue`] does; nothing is enqueued then.
///
/// On PostgreSQL a row with an ordering key holds a lock on its (topic, key)
/// until the transaction ends, so that rows of one key commit in the order
/// of their sequence numbers. Transactions that enqueue several keys should
/// enqueue them in a consistent order, or PostgreSQL may abort one of two
/// crossing transactions as a deadlock (a retryable error).
pub async fn enqueue_all<DB: OutboxDatabase>(
    tx: &mut Transaction<'_, DB>,
    messages: &[Message],
) -> Result<()> {
    if messages.is_empty() {
        return Ok(());
    }
    let rows = messages
        .iter()
        .map(NewRow::from_message)
        .collect::<Result<Vec<_>>>()?;
    DB::insert(tx, &rows).await
}

/// Databases that hold an outbox: PostgreSQL and SQLite.
pub trait OutboxDatabase: sqlx::Database + sealed::Sealed {
    #[doc(hidden)]
    fn insert(
        tx: &mut Transaction<'_, Self>,
        rows: &[NewRow],
    ) -> impl Future<Output = Result<()>> + Send;
}

mod sealed {
    pub trait Sealed {}
    #[cfg(feature = "postgres")]
    impl Sealed for sqlx::Postgres {}
    #[cfg(feature = "sqlite")]
    impl Sealed for sqlx::Sqlite {}
}

#[cfg(feature = "postgres")]
impl OutboxDatabase for Postgres {
    fn insert(
        tx: &mut Transaction<'_, Self>,
        rows: &[NewRow],
    ) -> impl Future<Output = Result<()>> + Send {
        postgres::insert(tx, rows)
    }
}

#[cfg(feature = "sqlite")]
impl OutboxDatabase for Sqlite {
    fn insert(
        tx: &mut Transaction<'_, Self>,
        rows: &[NewRow],
    ) -> impl Future<Output = Result<()>> + Send {
        sqlite::insert(tx, rows)
    }
}

/// A message checked and encoded for its row.
#[doc(hidden)]
#[derive(Debug)]
pub struct NewRow {
    id: String,
    topic: String,
    key: Option<String>,
    payload: Vec<u8>,
    attributes: Option<String>,
}

impl NewRow {
    fn from_message(m: &Message) -> Result<NewRow> {
        validate_name("topic", &m.topic)?;
        // What the broker would refuse anyway, refused here, in the
        // application's own transaction, rather than held in the outbox:
        // and PostgreSQL's jsonb cannot hold a NUL at all.
        if m.key.as_deref().is_some_and(|k| k.contains('\0')) {
            return Err(Error::InvalidArgument(format!(
                "message {}: the ordering key contains a NUL character (U+0000)",
                m.id
            )));
        }
        for (name, value) in &m.attributes {
            if name.is_empty() {
                return Err(Error::InvalidArgument(format!(
                    "message {}: an attribute has an empty name",
                    m.id
                )));
            }
            if name.contains('\0') || value.contains('\0') {
                return Err(Error::InvalidArgument(format!(
                    "message {}: attribute {:?} contains a NUL character (U+0000)",
                    m.id,
                    name.replace('\0', "\\0")
                )));
            }
        }
        Ok(NewRow {
            id: m.id.to_string(),
            topic: m.topic.clone(),
            key: m.key.clone().filter(|k| !k.is_empty()),
            payload: m.payload.clone(),
            attributes: encode_with_trace_context(&m.attributes),
        })
    }
}

/// A row's attributes column: the message's attributes, with the current
/// span's trace context added unless the message has one (see
/// [`crate::trace`]); `None` when there are none.
fn encode_with_trace_context(attributes: &HashMap<String, String>) -> Option<String> {
    if attributes.contains_key(crate::trace::TRACEPARENT) {
        return Some(encode_attributes(attributes));
    }
    match crate::trace::current() {
        Some(_) => {
            let mut traced = attributes.clone();
            crate::trace::inject_current(&mut traced);
            Some(encode_attributes(&traced))
        }
        None => (!attributes.is_empty()).then(|| encode_attributes(attributes)),
    }
}

pub(crate) fn encode_attributes(attributes: &HashMap<String, String>) -> String {
    let map: serde_json::Map<String, serde_json::Value> = attributes
        .iter()
        .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
        .collect();
    serde_json::Value::Object(map).to_string()
}

/// Reads an attributes column: a JSON object; values that are not strings
/// are sent as their JSON text.
pub(crate) fn decode_attributes(seq: i64, text: Option<&str>) -> Result<HashMap<String, String>> {
    let Some(text) = text else {
        return Ok(HashMap::new());
    };
    match serde_json::from_str::<serde_json::Value>(text) {
        Ok(serde_json::Value::Object(map)) => Ok(map
            .into_iter()
            .map(|(k, v)| match v {
                serde_json::Value::String(s) => (k, s),
                other => (k, other.to_string()),
            })
            .collect()),
        Ok(serde_json::Value::Null) => Ok(HashMap::new()),
        _ => Err(Error::InvalidArgument(format!(
            "outbox row {seq}: attributes must be a JSON object of strings"
        ))),
    }
}

/// How long ago `created` (Unix microseconds) was, at `now`.
fn age(created: i64, now: i64) -> Duration {
    Duration::from_micros(u64::try_from(now.saturating_sub(created)).unwrap_or(0))
}

/// Reads a pending row: seq, id, topic, key, payload, attributes, attempts,
/// ready (not held).
fn row_from<R>(r: &R) -> Result<Row, sqlx::Error>
where
    R: sqlx::Row,
    usize: sqlx::ColumnIndex<R>,
    for<'a> i64: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> i32: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> String: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> Vec<u8>: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> bool: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
{
    Ok(Row {
        seq: r.try_get(0)?,
        id: r.try_get(1)?,
        topic: r.try_get(2)?,
        key: r.try_get(3)?,
        payload: r.try_get(4)?,
        attributes: r.try_get(5)?,
        attempts: r.try_get(6)?,
        ready: r.try_get(7)?,
    })
}

/// A relay counts as gone once its heartbeat is older than this many of
/// its heartbeat intervals: one late write is not death, three are.
pub const GONE_AFTER_HEARTBEATS: u32 = 3;

/// The heartbeat interval assumed for a relay row that does not say its own
/// (written by a relay older than the `heartbeat_interval_us` column): the
/// relay's default.
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(5);

/// Whether a relay last heard `age` ago, heartbeating every `interval`
/// (`None`: [`DEFAULT_HEARTBEAT_INTERVAL`]), still runs.
pub fn relay_alive(age: Duration, interval: Option<Duration>) -> bool {
    let interval = interval.unwrap_or(DEFAULT_HEARTBEAT_INTERVAL);
    age <= interval.saturating_mul(GONE_AFTER_HEARTBEATS)
}

/// Reads stats from the head query (depth, held, oldest row's creation in
/// Unix microseconds, first held error) and the relays' rows (relay, leader,
/// published, last publish and heartbeat in Unix microseconds, last error,
/// heartbeat interval and the heartbeat's age in microseconds).
fn stats_from<R>(head: &R, relays: &[R]) -> Result<OutboxStats, sqlx::Error>
where
    R: sqlx::Row,
    usize: sqlx::ColumnIndex<R>,
    for<'a> i64: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> bool: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> String: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
{
    let oldest: Option<i64> = head.try_get(2)?;
    let micros = |m: i64| Duration::from_micros(u64::try_from(m).unwrap_or(0));
    let relays = relays
        .iter()
        .map(|r| {
            let heartbeat_interval = r
                .try_get::<Option<i64>, _>(6)?
                .filter(|&m| m > 0)
                .map(micros);
            let heartbeat_age = micros(r.try_get(7)?);
            Ok(RelayReport {
                relay: r.try_get(0)?,
                leader: r.try_get(1)?,
                published: r.try_get(2)?,
                last_publish: r
                    .try_get::<Option<i64>, _>(3)?
                    .map(crate::model::from_micros),
                heartbeat: crate::model::from_micros(r.try_get(4)?),
                last_error: r.try_get(5)?,
                heartbeat_interval,
                heartbeat_age,
                alive: relay_alive(heartbeat_age, heartbeat_interval),
            })
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()?;
    Ok(OutboxStats {
        depth: head.try_get(0)?,
        held: head.try_get(1)?,
        oldest_age: oldest.map(|c| age(c, crate::model::now_micros())),
        held_error: head.try_get(3)?,
        leaders: relays
            .iter()
            .filter(|r| r.alive && r.leader)
            .map(|r| r.relay.clone())
            .collect(),
        relays,
    })
}

/// The numbers a relay's sweep passed without a committed row, which a read
/// from its cursor takes again (the rows after the cursor come after them).
///
/// On PostgreSQL a transaction may take its number, then commit after a
/// later number was read: the cursor has passed it. The next row of its key
/// commits only after it (the insert trigger's key lock), so a read that
/// finds that next row finds the late one too, if it looks below the
/// cursor; these are the places to look. SQLite runs one write transaction
/// at a time: its numbers follow commits, and its reads ignore this.
#[derive(Debug, Clone, Default)]
struct Passed {
    /// At the sweep's first read, no row below this number was committed
    /// and pending: one found there now committed late. 0 before the first
    /// read of a sweep.
    below: i64,
    /// Rows below `below` read already in this sweep (not to be read again).
    read_below: Vec<i64>,
    /// Numbers from `below` to the cursor that had no committed row when
    /// the sweep passed them.
    gaps: Vec<i64>,
    /// The sweep passed more numbers without a row than it keeps: it must
    /// end, and the next one start from the lowest row.
    overflowed: bool,
}

/// A pending outbox row, as the relay reads it.
#[derive(Debug, Clone)]
struct Row {
    seq: i64,
    id: String,
    topic: String,
    key: String,
    payload: Vec<u8>,
    attributes: Option<String>,
    attempts: i32,
    /// False while the row is held after a refusal (`not_before` ahead).
    ready: bool,
}

impl Row {
    fn bytes(&self) -> usize {
        self.payload.len() + self.topic.len() + self.key.len() + 64
    }
}

/// What the outbox holds, and what its relays report.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxStats {
    /// Rows waiting for the relay.
    pub depth: i64,
    /// Of those, rows the broker refused (unknown topic, over a limit),
    /// waiting to be retried.
    pub held: i64,
    /// Age of the oldest waiting row.
    pub oldest_age: Option<Duration>,
    /// The broker's reason for the first held row.
    pub held_error: Option<String>,
    /// The live relays that report publishing. On PostgreSQL the relays
    /// elect one: this is it (two only for a moment at a hand-over, none
    /// while no relay runs). SQLite has no election: every live relay
    /// publishes and reports itself leader, so all of them are here.
    pub leaders: Vec<String>,
    /// Every relay with a row: live ones, and gone ones (killed without
    /// removing their row; rows silent for a day are dropped).
    pub relays: Vec<RelayReport>,
}

/// One relay's last report, from `tidings_outbox_relays`.
#[derive(Debug, Clone, PartialEq)]
pub struct RelayReport {
    /// Host, process and a random suffix.
    pub relay: String,
    /// Whether it reported being the one publishing (on PostgreSQL one
    /// relay leads; on SQLite every relay does). A gone relay's last word.
    pub leader: bool,
    /// Messages it published since it started.
    pub published: i64,
    /// When it last had a batch acked by the broker.
    pub last_publish: Option<SystemTime>,
    /// When it last reported.
    pub heartbeat: SystemTime,
    /// Its last failure, if the last attempt failed.
    pub last_error: Option<String>,
    /// How often it said it writes its row; `None` for a relay older than
    /// that column (judged by [`DEFAULT_HEARTBEAT_INTERVAL`]).
    pub heartbeat_interval: Option<Duration>,
    /// How long ago its row was last written, by the database's clock.
    pub heartbeat_age: Duration,
    /// Whether it still runs: heard within [`GONE_AFTER_HEARTBEATS`] of its
    /// heartbeat intervals. A relay that stops cleanly removes its row; one
    /// killed (SIGKILL, a lost machine) leaves it, and shows here as gone.
    pub alive: bool,
}

/// The outbox of one database: migrations, the in-process wake-up signal,
/// and what the [`Relay`] and `tidings stats` read.
#[derive(Debug, Clone)]
pub struct Outbox {
    backend: Backend,
    committed: Arc<Notify>,
    timeouts: DatabaseTimeouts,
}

#[derive(Debug, Clone)]
enum Backend {
    #[cfg(feature = "postgres")]
    Postgres(PgPool),
    #[cfg(feature = "sqlite")]
    Sqlite(SqlitePool),
}

/// Calls the same statement function of whichever backend the outbox is in.
macro_rules! on_backend {
    ($self:expr, $f:ident($($arg:expr),*)) => {
        match &$self.backend {
            #[cfg(feature = "postgres")]
            Backend::Postgres(pool) => postgres::$f(pool, $($arg),*).await,
            #[cfg(feature = "sqlite")]
            Backend::Sqlite(pool) => sqlite::$f(pool, $($arg),*).await,
        }
    };
}

/// [`on_backend!`] within the outbox's operation timeout, so that a dead
/// link fails the relay's work with `Unavailable` (which it retries)
/// instead of hanging it.
macro_rules! bounded {
    ($self:expr, $f:ident($($arg:expr),*)) => {{
        let limit = $self.timeouts.operation;
        match tokio::time::timeout(limit, async { on_backend!($self, $f($($arg),*)) }).await {
            Ok(result) => result,
            Err(_) => Err(Error::Unavailable(format!(
                "the outbox database did not answer within {limit:?}"
            ))),
        }
    }};
}

impl Outbox {
    /// The outbox in a PostgreSQL database, over the application's pool.
    #[cfg(feature = "postgres")]
    pub fn postgres(pool: PgPool) -> Outbox {
        Outbox {
            backend: Backend::Postgres(pool),
            committed: Arc::new(Notify::new()),
            timeouts: DatabaseTimeouts::default(),
        }
    }

    /// The outbox in a SQLite database, over the application's pool.
    #[cfg(feature = "sqlite")]
    pub fn sqlite(pool: SqlitePool) -> Outbox {
        Outbox {
            backend: Backend::Sqlite(pool),
            committed: Arc::new(Notify::new()),
            timeouts: DatabaseTimeouts::default(),
        }
    }

    /// The PostgreSQL pool, if the outbox is in PostgreSQL: for the
    /// application's own transactions (`enqueue` into them).
    #[cfg(feature = "postgres")]
    pub fn postgres_pool(&self) -> Option<&PgPool> {
        match &self.backend {
            Backend::Postgres(pool) => Some(pool),
            #[allow(unreachable_patterns)]
            _ => None,
        }
    }

    /// The SQLite pool, if the outbox is in SQLite; see
    /// [`Outbox::postgres_pool`].
    #[cfg(feature = "sqlite")]
    pub fn sqlite_pool(&self) -> Option<&SqlitePool> {
        match &self.backend {
            Backend::Sqlite(pool) => Some(pool),
            #[allow(unreachable_patterns)]
            _ => None,
        }
    }

    /// The same outbox with the relay's database work bounded by `timeouts`
    /// (the operation bound; the statement and connect bounds apply to
    /// pools that [`Outbox::connect_with`] opens).
    pub fn with_timeouts(mut self, timeouts: DatabaseTimeouts) -> Outbox {
        self.timeouts = timeouts;
        self
    }

    /// Opens its own pool on `url` (`postgres://...` or `sqlite://PATH`),
    /// with the default [`DatabaseTimeouts`].
    ///
    /// Fails with `InvalidArgument` for a URL of another kind, `Unavailable`
    /// if the database cannot be reached.
    pub async fn connect(url: &str) -> Result<Outbox> {
        Outbox::connect_with(url, DatabaseTimeouts::default()).await
    }

    /// Opens its own pool on `url` with these bounds: on PostgreSQL each
    /// connection's statement, lock and idle-in-transaction times, the wait
    /// for a connection, and each operation of the relay.
    ///
    /// Fails as [`Outbox::connect`] does, or with `InvalidArgument` for a
    /// zero bound.
    pub async fn connect_with(url: &str, timeouts: DatabaseTimeouts) -> Result<Outbox> {
        timeouts.check()?;
        Ok(Outbox::open(url, &timeouts).await?.with_timeouts(timeouts))
    }

    #[cfg_attr(not(feature = "postgres"), allow(unused_variables))]
    async fn open(url: &str, timeouts: &DatabaseTimeouts) -> Result<Outbox> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            #[cfg(feature = "postgres")]
            return Ok(Outbox::postgres(postgres::connect(url, timeouts).await?));
            #[cfg(not(feature = "postgres"))]
            return Err(Error::InvalidArgument(
                "this build of tidings has no PostgreSQL support (the postgres feature)".into(),
            ));
        }
        if url.starts_with("sqlite:") {
            #[cfg(feature = "sqlite")]
            return Ok(Outbox::sqlite(sqlite::connect(url).await?));
            #[cfg(not(feature = "sqlite"))]
            return Err(Error::InvalidArgument(
                "this build of tidings has no SQLite support (the sqlite feature)".into(),
            ));
        }
        Err(Error::InvalidArgument(format!(
            "outbox database URL must start with postgres://, postgresql:// or sqlite: (got {})",
            crate::store::redact(url)
        )))
    }

    /// Creates the outbox tables, indexes and triggers if they are missing.
    ///
    /// Fails with a storage error.
    pub async fn migrate(&self) -> Result<()> {
        on_backend!(self, migrate())
    }

    /// Wakes a [`Relay`] of this handle (or its clones) at once. Call it after
    /// committing a transaction that enqueued; without it the relay finds
    /// the rows at its next poll. PostgreSQL needs no call: its relay is
    /// woken by NOTIFY at commit.
    pub fn committed(&self) {
        self.committed.notify_one();
    }

    /// Commits `tx` and wakes the relay.
    ///
    /// Fails if the commit fails (then nothing was enqueued).
    pub async fn commit<DB: OutboxDatabase>(&self, tx: Transaction<'_, DB>) -> Result<()> {
        tx.commit().await?;
        self.committed();
        Ok(())
    }

    /// Outbox depth, held rows, oldest pending age and the relays' reports.
    ///
    /// Fails with a storage error.
    pub async fn stats(&self) -> Result<OutboxStats> {
        bounded!(self, stats())
    }

    async fn fetch(&self, after: i64, limit: usize, passed: &Passed) -> Result<Vec<Row>> {
        bounded!(self, fetch(after, limit, passed))
    }

    async fn delete(&self, seqs: &[i64]) -> Result<()> {
        bounded!(self, delete(seqs))
    }

    /// Holds a refused row (and with it the later rows of its key) for
    /// `wait`; with `whole_topic`, every waiting row of its topic.
    async fn hold(&self, row: &Row, error: &str, wait: Duration, whole_topic: bool) -> Result<()> {
        let wait = crate::model::micros(wait);
        bounded!(self, hold(row, error, wait, whole_topic))
    }

    async fn report(
        &self,
        relay: &str,
        status: &RelayStatus,
        started: SystemTime,
        heartbeat_interval: Duration,
    ) -> Result<()> {
        let interval = crate::model::micros(heartbeat_interval);
        bounded!(self, report(relay, status, started, interval))
    }

    async fn retire(&self, relay: &str) -> Result<()> {
        bounded!(self, retire(relay))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_relay_is_gone_after_three_missed_heartbeats() {
        let every = Some(Duration::from_millis(200));
        assert!(relay_alive(Duration::ZERO, every));
        assert!(relay_alive(Duration::from_millis(600), every));
        assert!(!relay_alive(Duration::from_millis(601), every));
        // A row without its interval is judged by the default.
        assert!(relay_alive(Duration::from_secs(15), None));
        assert!(!relay_alive(Duration::from_secs(16), None));
    }

    #[test]
    fn what_the_broker_would_refuse_is_refused_at_enqueue() {
        let ok = Message::new("orders", "x").with_key("customer-7");
        assert!(NewRow::from_message(&ok).is_ok());
        let mut cases = vec![Message::new("orders", "x").with_key("a\0b")];
        for (name, value) in [("", "v"), ("n\0", "v"), ("n", "v\0")] {
            let mut m = Message::new("orders", "x");
            m.attributes.insert(name.into(), value.into());
            cases.push(m);
        }
        for m in cases {
            match NewRow::from_message(&m) {
                Err(Error::InvalidArgument(e)) => assert!(e.contains(&m.id.to_string()), "{e}"),
                other => panic!("{:?}: {other:?}", m.attributes),
            }
        }
    }
}

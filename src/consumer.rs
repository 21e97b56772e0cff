//! The consumer runtime: subscribes to a subscription and runs a [`Handler`]
//! for each delivery inside an inbox transaction, so that the handler's
//! database effects happen once per message id (G5).
//!
//! Deliveries are processed in batches, one transaction each in the
//! consumer's database (group commit, issue 14): begin, then for each
//! delivery in turn open a savepoint, record the message id in
//! `tidings_inbox` (a conflict means a duplicate: skip the handler), run the
//! handler with the transaction and release the savepoint; then commit once,
//! and only then ack the batch's processed and duplicate deliveries. A
//! handler error rolls back to its savepoint, which undoes that delivery
//! alone, and nacks it with the error text as reason and no delay, so the
//! subscription's backoff applies. A failed commit nacks the whole batch
//! (whether it committed is unknown; the redeliveries find out in the
//! inbox).
//!
//! A batch is whatever deliveries wait when its transaction has begun, up
//! to [`ConsumerConfig::max_batch`]: a lone message starts a transaction at
//! once, and batches grow only when deliveries come faster than
//! transactions commit. At most [`ConsumerConfig::concurrency`]
//! transactions run at a time; leases are extended while deliveries wait
//! or run; a periodic task prunes the inbox by the broker's
//! `ack_watermark`.
//!
//! Per-key order: an ordered subscription hands a key's messages to one
//! stream at a time, several at once (a run), and takes their acks in
//! order. The runtime runs a key's deliveries one batch at a time, in
//! arrival order, and queues a batch's acks (sent after its commit) before
//! the next batch of its keys starts; a delivery that fails gives back the
//! later ones of its key that the consumer holds, unprocessed (the broker
//! redelivers them after it). Within a batch deliveries run in the
//! order they arrived, so a redelivery of a message whose first delivery is
//! earlier in the same batch finds that delivery's inbox row (a duplicate,
//! acked only if the transaction commits) or, if its handler failed, no row
//! (it runs again).

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use crate::client::{Admin, Backoff, Connection, Event, FlowControl, Subscriber};
use crate::config;
use crate::error::{Error, Result};
use crate::inbox::{Inbox, InboxDatabase, Recorded, Savepoint};
use crate::model::{AckOperation, AckOutcome, AckStatus, Delivery, Micros, now_micros};
use prometheus_client::metrics::histogram::Histogram;
use sqlx::Transaction;
use tokio::sync::{Notify, mpsc};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;
use tracing::Instrument;

/// The user's code for one message. It runs inside the inbox transaction:
/// write through `tx` (`sqlx::query(...).execute(&mut **tx)`) and the writes
/// commit together with the message's inbox row, or not at all. Do not
/// commit or roll back `tx` yourself.
///
/// Return `Err` to roll back; the message is nacked with the error's text
/// as reason and redelivered after the subscription's backoff (or
/// dead-lettered after `max_attempts`).
///
/// ```no_run
/// use tidings::consumer::Handler;
/// use tidings::model::Delivery;
///
/// struct Billing;
///
/// impl Handler<sqlx::Postgres> for Billing {
///     type Error = sqlx::Error;
///
///     async fn handle(
///         &self,
///         delivery: &Delivery,
///         tx: &mut sqlx::Transaction<'static, sqlx::Postgres>,
///     ) -> Result<(), sqlx::Error> {
///         sqlx::query("INSERT INTO invoices (body) VALUES ($1)")
///             .bind(&delivery.message.payload)
///             .execute(&mut **tx)
///             .await?;
///         Ok(())
///     }
/// }
/// ```
pub trait Handler<DB: InboxDatabase>: Send + Sync + 'static {
    /// What a failure says; its text becomes the nack reason (kept with the
    /// message if it is dead-lettered).
    type Error: std::fmt::Display + Send;

    /// Processes one delivery within `tx`.
    fn handle(
        &self,
        delivery: &Delivery,
        tx: &mut Transaction<'static, DB>,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;
}

/// How a [`Consumer`] runs.
#[derive(Debug, Clone, PartialEq)]
pub struct ConsumerConfig {
    /// Most inbox transactions running at once (default 8), each a batch of
    /// up to `max_batch` deliveries whose handlers run one after the other;
    /// so at most `concurrency` handlers run at once. On SQLite, whose one
    /// writer the inbox transaction takes at its start, the transactions
    /// run one at a time whatever this says.
    pub concurrency: usize,
    /// Most deliveries in one inbox transaction (default 256). A
    /// transaction takes the deliveries waiting when it begins, up to this
    /// many; none waits for company, so a lone message is handled at once.
    /// Larger batches share one commit (one fsync) among more messages. On
    /// PostgreSQL a batch of more than 64 deliveries overflows the
    /// backend's cache of subtransaction ids (one per savepoint), which
    /// slows other sessions' visibility checks while it is open: use 64 if
    /// the consumer's database serves heavy concurrent reads.
    pub max_batch: usize,
    /// Deliveries held beyond those that full batches take (default 8), so
    /// that transactions never wait for the broker: a slot on the stream
    /// frees only when the broker has committed its ack. The stream's flow
    /// control is [`window`](ConsumerConfig::window) messages; their leases
    /// are extended while they wait.
    pub prefetch: usize,
    /// Extend the lease of every held delivery while it waits or its
    /// handler runs (default true). Without it, a handler that outlives
    /// the lease has its message redelivered meanwhile; the inbox still
    /// keeps the effect single, but the work is done twice.
    pub extend_leases: bool,
    /// Length of each extension (default `None`: the delivery's own lease
    /// length, that is the subscription's `ack_deadline`). A lease is
    /// extended when half of it is left.
    pub lease_extension: Option<Duration>,
    /// On shutdown, how long running handlers may take to finish and their
    /// acks to be confirmed (default 30 s). Handlers still running then are
    /// cancelled (their transactions roll back) and their messages released.
    pub shutdown_timeout: Duration,
    /// How often the inbox is pruned by the subscription's ack watermark
    /// (default `Some(60 s)`; `None`: never, the application prunes).
    pub prune_interval: Option<Duration>,
    /// Fallback when the broker will not tell the watermark (the
    /// consumer's credentials lack admin permission, or the broker predates
    /// it): delete rows processed longer ago than this (default `None`:
    /// keep them). A guess, unlike the watermark: see
    /// [`Inbox::prune_older_than`] for when a message could come back after
    /// its row went.
    pub fallback_retention: Option<Duration>,
    /// Reconnection backoff of the subscription stream.
    pub reconnect: Backoff,
    /// Longest the runtime's own database steps (begin, recording the id,
    /// commit) may take (default 10 s). A link that drops packets and
    /// never resets fails the delivery with a retryable error (it is nacked
    /// and comes back) instead of holding it for good. The handler's own
    /// work is not bounded here: its lease is extended while it runs.
    pub database_timeout: Duration,
    /// Longest a settled delivery's ack waits for others to share its
    /// request (default 2 ms). The broker commits a stream's requests one
    /// after the other, so fewer, larger requests ack faster under load; a
    /// longer wait only delays the acks (and the end of their leases).
    pub ack_delay: Duration,
    /// How the handlers of one inbox transaction are kept apart (default
    /// [`BatchIsolation::Optimistic`] with `careful_for` 60 s).
    pub isolation: BatchIsolation,
}

/// How the handlers of one inbox transaction (a batch) are kept apart, so
/// that a failing one rolls back its own writes and not the others'.
/// Either way each handler's database effects happen once per message
/// (DESIGN G5), and a failing handler has its delivery nacked while the
/// batch's others commit (unless they fail in turn, or the transaction
/// itself fails); the modes differ in cost and in whether a handler can
/// run twice for one delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchIsolation {
    /// Every delivery runs in its own savepoint: one more round trip to
    /// the database per delivery. A failing handler rolls back to its
    /// savepoint; no handler runs twice for one delivery.
    Savepoints,
    /// Deliveries run without savepoints while handlers succeed. When one
    /// fails, the transaction rolls back whole and the batch runs again
    /// at once in a new one, every delivery in its own savepoint, the
    /// failed one left out and nacked. So the handlers that ran before it
    /// in the batch run a second time for the same delivery; the writes of
    /// their first run were rolled back, but whatever they did outside
    /// the transaction happens twice (as after a crash). For `careful_for`
    /// after a failure, batches run as with `Savepoints`, so that a
    /// message failing on every redelivery costs its batch one extra run
    /// at most per `careful_for`. A batch holding two deliveries of one
    /// message id always uses savepoints.
    Optimistic {
        /// How long batches keep their savepoints after a handler failed.
        careful_for: Duration,
    },
}

impl Default for BatchIsolation {
    fn default() -> Self {
        BatchIsolation::Optimistic {
            careful_for: Duration::from_secs(60),
        }
    }
}

impl Default for ConsumerConfig {
    fn default() -> Self {
        ConsumerConfig {
            concurrency: 8,
            max_batch: 256,
            prefetch: 8,
            extend_leases: true,
            lease_extension: None,
            shutdown_timeout: Duration::from_secs(30),
            prune_interval: Some(Duration::from_secs(60)),
            fallback_retention: None,
            reconnect: Backoff::default(),
            database_timeout: Duration::from_secs(10),
            ack_delay: Duration::from_millis(2),
            isolation: BatchIsolation::default(),
        }
    }
}

impl ConsumerConfig {
    /// Checks the settings before a consumer runs with them.
    ///
    /// Fails with `InvalidArgument` for a concurrency or batch size of
    /// zero, a zero prune interval or lease extension, or a duration longer
    /// than [`config::MAX_DURATION`](crate::config::MAX_DURATION).
    pub fn check(&self) -> Result<()> {
        if self.concurrency == 0 {
            return Err(Error::InvalidArgument(
                "consumer concurrency must be at least 1".into(),
            ));
        }
        if self.max_batch == 0 {
            return Err(Error::InvalidArgument(
                "consumer max_batch must be at least 1".into(),
            ));
        }
        if let Some(d) = self.prune_interval {
            config::check_interval("consumer prune_interval", d)?;
        }
        if let Some(d) = self.lease_extension {
            config::check_interval("consumer lease_extension", d)?;
        }
        if let Some(d) = self.fallback_retention {
            config::check_duration("consumer fallback_retention", d)?;
        }
        config::check_duration("consumer shutdown_timeout", self.shutdown_timeout)?;
        config::check_interval("consumer database_timeout", self.database_timeout)?;
        config::check_duration("consumer ack_delay", self.ack_delay)?;
        if let BatchIsolation::Optimistic { careful_for } = self.isolation {
            config::check_duration("consumer isolation careful_for", careful_for)?;
        }
        self.reconnect.check("consumer reconnect")
    }

    /// The most messages the consumer holds, its stream's flow control:
    /// `concurrency * max_batch + prefetch`. Every transaction can then
    /// take a full batch while `prefetch` more wait, so batches fill under
    /// load (with `max_batch` 1 this is the window of a consumer that
    /// commits each message alone). On SQLite the transactions run one at
    /// a time, and the deliveries the others would take wait their turn.
    pub fn window(&self) -> usize {
        self.concurrency
            .saturating_mul(self.max_batch)
            .saturating_add(self.prefetch)
    }
}

/// What a consumer did so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConsumerStats {
    /// Deliveries received.
    pub received: u64,
    /// Handlers that ran and committed.
    pub processed: u64,
    /// Deliveries whose id the inbox held already: handler skipped, acked.
    pub duplicates: u64,
    /// Handlers that failed: rolled back and nacked.
    pub failed: u64,
    /// Deliveries the inbox itself failed on (the database refused or was
    /// unreachable, or their batch's commit failed): rolled back and
    /// nacked.
    pub errors: u64,
    /// Inbox transactions committed, each a batch of one or more
    /// deliveries: `(processed + duplicates) / batches` is roughly the
    /// mean batch size.
    pub batches: u64,
    /// Batches that ran a second time, with savepoints, after a handler
    /// failed in them without ([`BatchIsolation::Optimistic`]).
    pub reruns: u64,
    /// Deliveries whose lease ended before their handler could start:
    /// dropped, the broker redelivers them.
    pub expired: u64,
    /// Acks the broker confirmed.
    pub acked: u64,
    /// Acks the broker refused (the lease had ended: the message comes again
    /// and is skipped as a duplicate).
    pub ack_refused: u64,
    /// Inbox rows pruned.
    pub pruned: u64,
    /// Pruning rounds finished (by watermark or by the fallback retention).
    pub prune_rounds: u64,
    /// The subscription's ack watermark at the last pruning (-1: not known).
    pub watermark: i64,
}

#[derive(Debug)]
struct Counters {
    received: AtomicU64,
    processed: AtomicU64,
    duplicates: AtomicU64,
    failed: AtomicU64,
    errors: AtomicU64,
    batches: AtomicU64,
    reruns: AtomicU64,
    expired: AtomicU64,
    acked: AtomicU64,
    ack_refused: AtomicU64,
    pruned: AtomicU64,
    prune_rounds: AtomicU64,
    watermark: AtomicI64,
    changed: Notify,
    /// Seconds each handler ran (its batch's commit included), for metrics.
    handler_latency: Histogram,
}

/// Upper bounds of the handler latency histogram, in seconds.
const HANDLER_BUCKETS: [f64; 13] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0,
];

impl Counters {
    fn new() -> Counters {
        Counters {
            received: AtomicU64::new(0),
            processed: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            batches: AtomicU64::new(0),
            reruns: AtomicU64::new(0),
            expired: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            ack_refused: AtomicU64::new(0),
            pruned: AtomicU64::new(0),
            prune_rounds: AtomicU64::new(0),
            watermark: AtomicI64::new(-1),
            changed: Notify::new(),
            handler_latency: Histogram::new(HANDLER_BUCKETS),
        }
    }

    fn add(&self, counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
        self.changed.notify_waiters();
    }

    fn snapshot(&self) -> ConsumerStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ConsumerStats {
            received: get(&self.received),
            processed: get(&self.processed),
            duplicates: get(&self.duplicates),
            failed: get(&self.failed),
            errors: get(&self.errors),
            batches: get(&self.batches),
            reruns: get(&self.reruns),
            expired: get(&self.expired),
            acked: get(&self.acked),
            ack_refused: get(&self.ack_refused),
            pruned: get(&self.pruned),
            prune_rounds: get(&self.prune_rounds),
            watermark: self.watermark.load(Ordering::Relaxed),
        }
    }
}

/// Reads a consumer's stats while it runs (cloneable).
#[derive(Debug, Clone)]
pub struct Monitor(Arc<Counters>);

impl Monitor {
    /// The stats now.
    pub fn stats(&self) -> ConsumerStats {
        self.0.snapshot()
    }

    /// How long handlers ran, their commit included (shared: it fills as
    /// the consumer runs).
    pub fn handler_latency(&self) -> Histogram {
        self.0.handler_latency.clone()
    }

    /// Waits until `done` holds for the stats, and returns them.
    pub async fn wait_for(&self, done: impl Fn(&ConsumerStats) -> bool) -> ConsumerStats {
        loop {
            let changed = self.0.changed.notified();
            tokio::pin!(changed);
            // Registered before the check, so no change between the two is
            // missed.
            changed.as_mut().enable();
            let stats = self.stats();
            if done(&stats) {
                return stats;
            }
            changed.await;
        }
    }
}

/// Runs a handler for every message of one subscription, through the inbox.
pub struct Consumer<DB: InboxDatabase, H: Handler<DB>> {
    connection: Connection,
    subscription: String,
    inbox: Inbox<DB>,
    handler: Arc<H>,
    config: ConsumerConfig,
    counters: Arc<Counters>,
}

impl<DB: InboxDatabase, H: Handler<DB>> std::fmt::Debug for Consumer<DB, H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consumer")
            .field("subscription", &self.subscription)
            .field("inbox", &self.inbox)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// What became of one delivery's processing.
#[derive(Clone)]
enum Outcome {
    /// Committed: ack.
    Processed,
    /// Recorded before: ack (once the batch committed: the row found may
    /// be the batch's own).
    Duplicate,
    /// Recorded by a transaction that had committed before the batch
    /// began: its ack went out ahead of the batch ([`Shared::early`]).
    Acked,
    /// The handler failed: nack with this reason.
    Failed(String),
    /// The inbox failed: nack with this reason.
    Error(String),
    /// The lease ended before the handler could start: leave it.
    Expired,
    /// Shutdown came before the handler started: leave it to the release.
    Released,
}

impl Outcome {
    /// Whether the delivery's work committed (it is acked).
    fn keeps(&self) -> bool {
        matches!(
            self,
            Outcome::Processed | Outcome::Duplicate | Outcome::Acked
        )
    }
}

/// A delivery the consumer holds, from receipt until its ack or nack is sent.
struct Held {
    /// The lease deadline (Unix µs) as last confirmed by the broker.
    deadline: Arc<AtomicI64>,
    /// The lease length at delivery, µs.
    span: i64,
    /// When to extend next (Unix µs); `None` while an extension is pending
    /// or after the lease was lost.
    extend_at: Option<Micros>,
    /// Set when its handler starts: a batch cancelled at shutdown nacks
    /// the deliveries whose handler ran and releases the others.
    started: Arc<AtomicBool>,
    /// Its message's ordering key.
    key: Option<String>,
}

/// A delivery waiting for a batch to take it.
struct Job {
    delivery: Delivery,
    ack_id: String,
    /// Shared with its [`Held`].
    deadline: Arc<AtomicI64>,
    /// Lease left below which the handler does not start, µs.
    margin: i64,
    /// Shared with its [`Held`].
    started: Arc<AtomicBool>,
    /// Its message's ordering key, if it has one.
    key: Option<String>,
}

/// The ack ids a batch took, so that they are settled even if its task
/// panics or is cancelled.
type Taken = Arc<Mutex<Vec<String>>>;

/// What a batch did: each delivery's outcome, and whether its transaction
/// committed.
#[derive(Default)]
struct Batch {
    outcomes: Vec<(String, Outcome)>,
    committed: bool,
    /// It ran a second time, with savepoints, after a handler failed in
    /// its first run without them.
    reran: bool,
}

struct Shared<DB: InboxDatabase, H> {
    inbox: Inbox<DB>,
    handler: Arc<H>,
    subscription: String,
    /// Deliveries no batch has taken yet, in arrival order.
    waiting: Mutex<VecDeque<Job>>,
    /// The ordering keys of the deliveries running batches took, and which
    /// batch took them (the address of its [`Taken`]): one batch at a time
    /// runs a key's deliveries, in arrival order.
    busy: Mutex<HashMap<String, usize>>,
    /// [`ConsumerConfig::max_batch`].
    max_batch: usize,
    /// Ack ids of duplicates a batch found when it recorded its ids, for
    /// the main loop to ack at once: their rows were committed before the
    /// batch began, so their acks need not wait for its handlers and
    /// commit (a redelivered batch would otherwise see its acks refused
    /// whenever the batch outlasts the lease).
    early: mpsc::UnboundedSender<Vec<String>>,
    /// Set at shutdown: batches start no further handler.
    stopping: AtomicBool,
    /// [`ConsumerConfig::database_timeout`].
    database_timeout: Duration,
    /// [`ConsumerConfig::isolation`].
    isolation: BatchIsolation,
    /// With [`BatchIsolation::Optimistic`]: until when (µs since the
    /// epoch) batches keep their savepoints after a handler failed.
    careful_until: AtomicI64,
    handler_latency: Histogram,
}

impl<DB: InboxDatabase, H> Shared<DB, H> {
    fn waiting(&self) -> std::sync::MutexGuard<'_, VecDeque<Job>> {
        // The lock is only held to push or drain, which cannot panic.
        self.waiting.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether a batch may run its handlers without savepoints.
    fn optimistic(&self) -> bool {
        matches!(self.isolation, BatchIsolation::Optimistic { .. })
            && now_micros() >= self.careful_until.load(Ordering::Relaxed)
    }

    /// A handler failed in a batch without savepoints: the next batches
    /// keep them for the configured while.
    fn fail_optimism(&self) {
        if let BatchIsolation::Optimistic { careful_for } = self.isolation {
            let span = i64::try_from(careful_for.as_micros()).unwrap_or(i64::MAX);
            self.careful_until
                .store(now_micros().saturating_add(span), Ordering::Relaxed);
        }
    }

    fn busy(&self) -> std::sync::MutexGuard<'_, HashMap<String, usize>> {
        self.busy.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes up to `n` waiting deliveries, in order, noting them in `taken`;
    /// a delivery whose key another running batch holds is left waiting
    /// (and so are the later ones of its key), and the keys taken are this
    /// batch's until it is settled ([`Shared::free`]).
    fn take(&self, n: usize, taken: &Taken) -> Vec<Job> {
        let owner = batch_id(taken);
        let jobs: Vec<Job> = {
            let mut waiting = self.waiting();
            let mut busy = self.busy();
            let mut jobs = Vec::new();
            let mut i = 0;
            while jobs.len() < n && i < waiting.len() {
                let free = match &waiting[i].key {
                    None => true,
                    Some(key) => match busy.get(key) {
                        Some(&holder) => holder == owner,
                        None => {
                            busy.insert(key.clone(), owner);
                            true
                        }
                    },
                };
                match free.then(|| waiting.remove(i)).flatten() {
                    Some(job) => jobs.push(job),
                    None => i += 1,
                }
            }
            jobs
        };
        taken
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend(jobs.iter().map(|j| j.ack_id.clone()));
        jobs
    }
}

impl<DB: InboxDatabase, H> Shared<DB, H> {
    /// Lets the keys of a settled batch go to the next batch.
    fn free(&self, taken: &Taken) {
        let owner = batch_id(taken);
        self.busy().retain(|_, holder| *holder != owner);
    }

    /// Takes the waiting deliveries of `keys` out of the queue: a key whose
    /// delivery failed goes back to the broker with its later deliveries,
    /// which an ordered subscription redelivers only after the failed one.
    fn withdraw(&self, keys: &HashSet<String>) -> Vec<Job> {
        let mut waiting = self.waiting();
        let (out, kept): (VecDeque<Job>, VecDeque<Job>) = std::mem::take(&mut *waiting)
            .into_iter()
            .partition(|j| j.key.as_ref().is_some_and(|k| keys.contains(k)));
        *waiting = kept;
        out.into()
    }
}

/// Keys fenced after a failed delivery (see `Consumer::run`): per key, the
/// ack ids whose answer is awaited and when the fence lifts regardless.
#[derive(Default)]
struct Fences {
    keys: HashMap<String, (HashSet<String>, Instant)>,
    by_ack: HashMap<String, String>,
}

impl Fences {
    /// Fences `key` until the answer to `ack_id` (or `span_us` from now).
    fn raise(&mut self, key: &str, ack_id: &str, span_us: i64) {
        let until = Instant::now() + Duration::from_micros(span_us.max(1_000_000).unsigned_abs());
        let (ids, lift) = self
            .keys
            .entry(key.to_owned())
            .or_insert_with(|| (HashSet::new(), until));
        ids.insert(ack_id.to_owned());
        *lift = (*lift).max(until);
        self.by_ack.insert(ack_id.to_owned(), key.to_owned());
    }

    /// The broker answered `ack_id`.
    fn answered(&mut self, ack_id: &str) {
        let Some(key) = self.by_ack.remove(ack_id) else {
            return;
        };
        if let Some((ids, _)) = self.keys.get_mut(&key) {
            ids.remove(ack_id);
            if ids.is_empty() {
                self.keys.remove(&key);
            }
        }
    }

    /// Whether `key` is fenced (a fence past its time lifts here).
    fn holds(&mut self, key: &str) -> bool {
        match self.keys.get(key) {
            Some((_, lift)) if Instant::now() < *lift => true,
            Some((ids, _)) => {
                for id in ids.clone() {
                    self.by_ack.remove(&id);
                }
                self.keys.remove(key);
                false
            }
            None => false,
        }
    }
}

/// A batch's identity while it runs: the address of its [`Taken`].
fn batch_id(taken: &Taken) -> usize {
    Arc::as_ptr(taken) as usize
}

/// Most acks sent in one request.
const ACK_BATCH: usize = 500;

/// How long a stopping consumer waits for the broker to answer its last
/// acks and releases before it drops the stream.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Sends the collected acks as one request.
fn flush(
    sub: &crate::client::Subscription,
    acks: &mut Vec<String>,
    unconfirmed: &mut HashMap<String, Instant>,
) {
    if acks.is_empty() {
        return;
    }
    let now = Instant::now();
    unconfirmed.extend(acks.iter().map(|a| (a.clone(), now)));
    sub.ack(std::mem::take(acks));
}

/// How long an ack or nack may go unconfirmed before it is forgotten (its
/// stream broke, so no outcome will come).
const UNCONFIRMED_TTL: Duration = Duration::from_secs(60);

impl<DB: InboxDatabase, H: Handler<DB>> Consumer<DB, H> {
    /// A consumer of `subscription` on the broker behind `connection`, recording
    /// ids in `inbox` and running `handler`. Nothing happens until [`run`].
    ///
    /// [`run`]: Consumer::run
    pub fn new(
        connection: &Connection,
        subscription: impl Into<String>,
        inbox: Inbox<DB>,
        handler: H,
        config: ConsumerConfig,
    ) -> Self {
        Consumer {
            connection: connection.clone(),
            subscription: subscription.into(),
            inbox,
            handler: Arc::new(handler),
            config,
            counters: Arc::new(Counters::new()),
        }
    }

    /// A handle that reads this consumer's stats, before, while and after it
    /// runs.
    pub fn monitor(&self) -> Monitor {
        Monitor(self.counters.clone())
    }

    /// Consumes until `shutdown` completes, then shuts down gracefully: takes
    /// no new message, lets running handlers finish and their acks be
    /// confirmed (within [`ConsumerConfig::shutdown_timeout`]), gives back
    /// the messages it received but never started (without counting an
    /// attempt), and ends the stream. Returns the final stats.
    ///
    /// Fails with `InvalidArgument` for a configuration that
    /// [`ConsumerConfig::check`] refuses, or with the broker's error if the subscription cannot be consumed (it does not
    /// exist, say). A broker restart or outage is not an error: the stream
    /// reconnects.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<ConsumerStats> {
        self.config.check()?;
        let window = self.config.window();
        let flow = FlowControl {
            max_messages: i32::try_from(window).unwrap_or(i32::MAX),
            ..FlowControl::default()
        };
        let mut sub = Subscriber::new(&self.connection, self.config.reconnect)
            .subscribe(&self.subscription, flow);
        let (early, mut early_acks) = mpsc::unbounded_channel::<Vec<String>>();
        let shared = Arc::new(Shared {
            inbox: self.inbox.clone(),
            handler: self.handler.clone(),
            subscription: self.subscription.clone(),
            waiting: Mutex::new(VecDeque::new()),
            busy: Mutex::new(HashMap::new()),
            max_batch: self.config.max_batch,
            early,
            stopping: AtomicBool::new(false),
            database_timeout: self.config.database_timeout,
            isolation: self.config.isolation,
            careful_until: AtomicI64::new(0),
            handler_latency: self.counters.handler_latency.clone(),
        });
        let admin = Admin::new(&self.connection);
        let counters = self.counters.clone();
        tracing::info!(
            subscription = %self.subscription,
            concurrency = self.config.concurrency,
            max_batch = self.config.max_batch,
            "consumer started"
        );

        let mut workers: JoinSet<Batch> = JoinSet::new();
        let mut tasks: HashMap<tokio::task::Id, Taken> = HashMap::new();
        let mut held: HashMap<String, Held> = HashMap::new();
        // Keys whose delivery failed, until the broker has answered the
        // nack (or release) that ended it and every release of the key's
        // deliveries sent since: deliveries of such a key that arrive
        // meanwhile were leased before the broker read one of those, which
        // ended their leases too; they go back unprocessed, or their
        // effects would come before the failed one's. (The broker's session
        // answers a stream's requests in order with its deliveries, so an
        // answer follows every delivery leased before the request was
        // read.) Each fence also lifts a lease span after its last id,
        // should an answer never come.
        let mut fences = Fences::default();
        let mut unconfirmed: HashMap<String, Instant> = HashMap::new();
        let mut prune_timer = self.config.prune_interval.map(tokio::time::interval);
        let mut pruning: Option<JoinHandle<()>> = None;
        let mut drain_until: Option<Instant> = None;
        // Acks wait up to `ack_delay` to go as one request: the broker's
        // session commits a stream's requests one after the other.
        let mut acks: Vec<String> = Vec::new();
        let mut flush_at: Option<Instant> = None;
        // When the next lease extension may be due: never later than the
        // earliest `extend_at` of `held`, but not raised when deliveries
        // leave (scanning `held` at every event would cost the whole
        // window per message); the extension branch sets it exactly.
        let mut next_extension: Option<Micros> = None;
        tokio::pin!(shutdown);

        let result = loop {
            if drain_until.is_some()
                && workers.is_empty()
                && unconfirmed.is_empty()
                && acks.is_empty()
            {
                break Ok(());
            }
            tokio::select! {
                () = &mut shutdown, if drain_until.is_none() => {
                    tracing::info!(subscription = %self.subscription, running = workers.len(), "consumer shutting down");
                    drain_until = Some(Instant::now() + self.config.shutdown_timeout);
                    // Handlers not started yet give up their message: it
                    // is released, without counting an attempt.
                    shared.stopping.store(true, Ordering::Relaxed);
                    let unstarted: Vec<String> =
                        shared.waiting().drain(..).map(|j| j.ack_id).collect();
                    for ack_id in &unstarted {
                        held.remove(ack_id);
                    }
                    if !unstarted.is_empty() {
                        sub.release(unstarted);
                    }
                    if let Some(p) = pruning.take() {
                        p.abort();
                    }
                }
                () = sleep_until_opt(drain_until) => {
                    tracing::warn!(
                        subscription = %self.subscription,
                        running = workers.len(),
                        unconfirmed = unconfirmed.len(),
                        "shutdown timeout: cancelling running handlers; their messages will be redelivered"
                    );
                    break Ok(());
                }
                Some(ids) = early_acks.recv() => {
                    self.ack_early(&sub, ids, &mut held, &mut acks, &mut unconfirmed);
                    if acks.len() >= ACK_BATCH {
                        flush(&sub, &mut acks, &mut unconfirmed);
                        flush_at = None;
                    } else if !acks.is_empty() && flush_at.is_none() {
                        flush_at = Some(Instant::now() + self.config.ack_delay);
                    }
                }
                Some(joined) = workers.join_next_with_id(), if !workers.is_empty() => {
                    // A batch's early acks go before its others.
                    while let Ok(ids) = early_acks.try_recv() {
                        self.ack_early(&sub, ids, &mut held, &mut acks, &mut unconfirmed);
                    }
                    let mut next = Some(joined);
                    while let Some(joined) = next {
                        let (id, batch) = match joined {
                            Ok((id, batch)) => (id, batch),
                            Err(e) => {
                                // The transaction was dropped, so it
                                // rolled back: every delivery it took fails.
                                let reason = if e.is_panic() { "handler panicked" } else { "handler cancelled" };
                                // Less the duplicates it had acked early.
                                let taken = tasks.get(&e.id()).map(take_all).unwrap_or_default();
                                let taken = taken.into_iter().filter(|a| held.contains_key(a));
                                (e.id(), Batch::failed_ids(taken, reason))
                            }
                        };
                        if batch.committed {
                            counters.add(&counters.batches, 1);
                        }
                        if batch.reran {
                            counters.add(&counters.reruns, 1);
                        }
                        let mut failed_keys = HashSet::new();
                        for (ack_id, outcome) in batch.outcomes {
                            let h = held.remove(&ack_id);
                            let span = h.as_ref().map_or(0, |h| h.span);
                            if let Some(key) = h.and_then(|h| h.key).filter(|_| !outcome.keeps()) {
                                if matches!(outcome, Outcome::Expired) {
                                    // Answered (stale) once the broker has
                                    // read it: that answer lifts the fence.
                                    sub.release(vec![ack_id.clone()]);
                                }
                                // Released ones too: their later messages
                                // may be leased until the broker reads the
                                // release.
                                fences.raise(&key, &ack_id, span);
                                failed_keys.insert(key);
                            }
                            self.settle(&sub, ack_id, outcome, &mut acks, &mut unconfirmed);
                        }
                        // The batch's acks are queued: its keys' next
                        // deliveries may run, their acks queued after.
                        if let Some(taken) = tasks.remove(&id) {
                            shared.free(&taken);
                        }
                        if !failed_keys.is_empty() {
                            let back: Vec<String> = shared
                                .withdraw(&failed_keys)
                                .into_iter()
                                .map(|j| j.ack_id)
                                .collect();
                            for ack_id in &back {
                                if let Some(Held { key: Some(key), span, .. }) = held.remove(ack_id) {
                                    fences.raise(&key, ack_id, span);
                                }
                            }
                            if !back.is_empty() {
                                sub.release(back);
                            }
                        }
                        next = workers.try_join_next_with_id();
                    }
                    if drain_until.is_none() {
                        start_batches(&shared, &mut workers, &mut tasks, self.config.concurrency, usize::MAX);
                    }
                    if acks.len() >= ACK_BATCH {
                        flush(&sub, &mut acks, &mut unconfirmed);
                        flush_at = None;
                    } else if !acks.is_empty() && flush_at.is_none() {
                        flush_at = Some(Instant::now() + self.config.ack_delay);
                    }
                    if unconfirmed.len() > 4 * window {
                        unconfirmed.retain(|_, sent| sent.elapsed() < UNCONFIRMED_TTL);
                    }
                }
                () = sleep_until_opt(flush_at), if flush_at.is_some() => {
                    flush(&sub, &mut acks, &mut unconfirmed);
                    flush_at = None;
                }
                event = sub.next() => match event {
                    Some(Ok(Event::Message(delivery))) => {
                        if drain_until.is_some() {
                            // Shutting down: given back unprocessed.
                            sub.release(vec![delivery.ack_id.to_string()]);
                            continue;
                        }
                        counters.add(&counters.received, 1);
                        let ack_id = delivery.ack_id.to_string();
                        let now = now_micros();
                        let span = (delivery.lease_deadline - now).max(1_000);
                        if let Some(key) = delivery.message.key.as_ref().filter(|k| fences.holds(k)) {
                            // Leased before the broker read what raised the
                            // fence, or after (a redelivery of the failed
                            // one, with its followers): either way back it
                            // goes, and the fence stays until this release
                            // is answered too, since the broker may lease
                            // the key's next messages to this stream
                            // until it reads it.
                            fences.raise(key, &ack_id, span);
                            sub.release(vec![ack_id]);
                            continue;
                        }
                        let deadline = Arc::new(AtomicI64::new(delivery.lease_deadline));
                        let started = Arc::new(AtomicBool::new(false));
                        let key = delivery.message.key.clone().filter(|k| !k.is_empty());
                        held.insert(ack_id.clone(), Held {
                            deadline: deadline.clone(),
                            span,
                            extend_at: Some(now + span / 2),
                            started: started.clone(),
                            key: key.clone(),
                        });
                        next_extension = earliest(next_extension, Some(now + span / 2));
                        // Start only with a tenth of the lease (at most a
                        // second) left: room for clock skew between broker
                        // and consumer.
                        let margin = (span / 10).min(1_000_000);
                        shared.waiting().push_back(Job { delivery, ack_id, deadline, margin, started, key });
                        // One new transaction per arrival at most: it takes
                        // this delivery, or joins it to a batch beginning.
                        start_batches(&shared, &mut workers, &mut tasks, self.config.concurrency, 1);
                    }
                    Some(Ok(Event::Malformed { ack_id, reason })) => {
                        if drain_until.is_some() {
                            continue;
                        }
                        counters.add(&counters.received, 1);
                        tracing::warn!(%ack_id, %reason, "malformed delivery; nacking it");
                        counters.add(&counters.errors, 1);
                        sub.nack(ack_id, None, reason);
                    }
                    Some(Ok(Event::Outcome(o))) => {
                        if matches!(o.operation, AckOperation::Nack | AckOperation::Release) {
                            fences.answered(&o.ack_id);
                        }
                        let extend_at = self.outcome(o, &mut held, &mut unconfirmed);
                        next_extension = earliest(next_extension, extend_at);
                    }
                    Some(Err(e)) => break Err(e),
                    None => break Err(Error::Unavailable("the subscription stream ended".into())),
                },
                () = sleep_until_opt(next_extension.map(instant_of)), if self.config.extend_leases && next_extension.is_some() => {
                    // Every lease due within the next tenth of a second
                    // goes in this request: one broker commit for all.
                    let soon = now_micros() + 100_000;
                    let mut due = Vec::new();
                    for (ack_id, h) in held.iter_mut() {
                        if h.extend_at.is_some_and(|t| t <= soon) {
                            h.extend_at = None;
                            let length = self
                                .config
                                .lease_extension
                                .unwrap_or(Duration::from_micros(h.span.unsigned_abs()));
                            due.push((ack_id.clone(), length));
                        }
                    }
                    sub.extend_all(due);
                    next_extension = held.values().filter_map(|h| h.extend_at).min();
                }
                _ = tick_opt(&mut prune_timer), if pruning.is_none() && drain_until.is_none() => {
                    pruning = Some(tokio::spawn(prune(
                        admin.clone(),
                        self.inbox.clone(),
                        self.subscription.clone(),
                        self.config.fallback_retention,
                        counters.clone(),
                    )));
                }
                _ = wait_opt(&mut pruning), if pruning.is_some() => {
                    pruning = None;
                }
            }
        };
        // Acks not sent yet go now (the stream may take them before it ends;
        // if not, those messages come again and are skipped as duplicates).
        while let Ok(ids) = early_acks.try_recv() {
            self.ack_early(&sub, ids, &mut held, &mut acks, &mut unconfirmed);
        }
        flush(&sub, &mut acks, &mut unconfirmed);
        // Batches still running are cancelled: their transactions roll back.
        workers.shutdown().await;
        if let Some(p) = pruning.take() {
            p.abort();
        }
        // A handler cancelled while it ran is a failed attempt (one that
        // never finishes must reach the dead letters in the end); its
        // message comes again at once. A delivery whose handler had not
        // started goes back without counting an attempt, as do those no
        // batch took (the stream ended).
        let mut release: Vec<String> = shared.waiting().drain(..).map(|j| j.ack_id).collect();
        for ack_id in tasks.values().flat_map(take_all) {
            match held.remove(&ack_id) {
                Some(h) if h.started.load(Ordering::Relaxed) => sub.nack(
                    ack_id,
                    Some(Duration::ZERO),
                    "the consumer stopped while the handler ran (shutdown_timeout)",
                ),
                Some(_) => release.push(ack_id),
                None => {}
            }
        }
        if !release.is_empty() {
            sub.release(release);
        }
        sub.close(CLOSE_TIMEOUT).await;
        let stats = counters.snapshot();
        tracing::info!(subscription = %self.subscription, ?stats, "consumer stopped");
        result.map(|()| stats)
    }

    /// Sends what a finished delivery calls for: an ack (collected in
    /// `acks`, sent as one batch), a nack, or nothing.
    fn settle(
        &self,
        sub: &crate::client::Subscription,
        ack_id: String,
        outcome: Outcome,
        acks: &mut Vec<String>,
        unconfirmed: &mut HashMap<String, Instant>,
    ) {
        let c = &self.counters;
        match outcome {
            Outcome::Processed => {
                c.add(&c.processed, 1);
                acks.push(ack_id);
            }
            Outcome::Duplicate => {
                c.add(&c.duplicates, 1);
                tracing::debug!(%ack_id, "duplicate delivery skipped: its id is in the inbox");
                acks.push(ack_id);
            }
            Outcome::Failed(reason) => {
                c.add(&c.failed, 1);
                tracing::debug!(%ack_id, %reason, "handler failed; rolled back and nacked");
                unconfirmed.insert(ack_id.clone(), Instant::now());
                sub.nack(ack_id, None, reason);
            }
            Outcome::Error(reason) => {
                c.add(&c.errors, 1);
                tracing::warn!(%ack_id, %reason, "inbox failed; rolled back and nacked");
                unconfirmed.insert(ack_id.clone(), Instant::now());
                sub.nack(ack_id, None, reason);
            }
            Outcome::Expired => {
                c.add(&c.expired, 1);
                tracing::warn!(%ack_id, "lease ended before the handler could start; the broker will redeliver it");
            }
            // Never handed to the handler: back to the broker without
            // counting an attempt.
            Outcome::Released => sub.release(vec![ack_id]),
            // Settled by `ack_early`.
            Outcome::Acked => {}
        }
    }

    /// Acks the duplicates a running batch found up front ([`Shared::early`]).
    fn ack_early(
        &self,
        sub: &crate::client::Subscription,
        ids: Vec<String>,
        held: &mut HashMap<String, Held>,
        acks: &mut Vec<String>,
        unconfirmed: &mut HashMap<String, Instant>,
    ) {
        for ack_id in ids {
            held.remove(&ack_id);
            self.settle(sub, ack_id, Outcome::Duplicate, acks, unconfirmed);
        }
    }

    /// Books the broker's answer to an ack, nack or extension; returns
    /// when an extended lease is to be extended next.
    fn outcome(
        &self,
        o: AckOutcome,
        held: &mut HashMap<String, Held>,
        unconfirmed: &mut HashMap<String, Instant>,
    ) -> Option<Micros> {
        let c = &self.counters;
        let (deadline, detail) = match &o.status {
            AckStatus::Ok(deadline) => (*deadline, ""),
            AckStatus::Stale(d) | AckStatus::Unknown(d) => (None, d.as_str()),
        };
        let ok = matches!(o.status, AckStatus::Ok(_));
        match o.operation {
            AckOperation::Ack => {
                unconfirmed.remove(&o.ack_id);
                if ok {
                    c.add(&c.acked, 1);
                } else {
                    c.add(&c.ack_refused, 1);
                    tracing::debug!(ack_id = %o.ack_id, %detail, "ack refused; the message will come again and be skipped as a duplicate");
                }
            }
            AckOperation::Nack => {
                unconfirmed.remove(&o.ack_id);
                if !ok {
                    tracing::debug!(ack_id = %o.ack_id, %detail, "nack refused");
                }
            }
            AckOperation::Release => {
                if !ok {
                    tracing::debug!(ack_id = %o.ack_id, %detail, "release refused");
                }
            }
            AckOperation::Extend => {
                let h = held.get_mut(&o.ack_id)?;
                match deadline {
                    Some(deadline) => {
                        h.deadline.store(deadline, Ordering::Relaxed);
                        let now = now_micros();
                        h.extend_at = Some(now + (deadline - now).max(0) / 2);
                        return h.extend_at;
                    }
                    None => {
                        // The lease is gone; a handler still running may
                        // commit, but its ack will be refused and the
                        // redelivery skipped as a duplicate.
                        h.extend_at = None;
                        tracing::warn!(ack_id = %o.ack_id, %detail, "lease extension refused: the lease was lost");
                    }
                }
            }
        }
        None
    }
}

/// Starts batches while deliveries wait and fewer than `concurrency`
/// transactions run, `most` at a time.
fn start_batches<DB: InboxDatabase, H: Handler<DB>>(
    shared: &Arc<Shared<DB, H>>,
    workers: &mut JoinSet<Batch>,
    tasks: &mut HashMap<tokio::task::Id, Taken>,
    concurrency: usize,
    most: usize,
) {
    let waiting = shared.waiting().len();
    let free = concurrency.saturating_sub(workers.len());
    for _ in 0..waiting.min(free).min(most) {
        let taken = Taken::default();
        let task = workers.spawn(process_batch(shared.clone(), taken.clone()));
        tasks.insert(task.id(), taken);
    }
}

/// The ack ids a batch took (emptied: each is settled once).
fn take_all(taken: &Taken) -> Vec<String> {
    std::mem::take(&mut *taken.lock().unwrap_or_else(PoisonError::into_inner))
}

/// Runs one batch: takes the first waiting delivery, begins, takes what
/// else waits then (up to `max_batch` in all), records their ids, runs
/// their handlers and commits once.
///
/// How the handlers are kept apart is [`BatchIsolation`]: each in its own
/// savepoint, or, while handlers succeed, none. A handler that fails in a
/// batch without savepoints rolls the whole transaction back; the batch
/// then runs again in a new one, each delivery in its savepoint, the
/// failed one left out (nacked with its first failure).
async fn process_batch<DB: InboxDatabase, H: Handler<DB>>(
    shared: Arc<Shared<DB, H>>,
    taken: Taken,
) -> Batch {
    let mut jobs = shared.take(1, &taken);
    if jobs.is_empty() {
        // Another batch took it.
        return Batch::default();
    }
    let bound = shared.database_timeout;
    let mut tx = match bounded(bound, "begin", shared.inbox.begin()).await {
        Ok(tx) => tx,
        Err(e) => return Batch::failed(jobs, &e.to_string()),
    };
    jobs.extend(shared.take(shared.max_batch - 1, &taken));
    tracing::debug!(deliveries = jobs.len(), "inbox batch began");
    let ids: Vec<String> = jobs
        .iter()
        .map(|j| j.delivery.message.id.to_string())
        .collect();
    let mut settled: Vec<Option<Outcome>> = vec![None; jobs.len()];
    let new_ids = match record_batch(&shared, &mut tx, &jobs, &ids, &settled).await {
        Ok(new_ids) => new_ids,
        Err(e) => {
            rollback(tx, bound).await;
            return Batch::failed(jobs, &format!("inbox transaction failed: {e}"));
        }
    };
    // Each id recorded before the batch began is a duplicate whose row
    // committed then (the INSERT waits for a transaction still holding
    // one): its first delivery here is acked at once.
    let mut distinct = HashSet::with_capacity(jobs.len());
    let mut early = Vec::new();
    for ((job, id), settled) in jobs.iter().zip(&ids).zip(&mut settled) {
        if distinct.insert(id.as_str()) && !new_ids.contains(id) {
            *settled = Some(Outcome::Acked);
            early.push(job.ack_id.clone());
        }
    }
    if !early.is_empty() {
        // The main loop outlives every batch task it awaits.
        let _ = shared.early.send(early);
    }
    // A batch that holds an id twice (a redelivery that came while the
    // first delivery waited) needs a savepoint around the first: whether
    // the second runs depends on whether the first's work stays.
    let savepoints = distinct.len() < jobs.len() || !shared.optimistic();
    let batch = run_batch(&shared, tx, &jobs, &ids, &new_ids, &settled, savepoints).await;
    let (index, outcome) = match batch {
        Ok(batch) => return batch,
        Err(failed) => failed,
    };
    shared.fail_optimism();
    settled[index] = Some(outcome);
    if settled.iter().all(Option::is_some) {
        // The failed delivery was the only one to run.
        return Batch::settled(&jobs, settled, "nothing to run");
    }
    tracing::debug!(
        deliveries = jobs.len(),
        "a handler failed in an inbox batch without savepoints; the batch runs again with them"
    );
    let again = async {
        let mut tx = bounded(bound, "begin", shared.inbox.begin()).await?;
        let new_ids = match record_batch(&shared, &mut tx, &jobs, &ids, &settled).await {
            Ok(new_ids) => new_ids,
            Err(e) => {
                rollback(tx, bound).await;
                return Err(e);
            }
        };
        let mut batch = match run_batch(&shared, tx, &jobs, &ids, &new_ids, &settled, true).await {
            Ok(batch) => batch,
            // With savepoints a failure rolls back to its own; this is
            // never reached, and would leave the batch to redelivery.
            Err(_) => Batch::settled(&jobs, settled.clone(), "inbox batch failed twice"),
        };
        batch.reran = true;
        Ok(batch)
    };
    match again.await {
        Ok(batch) => batch,
        Err(e) => Batch::settled(&jobs, settled, &format!("inbox transaction failed: {e}")),
    }
}

/// Records the ids of a batch's deliveries that are not `settled` in one
/// statement, in id order (two batches holding the same ids take their
/// locks in one order); returns those that were new. The others were
/// processed before. An id the batch holds twice is recorded once here;
/// its later deliveries record it in their own savepoint, once the
/// earlier one's fate is known.
async fn record_batch<DB: InboxDatabase, H>(
    shared: &Shared<DB, H>,
    tx: &mut Transaction<'static, DB>,
    jobs: &[Job],
    ids: &[String],
    settled: &[Option<Outcome>],
) -> Result<HashSet<String>> {
    let mut upfront: Vec<(&str, i64)> = jobs
        .iter()
        .zip(ids)
        .zip(settled)
        .filter(|(_, s)| s.is_none())
        .map(|((j, id), _)| (id.as_str(), j.delivery.message.sequence))
        .collect();
    upfront.sort_unstable();
    upfront.dedup_by(|a, b| a.0 == b.0);
    let record = Inbox::<DB>::record_all(tx, &shared.subscription, &upfront);
    bounded(shared.database_timeout, "recording the message ids", record).await
}

/// Runs a batch's handlers in `tx`, where `new_ids` are the ids recorded
/// up front, and commits. Deliveries with a `settled` outcome do not run.
/// With `savepoints` each delivery runs in its own, and a failing one
/// rolls back alone. Without, the first whose handler fails (or whose id
/// could not be recorded) rolls the transaction back and comes back as
/// `Err` (its index and outcome), for the batch to run again.
async fn run_batch<DB: InboxDatabase, H: Handler<DB>>(
    shared: &Shared<DB, H>,
    mut tx: Transaction<'static, DB>,
    jobs: &[Job],
    ids: &[String],
    new_ids: &HashSet<String>,
    settled: &[Option<Outcome>],
    savepoints: bool,
) -> std::result::Result<Batch, (usize, Outcome)> {
    let bound = shared.database_timeout;
    let mut outcomes = Vec::with_capacity(jobs.len());
    // How long each handler that ran took, for the latency histogram.
    let mut ran = Vec::with_capacity(jobs.len());
    // Whether the previous delivery's savepoint is still open: it is
    // released together with the next one's opening, or by the commit.
    let mut open = false;
    // Keys whose delivery failed here: their later deliveries in the batch
    // do not run (an ordered subscription would refuse their acks, and
    // their effects would come before the failed one's).
    let mut failed_keys: HashSet<&str> = HashSet::new();
    // Ids this batch has met, and the rows recorded up front whose
    // delivery's work is not to stay: deleted before a later delivery of
    // the same id records it, and before the commit.
    let mut met: HashSet<&str> = HashSet::with_capacity(jobs.len());
    let mut forget: Vec<String> = Vec::new();
    for (index, (job, id)) in jobs.iter().zip(ids).enumerate() {
        let first = met.insert(id);
        if let Some(outcome) = &settled[index] {
            if let Some(key) = job.key.as_deref().filter(|_| !outcome.keeps()) {
                failed_keys.insert(key);
            }
            outcomes.push((job.ack_id.clone(), outcome.clone()));
            continue;
        }
        let recorded = first && new_ids.contains(id);
        if first && !recorded {
            // Recorded by a transaction that committed after this batch
            // first recorded its ids (the batch is running again): acked
            // once this one commits.
            outcomes.push((job.ack_id.clone(), Outcome::Duplicate));
            continue;
        }
        if shared.stopping.load(Ordering::Relaxed)
            || job.key.as_deref().is_some_and(|k| failed_keys.contains(k))
        {
            if recorded {
                forget.push(id.clone());
            }
            outcomes.push((job.ack_id.clone(), Outcome::Released));
            continue;
        }
        let step = match (savepoints, open) {
            (false, _) => None,
            (true, true) => Some(Savepoint::ReleaseAndOpen),
            (true, false) => Some(Savepoint::Open),
        };
        let runs_before = ran.len();
        let processed = async {
            if !recorded {
                let pending = std::mem::take(&mut forget);
                let flush = Inbox::<DB>::forget_all(&mut tx, &shared.subscription, &pending);
                bounded(bound, "forgetting ids", flush).await?;
            }
            process(shared, &mut tx, step, recorded, job, &mut ran).await
        };
        let fatal = match processed.await {
            Ok((outcome, Keep::Yes)) => {
                open = savepoints;
                outcomes.push((job.ack_id.clone(), outcome));
                continue;
            }
            Ok((outcome, Keep::No)) if !savepoints => {
                // The batch's other work is in the same transaction: all
                // of it goes, and the batch runs again.
                rollback(tx, bound).await;
                // The failed handler's run is booked; the others run again
                // and are booked then.
                observe(&shared.handler_latency, &ran[runs_before..], Duration::ZERO);
                return Err((index, outcome));
            }
            Ok((outcome, keep)) => {
                if recorded {
                    forget.push(id.clone());
                }
                if let Some(key) = &job.key {
                    failed_keys.insert(key);
                }
                outcomes.push((job.ack_id.clone(), outcome));
                if matches!(keep, Keep::Untouched) {
                    continue;
                }
                open = false;
                let undo = Inbox::<DB>::savepoint(&mut tx, Savepoint::Undo);
                match bounded(bound, "rollback to savepoint", undo).await {
                    Ok(()) => continue,
                    Err(e) => e,
                }
            }
            Err(e) => {
                outcomes.push((job.ack_id.clone(), Outcome::Error(e.to_string())));
                e
            }
        };
        // The transaction is unusable: nothing of it will commit.
        rollback(tx, bound).await;
        let reason = format!("inbox transaction failed: {fatal}");
        let rest = Batch::settled(&jobs[index + 1..], settled[index + 1..].to_vec(), &reason);
        let mut outcomes = fail_kept(outcomes, &reason);
        outcomes.extend(rest.outcomes);
        observe(&shared.handler_latency, &ran, Duration::ZERO);
        return Ok(Batch {
            outcomes,
            ..Batch::default()
        });
    }
    let keeps = outcomes
        .iter()
        .any(|(_, o)| matches!(o, Outcome::Processed | Outcome::Duplicate));
    let started = std::time::Instant::now();
    let committed = if keeps {
        let finish = async {
            Inbox::<DB>::forget_all(&mut tx, &shared.subscription, &forget).await?;
            // A handler that caught a failed statement and returned Ok
            // leaves a PostgreSQL transaction aborted, and COMMIT then
            // rolls back without an error: any statement fails instead.
            Inbox::<DB>::check_alive(&mut tx).await?;
            Ok(tx.commit().await?)
        };
        match bounded(bound, "commit", finish).await {
            Ok(()) => true,
            // Whether it committed is unknown; the redeliveries find out.
            Err(e) => {
                outcomes = fail_kept(outcomes, &format!("inbox commit failed: {e}"));
                false
            }
        }
    } else {
        rollback(tx, bound).await;
        false
    };
    observe(&shared.handler_latency, &ran, started.elapsed());
    if committed {
        tracing::debug!(deliveries = outcomes.len(), "inbox batch committed");
    }
    Ok(Batch {
        outcomes,
        committed,
        reran: false,
    })
}

/// Whether a delivery's work stays in the batch's transaction.
enum Keep {
    Yes,
    /// Roll back to its savepoint.
    No,
    /// No savepoint was opened for it: nothing to keep or undo.
    Untouched,
}

/// Processes one delivery of a batch inside its savepoint, which `step`
/// opens (`None`: no savepoint): record (unless `recorded` up front),
/// check the lease, handle. An `Err` leaves the transaction unusable.
async fn process<DB: InboxDatabase, H: Handler<DB>>(
    shared: &Shared<DB, H>,
    tx: &mut Transaction<'static, DB>,
    step: Option<Savepoint>,
    recorded: bool,
    job: &Job,
    ran: &mut Vec<Duration>,
) -> Result<(Outcome, Keep)> {
    let message = &job.delivery.message;
    // The id is ours (recorded) until this transaction ends: a redelivery
    // elsewhere would wait for it. But if the lease ended before we had
    // it, the message may have been redelivered, processed, acked and its
    // row pruned already, so running the handler could repeat its effects.
    let expired = || now_micros() + job.margin >= job.deadline.load(Ordering::Relaxed);
    if recorded {
        if expired() {
            return Ok((Outcome::Expired, Keep::Untouched));
        }
        if let Some(step) = step {
            let open = Inbox::<DB>::savepoint(tx, step);
            bounded(shared.database_timeout, "opening a savepoint", open).await?;
        }
    } else {
        let subscription = &shared.subscription;
        let record = async {
            match step {
                Some(step) => {
                    Inbox::<DB>::open_and_record(
                        tx,
                        step,
                        subscription,
                        message.id,
                        message.sequence,
                    )
                    .await
                }
                None => Ok(Inbox::record(tx, subscription, message.id, message.sequence).await),
            }
        };
        match bounded(shared.database_timeout, "recording the message id", record).await? {
            Ok(Recorded::New) => {}
            // Nothing was written.
            Ok(Recorded::Duplicate) => return Ok((Outcome::Duplicate, Keep::Yes)),
            // PostgreSQL aborts the transaction on an error; rolling back
            // to the savepoint revives it for the batch's other deliveries.
            Err(e) => return Ok((Outcome::Error(e.to_string()), Keep::No)),
        }
        if expired() {
            return Ok((Outcome::Expired, Keep::No));
        }
    }
    job.started.store(true, Ordering::Relaxed);
    let started = std::time::Instant::now();
    let span = crate::trace::handler_span(&shared.subscription, &job.delivery);
    let result = shared
        .handler
        .handle(&job.delivery, tx)
        .instrument(span)
        .await;
    ran.push(started.elapsed());
    Ok(match result {
        Ok(()) => (Outcome::Processed, Keep::Yes),
        Err(e) => (Outcome::Failed(e.to_string()), Keep::No),
    })
}

impl Batch {
    /// Every delivery of `jobs` failed in the inbox with `reason`.
    fn failed(jobs: impl IntoIterator<Item = Job>, reason: &str) -> Batch {
        Batch::failed_ids(jobs.into_iter().map(|j| j.ack_id), reason)
    }

    /// Every delivery of `ack_ids` failed in the inbox with `reason`.
    fn failed_ids(ack_ids: impl IntoIterator<Item = String>, reason: &str) -> Batch {
        Batch {
            outcomes: ack_ids
                .into_iter()
                .map(|a| (a, Outcome::Error(reason.to_owned())))
                .collect(),
            committed: false,
            reran: false,
        }
    }

    /// The outcomes `settled` gave `jobs`; those without one failed in the
    /// inbox with `reason`.
    fn settled(jobs: &[Job], settled: Vec<Option<Outcome>>, reason: &str) -> Batch {
        Batch {
            outcomes: jobs
                .iter()
                .zip(settled)
                .map(|(j, s)| {
                    let outcome = s.unwrap_or_else(|| Outcome::Error(reason.to_owned()));
                    (j.ack_id.clone(), outcome)
                })
                .collect(),
            ..Batch::default()
        }
    }
}

/// The outcomes of a transaction that did not commit: what would have been
/// acked fails with `reason` instead.
fn fail_kept(outcomes: Vec<(String, Outcome)>, reason: &str) -> Vec<(String, Outcome)> {
    outcomes
        .into_iter()
        .map(|(ack_id, o)| match o {
            Outcome::Processed | Outcome::Duplicate => (ack_id, Outcome::Error(reason.to_owned())),
            o => (ack_id, o),
        })
        .collect()
}

/// Books each handler's run time plus its batch's `commit` time.
fn observe(histogram: &Histogram, ran: &[Duration], commit: Duration) {
    for d in ran {
        histogram.observe((*d + commit).as_secs_f64());
    }
}

/// Runs one of the runtime's database steps within `bound`; past it the
/// step fails with `Unavailable` naming it (the connection is dropped with
/// the future, so it is never waited on again).
async fn bounded<T>(
    bound: Duration,
    step: &str,
    work: impl Future<Output = Result<T>>,
) -> Result<T> {
    match tokio::time::timeout(bound, work).await {
        Ok(result) => result,
        Err(_) => Err(Error::Unavailable(format!(
            "the inbox database did not complete the {step} within {bound:?} \
             (database_timeout); the message will be redelivered"
        ))),
    }
}

async fn rollback<DB: InboxDatabase>(tx: Transaction<'static, DB>, bound: Duration) {
    match tokio::time::timeout(bound, tx.rollback()).await {
        Ok(Ok(())) => {}
        // The connection is closed then, which ends the transaction too.
        Ok(Err(e)) => tracing::debug!(error = %e, "inbox rollback failed"),
        Err(_) => tracing::debug!("inbox rollback timed out; the connection is dropped"),
    }
}

/// One pruning round: by the broker's watermark, or by age if the broker
/// will not tell it and a fallback retention is set.
async fn prune<DB: InboxDatabase>(
    admin: Admin,
    inbox: Inbox<DB>,
    subscription: String,
    fallback_retention: Option<Duration>,
    counters: Arc<Counters>,
) {
    let pruned = match admin.stats(&subscription).await {
        Ok(stats) => {
            counters
                .watermark
                .store(stats.ack_watermark, Ordering::Relaxed);
            inbox
                .prune_through(&subscription, stats.ack_watermark)
                .await
        }
        // The broker refuses to tell (no admin permission, or it predates
        // the watermark).
        Err(e @ Error::FailedPrecondition(_)) => match fallback_retention {
            Some(age) => inbox.prune_older_than(&subscription, age).await,
            None => {
                tracing::warn!(%subscription, error = %e, "cannot read the ack watermark and no fallback retention is set; the inbox is not pruned");
                return;
            }
        },
        Err(e) => {
            // The broker is unreachable: nothing is delivered meanwhile
            // either, so the inbox does not grow; try again next round.
            tracing::debug!(%subscription, error = %e, "ack watermark unavailable; pruning skipped this round");
            return;
        }
    };
    match pruned {
        Ok(n) => {
            counters.pruned.fetch_add(n, Ordering::Relaxed);
            counters.add(&counters.prune_rounds, 1);
            if n > 0 {
                tracing::debug!(%subscription, rows = n, "inbox pruned");
            }
        }
        Err(e) => tracing::warn!(%subscription, error = %e, "inbox pruning failed"),
    }
}

/// The earlier of two optional times.
fn earliest(a: Option<Micros>, b: Option<Micros>) -> Option<Micros> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The monotonic instant of a Unix-µs wall-clock time.
fn instant_of(at: Micros) -> Instant {
    let ahead = at.saturating_sub(now_micros()).max(0);
    Instant::now() + Duration::from_micros(ahead.unsigned_abs())
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

async fn tick_opt(timer: &mut Option<tokio::time::Interval>) {
    match timer {
        Some(t) => {
            t.tick().await;
        }
        None => std::future::pending().await,
    }
}

async fn wait_opt(task: &mut Option<JoinHandle<()>>) {
    match task {
        Some(t) => {
            let _ = t.await;
        }
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_size_of_zero_is_refused() {
        let config = ConsumerConfig {
            max_batch: 0,
            ..ConsumerConfig::default()
        };
        assert!(matches!(config.check(), Err(Error::InvalidArgument(_))));
        assert!(ConsumerConfig::default().check().is_ok());
    }

    #[test]
    fn the_window_lets_every_transaction_take_a_full_batch() {
        let config = ConsumerConfig {
            concurrency: 4,
            max_batch: 32,
            prefetch: 8,
            ..ConsumerConfig::default()
        };
        assert_eq!(config.window(), 4 * 32 + 8);
        let one = ConsumerConfig {
            max_batch: 1,
            ..config.clone()
        };
        assert_eq!(one.window(), 4 + 8, "one message per transaction");
        let huge = ConsumerConfig {
            concurrency: usize::MAX,
            ..config
        };
        assert_eq!(huge.window(), usize::MAX);
    }
}

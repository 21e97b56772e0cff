//! The consumer runtime: subscribes to a subscription and runs a [`Handler`]
//! for each delivery inside an inbox transaction, so that the handler's
//! database effects happen once per message id (G5).
//!
//! For each delivery: begin a transaction in the consumer's database, record
//! the message id in `tidings_inbox` (a conflict means a duplicate: skip the
//! handler), run the handler with that transaction, commit, then ack. A
//! handler error rolls back and nacks with the error text as reason and no
//! delay, so the subscription's backoff applies. Handlers run at most
//! [`ConsumerConfig::concurrency`] at a time; leases are extended while they
//! run; a periodic task prunes the inbox by the broker's `ack_watermark`.
//!
//! Per-key order comes from the broker: an ordered subscription leases the
//! next message of a key only after the previous one is acked, and the ack
//! is sent only after the commit.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use crate::client::{Admin, Backoff, Connection, Event, FlowControl, Subscriber};
use crate::config;
use crate::error::{Error, Result};
use crate::inbox::{Inbox, InboxDatabase, Recorded};
use crate::model::{AckOperation, AckOutcome, AckStatus, Delivery, Micros, now_micros};
use prometheus_client::metrics::histogram::Histogram;
use sqlx::Transaction;
use tokio::sync::{Notify, Semaphore};
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
    /// Most handlers running at once (default 8). On SQLite, whose one
    /// writer the inbox transaction takes at its start, handlers' database
    /// work runs one at a time whatever this says.
    pub concurrency: usize,
    /// Deliveries held beyond those being handled (default 8), so that
    /// handlers never wait for the broker: a slot on the stream frees only
    /// when the broker has committed its ack. The stream's flow control is
    /// `concurrency + prefetch` messages; their leases are extended while
    /// they wait.
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
}

impl Default for ConsumerConfig {
    fn default() -> Self {
        ConsumerConfig {
            concurrency: 8,
            prefetch: 8,
            extend_leases: true,
            lease_extension: None,
            shutdown_timeout: Duration::from_secs(30),
            prune_interval: Some(Duration::from_secs(60)),
            fallback_retention: None,
            reconnect: Backoff::default(),
            database_timeout: Duration::from_secs(10),
        }
    }
}

impl ConsumerConfig {
    /// Checks the settings before a consumer runs with them.
    ///
    /// Fails with `InvalidArgument` for a concurrency of zero, a zero prune
    /// interval or lease extension, or a duration longer than
    /// [`config::MAX_DURATION`](crate::config::MAX_DURATION).
    pub fn check(&self) -> Result<()> {
        if self.concurrency == 0 {
            return Err(Error::InvalidArgument(
                "consumer concurrency must be at least 1".into(),
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
        self.reconnect.check("consumer reconnect")
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
    /// unreachable): rolled back and nacked.
    pub errors: u64,
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
    expired: AtomicU64,
    acked: AtomicU64,
    ack_refused: AtomicU64,
    pruned: AtomicU64,
    prune_rounds: AtomicU64,
    watermark: AtomicI64,
    changed: Notify,
    /// Seconds each handler ran (its commit included), for metrics.
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
enum Outcome {
    /// Committed: ack.
    Processed,
    /// Recorded before: ack.
    Duplicate,
    /// The handler failed: nack with this reason.
    Failed(String),
    /// The inbox failed: nack with this reason.
    Error(String),
    /// The lease ended before the handler could start: leave it.
    Expired,
    /// Shutdown came before the handler started: leave it to the release.
    Released,
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
}

struct Shared<DB: InboxDatabase, H> {
    inbox: Inbox<DB>,
    handler: Arc<H>,
    subscription: String,
    permits: Semaphore,
    /// [`ConsumerConfig::database_timeout`].
    database_timeout: Duration,
    handler_latency: Histogram,
}

/// Most acks sent in one request.
const ACK_BATCH: usize = 500;

/// Longest an ack waits for others to share its request.
const ACK_DELAY: Duration = Duration::from_millis(2);
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
        let window = self.config.concurrency + self.config.prefetch;
        let flow = FlowControl {
            max_messages: i32::try_from(window).unwrap_or(i32::MAX),
            ..FlowControl::default()
        };
        let mut sub = Subscriber::new(&self.connection, self.config.reconnect)
            .subscribe(&self.subscription, flow);
        let shared = Arc::new(Shared {
            inbox: self.inbox.clone(),
            handler: self.handler.clone(),
            subscription: self.subscription.clone(),
            permits: Semaphore::new(self.config.concurrency),
            database_timeout: self.config.database_timeout,
            handler_latency: self.counters.handler_latency.clone(),
        });
        let admin = Admin::new(&self.connection);
        let counters = self.counters.clone();
        tracing::info!(subscription = %self.subscription, concurrency = self.config.concurrency, "consumer started");

        let mut workers: JoinSet<Outcome> = JoinSet::new();
        let mut tasks: HashMap<tokio::task::Id, String> = HashMap::new();
        let mut held: HashMap<String, Held> = HashMap::new();
        let mut unconfirmed: HashMap<String, Instant> = HashMap::new();
        let mut prune_timer = self.config.prune_interval.map(tokio::time::interval);
        let mut pruning: Option<JoinHandle<()>> = None;
        let mut drain_until: Option<Instant> = None;
        // Acks wait up to ACK_DELAY to go as one request: the broker's
        // session commits a stream's requests one after the other.
        let mut acks: Vec<String> = Vec::new();
        let mut flush_at: Option<Instant> = None;
        tokio::pin!(shutdown);

        let result = loop {
            if drain_until.is_some()
                && workers.is_empty()
                && unconfirmed.is_empty()
                && acks.is_empty()
            {
                break Ok(());
            }
            let next_extension = if self.config.extend_leases {
                held.values().filter_map(|h| h.extend_at).min()
            } else {
                None
            };
            tokio::select! {
                () = &mut shutdown, if drain_until.is_none() => {
                    tracing::info!(subscription = %self.subscription, running = workers.len(), "consumer shutting down");
                    drain_until = Some(Instant::now() + self.config.shutdown_timeout);
                    // Handlers not started yet give up their message: it
                    // is released, without counting an attempt.
                    shared.permits.close();
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
                Some(joined) = workers.join_next_with_id(), if !workers.is_empty() => {
                    let mut next = Some(joined);
                    while let Some(joined) = next {
                        let (id, outcome) = match joined {
                            Ok((id, outcome)) => (id, outcome),
                            Err(e) => {
                                let reason = if e.is_panic() { "handler panicked" } else { "handler cancelled" };
                                (e.id(), Outcome::Error(reason.into()))
                            }
                        };
                        if let Some(ack_id) = tasks.remove(&id) {
                            held.remove(&ack_id);
                            self.settle(&sub, ack_id, outcome, &mut acks, &mut unconfirmed);
                        }
                        next = workers.try_join_next_with_id();
                    }
                    if acks.len() >= ACK_BATCH {
                        flush(&sub, &mut acks, &mut unconfirmed);
                        flush_at = None;
                    } else if !acks.is_empty() && flush_at.is_none() {
                        flush_at = Some(Instant::now() + ACK_DELAY);
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
                        let deadline = Arc::new(AtomicI64::new(delivery.lease_deadline));
                        held.insert(ack_id.clone(), Held {
                            deadline: deadline.clone(),
                            span,
                            extend_at: Some(now + span / 2),
                        });
                        // Start only with a tenth of the lease (at most a
                        // second) left: room for clock skew between broker
                        // and consumer.
                        let margin = (span / 10).min(1_000_000);
                        let task = workers.spawn(process(shared.clone(), delivery, deadline, margin));
                        tasks.insert(task.id(), ack_id);
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
                    Some(Ok(Event::Outcome(o))) => self.outcome(o, &mut held, &mut unconfirmed),
                    Some(Err(e)) => break Err(e),
                    None => break Err(Error::Unavailable("the subscription stream ended".into())),
                },
                () = sleep_until_opt(next_extension.map(instant_of)), if next_extension.is_some() => {
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
        flush(&sub, &mut acks, &mut unconfirmed);
        // Handlers still running are cancelled: their transactions roll back.
        workers.shutdown().await;
        if let Some(p) = pruning.take() {
            p.abort();
        }
        // A handler cancelled while it ran is a failed attempt (one that
        // never finishes must reach the dead letters in the end); its
        // message comes again at once.
        for ack_id in tasks.into_values() {
            sub.nack(
                ack_id,
                Some(Duration::ZERO),
                "the consumer stopped while the handler ran (shutdown_timeout)",
            );
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
        }
    }

    /// Books the broker's answer to an ack, nack or extension.
    fn outcome(
        &self,
        o: AckOutcome,
        held: &mut HashMap<String, Held>,
        unconfirmed: &mut HashMap<String, Instant>,
    ) {
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
                let Some(h) = held.get_mut(&o.ack_id) else {
                    return;
                };
                match deadline {
                    Some(deadline) => {
                        h.deadline.store(deadline, Ordering::Relaxed);
                        let now = now_micros();
                        h.extend_at = Some(now + (deadline - now).max(0) / 2);
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
    }
}

/// Processes one delivery: begin, record, check the lease, handle, commit.
async fn process<DB: InboxDatabase, H: Handler<DB>>(
    shared: Arc<Shared<DB, H>>,
    delivery: Delivery,
    deadline: Arc<AtomicI64>,
    margin: i64,
) -> Outcome {
    let Ok(_permit) = shared.permits.acquire().await else {
        return Outcome::Released;
    };
    let bound = shared.database_timeout;
    let mut tx = match bounded(bound, "begin", shared.inbox.begin()).await {
        Ok(tx) => tx,
        Err(e) => return Outcome::Error(e.to_string()),
    };
    let message = &delivery.message;
    let record = Inbox::<DB>::record(&mut tx, &shared.subscription, message.id, message.sequence);
    match bounded(bound, "recording the message id", record).await {
        Ok(Recorded::New) => {}
        Ok(Recorded::Duplicate) => {
            rollback(tx, bound).await;
            return Outcome::Duplicate;
        }
        Err(e) => {
            rollback(tx, bound).await;
            return Outcome::Error(e.to_string());
        }
    }
    // The id is ours until this transaction ends: a redelivery elsewhere
    // would wait for it. But if the lease ended before we had it, the
    // message may have been redelivered, processed, acked and its row
    // pruned already, so running the handler could repeat its effects.
    if now_micros() + margin >= deadline.load(Ordering::Relaxed) {
        rollback(tx, bound).await;
        return Outcome::Expired;
    }
    let started = std::time::Instant::now();
    let span = crate::trace::handler_span(&shared.subscription, &delivery);
    let outcome = match shared
        .handler
        .handle(&delivery, &mut tx)
        .instrument(span)
        .await
    {
        Ok(()) => match bounded(bound, "commit", async { Ok(tx.commit().await?) }).await {
            Ok(()) => Outcome::Processed,
            // Whether it committed is unknown; a redelivery finds out.
            Err(e) => Outcome::Error(format!("inbox commit failed: {e}")),
        },
        Err(e) => {
            let reason = e.to_string();
            rollback(tx, bound).await;
            Outcome::Failed(reason)
        }
    };
    shared
        .handler_latency
        .observe(started.elapsed().as_secs_f64());
    outcome
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

//! Durable storage: the `Store` handle and its configuration. Only this module
//! contains SQL; each backend's SQL lives in its own file beside its
//! migrations under `migrations/`.
//!
//! Writes go through one writer task per store which batches whatever
//! operations are queued into one transaction (group commit) and answers each
//! caller only after that transaction committed. Reads go to a small pool of
//! read connections.

#[macro_use]
mod statements;
mod backend;
mod common;
mod counts;
#[cfg(feature = "sqlite")]
mod datadir;
mod held;
#[cfg(feature = "postgres")]
pub(crate) mod listener;
mod plan;
#[cfg(feature = "postgres")]
mod postgres;
mod reader;
mod routes;
#[cfg(feature = "sqlite")]
mod sqlite;
mod sweep;
mod writer;

pub(crate) use common::LogLimit;
#[cfg(feature = "fuzzing")]
pub(crate) use common::{decode_attributes, encode_attributes};

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};

use crate::error::{Error, Result};
use crate::model::{
    AckId, AckStatus, DeadLetter, Delivery, Micros, NackItem, NewMessage, PeekedMessage,
    PublishOutcome, SeekTarget, Subscription, SubscriptionStats, Topic, TopicSettings,
};
pub use crate::model::{NewSubscription, SubscriptionPatch, TopicPatch};
pub use counts::{
    StoreCounters, StoreGauges, SubscriptionCounts, SubscriptionGauges, TopicCounts, TopicGauges,
};
pub use routes::{Route, Routes};

/// What a caller hears when the writer dropped its request unanswered: its
/// group ran past the commit timeout while running it, or the writer
/// stopped. A publish is safe to retry (ids deduplicate).
const UNCONFIRMED: &str = "storage did not confirm the request (the database stopped \
     answering, or the writer stopped); it may or may not have been committed; retry";

/// Operations the writer's queue holds before callers wait to queue.
const QUEUE_CAPACITY: usize = 4096;

/// Where the broker keeps its data: one choice, so that a URL can never
/// silently override a folder.
#[derive(Clone, PartialEq, Eq)]
pub enum Storage {
    /// The embedded default: SQLite in this folder (created if missing),
    /// owned by one broker.
    Sqlite(PathBuf),
    /// PostgreSQL at this `postgres://` URL, shared by several broker
    /// instances.
    Postgres(String),
}

impl std::fmt::Debug for Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Storage::Sqlite(dir) => f.debug_tuple("Sqlite").field(dir).finish(),
            // The URL may carry a password.
            Storage::Postgres(url) => f.debug_tuple("Postgres").field(&redact(url)).finish(),
        }
    }
}

/// How the store keeps its data.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// The database.
    pub storage: Storage,
    /// Fsync every commit (SQLite's `synchronous=FULL`). Turning it off keeps
    /// the database consistent but may lose the last commits on power loss.
    pub fsync: bool,
    /// How long a published id is remembered for deduplication.
    pub dedup_window: Duration,
    /// How often acked and expired messages are removed and leases swept.
    pub maintenance_interval: Duration,
    /// Most operations' weight (messages, acks) in one group commit.
    pub max_batch: usize,
    /// PostgreSQL: the server cancels a statement that runs longer
    /// (`statement_timeout`) or waits longer for a lock (`lock_timeout`).
    pub statement_timeout: Duration,
    /// Longest a group commit (BEGIN to COMMIT) or one read may take. Past
    /// it the writer fails the group's callers with `Unavailable`, turns
    /// health NOT_SERVING and replaces its connection, which it no longer
    /// trusts; on PostgreSQL a session idle in a transaction for this long
    /// is ended by the server (`idle_in_transaction_session_timeout`), so
    /// the locks of an abandoned group are released. This is what notices a
    /// silently dead link, where nothing ever answers or resets.
    pub commit_timeout: Duration,
    /// PostgreSQL: longest a new connection, or a pooled read connection,
    /// may take to be had.
    pub connect_timeout: Duration,
    /// PostgreSQL: when the connection listening for other instances'
    /// NOTIFYs heard nothing for this long, a ping is sent on its channel;
    /// if it is not back within `commit_timeout`, the connection is
    /// replaced (a frozen link would otherwise leave wake-ups to polling
    /// for ever, without a word).
    pub listen_check_interval: Duration,
    /// SQLite: bytes of disk kept in reserve (the file `tidings.reserve` in
    /// the data directory). When the disk fills, the broker gives the
    /// reserve up so that acks, deletions and checkpoints can go on, and
    /// refuses publishes with `ResourceExhausted` until space is back; then
    /// it makes the reserve again. 0 keeps no reserve (publishes are still
    /// refused while the disk is full).
    pub disk_reserve: u64,
}

/// Default of [`StoreConfig::dedup_window`]: 7 days.
pub const DEFAULT_DEDUP_WINDOW: Duration = Duration::from_secs(7 * 24 * 3600);
/// Default of [`StoreConfig::maintenance_interval`].
pub const DEFAULT_MAINTENANCE_INTERVAL: Duration = Duration::from_secs(1);
/// Default of [`StoreConfig::max_batch`].
pub const DEFAULT_MAX_BATCH: usize = 20_000;
/// Default of [`StoreConfig::statement_timeout`].
pub const DEFAULT_STATEMENT_TIMEOUT: Duration = Duration::from_secs(5);
/// Default of [`StoreConfig::commit_timeout`].
pub const DEFAULT_COMMIT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default of [`StoreConfig::connect_timeout`].
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Default of [`StoreConfig::listen_check_interval`].
pub const DEFAULT_LISTEN_CHECK_INTERVAL: Duration = Duration::from_secs(10);
/// Default of [`StoreConfig::disk_reserve`]: 64 MiB.
pub const DEFAULT_DISK_RESERVE: u64 = 64 << 20;

impl StoreConfig {
    /// Defaults for SQLite in a data directory.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        StoreConfig::on(Storage::Sqlite(data_dir.into()))
    }

    /// Defaults for PostgreSQL at `url`.
    pub fn postgres(url: impl Into<String>) -> Self {
        StoreConfig::on(Storage::Postgres(url.into()))
    }

    /// Defaults for `storage`.
    pub fn on(storage: Storage) -> Self {
        StoreConfig {
            storage,
            fsync: true,
            dedup_window: DEFAULT_DEDUP_WINDOW,
            maintenance_interval: DEFAULT_MAINTENANCE_INTERVAL,
            max_batch: DEFAULT_MAX_BATCH,
            statement_timeout: DEFAULT_STATEMENT_TIMEOUT,
            commit_timeout: DEFAULT_COMMIT_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            listen_check_interval: DEFAULT_LISTEN_CHECK_INTERVAL,
            disk_reserve: DEFAULT_DISK_RESERVE,
        }
    }
}

impl StoreConfig {
    /// Checks the settings before anything starts, so that a bad value is a
    /// clear error at open rather than a panic in a background task.
    ///
    /// Fails with `InvalidArgument` naming the setting: a zero
    /// `maintenance_interval`, `max_batch`, `statement_timeout`,
    /// `commit_timeout` or `connect_timeout`, or a duration over
    /// [`crate::config::MAX_DURATION`].
    pub fn check(&self) -> Result<()> {
        crate::config::check_store_config(self)?;
        if self.max_batch == 0 {
            return Err(Error::InvalidArgument(
                "max_batch (the group commit's limit) must be at least 1".into(),
            ));
        }
        Ok(())
    }
}

/// A database URL with its password replaced by `***`.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.find(':') {
                Some(colon) => format!(
                    "{}{}:***{}",
                    &url[..scheme + 3],
                    &userinfo[..colon],
                    &url[at..]
                ),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

/// Messages leased by one call, and when to look again.
#[derive(Debug, Clone, Default)]
pub struct LeaseBatch {
    /// The leased messages.
    pub deliveries: Vec<Delivery>,
    /// The earliest instant a waiting redelivery or a lease expiry falls due.
    pub next_due: Option<Micros>,
    /// True if the call moved the subscription's cursor; more may be ready.
    pub progressed: bool,
    /// Messages leased to other streams of this process, which hold their
    /// keys (ordered subscriptions): sent to them once committed.
    routed: Vec<routes::Routed>,
}

/// What one maintenance round removed, and how much it looked at.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MaintenanceReport {
    /// Messages removed because every subscription was done with them.
    pub deleted: u64,
    /// Messages expired by a topic's max age.
    pub expired: u64,
    /// Dedup entries past the window.
    pub dedup_pruned: u64,
    /// Leases found expired.
    pub leases_expired: u64,
    /// Topics whose messages the round looked at (for retention, max age
    /// and removal).
    pub topics_examined: u64,
    /// Subscriptions the round swept for expired leases.
    pub subscriptions_examined: u64,
    /// A limit cut the round short: run another one soon.
    pub more: bool,
}

/// Where an operation's answer goes. Copies of an operation share it, so
/// that the writer can run a group again without one operation (one that
/// failed in storage) and answer each caller once: the first answer sent
/// is the one the caller gets.
struct Reply<T>(Arc<Mutex<Option<oneshot::Sender<Result<T>>>>>);

impl<T> Reply<T> {
    fn new(tx: oneshot::Sender<Result<T>>) -> Self {
        Reply(Arc::new(Mutex::new(Some(tx))))
    }

    /// Answers the caller, unless a copy of this reply answered already.
    fn send(self, result: Result<T>) {
        let tx = self.0.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(tx) = tx {
            let _ = tx.send(result);
        }
    }
}

impl<T> Clone for Reply<T> {
    fn clone(&self) -> Self {
        Reply(self.0.clone())
    }
}

impl<T> std::fmt::Debug for Reply<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Reply")
    }
}

/// One write operation, queued for the writer task.
#[derive(Debug, Clone)]
enum Op {
    /// Shared, so that the writer's copy of a group for a rerun (see
    /// `Writer::execute`) copies no payload.
    Publish(Arc<[NewMessage]>, Reply<Vec<PublishOutcome>>, Option<Link>),
    CreateTopic(String, TopicSettings, Reply<Topic>),
    UpdateTopic(String, TopicPatch, Reply<Topic>),
    DeleteTopic(String, Reply<()>),
    CreateSubscription(Box<NewSubscription>, Reply<Subscription>),
    UpdateSubscription(String, Box<SubscriptionPatch>, Reply<Subscription>),
    DeleteSubscription(String, Reply<()>),
    Lease(LeaseRequest, Reply<LeaseBatch>),
    Ack(
        String,
        Vec<AckId>,
        Reply<(Vec<AckStatus>, Vec<routes::Routed>)>,
    ),
    Nack(String, Vec<NackItem>, Reply<Vec<AckStatus>>),
    Extend(String, Vec<(AckId, Duration)>, Reply<Vec<AckStatus>>),
    Release(String, Vec<AckId>, Reply<Vec<AckStatus>>),
    Seek(String, SeekTarget, Reply<i64>),
    Redrive(String, Vec<i64>, Reply<i64>),
    Purge(String, Option<Vec<i64>>, Reply<i64>),
    Maintain(Reply<MaintenanceReport>),
    Close(Reply<()>),
}

/// An operation and the instant it reached the store. Acks, nacks and
/// extensions are judged by that instant, not by when the writer gets to
/// them: an ack that arrived before its lease's deadline counts however long
/// it queued. And no group expires a lease whose deadline is later than the
/// arrival of its newest operation, so an ack still queued behind the group
/// (it arrived later, the queue being first in, first out) finds its lease
/// as it left it. A broker that falls behind never turns its own delay into
/// redeliveries and dead letters.
#[derive(Debug, Clone)]
struct Queued {
    op: Op,
    at: Micros,
}

impl Queued {
    /// `op`, arriving now.
    fn now(op: Op) -> Queued {
        Queued {
            op,
            at: crate::model::now_micros(),
        }
    }
}

impl Op {
    /// How much of a batch this operation fills.
    fn weight(&self) -> usize {
        match self {
            Op::Publish(m, _, _) => m.len().max(1),
            Op::Ack(_, a, _) | Op::Release(_, a, _) => a.len().max(1),
            Op::Nack(_, n, _) => n.len().max(1),
            Op::Extend(_, e, _) => e.len().max(1),
            Op::Lease(l, _) => l.max_messages.max(1),
            _ => 1,
        }
    }
}

#[derive(Debug, Clone)]
struct LeaseRequest {
    subscription: String,
    max_messages: usize,
    max_bytes: usize,
    /// The stream leasing (a [`Holder`]), 0 for none.
    holder: i64,
    /// The keys whose messages the stream holds, with the sequence of the
    /// latest of each.
    runs: Vec<(String, i64)>,
}

/// The requests of one publish stream, numbered in the order queued: once
/// one is answered with an error (the writer marks its own answers; the
/// stream marks a request refused before it was queued), none numbered
/// after it is stored, so a key's messages never go in after an
/// earlier request of the stream that failed (issue 14: the relay keeps
/// several batches of one key in flight on that). Requests before the
/// failed one are not affected.
#[derive(Debug, Clone)]
pub struct Chain(Arc<std::sync::atomic::AtomicU64>);

impl Default for Chain {
    fn default() -> Self {
        Chain(Arc::new(std::sync::atomic::AtomicU64::new(u64::MAX)))
    }
}

impl Chain {
    /// A chain nothing has failed in yet.
    pub fn new() -> Chain {
        Chain::default()
    }

    /// Request `index` of the chain.
    pub fn link(&self, index: u64) -> Link {
        Link {
            chain: self.clone(),
            index,
        }
    }
}

/// One request of a [`Chain`].
#[derive(Debug, Clone)]
pub struct Link {
    chain: Chain,
    index: u64,
}

impl Link {
    /// Marks this request failed: nothing after it is stored.
    pub fn failed(&self) {
        (self.chain.0).fetch_min(self.index, std::sync::atomic::Ordering::SeqCst);
    }

    /// Whether a request before this one failed.
    pub fn is_cut(&self) -> bool {
        self.chain.0.load(std::sync::atomic::Ordering::SeqCst) < self.index
    }
}

/// The identity of a Subscribe stream in its leases: random, 39 bits, never
/// 0. A lease token carries its holder in its high bits (`token >> 24`), so
/// that an ordered subscription can tell a key's run held by the stream
/// asking (which may grow: the key stays with that stream, issue 14) from
/// one held by another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Holder(i64);

impl Holder {
    /// A fresh random holder.
    pub fn new() -> Holder {
        let bits = (uuid::Uuid::new_v4().as_u64_pair().0 >> 25) as i64;
        Holder(bits.max(1))
    }
}

impl Default for Holder {
    fn default() -> Self {
        Holder::new()
    }
}

/// Wakes tasks waiting for news of a topic or a subscription.
///
/// Keys are `t/<topic>` and `s/<subscription>`; the value is a counter that
/// moves on every change, so a waiter that saw version N and finds N+k knows
/// something happened in between.
#[derive(Debug, Clone, Default)]
pub struct Notifier {
    channels: Arc<Mutex<HashMap<String, watch::Sender<u64>>>>,
}

impl Notifier {
    fn key(kind: char, name: &str) -> String {
        format!("{kind}/{name}")
    }

    /// Wakes the waiters of a key as written by [`Notifier::key`] (a
    /// notification from another broker instance).
    #[cfg(feature = "postgres")]
    fn notify_raw(&self, key: &str) {
        self.notify_key(key);
    }

    /// Wakes every waiter: after notifications from other instances may
    /// have been lost.
    #[cfg(feature = "postgres")]
    fn notify_all(&self) {
        let channels = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        for tx in channels.values() {
            tx.send_modify(|v| *v = v.wrapping_add(1));
        }
    }

    fn watch_key(&self, key: String) -> watch::Receiver<u64> {
        let mut channels = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        channels
            .entry(key)
            .or_insert_with(|| watch::channel(0).0)
            .subscribe()
    }

    fn notify_key(&self, key: &str) {
        let channels = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(tx) = channels.get(key) {
            tx.send_modify(|v| *v = v.wrapping_add(1));
        }
    }

    /// A receiver that changes when messages are published to `topic`.
    pub fn watch_topic(&self, topic: &str) -> watch::Receiver<u64> {
        self.watch_key(Self::key('t', topic))
    }

    /// A receiver that changes when `subscription`'s leases or cursor change.
    pub fn watch_subscription(&self, subscription: &str) -> watch::Receiver<u64> {
        self.watch_key(Self::key('s', subscription))
    }

    /// Wakes the waiters of a topic.
    pub fn notify_topic(&self, topic: &str) {
        self.notify_key(&Self::key('t', topic));
    }

    /// Wakes the waiters of a subscription.
    pub fn notify_subscription(&self, subscription: &str) {
        self.notify_key(&Self::key('s', subscription));
    }
}

/// The handle on durable storage. Cheap to clone; the writer task stops when
/// the last clone is dropped or [`Store::close`] is called.
#[derive(Debug, Clone)]
pub struct Store {
    ops: mpsc::Sender<Queued>,
    reader: Reader,
    notifier: Notifier,
    healthy: watch::Receiver<bool>,
    disk: Option<DiskGate>,
    counters: Arc<StoreCounters>,
    routes: Routes,
}

/// Refuses publishes while the disk holding the store counts as full.
#[derive(Debug, Clone)]
#[cfg_attr(not(feature = "sqlite"), allow(dead_code))]
struct DiskGate {
    full: watch::Receiver<bool>,
    refusal: Arc<str>,
}

impl DiskGate {
    fn check(&self) -> Result<()> {
        if *self.full.borrow() {
            return Err(Error::ResourceExhausted(self.refusal.to_string()));
        }
        Ok(())
    }
}

/// Runs the SQLite writer on a thread of its own, in a runtime of its own:
/// every statement is a hand-off to SQLite's worker thread and back, and
/// on the shared runtime each return waited behind whatever else was
/// ready (gRPC, an embedded relay), which stretched every group commit.
/// The thread ends with the writer (when every `Store` is gone or closed).
#[cfg(feature = "sqlite")]
fn own_thread(writer: impl std::future::Future<Output = ()> + Send + 'static) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::Unavailable(format!("cannot start the writer's runtime: {e}")))?;
    std::thread::Builder::new()
        .name("tidings-writer".into())
        .spawn(move || runtime.block_on(writer))
        .map_err(|e| Error::Unavailable(format!("cannot start the writer's thread: {e}")))?;
    Ok(())
}

/// A health signal that reads `true` while `commits` does and `full` does
/// not; it follows both until either's sender or every receiver is gone.
#[cfg(feature = "sqlite")]
fn healthy_unless_full(
    mut commits: watch::Receiver<bool>,
    mut full: watch::Receiver<bool>,
) -> watch::Receiver<bool> {
    let up = |c: &mut watch::Receiver<bool>, f: &mut watch::Receiver<bool>| {
        *c.borrow_and_update() && !*f.borrow_and_update()
    };
    let (tx, rx) = watch::channel(up(&mut commits, &mut full));
    tokio::spawn(async move {
        loop {
            tokio::select! {
                changed = commits.changed() => if changed.is_err() { return },
                changed = full.changed() => if changed.is_err() { return },
                _ = tx.closed() => return,
            }
            let now = up(&mut commits, &mut full);
            tx.send_if_modified(|h| std::mem::replace(h, now) != now);
        }
    });
    rx
}

impl Store {
    /// Opens the store on `config.storage` (a SQLite folder is created if
    /// needed), applies migrations and starts the writer and maintenance
    /// tasks.
    ///
    /// Fails if the database cannot be reached, opened or migrated.
    pub async fn open(config: StoreConfig) -> Result<Store> {
        config.check()?;
        let notifier = Notifier::default();
        let (healthy_tx, healthy) = watch::channel(true);
        let (ops, rx) = mpsc::channel(QUEUE_CAPACITY);
        let counters = Arc::new(StoreCounters::default());
        let routes = Routes::default();
        let weak = ops.downgrade();
        let alive = move || weak.upgrade().is_some_and(|ops| !ops.is_closed());
        let (reader, healthy, disk) = match &config.storage {
            #[cfg(feature = "sqlite")]
            Storage::Sqlite(dir) => {
                let (writer, reader, checkpointer, space) =
                    sqlite::open(dir, &config, notifier.clone(), healthy_tx).await?;
                own_thread(
                    writer
                        .with_commit_timeout(config.commit_timeout)
                        .with_counters(counters.clone())
                        .with_routes(routes.clone())
                        .run(rx, config.max_batch),
                )?;
                tokio::spawn(checkpointer.run(alive, Duration::from_millis(250)));
                let disk = DiskGate {
                    full: space.watch(),
                    refusal: format!(
                        "the disk holding the data directory {} is full: publishing is \
                         refused until space is freed (acks and deliveries go on); retry later",
                        space.dir().display()
                    )
                    .into(),
                };
                // Health reads NOT_SERVING while the disk is full, though
                // acks still commit.
                let healthy = healthy_unless_full(healthy, space.watch());
                (Reader::Sqlite(reader), healthy, Some(disk))
            }
            #[cfg(feature = "postgres")]
            Storage::Postgres(url) => {
                let (writer, reader, listener) =
                    postgres::open(url, &config, notifier.clone(), healthy_tx).await?;
                tokio::spawn(
                    writer
                        .with_commit_timeout(config.commit_timeout)
                        .with_counters(counters.clone())
                        .with_routes(routes.clone())
                        .run(rx, config.max_batch),
                );
                tokio::spawn(listener.run(alive));
                (Reader::Postgres(reader), healthy, None)
            }
            #[allow(unreachable_patterns)]
            other => {
                return Err(Error::InvalidArgument(format!(
                    "this build of tidings has no support for {other:?}; \
                     build it with the sqlite and postgres features"
                )));
            }
        };
        let store = Store {
            ops,
            reader,
            notifier,
            healthy,
            disk,
            counters,
            routes,
        };
        tokio::spawn(maintain(store.ops.downgrade(), config.maintenance_interval));
        Ok(store)
    }

    /// Commits what is queued, closes the database and stops the writer.
    /// Later calls on any clone fail with `Unavailable`.
    pub async fn close(&self) {
        let _ = self.call(Op::Close).await;
        self.reader.close().await;
    }

    /// The notifier that wakes subscribers after commits.
    pub fn notifier(&self) -> &Notifier {
        &self.notifier
    }

    /// A receiver that reads `false` while storage is failing or (SQLite)
    /// the disk is full.
    pub fn health(&self) -> watch::Receiver<bool> {
        self.healthy.clone()
    }

    /// What the writer committed since the store opened, and how its
    /// group commits went: for metrics.
    pub fn counters(&self) -> &Arc<StoreCounters> {
        &self.counters
    }

    /// Operations queued for the writer and not yet taken into a group.
    pub fn queue_depth(&self) -> usize {
        self.ops.max_capacity() - self.ops.capacity()
    }

    /// Every topic's and subscription's gauges, read in two statements
    /// whatever their number: a scrape's cost grows with the subscriptions
    /// and their leased, waiting and dead rows, never with the stored
    /// messages.
    ///
    /// Fails with `Unavailable` if storage does not answer.
    pub async fn gauges(&self) -> Result<StoreGauges> {
        self.reader.gauges().await
    }

    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Op) -> Result<T> {
        let (tx, rx) = oneshot::channel();
        self.ops
            .send(Queued::now(make(Reply::new(tx))))
            .await
            .map_err(|_| Error::Unavailable("storage is closed".into()))?;
        rx.await
            .map_err(|_| Error::Unavailable(UNCONFIRMED.into()))?
    }

    /// Publishes validated messages durably; answers after the commit.
    ///
    /// Fails with `NotFound` if a topic does not exist (then nothing of the
    /// batch is stored), `ResourceExhausted` while the disk is full,
    /// `Unavailable` if the commit failed.
    pub async fn publish(&self, messages: Vec<NewMessage>) -> Result<Vec<PublishOutcome>> {
        self.check_disk()?;
        self.call(|r| Op::Publish(messages.into(), r, None)).await
    }

    /// Refuses a publish while the disk is full.
    fn check_disk(&self) -> Result<()> {
        self.disk.as_ref().map_or(Ok(()), DiskGate::check)
    }

    /// Queues a publish and returns the future of its outcome. Publishes
    /// queued one after another are committed in that order, which is what
    /// keeps a pipelined stream's keys in order; as a `link` of a
    /// [`Chain`] (one per publish stream), once a request of the chain
    /// fails none after it is stored, so what a stream stored is always a
    /// prefix of what it sent.
    ///
    /// Fails with `Unavailable` if the store is closed, `ResourceExhausted`
    /// while the disk is full; the returned future fails as
    /// [`Store::publish`] does, or with `FailedPrecondition` when an
    /// earlier request of its chain failed.
    pub async fn enqueue_publish(
        &self,
        messages: Vec<NewMessage>,
        link: Option<Link>,
    ) -> Result<impl std::future::Future<Output = Result<Vec<PublishOutcome>>> + Send + 'static>
    {
        self.check_disk()?;
        let (tx, rx) = oneshot::channel();
        let op = Op::Publish(messages.into(), Reply::new(tx), link);
        self.ops
            .send(Queued::now(op))
            .await
            .map_err(|_| Error::Unavailable("storage is closed".into()))?;
        Ok(async move {
            rx.await
                .map_err(|_| Error::Unavailable(UNCONFIRMED.into()))?
        })
    }

    /// Creates a topic. Fails with `AlreadyExists` if the name is taken.
    pub async fn create_topic(&self, name: &str, settings: TopicSettings) -> Result<Topic> {
        self.call(|r| Op::CreateTopic(name.to_owned(), settings, r))
            .await
    }

    /// Updates a topic's settings. Fails with `NotFound`.
    pub async fn update_topic(&self, name: &str, patch: TopicPatch) -> Result<Topic> {
        self.call(|r| Op::UpdateTopic(name.to_owned(), patch, r))
            .await
    }

    /// Deletes a topic with its messages. Fails with `NotFound`, or with
    /// `FailedPrecondition` while subscriptions exist on it.
    pub async fn delete_topic(&self, name: &str) -> Result<()> {
        self.call(|r| Op::DeleteTopic(name.to_owned(), r)).await
    }

    /// Gets a topic. Fails with `NotFound`.
    pub async fn get_topic(&self, name: &str) -> Result<Topic> {
        self.reader.get_topic(name).await
    }

    /// Topics in name order after `after`, at most `limit`.
    pub async fn list_topics(&self, after: Option<&str>, limit: usize) -> Result<Vec<Topic>> {
        self.reader.list_topics(after, limit).await
    }

    /// Creates a subscription. Fails with `AlreadyExists`, `NotFound` (topic
    /// or dead-letter topic) or `InvalidArgument`.
    pub async fn create_subscription(&self, sub: NewSubscription) -> Result<Subscription> {
        self.call(|r| Op::CreateSubscription(Box::new(sub), r))
            .await
    }

    /// Updates a subscription's settings. Fails with `NotFound`.
    pub async fn update_subscription(
        &self,
        name: &str,
        patch: SubscriptionPatch,
    ) -> Result<Subscription> {
        self.call(|r| Op::UpdateSubscription(name.to_owned(), Box::new(patch), r))
            .await
    }

    /// Deletes a subscription and all its state. Fails with `NotFound`.
    pub async fn delete_subscription(&self, name: &str) -> Result<()> {
        self.call(|r| Op::DeleteSubscription(name.to_owned(), r))
            .await
    }

    /// Gets a subscription. Fails with `NotFound`.
    pub async fn get_subscription(&self, name: &str) -> Result<Subscription> {
        self.reader.get_subscription(name).await
    }

    /// Subscriptions in name order after `after`, optionally of one topic.
    pub async fn list_subscriptions(
        &self,
        topic: Option<&str>,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Subscription>> {
        self.reader.list_subscriptions(topic, after, limit).await
    }

    /// Leases up to `max_messages` (and about `max_bytes` of payload; at least
    /// one message if any is ready). Fails with `NotFound`.
    pub async fn lease(
        &self,
        subscription: &str,
        max_messages: usize,
        max_bytes: usize,
    ) -> Result<LeaseBatch> {
        self.lease_as(subscription, max_messages, max_bytes, None)
            .await
    }

    /// As [`Store::lease`], for the stream `holder` holding `runs` (the
    /// keys of the messages it holds, each with the sequence of its latest
    /// one): on an ordered subscription it may be given more messages of a
    /// key whose messages in progress it alone holds (leased), after them.
    pub async fn lease_as(
        &self,
        subscription: &str,
        max_messages: usize,
        max_bytes: usize,
        holder: Option<(Holder, Vec<(String, i64)>)>,
    ) -> Result<LeaseBatch> {
        let (holder, runs) = holder.map_or((0, Vec::new()), |(h, runs)| (h.0, runs));
        let req = LeaseRequest {
            subscription: subscription.to_owned(),
            max_messages: max_messages.max(1),
            max_bytes: max_bytes.max(1),
            holder,
            runs,
        };
        let mut batch = self.call(|r| Op::Lease(req, r)).await?;
        self.hand_over(subscription, std::mem::take(&mut batch.routed))
            .await;
        Ok(batch)
    }

    /// Gives back the messages leased to streams of this process that had
    /// ended before the writer could send them (see `finish_handing`),
    /// without counting an attempt.
    async fn hand_over(&self, subscription: &str, unsent: Vec<routes::Routed>) {
        let ids: Vec<AckId> = unsent
            .into_iter()
            .flat_map(|(_, deliveries)| deliveries)
            .map(|d| d.ack_id)
            .collect();
        if ids.is_empty() {
            return;
        }
        if let Err(e) = self.release(subscription, ids).await {
            tracing::debug!(error = %e, subscription, "giving back messages of an ended stream failed; their leases will expire");
        }
    }

    /// The streams of this process that leases may hand a key's messages
    /// to (ordered subscriptions).
    pub fn routes(&self) -> &Routes {
        &self.routes
    }

    /// Acks leases; one status per id, in order. Fails with `NotFound`.
    pub async fn ack(&self, subscription: &str, ids: Vec<AckId>) -> Result<Vec<AckStatus>> {
        let (statuses, routed) = self
            .call(|r| Op::Ack(subscription.to_owned(), ids, r))
            .await?;
        self.hand_over(subscription, routed).await;
        Ok(statuses)
    }

    /// Nacks leases; one status per item, in order. Fails with `NotFound`.
    pub async fn nack(&self, subscription: &str, items: Vec<NackItem>) -> Result<Vec<AckStatus>> {
        self.call(|r| Op::Nack(subscription.to_owned(), items, r))
            .await
    }

    /// Extends leases to now + the given extension. Fails with `NotFound`.
    pub async fn extend(
        &self,
        subscription: &str,
        items: Vec<(AckId, Duration)>,
    ) -> Result<Vec<AckStatus>> {
        self.call(|r| Op::Extend(subscription.to_owned(), items, r))
            .await
    }

    /// Gives leases back for immediate redelivery, without counting their
    /// attempt: the next delivery carries the same attempt number. Fails
    /// with `NotFound`.
    pub async fn release(&self, subscription: &str, ids: Vec<AckId>) -> Result<Vec<AckStatus>> {
        self.call(|r| Op::Release(subscription.to_owned(), ids, r))
            .await
    }

    /// Moves a subscription's cursor; returns the next sequence to deliver.
    pub async fn seek(&self, subscription: &str, target: SeekTarget) -> Result<i64> {
        self.call(|r| Op::Seek(subscription.to_owned(), target, r))
            .await
    }

    /// Counters and gauges of a subscription. Fails with `NotFound`.
    pub async fn stats(&self, subscription: &str) -> Result<SubscriptionStats> {
        self.reader.stats(subscription).await
    }

    /// Dead letters after sequence `after`, at most `limit`, and the total.
    pub async fn list_dead_letters(
        &self,
        subscription: &str,
        after: i64,
        limit: usize,
    ) -> Result<(Vec<DeadLetter>, i64)> {
        self.reader
            .list_dead_letters(subscription, after, limit)
            .await
    }

    /// Up to `limit` messages waiting on the subscription after sequence
    /// `after`, in order; nothing about them changes.
    pub async fn peek(
        &self,
        subscription: &str,
        after: i64,
        limit: usize,
    ) -> Result<Vec<PeekedMessage>> {
        self.reader.peek(subscription, after, limit).await
    }

    /// Makes dead letters deliverable again (all if `sequences` is empty).
    pub async fn redrive(&self, subscription: &str, sequences: Vec<i64>) -> Result<i64> {
        self.call(|r| Op::Redrive(subscription.to_owned(), sequences, r))
            .await
    }

    /// Deletes dead letters (`None`: all of the subscription's).
    pub async fn purge(&self, subscription: &str, sequences: Option<Vec<i64>>) -> Result<i64> {
        self.call(|r| Op::Purge(subscription.to_owned(), sequences, r))
            .await
    }

    /// Runs one maintenance round now (it also runs on a timer).
    pub async fn maintain(&self) -> Result<MaintenanceReport> {
        self.call(Op::Maintain).await
    }
}

#[cfg(feature = "postgres")]
/// Applies pending migrations to the PostgreSQL database at `url` and
/// returns (what `tidings migrate` does; `Store::open` does it too).
///
/// Fails if the database cannot be reached or a migration fails.
pub async fn migrate_postgres(url: &str) -> Result<()> {
    use sqlx::Connection;
    let mut conn = sqlx::postgres::PgConnection::connect(url)
        .await
        .map_err(|e| Error::Unavailable(format!("cannot connect to PostgreSQL: {e}")))?;
    postgres::migrate(&mut conn).await
}

/// The read side of either backend.
#[derive(Debug, Clone)]
enum Reader {
    #[cfg(feature = "sqlite")]
    Sqlite(reader::Reader<sqlite::Sqlite>),
    #[cfg(feature = "postgres")]
    Postgres(reader::Reader<postgres::Postgres>),
}

/// Calls the same read method on whichever backend is open.
macro_rules! read {
    ($self:expr, $method:ident($($arg:expr),*)) => {
        match $self {
            #[cfg(feature = "sqlite")]
            Reader::Sqlite(r) => r.$method($($arg),*).await,
            #[cfg(feature = "postgres")]
            Reader::Postgres(r) => r.$method($($arg),*).await,
        }
    };
}

impl Reader {
    async fn close(&self) {
        read!(self, close())
    }

    async fn get_topic(&self, name: &str) -> Result<Topic> {
        read!(self, get_topic(name))
    }

    async fn list_topics(&self, after: Option<&str>, limit: usize) -> Result<Vec<Topic>> {
        read!(self, list_topics(after, limit))
    }

    async fn get_subscription(&self, name: &str) -> Result<Subscription> {
        read!(self, get_subscription(name))
    }

    async fn list_subscriptions(
        &self,
        topic: Option<&str>,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Subscription>> {
        read!(self, list_subscriptions(topic, after, limit))
    }

    async fn stats(&self, name: &str) -> Result<SubscriptionStats> {
        read!(self, stats(name))
    }

    async fn gauges(&self) -> Result<StoreGauges> {
        read!(self, gauges())
    }

    async fn list_dead_letters(
        &self,
        name: &str,
        after: i64,
        limit: usize,
    ) -> Result<(Vec<DeadLetter>, i64)> {
        read!(self, list_dead_letters(name, after, limit))
    }

    async fn peek(&self, name: &str, after: i64, limit: usize) -> Result<Vec<PeekedMessage>> {
        read!(self, peek(name, after, limit))
    }
}

/// Runs maintenance rounds until the store's writer is gone.
async fn maintain(ops: mpsc::WeakSender<Queued>, interval: Duration) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(ops) = ops.upgrade() else { return };
        let (tx, rx) = oneshot::channel();
        if ops
            .send(Queued::now(Op::Maintain(Reply::new(tx))))
            .await
            .is_err()
        {
            return;
        }
        drop(ops);
        match rx.await {
            Ok(Ok(report)) => {
                if report.expired > 0 {
                    tracing::warn!(expired = report.expired, "messages expired by max age");
                }
                // A round does a bounded amount of work so that it never
                // holds a group commit up for long; a backlog of deletions
                // takes several rounds, each in its own commit.
                if report.more {
                    tick.reset_immediately();
                }
            }
            // The writer logs storage outages itself, at a bounded rate.
            Ok(Err(e)) if e.is_retryable() => {
                tracing::debug!(error = %e, "maintenance round failed")
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "maintenance round failed"),
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn settings_that_would_panic_later_are_refused_at_open() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut zero = StoreConfig::new(dir.path());
        zero.maintenance_interval = Duration::ZERO;
        let err = Store::open(zero).await.expect_err("zero interval");
        assert!(
            matches!(&err, Error::InvalidArgument(m) if m.contains("maintenance_interval")),
            "{err}"
        );
        let mut huge = StoreConfig::new(dir.path());
        huge.dedup_window = Duration::from_secs(u64::MAX);
        let err = Store::open(huge).await.expect_err("absurd window");
        assert!(
            matches!(&err, Error::InvalidArgument(m) if m.contains("dedup_window")),
            "{err}"
        );
        let store = Store::open(StoreConfig::new(dir.path()))
            .await
            .expect("defaults open");
        store.close().await;
    }
}

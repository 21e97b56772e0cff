//! The relay: moves committed outbox rows to the broker in `seq` order over
//! a PublishStream, several batches in flight, and deletes each row only
//! after the broker's durable ack.
//!
//! Why the order is safe: on SQLite one write transaction runs at a time, so
//! `seq` order is commit order; on PostgreSQL the insert trigger makes rows of
//! one (topic, key) take their numbers under a lock held until commit, so a
//! row never becomes visible after a later row of its key. A row that commits
//! late with a lower number (of another key) is found by the next sweep,
//! which starts from the lowest pending row whenever the relay has caught up
//! and nothing is in flight: rows are deleted, never skipped by a cursor.
//! Publishing is idempotent (the broker deduplicates message ids and answers
//! a duplicate with its first sequence number), so a relay killed between
//! the broker's ack and the delete resends rows the broker answers as
//! duplicates, and two relays running at once cannot store a message twice;
//! on PostgreSQL they still elect one leader so that only one does the work.
//!
//! The pipeline. Up to [`RelayConfig::pipeline`] batches are in flight on one
//! stream; the broker stores a stream's requests in the order sent, and once
//! one of them fails (refused, or its commit failed) it stores none sent
//! after it on that stream (`store::Chain`): what a stream stored is always
//! a prefix of what it sent. So a key's rows may be in several batches in
//! flight at once and still go in in order, whatever fails. On any failure
//! the relay abandons the whole pipeline (answers still to come are not
//! awaited; their rows stay), deals with the failed batch (a refused one is
//! retried row by row, refused rows held with the later rows of their key),
//! and sweeps again from the lowest pending row: rows of abandoned batches
//! that the broker did store (those before the failure) come back as
//! duplicates with their first sequence numbers. Acked batches are deleted
//! in order as their answers come; a crash between an ack and its delete, or
//! after later batches were stored, only leaves rows that are resent as
//! duplicates. A relay that loses the leader lock abandons its pipeline too.
//!
//! Held rows. A row the broker refused waits in the outbox until its hold
//! ends. The fetch reads it anyway, flagged, and the relay skips it and,
//! for the rest of its sweep, every later row of its key: when the hold
//! ends, or the row is published, the cursor may already be past it, and a
//! later row of its key above the cursor must not go first. The next sweep
//! from the lowest row sees the held row before the rest of its key.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{Notify, broadcast, watch};
use tokio::task::JoinHandle;
use uuid::Uuid;

#[cfg(feature = "postgres")]
use super::Backend;
#[cfg(feature = "postgres")]
use super::postgres::{LeaderTiming, Leadership};
use super::{Outbox, Passed, Row};
use crate::client::{self, Backoff, Outgoing, PublishReceiver, PublishSender, Publisher};
use crate::config;
use crate::error::{Error, Result};
use crate::model::{self, PublishOutcome};

/// Most batches a relay keeps in flight ([`RelayConfig::pipeline`]); the
/// broker awaits at most 256 requests of one stream at once.
pub const MAX_PIPELINE: usize = 64;

/// How a relay runs. Every duration is a parameter so that tests stay fast.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// The broker's URL, like `http://127.0.0.1:50051`.
    pub broker: String,
    /// How to reach the broker: connect timeout, TLS.
    pub connect: client::ConnectOptions,
    /// Most rows per publish request (the broker accepts at most 1,000).
    pub batch_size: usize,
    /// Most payload bytes per publish request (at least one row is sent).
    pub max_batch_bytes: usize,
    /// Most batches in flight on the publish stream at once (1 to
    /// [`MAX_PIPELINE`]): the relay publishes the next batches while the
    /// broker commits earlier ones and their rows are deleted. A batch never
    /// carries a row of a key that has a row in a batch still in flight
    /// (see the module docs).
    pub pipeline: usize,
    /// How often to look for rows without a wake-up (NOTIFY on PostgreSQL,
    /// [`Outbox::committed`] in process); also how often a standby relay
    /// tries to take over on PostgreSQL.
    pub poll_interval: Duration,
    /// LISTEN for the insert trigger's NOTIFY on PostgreSQL.
    pub listen: bool,
    /// PostgreSQL: when the LISTEN connection heard nothing for this long, a
    /// ping is sent on its channel; if it is not back within the outbox's
    /// operation timeout, the connection is replaced and the outbox looked
    /// at (a frozen link would otherwise leave the relay to its poll
    /// interval for ever, without a word).
    pub listen_check_interval: Duration,
    /// First and longest delay between attempts while the broker or the
    /// database is unreachable.
    pub retry: Backoff,
    /// First and longest delay before retrying a message the broker refused
    /// (unknown topic, over a limit); doubled at each refusal.
    pub hold_min: Duration,
    /// See `hold_min`.
    pub hold_max: Duration,
    /// How often to write this relay's row in `tidings_outbox_relays`.
    pub heartbeat_interval: Duration,
    /// PostgreSQL: the leader's lock session may be silent this long before
    /// the server ends it (and releases the lock for a standby): what hands
    /// the lead over when the leader's database link freezes without a
    /// reset. The leader checks its lock at a third of it and stands down
    /// when a check fails.
    pub leader_timeout: Duration,
    /// How often to log depth, oldest pending age and last publish.
    pub report_interval: Duration,
    /// Run the outbox migration at start.
    pub migrate: bool,
}

impl RelayConfig {
    /// Defaults for the broker at `broker`.
    pub fn new(broker: impl Into<String>) -> RelayConfig {
        RelayConfig {
            broker: broker.into(),
            connect: client::ConnectOptions::default(),
            batch_size: 1000,
            max_batch_bytes: 4 * 1024 * 1024,
            pipeline: 8,
            poll_interval: Duration::from_millis(250),
            listen: true,
            listen_check_interval: Duration::from_secs(10),
            retry: Backoff {
                min: Duration::from_millis(100),
                max: Duration::from_secs(10),
                give_up_after: None,
            },
            hold_min: Duration::from_secs(1),
            hold_max: Duration::from_secs(300),
            heartbeat_interval: super::DEFAULT_HEARTBEAT_INTERVAL,
            leader_timeout: Duration::from_secs(30),
            report_interval: Duration::from_secs(60),
            migrate: true,
        }
    }
}

impl RelayConfig {
    /// Checks the settings before a relay runs with them.
    ///
    /// Fails with `InvalidArgument` for a zero poll, heartbeat or report
    /// interval or leader timeout, a duration longer than
    /// [`config::MAX_DURATION`](crate::config::MAX_DURATION), or a pipeline
    /// of 0 or more than [`MAX_PIPELINE`] batches.
    pub fn check(&self) -> Result<()> {
        if !(1..=MAX_PIPELINE).contains(&self.pipeline) {
            return Err(Error::InvalidArgument(format!(
                "relay pipeline must be 1 to {MAX_PIPELINE} batches (got {})",
                self.pipeline
            )));
        }
        config::check_interval("relay poll_interval", self.poll_interval)?;
        config::check_interval("relay listen_check_interval", self.listen_check_interval)?;
        config::check_interval("relay heartbeat_interval", self.heartbeat_interval)?;
        config::check_interval("relay leader_timeout", self.leader_timeout)?;
        config::check_interval("relay report_interval", self.report_interval)?;
        config::check_duration("relay hold_min", self.hold_min)?;
        config::check_duration("relay hold_max", self.hold_max)?;
        self.retry.check("relay retry")
    }
}

/// What a relay has done, as of now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RelayStatus {
    /// Whether this relay is the one publishing (always, on SQLite).
    pub leader: bool,
    /// Messages the broker acked (duplicates included).
    pub published: u64,
    /// Of those, messages the broker already had (a resend after a lost ack
    /// or a restart).
    pub duplicates: u64,
    /// Rows held after the broker refused them.
    pub held: u64,
    /// When a batch was last acked.
    pub last_publish: Option<SystemTime>,
    /// The last failure, cleared by the next success.
    pub last_error: Option<String>,
    /// Batches the broker acked.
    pub batches: u64,
    /// How long the last acked batch took, from sending it to its ack.
    pub last_batch_latency: Option<Duration>,
}

/// A running relay. Dropping it stops it after the batches in flight; [`Relay::stop`]
/// also waits for that.
#[derive(Debug)]
pub struct Relay {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
    status: watch::Receiver<RelayStatus>,
    acked: broadcast::Sender<Arc<[Uuid]>>,
}

impl Relay {
    /// Starts relaying the outbox to the broker.
    ///
    /// Fails with `InvalidArgument` for a bad broker URL or a configuration
    /// [`RelayConfig::check`] refuses, or a storage error
    /// if the migration or LISTEN fails. The broker being down is not an
    /// error: the relay retries until it answers.
    pub async fn start(outbox: Outbox, config: RelayConfig) -> Result<Relay> {
        config.check()?;
        let connection = client::connect_with(&config.broker, config.connect.clone())?;
        if config.migrate {
            outbox.migrate().await?;
        }
        let listener = match (&outbox.backend, config.listen) {
            #[cfg(feature = "postgres")]
            (Backend::Postgres(pool), true) => {
                let check = crate::store::listener::ListenCheck {
                    interval: config.listen_check_interval,
                    bound: outbox.timeouts.operation,
                };
                Some(super::postgres::listen(pool, check).await?)
            }
            _ => None,
        };
        let (stop, stop_rx) = watch::channel(false);
        let (status_tx, status) = watch::channel(RelayStatus::default());
        let (acked, _) = broadcast::channel(1024);
        let name = format!(
            "{}-{}-{:04x}",
            hostname(),
            std::process::id(),
            Uuid::new_v4().as_u128() & 0xffff
        );
        let runner = Runner {
            wake: Wake {
                listener,
                local: outbox.committed.clone(),
                listener_failed: false,
            },
            #[cfg(feature = "postgres")]
            leadership: match &outbox.backend {
                Backend::Postgres(pool) => Some(Leadership::start(
                    pool.clone(),
                    LeaderTiming {
                        try_every: config.poll_interval,
                        lease: config.leader_timeout,
                        operation: outbox.timeouts.operation,
                    },
                )),
                #[allow(unreachable_patterns)]
                _ => None,
            },
            outbox,
            publisher: Publisher::new(&connection, config.retry),
            stream: None,
            in_flight: VecDeque::new(),
            deleting: None,
            answered: Vec::new(),
            read_ahead: None,
            cursor: 0,
            passed: Passed::default(),
            stalled: HashSet::new(),
            at_end: false,
            config,
            name,
            started: SystemTime::now(),
            stop: stop_rx,
            status: status_tx,
            acked: acked.clone(),
            failing: None,
        };
        let task = tokio::spawn(runner.run());
        Ok(Relay {
            stop,
            task,
            status,
            acked,
        })
    }

    /// What the relay has done so far.
    pub fn status(&self) -> RelayStatus {
        self.status.borrow().clone()
    }

    /// A receiver that sees every status change.
    pub fn watch(&self) -> watch::Receiver<RelayStatus> {
        self.status.clone()
    }

    /// The ids of every batch the broker acks from now on, in order: for
    /// callers that wait for a message to leave the outbox. A receiver that
    /// falls more than 1,024 batches behind misses some.
    pub fn acked(&self) -> broadcast::Receiver<Arc<[Uuid]>> {
        self.acked.subscribe()
    }

    /// Resolves when the relay task ends on its own (it only does if it
    /// panicked; otherwise it runs until stopped).
    pub async fn finished(&mut self) {
        let _ = (&mut self.task).await;
    }

    /// Stops sending, settles the batches in flight (their rows are deleted
    /// if the broker acked them) and waits for that.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "relay".to_owned())
}

/// What wakes an idle relay: NOTIFY on PostgreSQL, [`Outbox::committed`] in
/// process, or the poll interval.
#[cfg(feature = "postgres")]
type Listener = crate::store::listener::WatchedListener;

/// Without PostgreSQL nothing sends NOTIFY, so this type has no values: the
/// field holding it is always `None`.
#[cfg(not(feature = "postgres"))]
enum Listener {}

#[cfg(not(feature = "postgres"))]
impl Listener {
    async fn recv(&mut self) -> std::result::Result<(), sqlx::Error> {
        match *self {}
    }

    fn next_buffered(&mut self) -> Option<()> {
        match *self {}
    }
}

struct Wake {
    listener: Option<Listener>,
    local: Arc<Notify>,
    listener_failed: bool,
}

impl Wake {
    async fn wait(&mut self, poll: Duration) {
        let local = self.local.clone();
        let notified = async {
            match &mut self.listener {
                // A notification, or a replaced connection (whose lost
                // notifications the pass that follows makes up for).
                Some(l) => match l.recv().await {
                    Ok(_) => {
                        self.listener_failed = false;
                    }
                    Err(e) => {
                        // The listener reconnects on its next call; until
                        // then, poll.
                        if !self.listener_failed {
                            tracing::warn!(error = %e, "outbox LISTEN connection failed; polling until it is back");
                            self.listener_failed = true;
                        }
                        tokio::time::sleep(poll).await;
                    }
                },
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = notified => {}
            _ = local.notified() => {}
            _ = tokio::time::sleep(poll) => {}
        }
        // Notifications that arrived meanwhile are covered by the pass that
        // follows.
        if let Some(l) = &mut self.listener {
            while l.next_buffered().is_some() {}
        }
    }
}

/// Why a pass stopped early.
enum Failure {
    /// The broker is unreachable or failed: retry the same rows later.
    Broker(Error),
    /// The outbox database failed.
    Database(Error),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Broker(e) => write!(f, "broker: {e}"),
            Failure::Database(e) => write!(f, "outbox database: {e}"),
        }
    }
}

impl From<Error> for Failure {
    fn from(e: Error) -> Failure {
        Failure::Database(e)
    }
}

/// True when the broker refused the message itself (bad input, unknown
/// topic) rather than failing: resending it unchanged will not help soon.
fn refused(e: &Error) -> bool {
    matches!(
        e,
        Error::InvalidArgument(_) | Error::NotFound(_) | Error::FailedPrecondition(_)
    )
}

/// Failures since the last success, for logging at a sensible rate.
struct Failing {
    since: Instant,
    count: u64,
    logged: Instant,
    delay: Duration,
}

/// How often a continuing failure is logged again.
const LOG_AGAIN: Duration = Duration::from_secs(30);

struct Runner {
    outbox: Outbox,
    config: RelayConfig,
    wake: Wake,
    /// PostgreSQL: the leader lock, kept by its own task (`None` for
    /// SQLite).
    #[cfg(feature = "postgres")]
    leadership: Option<Leadership>,
    publisher: Publisher,
    /// The publish stream, split so that batches go out while earlier ones
    /// are answered.
    stream: Option<(PublishSender, PublishReceiver)>,
    /// Batches sent and not answered yet, oldest first.
    in_flight: VecDeque<InFlight>,
    /// The delete running, in a task of its own: the next batches are read
    /// and sent while it commits (issue 14).
    deleting: Option<Deleting>,
    /// Answered batches waiting for the next delete. One delete runs at a
    /// time and takes every batch answered meanwhile, so the reads never
    /// wait for a connection behind deletes, and a broker that answers
    /// faster than the outbox deletes costs fewer, larger deletes (fewer
    /// commits) instead of a queue of them.
    answered: Vec<Answered>,
    /// The read of the rows after the cursor (the first field), started
    /// as soon as the cursor moved, for the next batch to take: reads,
    /// sends and the broker's commits overlap instead of taking turns
    /// (issue 14).
    read_ahead: Option<(i64, JoinHandle<Result<Vec<Row>>>)>,
    /// Where the current sweep continues; 0 starts from the lowest row.
    cursor: i64,
    /// The numbers this sweep passed without a committed row, read again
    /// with each read from the cursor (a row committed late goes first in
    /// its key).
    passed: Passed,
    /// Keys with a held row in this sweep: their later rows are skipped
    /// until the next sweep from the lowest row (see [`plan`]).
    stalled: HashSet<(String, String)>,
    /// The last read found the end of the outbox: send nothing more until
    /// the batches in flight are answered, then sweep from the lowest row.
    at_end: bool,
    name: String,
    started: SystemTime,
    stop: watch::Receiver<bool>,
    status: watch::Sender<RelayStatus>,
    acked: broadcast::Sender<Arc<[Uuid]>>,
    failing: Option<Failing>,
}

impl Runner {
    fn stopping(&self) -> bool {
        // A dropped Relay handle also stops the task.
        *self.stop.borrow() || self.stop.has_changed().is_err()
    }

    /// Rows per batch read.
    fn batch_limit(&self) -> usize {
        self.config.batch_size.clamp(1, 1000)
    }

    /// Waits up to `d`, or less if the relay is stopped.
    async fn pause(&mut self, d: Duration) {
        let mut stop = self.stop.clone();
        tokio::select! {
            _ = tokio::time::sleep(d) => {}
            _ = stop.wait_for(|s| *s) => {}
        }
    }

    /// Waits while another relay leads: until this one takes the lock, a
    /// poll interval passes, or the relay is stopped.
    async fn stand_by(&mut self) {
        let poll = self.config.poll_interval;
        #[cfg(feature = "postgres")]
        if let Some(leadership) = &self.leadership {
            let mut stop = self.stop.clone();
            tokio::select! {
                _ = tokio::time::sleep(poll) => {}
                _ = leadership.taken() => {}
                _ = stop.wait_for(|s| *s) => {}
            }
            return;
        }
        self.pause(poll).await;
    }

    async fn run(mut self) {
        tracing::info!(relay = %self.name, broker = %self.config.broker, "outbox relay started");
        let mut heartbeat = Instant::now();
        let mut reported = Instant::now();
        let mut reported_published = 0;
        self.lead(&mut heartbeat).await;
        self.heartbeat().await;
        while !self.stopping() {
            if !self.lead(&mut heartbeat).await {
                self.stand_by().await;
                continue;
            }
            match self.pass().await {
                Ok(true) => self.succeeded(),
                Ok(false) => {
                    self.succeeded();
                    let poll = self.config.poll_interval;
                    let mut stop = self.stop.clone();
                    tokio::select! {
                        _ = self.wake.wait(poll) => {}
                        _ = stop.wait_for(|s| *s) => {}
                    }
                }
                Err(f) => {
                    let delay = self.failed(&f);
                    self.pause(delay).await;
                }
            }
            if heartbeat.elapsed() >= self.config.heartbeat_interval {
                heartbeat = Instant::now();
                self.heartbeat().await;
            }
            if reported.elapsed() >= self.config.report_interval {
                reported = Instant::now();
                let published = self.status.borrow().published;
                self.log_report(published != reported_published).await;
                reported_published = published;
            }
        }
        self.drain().await;
        if let Err(e) = self.outbox.retire(&self.name).await {
            tracing::debug!(error = %e, "could not remove the relay's report row");
        }
        let s = self.status.borrow().clone();
        tracing::info!(relay = %self.name, published = s.published, "outbox relay stopped");
    }

    /// On PostgreSQL, whether this relay holds the leader lock (as the
    /// leadership task last checked it).
    async fn lead(&mut self, heartbeat: &mut Instant) -> bool {
        #[cfg(feature = "postgres")]
        if let Some(leadership) = &self.leadership {
            let was = self.status.borrow().leader;
            let now = leadership.leading();
            if now != was {
                self.status.send_modify(|s| s.leader = now);
                if now {
                    tracing::info!(relay = %self.name, "this relay now publishes the outbox");
                    // Start from the lowest row: the previous leader may have
                    // left anything.
                    self.cursor = 0;
                } else {
                    tracing::info!(relay = %self.name, "another relay publishes the outbox; standing by");
                    // The new leader sweeps from the lowest row and resends
                    // what is in flight here; nothing more is sent from here.
                    self.abandon();
                }
                *heartbeat = Instant::now();
                self.heartbeat().await;
            }
            return now;
        }
        // SQLite: no leader lock; every relay publishes.
        if self
            .status
            .send_if_modified(|s| !std::mem::replace(&mut s.leader, true))
        {
            *heartbeat = Instant::now();
            self.heartbeat().await;
        }
        true
    }

    /// One step of the pipeline: sends batches while there is room, then
    /// settles the oldest batch in flight (deletes its rows after the ack).
    /// `Ok(true)` if there may be more to do at once, `Ok(false)` when the
    /// outbox has nothing ready and nothing is in flight.
    async fn pass(&mut self) -> Result<bool, Failure> {
        if let Err(f) = self.fill().await {
            self.abandon();
            return Err(f);
        }
        if self.in_flight.is_empty() {
            if self.reads_on() {
                // Caught up: wait at the cursor. The next read takes what
                // committed meanwhile, late rows included (`Passed`).
                self.deleted_all().await?;
                self.at_end = false;
                return Ok(false);
            }
            // Nothing ready from the cursor, and held rows were skipped:
            // sweep again from the lowest pending row; after a sweep from
            // there, wait.
            let swept = self.cursor == 0;
            self.sweep_again();
            return Ok(!swept);
        }
        self.settle().await?;
        if self.at_end && self.reads_on() {
            // A row committed while the batches were in flight goes at once,
            // without waiting for the rest to be answered and deleted.
            self.at_end = false;
        } else if self.in_flight.is_empty() && self.at_end {
            // Caught up, and nothing is in flight any more (a sweep from the
            // lowest row now would resend what is still unanswered).
            self.sweep_again();
        }
        Ok(true)
    }

    /// Whether the sweep may go on reading from its cursor once it has
    /// caught up: it skipped no held row (only a sweep from the lowest row
    /// finds those again) and keeps every number it passed without a row.
    fn reads_on(&self) -> bool {
        self.cursor != 0 && self.stalled.is_empty() && !self.passed.overflowed
    }

    /// Reads and sends batches until the pipeline is full or the outbox has
    /// nothing more from the cursor.
    async fn fill(&mut self) -> Result<(), Failure> {
        let limit = self.batch_limit();
        while self.in_flight.len() < self.config.pipeline && !self.at_end && !self.stopping() {
            if self.cursor == 0 {
                // A sweep from the lowest row would find the rows of
                // answered batches still being deleted, and send them again.
                self.deleted_all().await?;
                self.passed = Passed::default();
            }
            let mut rows = match self.read_ahead.take() {
                Some((from, read)) if from == self.cursor => read.await.unwrap_or_else(|e| {
                    Err(Error::Storage(format!("outbox read task failed: {e}")))
                })?,
                _ => self.outbox.fetch(self.cursor, limit, &self.passed).await?,
            };
            if rows.is_empty() {
                self.at_end = true;
                break;
            }
            let (take, walked) = plan(&rows, &mut self.stalled, self.config.max_batch_bytes);
            let caught_up = rows.len() < limit && walked == rows.len();
            let seqs: Vec<i64> = rows[..walked].iter().map(|r| r.seq).collect();
            self.cursor = pass_over(&mut self.passed, self.cursor, &seqs);
            // Too many numbers to look at again: the sweep ends here, and
            // the next one, from the lowest row, finds every late row.
            self.at_end = caught_up || self.passed.overflowed;
            if !self.at_end {
                let (outbox, from, passed) =
                    (self.outbox.clone(), self.cursor, self.passed.clone());
                let read = tokio::spawn(async move { outbox.fetch(from, limit, &passed).await });
                self.read_ahead = Some((from, read));
            }
            if take.is_empty() {
                // Every row read was held or behind a held row.
                continue;
            }
            rows.truncate(walked);
            let mut wanted = take.iter().peekable();
            let batch = rows
                .into_iter()
                .enumerate()
                .filter_map(|(i, r)| wanted.next_if_eq(&&i).map(|_| r))
                .collect();
            self.send(batch).await?;
        }
        Ok(())
    }

    /// Sends one batch on the stream (opening it if needed).
    async fn send(&mut self, rows: Vec<Row>) -> Result<(), Failure> {
        let messages = match rows.iter().map(outgoing).collect::<Result<Vec<_>>>() {
            Ok(messages) => messages,
            Err(_) => {
                // A row the broker would refuse as malformed: the batch goes
                // row by row, which holds it with the later rows of its key;
                // nothing after it is sent meanwhile.
                self.abandon();
                self.one_by_one(&rows).await?;
                self.cursor = 0;
                return Ok(());
            }
        };
        if self.stream.is_none() {
            let session = self
                .publisher
                .stream(self.config.pipeline)
                .await
                .map_err(Failure::Broker)?;
            self.stream = Some(session.split());
        }
        let Some((sender, _)) = &self.stream else {
            return Err(Failure::Broker(Error::Unavailable(
                "no publish stream".into(),
            )));
        };
        let spans = messages
            .iter()
            .filter_map(crate::trace::relay_span)
            .collect();
        sender.send(messages).await.map_err(Failure::Broker)?;
        self.in_flight.push_back(InFlight {
            rows,
            sent: Instant::now(),
            _spans: spans,
        });
        Ok(())
    }

    /// Waits for the answer to the oldest batch in flight and deletes its
    /// rows; on a refusal publishes them row by row. Any failure abandons
    /// the pipeline.
    async fn settle(&mut self) -> Result<(), Failure> {
        let answer = match &mut self.stream {
            Some((_, receiver)) => receiver.next().await,
            None => Err(Error::Unavailable("no publish stream".into())),
        };
        let Some(batch) = self.in_flight.pop_front() else {
            return Ok(());
        };
        match answer {
            Ok(Some(results)) if results.len() == batch.rows.len() => {
                self.status.send_modify(|s| {
                    s.batches += 1;
                    s.last_batch_latency = Some(batch.sent.elapsed());
                });
                self.delete_later(batch.rows, results);
                self.deleted_finished().await
            }
            Ok(Some(results)) => {
                self.abandon();
                Err(Failure::Broker(Error::Storage(format!(
                    "broker answered {} results for {} messages",
                    results.len(),
                    batch.rows.len()
                ))))
            }
            Ok(None) => {
                self.abandon();
                Err(Failure::Broker(Error::Unavailable(
                    "publish stream ended".into(),
                )))
            }
            Err(e) if refused(&e) => {
                // The stream ends with the refusal, and the broker stored
                // nothing sent after this batch on it (its chain), so
                // publishing this batch row by row now, before the sweep
                // sends the later ones again, keeps every key in order.
                self.abandon();
                self.one_by_one(&batch.rows).await
            }
            Err(e) => {
                self.abandon();
                Err(Failure::Broker(e))
            }
        }
    }

    /// Forgets the stream and every batch still in flight (their rows stay
    /// in the outbox and are sent again, as duplicates if the broker stored
    /// them), and sweeps again from the lowest pending row.
    fn abandon(&mut self) {
        self.stream = None;
        self.in_flight.clear();
        self.sweep_again();
    }

    /// The next read starts from the lowest pending row, where every held
    /// row is seen again before the rows behind it.
    fn sweep_again(&mut self) {
        // A read under way finishes on its own; its rows are not used.
        self.read_ahead = None;
        self.cursor = 0;
        self.at_end = false;
        self.stalled.clear();
    }

    /// Settles the batches in flight before the relay stops (a failure
    /// leaves the rest to be resent by the next relay).
    async fn drain(&mut self) {
        while !self.in_flight.is_empty() {
            if let Err(f) = self.settle().await {
                tracing::info!(error = %f, "stopping with batches unanswered; they will be resent");
                break;
            }
        }
        if let Err(f) = self.deleted_all().await {
            tracing::info!(error = %f, "stopping with answered rows not deleted; they will be resent");
        }
    }

    /// Queues the rows of an answered batch for deletion, so that the
    /// relay goes on reading and sending meanwhile; [`Runner::reap`] counts
    /// them once deleted.
    fn delete_later(&mut self, rows: Vec<Row>, results: Vec<PublishOutcome>) {
        let seqs = rows.iter().map(|r| r.seq).collect();
        self.answered.push(Answered { seqs, results });
    }

    /// Starts a delete of every answered batch waiting, unless one runs.
    fn start_delete(&mut self) {
        if self.deleting.is_some() || self.answered.is_empty() {
            return;
        }
        let batches = std::mem::take(&mut self.answered);
        let seqs: Vec<i64> = batches
            .iter()
            .flat_map(|b| b.seqs.iter().copied())
            .collect();
        let outbox = self.outbox.clone();
        // If the delete fails the rows stay and are sent again: the broker
        // answers them as duplicates.
        let task = tokio::spawn(async move { outbox.delete(&seqs).await });
        let results = batches.into_iter().map(|b| b.results).collect();
        self.deleting = Some(Deleting { task, results });
    }

    /// Counts a delete that has finished and starts the next; waits for
    /// the running one while more than a pipeline's worth of answered
    /// batches wait behind it.
    async fn deleted_finished(&mut self) -> Result<(), Failure> {
        let finished = self.deleting.as_ref().is_some_and(|d| d.task.is_finished());
        if finished || self.answered.len() > self.config.pipeline {
            self.reap().await?;
        }
        self.start_delete();
        Ok(())
    }

    /// Waits until every answered batch is deleted.
    async fn deleted_all(&mut self) -> Result<(), Failure> {
        loop {
            self.start_delete();
            if self.deleting.is_none() {
                return Ok(());
            }
            self.reap().await?;
        }
    }

    /// Waits for the running delete and counts its batches; a failed one
    /// abandons the pipeline (its rows are sent again).
    async fn reap(&mut self) -> Result<(), Failure> {
        let Some(Deleting { task, results }) = self.deleting.take() else {
            return Ok(());
        };
        let deleted = task
            .await
            .unwrap_or_else(|e| Err(Error::Storage(format!("outbox delete task failed: {e}"))));
        if let Err(e) = deleted {
            self.abandon();
            return Err(Failure::Database(e));
        }
        for results in &results {
            self.count(results);
        }
        Ok(())
    }

    /// After the broker refused a batch: publishes its rows one at a time,
    /// holding each refused row and the later rows of its key (its whole
    /// topic if the topic does not exist).
    async fn one_by_one(&mut self, rows: &[Row]) -> Result<(), Failure> {
        let mut held_keys: HashSet<(String, String)> = HashSet::new();
        let mut held_topics: HashSet<String> = HashSet::new();
        for row in rows {
            if held_topics.contains(&row.topic)
                || (!row.key.is_empty()
                    && held_keys.contains(&(row.topic.clone(), row.key.clone())))
            {
                continue;
            }
            let result = match outgoing(row) {
                Ok(m) => {
                    let _span = crate::trace::relay_span(&m);
                    self.publisher.publish_once(&[m]).await
                }
                Err(e) => Err(e),
            };
            match result {
                Ok(results) => self.done(std::slice::from_ref(row), &results).await?,
                Err(e) if refused(&e) => {
                    let whole_topic = matches!(e, Error::NotFound(_));
                    let wait = self
                        .config
                        .hold_min
                        .saturating_mul(2u32.saturating_pow(row.attempts.clamp(0, 20) as u32))
                        .min(self.config.hold_max);
                    tracing::warn!(
                        id = %row.id, topic = %row.topic, key = %row.key,
                        error = %e, retry_in = ?wait, whole_topic,
                        "the broker refused an outbox message; it waits in the outbox, and so do \
                         the later messages of its key"
                    );
                    self.outbox
                        .hold(row, &e.to_string(), wait, whole_topic)
                        .await?;
                    self.status.send_modify(|st| st.held += 1);
                    if whole_topic {
                        held_topics.insert(row.topic.clone());
                    } else if !row.key.is_empty() {
                        held_keys.insert((row.topic.clone(), row.key.clone()));
                        self.stalled.insert((row.topic.clone(), row.key.clone()));
                    }
                }
                Err(e) => return Err(Failure::Broker(e)),
            }
        }
        Ok(())
    }

    /// The broker acked `rows`: delete them, count, tell listeners.
    async fn done(&mut self, rows: &[Row], results: &[PublishOutcome]) -> Result<(), Error> {
        let seqs: Vec<i64> = rows.iter().map(|r| r.seq).collect();
        // If this fails the rows stay and are sent again: the broker answers
        // them as duplicates.
        self.outbox.delete(&seqs).await?;
        self.count(results);
        Ok(())
    }

    /// Counts published rows (the broker's `results` for them, whose rows
    /// are deleted) and tells listeners.
    fn count(&mut self, results: &[PublishOutcome]) {
        let duplicates = results.iter().filter(|r| r.duplicate).count() as u64;
        if duplicates > 0 {
            tracing::info!(
                duplicates,
                "the broker already had some of these messages (an earlier attempt's ack was lost)"
            );
        }
        self.status.send_modify(|s| {
            s.published += results.len() as u64;
            s.duplicates += duplicates;
            s.last_publish = Some(SystemTime::now());
        });
        if self.acked.receiver_count() > 0 {
            let ids: Arc<[Uuid]> = results.iter().map(|r| r.id).collect();
            let _ = self.acked.send(ids);
        }
    }

    fn succeeded(&mut self) {
        if let Some(f) = self.failing.take() {
            tracing::info!(
                failures = f.count,
                after = ?f.since.elapsed(),
                "outbox relay working again"
            );
            self.status.send_modify(|s| s.last_error = None);
        }
    }

    /// Records a failure, logs it at a sensible rate, and returns how long to
    /// wait before the next attempt.
    fn failed(&mut self, failure: &Failure) -> Duration {
        let text = failure.to_string();
        self.status
            .send_modify(|s| s.last_error = Some(text.clone()));
        let retry = self.config.retry;
        match &mut self.failing {
            None => {
                tracing::warn!(error = %text, "outbox relay cannot publish; rows wait in the outbox and will be retried");
                self.failing = Some(Failing {
                    since: Instant::now(),
                    count: 1,
                    logged: Instant::now(),
                    delay: retry.min,
                });
                retry.min
            }
            Some(f) => {
                f.count += 1;
                f.delay = (f.delay * 2).min(retry.max);
                if f.logged.elapsed() >= LOG_AGAIN {
                    f.logged = Instant::now();
                    tracing::warn!(
                        error = %text, failures = f.count, since = ?f.since.elapsed(),
                        "outbox relay still cannot publish; rows wait in the outbox"
                    );
                }
                f.delay
            }
        }
    }

    async fn heartbeat(&mut self) {
        let status = self.status.borrow().clone();
        let interval = self.config.heartbeat_interval;
        if let Err(e) = self
            .outbox
            .report(&self.name, &status, self.started, interval)
            .await
        {
            tracing::debug!(error = %e, "could not write the relay's report row");
        }
    }

    async fn log_report(&mut self, published_since: bool) {
        let status = self.status.borrow().clone();
        match self.outbox.stats().await {
            Ok(stats) if stats.depth > 0 || published_since => tracing::info!(
                depth = stats.depth,
                held = stats.held,
                oldest_pending = ?stats.oldest_age,
                published = status.published,
                duplicates = status.duplicates,
                last_publish_ago = ?status.last_publish.and_then(|t| t.elapsed().ok()),
                leader = status.leader,
                "outbox"
            ),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "could not read outbox depth"),
        }
    }
}

/// A batch sent on the stream and not answered yet.
struct InFlight {
    rows: Vec<Row>,
    sent: Instant,
    /// The relay spans of its traced messages; each lasts until the broker's
    /// answer (or until the batch is abandoned).
    _spans: Vec<tracing::Span>,
}

/// A delete running: the rows of one or more answered batches.
struct Deleting {
    task: JoinHandle<Result<()>>,
    /// The broker's answer to each batch, counted once the rows are gone.
    results: Vec<Vec<PublishOutcome>>,
}

/// An answered batch waiting for the next delete.
struct Answered {
    seqs: Vec<i64>,
    results: Vec<PublishOutcome>,
}

/// Most numbers a sweep keeps to look at again before it ends early.
const MAX_GAPS: usize = 10_000;

/// Notes in `passed` what a read from `cursor` walked (`seqs`, in order:
/// rows below the cursor that committed late first, then those after it)
/// and returns the new cursor. The first read of a sweep sets the number
/// below which only late rows can appear; a number after the cursor the
/// read skipped had no committed row, and is a gap until a read finds it.
fn pass_over(passed: &mut Passed, cursor: i64, seqs: &[i64]) -> i64 {
    let Some(&first) = seqs.first() else {
        return cursor;
    };
    let mut last = cursor;
    if cursor == 0 {
        passed.below = first;
        last = first;
    }
    for &seq in seqs {
        if seq < passed.below {
            passed.read_below.push(seq);
        } else if seq <= last {
            passed.gaps.retain(|&g| g != seq);
        } else {
            let missing = usize::try_from(seq - last - 1).unwrap_or(usize::MAX);
            if passed.gaps.len().saturating_add(missing) <= MAX_GAPS {
                passed.gaps.extend(last + 1..seq);
            } else {
                // More than a sweep keeps: it ends (see `fill`).
                passed.overflowed = true;
            }
            last = seq;
        }
    }
    last
}

/// What the next batch takes of `rows` (pending rows in `seq` order): the
/// indices of the rows to send, and how many rows were walked (the cursor
/// moves past them; rows after them are read again).
///
/// A held row (not ready) is skipped, and its key is `stalled`: the later
/// rows of a stalled key are skipped too until the next sweep from the
/// lowest row (which clears `stalled`). Whether the held row's hold ends or
/// it is published meanwhile, the cursor may be past it, and only that sweep
/// sends its key again, from its lowest row. Rows up to `max_bytes` are
/// taken (at least one).
fn plan(
    rows: &[Row],
    stalled: &mut HashSet<(String, String)>,
    max_bytes: usize,
) -> (Vec<usize>, usize) {
    let mut take = Vec::new();
    let mut bytes = 0;
    for (i, r) in rows.iter().enumerate() {
        let keyed = !r.key.is_empty();
        if keyed && !stalled.is_empty() && stalled.contains(&(r.topic.clone(), r.key.clone())) {
            continue;
        }
        if !r.ready {
            if keyed {
                stalled.insert((r.topic.clone(), r.key.clone()));
            }
            continue;
        }
        bytes += r.bytes();
        if !take.is_empty() && bytes > max_bytes {
            return (take, i);
        }
        take.push(i);
    }
    (take, rows.len())
}

/// The message a row holds. A row the broker would refuse as malformed (a
/// bad id, undecodable attributes) is refused here the same way.
fn outgoing(row: &Row) -> Result<Outgoing> {
    let attributes = super::decode_attributes(row.seq, row.attributes.as_deref())
        .map_err(|e| Error::InvalidArgument(e.to_string()))?;
    Ok(Outgoing {
        id: model::parse_message_id(&row.id)?,
        topic: row.topic.clone(),
        key: (!row.key.is_empty()).then(|| row.key.clone()),
        payload: row.payload.clone(),
        attributes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(seq: i64, key: &str, payload: usize) -> Row {
        Row {
            seq,
            id: Uuid::now_v7().to_string(),
            topic: "t".into(),
            key: key.into(),
            payload: vec![0; payload],
            attributes: None,
            attempts: 0,
            ready: true,
        }
    }

    /// `plan` with nothing stalled before.
    fn plan_of(rows: &[Row], max_bytes: usize) -> (Vec<usize>, usize) {
        plan(rows, &mut HashSet::new(), max_bytes)
    }

    #[test]
    fn a_batch_holds_at_least_one_row_and_at_most_its_bytes() {
        let rows = [row(1, "", 100), row(2, "", 100), row(3, "", 100)];
        assert_eq!(plan_of(&rows, 1), (vec![0], 1));
        assert_eq!(plan_of(&rows, 2 * rows[0].bytes()), (vec![0, 1], 2));
    }

    #[test]
    fn a_sweep_notes_the_numbers_it_passed_without_a_row() {
        let mut passed = Passed::default();
        // The first read of a sweep: nothing below 5 was committed then.
        assert_eq!(pass_over(&mut passed, 0, &[5, 6, 9]), 9);
        assert_eq!((passed.below, passed.gaps.clone()), (5, vec![7, 8]));
        // A row below the sweep's first committed late, gap 8 filled, and
        // the rows after the cursor with a gap of their own.
        assert_eq!(pass_over(&mut passed, 9, &[2, 8, 10, 12]), 12);
        assert_eq!(passed.read_below, vec![2]);
        assert_eq!(passed.gaps, vec![7, 11]);
        assert!(!passed.overflowed);
        // Late rows alone leave the cursor where it was.
        assert_eq!(pass_over(&mut passed, 12, &[7]), 12);
        assert_eq!(passed.gaps, vec![11]);
        // More gaps than a sweep keeps end it.
        pass_over(&mut passed, 12, &[12 + MAX_GAPS as i64 + 2]);
        assert!(passed.overflowed);
    }

    #[test]
    fn a_held_row_stalls_its_key_for_the_rest_of_the_sweep() {
        let mut held = row(2, "a", 10);
        held.ready = false;
        let rows = [
            row(1, "a", 10),
            held,
            row(3, "b", 10),
            row(4, "a", 10),
            row(5, "", 10),
        ];
        let mut stalled = HashSet::new();
        assert_eq!(plan(&rows, &mut stalled, 1 << 20), (vec![0, 2, 4], 5));
        assert!(stalled.contains(&("t".to_owned(), "a".to_owned())));
        // Later in the same sweep, a's rows are still skipped, even once
        // the held row is gone or ready.
        let later = [row(6, "a", 10), row(7, "b", 10)];
        assert_eq!(plan(&later, &mut stalled, 1 << 20), (vec![1], 2));
        // A held row without a key stalls nothing.
        let mut loose = row(8, "", 10);
        loose.ready = false;
        let mut stalled = HashSet::new();
        assert_eq!(
            plan(&[loose, row(9, "", 10)], &mut stalled, 1 << 20),
            (vec![1], 2)
        );
        assert!(stalled.is_empty());
    }
}

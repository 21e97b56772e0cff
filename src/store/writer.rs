//! The one writer: every write of a store runs here, written once over the
//! [`Backend`] trait. It takes whatever operations are queued, runs them in
//! one transaction and answers every caller after the COMMIT (group commit).
//! Publishing, leasing, acks, nacks, extensions, expiry, dead letters, seek,
//! redrive, purge and maintenance are decided here; the backends only run
//! the statements.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use uuid::Uuid;

use super::backend::{Backend, Conn, Earlier};
use super::common::{
    Check, Clock, DELETE_LIMIT, DeliveryRow, Done, EXPIRE_LIMIT, Fatal, HELD, LEASED, LogLimit,
    SubRow, TopicRow, Touched, WAITING, classify, current_seqs, dead_letter_attributes, finish,
    finish_handing, ours, status_of,
};
use super::counts::{StoreCounters, Tally};
use super::held::HeldMessages;
use super::plan::{AfterAttempt, Budget, Take, after_attempt, plan_new};
use super::routes::Routed;
use super::sweep::{BEHIND, FULL_PASS_EVERY, Kind, ROUND_LIMIT, Sweep};
use super::{
    LeaseBatch, LeaseRequest, Link, MaintenanceReport, NewSubscription, Notifier, Op, Queued,
    Routes, SubscriptionPatch, TopicPatch,
};
use crate::error::{Error, Result};
use crate::model::{
    AckId, AckStatus, Delivery, Micros, NackItem, NewMessage, PublishOutcome, SeekTarget,
    StartPosition, StoredMessage, Subscription, Topic, TopicSettings, micros,
};

/// How often one instance of a shared database sweeps one subscription for
/// expired leases while leasing. The sweep walks the index through leases
/// acked since the last VACUUM, so it does not run on every lease; the
/// maintenance round sweeps too.
const SWEEP_EVERY: Micros = 100_000;

fn topic_not_found(name: &str) -> Error {
    Error::NotFound(format!("topic {name:?} does not exist"))
}

fn sub_not_found(name: &str) -> Error {
    Error::NotFound(format!("subscription {name:?} does not exist"))
}

/// Owns the write connection (through its backend) and the writer's memory.
pub(super) struct Writer<B: Backend> {
    db: B,
    clock: Clock,
    dedup_window: i64,
    notifier: Notifier,
    healthy: watch::Sender<bool>,
    /// Exclusive backends only: topic rows by name, kept in step with every
    /// write (dropped when a group fails).
    topics: HashMap<String, TopicRow>,
    /// Exclusive backends only: subscription rows by name, with the instant
    /// each next needs a look for redeliveries (`SubRow::check_at`).
    subs: HashMap<String, SubRow>,
    /// Shared backends only: when this instance last swept each subscription
    /// for expired leases.
    swept: HashMap<i64, Micros>,
    /// Leases whose deadline is before this instant may be expired in the
    /// current group: the arrival of the group's newest operation (or the
    /// group's clock, if earlier). See [`Queued`].
    expire_before: Micros,
    /// Per topic, a sequence below which every message is deleted already,
    /// so deletion does not walk the index through rows it removed before
    /// (on PostgreSQL they stay as dead index entries until VACUUM).
    deleted_below: HashMap<i64, i64>,
    /// What maintenance has to look at, and when (see `sweep.rs`).
    sweep: Sweep,
    /// Longest a group may take from BEGIN to COMMIT.
    commit_timeout: Duration,
    /// Groups failing since the last commit, for a log that says when
    /// storage broke and when it works again without a line per group.
    outage: Option<Outage>,
    /// Bounds the lines about failing groups, across outages too: groups
    /// that fail and commit by turns (a full disk) must not log each turn.
    failure_log: LogLimit,
    /// What this group did, for the counters; merged into `counters` only
    /// if the group commits.
    tally: Tally,
    /// The store's counters, for metrics.
    counters: Arc<StoreCounters>,
    /// Bounds the lines about storage working again, likewise.
    recovery_log: LogLimit,
    /// The streams of this process a lease may hand a key's new messages
    /// to, and how many this group handed each (sent after the commit).
    routes: Routes,
    routed: HashMap<i64, isize>,
    /// Exclusive backends only: messages held back on ordered
    /// subscriptions, so that handing them on does not read them again.
    held: HeldMessages,
}

/// Failed groups since the last commit.
struct Outage {
    since: Instant,
    failed: u64,
}

/// Most names an error message lists.
const NAMES_SHOWN: usize = 5;

/// Up to [`NAMES_SHOWN`] names, comma-separated, and how many more.
fn some_names(names: &[String]) -> String {
    let shown = names[..names.len().min(NAMES_SHOWN)].join(", ");
    match names.len().saturating_sub(NAMES_SHOWN) {
        0 => shown,
        more => format!("{shown} and {more} more"),
    }
}

/// An operation and its place in its group.
type Numbered = (usize, Queued);

/// Why a group failed.
enum Failure {
    /// BEGIN or COMMIT failed, or the group ran out of time.
    Group(String),
    /// The operation at this index of the group failed.
    Op(usize, Fatal),
    /// The group's publishes, stored together, failed.
    Publishes(Fatal),
}

impl Failure {
    fn reason(&self) -> &str {
        match self {
            Failure::Group(reason) => reason,
            Failure::Op(_, fatal) | Failure::Publishes(fatal) => &fatal.reason,
        }
    }
}

/// How a round of a group ended.
enum Round {
    /// Every caller was answered.
    Done,
    /// Storage refused the operation at this index, which was answered;
    /// the others were not and run again without it.
    Refused(usize),
    /// Storage refused the publishes stored together; nobody was answered
    /// and they run again one request at a time.
    PublishesRefused,
}

/// Answers a publish as [`finish`] does; if the answer is an error (its
/// own, or its group's), its stream's chain breaks before the caller hears
/// of it, so nothing the stream queued after it is stored.
fn finish_chained<T: Send + 'static>(
    reply: super::Reply<T>,
    result: Result<T>,
    link: Option<Link>,
) -> (Done, Option<Fatal>) {
    let failed_itself = result.is_err();
    let (done, fatal) = finish(reply, result);
    let Some(link) = link else {
        return (done, fatal);
    };
    let done: Done = Box::new(move |failed| {
        if failed.is_some() || failed_itself {
            link.failed();
        }
        done(failed);
    });
    (done, fatal)
}

/// Most rounds a group runs to find the operations storage refuses: a
/// group whose operations keep failing after that is refused whole.
const ISOLATION_ROUNDS: usize = 8;

/// How often a continuing storage failure is logged again.
const LOG_AGAIN: Duration = Duration::from_secs(5);

impl<B: Backend> Writer<B> {
    /// A writer over `db`'s connection.
    pub(super) fn new(
        db: B,
        dedup_window: Duration,
        notifier: Notifier,
        healthy: watch::Sender<bool>,
    ) -> Self {
        Writer {
            db,
            clock: Clock::new(),
            dedup_window: micros(dedup_window),
            notifier,
            healthy,
            topics: HashMap::new(),
            subs: HashMap::new(),
            swept: HashMap::new(),
            expire_before: i64::MIN,
            deleted_below: HashMap::new(),
            sweep: Sweep::new(B::EXCLUSIVE),
            commit_timeout: super::DEFAULT_COMMIT_TIMEOUT,
            outage: None,
            failure_log: LogLimit::new(LOG_AGAIN),
            recovery_log: LogLimit::new(LOG_AGAIN),
            tally: Tally::default(),
            counters: Arc::default(),
            routes: Routes::default(),
            routed: HashMap::new(),
            held: HeldMessages::default(),
        }
    }

    /// Hands new messages of a key to the stream of `routes` holding it.
    pub(super) fn with_routes(mut self, routes: Routes) -> Self {
        self.routes = routes;
        self
    }

    /// Counts what it commits into `counters`.
    pub(super) fn with_counters(mut self, counters: Arc<StoreCounters>) -> Self {
        self.counters = counters;
        self
    }

    /// Bounds each group, BEGIN to COMMIT, by `timeout`.
    pub(super) fn with_commit_timeout(mut self, timeout: Duration) -> Self {
        self.commit_timeout = timeout;
        self
    }

    fn c(&mut self) -> &mut Conn<B> {
        self.db.conn()
    }

    /// Commits queued operations in groups until the store is closed or every
    /// handle is gone.
    pub(super) async fn run(mut self, mut rx: mpsc::Receiver<Queued>, max_batch: usize) {
        while let Some(first) = rx.recv().await {
            let mut weight = first.op.weight();
            let mut ops = vec![first];
            while weight < max_batch {
                match rx.try_recv() {
                    Ok(queued) => {
                        weight += queued.op.weight();
                        ops.push(queued);
                    }
                    Err(_) => break,
                }
            }
            if let Some(at) = ops.iter().position(|q| matches!(q.op, Op::Close(_))) {
                let mut rest = ops.split_off(at);
                self.execute(ops).await;
                let close = rest.remove(0);
                for queued in rest {
                    queued.op.refuse("storage is closed");
                }
                rx.close();
                while let Ok(queued) = rx.try_recv() {
                    queued.op.refuse("storage is closed");
                }
                self.db.close().await;
                if let Op::Close(reply) = close.op {
                    reply.send(Ok(()));
                }
                return;
            }
            self.execute(ops).await;
        }
    }

    /// Runs one group and answers its callers. If storage refused one of
    /// its operations itself (not an outage: a value it cannot hold, a
    /// constraint), that operation alone gets its error and the others run
    /// again without it, in a new transaction: one client's request never
    /// fails its neighbours'. Publishes stored together are first split
    /// into their requests to find the one at fault.
    async fn execute(&mut self, mut ops: Vec<Queued>) {
        let mut split_publishes = false;
        for round in 0.. {
            // A copy to run again, only where there are neighbours to spare.
            // An operation alone in its group is answered with its own
            // error all the same: nothing is left to run again.
            let again = (ops.len() > 1 && round < ISOLATION_ROUNDS).then(|| ops.clone());
            let alone = ops.len() == 1;
            match self
                .execute_once(ops, split_publishes, again.is_some() || alone)
                .await
            {
                Round::Done => return,
                Round::Refused(culprit) => {
                    let Some(mut rest) = again else { return };
                    rest.remove(culprit);
                    ops = rest;
                }
                Round::PublishesRefused => {
                    let Some(rest) = again else { return };
                    split_publishes = true;
                    ops = rest;
                }
            }
        }
    }

    /// Runs one group in one transaction and answers its callers, except,
    /// when `may_retry`, after storage refused one operation itself: then
    /// the transaction is rolled back, only that operation is answered
    /// (with its error), and the round says which one it was.
    ///
    /// The group is bounded by the commit timeout: a database that stops
    /// answering (a link that drops packets and never resets) fails the
    /// group's callers with `Unavailable`, turns health NOT_SERVING and has
    /// the connection replaced, rather than holding every caller until the
    /// operating system gives up on the socket.
    #[tracing::instrument(name = "group_commit", level = "debug", skip_all, fields(ops = ops.len()))]
    async fn execute_once(
        &mut self,
        ops: Vec<Queued>,
        split_publishes: bool,
        may_retry: bool,
    ) -> Round {
        let started = Instant::now();
        let size = ops.len();
        let now = self.clock.tick();
        let newest = ops.iter().map(|q| q.at).max().unwrap_or(now);
        self.expire_before = newest.min(now);
        self.routed.clear();
        let mut touched = Touched::default();
        let mut dones: Vec<(usize, Done)> = Vec::with_capacity(ops.len());
        // Operations wait here until their turn, so that those not yet
        // started when the deadline passes are refused with its reason.
        // (Those already running are dropped with the group's future: their
        // callers learn that storage did not confirm them.)
        let mut queue: VecDeque<(usize, Queued)> = ops.into_iter().enumerate().collect();
        let deadline = self.commit_timeout;
        let group = self.group(&mut queue, now, split_publishes, &mut touched, &mut dones);
        let (failure, timed_out) = match tokio::time::timeout(deadline, group).await {
            Ok(failure) => (failure, false),
            Err(_) => {
                // The connection is mid-statement, maybe on a dead link:
                // never wait on it again.
                self.db.distrust();
                let reason = format!(
                    "the database did not complete a group commit within {deadline:?} \
                     (commit_timeout); reconnecting"
                );
                (Some(Failure::Group(reason)), true)
            }
        };
        let Some(failure) = failure else {
            self.counters
                .committed(size, started.elapsed(), &mut self.tally);
            self.log_recovery();
            self.healthy
                .send_if_modified(|h| !std::mem::replace(h, true));
            for (_, done) in dones {
                done(None);
            }
            for topic in &touched.topics {
                self.notifier.notify_topic(topic);
            }
            for sub in &touched.subs {
                self.notifier.notify_subscription(sub);
            }
            tracing::debug!(
                ops = size,
                elapsed_us = started.elapsed().as_micros() as u64,
                "group committed"
            );
            return Round::Done;
        };
        // What was cached during the group may not be what is stored, and
        // what it counted did not happen.
        self.tally = Tally::default();
        self.topics.clear();
        self.subs.clear();
        self.held.clear();
        self.maintenance_rolled_back();
        if may_retry && !timed_out {
            let retry = match &failure {
                Failure::Op(index, fatal) if fatal.own => Some((Round::Refused(*index), fatal)),
                Failure::Publishes(fatal) if fatal.own => Some((Round::PublishesRefused, fatal)),
                _ => None,
            };
            // If rolling back fails too, the connection is gone, and the
            // group is refused like any other in an outage.
            if let Some((round, fatal)) = retry
                && self.db.rollback().await
            {
                tracing::warn!(
                    error = %fatal.reason,
                    "storage refused one request of a group; the others run again without it"
                );
                if let Round::Refused(culprit) = round {
                    // Its own error, as the operation left it.
                    for (index, done) in dones {
                        if index == culprit {
                            done(None);
                        }
                    }
                }
                return round;
            }
        }
        let reason = failure.reason().to_owned();
        self.counters.failed(&mut self.tally);
        self.log_failure(size, &reason);
        for (_, queued) in queue.drain(..) {
            queued.op.refuse(&format!(
                "storage failed and nothing of this request was committed; retry: {reason}"
            ));
        }
        // Callers are answered before the reconnect, which may take
        // up to the connect timeout on a dead link. A group cut off
        // by the deadline may have committed (the COMMIT may have
        // reached the database): its callers are told so, and a
        // retry is safe (publishes deduplicate by id; a repeated ack
        // answers STALE).
        let told = if timed_out {
            format!(
                "storage did not confirm this request in time; it may or may not \
                 have been committed; retry: {reason}"
            )
        } else {
            format!("storage failed and nothing of this request was committed; retry: {reason}")
        };
        for (_, done) in dones {
            done(Some(&told));
        }
        if self.db.recover().await || timed_out {
            self.healthy
                .send_if_modified(|h| std::mem::replace(h, false));
        }
        Round::Done
    }

    /// BEGIN, the group's operations (publishes first, together unless
    /// `split_publishes`), COMMIT; returns why the group failed, if it did.
    async fn group(
        &mut self,
        queue: &mut VecDeque<(usize, Queued)>,
        now: Micros,
        split_publishes: bool,
        touched: &mut Touched,
        dones: &mut Vec<(usize, Done)>,
    ) -> Option<Failure> {
        if let Err(e) = self.db.begin().await {
            return Some(Failure::Group(e.to_string()));
        }
        let mut failure = None;
        let (publishes, mut rest): (Vec<Numbered>, Vec<Numbered>) = queue
            .drain(..)
            .partition(|(_, q)| matches!(q.op, Op::Publish(..)));
        // Acks, nacks, extensions and releases go before the group's leases
        // and maintenance, which may expire leases: an ack that came in
        // time ends its lease before any sweep of this group looks at it.
        rest.sort_by_key(|(_, q)| !q.op.settles());
        queue.extend(rest);
        if !publishes.is_empty() {
            // Publishes of the whole group are stored together: a handful
            // of multi-row statements however many requests there are.
            let batches: Vec<Vec<(usize, Op)>> = if split_publishes {
                publishes
                    .into_iter()
                    .map(|(i, q)| vec![(i, q.op)])
                    .collect()
            } else {
                vec![publishes.into_iter().map(|(i, q)| (i, q.op)).collect()]
            };
            for batch in batches {
                let alone = (batch.len() == 1).then(|| batch[0].0);
                for (index, done, fatal) in self.publish_group(batch, now, touched).await {
                    dones.push((index, done));
                    if failure.is_none()
                        && let Some(fatal) = fatal
                    {
                        failure = Some(match alone {
                            Some(index) => Failure::Op(index, fatal),
                            None => Failure::Publishes(fatal),
                        });
                    }
                }
                if failure.is_some() {
                    break;
                }
            }
        }
        while let Some((index, Queued { op, at })) = queue.pop_front() {
            if let Some(failure) = &failure {
                let reason = failure.reason().to_owned();
                dones.push((index, Box::new(move |_| op.refuse(&reason))));
                continue;
            }
            let (done, fatal) = self.apply(op, at, now, touched).await;
            dones.push((index, done));
            failure = fatal.map(|f| Failure::Op(index, f));
        }
        if failure.is_none()
            && let Err(e) = self.db.commit(touched).await
        {
            failure = Some(Failure::Group(e.to_string()));
        }
        failure
    }

    /// Logs a failed group: the first at once, then at most every
    /// [`LOG_AGAIN`] with the count since, whether the failures come in one
    /// outage or in many short ones.
    fn log_failure(&mut self, ops: usize, reason: &str) {
        let now = Instant::now();
        let outage = self.outage.get_or_insert(Outage {
            since: now,
            failed: 0,
        });
        outage.failed += 1;
        let Some(unlogged) = self.failure_log.hit(now) else {
            return;
        };
        if outage.failed == 1 {
            tracing::error!(
                ops,
                error = %reason,
                unlogged_failures = unlogged,
                "group commit failed; every request in it was refused"
            );
        } else {
            tracing::error!(
                failed_groups = outage.failed,
                for_ms = now.duration_since(outage.since).as_millis() as u64,
                error = %reason,
                unlogged_failures = unlogged,
                "group commits still failing"
            );
        }
    }

    /// Logs that a group committed after failures, at most every
    /// [`LOG_AGAIN`].
    fn log_recovery(&mut self) {
        if let Some(outage) = self.outage.take()
            && self.recovery_log.hit(Instant::now()).is_some()
        {
            tracing::info!(
                failed_groups = outage.failed,
                after_ms = outage.since.elapsed().as_millis() as u64,
                "storage works again: a group committed"
            );
        }
    }

    /// Runs one operation that arrived at `at`.
    async fn apply(
        &mut self,
        op: Op,
        at: Micros,
        now: Micros,
        t: &mut Touched,
    ) -> (Done, Option<Fatal>) {
        match op {
            Op::Publish(messages, r, link) => {
                let messages: Vec<&NewMessage> = messages.iter().collect();
                finish_chained(r, self.publish(&messages, now, t).await, link)
            }
            Op::CreateTopic(name, settings, r) => {
                finish(r, self.create_topic(name, settings, now).await)
            }
            Op::UpdateTopic(name, patch, r) => finish(r, self.update_topic(&name, patch).await),
            Op::DeleteTopic(name, r) => finish(r, self.delete_topic(&name).await),
            Op::CreateSubscription(sub, r) => finish(r, self.create_subscription(*sub, now).await),
            Op::UpdateSubscription(name, patch, r) => {
                finish(r, self.update_subscription(&name, *patch, now, t).await)
            }
            Op::DeleteSubscription(name, r) => finish(r, self.delete_subscription(&name, t).await),
            Op::Lease(req, r) => {
                let leased = self.lease(req, now, t).await;
                finish_handing(r, leased, &self.routes)
            }
            Op::Ack(sub, ids, r) => {
                let acked = self.ack(&sub, ids, at, now, t).await;
                finish_handing(r, acked, &self.routes)
            }
            Op::Nack(sub, items, r) => finish(r, self.nack(&sub, items, at, now, t).await),
            Op::Extend(sub, items, r) => finish(r, self.extend(&sub, items, at, now).await),
            Op::Release(sub, ids, r) => finish(r, self.release(&sub, ids, at, now, t).await),
            Op::Seek(sub, target, r) => finish(r, self.seek(&sub, target, t).await),
            Op::Redrive(sub, seqs, r) => finish(r, self.redrive(&sub, seqs, now, t).await),
            Op::Purge(sub, seqs, r) => finish(r, self.purge(&sub, seqs).await),
            Op::Maintain(r) => finish(r, self.maintain(now, t).await),
            // Close is handled by `run` before a batch is applied.
            Op::Close(r) => finish(r, Ok(())),
        }
    }

    // ---- rows ----

    async fn topic(&mut self, name: &str) -> Result<TopicRow> {
        if let Some(row) = self.topics.get(name) {
            return Ok(row.clone());
        }
        let row = B::topic(self.c(), name)
            .await?
            .ok_or_else(|| topic_not_found(name))?;
        if B::EXCLUSIVE {
            self.topics.insert(name.to_owned(), row.clone());
        }
        Ok(row)
    }

    async fn sub(&mut self, name: &str) -> Result<SubRow> {
        if let Some(row) = self.subs.get(name) {
            return Ok(row.clone());
        }
        let row = B::sub(self.c(), name)
            .await?
            .ok_or_else(|| sub_not_found(name))?;
        if B::EXCLUSIVE {
            self.subs.insert(name.to_owned(), row.clone());
        }
        Ok(row)
    }

    /// Notes that a waiting or leased row of `sub` falls due at `at`.
    fn due_at(&mut self, sub: &str, at: Micros) {
        if let Some(cached) = self.subs.get_mut(sub) {
            cached.check_at = cached.check_at.min(at);
        }
    }

    // ---- publishing ----

    /// Publishes several requests as one: requests naming an unknown topic
    /// are refused on their own, the others are stored together.
    async fn publish_group(
        &mut self,
        ops: Vec<(usize, Op)>,
        now: Micros,
        t: &mut Touched,
    ) -> Vec<(usize, Done, Option<Fatal>)> {
        let mut out = Vec::with_capacity(ops.len());
        let mut accepted = Vec::with_capacity(ops.len());
        let mut known: HashSet<String> = HashSet::new();
        for (index, op) in ops {
            let Op::Publish(messages, reply, link) = op else {
                continue;
            };
            if link.as_ref().is_some_and(Link::is_cut) {
                let refused = Err(Error::FailedPrecondition(
                    "an earlier request on this publish stream failed, so this one was not \
                     stored; send it again on a new stream"
                        .into(),
                ));
                let (done, fatal) = finish(reply, refused);
                out.push((index, done, fatal));
                continue;
            }
            let mut missing = None;
            for m in messages.iter() {
                if known.contains(&m.topic) {
                    continue;
                }
                match self.topic(&m.topic).await {
                    Ok(_) => {
                        known.insert(m.topic.clone());
                    }
                    Err(e) => {
                        missing = Some(e);
                        break;
                    }
                }
            }
            match missing {
                Some(e) => {
                    // Its stream's later requests, in this group too, are
                    // not stored.
                    link.inspect(Link::failed);
                    let (done, fatal) = finish(reply, Err(e));
                    out.push((index, done, fatal));
                }
                None => accepted.push((index, messages, reply, link)),
            }
        }
        let all: Vec<&NewMessage> = accepted.iter().flat_map(|(_, m, _, _)| m.iter()).collect();
        let result = self.publish(&all, now, t).await;
        let mut outcomes = result.as_ref().map(|o| o.iter()).ok();
        for (index, messages, reply, link) in accepted {
            let answer = match (&mut outcomes, &result) {
                (Some(outcomes), _) => {
                    Ok(outcomes.by_ref().take(messages.len()).copied().collect())
                }
                (None, Err(e)) => Err(e.clone()),
                (None, Ok(_)) => unreachable!("outcomes are taken from an Ok result"),
            };
            let (done, fatal) = finish_chained(reply, answer, link);
            out.push((index, done, fatal));
        }
        out
    }

    /// Publishes a batch; every topic is checked before anything is
    /// written, so a batch with an unknown topic stores nothing.
    async fn publish(
        &mut self,
        messages: &[&NewMessage],
        now: Micros,
        t: &mut Touched,
    ) -> Result<Vec<PublishOutcome>> {
        let mut groups: Vec<(TopicRow, Vec<usize>)> = Vec::new();
        for (i, m) in messages.iter().enumerate() {
            match groups.iter_mut().find(|(topic, _)| topic.name == m.topic) {
                Some((_, indexes)) => indexes.push(i),
                None => groups.push((self.topic(&m.topic).await?, vec![i])),
            }
        }
        // Topic rows are locked in id order, so that two instances
        // publishing to the same topics cannot deadlock.
        groups.sort_by_key(|(topic, _)| topic.id);
        let mut outcomes = vec![None; messages.len()];
        for (topic, indexes) in groups {
            let batch: Vec<&NewMessage> = indexes.iter().map(|&i| messages[i]).collect();
            let results = self.publish_to(&topic, &batch, now).await?;
            for (i, outcome) in indexes.into_iter().zip(results) {
                outcomes[i] = Some(outcome);
            }
            t.topics.insert(topic.name);
        }
        Ok(outcomes.into_iter().flatten().collect())
    }

    /// Stores the messages of one topic that it has not seen yet.
    ///
    /// How a publish's sequence is chosen: the topic's row holds `last_seq`;
    /// each new message takes the next number, and `last_seq` is written
    /// back in the same transaction. On a shared database the row is locked
    /// first ([`Backend::lock_topic`]), so a concurrent publisher to the
    /// topic waits for this commit and then numbers after it: sequence
    /// numbers of a topic commit in order, and a cursor that moved past N
    /// never skips an N-1 that commits later.
    async fn publish_to(
        &mut self,
        topic: &TopicRow,
        messages: &[&NewMessage],
        now: Micros,
    ) -> Result<Vec<PublishOutcome>> {
        let last_seq = if B::EXCLUSIVE {
            self.topic(&topic.name).await?.last_seq
        } else {
            B::lock_topic(self.c(), topic.id).await?
        };
        let ids: Vec<Uuid> = messages.iter().map(|m| m.id).collect();
        let mut known: HashMap<Uuid, i64> = B::dedup_lookup(self.c(), topic.id, &ids)
            .await?
            .into_iter()
            .collect();
        let mut seq = last_seq;
        let mut fresh: Vec<(&NewMessage, i64)> = Vec::new();
        let mut outcomes = Vec::with_capacity(messages.len());
        for &m in messages {
            let (sequence, duplicate) = match known.get(&m.id) {
                Some(&sequence) => (sequence, true),
                None => {
                    seq += 1;
                    known.insert(m.id, seq);
                    fresh.push((m, seq));
                    (seq, false)
                }
            };
            outcomes.push(PublishOutcome {
                id: m.id,
                sequence,
                duplicate,
            });
        }
        let counts = self.tally.topic(&topic.name);
        counts.duplicates += (messages.len() - fresh.len()) as u64;
        counts.published += fresh.len() as u64;
        counts.bytes += fresh
            .iter()
            .map(|(m, _)| m.payload.len() as u64)
            .sum::<u64>();
        if fresh.is_empty() {
            return Ok(outcomes);
        }
        B::insert_messages(self.c(), topic.id, &fresh, now).await?;
        B::set_last_seq(self.c(), topic.id, seq).await?;
        self.published(topic, now);
        if let Some(cached) = self.topics.get_mut(&topic.name) {
            cached.last_seq = seq;
        }
        Ok(outcomes)
    }

    // ---- topics and subscriptions ----

    async fn create_topic(
        &mut self,
        name: String,
        settings: TopicSettings,
        now: Micros,
    ) -> Result<Topic> {
        let row = B::insert_topic(
            self.c(),
            &name,
            micros(settings.retention),
            micros(settings.max_age),
            now,
        )
        .await?
        .ok_or_else(|| Error::AlreadyExists(format!("topic {name:?} already exists")))?;
        Ok(row.to_topic())
    }

    async fn update_topic(&mut self, name: &str, patch: TopicPatch) -> Result<Topic> {
        let row = self.topic(name).await?;
        // The row lock keeps a concurrent update on another instance from
        // writing back a field this one changes (and the other way round).
        B::lock_topic(self.c(), row.id).await?;
        self.topics.remove(name);
        let row = self.topic(name).await?;
        B::set_topic_settings(
            self.c(),
            row.id,
            patch.retention.map(micros).unwrap_or(row.retention_us),
            patch.max_age.map(micros).unwrap_or(row.max_age_us),
        )
        .await?;
        self.topics.remove(name);
        self.topic_changed(name, i64::MIN);
        Ok(self.topic(name).await?.to_topic())
    }

    async fn delete_topic(&mut self, name: &str) -> Result<()> {
        let row = self.topic(name).await?;
        // Locked, so that no subscription is created on it meanwhile.
        B::lock_topic(self.c(), row.id).await?;
        let subs = B::sub_names(self.c(), Some(row.id)).await?;
        if !subs.is_empty() {
            return Err(Error::FailedPrecondition(format!(
                "topic {name:?} still has {} subscription(s) ({}); delete them first",
                subs.len(),
                some_names(&subs)
            )));
        }
        let users = B::dead_letter_users(self.c(), name, NAMES_SHOWN as i64 + 1).await?;
        if !users.is_empty() {
            return Err(Error::FailedPrecondition(format!(
                "topic {name:?} is the dead-letter topic of subscription(s) {}; \
                 change their dead_letter_topic first",
                some_names(&users)
            )));
        }
        B::delete_topic(self.c(), row.id).await?;
        self.tally.deleted_topics.push(name.to_owned());
        self.topics.remove(name);
        // SQLite may give a later topic this id again.
        self.deleted_below.remove(&row.id);
        self.held.forget_topic(row.id);
        tracing::info!(topic = name, "topic deleted");
        Ok(())
    }

    async fn check_dead_letter_topic(&mut self, topic: &str, dlt: Option<&str>) -> Result<()> {
        let Some(dlt) = dlt else { return Ok(()) };
        if dlt == topic {
            return Err(Error::InvalidArgument(format!(
                "dead-letter topic {dlt:?} is the subscription's own topic"
            )));
        }
        match self.topic(dlt).await {
            Err(Error::NotFound(_)) => Err(Error::NotFound(format!(
                "dead-letter topic {dlt:?} does not exist"
            ))),
            // Locked, so that it is not deleted before this commits.
            Ok(row) => B::lock_topic(self.c(), row.id).await.map(|_| ()),
            Err(e) => Err(e),
        }
    }

    async fn first_seq_at(&mut self, topic: &TopicRow, time: Micros) -> Result<i64> {
        let seq = B::first_seq_at(self.c(), topic.id, time).await?;
        Ok(seq.unwrap_or(topic.last_seq + 1))
    }

    async fn create_subscription(
        &mut self,
        sub: NewSubscription,
        now: Micros,
    ) -> Result<Subscription> {
        sub.settings.validate()?;
        let topic = self.topic(&sub.topic).await?;
        self.check_dead_letter_topic(&sub.topic, sub.settings.dead_letter_topic.as_deref())
            .await?;
        let cursor = match sub.start {
            StartPosition::Earliest => 0,
            StartPosition::Latest => topic.last_seq,
            StartPosition::Time(time) => self.first_seq_at(&topic, time).await? - 1,
        };
        if !B::insert_sub(self.c(), &sub.name, topic.id, &sub.settings, cursor, now).await? {
            return Err(Error::AlreadyExists(format!(
                "subscription {:?} already exists",
                sub.name
            )));
        }
        Ok(self.sub(&sub.name).await?.to_subscription())
    }

    async fn update_subscription(
        &mut self,
        name: &str,
        patch: SubscriptionPatch,
        now: Micros,
        t: &mut Touched,
    ) -> Result<Subscription> {
        let row = self.sub(name).await?;
        // Merged under the row lock, so that concurrent updates of different
        // fields (on any instance) both survive.
        B::lock_cursor(self.c(), row.id).await?;
        self.subs.remove(name);
        let row = self.sub(name).await?;
        let mut s = row.settings.clone();
        if let Some(v) = patch.ack_deadline {
            s.ack_deadline = v;
        }
        if let Some(v) = patch.max_attempts {
            s.max_attempts = v;
        }
        if let Some(v) = patch.min_backoff {
            s.min_backoff = v;
        }
        if let Some(v) = patch.max_backoff {
            s.max_backoff = v;
        }
        if let Some(v) = patch.dead_letter_topic {
            s.dead_letter_topic = v;
        }
        if let Some(v) = patch.ordered {
            s.ordered = v;
        }
        // The merged settings obey the one rule, checked here, in the
        // transaction, against the row as it is now.
        s.validate()?;
        self.check_dead_letter_topic(&row.topic, s.dead_letter_topic.as_deref())
            .await?;
        B::set_sub_settings(self.c(), row.id, &s).await?;
        if row.settings.ordered && !s.ordered {
            // Unordered, nothing holds a message back any more.
            B::release_held(self.c(), row.id, now).await?;
        }
        self.subs.remove(name);
        t.subs.insert(name.to_owned());
        Ok(self.sub(name).await?.to_subscription())
    }

    async fn delete_subscription(&mut self, name: &str, t: &mut Touched) -> Result<()> {
        let row = self.sub(name).await?;
        B::delete_sub(self.c(), row.id).await?;
        self.tally.deleted_subs.push(name.to_owned());
        self.topic_changed(&row.topic, i64::MIN);
        self.subs.remove(name);
        t.subs.insert(name.to_owned());
        tracing::info!(subscription = name, "subscription deleted");
        Ok(())
    }

    // ---- leasing ----

    /// Leases due redeliveries first, then new messages past the cursor.
    async fn lease(
        &mut self,
        req: LeaseRequest,
        now: Micros,
        t: &mut Touched,
    ) -> Result<LeaseBatch> {
        let sub = self.sub(&req.subscription).await?;
        let ordered = sub.settings.ordered;
        // Whether to look for due redeliveries and expired leases at all.
        // An exclusive writer knows when the next row falls due (waiting
        // messages of an ordered subscription may be due but held back by
        // their key, so those always look); a shared one looks every time
        // and sweeps expiries now and then.
        let (look, sweep) = if B::EXCLUSIVE {
            let look = ordered || now >= sub.check_at;
            (look, look)
        } else {
            let last = self.swept.get(&sub.id).copied().unwrap_or(i64::MIN);
            let sweep = now.saturating_sub(last) >= SWEEP_EVERY;
            if sweep {
                self.swept.insert(sub.id, now);
            }
            (true, sweep)
        };
        let expired = if sweep {
            self.expire(&sub, now, t).await?
        } else {
            0
        };
        if expired > 0 {
            t.subs.insert(sub.name.clone());
        }
        let deadline = now.saturating_add(micros(sub.settings.ack_deadline));
        let mut batch = LeaseBatch::default();
        let mut bytes = 0usize;
        let mut redelivered = 0i64;

        let due = if look {
            B::due_redeliveries(self.c(), &sub, now, req.max_messages as i64).await?
        } else {
            Vec::new()
        };
        let due_found = due.len();
        // The due rows the budget has room for; on an ordered subscription,
        // where a due row is its key's first in progress, each with the
        // held messages right behind it, a run the caller processes in
        // order (issue 14); then the held messages right behind the runs
        // this stream holds (a key stays with the stream holding it). All
        // are leased in one statement under one token.
        let mut heads = Vec::new();
        for (attempt, message) in due {
            if heads.len() >= req.max_messages
                || (!heads.is_empty() && bytes + message.payload.len() > req.max_bytes)
            {
                break;
            }
            bytes += message.payload.len();
            heads.push((attempt, message));
        }
        let mut taken = Vec::with_capacity(heads.len());
        let mut runs = HashMap::new();
        if ordered && heads.len() < req.max_messages {
            let keyed: Vec<(String, i64)> = heads
                .iter()
                .filter_map(|(_, m)| m.key.clone().map(|k| (k, m.sequence)))
                .collect();
            let per_key = share(req.max_messages - heads.len(), keyed.len());
            runs = B::held_followers(
                self.db.conn(),
                &sub,
                &keyed,
                per_key,
                0,
                now,
                &mut self.held,
            )
            .await?;
        }
        for head in heads {
            let run = head.1.key.as_ref().and_then(|k| runs.remove(k));
            taken.push(head);
            take_run(&mut taken, &mut bytes, run.into_iter().flatten(), &req);
        }
        if ordered && req.holder != 0 && !req.runs.is_empty() && taken.len() < req.max_messages {
            let per_key = share(req.max_messages - taken.len(), req.runs.len());
            let held = B::held_followers(
                self.db.conn(),
                &sub,
                &req.runs,
                per_key,
                req.holder,
                now,
                &mut self.held,
            )
            .await?;
            for run in held.into_values() {
                take_run(&mut taken, &mut bytes, run, &req);
            }
        }
        if !taken.is_empty() {
            let token = self.clock.token(req.holder);
            let seqs: Vec<i64> = taken.iter().map(|(_, m)| m.sequence).collect();
            B::lease_run(self.c(), sub.id, &seqs, deadline, token, now).await?;
            for (attempt, message) in taken {
                let attempt = attempt + 1;
                redelivered += i64::from(attempt > 1);
                batch
                    .deliveries
                    .push(leased(sub.id, message, attempt, token, deadline));
            }
        }

        // Then new messages past the cursor. A shared database's cursor is
        // read under the subscription's row lock, so instances take turns;
        // without news no lock is taken.
        let room = req.max_messages.saturating_sub(batch.deliveries.len());
        let wants = room > 0 && bytes < req.max_bytes;
        let locked_cursor = if B::EXCLUSIVE {
            wants.then_some(sub.cursor)
        } else if wants && B::last_seq(self.c(), sub.topic_id).await? > sub.cursor {
            Some(B::lock_cursor(self.c(), sub.id).await?)
        } else {
            None
        };
        let mut cursor = locked_cursor.unwrap_or(sub.cursor);
        let mut handed = 0i64;
        if let Some(from) = locked_cursor {
            let messages =
                B::messages_after(self.c(), sub.topic_id, &sub.topic, from, room as i64).await?;
            let blocked = if ordered {
                let keys: HashSet<String> = messages.iter().filter_map(|m| m.key.clone()).collect();
                let keys: Vec<String> = keys.into_iter().collect();
                B::keys_in_progress(self.c(), sub.id, &keys, req.holder, now).await?
            } else {
                HashMap::new()
            };
            // The streams of this process holding blocked keys' runs, with
            // the room their windows have left after this group's hand-outs.
            let mut rooms: HashMap<i64, isize> = HashMap::new();
            for &holder in blocked.values() {
                if holder != 0
                    && !rooms.contains_key(&holder)
                    && let Some(room) = self.routes.room(&sub.name, holder)
                {
                    let given = self.routed.get(&holder).copied().unwrap_or(0);
                    rooms.insert(holder, room - given);
                }
            }
            let budget = Budget {
                max_bytes: req.max_bytes,
                bytes,
                taken_any: !batch.deliveries.is_empty(),
            };
            let plan = plan_new(
                messages.iter().map(|m| (m.key.as_deref(), m.payload.len())),
                ordered,
                &blocked,
                &mut rooms,
                budget,
            );
            let mut rows: Vec<DeliveryRow> = Vec::with_capacity(plan.len());
            let mut routed: HashMap<i64, Vec<Delivery>> = HashMap::new();
            for (message, take) in messages.into_iter().zip(plan) {
                cursor = message.sequence;
                let key = if ordered { message.key.clone() } else { None };
                let holder = match take {
                    Take::Hold => {
                        rows.push((message.sequence, WAITING, 0, HELD, 0, None, key));
                        if B::EXCLUSIVE {
                            self.held.keep(sub.topic_id, message);
                        }
                        continue;
                    }
                    Take::Lease => req.holder,
                    Take::Route(holder) => holder,
                };
                let token = self.clock.token(holder);
                rows.push((message.sequence, LEASED, 1, deadline, token, Some(now), key));
                let delivery = leased(sub.id, message, 1, token, deadline);
                match take {
                    Take::Route(holder) => routed.entry(holder).or_default().push(delivery),
                    _ => batch.deliveries.push(delivery),
                }
            }
            for (holder, deliveries) in routed {
                *self.routed.entry(holder).or_default() += deliveries.len() as isize;
                handed += deliveries.len() as i64;
                batch.routed.push((holder, deliveries));
            }
            if !rows.is_empty() {
                B::insert_deliveries(self.c(), sub.id, &rows).await?;
            }
        }
        let delivered = batch.deliveries.len() as i64 + handed;
        if delivered > 0 {
            self.leased_until(&sub.name, deadline);
        }
        // The cursor is written only when it was read under the lock: an
        // unlocked copy may be older than another instance's commit, and
        // writing it back would replay messages acked since.
        let moved = locked_cursor.is_some_and(|from| cursor != from);
        if moved || delivered > 0 {
            B::advance(
                self.c(),
                sub.id,
                moved.then_some(cursor),
                delivered,
                redelivered,
            )
            .await?;
            if let Some(cached) = self.subs.get_mut(&sub.name) {
                cached.cursor = cursor;
            }
            batch.progressed = moved;
        }
        if B::EXCLUSIVE {
            batch.next_due = self
                .next_check(&sub, look, expired, due_found, &req, &batch, deadline, now)
                .await?;
        }
        // A shared database gives no next_due: finding the earliest future
        // deadline would walk the index through every lease acked since the
        // last VACUUM. Waiting streams are woken by NOTIFY, and otherwise by
        // the poll interval.
        Ok(batch)
    }

    /// Keeps a key's order once the lease of `seq` ended without an ack on
    /// an ordered subscription (the row waits now): if an earlier message
    /// of its key is still in progress, it is held back behind that one;
    /// either way every later message of its key in progress is held back
    /// too, their leases ended without counting an attempt, so none of them
    /// is acked before `seq` is settled (issue 14). Returns the sequences
    /// held here.
    async fn keep_order(&mut self, sub: &SubRow, seq: i64) -> Result<Vec<i64>> {
        let found = B::earlier_in_progress(self.c(), sub.id, &[seq]).await?;
        let Some((key, earlier)) = found.get(&seq) else {
            return Ok(Vec::new());
        };
        let from = if earlier.is_some() { seq } else { seq + 1 };
        B::hold_from(self.c(), sub.id, key, from).await
    }

    /// Exclusive writers: when `sub` next needs a look for redeliveries and
    /// expired leases, kept in the cache and told to the caller.
    #[allow(clippy::too_many_arguments)]
    async fn next_check(
        &mut self,
        sub: &SubRow,
        looked: bool,
        expired: u64,
        due_found: usize,
        req: &LeaseRequest,
        batch: &LeaseBatch,
        deadline: Micros,
        now: Micros,
    ) -> Result<Option<Micros>> {
        let mut check_at = sub.check_at;
        if looked {
            // Every due row was leased (and nothing else): the next one
            // falls due later.
            let all_taken = expired < EXPIRE_LIMIT
                && due_found < req.max_messages
                && batch.deliveries.len() == due_found;
            // Leases due by `now` but not before `expire_before` were left
            // for a later group, so the next look is at the earliest row
            // after `expire_before`.
            let after = self.expire_before.min(now);
            check_at = if all_taken {
                B::next_due(self.c(), sub.id, after)
                    .await?
                    .unwrap_or(i64::MAX)
            } else {
                // Some due rows were left for the next call.
                i64::MIN
            };
        }
        if !batch.deliveries.is_empty() {
            check_at = check_at.min(deadline);
        }
        if let Some(cached) = self.subs.get_mut(&sub.name) {
            cached.check_at = check_at;
        }
        Ok((check_at != i64::MAX && check_at != i64::MIN).then_some(check_at))
    }

    /// Ends the leases of `sub` whose deadline passed: each waits for a
    /// backoff, or is dead-lettered after its last attempt.
    ///
    /// When a lease expires: a lease is a deliveries row in state LEASED
    /// whose `available_at` is its deadline; it has expired once the
    /// writer's clock passes that deadline. An ack checked at or after the
    /// deadline is stale ([`classify`]), and this sweep (run by leases and
    /// by each maintenance round) applies [`after_attempt`] to it.
    async fn expire(&mut self, sub: &SubRow, now: Micros, t: &mut Touched) -> Result<u64> {
        let before = self.expire_before;
        let mut rows = B::expired_leases(self.c(), sub.id, before, EXPIRE_LIMIT as i64).await?;
        let expired = rows.len() as u64;
        // In sequence order, so that a key's first expired lease holds back
        // the later ones of its run before they are looked at.
        rows.sort_unstable_by_key(|&(seq, _, _)| seq);
        let mut held = HashSet::new();
        let mut ended = 0;
        for (seq, attempt, deadline) in rows {
            if held.contains(&seq) {
                // Held back behind an earlier message of its key: not an
                // attempt of its own.
                continue;
            }
            ended += 1;
            match after_attempt(&sub.settings, attempt, deadline, None) {
                AfterAttempt::DeadLetter => {
                    let reason = format!("lease expired on attempt {attempt}");
                    self.dead_letter(sub, seq, &reason, now, t).await?;
                }
                AfterAttempt::RetryAt(at) => {
                    B::set_waiting(self.c(), sub.id, seq, at, Some("lease expired")).await?;
                    self.due_at(&sub.name, at);
                    if sub.settings.ordered {
                        held.extend(self.keep_order(sub, seq).await?);
                    }
                }
            }
        }
        if ended > 0 {
            self.tally.sub(&sub.name).expired_leases += ended;
        }
        Ok(expired)
    }

    /// Dead-letters one delivery, and copies the message to the
    /// subscription's dead-letter topic if it has one.
    async fn dead_letter(
        &mut self,
        sub: &SubRow,
        seq: i64,
        reason: &str,
        now: Micros,
        t: &mut Touched,
    ) -> Result<()> {
        // Whether an earlier message of its key is still in progress (a run
        // whose later message was nacked for the last time): then the key
        // stays with that one, which lets the next go when it is settled.
        let first_of_key = !sub.settings.ordered
            || B::earlier_in_progress(self.c(), sub.id, &[seq])
                .await?
                .get(&seq)
                .is_none_or(|(_, earlier)| earlier.is_none());
        B::set_dead(self.c(), sub.id, seq, now, reason).await?;
        self.tally.sub(&sub.name).dead_lettered += 1;
        if sub.settings.ordered && first_of_key {
            // A dead letter no longer holds its key back.
            B::promote_next(self.c(), sub.id, &[seq], now).await?;
        }
        tracing::info!(subscription = %sub.name, sequence = seq, reason, "message dead-lettered");
        let Some(dlt) = sub.settings.dead_letter_topic.clone() else {
            return Ok(());
        };
        let Some(original) = B::message_at(self.c(), sub.topic_id, &sub.topic, seq).await? else {
            return Ok(());
        };
        let copy = NewMessage {
            id: original.id,
            topic: dlt.clone(),
            key: original.key,
            payload: original.payload,
            attributes: dead_letter_attributes(
                original.attributes,
                reason,
                seq,
                &sub.name,
                &sub.topic,
            ),
            created_at: original.created_at,
        };
        match self.topic(&dlt).await {
            Ok(topic) => {
                self.publish_to(&topic, &[&copy], now).await?;
                t.topics.insert(dlt);
            }
            Err(Error::NotFound(_)) => tracing::warn!(
                subscription = %sub.name,
                dead_letter_topic = %dlt,
                "dead-letter topic is gone; the dead letter is kept on the subscription only"
            ),
            Err(e) => return Err(e),
        }
        Ok(())
    }

    // ---- acks ----

    /// Checks leases against the stored deliveries (locking their rows on a
    /// shared database); [`classify`] is the one judge.
    async fn check(&mut self, sub: &SubRow, ids: &[AckId], at: Micros) -> Result<Vec<Check>> {
        let rows = B::deliveries(self.c(), sub.id, &ours(sub, ids)).await?;
        Ok(classify(sub, ids, &rows, at))
    }

    /// The subscription, the verdict on each id, and the sequences whose
    /// lease is current.
    async fn current(
        &mut self,
        sub: &str,
        ids: &[AckId],
        at: Micros,
    ) -> Result<(SubRow, Vec<Check>, Vec<i64>)> {
        let sub = self.sub(sub).await?;
        let checks = self.check(&sub, ids, at).await?;
        let current = current_seqs(&checks);
        Ok((sub, checks, current))
    }

    async fn ack(
        &mut self,
        sub: &str,
        ids: Vec<AckId>,
        at: Micros,
        now: Micros,
        t: &mut Touched,
    ) -> Result<(Vec<AckStatus>, Vec<Routed>)> {
        let sub = self.sub(sub).await?;
        // On an ordered subscription the rows' keys and the earlier
        // messages of their keys in progress are read with their leases.
        let (mut checks, earlier) = if sub.settings.ordered {
            let (rows, earlier) =
                B::deliveries_in_key_order(self.c(), sub.id, &ours(&sub, &ids)).await?;
            (classify(&sub, &ids, &rows, at), earlier)
        } else {
            (self.check(&sub, &ids, at).await?, Earlier::new())
        };
        let mut current = current_seqs(&checks);
        let mut keys = HashMap::new();
        if sub.settings.ordered && !current.is_empty() {
            keys = self
                .in_key_order(&sub, &mut checks, &mut current, earlier)
                .await?;
        }
        let mut routed = Vec::new();
        if !current.is_empty() {
            if sub.settings.ordered {
                // The messages held behind each acked key's run go on.
                routed = self.hand_on(&sub, &ids, &checks, &keys, at, now).await?;
            }
            B::delete_deliveries(self.c(), sub.id, &current).await?;
            B::add_acked(self.c(), sub.id, current.len() as i64).await?;
            self.topic_changed(&sub.topic, at);
            // An ack unblocks the next message of its key.
            if sub.settings.ordered {
                t.subs.insert(sub.name.clone());
            }
        }
        Ok((checks.into_iter().map(status_of).collect(), routed))
    }

    /// After acks on an ordered subscription (`keys`: the key of each
    /// accepted one), the messages held behind each acked run go on: to
    /// the stream whose run it was, leased at once as far as its window has
    /// room, so a key's backlog follows its stream without waiting to fall
    /// due and be leased again (issue 14); otherwise the next one falls
    /// due. Runs before the acked rows are deleted, so the walks start
    /// from them.
    async fn hand_on(
        &mut self,
        sub: &SubRow,
        ids: &[AckId],
        checks: &[Check],
        keys: &HashMap<i64, String>,
        at: Micros,
        now: Micros,
    ) -> Result<Vec<Routed>> {
        // Per key, the stream whose run it was, and its first and last
        // acked row (the rows a request acks of one key are consecutive, or
        // `in_key_order` refused the later ones); per stream, its acks.
        let mut runs: HashMap<&str, (i64, i64, i64)> = HashMap::new();
        let mut acks: HashMap<i64, usize> = HashMap::new();
        for (id, check) in ids.iter().zip(checks) {
            let (Check::Current { seq, .. }, Some(key)) = (check, keys.get(&id.sequence)) else {
                continue;
            };
            let holder = id.token >> 24;
            *acks.entry(holder).or_default() += 1;
            let (_, first, last) = runs.entry(key).or_insert((holder, *seq, *seq));
            *first = (*first).min(*seq);
            *last = (*last).max(*seq);
        }
        if runs.is_empty() {
            return Ok(Vec::new());
        }
        let probes: Vec<(String, i64, i64)> = runs
            .iter()
            .map(|(key, (_, first, last))| (key.to_string(), *first, *last))
            .collect();
        let held = B::held_after(self.c(), sub.id, &probes).await?;
        // Per stream, the heads its held messages follow.
        let mut heads: HashMap<i64, Vec<(String, i64)>> = HashMap::new();
        let mut promote = Vec::new();
        for (key, out_of_turn) in held {
            let Some(&(holder, _, last)) = runs.get(key.as_str()) else {
                continue;
            };
            if holder == 0 || out_of_turn {
                promote.push(last);
            } else {
                heads.entry(holder).or_default().push((key, last));
            }
        }
        let deadline = now.saturating_add(micros(sub.settings.ack_deadline));
        let mut routed = Vec::new();
        let mut handed = 0i64;
        let mut again = 0i64;
        for (holder, heads) in heads {
            // The stream's window frees the acked leases once it reads
            // the answer.
            let given = self.routed.get(&holder).copied().unwrap_or(0);
            let acked = acks.get(&holder).copied().unwrap_or(0) as isize;
            let room = self
                .routes
                .room(&sub.name, holder)
                .map_or(0, |room| usize::try_from(room - given + acked).unwrap_or(0));
            let mut taken: Vec<(i32, StoredMessage)> = Vec::new();
            if room > 0 {
                // An even share each: what the walks read beyond the room
                // would be payload read for nothing.
                let per_key = room.div_ceil(heads.len()) as i64;
                let found =
                    B::held_followers(self.db.conn(), sub, &heads, per_key, 0, now, &mut self.held)
                        .await?;
                for run in found.into_values() {
                    let left = room - taken.len();
                    taken.extend(run.into_iter().take(left));
                }
            }
            // Where nothing went to the stream, the next message falls due.
            let took: HashSet<&str> = taken.iter().filter_map(|(_, m)| m.key.as_deref()).collect();
            promote.extend(
                heads
                    .iter()
                    .filter(|(key, _)| !took.contains(key.as_str()))
                    .map(|(_, last)| *last),
            );
            if taken.is_empty() {
                continue;
            }
            let token = self.clock.token(holder);
            let seqs: Vec<i64> = taken.iter().map(|(_, m)| m.sequence).collect();
            B::lease_run(self.c(), sub.id, &seqs, deadline, token, now).await?;
            let deliveries: Vec<Delivery> = taken
                .into_iter()
                .map(|(attempt, message)| {
                    again += i64::from(attempt > 0);
                    leased(sub.id, message, attempt + 1, token, deadline)
                })
                .collect();
            handed += deliveries.len() as i64;
            *self.routed.entry(holder).or_default() += deliveries.len() as isize;
            routed.push((holder, deliveries));
        }
        if !promote.is_empty() {
            B::promote_next(self.c(), sub.id, &promote, at).await?;
        }
        if handed > 0 {
            self.leased_until(&sub.name, deadline);
            B::advance(self.c(), sub.id, None, handed, again).await?;
        }
        Ok(routed)
    }

    /// Ordered subscriptions take a key's acks in order: an ack whose key
    /// has an earlier message in progress that this request does not ack
    /// too is refused, and that message and the later ones of its key are
    /// held back (their leases end without counting an attempt) until the
    /// earlier one is settled. Otherwise a later message could be acked
    /// and the earlier one then nacked or expire (issue 14).
    /// `found`: [`Backend::earlier_in_progress`] of (at least) `current`.
    /// Returns the key of each accepted ack.
    async fn in_key_order(
        &mut self,
        sub: &SubRow,
        checks: &mut [Check],
        current: &mut Vec<i64>,
        found: Earlier,
    ) -> Result<HashMap<i64, String>> {
        current.sort_unstable();
        let mut accepted = HashSet::new();
        let mut refused: HashMap<String, (i64, i64)> = HashMap::new();
        for &seq in current.iter() {
            match found.get(&seq) {
                Some((key, Some(earlier))) if !accepted.contains(earlier) => {
                    refused.entry(key.clone()).or_insert((seq, *earlier));
                }
                _ => {
                    accepted.insert(seq);
                }
            }
        }
        let keys = found
            .into_iter()
            .filter(|(seq, _)| accepted.contains(seq))
            .map(|(seq, (key, _))| (seq, key))
            .collect();
        if refused.is_empty() {
            return Ok(keys);
        }
        current.retain(|seq| accepted.contains(seq));
        let mut held = HashMap::new();
        for (key, (from, earlier)) in refused {
            for seq in B::hold_from(self.c(), sub.id, &key, from).await? {
                held.insert(seq, earlier);
            }
        }
        for check in checks.iter_mut() {
            if let Check::Current { seq, .. } = *check
                && let Some(earlier) = held.get(&seq)
            {
                *check = Check::Refused(AckStatus::Stale(format!(
                    "ack of sequence {seq} refused: sequence {earlier} of the same ordering key \
                     is still in progress and must be acked first; the lease ended, and the \
                     message comes again after that one"
                )));
            }
        }
        Ok(keys)
    }

    async fn nack(
        &mut self,
        sub: &str,
        items: Vec<NackItem>,
        at: Micros,
        now: Micros,
        t: &mut Touched,
    ) -> Result<Vec<AckStatus>> {
        let sub = self.sub(sub).await?;
        let ids: Vec<AckId> = items.iter().map(|n| n.ack_id).collect();
        let checks = self.check(&sub, &ids, at).await?;
        let mut held = HashSet::new();
        for (check, item) in checks.iter().zip(&items) {
            let Check::Current { seq, attempt } = *check else {
                continue;
            };
            if held.contains(&seq) {
                // Held back behind an earlier message of its key nacked in
                // this request: its lease ended there, uncounted.
                continue;
            }
            self.tally.sub(&sub.name).nacks += 1;
            match after_attempt(&sub.settings, attempt, now, item.delay) {
                AfterAttempt::DeadLetter => {
                    let reason = if item.reason.is_empty() {
                        format!("nacked on attempt {attempt}")
                    } else {
                        item.reason.clone()
                    };
                    self.dead_letter(&sub, seq, &reason, now, t).await?;
                }
                AfterAttempt::RetryAt(at) => {
                    B::set_waiting(self.c(), sub.id, seq, at, Some(&item.reason)).await?;
                    self.due_at(&sub.name, at);
                    if sub.settings.ordered {
                        held.extend(self.keep_order(&sub, seq).await?);
                    }
                }
            }
            t.subs.insert(sub.name.clone());
        }
        Ok(checks.into_iter().map(status_of).collect())
    }

    async fn extend(
        &mut self,
        sub: &str,
        items: Vec<(AckId, Duration)>,
        at: Micros,
        now: Micros,
    ) -> Result<Vec<AckStatus>> {
        let sub = self.sub(sub).await?;
        let ids: Vec<AckId> = items.iter().map(|(id, _)| *id).collect();
        let checks = self.check(&sub, &ids, at).await?;
        let mut out = Vec::with_capacity(checks.len());
        for (check, (_, extension)) in checks.into_iter().zip(&items) {
            let Check::Current { seq, .. } = check else {
                out.push(status_of(check));
                continue;
            };
            let deadline = now.saturating_add(micros(*extension));
            B::set_deadline(self.c(), sub.id, seq, deadline).await?;
            self.leased_until(&sub.name, deadline);
            out.push(AckStatus::Ok(Some(deadline)));
        }
        Ok(out)
    }

    async fn release(
        &mut self,
        sub: &str,
        ids: Vec<AckId>,
        at: Micros,
        now: Micros,
        t: &mut Touched,
    ) -> Result<Vec<AckStatus>> {
        let (sub, checks, mut current) = self.current(sub, &ids, at).await?;
        if !current.is_empty() {
            B::release(self.c(), sub.id, &current, now).await?;
            if sub.settings.ordered {
                // Each key's first released message keeps its place; the
                // later ones of its key wait behind it.
                current.sort_unstable();
                let mut held = HashSet::new();
                for &seq in &current {
                    if !held.contains(&seq) {
                        held.extend(self.keep_order(&sub, seq).await?);
                    }
                }
            }
            self.due_at(&sub.name, now);
            t.subs.insert(sub.name.clone());
        }
        Ok(checks.into_iter().map(status_of).collect())
    }

    // ---- cursor and dead letters ----

    async fn seek(&mut self, sub: &str, target: SeekTarget, t: &mut Touched) -> Result<i64> {
        let row = self.sub(sub).await?;
        B::lock_cursor(self.c(), row.id).await?;
        let topic = self.topic(&row.topic).await?;
        let next = match target {
            SeekTarget::Sequence(seq) => seq.clamp(1, topic.last_seq + 1),
            SeekTarget::Time(time) => self.first_seq_at(&topic, time).await?,
        };
        // Messages before the target count as acked; leases and waiting
        // redeliveries go, and dead letters from the target on are replayed.
        B::reset_cursor(self.c(), row.id, next).await?;
        self.topic_changed(&row.topic, i64::MIN);
        self.subs.remove(sub);
        t.subs.insert(sub.to_owned());
        tracing::info!(
            subscription = sub,
            next_sequence = next,
            "subscription seeked"
        );
        Ok(next)
    }

    async fn redrive(
        &mut self,
        sub: &str,
        seqs: Vec<i64>,
        now: Micros,
        t: &mut Touched,
    ) -> Result<i64> {
        let row = self.sub(sub).await?;
        let count = B::redrive(self.c(), row.id, &seqs, now).await?;
        self.due_at(sub, now);
        t.subs.insert(sub.to_owned());
        tracing::info!(subscription = sub, count, "dead letters redriven");
        Ok(count)
    }

    async fn purge(&mut self, sub: &str, seqs: Option<Vec<i64>>) -> Result<i64> {
        let row = self.sub(sub).await?;
        let count = B::purge(self.c(), row.id, seqs.as_deref().unwrap_or(&[])).await?;
        if count > 0 {
            self.topic_changed(&row.topic, i64::MIN);
        }
        tracing::warn!(subscription = sub, count, "dead letters purged");
        Ok(count)
    }

    // ---- maintenance ----

    /// Notes for maintenance that `topic` changed at `at` (an ack, a seek,
    /// a purge, a subscription deleted, new settings): it may have messages
    /// to remove.
    fn topic_changed(&mut self, topic: &str, at: Micros) {
        self.sweep.topics.mark(topic, at);
    }

    /// Notes for maintenance that messages were published to `topic` at
    /// `now`: none of them can be removed before the retention passes (nor
    /// after, until acked, which notes the topic again) or expired before
    /// the max age passes.
    fn published(&mut self, topic: &TopicRow, now: Micros) {
        let mut after = topic.retention_us;
        if topic.max_age_us > 0 {
            after = after.min(topic.max_age_us.saturating_add(1));
        }
        self.sweep
            .topics
            .mark(&topic.name, now.saturating_add(after));
    }

    /// Exclusive writers: notes that a lease of `sub` ends at `deadline`, so
    /// that maintenance looks at it then. (A shared database's leases,
    /// taken by any instance, are found by a query.)
    fn leased_until(&mut self, sub: &str, deadline: Micros) {
        if B::EXCLUSIVE {
            self.sweep.subs.mark(sub, deadline);
        }
    }

    /// After a failed group: what its maintenance round found and did may
    /// not have happened, so it is looked at again.
    fn maintenance_rolled_back(&mut self) {
        self.sweep.rolled_back();
        self.deleted_below.clear();
    }

    /// Sweeps expired leases, deletes messages every subscription is done
    /// with (after the topic's retention), expires messages past a topic's
    /// max age and prunes the dedup table, each a bounded amount per round.
    ///
    /// A round looks only at what may have work, so an idle round costs a
    /// few statements however many topics and subscriptions exist (issue 11,
    /// item 8): the topics the writer saw change and those whose next
    /// message passes its retention or max age by now (`sweep.rs`); on an
    /// exclusive database the subscriptions with a lease past its deadline,
    /// from the same memory; on a shared one, where other instances lease
    /// and ack unseen, the subscriptions one indexed query finds with
    /// expired leases. A full pass over every topic (and, exclusive, every
    /// subscription), a page per round, covers what the memory cannot know:
    /// at start, and on a shared database every [`FULL_PASS_EVERY`], for
    /// work another instance noted and did not do (it stopped).
    async fn maintain(&mut self, now: Micros, t: &mut Touched) -> Result<MaintenanceReport> {
        let mut report = MaintenanceReport::default();
        // One instance at a time does the sweeping; the others skip it and
        // keep what they noted for their next round.
        if !B::try_maintenance_lock(self.c()).await? {
            return Ok(report);
        }
        self.sweep.start_round();
        let result = self.maintain_round(now, t, &mut report).await;
        if result.is_err() {
            // What the round took out of its schedules is due again, even
            // if the group commits what was done before the error.
            self.sweep.rolled_back();
        }
        result.map(|()| report)
    }

    async fn maintain_round(
        &mut self,
        now: Micros,
        t: &mut Touched,
        report: &mut MaintenanceReport,
    ) -> Result<()> {
        self.full_pass(now, report).await?;
        self.expire_leases(now, t, report).await?;
        let topics = self.sweep.take_due(Kind::Topic, now, ROUND_LIMIT);
        report.more |= topics.len() == ROUND_LIMIT && self.behind(Kind::Topic, now);
        for name in topics {
            let again = self.maintain_topic(&name, now, t, report).await?;
            self.sweep.again(Kind::Topic, &name, again);
        }
        let before = now - self.dedup_window;
        let pruned = B::prune_dedup(self.c(), before, DELETE_LIMIT as i64).await?;
        report.dedup_pruned = pruned;
        report.more |= pruned >= DELETE_LIMIT;
        tracing::debug!(
            topics_examined = report.topics_examined,
            subscriptions_examined = report.subscriptions_examined,
            topics_scheduled = self.sweep.topics.len(),
            subscriptions_scheduled = self.sweep.subs.len(),
            "maintenance round"
        );
        Ok(())
    }

    /// True if what a round left of `kind` has waited [`BEHIND`] or more.
    fn behind(&self, kind: Kind, now: Micros) -> bool {
        let schedule = match kind {
            Kind::Topic => &self.sweep.topics,
            Kind::Sub => &self.sweep.subs,
        };
        schedule
            .first_due()
            .is_some_and(|at| at <= now.saturating_sub(BEHIND))
    }

    /// Reads a page of the full pass, if one is running or due, and makes
    /// what it lists due now.
    async fn full_pass(&mut self, now: Micros, report: &mut MaintenanceReport) -> Result<()> {
        let Some((topics_after, subs_after)) = self.sweep.pass_page(now) else {
            return Ok(());
        };
        let page = ROUND_LIMIT as i64;
        let mut topics_next = None;
        if let Some(after) = topics_after {
            let topics = B::list_topics(self.c(), &after, page).await?;
            for topic in &topics {
                self.sweep.topics.mark(&topic.name, now);
            }
            if topics.len() == ROUND_LIMIT {
                topics_next = topics.last().map(|topic| topic.name.clone());
            }
        }
        let mut subs_next = None;
        if let Some(after) = subs_after {
            let subs = B::list_subs(self.c(), None, &after, page).await?;
            for sub in &subs {
                self.sweep.subs.mark(&sub.name, now);
            }
            if subs.len() == ROUND_LIMIT {
                subs_next = subs.last().map(|sub| sub.name.clone());
            }
        }
        // An exclusive writer sees every change after the first pass.
        let next = if B::EXCLUSIVE {
            i64::MAX
        } else {
            now.saturating_add(FULL_PASS_EVERY)
        };
        self.sweep.pass_read((topics_next, subs_next), next);
        report.more |= self.sweep.passing();
        Ok(())
    }

    /// Expires the leases past their deadline, in the subscriptions that may
    /// have some.
    async fn expire_leases(
        &mut self,
        now: Micros,
        t: &mut Touched,
        report: &mut MaintenanceReport,
    ) -> Result<()> {
        let names = if B::EXCLUSIVE {
            let names = self.sweep.take_due(Kind::Sub, now, ROUND_LIMIT);
            report.more |= names.len() == ROUND_LIMIT && self.behind(Kind::Sub, now);
            names
        } else {
            // Other instances' leases are not in this one's memory: one
            // query over the leases' deadlines (an index of leased rows
            // only) finds the subscriptions with expired ones.
            let (before, limit) = (self.expire_before, EXPIRE_LIMIT as i64);
            let mut names = B::subs_with_expired_leases(self.c(), before, limit).await?;
            report.more |= names.len() as u64 >= EXPIRE_LIMIT;
            names.sort_unstable();
            names.dedup();
            names
        };
        for name in names {
            let sub = match self.sub(&name).await {
                Ok(sub) => sub,
                Err(Error::NotFound(_)) => continue,
                Err(e) => return Err(e),
            };
            report.subscriptions_examined += 1;
            let expired = self.expire(&sub, now, t).await?;
            report.more |= expired >= EXPIRE_LIMIT;
            if expired > 0 {
                report.leases_expired += expired;
                t.subs.insert(name.clone());
            }
            if B::EXCLUSIVE {
                // Leases whose deadline is not before `expire_before` were
                // left for a later round, which the next deadline includes.
                let next = if expired >= EXPIRE_LIMIT {
                    Some(now)
                } else {
                    B::next_deadline(self.c(), sub.id).await?
                };
                self.sweep.again(Kind::Sub, &name, next);
            }
        }
        Ok(())
    }

    /// Looks at one topic: expires its messages past the max age, removes
    /// those every subscription is done with after the retention. Returns
    /// when it next needs a look if nothing changes it.
    async fn maintain_topic(
        &mut self,
        name: &str,
        now: Micros,
        t: &mut Touched,
        report: &mut MaintenanceReport,
    ) -> Result<Option<Micros>> {
        let topic = match self.topic(name).await {
            Ok(topic) => topic,
            Err(Error::NotFound(_)) => return Ok(None),
            Err(e) => return Err(e),
        };
        report.topics_examined += 1;
        // Without messages there is nothing to remove or expire until a
        // publish, which notes the topic again.
        if B::message_times(self.c(), topic.id, 0, 1).await?.is_empty() {
            return Ok(None);
        }
        let low = B::low_water(self.c(), topic.id)
            .await?
            .unwrap_or(topic.last_seq + 1);
        let mut expired = 0;
        if topic.max_age_us > 0 {
            expired = self
                .expire_old(&topic, low, now - topic.max_age_us, now, t)
                .await?;
            report.expired += expired;
        }
        let (deleted, more) = self
            .delete_done(&topic, low, now - topic.retention_us)
            .await?;
        report.deleted += deleted;
        report.more |= more;
        if more || expired > 0 {
            // Left over, or the expiry moved the subscriptions past
            // messages: the next round looks again.
            return Ok(Some(now));
        }
        self.next_look(&topic, low, now).await
    }

    /// When `topic` next has work if nothing changes it: when its first
    /// message below `low` passes the retention, or its first message from
    /// `low` on passes the max age; `None` if neither will happen (what
    /// could change that, an ack or a seek, notes the topic again).
    async fn next_look(
        &mut self,
        topic: &TopicRow,
        low: i64,
        now: Micros,
    ) -> Result<Option<Micros>> {
        let Some(&(first, published)) = B::message_times(self.c(), topic.id, 0, 1).await?.first()
        else {
            return Ok(None);
        };
        let mut next = None;
        if first < low {
            // `delete_done` removes messages published at or before
            // `now - retention`.
            next = Some(published.saturating_add(topic.retention_us));
        }
        if topic.max_age_us > 0 {
            let oldest_needed = if first >= low {
                Some(published)
            } else {
                let from_low = B::message_times(self.c(), topic.id, low, 1).await?;
                from_low.first().map(|&(_, published)| published)
            };
            if let Some(published) = oldest_needed {
                // `expire_old` expires messages published before
                // `now - max_age`.
                let at = published.saturating_add(topic.max_age_us).saturating_add(1);
                next = Some(next.map_or(at, |next: Micros| next.min(at)));
            }
        }
        if next.is_some_and(|at| at <= now) {
            // Due, yet this round left it: the memory of where deletion
            // stopped was wrong. Forget it; the next round starts from the
            // first stored message.
            self.deleted_below.remove(&topic.id);
        }
        Ok(next)
    }

    /// Deletes, by sequence range from where the last round stopped, the
    /// topic's messages below `low` published at or before `cutoff`;
    /// returns how many, and whether more remain.
    async fn delete_done(
        &mut self,
        topic: &TopicRow,
        low: i64,
        cutoff: Micros,
    ) -> Result<(u64, bool)> {
        let from = match self.deleted_below.get(&topic.id) {
            Some(&from) => from,
            None => B::first_seq(self.c(), topic.id).await?.unwrap_or(low),
        };
        let to = low.min(from.saturating_add(DELETE_LIMIT as i64));
        if to <= from {
            return Ok((0, false));
        }
        let deleted = B::delete_messages(self.c(), topic.id, from, to, cutoff).await?;
        self.held.forget(topic.id, from, to - 1);
        // Messages are published in time order: what stayed in the range is
        // younger than the retention, and so is what follows.
        let whole_range =
            deleted as i64 == to - from || !B::any_message_in(self.c(), topic.id, from, to).await?;
        let mut more = false;
        if whole_range {
            self.deleted_below.insert(topic.id, to);
            more = to < low;
        }
        Ok((deleted, more))
    }

    /// Expires the messages of `topic` published before `cutoff`, in every
    /// subscription; counts and logs those someone had not acked yet.
    async fn expire_old(
        &mut self,
        topic: &TopicRow,
        low: i64,
        cutoff: Micros,
        now: Micros,
        t: &mut Touched,
    ) -> Result<u64> {
        // Messages below `low` are done; they go with the expired ones if
        // older (they are, being published first).
        let mut last = None;
        let mut unacked = 0u64;
        for (seq, published_at) in B::message_times(self.c(), topic.id, low, 10_000).await? {
            if published_at >= cutoff {
                break;
            }
            last = Some(seq);
            unacked += 1;
        }
        let Some(last) = last else { return Ok(0) };
        let affected = B::expire_through(self.c(), topic.id, last, unacked as i64).await?;
        self.held.forget(topic.id, i64::MIN, last);
        // Keys whose message in progress expired let their next one go.
        B::heal_held(self.c(), topic.id, now).await?;
        self.topics.remove(&topic.name);
        for name in affected {
            self.subs.remove(&name);
            t.subs.insert(name);
        }
        tracing::warn!(
            topic = %topic.name,
            count = unacked,
            up_to_sequence = last,
            "unacked messages expired by the topic's max age"
        );
        Ok(unacked)
    }
}

/// How many held messages of each of `keys` keys a lease with `room` left
/// reads: each key's share, twice over (a run cut short goes on when its
/// leased part is acked), at least one.
fn share(room: usize, keys: usize) -> i64 {
    let per_key = (room / keys.max(1)).max(1).saturating_mul(2).min(room);
    per_key as i64
}

/// Adds the messages of a run to `taken` while the lease's budget allows;
/// the rest of the run stays held behind what was taken.
fn take_run(
    taken: &mut Vec<(i32, StoredMessage)>,
    bytes: &mut usize,
    run: impl IntoIterator<Item = (i32, StoredMessage)>,
    req: &LeaseRequest,
) {
    for (attempt, message) in run {
        if taken.len() >= req.max_messages || *bytes + message.payload.len() > req.max_bytes {
            break;
        }
        *bytes += message.payload.len();
        taken.push((attempt, message));
    }
}

/// A delivery of `message` on attempt `attempt`, leased under `token` until
/// `deadline`.
fn leased(
    sub_id: i64,
    message: StoredMessage,
    attempt: i32,
    token: i64,
    deadline: Micros,
) -> Delivery {
    Delivery {
        ack_id: AckId {
            subscription: sub_id,
            sequence: message.sequence,
            token,
            deadline: Some(deadline),
        },
        message,
        attempt,
        lease_deadline: deadline,
    }
}

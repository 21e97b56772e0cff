//! What the writer, the reader and both backends share: rows, batch
//! bookkeeping, lease checks and lease planning, the attribute encoding and
//! the limits. No SQL here.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use uuid::Uuid;

use super::routes::{Routed, Routes};
use super::{LeaseBatch, Op, Reply};
use crate::error::{Error, Result};
use crate::model::{
    AckId, AckStatus, DeadLetter, MessageState, Micros, PeekedMessage, StoredMessage, Subscription,
    SubscriptionSettings, Topic, TopicSettings, now_micros,
};

/// Decides when a failure that repeats is logged: the first at once, then
/// at most once per interval, saying how many went unlogged in between. A
/// failing disk or database must not write a line per attempt.
#[derive(Debug)]
pub(crate) struct LogLimit {
    every: Duration,
    last: Option<Instant>,
    unlogged: u64,
}

impl LogLimit {
    /// Logs at most once per `every`.
    pub(crate) const fn new(every: Duration) -> Self {
        LogLimit {
            every,
            last: None,
            unlogged: 0,
        }
    }

    /// Counts one occurrence at `now`. `Some(n)` means: log it now, and say
    /// that `n` occurrences since the last line were not logged.
    pub(crate) fn hit(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(last) if now.saturating_duration_since(last) < self.every => {
                self.unlogged += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.unlogged))
            }
        }
    }
}

/// Rows per multi-row statement.
pub(super) const CHUNK: usize = 500;

/// Most expired leases handled by one sweep of one subscription.
pub(super) const EXPIRE_LIMIT: u64 = 1000;

/// Most rows one maintenance round deletes per topic (and from the dedup
/// table), to keep each round's share of a group commit short.
pub(super) const DELETE_LIMIT: u64 = 2000;

/// A new `deliveries` row: seq, state, attempt, available_at, lease,
/// delivered_at, key.
pub(super) type DeliveryRow = (i64, i64, i32, i64, i64, Option<i64>, Option<String>);

/// Counts of a subscription's delivery rows, for its stats.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct DeliveryCounts {
    /// Leased and not expired.
    pub(super) in_flight: i64,
    /// Waiting or leased.
    pub(super) undone: i64,
    /// Dead-lettered.
    pub(super) dead: i64,
    /// The first waiting or leased sequence.
    pub(super) first_undone: Option<i64>,
    /// The first sequence of any row.
    pub(super) first_any: Option<i64>,
}

/// Reads the columns of `message_columns!` starting at column `at` from a row of
/// either backend.
pub(super) fn message_from_row<'r, R>(row: &'r R, at: usize, topic: &str) -> Result<StoredMessage>
where
    R: sqlx::Row,
    usize: sqlx::ColumnIndex<R>,
    i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    Option<i64>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    Vec<u8>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    Option<Vec<u8>>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    Option<String>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    let id: Vec<u8> = row.try_get(at + 1).map_err(decode_err)?;
    Ok(StoredMessage {
        sequence: row.try_get(at).map_err(decode_err)?,
        id: uuid_from(&id)?,
        topic: topic.to_owned(),
        key: row.try_get(at + 2).map_err(decode_err)?,
        payload: row.try_get(at + 3).map_err(decode_err)?,
        attributes: decode_attributes(row.try_get(at + 4).map_err(decode_err)?)?,
        created_at: row.try_get(at + 5).map_err(decode_err)?,
        published_at: row.try_get(at + 6).map_err(decode_err)?,
    })
}

/// Keeps, for each head of `heads` (key, sequence), the rows in progress of
/// its key held back right after it, up to the first that is not held: the
/// run that goes with the head. A row in progress that is not held (a
/// redriven dead letter, say) ends its key's run, since it must go first.
/// `rows`: (key, owned or borrowed, sequence, `available_at`, what to keep
/// of the row), each key's in sequence order.
pub(super) fn runs_behind<K, T>(
    rows: impl IntoIterator<Item = (K, i64, i64, T)>,
    heads: &[(String, i64)],
) -> HashMap<K, Vec<T>>
where
    K: std::borrow::Borrow<str> + Eq + std::hash::Hash,
{
    let heads: HashMap<&str, i64> = heads.iter().map(|(k, seq)| (k.as_str(), *seq)).collect();
    let mut runs: HashMap<K, Vec<T>> = HashMap::new();
    let mut ended = HashSet::new();
    for (key, seq, available_at, item) in rows {
        let Some(&head) = heads.get(key.borrow()) else {
            continue;
        };
        if seq <= head || ended.contains(&key) {
            continue;
        }
        if available_at != HELD {
            ended.insert(key);
            continue;
        }
        runs.entry(key).or_default().push(item);
    }
    runs
}

/// Reads a dead letter from a row of either backend: attempt, first and
/// last delivery, reason, when it died, then the message's columns
/// (`dead_letter_columns!`).
pub(super) fn dead_letter_from_row<'r, R>(row: &'r R, topic: &str) -> Result<DeadLetter>
where
    R: sqlx::Row,
    usize: sqlx::ColumnIndex<R>,
    i32: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    Option<i64>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    Vec<u8>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    Option<Vec<u8>>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    Option<String>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    Ok(DeadLetter {
        attempts: row.try_get(0).map_err(decode_err)?,
        first_delivery_at: row.try_get(1).map_err(decode_err)?,
        last_delivery_at: row.try_get(2).map_err(decode_err)?,
        reason: row
            .try_get::<Option<String>, _>(3)
            .map_err(decode_err)?
            .unwrap_or_default(),
        dead_lettered_at: row.try_get(4).map_err(decode_err)?,
        message: message_from_row(row, 5, topic)?,
    })
}

/// Reads a waiting or leased delivery row as Peek shows it: the columns of
/// a dead letter, then the row's state.
pub(super) fn peeked_from_row<'r, R>(row: &'r R, topic: &str, now: Micros) -> Result<PeekedMessage>
where
    R: sqlx::Row,
    usize: sqlx::ColumnIndex<R>,
    i32: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    Option<i64>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    Vec<u8>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    Option<Vec<u8>>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    Option<String>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    let row_state: i64 = row.try_get(12).map_err(decode_err)?;
    let d = dead_letter_from_row(row, topic)?;
    let (state, available_at) = match (row_state, d.dead_lettered_at) {
        (LEASED, at) => (MessageState::Leased, Some(at)),
        (_, HELD) => (MessageState::Held, None),
        (_, at) if at > now => (MessageState::Backoff, Some(at)),
        (_, at) => (MessageState::Ready, Some(at)),
    };
    Ok(PeekedMessage {
        message: d.message,
        state,
        attempts: d.attempts,
        available_at,
        reason: d.reason,
    })
}

/// The messages Peek shows: the subscription's undone delivery rows
/// (`undone`, read after its cursor) and the messages past the cursor it
/// had before (`new`), in sequence order, at most `limit`. A message in
/// both was leased between the two reads: its row says where it stands.
pub(super) fn peek_page(
    undone: Vec<PeekedMessage>,
    new: Vec<StoredMessage>,
    limit: usize,
) -> Vec<PeekedMessage> {
    let mut page = undone;
    let last = page.last().map_or(i64::MIN, |p| p.message.sequence);
    page.extend(
        new.into_iter()
            .filter(|m| m.sequence > last)
            .map(|message| PeekedMessage {
                message,
                state: MessageState::New,
                attempts: 0,
                available_at: None,
                reason: String::new(),
            }),
    );
    page.truncate(limit);
    page
}

/// The `available_at` of a message of an ordered subscription held back by
/// an earlier message of its key: never due by itself. When the key's
/// message in progress is acked or dead-lettered, the writer makes the next
/// one due (`Backend::promote_next`), so finding due redeliveries never
/// walks the held messages, however many wait.
pub(super) const HELD: Micros = i64::MAX;

/// Delivery states, as stored.
pub(super) const WAITING: i64 = 0;
pub(super) const LEASED: i64 = 1;
pub(super) const DEAD: i64 = 2;

/// Attributes as stored: `(u32 LE length, bytes)` for each name and value.
pub(crate) fn encode_attributes(attributes: &[(String, String)]) -> Option<Vec<u8>> {
    if attributes.is_empty() {
        return None;
    }
    let mut out = Vec::new();
    for (k, v) in attributes {
        for s in [k, v] {
            out.extend_from_slice(&(s.len() as u32).to_le_bytes());
            out.extend_from_slice(s.as_bytes());
        }
    }
    Some(out)
}

pub(crate) fn decode_attributes(bytes: Option<Vec<u8>>) -> Result<Vec<(String, String)>> {
    let Some(bytes) = bytes else {
        return Ok(Vec::new());
    };
    let corrupt = || Error::Storage("corrupt attributes column".into());
    let take = |rest: &mut &[u8]| -> Result<String> {
        let (len, tail) = rest.split_first_chunk::<4>().ok_or_else(corrupt)?;
        let len = u32::from_le_bytes(*len) as usize;
        if tail.len() < len {
            return Err(corrupt());
        }
        let (s, tail) = tail.split_at(len);
        *rest = tail;
        String::from_utf8(s.to_vec()).map_err(|_| corrupt())
    };
    let mut rest = bytes.as_slice();
    let mut out = Vec::new();
    while !rest.is_empty() {
        let k = take(&mut rest)?;
        out.push((k, take(&mut rest)?));
    }
    Ok(out)
}

pub(super) fn uuid_from(bytes: &[u8]) -> Result<Uuid> {
    Uuid::from_slice(bytes).map_err(|_| Error::Storage("corrupt message id column".into()))
}

pub(super) fn duration_from(us: i64) -> Duration {
    Duration::from_micros(us.max(0) as u64)
}

/// What a batch changed, to wake waiters after the commit.
#[derive(Debug, Default)]
pub(super) struct Touched {
    pub(super) topics: HashSet<String>,
    pub(super) subs: HashSet<String>,
}

/// Sends an operation's reply once the batch's fate is known: the argument
/// is what to tell its caller when the batch failed.
pub(super) type Done = Box<dyn FnOnce(Option<&str>) + Send>;

/// An error that leaves the group's transaction unusable: the group rolls
/// back.
#[derive(Debug, Clone)]
pub(super) struct Fatal {
    pub(super) reason: String,
    /// Storage refused this operation itself (`Error::Storage`), rather than
    /// being unavailable: the rest of its group may be retried without it.
    pub(super) own: bool,
}

/// A result that may carry messages leased to other streams of this
/// process (see `routes.rs`).
pub(super) trait Handing {
    fn handed(&mut self) -> &mut Vec<Routed>;
}

impl Handing for LeaseBatch {
    fn handed(&mut self) -> &mut Vec<Routed> {
        &mut self.routed
    }
}

impl Handing for (Vec<AckStatus>, Vec<Routed>) {
    fn handed(&mut self) -> &mut Vec<Routed> {
        &mut self.1
    }
}

/// As [`finish`], and once committed, first sends the messages the result
/// leased to other streams to them, before any later group's caller hears
/// of its own: a stream that drains its mailbox before passing on its own
/// lease sees a key's messages in order. Those of a stream gone meanwhile
/// stay in the result, for its caller to give back.
pub(super) fn finish_handing<T: Handing + Send + 'static>(
    reply: Reply<T>,
    result: Result<T>,
    routes: &Routes,
) -> (Done, Option<Fatal>) {
    let routes = routes.clone();
    finish_with(reply, result, move |mut value| {
        for (to, deliveries) in std::mem::take(value.handed()) {
            if let Err(unsent) = routes.send(to, deliveries) {
                value.handed().push((to, unsent));
            }
        }
        value
    })
}

/// What a failed operation means for its group: storage refused the
/// operation itself (`own`), or the group cannot commit.
fn fatal_of<T>(result: &Result<T>) -> Option<Fatal> {
    match result {
        Err(e @ (Error::Storage(_) | Error::Unavailable(_))) => Some(Fatal {
            reason: e.to_string(),
            own: matches!(e, Error::Storage(_)),
        }),
        _ => None,
    }
}

/// Wraps an operation's result; the second value is set when the error
/// leaves the transaction unusable, so the whole batch must roll back.
pub(super) fn finish<T: Send + 'static>(
    reply: Reply<T>,
    result: Result<T>,
) -> (Done, Option<Fatal>) {
    finish_with(reply, result, |value| value)
}

/// As [`finish`], with `committed` applied to a successful result once its
/// group committed, before its caller hears of it.
fn finish_with<T: Send + 'static>(
    reply: Reply<T>,
    result: Result<T>,
    committed: impl FnOnce(T) -> T + Send + 'static,
) -> (Done, Option<Fatal>) {
    let fatal = fatal_of(&result);
    let done: Done = Box::new(move |failed| {
        let result = match failed {
            Some(reason) => Err(Error::Unavailable(reason.to_owned())),
            None => result.map(committed),
        };
        reply.send(result);
    });
    (done, fatal)
}

impl Op {
    /// True for operations that settle leases (ack, nack, extend, release):
    /// a group runs them before anything that may expire a lease.
    pub(super) fn settles(&self) -> bool {
        matches!(
            self,
            Op::Ack(..) | Op::Nack(..) | Op::Extend(..) | Op::Release(..)
        )
    }

    /// Answers the operation without running it.
    pub(super) fn refuse(self, reason: &str) {
        let e = || Error::Unavailable(reason.to_owned());
        match self {
            Op::Publish(_, r, link) => {
                link.inspect(super::Link::failed);
                r.send(Err(e()))
            }
            Op::CreateTopic(_, _, r) | Op::UpdateTopic(_, _, r) => r.send(Err(e())),
            Op::DeleteTopic(_, r) | Op::DeleteSubscription(_, r) | Op::Close(r) => r.send(Err(e())),
            Op::CreateSubscription(_, r) | Op::UpdateSubscription(_, _, r) => r.send(Err(e())),
            Op::Lease(_, r) => r.send(Err(e())),
            Op::Ack(_, _, r) => r.send(Err(e())),
            Op::Nack(_, _, r) | Op::Release(_, _, r) => r.send(Err(e())),
            Op::Extend(_, _, r) => r.send(Err(e())),
            Op::Seek(_, _, r) | Op::Redrive(_, _, r) | Op::Purge(_, _, r) => r.send(Err(e())),
            Op::Maintain(r) => r.send(Err(e())),
        }
    }
}

/// A lease check's verdict.
pub(super) enum Check {
    Current { seq: i64, attempt: i32 },
    Refused(AckStatus),
}

pub(super) fn status_of(check: Check) -> AckStatus {
    match check {
        Check::Current { .. } => AckStatus::Ok(None),
        Check::Refused(status) => status,
    }
}

pub(super) fn decode_err(e: sqlx::Error) -> Error {
    Error::Storage(format!("reading a row: {e}"))
}

#[derive(Debug, Clone)]
pub(super) struct TopicRow {
    pub(super) id: i64,
    pub(super) name: String,
    pub(super) created_at: Micros,
    pub(super) retention_us: i64,
    pub(super) max_age_us: i64,
    pub(super) last_seq: i64,
    pub(super) expired_count: i64,
}

impl TopicRow {
    /// Reads the columns of `topic_columns!` from a row of either backend.
    pub(super) fn from_row<'r, R>(row: &'r R) -> Result<TopicRow>
    where
        R: sqlx::Row,
        usize: sqlx::ColumnIndex<R>,
        i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
        String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    {
        Ok(TopicRow {
            id: row.try_get(0).map_err(decode_err)?,
            name: row.try_get(1).map_err(decode_err)?,
            created_at: row.try_get(2).map_err(decode_err)?,
            retention_us: row.try_get(3).map_err(decode_err)?,
            max_age_us: row.try_get(4).map_err(decode_err)?,
            last_seq: row.try_get(5).map_err(decode_err)?,
            expired_count: row.try_get(6).map_err(decode_err)?,
        })
    }

    pub(super) fn to_topic(&self) -> Topic {
        Topic {
            name: self.name.clone(),
            settings: TopicSettings {
                retention: duration_from(self.retention_us),
                max_age: duration_from(self.max_age_us),
            },
            created_at: self.created_at,
            last_sequence: self.last_seq,
            expired_count: self.expired_count,
        }
    }
}

#[derive(Debug, Clone)]
pub(super) struct SubRow {
    pub(super) id: i64,
    pub(super) name: String,
    pub(super) topic_id: i64,
    pub(super) topic: String,
    pub(super) created_at: Micros,
    pub(super) settings: SubscriptionSettings,
    pub(super) cursor: i64,
    /// SQLite's writer only: no waiting or leased row falls due before this
    /// instant, so until then a lease need not look for redeliveries or
    /// expired leases. A lower bound kept in memory only; `i64::MIN` means
    /// "look".
    pub(super) check_at: Micros,
}

impl SubRow {
    /// Reads the columns of `sub_columns!` from a row of either backend.
    pub(super) fn from_row<'r, R>(row: &'r R) -> Result<SubRow>
    where
        R: sqlx::Row,
        usize: sqlx::ColumnIndex<R>,
        i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
        i32: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
        bool: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
        String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
        Option<String>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    {
        Ok(SubRow {
            id: row.try_get(0).map_err(decode_err)?,
            name: row.try_get(1).map_err(decode_err)?,
            topic_id: row.try_get(2).map_err(decode_err)?,
            topic: row.try_get(3).map_err(decode_err)?,
            created_at: row.try_get(4).map_err(decode_err)?,
            settings: SubscriptionSettings {
                ack_deadline: duration_from(row.try_get(5).map_err(decode_err)?),
                max_attempts: row.try_get(6).map_err(decode_err)?,
                min_backoff: duration_from(row.try_get(7).map_err(decode_err)?),
                max_backoff: duration_from(row.try_get(8).map_err(decode_err)?),
                dead_letter_topic: row.try_get(9).map_err(decode_err)?,
                ordered: row.try_get(10).map_err(decode_err)?,
            },
            cursor: row.try_get(11).map_err(decode_err)?,
            check_at: i64::MIN,
        })
    }

    pub(super) fn to_subscription(&self) -> Subscription {
        Subscription {
            name: self.name.clone(),
            topic: self.topic.clone(),
            settings: self.settings.clone(),
            created_at: self.created_at,
        }
    }
}

/// The sequences of `ids` that name a delivery of `sub`, whose rows a
/// lease check reads.
pub(super) fn ours(sub: &SubRow, ids: &[AckId]) -> Vec<i64> {
    ids.iter()
        .filter(|id| id.subscription == sub.id)
        .map(|id| id.sequence)
        .collect()
}

/// The sequences whose lease check found the lease current.
pub(super) fn current_seqs(checks: &[Check]) -> Vec<i64> {
    checks
        .iter()
        .filter_map(|c| match c {
            Check::Current { seq, .. } => Some(*seq),
            Check::Refused(_) => None,
        })
        .collect()
}

/// The oldest message of a subscription nobody acked or dead-lettered: the
/// first waiting or leased one, or the first one past the cursor.
pub(super) fn oldest_unacked(cursor: i64, last_seq: i64, first_undone: Option<i64>) -> Option<i64> {
    let next_new = (cursor < last_seq).then_some(cursor + 1);
    match (first_undone, next_new) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The highest sequence at or below which nothing can be delivered again:
/// below the first row of any state (dead letters can be redriven) and at
/// most the cursor.
pub(super) fn ack_watermark(cursor: i64, first_any: Option<i64>) -> i64 {
    first_any.map_or(cursor, |s| (s - 1).min(cursor))
}

/// Judges acks (or nacks, extensions, releases) against the stored rows of
/// subscription `sub`: `rows` maps a sequence to (state, lease token,
/// available_at, attempt). `at` is when the request reached the broker: a
/// lease whose deadline is later counts, however long the request queued.
///
/// What an ack with an old lease gets: `STALE` with the reason when the
/// row's token differs (leased again), the row is no longer leased (nacked,
/// released, expired, dead-lettered) or its deadline passed before `at`;
/// also `STALE` when no row is left, the message was delivered (at or
/// below the cursor) and the lease's deadline (carried by the ack id) passed
/// before `at`: it was acked under a later lease, or removed. `UNKNOWN` for
/// a repeated ack within its lease, ids of another subscription, repeated in
/// one request, or of messages never delivered.
pub(super) fn classify(
    sub: &SubRow,
    ids: &[AckId],
    rows: &HashMap<i64, (i64, i64, i64, i32)>,
    at: Micros,
) -> Vec<Check> {
    let mut seen = HashSet::new();
    ids.iter()
        .map(|id| {
            // The lease's first deadline, if the request came after it.
            let ended = id.deadline.filter(|&d| d <= at);
            if id.subscription != sub.id {
                return Check::Refused(AckStatus::Unknown(format!(
                    "ack id {id} does not belong to subscription {:?}",
                    sub.name
                )));
            }
            if !seen.insert(id.sequence) {
                return Check::Refused(AckStatus::Unknown(format!(
                    "ack id {id} appears twice in one commit"
                )));
            }
            match rows.get(&id.sequence) {
                // The message is done and its row gone: an ack that came
                // after its lease ended is stale (the message was redelivered
                // and acked, or removed); one within it repeats an ack.
                None if id.sequence <= sub.cursor && id.sequence > 0 && ended.is_some() => {
                    Check::Refused(AckStatus::Stale(format!(
                        "lease {id} is stale: it ended {} ms before the request arrived, and \
                         the message was acked or removed since",
                        (at - ended.unwrap_or(at)) / 1000
                    )))
                }
                None => Check::Refused(AckStatus::Unknown(format!(
                    "no delivery for ack id {id}: already acked, purged, or never delivered"
                ))),
                Some(&(_, lease, _, _)) if lease != id.token => Check::Refused(AckStatus::Stale(
                    format!("lease {id} is stale: the message was leased again since"),
                )),
                Some(&(state, _, _, _)) if state == DEAD => Check::Refused(AckStatus::Stale(
                    format!("lease {id} is stale: the message was dead-lettered"),
                )),
                Some(&(state, _, _, _)) if state != LEASED => Check::Refused(AckStatus::Stale(
                    format!("lease {id} is stale: it ended (nacked, released or expired)"),
                )),
                Some(&(_, _, deadline, _)) if deadline <= at => {
                    Check::Refused(AckStatus::Stale(format!(
                        "lease {id} is stale: it expired {} ms before the request arrived",
                        (at - deadline) / 1000
                    )))
                }
                Some(&(_, _, _, attempt)) => Check::Current {
                    seq: id.sequence,
                    attempt,
                },
            }
        })
        .collect()
}

/// The writer's clock and lease tokens.
#[derive(Debug)]
pub(super) struct Clock {
    now: Micros,
    token_state: u64,
}

impl Clock {
    /// A clock with a random token seed.
    pub(super) fn new() -> Clock {
        Clock {
            now: 0,
            token_state: Uuid::new_v4().as_u64_pair().0,
        }
    }

    /// A monotonic "now" for a batch.
    pub(super) fn tick(&mut self) -> Micros {
        self.now = self.now.max(now_micros());
        self.now
    }

    /// A fresh lease token for `holder` (0: none): the holder in the high
    /// bits (`token >> 24`, see `Holder`), 24 random bits below
    /// (splitmix64 over a random seed), so that a lease given again, even
    /// to the same stream, almost surely has another token.
    pub(super) fn token(&mut self, holder: i64) -> i64 {
        self.token_state = self.token_state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.token_state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        let random = ((z ^ (z >> 31)) & 0xFF_FFFF) as i64;
        (holder << 24) | random
    }
}

/// The attributes of a dead letter's copy on the dead-letter topic.
pub(super) fn dead_letter_attributes(
    mut attributes: Vec<(String, String)>,
    reason: &str,
    sequence: i64,
    subscription: &str,
    topic: &str,
) -> Vec<(String, String)> {
    attributes.extend([
        ("tidings.dead_letter.reason".to_owned(), reason.to_owned()),
        (
            "tidings.dead_letter.sequence".to_owned(),
            sequence.to_string(),
        ),
        (
            "tidings.dead_letter.subscription".to_owned(),
            subscription.to_owned(),
        ),
        ("tidings.dead_letter.topic".to_owned(), topic.to_owned()),
    ]);
    attributes.sort();
    attributes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeated_failure_is_logged_first_then_summarised_per_interval() {
        let every = Duration::from_secs(5);
        let mut limit = LogLimit::new(every);
        let start = Instant::now();
        assert_eq!(limit.hit(start), Some(0), "the first is logged at once");
        // 576 failures within the interval (as many as one disk-full run
        // logged in 20 s): none is logged.
        for i in 1..=576u32 {
            assert_eq!(limit.hit(start + every * i / 1000), None);
        }
        // The next one after the interval is logged with the count.
        assert_eq!(limit.hit(start + every), Some(576));
        assert_eq!(limit.hit(start + every + Duration::from_secs(1)), None);
        assert_eq!(limit.hit(start + every * 3), Some(1));
    }

    #[test]
    fn attributes_round_trip_and_corruption_is_reported() {
        let attrs = vec![
            ("a".to_owned(), "1".to_owned()),
            ("b".to_owned(), String::new()),
        ];
        assert_eq!(decode_attributes(encode_attributes(&attrs)).unwrap(), attrs);
        assert!(
            decode_attributes(encode_attributes(&[]))
                .unwrap()
                .is_empty()
        );
        let mut bytes = encode_attributes(&attrs).unwrap();
        bytes.pop();
        assert!(decode_attributes(Some(bytes)).is_err());
    }
}

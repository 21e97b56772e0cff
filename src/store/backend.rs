//! The narrow interface between the one writer (and reader) and a database:
//! one method per statement, plus the few things the backends really do
//! differently. Each backend implements it in its own file, beside its SQL;
//! no control flow lives there.
//!
//! The real differences, named here so that a reader can tell design from
//! drift:
//!
//! - [`Backend::EXCLUSIVE`]: SQLite's writer is the only writer of its
//!   database, so the writer may cache topic and subscription rows and the
//!   instant a subscription next needs a look for redeliveries. PostgreSQL
//!   is shared by several broker instances, so the writer caches nothing
//!   another instance can change and relies on row locks instead.
//! - Locks: [`Backend::lock_topic`] (the per-topic sequence counter),
//!   [`Backend::lock_cursor`], the delivery rows read by
//!   [`Backend::deliveries`], and `SKIP LOCKED` in
//!   [`Backend::due_redeliveries`] and [`Backend::expired_leases`] take row
//!   locks on PostgreSQL and are plain reads on SQLite (one writer).
//! - Transactions: [`Backend::begin`] (`BEGIN IMMEDIATE` on SQLite),
//!   [`Backend::commit`] (PostgreSQL first notifies other instances of what
//!   the group touched), [`Backend::recover`] after a failed group
//!   (PostgreSQL reconnects a broken connection, or one
//!   [`Backend::distrust`] marked after a group ran past its deadline).
//! - [`Backend::try_maintenance_lock`]: one instance at a time maintains a
//!   shared database.

use std::collections::HashMap;

use uuid::Uuid;

use super::common::{DeliveryCounts, DeliveryRow, SubRow, TopicRow, Touched};
use super::held::HeldMessages;
use crate::error::Result;
use crate::model::{
    DeadLetter, Micros, NewMessage, PeekedMessage, StoredMessage, SubscriptionSettings,
};

/// A backend's connection type.
pub(super) type Conn<B> = <<B as Backend>::Db as sqlx::Database>::Connection;

/// A delivery row as a lease check reads it: state, lease token,
/// available_at (the lease deadline while leased), attempt.
pub(super) type LeaseState = (i64, i64, Micros, i32);

/// Per keyed row, its key and the nearest earlier message of that key in
/// progress, as [`Backend::earlier_in_progress`] finds it.
pub(super) type Earlier = HashMap<i64, (String, Option<i64>)>;

/// A row of [`Backend::deliveries_in_key_order`]'s statement: seq, the
/// [`LeaseState`], the key, the nearest earlier message of it in progress.
pub(super) type KeyOrderRow = (i64, i64, i64, Micros, i32, Option<String>, Option<i64>);

/// Files the rows of [`Backend::deliveries_in_key_order`]'s statement.
pub(super) fn split_key_order(
    found: Vec<KeyOrderRow>,
    rows: &mut HashMap<i64, LeaseState>,
    earlier: &mut Earlier,
) {
    for (seq, state, lease, available_at, attempt, key, before) in found {
        rows.insert(seq, (state, lease, available_at, attempt));
        if let Some(key) = key {
            earlier.insert(seq, (key, before));
        }
    }
}

/// One database's statements and its few real differences; see the module
/// documentation. Every statement runs on the connection it is given: the
/// writer's (inside its group's transaction) or a pooled read connection.
pub(super) trait Backend: Send + 'static {
    /// The sqlx database.
    type Db: sqlx::Database;

    /// True if this writer is the database's only writer.
    const EXCLUSIVE: bool;

    // ---- the writer's connection and its transactions ----

    /// The writer's connection.
    fn conn(&mut self) -> &mut Conn<Self>;

    /// Starts a group's transaction.
    async fn begin(&mut self) -> Result<()>;

    /// Commits a group's transaction; `touched` is what it changed.
    async fn commit(&mut self, touched: &Touched) -> Result<()>;

    /// Marks the writer's connection as untrustworthy: a group on it ran
    /// past its deadline and was abandoned mid-statement, so `recover` must
    /// not wait on it again. PostgreSQL replaces it; SQLite's connection is
    /// a local file, which a rollback puts right.
    fn distrust(&mut self) {}

    /// Cleans up after a failed group. Returns true if storage itself is
    /// failing (health turns NOT_SERVING until a commit succeeds).
    async fn recover(&mut self) -> bool;

    /// Rolls back a group after storage refused one of its operations
    /// (storage itself works), so that the rest can run again. Returns
    /// false if the connection did not take the rollback; then the group
    /// fails as in an outage and [`Backend::recover`] runs.
    async fn rollback(&mut self) -> bool;

    /// Closes the writer's connection.
    async fn close(self);

    /// Takes the maintenance lock for this transaction; false if another
    /// instance holds it.
    async fn try_maintenance_lock(c: &mut Conn<Self>) -> Result<bool>;

    // ---- topics ----

    /// The topic named `name`.
    async fn topic(c: &mut Conn<Self>, name: &str) -> Result<Option<TopicRow>>;

    /// Topics in name order after `after`, at most `limit`.
    async fn list_topics(c: &mut Conn<Self>, after: &str, limit: i64) -> Result<Vec<TopicRow>>;

    /// Inserts a topic; `None` if the name is taken.
    async fn insert_topic(
        c: &mut Conn<Self>,
        name: &str,
        retention_us: i64,
        max_age_us: i64,
        now: Micros,
    ) -> Result<Option<TopicRow>>;

    /// Locks the topic's row (its sequence counter) and reads `last_seq`.
    async fn lock_topic(c: &mut Conn<Self>, topic_id: i64) -> Result<i64>;

    /// The topic's `last_seq`, without a lock.
    async fn last_seq(c: &mut Conn<Self>, topic_id: i64) -> Result<i64>;

    /// Sets the topic's `last_seq`.
    async fn set_last_seq(c: &mut Conn<Self>, topic_id: i64, seq: i64) -> Result<()>;

    /// Writes a topic's settings.
    async fn set_topic_settings(
        c: &mut Conn<Self>,
        topic_id: i64,
        retention_us: i64,
        max_age_us: i64,
    ) -> Result<()>;

    /// Deletes a topic with its messages and dedup entries.
    async fn delete_topic(c: &mut Conn<Self>, topic_id: i64) -> Result<()>;

    // ---- messages ----

    /// The ids among `ids` already published to the topic, with their
    /// sequence numbers.
    async fn dedup_lookup(
        c: &mut Conn<Self>,
        topic_id: i64,
        ids: &[Uuid],
    ) -> Result<Vec<(Uuid, i64)>>;

    /// Stores new messages and their dedup entries.
    async fn insert_messages(
        c: &mut Conn<Self>,
        topic_id: i64,
        messages: &[(&NewMessage, i64)],
        now: Micros,
    ) -> Result<()>;

    /// Up to `limit` messages of the topic after sequence `after`, in order.
    async fn messages_after(
        c: &mut Conn<Self>,
        topic_id: i64,
        topic: &str,
        after: i64,
        limit: i64,
    ) -> Result<Vec<StoredMessage>>;

    /// The message at `seq`, if it is still stored.
    async fn message_at(
        c: &mut Conn<Self>,
        topic_id: i64,
        topic: &str,
        seq: i64,
    ) -> Result<Option<StoredMessage>>;

    /// The first sequence published at or after `time`.
    async fn first_seq_at(c: &mut Conn<Self>, topic_id: i64, time: Micros) -> Result<Option<i64>>;

    /// The topic's first stored sequence.
    async fn first_seq(c: &mut Conn<Self>, topic_id: i64) -> Result<Option<i64>>;

    /// When the message at `seq` was published.
    async fn published_at(c: &mut Conn<Self>, topic_id: i64, seq: i64) -> Result<Option<Micros>>;

    // ---- subscriptions ----

    /// The subscription named `name`, with its topic's name.
    async fn sub(c: &mut Conn<Self>, name: &str) -> Result<Option<SubRow>>;

    /// Subscriptions in name order after `after`, optionally of one topic.
    async fn list_subs(
        c: &mut Conn<Self>,
        topic: Option<&str>,
        after: &str,
        limit: i64,
    ) -> Result<Vec<SubRow>>;

    /// Names of the subscriptions of a topic (all if `None`), in name order.
    async fn sub_names(c: &mut Conn<Self>, topic_id: Option<i64>) -> Result<Vec<String>>;

    /// Up to `limit` subscriptions, in name order, whose dead-letter topic
    /// is `topic`.
    async fn dead_letter_users(c: &mut Conn<Self>, topic: &str, limit: i64) -> Result<Vec<String>>;

    /// Inserts a subscription; false if the name is taken.
    async fn insert_sub(
        c: &mut Conn<Self>,
        name: &str,
        topic_id: i64,
        settings: &SubscriptionSettings,
        cursor: i64,
        now: Micros,
    ) -> Result<bool>;

    /// Locks the subscription's row and reads its cursor.
    async fn lock_cursor(c: &mut Conn<Self>, sub_id: i64) -> Result<i64>;

    /// Writes a subscription's settings.
    async fn set_sub_settings(
        c: &mut Conn<Self>,
        sub_id: i64,
        settings: &SubscriptionSettings,
    ) -> Result<()>;

    /// Deletes a subscription with its deliveries.
    async fn delete_sub(c: &mut Conn<Self>, sub_id: i64) -> Result<()>;

    /// Moves the cursor (if `cursor` is set) and adds to the counters.
    async fn advance(
        c: &mut Conn<Self>,
        sub_id: i64,
        cursor: Option<i64>,
        delivered: i64,
        redelivered: i64,
    ) -> Result<()>;

    /// Adds to the acked counter.
    async fn add_acked(c: &mut Conn<Self>, sub_id: i64, count: i64) -> Result<()>;

    /// Drops the subscription's leases, waiting rows and the dead letters
    /// from `next` on, and sets the cursor to `next - 1`.
    async fn reset_cursor(c: &mut Conn<Self>, sub_id: i64, next: i64) -> Result<()>;

    /// The counters: delivered, acked, redelivered, and the topic's last
    /// sequence.
    async fn counters(c: &mut Conn<Self>, sub_id: i64) -> Result<(i64, i64, i64, i64)>;

    // ---- deliveries ----

    /// Waiting rows due at `now` with their attempt and message, at most
    /// `limit`; on an ordered subscription only the oldest of each key.
    /// Rows another instance holds are skipped.
    async fn due_redeliveries(
        c: &mut Conn<Self>,
        sub: &SubRow,
        now: Micros,
        limit: i64,
    ) -> Result<Vec<(i32, StoredMessage)>>;

    /// Leases waiting rows again, each on its next attempt, all under one
    /// token (a run of a key, issue 14).
    async fn lease_run(
        c: &mut Conn<Self>,
        sub_id: i64,
        seqs: &[i64],
        deadline: Micros,
        token: i64,
        now: Micros,
    ) -> Result<()>;

    /// Inserts rows for new messages (leased or held back by their key).
    async fn insert_deliveries(c: &mut Conn<Self>, sub_id: i64, rows: &[DeliveryRow])
    -> Result<()>;

    /// Of `keys`, those with a waiting or leased row, except those whose
    /// newest row in progress is leased by `holder` (not 0) until after
    /// `now`: that stream holds the key's run, which it may extend (issue
    /// 14). Each with the stream holding its run likewise (its newest row
    /// in progress leased until after `now`), or 0.
    async fn keys_in_progress(
        c: &mut Conn<Self>,
        sub_id: i64,
        keys: &[String],
        holder: i64,
        now: Micros,
    ) -> Result<HashMap<String, i64>>;

    /// When the earliest waiting or leased row falls due after `now`.
    async fn next_due(c: &mut Conn<Self>, sub_id: i64, now: Micros) -> Result<Option<Micros>>;

    /// Leases whose deadline passed: seq, attempt, deadline; at most
    /// `limit`, skipping rows another instance holds.
    async fn expired_leases(
        c: &mut Conn<Self>,
        sub_id: i64,
        now: Micros,
        limit: i64,
    ) -> Result<Vec<(i64, i32, Micros)>>;

    /// The rows of `seqs` that exist, for a lease check (locked).
    async fn deliveries(
        c: &mut Conn<Self>,
        sub_id: i64,
        seqs: &[i64],
    ) -> Result<HashMap<i64, LeaseState>>;

    /// Makes a row wait until `at`; `reason` replaces the stored one if set.
    async fn set_waiting(
        c: &mut Conn<Self>,
        sub_id: i64,
        seq: i64,
        at: Micros,
        reason: Option<&str>,
    ) -> Result<()>;

    /// For each of the rows `seqs` (a message of its key that is done or
    /// dead), makes the next message of its key due at `now` if it was held
    /// back (`HELD`).
    async fn promote_next(c: &mut Conn<Self>, sub_id: i64, seqs: &[i64], now: Micros)
    -> Result<()>;

    /// For each keyed row of `seqs`: its key, and the nearest earlier
    /// message of that key in progress (waiting, held or leased) that was
    /// last delivered no later than it (a dead letter redriven after it was
    /// delivered does not count: it is out of turn), if any. Rows without a
    /// key are left out.
    async fn earlier_in_progress(c: &mut Conn<Self>, sub_id: i64, seqs: &[i64]) -> Result<Earlier>;

    /// [`deliveries`](Backend::deliveries) and
    /// [`earlier_in_progress`](Backend::earlier_in_progress) of the same
    /// rows in one statement: the check of an ack on an ordered
    /// subscription reads both.
    async fn deliveries_in_key_order(
        c: &mut Conn<Self>,
        sub_id: i64,
        seqs: &[i64],
    ) -> Result<(HashMap<i64, LeaseState>, Earlier)>;

    /// Holds back (`HELD`) every message of `key` from sequence `from` on
    /// that is in progress and not held yet: a leased one's lease ends and
    /// its attempt is taken back; a waiting one keeps its attempt. Returns
    /// the sequences it changed.
    async fn hold_from(c: &mut Conn<Self>, sub_id: i64, key: &str, from: i64) -> Result<Vec<i64>>;

    /// Of `runs` (key, first and last row of a run being acked), the keys
    /// whose next row in progress after the run is held back, each with
    /// whether a row out of turn is in progress before the run (a redriven
    /// dead letter, a row let go when ordering was switched off: it goes
    /// first). One index probe per key, reading no payload.
    async fn held_after(
        c: &mut Conn<Self>,
        sub_id: i64,
        runs: &[(String, i64, i64)],
    ) -> Result<Vec<(String, bool)>>;

    /// For each (key, sequence) of `heads`, the held-back messages of the
    /// key that follow it with no message of the key in progress between
    /// (with their attempts), in order, at most `per_key` of each: the runs
    /// a lease of the heads takes with them (locked). With a `holder` (not
    /// 0), only behind heads that holder has leased until after `now`.
    /// Messages found in `known` are taken from it instead of read (an
    /// exclusive backend's writer keeps those it held back; a shared one's
    /// keeps none).
    #[allow(clippy::too_many_arguments)]
    async fn held_followers(
        c: &mut Conn<Self>,
        sub: &SubRow,
        heads: &[(String, i64)],
        per_key: i64,
        holder: i64,
        now: Micros,
        known: &mut HeldMessages,
    ) -> Result<HashMap<String, Vec<(i32, StoredMessage)>>>;

    /// Makes every held-back message of the subscription due at `now` (it
    /// is no longer ordered).
    async fn release_held(c: &mut Conn<Self>, sub_id: i64, now: Micros) -> Result<()>;

    /// Makes due at `now` the held-back messages of the topic's
    /// subscriptions that no earlier message of their key holds back any
    /// more (after messages were removed by max age).
    async fn heal_held(c: &mut Conn<Self>, topic_id: i64, now: Micros) -> Result<()>;

    /// Makes rows due now again, reasons kept, and takes back the attempt
    /// their lease counted (released leases).
    async fn release(c: &mut Conn<Self>, sub_id: i64, seqs: &[i64], now: Micros) -> Result<()>;

    /// Sets a leased row's deadline.
    async fn set_deadline(
        c: &mut Conn<Self>,
        sub_id: i64,
        seq: i64,
        deadline: Micros,
    ) -> Result<()>;

    /// Dead-letters a row.
    async fn set_dead(
        c: &mut Conn<Self>,
        sub_id: i64,
        seq: i64,
        now: Micros,
        reason: &str,
    ) -> Result<()>;

    /// Deletes rows (acked).
    async fn delete_deliveries(c: &mut Conn<Self>, sub_id: i64, seqs: &[i64]) -> Result<()>;

    /// Makes dead letters (all if `seqs` is empty) deliverable at `now` with
    /// a fresh attempt count; returns how many.
    async fn redrive(c: &mut Conn<Self>, sub_id: i64, seqs: &[i64], now: Micros) -> Result<i64>;

    /// Deletes dead letters (all if `seqs` is empty); returns how many.
    async fn purge(c: &mut Conn<Self>, sub_id: i64, seqs: &[i64]) -> Result<i64>;

    /// Counts of the subscription's rows, for its stats.
    async fn delivery_counts(
        c: &mut Conn<Self>,
        sub_id: i64,
        now: Micros,
    ) -> Result<DeliveryCounts>;

    /// Every topic's name, last sequence, first stored sequence and count
    /// of messages expired by max age, in name order: for metrics. One
    /// index lookup per topic, whatever the number of messages.
    async fn topic_gauges(c: &mut Conn<Self>) -> Result<Vec<(String, i64, Option<i64>, i64)>>;

    /// Every subscription's gauges in one statement, in name order: for
    /// metrics. It reads the subscriptions, one pass over `deliveries`
    /// (leased, waiting and dead rows, never the stored messages) and one
    /// index lookup per subscription for its oldest unacked message.
    async fn subscription_gauges(
        c: &mut Conn<Self>,
        now: Micros,
    ) -> Result<Vec<super::counts::GaugeRow>>;

    /// Keys held back by a waiting redelivery: how many, and the first
    /// `sample` of them in order.
    async fn blocked_keys(
        c: &mut Conn<Self>,
        sub_id: i64,
        sample: i64,
    ) -> Result<(i64, Vec<String>)>;

    /// Dead letters after sequence `after`, at most `limit`.
    async fn dead_letters(
        c: &mut Conn<Self>,
        sub: &SubRow,
        after: i64,
        limit: i64,
    ) -> Result<Vec<DeadLetter>>;

    /// The subscription's waiting and leased messages after sequence
    /// `after`, at most `limit`, in order (what Peek shows of the messages
    /// its cursor has passed).
    async fn undone(
        c: &mut Conn<Self>,
        sub: &SubRow,
        after: i64,
        limit: i64,
    ) -> Result<Vec<PeekedMessage>>;

    /// How many dead letters the subscription has.
    async fn dead_count(c: &mut Conn<Self>, sub_id: i64) -> Result<i64>;

    // ---- maintenance ----

    /// The lowest sequence any subscription of the topic still needs.
    async fn low_water(c: &mut Conn<Self>, topic_id: i64) -> Result<Option<i64>>;

    /// Deletes the topic's messages in `[from, to)` published at or before
    /// `cutoff`; returns how many.
    async fn delete_messages(
        c: &mut Conn<Self>,
        topic_id: i64,
        from: i64,
        to: i64,
        cutoff: Micros,
    ) -> Result<u64>;

    /// True if a message of the topic is stored in `[from, to)`.
    async fn any_message_in(c: &mut Conn<Self>, topic_id: i64, from: i64, to: i64) -> Result<bool>;

    /// The sequence and publish time of the first `limit` messages from
    /// sequence `from` on.
    async fn message_times(
        c: &mut Conn<Self>,
        topic_id: i64,
        from: i64,
        limit: i64,
    ) -> Result<Vec<(i64, Micros)>>;

    /// The earliest deadline of the subscription's leases.
    async fn next_deadline(c: &mut Conn<Self>, sub_id: i64) -> Result<Option<Micros>>;

    /// The subscriptions of the first `limit` leases (of all
    /// subscriptions) whose deadline is at or before `before`, one name per
    /// lease. Shared databases only: it reads an index of leased rows by
    /// deadline, which SQLite does not have (its writer knows when its
    /// leases end).
    async fn subs_with_expired_leases(
        c: &mut Conn<Self>,
        before: Micros,
        limit: i64,
    ) -> Result<Vec<String>>;

    /// Removes the topic's messages up to `last` from storage and from every
    /// subscription, moves cursors past them and counts `unacked` as
    /// expired; returns the names of the subscriptions.
    async fn expire_through(
        c: &mut Conn<Self>,
        topic_id: i64,
        last: i64,
        unacked: i64,
    ) -> Result<Vec<String>>;

    /// Deletes up to `limit` dedup entries published before `before`.
    async fn prune_dedup(c: &mut Conn<Self>, before: Micros, limit: i64) -> Result<u64>;
}

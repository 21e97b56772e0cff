//! What the store measures for the broker's metrics: the writer's counts of
//! what it committed (per topic and per subscription, merged only when
//! their group commits), the group commits' size and latency, and the
//! gauges one read takes of every topic and subscription at a scrape.
//! No SQL here: the statements are the backends'.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::metrics::histogram::Histogram;

/// Upper bounds of the group-commit size histogram, in operations.
const SIZE_BUCKETS: [f64; 12] = [
    1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 5000.0, 20000.0,
];

/// Upper bounds of the commit latency histogram, in seconds.
const LATENCY_BUCKETS: [f64; 13] = [
    0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 5.0,
];

/// A topic's committed publishes since the store opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TopicCounts {
    /// Messages stored.
    pub published: u64,
    /// Messages answered as duplicates (an id the topic had already).
    pub duplicates: u64,
    /// Payload bytes stored.
    pub bytes: u64,
}

/// A subscription's committed lease endings since the store opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SubscriptionCounts {
    /// Leases ended by a nack (current leases only).
    pub nacks: u64,
    /// Leases found expired.
    pub expired_leases: u64,
    /// Messages dead-lettered.
    pub dead_lettered: u64,
}

/// What one group did, counted as it runs and merged into the store's
/// totals only if it commits.
#[derive(Debug, Default)]
pub(super) struct Tally {
    pub(super) topics: HashMap<String, TopicCounts>,
    pub(super) subs: HashMap<String, SubscriptionCounts>,
    pub(super) deleted_topics: Vec<String>,
    pub(super) deleted_subs: Vec<String>,
}

impl Tally {
    /// A topic's entry.
    pub(super) fn topic(&mut self, name: &str) -> &mut TopicCounts {
        if !self.topics.contains_key(name) {
            self.topics.insert(name.to_owned(), TopicCounts::default());
        }
        self.topics.get_mut(name).expect("inserted above")
    }

    /// A subscription's entry.
    pub(super) fn sub(&mut self, name: &str) -> &mut SubscriptionCounts {
        if !self.subs.contains_key(name) {
            self.subs
                .insert(name.to_owned(), SubscriptionCounts::default());
        }
        self.subs.get_mut(name).expect("inserted above")
    }

    fn clear(&mut self) {
        self.topics.clear();
        self.subs.clear();
        self.deleted_topics.clear();
        self.deleted_subs.clear();
    }
}

/// The store's counters, shared by its writer (which adds to them once per
/// group) and whoever reads them for metrics. Counts are this process's,
/// since the store opened.
#[derive(Debug)]
pub struct StoreCounters {
    totals: Mutex<Totals>,
    commit_size: Histogram,
    commit_latency: Histogram,
    failed_commits: AtomicU64,
}

#[derive(Debug, Default, Clone)]
struct Totals {
    topics: HashMap<String, TopicCounts>,
    subs: HashMap<String, SubscriptionCounts>,
}

impl Default for StoreCounters {
    fn default() -> Self {
        StoreCounters {
            totals: Mutex::default(),
            commit_size: Histogram::new(SIZE_BUCKETS),
            commit_latency: Histogram::new(LATENCY_BUCKETS),
            failed_commits: AtomicU64::new(0),
        }
    }
}

impl StoreCounters {
    /// A group of `operations` committed after `elapsed`: adds what it did
    /// and empties `tally` for the next group.
    pub(super) fn committed(&self, operations: usize, elapsed: Duration, tally: &mut Tally) {
        self.commit_size.observe(operations as f64);
        self.commit_latency.observe(elapsed.as_secs_f64());
        let mut totals = self.totals.lock().unwrap_or_else(|e| e.into_inner());
        for (name, c) in tally.topics.drain() {
            let t = totals.topics.entry(name).or_default();
            t.published += c.published;
            t.duplicates += c.duplicates;
            t.bytes += c.bytes;
        }
        for (name, c) in tally.subs.drain() {
            let s = totals.subs.entry(name).or_default();
            s.nacks += c.nacks;
            s.expired_leases += c.expired_leases;
            s.dead_lettered += c.dead_lettered;
        }
        // A deleted topic or subscription has no series any more (a new one
        // of the same name starts from zero, which Prometheus reads as a
        // counter reset).
        for name in tally.deleted_topics.drain(..) {
            totals.topics.remove(&name);
        }
        for name in tally.deleted_subs.drain(..) {
            totals.subs.remove(&name);
        }
        drop(totals);
        tally.clear();
    }

    /// A group failed to commit: its callers were refused, and what it
    /// counted is forgotten.
    pub(super) fn failed(&self, tally: &mut Tally) {
        self.failed_commits.fetch_add(1, Ordering::Relaxed);
        tally.clear();
    }

    /// Groups whose commit failed (their callers were told to retry).
    pub fn failed_commits(&self) -> u64 {
        self.failed_commits.load(Ordering::Relaxed)
    }

    /// Operations per committed group.
    pub fn commit_size(&self) -> &Histogram {
        &self.commit_size
    }

    /// Seconds from BEGIN to the end of COMMIT of committed groups.
    pub fn commit_latency(&self) -> &Histogram {
        &self.commit_latency
    }

    /// Per topic, what was published since the store opened.
    pub fn topics(&self) -> HashMap<String, TopicCounts> {
        let totals = self.totals.lock().unwrap_or_else(|e| e.into_inner());
        totals.topics.clone()
    }

    /// Per subscription, how its leases ended since the store opened.
    pub fn subscriptions(&self) -> HashMap<String, SubscriptionCounts> {
        let totals = self.totals.lock().unwrap_or_else(|e| e.into_inner());
        totals.subs.clone()
    }
}

/// A topic's gauges, read at a scrape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicGauges {
    /// The topic.
    pub name: String,
    /// Its last sequence number.
    pub last_seq: i64,
    /// Its first stored sequence number, if it stores any message.
    pub first_seq: Option<i64>,
    /// Messages expired by its max age.
    pub expired: i64,
}

impl TopicGauges {
    /// Messages stored: the span of stored sequence numbers (messages are
    /// removed from the low end, so a gap is rare and short).
    pub fn stored(&self) -> i64 {
        self.first_seq
            .map_or(0, |first| (self.last_seq - first + 1).max(0))
    }
}

/// A subscription's gauges and lifetime counters, read at a scrape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscriptionGauges {
    /// The subscription.
    pub name: String,
    /// Its topic.
    pub topic: String,
    /// Not yet acked nor dead-lettered, in flight included.
    pub backlog: i64,
    /// Leased now (leases not yet expired).
    pub leased: i64,
    /// Dead letters kept.
    pub dead_letters: i64,
    /// Keys held back by a message waiting for redelivery (ordered
    /// subscriptions).
    pub blocked_keys: i64,
    /// When the oldest unacked message was published, if any.
    pub oldest_unacked_at: Option<crate::model::Micros>,
    /// The topic's last sequence minus the ack watermark.
    pub watermark_lag: i64,
    /// The ack watermark: nothing at or below it can be delivered again.
    pub ack_watermark: i64,
    /// Deliveries since creation (stored, shared by every instance).
    pub delivered: i64,
    /// Acks since creation (stored).
    pub acked: i64,
    /// Deliveries with attempt > 1 since creation (stored).
    pub redelivered: i64,
}

/// The row [`super::backend::Backend::subscription_gauges`] reads: name,
/// topic, cursor, last_seq, delivered, acked, redelivered, leased, undone,
/// dead, first_undone, first_any, blocked keys, the oldest unacked
/// message's publish time.
pub(super) type GaugeRow = (
    String,
    String,
    i64,
    i64,
    i64,
    i64,
    i64,
    i64,
    i64,
    i64,
    Option<i64>,
    Option<i64>,
    i64,
    Option<i64>,
);

impl SubscriptionGauges {
    /// The gauges of one row, computed as `stats` computes them.
    pub(super) fn from_row(row: GaugeRow) -> Self {
        let (
            name,
            topic,
            cursor,
            last_seq,
            delivered,
            acked,
            redelivered,
            leased,
            undone,
            dead,
            _first_undone,
            first_any,
            blocked_keys,
            oldest_unacked_at,
        ) = row;
        let ack_watermark = super::common::ack_watermark(cursor, first_any);
        SubscriptionGauges {
            name,
            topic,
            backlog: (last_seq - cursor).max(0) + undone,
            leased,
            dead_letters: dead,
            blocked_keys,
            oldest_unacked_at,
            watermark_lag: (last_seq - ack_watermark).max(0),
            ack_watermark,
            delivered,
            acked,
            redelivered,
        }
    }
}

/// Every topic's and subscription's gauges, as one scrape reads them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreGauges {
    /// Topics in name order.
    pub topics: Vec<TopicGauges>,
    /// Subscriptions in name order.
    pub subscriptions: Vec<SubscriptionGauges>,
}

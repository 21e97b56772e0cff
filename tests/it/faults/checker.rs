//! The history of a fault run and its checker, in the manner of Jepsen's
//! queue checker: what the clients tried and what the broker confirmed,
//! compared at the end with what a fresh consumer finds once every fault is
//! healed.
//!
//! A publish that failed or timed out is indeterminate: the broker may have
//! stored it or not, so it is neither lost when absent nor unexpected when
//! present. An ack whose outcome never came back is indeterminate the same
//! way. Everything the broker confirmed is a promise (G3), and the checker
//! holds it to that:
//!
//! - **lost**: a confirmed publish that the end state lacks: absent from the
//!   witness subscription (never consumed during the run, so it must hold
//!   every confirmed message), or absent from the consumed subscription's
//!   drain although no ack of it was ever sent;
//! - **unexpected**: a delivery of an id never published, or whose payload
//!   is not the one published, or a delivery the client could not read;
//! - **duplicated**: an id acked OK twice, or delivered again on a lease
//!   taken after a lease that was acked OK (during the run, or in the final
//!   drain: an ack confirmed but not durable), or stored twice;
//! - **resequenced**: an id confirmed or delivered with two different
//!   sequence numbers (G2: a retry answers the original sequence).
//!
//! Redelivery of a message whose ack was never confirmed is at-least-once
//! delivery working as intended: it is counted, not flagged.

use std::collections::HashMap;
use std::fmt;
use std::sync::Mutex;

use tidings::model::{AckStatus, Delivery, Micros, PublishOutcome};
use uuid::Uuid;

/// The payload published with `id`: the id, padded to `size` bytes so that
/// a test can make messages as large as it needs.
pub(crate) fn payload_of(id: Uuid, size: usize) -> Vec<u8> {
    let mut payload = id.to_string().into_bytes();
    payload.resize(size.max(payload.len()), b'.');
    payload
}

/// Whether `payload` is one that [`payload_of`] made for `id`.
fn payload_matches(id: Uuid, payload: &[u8]) -> bool {
    let text = id.to_string();
    payload.starts_with(text.as_bytes()) && payload[text.len()..].iter().all(|&b| b == b'.')
}

/// Everything known about one message id.
#[derive(Debug, Default)]
struct Record {
    /// Publish calls that carried it (retries included).
    attempts: u32,
    /// The sequence number the broker confirmed.
    confirmed: Option<i64>,
    /// Deliveries to the load's consumers.
    deliveries: u32,
    /// An ack (or nack) of it was sent at least once: whether the broker
    /// took it may be unknown.
    ack_sent: bool,
    /// The lease (ack id, first deadline) of the first ack confirmed OK.
    acked: Option<(String, Micros)>,
    /// Acks confirmed OK.
    acks_ok: u32,
    /// Times the final drain of the consumed subscription delivered it.
    drained: u32,
    /// Times the witness subscription held it at the end.
    witnessed: u32,
    /// Dead-lettered in the consumed subscription at the end.
    dead: bool,
}

/// What happened in one run, recorded by the load's tasks as it happens.
#[derive(Debug, Default)]
pub(crate) struct History {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    records: HashMap<Uuid, Record>,
    /// Deliveries of ids never published, or with a foreign payload.
    unexpected: Vec<String>,
    /// Ids confirmed or delivered with different sequence numbers.
    resequenced: Vec<String>,
    /// Ids delivered on a lease taken after an acked lease.
    redelivered_after_ack: Vec<String>,
    /// Ids acked OK more than once.
    acked_twice: Vec<String>,
    /// Publish calls that failed or timed out.
    publish_failures: u64,
    /// Those calls by how they failed.
    failure_kinds: std::collections::BTreeMap<String, u64>,
    /// Confirmed publishes the broker called duplicates (retries).
    duplicate_confirms: u64,
    /// Ack outcomes other than OK.
    acks_refused: u64,
    /// The first few of them.
    refusal_examples: Vec<String>,
    /// Nacks sent.
    nacks: u64,
}

impl History {
    /// Records a publish call about to carry `ids`.
    pub(crate) fn attempted(&self, ids: &[Uuid]) {
        let mut h = self.lock();
        for id in ids {
            h.records.entry(*id).or_default().attempts += 1;
        }
    }

    /// Records the broker's confirmation of a publish call that carried
    /// `sent`.
    pub(crate) fn confirmed(&self, sent: &[Uuid], outcomes: &[PublishOutcome]) {
        let mut h = self.lock();
        if !outcomes.iter().map(|o| o.id).eq(sent.iter().copied()) {
            h.unexpected.push(format!(
                "a publish of {} messages answered for {} others",
                sent.len(),
                outcomes.len()
            ));
        }
        for o in outcomes {
            if o.duplicate {
                h.duplicate_confirms += 1;
            }
            let record = h.records.entry(o.id).or_default();
            if record.attempts == 0 {
                h.unexpected
                    .push(format!("{}: confirmed but never published", o.id));
                continue;
            }
            match record.confirmed {
                Some(seq) if seq != o.sequence => h.resequenced.push(format!(
                    "{}: confirmed as {seq} and as {}",
                    o.id, o.sequence
                )),
                _ => record.confirmed = Some(o.sequence),
            }
        }
    }

    /// Records a publish call that failed (with an error of `kind`) or
    /// timed out: its messages are indeterminate unless a retry confirms
    /// them.
    pub(crate) fn publish_failed(&self, kind: &str) {
        let mut h = self.lock();
        h.publish_failures += 1;
        *h.failure_kinds.entry(kind.to_owned()).or_default() += 1;
    }

    /// Records a delivery to one of the load's consumers.
    pub(crate) fn delivered(&self, d: &Delivery) {
        let mut h = self.lock();
        let Some(id) = h.known(d, "delivered") else {
            return;
        };
        let ack_id = d.ack_id.to_string();
        let record = h.records.get_mut(&id).expect("known id");
        record.deliveries += 1;
        // A lease taken after the acked one (its first deadline is later)
        // means the ack did not end the message. A delivery of an older
        // lease that arrives late (held up by a cut link) is no such sign.
        let again = matches!(&record.acked,
            Some((acked, deadline)) if *acked != ack_id && d.lease_deadline >= *deadline);
        if again {
            h.redelivered_after_ack.push(format!(
                "{id}: delivered again (attempt {}) after an ack was confirmed",
                d.attempt
            ));
        }
    }

    /// Records that an ack of `id` was sent (its outcome may never come).
    pub(crate) fn ack_sent(&self, id: Uuid) {
        if let Some(r) = self.lock().records.get_mut(&id) {
            r.ack_sent = true;
        }
    }

    /// Records that a nack of `id` was sent: the message must come back.
    pub(crate) fn nack_sent(&self) {
        self.lock().nacks += 1;
    }

    /// Records the broker's answer to an ack of the lease `ack_id` (whose
    /// first deadline was `deadline`) of message `id`.
    pub(crate) fn ack_answered(
        &self,
        id: Uuid,
        ack_id: &str,
        deadline: Micros,
        status: &AckStatus,
    ) {
        let mut h = self.lock();
        if !matches!(status, AckStatus::Ok(_)) {
            h.acks_refused += 1;
            if h.refusal_examples.len() < 3 {
                h.refusal_examples.push(format!("{id}: {status:?}"));
            }
            return;
        }
        let Some(record) = h.records.get_mut(&id) else {
            return;
        };
        record.acks_ok += 1;
        let twice = record.acks_ok > 1;
        if record.acked.is_none() {
            record.acked = Some((ack_id.to_owned(), deadline));
        }
        if twice {
            h.acked_twice.push(format!("{id}: acked OK twice"));
        }
    }

    /// Records a delivery the client could not read (a broker bug).
    pub(crate) fn malformed(&self, reason: &str) {
        self.lock()
            .unexpected
            .push(format!("a delivery the client could not read: {reason}"));
    }

    /// Records a delivery of the final drain of the consumed subscription.
    pub(crate) fn drained(&self, d: &Delivery) {
        let mut h = self.lock();
        let Some(id) = h.known(d, "drained") else {
            return;
        };
        let record = h.records.get_mut(&id).expect("known id");
        record.drained += 1;
        if record.acks_ok > 0 {
            h.redelivered_after_ack.push(format!(
                "{id}: still there in the final drain (attempt {}) after an ack was confirmed: \
                 the ack was not durable",
                d.attempt
            ));
        }
    }

    /// Records a dead letter of the consumed subscription at the end.
    pub(crate) fn dead_lettered(&self, id: Uuid) {
        if let Some(r) = self.lock().records.get_mut(&id) {
            r.dead = true;
        }
    }

    /// Records a message the witness subscription holds at the end.
    pub(crate) fn witnessed(&self, d: &Delivery) {
        let mut h = self.lock();
        let Some(id) = h.known(d, "witnessed") else {
            return;
        };
        let record = h.records.get_mut(&id).expect("known id");
        record.witnessed += 1;
        if record.witnessed == 2 {
            h.acked_twice
                .push(format!("{id}: held twice by the witness subscription"));
        }
    }

    /// The checked result.
    pub(crate) fn summary(&self) -> Summary {
        let h = self.lock();
        let mut s = Summary {
            publish_failures: h.publish_failures,
            failure_kinds: h.failure_kinds.clone(),
            duplicate_confirms: h.duplicate_confirms,
            acks_refused: h.acks_refused,
            refusal_examples: h.refusal_examples.clone(),
            nacks: h.nacks,
            ..Summary::default()
        };
        let mut lost = Vec::new();
        for (id, r) in &h.records {
            s.attempted += 1;
            match r.confirmed {
                Some(_) => s.confirmed += 1,
                None => {
                    s.indeterminate += 1;
                    if r.witnessed > 0 {
                        s.indeterminate_stored += 1;
                    }
                }
            }
            s.deliveries += u64::from(r.deliveries);
            if r.deliveries > 1 {
                s.redeliveries += u64::from(r.deliveries - 1);
            }
            if r.acks_ok > 0 {
                s.acked += 1;
            }
            s.drained += u64::from(r.drained);
            if r.dead {
                s.dead_lettered += 1;
            }
            if r.confirmed.is_some() {
                if r.witnessed == 0 {
                    lost.push(format!(
                        "{id}: confirmed, absent from the witness subscription"
                    ));
                } else if !r.ack_sent && r.drained == 0 && !r.dead {
                    lost.push(format!(
                        "{id}: confirmed, never acked, absent from the final drain \
                         ({} deliveries during the run)",
                        r.deliveries
                    ));
                }
            }
        }
        lost.sort();
        s.lost = lost;
        s.unexpected = h.unexpected.clone();
        s.acked_twice = h.acked_twice.clone();
        s.redelivered_after_ack = h.redelivered_after_ack.clone();
        s.resequenced = h.resequenced.clone();
        s
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panicking load task must not hide the history from the check.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Inner {
    /// The id of a delivery that checks out: published, with its payload
    /// and its confirmed sequence. Anything else is recorded and `None`.
    fn known(&mut self, d: &Delivery, what: &str) -> Option<Uuid> {
        let id = d.message.id;
        let Some(record) = self.records.get(&id) else {
            self.unexpected
                .push(format!("{id}: {what} but never published"));
            return None;
        };
        if !payload_matches(id, &d.message.payload) {
            self.unexpected
                .push(format!("{id}: {what} with a payload not its own"));
            return None;
        }
        if let Some(seq) = record.confirmed
            && seq != d.message.sequence
        {
            self.resequenced.push(format!(
                "{id}: confirmed as {seq}, {what} as {}",
                d.message.sequence
            ));
        }
        Some(id)
    }
}

/// The outcome of a run: the counts, and the violations with their ids.
#[derive(Debug, Default)]
pub(crate) struct Summary {
    /// Distinct ids published.
    pub(crate) attempted: u64,
    /// Of those, confirmed by the broker.
    pub(crate) confirmed: u64,
    /// Of those, never confirmed (failed or timed out every time).
    pub(crate) indeterminate: u64,
    /// Indeterminate publishes that the broker had stored after all.
    pub(crate) indeterminate_stored: u64,
    /// Publish calls that failed or timed out.
    pub(crate) publish_failures: u64,
    /// Those calls by how they failed.
    pub(crate) failure_kinds: std::collections::BTreeMap<String, u64>,
    /// Confirmations of retried publishes answered as duplicates.
    pub(crate) duplicate_confirms: u64,
    /// Deliveries to the load's consumers.
    pub(crate) deliveries: u64,
    /// Deliveries beyond an id's first, with no confirmed ack before them.
    pub(crate) redeliveries: u64,
    /// Distinct ids acked OK during the run.
    pub(crate) acked: u64,
    /// Acks answered STALE or UNKNOWN.
    pub(crate) acks_refused: u64,
    /// The first few of them, with the broker's reason.
    pub(crate) refusal_examples: Vec<String>,
    /// Nacks sent.
    pub(crate) nacks: u64,
    /// Deliveries of the final drain.
    pub(crate) drained: u64,
    /// Dead letters at the end.
    pub(crate) dead_lettered: u64,
    /// Violations: confirmed publishes missing at the end.
    pub(crate) lost: Vec<String>,
    /// Violations: deliveries of something never published.
    pub(crate) unexpected: Vec<String>,
    /// Violations: ids acked OK twice or stored twice.
    pub(crate) acked_twice: Vec<String>,
    /// Violations: deliveries after a confirmed ack (acks not durable).
    pub(crate) redelivered_after_ack: Vec<String>,
    /// Violations: one id with two sequence numbers.
    pub(crate) resequenced: Vec<String>,
}

impl Summary {
    /// Whether the broker kept every promise.
    pub(crate) fn valid(&self) -> bool {
        self.lost.is_empty()
            && self.unexpected.is_empty()
            && self.acked_twice.is_empty()
            && self.redelivered_after_ack.is_empty()
            && self.resequenced.is_empty()
    }

    /// Fails the test, printing the summary, if any promise was broken.
    pub(crate) fn assert_valid(&self, scenario: &str) {
        assert!(
            self.valid(),
            "{scenario}: the broker broke its promises\n{self}"
        );
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "publishes: {} attempted, {} confirmed, {} indeterminate ({} of them stored), \
             {} failed calls {:?}, {} confirmed as duplicates",
            self.attempted,
            self.confirmed,
            self.indeterminate,
            self.indeterminate_stored,
            self.publish_failures,
            self.failure_kinds,
            self.duplicate_confirms
        )?;
        writeln!(
            f,
            "deliveries: {} during the run ({} redeliveries), {} acked, {} acks refused, \
             {} nacks, {} in the final drain, {} dead letters",
            self.deliveries,
            self.redeliveries,
            self.acked,
            self.acks_refused,
            self.nacks,
            self.drained,
            self.dead_lettered
        )?;
        for example in &self.refusal_examples {
            writeln!(f, "    refused: {example}")?;
        }
        let violations = [
            ("lost", &self.lost),
            ("unexpected", &self.unexpected),
            ("duplicated (acked or stored twice)", &self.acked_twice),
            (
                "duplicated (delivered after a confirmed ack)",
                &self.redelivered_after_ack,
            ),
            ("resequenced", &self.resequenced),
        ];
        for (name, list) in violations {
            write!(f, "{name}: {}", list.len())?;
            for example in list.iter().take(5) {
                write!(f, "\n    {example}")?;
            }
            if list.len() > 5 {
                write!(f, "\n    ...")?;
            }
            writeln!(f)?;
        }
        Ok(())
    }
}

/// A delivery of `id` (published with sequence `seq`) on a lease whose
/// first deadline is `deadline`, as the broker would send it.
fn delivery(id: Uuid, seq: i64, attempt: i32, deadline: Micros) -> Delivery {
    use tidings::model::{AckId, StoredMessage};
    Delivery {
        message: StoredMessage {
            id,
            topic: "t".into(),
            key: None,
            payload: payload_of(id, 64),
            attributes: Vec::new(),
            created_at: None,
            sequence: seq,
            published_at: 0,
        },
        ack_id: AckId {
            subscription: 1,
            sequence: seq,
            token: deadline,
            deadline: Some(deadline),
        },
        attempt,
        lease_deadline: deadline,
    }
}

/// The broker's confirmation of `id` as `sequence`.
fn confirm(id: Uuid, sequence: i64) -> PublishOutcome {
    PublishOutcome {
        id,
        sequence,
        duplicate: false,
    }
}

#[test]
fn a_clean_history_is_valid_and_counts_indeterminate_publishes() {
    let h = History::default();
    let (a, b, c) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    h.attempted(&[a, b, c]);
    h.confirmed(&[a, b], &[confirm(a, 1), confirm(b, 2)]);
    // c timed out: indeterminate, and present after all; that is allowed.
    h.publish_failed("timeout");
    let first = delivery(a, 1, 1, 100);
    h.delivered(&first);
    h.ack_sent(a);
    // The ack's outcome was lost; the message comes back (at-least-once)
    // and is acked.
    let again = delivery(a, 1, 2, 200);
    h.delivered(&again);
    h.ack_sent(a);
    h.ack_answered(a, &again.ack_id.to_string(), 200, &AckStatus::Ok(None));
    h.drained(&delivery(b, 2, 1, 300));
    h.drained(&delivery(c, 3, 1, 300));
    for (id, seq) in [(a, 1), (b, 2), (c, 3)] {
        h.witnessed(&delivery(id, seq, 1, 300));
    }
    let s = h.summary();
    assert!(s.valid(), "{s}");
    assert_eq!((s.attempted, s.confirmed, s.indeterminate), (3, 2, 1));
    assert_eq!((s.indeterminate_stored, s.redeliveries, s.acked), (1, 1, 1));
}

#[test]
fn the_checker_finds_each_kind_of_violation() {
    let h = History::default();
    let (lost, acked, twice, reseq) = (
        Uuid::now_v7(),
        Uuid::now_v7(),
        Uuid::now_v7(),
        Uuid::now_v7(),
    );
    h.attempted(&[lost, acked, twice, reseq]);
    h.confirmed(
        &[lost, acked, twice, reseq],
        &[
            confirm(lost, 1),
            confirm(acked, 2),
            confirm(twice, 3),
            confirm(reseq, 4),
        ],
    );
    // A retry answered with another sequence.
    h.confirmed(&[reseq], &[confirm(reseq, 5)]);
    // Delivered once, never acked, then gone.
    h.delivered(&delivery(lost, 1, 1, 100));
    // Acked, then redelivered on a later lease, and again in the drain.
    let d = delivery(acked, 2, 1, 100);
    h.delivered(&d);
    h.ack_sent(acked);
    h.ack_answered(acked, &d.ack_id.to_string(), 100, &AckStatus::Ok(None));
    // A late delivery of an older lease is no violation ...
    h.delivered(&delivery(acked, 2, 1, 50));
    // ... a newer one is.
    h.delivered(&delivery(acked, 2, 2, 150));
    h.drained(&delivery(acked, 2, 3, 300));
    // Two leases both acked OK.
    for deadline in [100, 200] {
        let d = delivery(twice, 3, 1, deadline);
        h.delivered(&d);
        h.ack_sent(twice);
        h.ack_answered(twice, &d.ack_id.to_string(), deadline, &AckStatus::Ok(None));
    }
    h.drained(&delivery(reseq, 4, 1, 300));
    // Never published.
    h.drained(&delivery(Uuid::now_v7(), 9, 1, 300));
    for (id, seq) in [(acked, 2), (twice, 3), (reseq, 4)] {
        h.witnessed(&delivery(id, seq, 1, 300));
    }
    let s = h.summary();
    assert!(!s.valid());
    assert_eq!(s.lost.len(), 1, "{s}");
    assert_eq!(s.unexpected.len(), 1, "{s}");
    assert_eq!(s.acked_twice.len(), 1, "{s}");
    // The later lease during the run, the drain, and the second lease of
    // `twice`.
    assert_eq!(s.redelivered_after_ack.len(), 3, "{s}");
    assert_eq!(s.resequenced.len(), 1, "{s}");
}

//! Pure decisions of the leasing engine, apart from I/O so that they are
//! tested without a database or a clock: which new messages a lease takes,
//! and what becomes of a delivery whose lease ended without an ack.

use std::collections::{HashMap, HashSet};

use crate::model::{Micros, SubscriptionSettings, micros};

/// What a lease does with one new message past the cursor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Take {
    /// Lease it to the caller.
    Lease,
    /// Record it as waiting: an earlier message of its key is in progress
    /// (ordered subscriptions only).
    Hold,
    /// Lease it to the stream holding its key's run, which has room for it
    /// (ordered subscriptions only).
    Route(i64),
}

/// How much a lease may still take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Budget {
    /// Payload bytes the lease may carry in all.
    pub(super) max_bytes: usize,
    /// Payload bytes already taken (by redeliveries).
    pub(super) bytes: usize,
    /// True if the lease already holds a message: a lease always takes at
    /// least one message, however large.
    pub(super) taken_any: bool,
}

/// Decides, in sequence order, what a lease does with the new messages past
/// the cursor, given as (ordering key, payload size). The answer covers a
/// prefix of them: the cursor moves past exactly those, and the rest stay
/// for a later lease. `blocked` holds the keys with an earlier message in
/// progress (waiting, held or leased), each with the stream whose run it is
/// (0 if none: its newest message in progress waits, or its lease ran
/// out). A blocked key's message goes to that stream while `rooms` says it
/// has room (one less each time), else it is held, and so are the key's
/// later ones here. A key with none is the lease's: all its messages here
/// are leased, a run that the caller processes in order (issue 14); the
/// prefix ends before a message the budget has no room for, so a run is
/// never cut in its middle by a later message of its key going elsewhere.
pub(super) fn plan_new<'a>(
    messages: impl IntoIterator<Item = (Option<&'a str>, usize)>,
    ordered: bool,
    blocked: &HashMap<String, i64>,
    rooms: &mut HashMap<i64, isize>,
    mut budget: Budget,
) -> Vec<Take> {
    let mut plan = Vec::new();
    let mut held: HashSet<&str> = HashSet::new();
    for (key, size) in messages {
        let key = if ordered { key } else { None };
        if let Some((key, holder)) = key.and_then(|k| blocked.get_key_value(k)) {
            let room = rooms.get_mut(holder).filter(|r| **r > 0);
            match room {
                Some(room) if !held.contains(key.as_str()) => {
                    *room -= 1;
                    plan.push(Take::Route(*holder));
                }
                _ => {
                    held.insert(key);
                    plan.push(Take::Hold);
                }
            }
            continue;
        }
        if budget.taken_any && budget.bytes.saturating_add(size) > budget.max_bytes {
            break;
        }
        budget.bytes = budget.bytes.saturating_add(size);
        budget.taken_any = true;
        plan.push(Take::Lease);
    }
    plan
}

/// What becomes of a delivery whose lease ended without an ack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum AfterAttempt {
    /// It was the last attempt: dead-letter it.
    DeadLetter,
    /// Deliver it again from this instant.
    RetryAt(Micros),
}

/// The one rule for a lease that ended without an ack (expired or nacked)
/// on attempt `attempt`: dead-lettered once `max_attempts` is used up,
/// otherwise redelivered after the backoff, counted from `from` (the lease's
/// deadline for an expiry, the nack's arrival for a nack) or after `delay`
/// if the nack gave one.
pub(super) fn after_attempt(
    settings: &SubscriptionSettings,
    attempt: i32,
    from: Micros,
    delay: Option<std::time::Duration>,
) -> AfterAttempt {
    if attempt >= settings.max_attempts {
        return AfterAttempt::DeadLetter;
    }
    let wait = delay.unwrap_or_else(|| settings.backoff(attempt));
    AfterAttempt::RetryAt(from.saturating_add(micros(wait)))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn budget(max_bytes: usize) -> Budget {
        Budget {
            max_bytes,
            bytes: 0,
            taken_any: false,
        }
    }

    /// The plan when no key is blocked.
    fn plan_free<'a>(
        messages: impl IntoIterator<Item = (Option<&'a str>, usize)>,
        ordered: bool,
        budget: Budget,
    ) -> Vec<Take> {
        plan_new(
            messages,
            ordered,
            &HashMap::new(),
            &mut HashMap::new(),
            budget,
        )
    }

    #[test]
    fn takes_messages_until_the_byte_budget_is_used() {
        let messages = [(None, 40), (None, 40), (None, 40)];
        let plan = plan_free(messages, false, budget(100));
        assert_eq!(plan, vec![Take::Lease, Take::Lease]);
    }

    #[test]
    fn always_takes_one_message_even_over_the_budget() {
        let plan = plan_free([(None, 500), (None, 1)], false, budget(10));
        assert_eq!(plan, vec![Take::Lease]);
        // A lease that already holds a redelivery takes nothing too large.
        let full = Budget {
            taken_any: true,
            bytes: 5,
            ..budget(10)
        };
        assert!(plan_free([(None, 6)], false, full).is_empty());
    }

    #[test]
    fn ordered_lease_takes_runs_of_free_keys_and_holds_busy_ones() {
        let messages = [
            (Some("a"), 1),
            (Some("b"), 1),
            (Some("a"), 1),
            (None, 1),
            (Some("c"), 1),
            (Some("c"), 1),
        ];
        let blocked: HashMap<String, i64> = [("c".to_owned(), 0)].into();
        let plan = plan_new(messages, true, &blocked, &mut HashMap::new(), budget(100));
        assert_eq!(
            plan,
            vec![
                Take::Lease,
                Take::Lease,
                Take::Lease,
                Take::Lease,
                Take::Hold,
                Take::Hold
            ]
        );
    }

    #[test]
    fn a_run_cut_by_the_budget_ends_the_plan() {
        let messages = [(Some("a"), 10), (Some("b"), 10), (Some("a"), 10)];
        let plan = plan_free(messages, true, budget(25));
        // The cursor stops before a2: it is not held behind a1 (which would
        // make it wait for a1's ack) but left for the next lease.
        assert_eq!(plan, vec![Take::Lease, Take::Lease]);
    }

    #[test]
    fn held_messages_do_not_use_the_budget_and_do_not_stop_the_cursor() {
        let blocked: HashMap<String, i64> = [("k".to_owned(), 0)].into();
        let messages = [(Some("k"), 1000), (Some("j"), 10)];
        let plan = plan_new(messages, true, &blocked, &mut HashMap::new(), budget(20));
        assert_eq!(plan, vec![Take::Hold, Take::Lease]);
    }

    #[test]
    fn a_held_key_goes_to_its_stream_while_it_has_room() {
        let blocked: HashMap<String, i64> = [
            ("a".to_owned(), 7),
            ("b".to_owned(), 8),
            ("c".to_owned(), 0),
        ]
        .into();
        let mut rooms: HashMap<i64, isize> = [(7, 2), (8, 1)].into();
        let messages = [
            (Some("a"), 1),
            (Some("b"), 1),
            (Some("c"), 1),
            (Some("b"), 1),
            (Some("a"), 1),
            (Some("a"), 1),
            (Some("b"), 1),
        ];
        let plan = plan_new(messages, true, &blocked, &mut rooms, budget(1));
        assert_eq!(
            plan,
            vec![
                Take::Route(7),
                Take::Route(8),
                // No stream holds c's run: held.
                Take::Hold,
                // 8 is full: b is held, and its later messages too.
                Take::Hold,
                Take::Route(7),
                Take::Hold,
                Take::Hold,
            ]
        );
        assert_eq!(rooms, [(7, 0), (8, 0)].into());
        // Routed messages take none of the lease's budget.
        let plan = plan_new(
            [(Some("a"), 10), (Some("d"), 10), (Some("e"), 10)],
            true,
            &blocked,
            &mut [(7, 1)].into(),
            budget(10),
        );
        assert_eq!(plan, vec![Take::Route(7), Take::Lease]);
    }

    #[test]
    fn unordered_lease_ignores_keys() {
        let blocked: HashMap<String, i64> = [("k".to_owned(), 0)].into();
        let plan = plan_new(
            [(Some("k"), 1), (Some("k"), 1)],
            false,
            &blocked,
            &mut HashMap::new(),
            budget(10),
        );
        assert_eq!(plan, vec![Take::Lease, Take::Lease]);
    }

    #[test]
    fn last_attempt_dead_letters_and_earlier_ones_back_off() {
        let settings = SubscriptionSettings {
            max_attempts: 3,
            min_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
            ..SubscriptionSettings::default()
        };
        assert_eq!(
            after_attempt(&settings, 1, 1_000, None),
            AfterAttempt::RetryAt(101_000)
        );
        assert_eq!(
            after_attempt(&settings, 2, 1_000, None),
            AfterAttempt::RetryAt(201_000)
        );
        assert_eq!(
            after_attempt(&settings, 2, 1_000, Some(Duration::from_millis(5))),
            AfterAttempt::RetryAt(6_000)
        );
        assert_eq!(
            after_attempt(&settings, 3, 1_000, None),
            AfterAttempt::DeadLetter
        );
    }
}

//! Messages an exclusive writer read when it held them back on an ordered
//! subscription, kept so that handing them on later does not read them
//! again (issue 14). A key's backlog behind a full stream is read once when
//! the cursor passes it and once more when the run ahead of it is acked;
//! with a thousand keys that second read took a tenth of the writer's
//! statements' time.
//!
//! A stored message never changes, so an entry can only be wrong if its
//! row is gone: the writer forgets the ranges it deletes, a deleted topic
//! (whose id and sequences may come again), and everything after a rolled
//! back group (whose sequences are given out again). A shared database's
//! writer keeps nothing here: another instance may delete a message.

use std::collections::{BTreeMap, HashMap};

use crate::model::StoredMessage;

/// The most message bytes kept. Beyond it the topic's oldest go first: a
/// message held and then let fall due instead of handed on (its stream had
/// no room) is read with its lease, so its entry stays until its range is
/// deleted, which with a long retention may be days.
pub(super) const HELD_BYTES: usize = 64 * 1024 * 1024;

/// Held-back messages by topic and sequence, within a byte budget.
#[derive(Debug)]
pub(super) struct HeldMessages {
    topics: HashMap<i64, BTreeMap<i64, StoredMessage>>,
    bytes: usize,
    limit: usize,
}

impl Default for HeldMessages {
    fn default() -> Self {
        Self::new(HELD_BYTES)
    }
}

impl HeldMessages {
    /// Keeps at most `limit` bytes of messages.
    pub(super) fn new(limit: usize) -> Self {
        HeldMessages {
            topics: HashMap::new(),
            bytes: 0,
            limit,
        }
    }

    /// Keeps `message` of topic `topic_id`, making room by forgetting the
    /// topic's oldest; not at all if that is not enough.
    pub(super) fn keep(&mut self, topic_id: i64, message: StoredMessage) {
        let size = message.response_bytes();
        let kept = self.topics.entry(topic_id).or_default();
        while self.bytes + size > self.limit {
            let Some((_, oldest)) = kept.pop_first() else {
                break;
            };
            self.bytes -= oldest.response_bytes();
        }
        if self.bytes + size <= self.limit {
            if let Some(old) = kept.insert(message.sequence, message) {
                self.bytes -= old.response_bytes();
            }
            self.bytes += size;
        }
        if kept.is_empty() {
            self.topics.remove(&topic_id);
        }
    }

    /// Takes out the message `seq` of topic `topic_id`, if it is kept.
    #[cfg_attr(not(feature = "sqlite"), allow(dead_code))]
    pub(super) fn take(&mut self, topic_id: i64, seq: i64) -> Option<StoredMessage> {
        let kept = self.topics.get_mut(&topic_id)?;
        let message = kept.remove(&seq)?;
        self.bytes -= message.response_bytes();
        if kept.is_empty() {
            self.topics.remove(&topic_id);
        }
        Some(message)
    }

    /// Forgets the messages of topic `topic_id` from `from` through `to`
    /// (their rows may be deleted).
    pub(super) fn forget(&mut self, topic_id: i64, from: i64, to: i64) {
        let Some(kept) = self.topics.get_mut(&topic_id) else {
            return;
        };
        if from > to {
            return;
        }
        let gone: Vec<i64> = kept.range(from..=to).map(|(&seq, _)| seq).collect();
        for seq in gone {
            if let Some(message) = kept.remove(&seq) {
                self.bytes -= message.response_bytes();
            }
        }
        if kept.is_empty() {
            self.topics.remove(&topic_id);
        }
    }

    /// Forgets every message of topic `topic_id`.
    pub(super) fn forget_topic(&mut self, topic_id: i64) {
        if let Some(kept) = self.topics.remove(&topic_id) {
            self.bytes -= kept
                .values()
                .map(StoredMessage::response_bytes)
                .sum::<usize>();
        }
    }

    /// Forgets everything (a group rolled back).
    pub(super) fn clear(&mut self) {
        self.topics.clear();
        self.bytes = 0;
    }

    /// Bytes of the messages kept.
    #[cfg(test)]
    pub(super) fn bytes(&self) -> usize {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use uuid::Uuid;

    use super::*;

    fn message(seq: i64, size: usize) -> StoredMessage {
        StoredMessage {
            id: Uuid::nil(),
            topic: "t".into(),
            key: Some("k".into()),
            payload: vec![0; size],
            attributes: Vec::new(),
            created_at: None,
            sequence: seq,
            published_at: 0,
        }
    }

    #[test]
    fn a_message_is_taken_once() {
        let mut held = HeldMessages::default();
        held.keep(1, message(5, 10));
        assert_eq!(held.take(2, 5), None, "another topic's sequence 5");
        assert_eq!(held.take(1, 5).map(|m| m.sequence), Some(5));
        assert_eq!(held.take(1, 5), None);
        assert_eq!(held.bytes(), 0);
    }

    #[test]
    fn the_oldest_make_room_within_the_budget() {
        let one = message(1, 100).response_bytes();
        let mut held = HeldMessages::new(2 * one);
        for seq in 1..=3 {
            held.keep(1, message(seq, 100));
        }
        assert_eq!(held.bytes(), 2 * one);
        assert!(held.take(1, 1).is_none(), "the oldest went for the third");
        assert!(held.take(1, 3).is_some());
        // Another topic's messages push out their own oldest only.
        held.keep(2, message(1, 100));
        held.keep(2, message(2, 100));
        assert!(held.take(1, 2).is_some(), "topic 1 keeps its own");
        assert!(held.take(2, 1).is_none());
        assert!(held.take(2, 2).is_some());
        // One larger than the whole budget is not kept.
        held.keep(3, message(1, 500));
        assert!(held.take(3, 1).is_none());
        assert_eq!(held.bytes(), 0);
    }

    #[test]
    fn forgets_deleted_ranges_topics_and_everything() {
        let mut held = HeldMessages::default();
        for seq in 1..=10 {
            held.keep(1, message(seq, 10));
            held.keep(2, message(seq, 10));
        }
        held.forget(1, 3, 6);
        let left: Vec<i64> = (1..=10).filter(|&s| held.take(1, s).is_some()).collect();
        assert_eq!(left, vec![1, 2, 7, 8, 9, 10]);
        held.forget_topic(2);
        assert!(held.take(2, 1).is_none());
        assert_eq!(held.bytes(), 0);
        held.keep(3, message(1, 10));
        held.clear();
        assert!(held.take(3, 1).is_none());
        assert_eq!(held.bytes(), 0);
    }
}

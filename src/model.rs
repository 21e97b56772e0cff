//! Domain types shared by the store, the broker, the gRPC layer and the client.
//! They know nothing of protobuf or SQL.

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use uuid::Uuid;

use crate::error::{Error, Result};

/// Microseconds since the Unix epoch: the broker's one representation of an
/// instant, in storage and in memory.
pub type Micros = i64;

/// The current time in microseconds since the Unix epoch.
pub fn now_micros() -> Micros {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// A duration in whole microseconds, saturating.
pub fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

/// A point in time in microseconds since the Unix epoch (0 before it).
pub fn time_micros(t: SystemTime) -> Micros {
    t.duration_since(UNIX_EPOCH).map(micros).unwrap_or(0)
}

/// The point in time `m` microseconds after the Unix epoch.
pub fn from_micros(m: Micros) -> SystemTime {
    UNIX_EPOCH + Duration::from_micros(u64::try_from(m).unwrap_or(0))
}

/// A message as a producer hands it to the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewMessage {
    /// Idempotency key, unique per topic.
    pub id: Uuid,
    /// Topic name.
    pub topic: String,
    /// Ordering key.
    pub key: Option<String>,
    /// Opaque payload.
    pub payload: Vec<u8>,
    /// Attributes, sorted by name.
    pub attributes: Vec<(String, String)>,
    /// Producer's creation time.
    pub created_at: Option<Micros>,
}

/// The outcome of publishing one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublishOutcome {
    /// The message id.
    pub id: Uuid,
    /// Sequence number in the topic (the original's for a duplicate).
    pub sequence: i64,
    /// True when the id had been published before.
    pub duplicate: bool,
}

/// A message as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    /// Idempotency key.
    pub id: Uuid,
    /// Topic name.
    pub topic: String,
    /// Ordering key.
    pub key: Option<String>,
    /// Opaque payload.
    pub payload: Vec<u8>,
    /// Attributes, sorted by name.
    pub attributes: Vec<(String, String)>,
    /// Producer's creation time.
    pub created_at: Option<Micros>,
    /// Per-topic sequence number.
    pub sequence: i64,
    /// When the broker committed it.
    pub published_at: Micros,
}

impl StoredMessage {
    /// About how many bytes the message takes in a response: payload, key,
    /// topic, attributes and the fixed fields.
    pub fn response_bytes(&self) -> usize {
        let attributes: usize = self
            .attributes
            .iter()
            .map(|(k, v)| k.len() + v.len() + 8)
            .sum();
        self.payload.len()
            + self.key.as_ref().map_or(0, String::len)
            + self.topic.len()
            + attributes
            + 160
    }
}

/// Identifies one lease of one message in one subscription.
///
/// Its text form (`<subscription id>-<sequence>-<token>-<deadline>`, hex) is
/// the opaque `ack_id` clients see. The token changes with every lease,
/// which is what makes an ack with an old lease recognisable as stale; the
/// lease's first deadline tells, once the message is done and its row gone,
/// an ack after the lease ended (stale) from a repeated ack (unknown).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AckId {
    /// Internal id of the subscription.
    pub subscription: i64,
    /// Sequence number of the message.
    pub sequence: i64,
    /// Lease token.
    pub token: i64,
    /// The lease's deadline when it was granted (absent in ids of older
    /// brokers).
    pub deadline: Option<Micros>,
}

impl fmt::Display for AckId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:x}-{:x}-{:x}",
            self.subscription, self.sequence, self.token as u64
        )?;
        match self.deadline {
            Some(d) => write!(f, "-{:x}", d as u64),
            None => Ok(()),
        }
    }
}

impl FromStr for AckId {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let bad = || Error::InvalidArgument(format!("malformed ack id {}", quoted(s)));
        let mut parts = s.splitn(4, '-');
        let mut next = || parts.next().ok_or_else(bad);
        let subscription = i64::from_str_radix(next()?, 16).map_err(|_| bad())?;
        let sequence = i64::from_str_radix(next()?, 16).map_err(|_| bad())?;
        let token = u64::from_str_radix(next()?, 16).map_err(|_| bad())? as i64;
        let deadline = match parts.next() {
            Some(d) => Some(u64::from_str_radix(d, 16).map_err(|_| bad())? as i64),
            None => None,
        };
        Ok(AckId {
            subscription,
            sequence,
            token,
            deadline,
        })
    }
}

/// A message leased to a consumer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// The message.
    pub message: StoredMessage,
    /// The lease.
    pub ack_id: AckId,
    /// 1 for the first delivery.
    pub attempt: i32,
    /// When the lease ends unless extended.
    pub lease_deadline: Micros,
}

/// What became of one ack, nack, extension or release.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AckStatus {
    /// Committed. For an extension, the new deadline.
    Ok(Option<Micros>),
    /// Refused: the lease is no longer current.
    Stale(String),
    /// Refused: no such delivery.
    Unknown(String),
}

/// A negative acknowledgement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NackItem {
    /// The lease.
    pub ack_id: AckId,
    /// Redeliver no sooner than this; `None` uses the backoff.
    pub delay: Option<Duration>,
    /// Why processing failed.
    pub reason: String,
}

/// Which request an [`AckOutcome`] answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AckOperation {
    /// An ack.
    Ack,
    /// A nack.
    Nack,
    /// A lease extension.
    Extend,
    /// A release: the message goes back unprocessed, without counting an
    /// attempt.
    Release,
}

/// The answer to one ack, nack or extension, keyed by the ack id as the
/// client sent it (a malformed id is answered too, as `Unknown`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AckOutcome {
    /// The ack id as sent.
    pub ack_id: String,
    /// What was asked.
    pub operation: AckOperation,
    /// What became of it.
    pub status: AckStatus,
}

/// A nack as a client sends it: the ack id is still text, so a malformed
/// one can be answered rather than fail its whole request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nack {
    /// The lease's ack id.
    pub ack_id: String,
    /// Redeliver no sooner than this; `None` uses the backoff.
    pub delay: Option<Duration>,
    /// Why processing failed.
    pub reason: String,
}

/// A lease extension as a client sends it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseExtension {
    /// The lease's ack id.
    pub ack_id: String,
    /// How long from now the lease should last.
    pub extension: Duration,
}

/// Flow control of a Subscribe stream, as the client asks for it; zero
/// keeps the current value (the default on the first request).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FlowControl {
    /// Most messages leased to the stream at once.
    pub max_outstanding_messages: i32,
    /// Most payload bytes leased to the stream at once.
    pub max_outstanding_bytes: i64,
    /// Most message bytes in one response (at least one message is always
    /// sent).
    pub max_response_bytes: i32,
}

/// One request on a Subscribe stream: flow control and what to do with
/// leases the stream holds.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SessionCommand {
    /// Flow control.
    pub flow: FlowControl,
    /// Ack ids to ack.
    pub acks: Vec<String>,
    /// Nacks.
    pub nacks: Vec<Nack>,
    /// Lease extensions.
    pub extensions: Vec<LeaseExtension>,
    /// Ack ids of leases given back unprocessed.
    pub releases: Vec<String>,
}

/// What a Subscribe stream sends: new deliveries, or outcomes of one
/// command.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SessionEvent {
    /// Messages leased to the stream.
    pub deliveries: Vec<Delivery>,
    /// Answers to a command's acks, nacks and extensions, in its order.
    pub outcomes: Vec<AckOutcome>,
}

/// One page of a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page<T> {
    /// The items.
    pub items: Vec<T>,
    /// Token of the next page; empty on the last one.
    pub next_page_token: String,
}

/// Topic settings a user can choose.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TopicSettings {
    /// Keep acked messages this long for replay.
    pub retention: Duration,
    /// Expire messages older than this (zero: never).
    pub max_age: Duration,
}

/// A topic as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topic {
    /// Name.
    pub name: String,
    /// Settings.
    pub settings: TopicSettings,
    /// Creation time.
    pub created_at: Micros,
    /// Highest sequence number assigned.
    pub last_sequence: i64,
    /// Messages expired by max age.
    pub expired_count: i64,
}

/// Where a new subscription starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StartPosition {
    /// The oldest message stored.
    Earliest,
    /// Messages published after creation.
    #[default]
    Latest,
    /// The first message published at or after this instant.
    Time(Micros),
}

/// Subscription settings a user can choose.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscriptionSettings {
    /// Lease length.
    pub ack_deadline: Duration,
    /// Deliveries before dead-lettering.
    pub max_attempts: i32,
    /// First backoff, doubled per attempt.
    pub min_backoff: Duration,
    /// Longest backoff.
    pub max_backoff: Duration,
    /// Topic that receives a copy of each dead letter.
    pub dead_letter_topic: Option<String>,
    /// One message per key at a time, in order.
    pub ordered: bool,
}

impl Default for SubscriptionSettings {
    fn default() -> Self {
        SubscriptionSettings {
            ack_deadline: Duration::from_secs(30),
            max_attempts: 10,
            min_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(600),
            dead_letter_topic: None,
            ordered: false,
        }
    }
}

/// Longest backoff a subscription may set (the longest nack delay too).
pub const MAX_BACKOFF: Duration = Duration::from_secs(12 * 3600);

impl SubscriptionSettings {
    /// The backoff before delivery attempt `attempt + 1`, after `attempt`
    /// failed: `min_backoff * 2^(attempt-1)`, capped at `max_backoff`.
    pub fn backoff(&self, attempt: i32) -> Duration {
        let shift = attempt.saturating_sub(1).clamp(0, 30) as u32;
        self.min_backoff
            .checked_mul(1u32 << shift)
            .unwrap_or(self.max_backoff)
            .min(self.max_backoff)
    }
}

impl SubscriptionSettings {
    /// The rule every subscription's settings obey: `ack_deadline` from
    /// 1 ms to 12 h, `max_attempts` from 1 to 1000, backoffs of at most
    /// 12 h with `min_backoff` no longer than `max_backoff`, and a valid
    /// dead-letter topic name.
    ///
    /// Fails with `InvalidArgument` naming the first field out of bounds.
    pub fn validate(&self) -> Result<()> {
        if self.ack_deadline < Duration::from_millis(1)
            || self.ack_deadline > Duration::from_secs(12 * 3600)
        {
            return Err(Error::InvalidArgument(format!(
                "ack_deadline {:?} is out of range (1 ms to 12 h)",
                self.ack_deadline
            )));
        }
        check_max_attempts(self.max_attempts)?;
        for (field, value) in [
            ("min_backoff", self.min_backoff),
            ("max_backoff", self.max_backoff),
        ] {
            if value > MAX_BACKOFF {
                return Err(Error::InvalidArgument(format!(
                    "{field} {value:?} is out of range (at most 12 h)"
                )));
            }
        }
        if self.min_backoff > self.max_backoff {
            return Err(Error::InvalidArgument(format!(
                "min_backoff ({:?}) is longer than max_backoff ({:?})",
                self.min_backoff, self.max_backoff
            )));
        }
        if let Some(dlt) = &self.dead_letter_topic {
            validate_name("dead-letter topic", dlt)?;
        }
        Ok(())
    }
}

/// Checks `max_attempts` alone (1 to 1000); part of
/// [`SubscriptionSettings::validate`].
///
/// Fails with `InvalidArgument` if it is out of range.
pub fn check_max_attempts(n: i32) -> Result<()> {
    if !(1..=1000).contains(&n) {
        return Err(Error::InvalidArgument(format!(
            "max_attempts {n} is out of range (1 to 1000)"
        )));
    }
    Ok(())
}

/// A subscription as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    /// Name.
    pub name: String,
    /// Topic name.
    pub topic: String,
    /// Settings.
    pub settings: SubscriptionSettings,
    /// Creation time.
    pub created_at: Micros,
}

/// Counters and gauges of a subscription.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SubscriptionStats {
    /// Not yet acked nor dead-lettered, in flight included.
    pub backlog: i64,
    /// Leased now.
    pub in_flight: i64,
    /// Age of the oldest unacked message, if any.
    pub oldest_unacked_age: Option<Duration>,
    /// Dead letters kept.
    pub dead_lettered: i64,
    /// Deliveries since creation.
    pub delivered: i64,
    /// Acks since creation.
    pub acked: i64,
    /// Deliveries with attempt > 1.
    pub redelivered: i64,
    /// Keys held back by a message waiting for redelivery.
    pub blocked_keys: i64,
    /// Some of those keys.
    pub blocked_key_sample: Vec<String>,
    /// No message at or below this sequence can be delivered again.
    pub ack_watermark: i64,
}

/// A dead-lettered message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// The message.
    pub message: StoredMessage,
    /// Deliveries made.
    pub attempts: i32,
    /// First delivery.
    pub first_delivery_at: Option<Micros>,
    /// Last delivery.
    pub last_delivery_at: Option<Micros>,
    /// Last nack reason, or why the broker gave up.
    pub reason: String,
    /// When it was dead-lettered.
    pub dead_lettered_at: Micros,
}

/// Where a message waiting on a subscription stands, as Peek shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageState {
    /// Never delivered: the subscription has not reached it yet.
    New,
    /// Deliverable now.
    Ready,
    /// Waiting for its redelivery time after a failed attempt.
    Backoff,
    /// Leased to a consumer.
    Leased,
    /// Ordered subscription: waits for the earlier message of its key.
    Held,
}

/// A message waiting on a subscription, as Peek shows it: nothing about it
/// changes by being shown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeekedMessage {
    /// The message.
    pub message: StoredMessage,
    /// Where it stands.
    pub state: MessageState,
    /// Deliveries counted so far (0 if never delivered).
    pub attempts: i32,
    /// Ready and Backoff: when it may be delivered; Leased: when the lease
    /// ends; `None` for New and Held.
    pub available_at: Option<Micros>,
    /// The last nack's reason, or empty.
    pub reason: String,
}

/// Where Seek moves a cursor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeekTarget {
    /// First message published at or after this instant.
    Time(Micros),
    /// This sequence number.
    Sequence(i64),
}

/// Checks a topic or subscription name: 1 to 255 of `[A-Za-z0-9._-]`.
///
/// Fails with `InvalidArgument` naming `what` and the problem.
pub fn validate_name(what: &str, name: &str) -> Result<()> {
    if name.is_empty() {
        return Err(Error::InvalidArgument(format!("{what} name is empty")));
    }
    if name.len() > 255 {
        return Err(Error::InvalidArgument(format!(
            "{what} name is {} bytes long; the limit is 255",
            name.len()
        )));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(Error::InvalidArgument(format!(
            "{what} name {} contains {c:?}; use letters, digits, '.', '_' and '-'",
            quoted(name)
        )));
    }
    Ok(())
}

/// Most characters of a client's value echoed in an error message.
const ECHO_CHARS: usize = 64;

/// `value` quoted for an error message, cut after [`ECHO_CHARS`]
/// characters (with its full length said), so that an error never echoes
/// an unbounded input back to the client or into the log.
pub fn quoted(value: &str) -> String {
    match value.char_indices().nth(ECHO_CHARS) {
        None => format!("{value:?}"),
        Some((cut, _)) => format!("{:?}… ({} bytes)", &value[..cut], value.len()),
    }
}

/// `text` cut to at most `max` bytes, at a character boundary.
pub fn cut(text: &str, max: usize) -> &str {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// Parses a message id: a UUID in any standard text form, not nil.
pub fn parse_message_id(id: &str) -> Result<Uuid> {
    if id.is_empty() {
        return Err(Error::InvalidArgument(
            "message id is missing; every message needs a UUID id (its idempotency key)".into(),
        ));
    }
    let uuid = Uuid::parse_str(id)
        .map_err(|_| Error::InvalidArgument(format!("message id {} is not a UUID", quoted(id))))?;
    if uuid.is_nil() {
        return Err(Error::InvalidArgument("message id is the nil UUID".into()));
    }
    Ok(uuid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ack_id_round_trips_through_text() {
        let id = AckId {
            subscription: 7,
            sequence: 1234,
            token: -5,
            deadline: Some(1_700_000_000_000_000),
        };
        assert_eq!(id.to_string().parse::<AckId>().unwrap(), id);
        // Ids without a deadline (older brokers) still parse.
        let old = AckId {
            deadline: None,
            ..id
        };
        assert_eq!(old.to_string().parse::<AckId>().unwrap(), old);
        assert!("7-x-1".parse::<AckId>().is_err());
        assert!("7-1".parse::<AckId>().is_err());
        assert!("7-1-1-zz".parse::<AckId>().is_err());
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let s = SubscriptionSettings {
            min_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(350),
            ..Default::default()
        };
        assert_eq!(s.backoff(1), Duration::from_millis(100));
        assert_eq!(s.backoff(2), Duration::from_millis(200));
        assert_eq!(s.backoff(3), Duration::from_millis(350));
        assert_eq!(s.backoff(40), Duration::from_millis(350));
    }

    #[test]
    fn names_are_checked() {
        assert!(validate_name("topic", "orders.v1-x_y").is_ok());
        assert!(validate_name("topic", "").is_err());
        assert!(validate_name("topic", "a b").is_err());
        assert!(validate_name("topic", &"a".repeat(256)).is_err());
    }
}

/// Changes to a subscription's settings; `None` leaves a field alone.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SubscriptionPatch {
    /// New lease length.
    pub ack_deadline: Option<Duration>,
    /// New max attempts.
    pub max_attempts: Option<i32>,
    /// New first backoff.
    pub min_backoff: Option<Duration>,
    /// New longest backoff.
    pub max_backoff: Option<Duration>,
    /// New dead-letter topic (`Some(None)` removes it).
    pub dead_letter_topic: Option<Option<String>>,
    /// New ordering.
    pub ordered: Option<bool>,
}

/// Changes to a topic's settings; `None` leaves a field alone.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TopicPatch {
    /// New retention.
    pub retention: Option<Duration>,
    /// New max age.
    pub max_age: Option<Duration>,
}

/// A subscription to create.
#[derive(Debug, Clone)]
pub struct NewSubscription {
    /// Name.
    pub name: String,
    /// Topic name.
    pub topic: String,
    /// Settings.
    pub settings: SubscriptionSettings,
    /// Where it starts.
    pub start: StartPosition,
}

//! The broker: the domain between the gRPC layer and the store. Every
//! operation is a method over domain types that validates its input (names,
//! ids, settings, page sizes, limits) and then calls the store; it also tells
//! long-running streams when to drain.

use std::future::Future;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::Instrument;

use crate::error::{Error, Result};
use crate::model::{
    self, AckId, AckOperation, AckOutcome, AckStatus, DeadLetter, Delivery, LeaseExtension, Nack,
    NackItem, NewMessage, Page, PeekedMessage, PublishOutcome, SeekTarget, SessionCommand,
    SessionEvent, Subscription, SubscriptionStats, Topic, TopicSettings, validate_name,
};
use crate::session::{self, Session};
use crate::store::{
    Holder, LeaseBatch, Link, NewSubscription, Store, SubscriptionPatch, TopicPatch,
};

/// Limits on what clients may send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest message accepted, in bytes: payload, ordering key and
    /// attribute names and values together.
    pub max_message_bytes: usize,
    /// Most messages in one publish request.
    pub max_batch_messages: usize,
    /// Largest ordering key, in bytes.
    pub max_key_bytes: usize,
    /// Most attributes on one message.
    pub max_attributes: usize,
    /// Most messages leased to one Subscribe stream at once.
    pub max_outstanding_messages: usize,
    /// Most message bytes in one Subscribe or Pull response, unless the
    /// client asks for fewer; a single larger message is still delivered,
    /// alone. The default stays under the 4 MiB a default gRPC client
    /// accepts.
    pub max_response_bytes: usize,
    /// How often an idle subscriber looks for work it was not woken for.
    pub poll_interval: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_bytes: 1024 * 1024,
            max_batch_messages: 1000,
            max_key_bytes: 1024,
            max_attributes: 64,
            max_outstanding_messages: 10_000,
            max_response_bytes: DEFAULT_MAX_RESPONSE_BYTES,
            poll_interval: Duration::from_secs(1),
        }
    }
}

/// Default of [`Limits::max_response_bytes`]: 3 MiB, under the 4 MiB
/// receive limit of default gRPC clients with room for framing.
pub const DEFAULT_MAX_RESPONSE_BYTES: usize = 3 * 1024 * 1024;
/// Most acks, nacks, extensions or releases in one request.
pub const MAX_SETTLE_ITEMS: usize = 10_000;
/// Longest ack id accepted (real ones are under 70 bytes).
const MAX_ACK_ID_BYTES: usize = 128;
/// Nack reasons are kept up to this many bytes.
pub const MAX_REASON_BYTES: usize = 4096;

/// Page size when a listing asks for none.
const DEFAULT_PAGE: usize = 100;
/// Largest page a listing returns.
const MAX_PAGE: usize = 1000;
/// Longest a Pull may wait.
const MAX_PULL_WAIT: Duration = Duration::from_secs(60);
/// Longest lease extension, nack delay (and ack deadline).
const MAX_LEASE: Duration = Duration::from_secs(12 * 3600);

fn invalid(message: impl Into<String>) -> Error {
    Error::InvalidArgument(message.into())
}

fn subscription_name(name: &str) -> Result<()> {
    validate_name("subscription", name)
}

fn topic_name(name: &str) -> Result<()> {
    validate_name("topic", name)
}

/// The page size a listing asked for: 0 is the default, larger ones are
/// capped.
fn page_size(n: i32) -> Result<usize> {
    match n {
        0 => Ok(DEFAULT_PAGE),
        n if n < 0 => Err(invalid("page_size is negative")),
        n => Ok((n as usize).min(MAX_PAGE)),
    }
}

/// A check value of a page token's content (FNV-1a, 32 bits): a token
/// that was cut, doubled or edited fails it.
fn token_check(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(*b)).wrapping_mul(0x0100_0193)
    })
}

/// The sequence a page token of a list in sequence order names (0 for the
/// first page).
fn sequence_token(token: &str) -> Result<i64> {
    match decode_token(token)? {
        None => Ok(0),
        Some(s) => s
            .parse::<i64>()
            .map_err(|_| invalid("page_token is not one this server issued")),
    }
}

/// Page tokens are the last name (or sequence) of the previous page and a
/// check value, in hex so that they are opaque and safe in any transport.
pub(crate) fn encode_token(last: &str) -> String {
    let mut token: String = last.bytes().map(|b| format!("{b:02x}")).collect();
    token.push_str(&format!("{:08x}", token_check(last.as_bytes())));
    token
}

pub(crate) fn decode_token(token: &str) -> Result<Option<String>> {
    if token.is_empty() {
        return Ok(None);
    }
    let bad = || {
        invalid(format!(
            "page_token ({} bytes) is not one this server issued; \
             pass a next_page_token unchanged, or none for the first page",
            token.len()
        ))
    };
    // The longest token is that of a 255-byte name. Only hex digits: the
    // splits below are at byte offsets, which in other text may fall inside
    // a character, and `from_str_radix` alone would take a sign too.
    if !token.len().is_multiple_of(2)
        || token.len() < 10
        || token.len() > 2 * 255 + 8
        || !token.bytes().all(|b| b.is_ascii_hexdigit())
    {
        return Err(bad());
    }
    let (content, check) = token.split_at(token.len() - 8);
    let bytes = (0..content.len())
        .step_by(2)
        .map(|i| {
            content
                .get(i..i + 2)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        })
        .collect::<Option<Vec<u8>>>()
        .ok_or_else(bad)?;
    if u32::from_str_radix(check, 16).ok() != Some(token_check(&bytes)) {
        return Err(bad());
    }
    String::from_utf8(bytes).map(Some).map_err(|_| bad())
}

/// A page of `items` whose size was `size`: a full page has a next token.
fn page<T>(items: Vec<T>, size: usize, last: impl Fn(&T) -> String) -> Page<T> {
    let next_page_token = match items.last() {
        Some(t) if items.len() == size => encode_token(&last(t)),
        _ => String::new(),
    };
    Page {
        items,
        next_page_token,
    }
}

/// Parses ack ids as clients sent them. A malformed id becomes an `Unknown`
/// outcome rather than failing the whole request.
fn parse_ids<'a>(ids: impl Iterator<Item = &'a str>) -> Vec<Result<AckId, String>> {
    ids.map(|s| s.parse::<AckId>().map_err(|e| e.to_string()))
        .collect()
}

/// A nack reason as kept: at most [`MAX_REASON_BYTES`] (cut at a character
/// boundary), without NUL characters, which storage cannot hold.
///
/// Fails with `InvalidArgument` for a reason with a NUL character.
fn reason(text: &str) -> Result<String> {
    if text.contains('\0') {
        return Err(invalid(
            "nack reason contains a NUL character (U+0000), which storage cannot hold",
        ));
    }
    Ok(model::cut(text, MAX_REASON_BYTES).to_owned())
}

/// Merges the store's answers for the well-formed ids back among the
/// malformed ones, in request order.
fn outcomes(
    ids: impl Iterator<Item = String>,
    parsed: &[Result<AckId, String>],
    operation: AckOperation,
    answered: Vec<AckStatus>,
) -> Vec<AckOutcome> {
    let mut answered = answered.into_iter();
    ids.zip(parsed)
        .map(|(ack_id, p)| AckOutcome {
            ack_id,
            operation,
            status: match p {
                Ok(_) => answered
                    .next()
                    .unwrap_or_else(|| AckStatus::Unknown("no answer from storage".into())),
                Err(e) => AckStatus::Unknown(e.clone()),
            },
        })
        .collect()
}

/// One ack, nack or extend request: what it is and its subscription.
struct Settle<'a> {
    subscription: &'a str,
    operation: AckOperation,
    /// The request's field, for errors.
    field: &'static str,
    /// The error for a request with nothing in it.
    empty: &'static str,
}

impl Settle<'_> {
    /// Checks the request, sends the store an item (made by `item`) for
    /// each well-formed ack id and answers every request in order, a
    /// malformed id with `Unknown`.
    async fn run<T, I, Fut>(
        &self,
        requests: Vec<T>,
        ack_id: impl Fn(&T) -> &str,
        item: impl Fn(AckId, &T) -> Result<I>,
        store: impl FnOnce(Vec<I>) -> Fut,
    ) -> Result<Vec<AckOutcome>>
    where
        Fut: Future<Output = Result<Vec<AckStatus>>>,
    {
        subscription_name(self.subscription)?;
        if requests.is_empty() {
            return Err(invalid(self.empty));
        }
        if requests.len() > MAX_SETTLE_ITEMS {
            return Err(invalid(format!(
                "{} has {} ack ids; the limit is {MAX_SETTLE_ITEMS} per request",
                self.field,
                requests.len()
            )));
        }
        for (i, r) in requests.iter().enumerate() {
            let id = ack_id(r);
            if id.len() > MAX_ACK_ID_BYTES {
                return Err(invalid(format!(
                    "{}[{i}]: ack id is {} bytes; ack ids are at most {MAX_ACK_ID_BYTES}",
                    self.field,
                    id.len()
                )));
            }
        }
        let parsed = parse_ids(requests.iter().map(&ack_id));
        let mut items = Vec::new();
        for (p, r) in parsed.iter().zip(&requests) {
            if let Ok(id) = p {
                items.push(item(*id, r)?);
            }
        }
        let answered = if items.is_empty() {
            Vec::new()
        } else {
            store(items).await?
        };
        let ids = requests.iter().map(|r| ack_id(r).to_owned());
        Ok(outcomes(ids, &parsed, self.operation, answered))
    }
}

/// Checks the fields a patch sets, each on its own. The rule across fields
/// (min ≤ max backoff) needs the merged row, so the store's writer applies
/// [`model::SubscriptionSettings::validate`] to it.
fn check_patch(patch: &SubscriptionPatch) -> Result<()> {
    let base = model::SubscriptionSettings::default();
    let alone = model::SubscriptionSettings {
        ack_deadline: patch.ack_deadline.unwrap_or(base.ack_deadline),
        max_attempts: patch.max_attempts.unwrap_or(base.max_attempts),
        min_backoff: patch.min_backoff.unwrap_or(Duration::ZERO),
        max_backoff: patch.max_backoff.unwrap_or(model::MAX_BACKOFF),
        dead_letter_topic: patch.dead_letter_topic.clone().flatten(),
        ordered: false,
    };
    alone.validate()
}

/// The handle the gRPC services share: storage, limits and the drain signal.
#[derive(Debug, Clone)]
pub struct Broker {
    store: Store,
    limits: Limits,
    draining: watch::Receiver<bool>,
}

impl Broker {
    /// A broker over `store`; `draining` turns true when the server stops.
    pub fn new(store: Store, limits: Limits, draining: watch::Receiver<bool>) -> Self {
        Broker {
            store,
            limits,
            draining,
        }
    }

    /// The limits.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// A receiver that turns true when the server starts draining.
    pub fn draining(&self) -> watch::Receiver<bool> {
        self.draining.clone()
    }

    /// Resolves once the server starts draining.
    pub async fn drained(draining: &mut watch::Receiver<bool>) {
        let _ = draining.wait_for(|d| *d).await;
    }

    /// The response byte bound a client asked for (0: the default), at
    /// most [`Limits::max_response_bytes`].
    ///
    /// Fails with `InvalidArgument` for a negative value.
    pub(crate) fn response_bytes(&self, asked: i32) -> Result<usize> {
        let max = self.limits.max_response_bytes;
        match asked {
            0 => Ok(max),
            n if n < 0 => Err(invalid(format!("max_response_bytes {n} is negative"))),
            n => Ok((n as usize).min(max)),
        }
    }

    /// Fails with `Unavailable` once the server is draining.
    pub fn check_open(&self) -> Result<()> {
        if *self.draining.borrow() {
            return Err(Error::Unavailable(
                "the broker is shutting down; retry on another instance or after restart".into(),
            ));
        }
        Ok(())
    }

    /// Checks a publish batch against the limits.
    ///
    /// Fails with `InvalidArgument` naming the message and the problem.
    pub fn check_batch(&self, messages: &[NewMessage]) -> Result<()> {
        if messages.is_empty() {
            return Err(Error::InvalidArgument(
                "publish request has no messages".into(),
            ));
        }
        if messages.len() > self.limits.max_batch_messages {
            return Err(Error::InvalidArgument(format!(
                "publish request has {} messages; the limit is {}",
                messages.len(),
                self.limits.max_batch_messages
            )));
        }
        for (at, m) in messages.iter().enumerate() {
            let bad = |what: String| Err(invalid(format!("messages[{at}] (id {}): {what}", m.id)));
            let key = m.key.as_deref().unwrap_or_default();
            let attribute_bytes: usize = m.attributes.iter().map(|(k, v)| k.len() + v.len()).sum();
            let size = m.payload.len() + key.len() + attribute_bytes;
            if size > self.limits.max_message_bytes {
                return bad(format!(
                    "the message is {size} bytes (payload {}, ordering key {}, attributes {}); \
                     the limit is {} bytes for all three together",
                    m.payload.len(),
                    key.len(),
                    attribute_bytes,
                    self.limits.max_message_bytes
                ));
            }
            if key.len() > self.limits.max_key_bytes {
                return bad(format!(
                    "ordering key is {} bytes; the limit is {} bytes",
                    key.len(),
                    self.limits.max_key_bytes
                ));
            }
            if key.contains('\0') {
                return bad(
                    "ordering key contains a NUL character (U+0000), which storage cannot hold"
                        .into(),
                );
            }
            if m.attributes.len() > self.limits.max_attributes {
                return bad(format!(
                    "{} attributes; the limit is {}",
                    m.attributes.len(),
                    self.limits.max_attributes
                ));
            }
            if m.attributes.iter().any(|(k, _)| k.is_empty()) {
                return bad("an attribute has an empty name".into());
            }
        }
        Ok(())
    }

    /// Validates a batch and queues it behind those queued before; the
    /// returned future answers after the commit. `link` places it in its
    /// publish stream's chain: once a request of the stream fails in
    /// storage, none after it is stored (see [`crate::store::Chain`]; a
    /// request refused here is marked by the stream).
    ///
    /// Fails as [`Broker::publish`] does.
    pub async fn enqueue_publish(
        &self,
        messages: Vec<NewMessage>,
        link: Link,
    ) -> Result<impl Future<Output = Result<Vec<PublishOutcome>>> + Send + 'static> {
        self.check_open()?;
        self.check_batch(&messages)?;
        let spans = crate::trace::publish_spans(&messages);
        let done = self.store.enqueue_publish(messages, Some(link)).await?;
        Ok(async move {
            let outcome = done.await;
            drop(spans);
            outcome
        })
    }

    /// Validates and publishes a batch; answers after the commit.
    ///
    /// Fails with `InvalidArgument` (nothing stored), `NotFound` for an
    /// unknown topic (nothing stored), `Unavailable` while draining or when
    /// storage fails.
    pub async fn publish(&self, messages: Vec<NewMessage>) -> Result<Vec<PublishOutcome>> {
        self.check_open()?;
        self.check_batch(&messages)?;
        let _spans = crate::trace::publish_spans(&messages);
        self.store.publish(messages).await
    }

    /// Creates a topic.
    ///
    /// Fails with `InvalidArgument` for a bad name, `AlreadyExists`.
    #[tracing::instrument(skip_all, fields(topic = %name))]
    pub async fn create_topic(&self, name: &str, settings: TopicSettings) -> Result<Topic> {
        topic_name(name)?;
        let created = self.store.create_topic(name, settings).await?;
        tracing::info!(topic = %created.name, "topic created");
        Ok(created)
    }

    /// A topic.
    ///
    /// Fails with `InvalidArgument` for a bad name, `NotFound`.
    #[tracing::instrument(skip_all, fields(topic = %name))]
    pub async fn get_topic(&self, name: &str) -> Result<Topic> {
        topic_name(name)?;
        self.store.get_topic(name).await
    }

    /// One page of topics in name order; `page_token` is empty or a
    /// previous page's `next_page_token`.
    ///
    /// Fails with `InvalidArgument` for a negative size or a foreign token.
    #[tracing::instrument(skip_all)]
    pub async fn list_topics(&self, page_size: i32, page_token: &str) -> Result<Page<Topic>> {
        let size = self::page_size(page_size)?;
        let after = decode_token(page_token)?;
        let topics = self.store.list_topics(after.as_deref(), size).await?;
        Ok(page(topics, size, |t| t.name.clone()))
    }

    /// Changes the settings a patch names, leaving the others alone.
    ///
    /// Fails with `InvalidArgument` for a bad name, `NotFound`.
    #[tracing::instrument(skip_all, fields(topic = %name))]
    pub async fn update_topic(&self, name: &str, patch: TopicPatch) -> Result<Topic> {
        topic_name(name)?;
        self.store.update_topic(name, patch).await
    }

    /// Deletes a topic.
    ///
    /// Fails with `InvalidArgument` for a bad name, `NotFound`,
    /// `FailedPrecondition` while it has subscriptions.
    #[tracing::instrument(skip_all, fields(topic = %name))]
    pub async fn delete_topic(&self, name: &str) -> Result<()> {
        topic_name(name)?;
        self.store.delete_topic(name).await
    }

    /// Creates a subscription.
    ///
    /// Fails with `InvalidArgument` for a bad name or settings, `NotFound`
    /// for an unknown topic, `AlreadyExists`.
    #[tracing::instrument(skip_all, fields(subscription = %new.name, topic = %new.topic))]
    pub async fn create_subscription(&self, new: NewSubscription) -> Result<Subscription> {
        subscription_name(&new.name)?;
        topic_name(&new.topic)?;
        new.settings.validate()?;
        let created = self.store.create_subscription(new).await?;
        tracing::info!(subscription = %created.name, topic = %created.topic, "subscription created");
        Ok(created)
    }

    /// A subscription.
    ///
    /// Fails with `InvalidArgument` for a bad name, `NotFound`.
    #[tracing::instrument(skip_all, fields(subscription = %name))]
    pub async fn get_subscription(&self, name: &str) -> Result<Subscription> {
        subscription_name(name)?;
        self.store.get_subscription(name).await
    }

    /// One page of subscriptions in name order, of one topic or all.
    ///
    /// Fails with `InvalidArgument` for a bad topic name, a negative size or
    /// a foreign token.
    #[tracing::instrument(skip_all, fields(topic = topic.unwrap_or_default()))]
    pub async fn list_subscriptions(
        &self,
        topic: Option<&str>,
        page_size: i32,
        page_token: &str,
    ) -> Result<Page<Subscription>> {
        let size = self::page_size(page_size)?;
        let after = decode_token(page_token)?;
        if let Some(t) = topic {
            topic_name(t)?;
        }
        let subs = self
            .store
            .list_subscriptions(topic, after.as_deref(), size)
            .await?;
        Ok(page(subs, size, |s| s.name.clone()))
    }

    /// Changes only the settings a patch names; the store merges it into
    /// the current row inside its transaction, so concurrent updates of
    /// different fields all survive.
    ///
    /// Fails with `InvalidArgument` for a bad name or setting, `NotFound`.
    #[tracing::instrument(skip_all, fields(subscription = %name))]
    pub async fn update_subscription(
        &self,
        name: &str,
        patch: SubscriptionPatch,
    ) -> Result<Subscription> {
        subscription_name(name)?;
        check_patch(&patch)?;
        self.store.update_subscription(name, patch).await
    }

    /// Deletes a subscription with its leases and dead letters.
    ///
    /// Fails with `InvalidArgument` for a bad name, `NotFound`.
    #[tracing::instrument(skip_all, fields(subscription = %name))]
    pub async fn delete_subscription(&self, name: &str) -> Result<()> {
        subscription_name(name)?;
        self.store.delete_subscription(name).await
    }

    /// Counters and gauges of a subscription.
    ///
    /// Fails with `InvalidArgument` for a bad name, `NotFound`.
    #[tracing::instrument(skip_all, fields(subscription = %subscription))]
    pub async fn stats(&self, subscription: &str) -> Result<SubscriptionStats> {
        subscription_name(subscription)?;
        self.store.stats(subscription).await
    }

    /// Moves a subscription's cursor; returns the next sequence to deliver.
    ///
    /// Fails with `InvalidArgument` for a bad name, `NotFound`.
    #[tracing::instrument(skip_all, fields(subscription = %subscription))]
    pub async fn seek(&self, subscription: &str, target: SeekTarget) -> Result<i64> {
        subscription_name(subscription)?;
        self.store.seek(subscription, target).await
    }

    /// One page of dead letters in sequence order, and their total.
    ///
    /// Fails with `InvalidArgument` for a bad name, a negative size or a
    /// foreign token, `NotFound`.
    #[tracing::instrument(skip_all, fields(subscription = %subscription))]
    pub async fn list_dead_letters(
        &self,
        subscription: &str,
        page_size: i32,
        page_token: &str,
    ) -> Result<(Page<DeadLetter>, i64)> {
        subscription_name(subscription)?;
        let size = self::page_size(page_size)?;
        let after = sequence_token(page_token)?;
        let (letters, total) = self
            .store
            .list_dead_letters(subscription, after, size)
            .await?;
        Ok((
            page(letters, size, |d| d.message.sequence.to_string()),
            total,
        ))
    }

    /// One page of the messages waiting on a subscription (new, ready, in
    /// backoff, leased or held), in sequence order, within `max_response_bytes`
    /// (0: the broker's bound; a single larger message still comes alone).
    /// Nothing about them changes: no lease, attempt or counter.
    ///
    /// Fails with `InvalidArgument` for a bad name, a negative size or a
    /// foreign token, `NotFound`.
    #[tracing::instrument(skip_all, fields(subscription = %subscription))]
    pub async fn peek(
        &self,
        subscription: &str,
        page_size: i32,
        page_token: &str,
        max_response_bytes: i32,
    ) -> Result<Page<PeekedMessage>> {
        subscription_name(subscription)?;
        let size = self::page_size(page_size)?;
        let max_bytes = self.response_bytes(max_response_bytes)?;
        let after = sequence_token(page_token)?;
        let mut items = self.store.peek(subscription, after, size).await?;
        let mut bytes = 0usize;
        let fits = items
            .iter()
            .position(|p| {
                bytes = bytes.saturating_add(p.message.response_bytes());
                bytes > max_bytes
            })
            .map_or(items.len(), |i| i.max(1));
        let cut = fits < items.len();
        items.truncate(fits);
        let next_page_token = match items.last() {
            Some(p) if cut || items.len() == size => encode_token(&p.message.sequence.to_string()),
            _ => String::new(),
        };
        Ok(Page {
            items,
            next_page_token,
        })
    }

    /// Makes dead letters deliverable again (all if `sequences` is empty);
    /// returns how many.
    ///
    /// Fails with `InvalidArgument` for a bad name, `NotFound`.
    #[tracing::instrument(skip_all, fields(subscription = %subscription))]
    pub async fn redrive(&self, subscription: &str, sequences: Vec<i64>) -> Result<i64> {
        subscription_name(subscription)?;
        self.store.redrive(subscription, sequences).await
    }

    /// Deletes the dead letters named, or every one if `all`; returns how
    /// many.
    ///
    /// Fails with `InvalidArgument` for a bad name or unless exactly one of
    /// `sequences` and `all` is given, `NotFound`.
    #[tracing::instrument(skip_all, fields(subscription = %subscription))]
    pub async fn purge(&self, subscription: &str, sequences: Vec<i64>, all: bool) -> Result<i64> {
        subscription_name(subscription)?;
        let sequences = match (all, sequences.is_empty()) {
            (true, true) => None,
            (false, false) => Some(sequences),
            (true, false) => return Err(invalid("give either sequences or all, not both")),
            (false, true) => {
                return Err(invalid(
                    "name the sequences to purge, or set all to purge every dead letter",
                ));
            }
        };
        self.store.purge(subscription, sequences).await
    }

    /// Leases up to `max_messages` (0: one; at most 1000), waiting up to
    /// `max_wait` (at most a minute) for the first.
    ///
    /// Fails with `Unavailable` while draining, `InvalidArgument` for a bad
    /// name or count, `NotFound`.
    #[tracing::instrument(skip_all, fields(subscription = %subscription))]
    pub async fn pull(
        &self,
        subscription: &str,
        max_messages: i32,
        max_wait: Duration,
        max_response_bytes: i32,
    ) -> Result<Vec<Delivery>> {
        self.check_open()?;
        subscription_name(subscription)?;
        let max = match max_messages {
            0 => 1,
            n @ 1..=1000 => n as usize,
            n => {
                return Err(invalid(format!(
                    "max_messages {n} is out of range (1 to 1000)"
                )));
            }
        };
        if max_wait > MAX_PULL_WAIT {
            return Err(invalid(format!(
                "max_wait {max_wait:?} is out of range (at most 60 s)"
            )));
        }
        let wait = max_wait;
        let max_bytes = self.response_bytes(max_response_bytes)?;
        let sub = self.store.get_subscription(subscription).await?;
        let mut topic_news = self.watch_topic(&sub.topic);
        let mut sub_news = self.watch_subscription(&sub.name);
        let give_up = Instant::now() + wait;
        loop {
            topic_news.borrow_and_update();
            sub_news.borrow_and_update();
            let batch = self.store.lease(&sub.name, max, max_bytes).await?;
            if !batch.deliveries.is_empty() || Instant::now() >= give_up {
                return Ok(batch.deliveries);
            }
            let wake = batch
                .next_due
                .map_or(give_up, |due| give_up.min(session::instant_at(due)));
            tokio::select! {
                _ = topic_news.changed() => {}
                _ = sub_news.changed() => {}
                _ = tokio::time::sleep_until(wake) => {}
            }
        }
    }

    /// Acks leases; one outcome per id, in order (a malformed id is
    /// answered `Unknown`).
    ///
    /// Fails with `InvalidArgument` for a bad name or no ids, `NotFound`.
    #[tracing::instrument(skip_all, fields(subscription = %subscription))]
    pub async fn ack(&self, subscription: &str, ack_ids: Vec<String>) -> Result<Vec<AckOutcome>> {
        let settle = Settle {
            subscription,
            operation: AckOperation::Ack,
            field: "ack_ids",
            empty: "ack request has no ack ids",
        };
        settle
            .run(
                ack_ids,
                String::as_str,
                |id, _| Ok(id),
                |ids| self.store.ack(subscription, ids),
            )
            .await
    }

    /// Nacks leases: each is redelivered after its delay or the backoff,
    /// or dead-lettered after `max_attempts`; one outcome per nack.
    ///
    /// Fails with `InvalidArgument` for a bad name or no nacks, `NotFound`.
    #[tracing::instrument(skip_all, fields(subscription = %subscription))]
    pub async fn nack(&self, subscription: &str, nacks: Vec<Nack>) -> Result<Vec<AckOutcome>> {
        let settle = Settle {
            subscription,
            operation: AckOperation::Nack,
            field: "nacks",
            empty: "nack request has no nacks",
        };
        let item = |ack_id, n: &Nack| {
            if n.delay.is_some_and(|d| d > MAX_LEASE) {
                return Err(invalid(format!(
                    "nack delay {:?} is out of range (at most 12 h)",
                    n.delay.unwrap_or_default()
                )));
            }
            Ok(NackItem {
                ack_id,
                delay: n.delay,
                reason: reason(&n.reason)?,
            })
        };
        settle
            .run(
                nacks,
                |n| n.ack_id.as_str(),
                item,
                |items| self.store.nack(subscription, items),
            )
            .await
    }

    /// Extends leases to now + their extension (1 µs to 12 h); an OK
    /// outcome carries the new deadline.
    ///
    /// Fails with `InvalidArgument` for a bad name, extension or none,
    /// `NotFound`.
    #[tracing::instrument(skip_all, fields(subscription = %subscription))]
    pub async fn extend(
        &self,
        subscription: &str,
        extensions: Vec<LeaseExtension>,
    ) -> Result<Vec<AckOutcome>> {
        let settle = Settle {
            subscription,
            operation: AckOperation::Extend,
            field: "extensions",
            empty: "extend request has no extensions",
        };
        let item = |ack_id, e: &LeaseExtension| {
            if e.extension.is_zero() || e.extension > MAX_LEASE {
                return Err(invalid(format!(
                    "extension {:?} is out of range (1 µs to 12 h)",
                    e.extension
                )));
            }
            Ok((ack_id, e.extension))
        };
        settle
            .run(
                extensions,
                |e| e.ack_id.as_str(),
                item,
                |items| self.store.extend(subscription, items),
            )
            .await
    }

    /// Gives leases back unprocessed: each message is redelivered at once
    /// and the release does not count as an attempt; one outcome per id.
    ///
    /// Fails with `InvalidArgument` for a bad name or no ids, `NotFound`.
    #[tracing::instrument(skip_all, fields(subscription = %subscription))]
    pub async fn release(
        &self,
        subscription: &str,
        ack_ids: Vec<String>,
    ) -> Result<Vec<AckOutcome>> {
        let settle = Settle {
            subscription,
            operation: AckOperation::Release,
            field: "release_ack_ids",
            empty: "release request has no ack ids",
        };
        settle
            .run(
                ack_ids,
                String::as_str,
                |id, _| Ok(id),
                |ids| self.store.release(subscription, ids),
            )
            .await
    }

    /// Ends leases whose stream ended while it held them: each counts as a
    /// failed attempt (redelivered at once, or dead-lettered after the
    /// last attempt), as if nacked with no delay and `reason`.
    pub(crate) async fn abandon(
        &self,
        subscription: &str,
        ids: Vec<AckId>,
        reason: &str,
    ) -> Result<Vec<AckStatus>> {
        let items = ids
            .into_iter()
            .map(|ack_id| NackItem {
                ack_id,
                delay: Some(Duration::ZERO),
                reason: reason.to_owned(),
            })
            .collect();
        self.store.nack(subscription, items).await
    }

    /// Gives leases back for immediate redelivery without counting an
    /// attempt, when the broker itself ends their stream (draining).
    pub(crate) async fn give_back(&self, subscription: &str, ids: Vec<AckId>) -> Result<()> {
        self.store.release(subscription, ids).await.map(|_| ())
    }

    /// Leases up to `max_messages` and about `max_bytes` for a session.
    pub(crate) async fn lease(
        &self,
        subscription: &str,
        max_messages: usize,
        max_bytes: usize,
        holder: Holder,
        runs: Vec<(String, i64)>,
    ) -> Result<LeaseBatch> {
        self.store
            .lease_as(subscription, max_messages, max_bytes, Some((holder, runs)))
            .await
    }

    /// The streams of this process that leases hand a key's messages to.
    pub(crate) fn routes(&self) -> &crate::store::Routes {
        self.store.routes()
    }

    /// Moves whenever a topic gets new messages.
    pub(crate) fn watch_topic(&self, topic: &str) -> watch::Receiver<u64> {
        self.store.notifier().watch_topic(topic)
    }

    /// Moves whenever a subscription's deliveries change.
    pub(crate) fn watch_subscription(&self, subscription: &str) -> watch::Receiver<u64> {
        self.store.notifier().watch_subscription(subscription)
    }

    /// Opens a Subscribe session on `subscription` and runs it in a task:
    /// `first` sets its flow control (and may settle leases already), the
    /// `commands` that follow settle leases; the events it sends are
    /// deliveries and outcomes. An `Err` command ends the session with that
    /// error; when `commands` ends or the receiver is dropped, the session
    /// releases the leases it holds.
    ///
    /// Fails with `Unavailable` while draining, `InvalidArgument` for a bad
    /// name or flow control, `NotFound`.
    #[tracing::instrument(skip_all, fields(subscription = %subscription))]
    pub async fn subscribe<S>(
        &self,
        subscription: &str,
        first: SessionCommand,
        commands: S,
    ) -> Result<mpsc::Receiver<Result<SessionEvent>>>
    where
        S: futures_util::Stream<Item = Result<SessionCommand>> + Unpin + Send + 'static,
    {
        self.check_open()?;
        subscription_name(subscription)?;
        let sub = self.store.get_subscription(subscription).await?;
        let (tx, rx) = mpsc::channel(16);
        let mut session = Session::new(self.clone(), sub, tx);
        session.flow_control(&first.flow)?;
        tokio::spawn(session.run(first, commands).in_current_span());
        Ok(rx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tokens_round_trip() {
        for last in ["orders", "a", &"z".repeat(255), "1234"] {
            assert_eq!(
                decode_token(&encode_token(last)).unwrap().as_deref(),
                Some(last)
            );
        }
        assert_eq!(decode_token("").unwrap(), None);
    }

    /// Issue 12: the fuzzer's first find. A token with a multi-byte
    /// character where the check value starts made `split_at` panic in the
    /// handler; a sign before a hex pair was read as a digit.
    #[test]
    fn page_tokens_of_other_text_are_refused_not_a_panic() {
        for token in ["6\u{359} 6\u{359} 7 ", "ééééé", "0x6f72646572"] {
            assert!(
                matches!(decode_token(token), Err(Error::InvalidArgument(_))),
                "{token:?}"
            );
        }
        // "0f" and "+f" are both 15 to `from_str_radix`.
        let good = encode_token("\u{f}rders");
        let signed = format!("+{}", &good[1..]);
        assert!(decode_token(&signed).is_err(), "{signed:?}");
        assert_eq!(
            decode_token(&good.to_ascii_uppercase()).unwrap().as_deref(),
            Some("\u{f}rders")
        );
    }
}

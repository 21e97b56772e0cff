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
    NackItem, NewMessage, Page, PublishOutcome, SeekTarget, SessionCommand, SessionEvent,
    Subscription, SubscriptionStats, Topic, TopicSettings, validate_name,
};
use crate::session::{self, Session};
use crate::store::{LeaseBatch, NewSubscription, Store, SubscriptionPatch, TopicPatch};

/// Limits on what clients may send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest payload accepted, in bytes.
    pub max_message_bytes: usize,
    /// Most messages in one publish request.
    pub max_batch_messages: usize,
    /// Largest ordering key, in bytes.
    pub max_key_bytes: usize,
    /// Most attributes on one message.
    pub max_attributes: usize,
    /// Most messages leased to one Subscribe stream at once.
    pub max_outstanding_messages: usize,
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
            poll_interval: Duration::from_secs(1),
        }
    }
}

/// Page size when a listing asks for none.
const DEFAULT_PAGE: usize = 100;
/// Largest page a listing returns.
const MAX_PAGE: usize = 1000;
/// Longest a Pull may wait.
const MAX_PULL_WAIT: Duration = Duration::from_secs(60);
/// Longest lease extension (and ack deadline).
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

/// Page tokens are the last name (or sequence) of the previous page, in hex
/// so that they are opaque and safe in any transport.
fn encode_token(last: &str) -> String {
    last.bytes().map(|b| format!("{b:02x}")).collect()
}

fn decode_token(token: &str) -> Result<Option<String>> {
    if token.is_empty() {
        return Ok(None);
    }
    let bad = || {
        invalid(format!(
            "page_token {token:?} is not one this server issued"
        ))
    };
    if !token.len().is_multiple_of(2) {
        return Err(bad());
    }
    let bytes = (0..token.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&token[i..i + 2], 16).map_err(|_| bad()))
        .collect::<Result<Vec<u8>>>()?;
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
        min_backoff: Duration::ZERO,
        max_backoff: Duration::MAX,
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
        for m in messages {
            if m.payload.len() > self.limits.max_message_bytes {
                return Err(Error::InvalidArgument(format!(
                    "message {}: payload is {} bytes; the limit is {} bytes",
                    m.id,
                    m.payload.len(),
                    self.limits.max_message_bytes
                )));
            }
            if m.key
                .as_ref()
                .is_some_and(|k| k.len() > self.limits.max_key_bytes)
            {
                return Err(Error::InvalidArgument(format!(
                    "message {}: ordering key is longer than {} bytes",
                    m.id, self.limits.max_key_bytes
                )));
            }
            if m.attributes.len() > self.limits.max_attributes {
                return Err(Error::InvalidArgument(format!(
                    "message {}: {} attributes; the limit is {}",
                    m.id,
                    m.attributes.len(),
                    self.limits.max_attributes
                )));
            }
        }
        Ok(())
    }

    /// Validates a batch and queues it behind those queued before; the
    /// returned future answers after the commit.
    ///
    /// Fails as [`Broker::publish`] does.
    pub async fn enqueue_publish(
        &self,
        messages: Vec<NewMessage>,
    ) -> Result<impl Future<Output = Result<Vec<PublishOutcome>>> + Send + 'static> {
        self.check_open()?;
        self.check_batch(&messages)?;
        self.store.enqueue_publish(messages).await
    }

    /// Validates and publishes a batch; answers after the commit.
    ///
    /// Fails with `InvalidArgument` (nothing stored), `NotFound` for an
    /// unknown topic (nothing stored), `Unavailable` while draining or when
    /// storage fails.
    pub async fn publish(&self, messages: Vec<NewMessage>) -> Result<Vec<PublishOutcome>> {
        self.check_open()?;
        self.check_batch(&messages)?;
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
        let after = match decode_token(page_token)? {
            None => 0,
            Some(s) => s
                .parse::<i64>()
                .map_err(|_| invalid("page_token is not one this server issued"))?,
        };
        let (letters, total) = self
            .store
            .list_dead_letters(subscription, after, size)
            .await?;
        Ok((
            page(letters, size, |d| d.message.sequence.to_string()),
            total,
        ))
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
        let wait = max_wait.min(MAX_PULL_WAIT);
        let sub = self.store.get_subscription(subscription).await?;
        let mut topic_news = self.watch_topic(&sub.topic);
        let mut sub_news = self.watch_subscription(&sub.name);
        let give_up = Instant::now() + wait;
        loop {
            topic_news.borrow_and_update();
            sub_news.borrow_and_update();
            let batch = self
                .store
                .lease(&sub.name, max, session::DEFAULT_MAX_BYTES)
                .await?;
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
            empty: "nack request has no nacks",
        };
        let item = |ack_id, n: &Nack| {
            Ok(NackItem {
                ack_id,
                delay: n.delay,
                reason: n.reason.clone(),
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

    /// Gives leases back for immediate redelivery, without counting an
    /// attempt.
    ///
    /// Fails with `NotFound` for an unknown subscription.
    pub async fn release(&self, subscription: &str, ids: Vec<AckId>) -> Result<Vec<AckStatus>> {
        self.store.release(subscription, ids).await
    }

    /// Leases up to `max_messages` and about `max_bytes` for a session.
    pub(crate) async fn lease(
        &self,
        subscription: &str,
        max_messages: usize,
        max_bytes: usize,
    ) -> Result<LeaseBatch> {
        self.store
            .lease(subscription, max_messages, max_bytes)
            .await
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

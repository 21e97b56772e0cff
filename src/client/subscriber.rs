//! Subscribing: a streaming subscription that reconnects by itself, and the
//! unary Pull, Ack, Nack and ExtendLease for scripts and simple clients.

use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::UnboundedReceiverStream;

use super::{Backoff, Connection, Pages, Transport};
use crate::error::{Error, Result};
use crate::model::{
    self, AckOutcome, Delivery, LeaseExtension, Nack, Page, PeekedMessage, SessionCommand,
};
use crate::proto::{self, subscriber_service_client::SubscriberServiceClient};
use crate::wire;

/// What a subscription yields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A leased message.
    Message(Delivery),
    /// The outcome of an ack, nack or extension sent on the stream.
    Outcome(AckOutcome),
    /// A delivery the client could not read (a broker bug): its lease, and
    /// what was wrong. Nack it so that it is dead-lettered in the end.
    Malformed {
        /// The lease's ack id, as sent.
        ack_id: String,
        /// What was wrong.
        reason: String,
    },
}

/// Flow control of a subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowControl {
    /// Most unacked messages held at once.
    pub max_messages: i32,
    /// Most unacked payload bytes held at once.
    pub max_bytes: i64,
    /// Most message bytes in one response (0: the broker's default, which
    /// is also the most it allows); a single larger message still comes,
    /// alone. Lower it for a client whose receive limit is under 4 MiB.
    pub max_response_bytes: i32,
}

impl Default for FlowControl {
    fn default() -> Self {
        FlowControl {
            max_messages: 1000,
            max_bytes: 100 * 1024 * 1024,
            max_response_bytes: 0,
        }
    }
}

impl From<FlowControl> for model::FlowControl {
    fn from(f: FlowControl) -> model::FlowControl {
        model::FlowControl {
            max_outstanding_messages: f.max_messages,
            max_outstanding_bytes: f.max_bytes,
            max_response_bytes: f.max_response_bytes,
        }
    }
}

/// Opens subscriptions and makes unary calls.
#[derive(Debug, Clone)]
pub struct Subscriber {
    connection: Connection,
    client: SubscriberServiceClient<Transport>,
    backoff: Backoff,
}

impl Subscriber {
    /// A subscriber on `connection`; `backoff` paces reconnections.
    pub fn new(connection: &Connection, backoff: Backoff) -> Self {
        let client = SubscriberServiceClient::new(connection.transport())
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX);
        Subscriber {
            connection: connection.clone(),
            client,
            backoff,
        }
    }

    /// Opens a streaming subscription that reconnects after retryable
    /// failures and after the broker's internal errors. Leases held when a
    /// stream breaks are lost (their acks become stale); the broker
    /// redelivers those messages, each lease counting as a failed attempt.
    /// To give messages back without that, [`Subscription::release`] them
    /// or [`Subscription::close`] the subscription.
    pub fn subscribe(&self, subscription: &str, flow: FlowControl) -> Subscription {
        let (events_tx, events) = mpsc::channel(1024);
        let (commands, commands_rx) = mpsc::unbounded_channel();
        let (down_tx, down) = watch::channel(None);
        let mut first = proto::SubscribeRequest::from(SessionCommand {
            flow: flow.into(),
            ..Default::default()
        });
        first.subscription = subscription.to_owned();
        let task = tokio::spawn(run_subscription(
            self.clone(),
            first,
            commands_rx,
            events_tx,
            down_tx,
        ));
        Subscription {
            events,
            commands,
            down,
            task,
        }
    }

    /// Leases up to `max` messages, waiting up to `wait` for the first.
    ///
    /// Fails with the broker's error (`NotFound` for an unknown
    /// subscription).
    pub async fn pull(
        &self,
        subscription: &str,
        max: i32,
        wait: Duration,
    ) -> Result<Vec<Delivery>> {
        let request = proto::PullRequest {
            subscription: subscription.to_owned(),
            max_messages: max,
            max_wait: Some(wire::duration(wait)),
            max_response_bytes: 0,
        };
        let response = self.client.clone().pull(request).await;
        wire::all(self.answer(response)?.messages)
    }

    /// Up to `max` of the messages waiting on a subscription, in sequence
    /// order, without leasing them: no attempt, counter or lease changes.
    ///
    /// Fails with the broker's error (`NotFound` for an unknown
    /// subscription).
    pub async fn peek(&self, subscription: &str, max: usize) -> Result<Vec<PeekedMessage>> {
        let page_size = i32::try_from(max.min(1000)).unwrap_or(1000);
        let mut pages = self.peek_pages(subscription, page_size);
        let mut items = Vec::new();
        while items.len() < max {
            match pages.next().await {
                Some(page) => items.extend(page?),
                None => break,
            }
        }
        items.truncate(max);
        Ok(items)
    }

    /// The messages waiting on a subscription, `page_size` at a time, as
    /// [`Subscriber::peek`] shows them.
    pub fn peek_pages(&self, subscription: &str, page_size: i32) -> Pages<PeekedMessage> {
        let subscriber = self.clone();
        let subscription = subscription.to_owned();
        Pages::new(move |page_token| {
            let subscriber = subscriber.clone();
            let request = proto::PeekRequest {
                subscription: subscription.clone(),
                page_size,
                page_token,
                max_response_bytes: 0,
            };
            Box::pin(async move {
                let response = subscriber.client.clone().peek(request).await;
                let r = subscriber.answer(response)?;
                Ok(Page {
                    items: wire::all(r.messages)?,
                    next_page_token: r.next_page_token,
                })
            })
        })
    }

    /// Acknowledges leases; one outcome per ack id, in order.
    ///
    /// Fails with the broker's error (`NotFound` for an unknown
    /// subscription); a stale or unknown lease is an outcome, not an error.
    pub async fn ack(&self, subscription: &str, ack_ids: Vec<String>) -> Result<Vec<AckOutcome>> {
        let request = proto::AckRequest {
            subscription: subscription.to_owned(),
            ack_ids,
        };
        let response = self.client.clone().ack(request).await;
        wire::all(self.answer(response)?.outcomes)
    }

    /// Negatively acknowledges leases; one outcome per nack, in order.
    ///
    /// Fails as [`Subscriber::ack`] does.
    pub async fn nack(&self, subscription: &str, nacks: Vec<Nack>) -> Result<Vec<AckOutcome>> {
        let request = proto::NackRequest {
            subscription: subscription.to_owned(),
            nacks: nacks.into_iter().map(Into::into).collect(),
        };
        let response = self.client.clone().nack(request).await;
        wire::all(self.answer(response)?.outcomes)
    }

    /// Extends leases, each to now + its extension; one outcome per
    /// extension, in order, with the new deadline.
    ///
    /// Fails as [`Subscriber::ack`] does.
    pub async fn extend(
        &self,
        subscription: &str,
        extensions: Vec<LeaseExtension>,
    ) -> Result<Vec<AckOutcome>> {
        let request = proto::ExtendLeaseRequest {
            subscription: subscription.to_owned(),
            extensions: extensions.into_iter().map(Into::into).collect(),
        };
        let response = self.client.clone().extend_lease(request).await;
        wire::all(self.answer(response)?.outcomes)
    }

    fn answer<T>(&self, response: Result<tonic::Response<T>, tonic::Status>) -> Result<T> {
        response
            .map(tonic::Response::into_inner)
            .map_err(|s| self.connection.error(s))
    }
}

/// A live subscription. Dropping it ends the stream at once, without
/// waiting for answers to what was asked for; [`Subscription::close`] ends
/// it after the acks, nacks and releases already asked for are answered.
/// Either way the broker takes back the leases it still held without
/// counting an attempt, unless the transport broke first (then each counts
/// as a failed attempt, as when a consumer's process dies).
#[derive(Debug)]
pub struct Subscription {
    events: mpsc::Receiver<Result<Event>>,
    commands: mpsc::UnboundedSender<SessionCommand>,
    down: watch::Receiver<Option<Error>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Subscription {
    /// The next message or outcome; `None` once the subscription ended.
    ///
    /// Fails with an error that cannot be retried (unknown subscription,
    /// say), after which the subscription has ended.
    pub async fn next(&mut self) -> Option<Result<Event>> {
        self.events.recv().await
    }

    /// The next message, skipping outcomes and malformed deliveries.
    ///
    /// Fails as [`Subscription::next`] does.
    pub async fn next_message(&mut self) -> Option<Result<Delivery>> {
        loop {
            match self.next().await? {
                Ok(Event::Message(m)) => return Some(Ok(m)),
                Ok(Event::Outcome(_) | Event::Malformed { .. }) => continue,
                Err(e) => return Some(Err(e)),
            }
        }
    }

    /// Whether the stream is down: `Some(why)` while the subscription waits
    /// to reconnect after a failure (the broker unreachable, restarting),
    /// `None` while the stream is up (and before the first attempt ends).
    /// For showing a "reconnecting" line; the subscription reconnects by
    /// itself either way.
    pub fn down(&self) -> watch::Receiver<Option<Error>> {
        self.down.clone()
    }

    fn command(&self, command: SessionCommand) {
        // The task ends only with the subscription; a send error means it
        // ended and the caller learns so from `next`.
        let _ = self.commands.send(command);
    }

    /// Acknowledges messages; outcomes arrive as events.
    pub fn ack(&self, ack_ids: Vec<String>) {
        self.command(SessionCommand {
            acks: ack_ids,
            ..Default::default()
        });
    }

    /// Negatively acknowledges a message.
    pub fn nack(&self, ack_id: String, delay: Option<Duration>, reason: impl Into<String>) {
        self.command(SessionCommand {
            nacks: vec![Nack {
                ack_id,
                delay,
                reason: reason.into(),
            }],
            ..Default::default()
        });
    }

    /// Gives messages back unprocessed (for instance ones received but never
    /// handed to a handler): each is redelivered at once and the release
    /// does not count as a delivery attempt. Outcomes arrive as events.
    pub fn release(&self, ack_ids: Vec<String>) {
        if ack_ids.is_empty() {
            return;
        }
        self.command(SessionCommand {
            releases: ack_ids,
            ..Default::default()
        });
    }

    /// Ends the subscription gracefully: sends what was asked for (acks,
    /// nacks, releases), closes its side of the stream and waits, at most
    /// `timeout`, for the broker to answer them and end it. Leases still
    /// held then go back without counting an attempt.
    pub async fn close(mut self, timeout: Duration) {
        // Closing the command channel tells the task to half-close the
        // stream after the commands queued before it.
        let (closed, _) = mpsc::unbounded_channel();
        drop(std::mem::replace(&mut self.commands, closed));
        let task = &mut self.task;
        if tokio::time::timeout(timeout, task).await.is_err() {
            tracing::debug!("subscription did not close in time; ending it");
        }
    }

    /// Extends a lease to now + `extension`.
    pub fn extend(&self, ack_id: String, extension: Duration) {
        self.extend_all(vec![(ack_id, extension)]);
    }

    /// Extends several leases in one request (the broker commits them
    /// together), each to now + its extension.
    pub fn extend_all(&self, extensions: Vec<(String, Duration)>) {
        let extensions = extensions
            .into_iter()
            .map(|(ack_id, extension)| LeaseExtension { ack_id, extension })
            .collect();
        self.command(SessionCommand {
            extensions,
            ..Default::default()
        });
    }
}

/// The events of one response: each delivery and outcome on its own, so that
/// one the client cannot read does not hide the others.
fn events(response: proto::SubscribeResponse) -> Vec<Event> {
    let deliveries = response.messages.into_iter().map(|m| {
        let ack_id = m.ack_id.clone();
        match Delivery::try_from(m) {
            Ok(d) => Event::Message(d),
            Err(e) => Event::Malformed {
                ack_id,
                reason: e.to_string(),
            },
        }
    });
    let outcomes = response
        .outcomes
        .into_iter()
        .filter_map(|o| match AckOutcome::try_from(o) {
            Ok(o) => Some(Event::Outcome(o)),
            Err(e) => {
                tracing::debug!(error = %e, "ignoring an ack outcome this client cannot read");
                None
            }
        });
    deliveries.chain(outcomes).collect()
}

async fn run_subscription(
    subscriber: Subscriber,
    first: proto::SubscribeRequest,
    mut commands: mpsc::UnboundedReceiver<SessionCommand>,
    events_tx: mpsc::Sender<Result<Event>>,
    down: watch::Sender<Option<Error>>,
) {
    let backoff = subscriber.backoff;
    let mut client = subscriber.client.clone();
    let mut delay = backoff.min;
    loop {
        let (tx, rx) = mpsc::unbounded_channel();
        let _ = tx.send(first.clone());
        let broke = match client.subscribe(UnboundedReceiverStream::new(rx)).await {
            Ok(response) => {
                delay = backoff.min;
                down.send_replace(None);
                let mut inbound = response.into_inner();
                loop {
                    tokio::select! {
                        command = commands.recv() => match command {
                            Some(c) => { let _ = tx.send(c.into()); }
                            None => {
                                // Closed: half-close the stream and take the
                                // answers until the broker ends it.
                                drop(tx);
                                while let Ok(Some(r)) = inbound.message().await {
                                    for event in events(r) {
                                        let _ = events_tx.try_send(Ok(event));
                                    }
                                }
                                return;
                            }
                        },
                        message = inbound.message() => match message {
                            Ok(Some(r)) => {
                                for event in events(r) {
                                    if events_tx.send(Ok(event)).await.is_err() { return; }
                                }
                            }
                            Ok(None) => break Error::Unavailable(format!(
                                "broker at {} ended the subscription stream",
                                subscriber.connection.url()
                            )),
                            Err(s) => break subscriber.connection.error(s),
                        },
                    }
                }
            }
            Err(s) => subscriber.connection.error(s),
        };
        // A subscription lives long: besides the retryable errors it also
        // outlasts a broker's internal (storage) errors, with backoff.
        if !broke.is_retryable() && !matches!(broke, Error::Storage(_)) {
            let _ = events_tx.send(Err(broke)).await;
            return;
        }
        tracing::debug!(error = %broke, ?delay, "subscription stream broke; reconnecting");
        down.send_replace(Some(broke));
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(backoff.max);
    }
}

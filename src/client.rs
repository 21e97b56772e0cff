//! The Rust client: `Publisher`, `Subscriber` and `Admin` handles over one
//! lazily connected gRPC channel that reconnects by itself. Publishing retries
//! retryable failures with exponential backoff (safe: ids make it idempotent);
//! a subscription reconnects its stream after a broker restart.

use std::collections::HashMap;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, UnboundedReceiverStream};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};
use uuid::Uuid;

use crate::proto::{
    self, admin_service_client::AdminServiceClient,
    publisher_service_client::PublisherServiceClient,
    subscriber_service_client::SubscriberServiceClient,
};

/// Exponential backoff between retries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// First delay.
    pub min: Duration,
    /// Longest delay.
    pub max: Duration,
    /// Give up after retrying this long (`None`: never).
    pub give_up_after: Option<Duration>,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            min: Duration::from_millis(50),
            max: Duration::from_secs(5),
            give_up_after: Some(Duration::from_secs(60)),
        }
    }
}

impl Backoff {
    /// Checks the delays; `what` names the setting in the error.
    ///
    /// Fails with `InvalidArgument` for a delay longer than
    /// [`config::MAX_DURATION`](crate::config::MAX_DURATION).
    pub fn check(&self, what: &str) -> crate::Result<()> {
        crate::config::check_duration(&format!("{what} backoff min"), self.min)?;
        crate::config::check_duration(&format!("{what} backoff max"), self.max)?;
        if let Some(d) = self.give_up_after {
            crate::config::check_duration(&format!("{what} give_up_after"), d)?;
        }
        Ok(())
    }
}

/// True for failures that a retry may cure: the broker restarting, draining,
/// or unreachable.
pub fn is_retryable(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable | Code::Unknown | Code::Cancelled | Code::Aborted
    )
}

/// Opens a channel to `url` (like `http://127.0.0.1:50051`). The connection
/// is made on first use and remade after failures.
///
/// Fails if the URL is malformed.
pub fn channel(url: &str) -> Result<Channel, Status> {
    let endpoint = Endpoint::from_shared(url.to_owned())
        .map_err(|e| Status::invalid_argument(format!("bad broker URL {url:?}: {e}")))?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_while_idle(true);
    Ok(endpoint.connect_lazy())
}

/// A message to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    /// Idempotency key; a fresh UUID v7 by default.
    pub id: Uuid,
    /// Topic.
    pub topic: String,
    /// Ordering key.
    pub key: Option<String>,
    /// Payload.
    pub payload: Vec<u8>,
    /// Attributes.
    pub attributes: HashMap<String, String>,
}

impl Outgoing {
    /// A message with a fresh UUID v7 id.
    pub fn new(topic: impl Into<String>, payload: impl Into<Vec<u8>>) -> Self {
        Outgoing {
            id: Uuid::now_v7(),
            topic: topic.into(),
            key: None,
            payload: payload.into(),
            attributes: HashMap::new(),
        }
    }

    /// Sets the ordering key.
    pub fn with_key(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Sets the id.
    pub fn with_id(mut self, id: Uuid) -> Self {
        self.id = id;
        self
    }

    /// The wire form.
    pub fn to_proto(&self) -> proto::Message {
        proto::Message {
            id: self.id.to_string(),
            topic: self.topic.clone(),
            key: self.key.clone().unwrap_or_default(),
            payload: self.payload.clone(),
            attributes: self.attributes.clone(),
            ..Default::default()
        }
    }
}

/// Publishes with retries.
#[derive(Debug, Clone)]
pub struct Publisher {
    client: PublisherServiceClient<Channel>,
    backoff: Backoff,
}

impl Publisher {
    /// A publisher on `channel`.
    pub fn new(channel: Channel, backoff: Backoff) -> Self {
        let client = PublisherServiceClient::new(channel)
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX);
        Publisher { client, backoff }
    }

    /// Publishes a batch, retrying retryable failures with backoff. Retries
    /// are safe: a message the broker already stored comes back as a
    /// duplicate with its original sequence.
    ///
    /// Fails with the broker's status for non-retryable errors (bad input,
    /// unknown topic), or the last status once the backoff gives up.
    pub async fn publish(
        &self,
        messages: &[Outgoing],
    ) -> Result<Vec<proto::PublishResult>, Status> {
        let request = proto::PublishRequest {
            messages: messages.iter().map(Outgoing::to_proto).collect(),
        };
        retry(self.backoff, || {
            let mut client = self.client.clone();
            let request = request.clone();
            async move {
                client
                    .publish(request)
                    .await
                    .map(|r| r.into_inner().results)
            }
        })
        .await
    }

    /// Opens a pipelined publish stream (no retries: on failure, resend what
    /// was not answered on a new stream).
    ///
    /// Fails if the stream cannot be opened.
    pub async fn stream(&self, depth: usize) -> Result<PublishSession, Status> {
        let (tx, rx) = mpsc::channel(depth.max(1));
        let mut client = self.client.clone();
        let responses = client
            .publish_stream(ReceiverStream::new(rx))
            .await?
            .into_inner();
        Ok(PublishSession { tx, responses })
    }
}

/// One PublishStream: send batches, read their results in order.
#[derive(Debug)]
pub struct PublishSession {
    tx: mpsc::Sender<proto::PublishStreamRequest>,
    responses: tonic::Streaming<proto::PublishStreamResponse>,
}

impl PublishSession {
    /// Sends a batch; waits only if the pipeline is full.
    ///
    /// Fails if the stream is gone.
    pub async fn send(&self, messages: Vec<proto::Message>) -> Result<(), Status> {
        self.tx
            .send(proto::PublishStreamRequest { messages })
            .await
            .map_err(|_| Status::unavailable("publish stream closed"))
    }

    /// The results of the oldest unanswered batch, after its commit.
    ///
    /// Fails with the stream's status; `None` when the stream ended.
    pub async fn next(&mut self) -> Result<Option<Vec<proto::PublishResult>>, Status> {
        Ok(self.responses.message().await?.map(|r| r.results))
    }

    /// Splits into the sending and the receiving half.
    pub fn split(
        self,
    ) -> (
        mpsc::Sender<proto::PublishStreamRequest>,
        tonic::Streaming<proto::PublishStreamResponse>,
    ) {
        (self.tx, self.responses)
    }
}

async fn retry<T, F, Fut>(backoff: Backoff, mut call: F) -> Result<T, Status>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, Status>>,
{
    let started = tokio::time::Instant::now();
    let mut delay = backoff.min;
    loop {
        match call().await {
            Ok(v) => return Ok(v),
            Err(s) if is_retryable(&s) => {
                if backoff
                    .give_up_after
                    .is_some_and(|limit| started.elapsed() >= limit)
                {
                    return Err(s);
                }
                tracing::debug!(status = %s, ?delay, "retrying after a retryable failure");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(backoff.max);
            }
            Err(s) => return Err(s),
        }
    }
}

/// What a subscription yields.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A leased message.
    Message(proto::ReceivedMessage),
    /// The outcome of an ack, nack or extension sent on the stream.
    Outcome(proto::AckOutcome),
}

/// Flow control of a subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowControl {
    /// Most unacked messages held at once.
    pub max_messages: i32,
    /// Most unacked payload bytes held at once.
    pub max_bytes: i64,
}

impl Default for FlowControl {
    fn default() -> Self {
        FlowControl {
            max_messages: 1000,
            max_bytes: 100 * 1024 * 1024,
        }
    }
}

/// Opens subscriptions.
#[derive(Debug, Clone)]
pub struct Subscriber {
    client: SubscriberServiceClient<Channel>,
    backoff: Backoff,
}

impl Subscriber {
    /// A subscriber on `channel`.
    pub fn new(channel: Channel, backoff: Backoff) -> Self {
        let client = SubscriberServiceClient::new(channel)
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX);
        Subscriber { client, backoff }
    }

    /// The unary client, for Pull, Ack, Nack and ExtendLease.
    pub fn unary(&self) -> SubscriberServiceClient<Channel> {
        self.client.clone()
    }

    /// Opens a streaming subscription that reconnects after retryable
    /// failures and after the broker's internal errors. Leases held when a
    /// stream breaks are lost (their acks become stale); the broker
    /// redelivers those messages.
    pub fn subscribe(&self, subscription: &str, flow: FlowControl) -> Subscription {
        let (events_tx, events) = mpsc::channel(1024);
        let (commands, commands_rx) = mpsc::unbounded_channel();
        let first = proto::SubscribeRequest {
            subscription: subscription.to_owned(),
            max_outstanding_messages: flow.max_messages,
            max_outstanding_bytes: flow.max_bytes,
            ..Default::default()
        };
        let task = tokio::spawn(run_subscription(
            self.client.clone(),
            self.backoff,
            first,
            commands_rx,
            events_tx,
        ));
        Subscription {
            events,
            commands,
            task,
        }
    }
}

/// A live subscription. Dropping it ends the stream.
#[derive(Debug)]
pub struct Subscription {
    events: mpsc::Receiver<Result<Event, Status>>,
    commands: mpsc::UnboundedSender<proto::SubscribeRequest>,
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
    /// Fails with a non-retryable status (unknown subscription, say), after
    /// which the subscription has ended.
    pub async fn next(&mut self) -> Option<Result<Event, Status>> {
        self.events.recv().await
    }

    /// The next message, skipping outcomes.
    pub async fn next_message(&mut self) -> Option<Result<proto::ReceivedMessage, Status>> {
        loop {
            match self.next().await? {
                Ok(Event::Message(m)) => return Some(Ok(m)),
                Ok(Event::Outcome(_)) => continue,
                Err(s) => return Some(Err(s)),
            }
        }
    }

    fn command(&self, request: proto::SubscribeRequest) {
        // The task ends only with the subscription; a send error means it
        // ended and the caller learns so from `next`.
        let _ = self.commands.send(request);
    }

    /// Acknowledges messages; outcomes arrive as events.
    pub fn ack(&self, ack_ids: Vec<String>) {
        self.command(proto::SubscribeRequest {
            ack_ids,
            ..Default::default()
        });
    }

    /// Negatively acknowledges a message.
    pub fn nack(&self, ack_id: String, delay: Option<Duration>, reason: impl Into<String>) {
        let nack = proto::Nack {
            ack_id,
            delay: delay.map(proto::duration),
            reason: reason.into(),
        };
        self.command(proto::SubscribeRequest {
            nacks: vec![nack],
            ..Default::default()
        });
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
            .map(|(ack_id, extension)| proto::LeaseExtension {
                ack_id,
                extension: Some(proto::duration(extension)),
            })
            .collect();
        self.command(proto::SubscribeRequest {
            extensions,
            ..Default::default()
        });
    }
}

async fn run_subscription(
    mut client: SubscriberServiceClient<Channel>,
    backoff: Backoff,
    first: proto::SubscribeRequest,
    mut commands: mpsc::UnboundedReceiver<proto::SubscribeRequest>,
    events: mpsc::Sender<Result<Event, Status>>,
) {
    let mut delay = backoff.min;
    loop {
        let (tx, rx) = mpsc::unbounded_channel();
        let _ = tx.send(first.clone());
        let broke = match client.subscribe(UnboundedReceiverStream::new(rx)).await {
            Ok(response) => {
                delay = backoff.min;
                let mut inbound = response.into_inner();
                loop {
                    tokio::select! {
                        command = commands.recv() => match command {
                            Some(c) => { let _ = tx.send(c); }
                            None => return,
                        },
                        message = inbound.message() => match message {
                            Ok(Some(r)) => {
                                for m in r.messages {
                                    if events.send(Ok(Event::Message(m))).await.is_err() { return; }
                                }
                                for o in r.outcomes {
                                    if events.send(Ok(Event::Outcome(o))).await.is_err() { return; }
                                }
                            }
                            Ok(None) => break Status::unavailable("stream ended"),
                            Err(s) => break s,
                        },
                    }
                }
            }
            Err(s) => s,
        };
        // A subscription lives long: besides the retryable codes it also
        // outlasts a broker's internal (storage) errors, with backoff.
        if !is_retryable(&broke) && broke.code() != Code::Internal {
            let _ = events.send(Err(broke)).await;
            return;
        }
        tracing::debug!(status = %broke, ?delay, "subscription stream broke; reconnecting");
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(backoff.max);
    }
}

/// Admin calls.
#[derive(Debug, Clone)]
pub struct Admin {
    client: AdminServiceClient<Channel>,
}

impl Admin {
    /// An admin client on `channel`.
    pub fn new(channel: Channel) -> Self {
        Admin {
            client: AdminServiceClient::new(channel).max_decoding_message_size(usize::MAX),
        }
    }

    /// The generated client, for calls without a helper here.
    pub fn raw(&self) -> AdminServiceClient<Channel> {
        self.client.clone()
    }

    /// Creates a topic with default settings.
    ///
    /// Fails with the broker's status (ALREADY_EXISTS, INVALID_ARGUMENT).
    pub async fn create_topic(&self, name: &str) -> Result<proto::Topic, Status> {
        let request = proto::CreateTopicRequest {
            topic: Some(proto::Topic {
                name: name.to_owned(),
                ..Default::default()
            }),
        };
        let response = self
            .client
            .clone()
            .create_topic(request)
            .await?
            .into_inner();
        response
            .topic
            .ok_or_else(|| Status::internal("broker sent no topic"))
    }

    /// Creates a subscription.
    ///
    /// Fails with the broker's status (ALREADY_EXISTS, NOT_FOUND, ...).
    pub async fn create_subscription(
        &self,
        subscription: proto::Subscription,
    ) -> Result<proto::Subscription, Status> {
        let request = proto::CreateSubscriptionRequest {
            subscription: Some(subscription),
        };
        let response = self
            .client
            .clone()
            .create_subscription(request)
            .await?
            .into_inner();
        response
            .subscription
            .ok_or_else(|| Status::internal("broker sent no subscription"))
    }

    /// A subscription's stats.
    ///
    /// Fails with the broker's status (NOT_FOUND).
    pub async fn stats(&self, subscription: &str) -> Result<proto::SubscriptionStats, Status> {
        let request = proto::GetSubscriptionStatsRequest {
            subscription: subscription.to_owned(),
        };
        let response = self
            .client
            .clone()
            .get_subscription_stats(request)
            .await?
            .into_inner();
        response
            .stats
            .ok_or_else(|| Status::internal("broker sent no stats"))
    }
}

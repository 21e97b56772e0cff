//! Publishing: unary batches with retries, and pipelined publish streams.

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::{Backoff, Connection, Outgoing, Transport, retry};
use crate::error::{Error, Result};
use crate::model::{NewMessage, PublishOutcome};
use crate::proto::{self, publisher_service_client::PublisherServiceClient};
use crate::wire;

/// Publishes with retries.
#[derive(Debug, Clone)]
pub struct Publisher {
    connection: Connection,
    client: PublisherServiceClient<Transport>,
    backoff: Backoff,
}

/// The wire form of a batch.
fn messages(batch: impl IntoIterator<Item = Outgoing>) -> Vec<proto::Message> {
    batch
        .into_iter()
        .map(|m| proto::Message::from(NewMessage::from(m)))
        .collect()
}

impl Publisher {
    /// A publisher on `connection`.
    pub fn new(connection: &Connection, backoff: Backoff) -> Self {
        let client = PublisherServiceClient::new(connection.transport())
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX);
        Publisher {
            connection: connection.clone(),
            client,
            backoff,
        }
    }

    /// Publishes a batch, retrying retryable failures with backoff. Retries
    /// are safe: a message the broker already stored comes back as a
    /// duplicate with its original sequence.
    ///
    /// Fails with the broker's error for non-retryable failures (bad input,
    /// unknown topic), or the last error once the backoff gives up.
    pub async fn publish(&self, batch: &[Outgoing]) -> Result<Vec<PublishOutcome>> {
        let request = proto::PublishRequest {
            messages: messages(batch.iter().cloned()),
        };
        retry(self.backoff, || self.send(request.clone())).await
    }

    /// Publishes a batch once, without retrying.
    ///
    /// Fails with the broker's error.
    pub async fn publish_once(&self, batch: &[Outgoing]) -> Result<Vec<PublishOutcome>> {
        self.send(proto::PublishRequest {
            messages: messages(batch.iter().cloned()),
        })
        .await
    }

    async fn send(&self, request: proto::PublishRequest) -> Result<Vec<PublishOutcome>> {
        let response = self
            .client
            .clone()
            .publish(request)
            .await
            .map_err(|s| self.connection.error(s))?;
        wire::all(response.into_inner().results)
    }

    /// Opens a pipelined publish stream with up to `depth` batches queued
    /// (no retries: on failure, resend what was not answered on a new
    /// stream).
    ///
    /// Fails with the broker's error if the stream cannot be opened.
    pub async fn stream(&self, depth: usize) -> Result<PublishSession> {
        let (tx, rx) = mpsc::channel(depth.max(1));
        let responses = self
            .client
            .clone()
            .publish_stream(ReceiverStream::new(rx))
            .await
            .map_err(|s| self.connection.error(s))?
            .into_inner();
        Ok(PublishSession {
            sender: PublishSender { tx },
            receiver: PublishReceiver {
                responses,
                connection: self.connection.clone(),
            },
        })
    }
}

/// One PublishStream: send batches, read their results in order.
#[derive(Debug)]
pub struct PublishSession {
    sender: PublishSender,
    receiver: PublishReceiver,
}

/// The sending half of a [`PublishSession`].
#[derive(Debug, Clone)]
pub struct PublishSender {
    tx: mpsc::Sender<proto::PublishStreamRequest>,
}

/// The receiving half of a [`PublishSession`].
#[derive(Debug)]
pub struct PublishReceiver {
    responses: tonic::Streaming<proto::PublishStreamResponse>,
    connection: Connection,
}

impl PublishSender {
    /// Sends a batch; waits only if the pipeline is full.
    ///
    /// Fails with `Unavailable` if the stream is gone.
    pub async fn send(&self, batch: Vec<Outgoing>) -> Result<()> {
        self.tx
            .send(proto::PublishStreamRequest {
                messages: messages(batch),
            })
            .await
            .map_err(|_| Error::Unavailable("publish stream closed".into()))
    }
}

impl PublishReceiver {
    /// The results of the oldest unanswered batch, after its commit; `None`
    /// when the stream ended.
    ///
    /// Fails with the broker's error, which ends the stream.
    pub async fn next(&mut self) -> Result<Option<Vec<PublishOutcome>>> {
        match self.responses.message().await {
            Ok(Some(r)) => wire::all(r.results).map(Some),
            Ok(None) => Ok(None),
            Err(s) => Err(self.connection.error(s)),
        }
    }
}

impl PublishSession {
    /// Sends a batch; waits only if the pipeline is full.
    ///
    /// Fails with `Unavailable` if the stream is gone.
    pub async fn send(&self, batch: Vec<Outgoing>) -> Result<()> {
        self.sender.send(batch).await
    }

    /// The results of the oldest unanswered batch, after its commit; `None`
    /// when the stream ended.
    ///
    /// Fails with the broker's error, which ends the stream.
    pub async fn next(&mut self) -> Result<Option<Vec<PublishOutcome>>> {
        self.receiver.next().await
    }

    /// Splits into the sending and the receiving half.
    pub fn split(self) -> (PublishSender, PublishReceiver) {
        (self.sender, self.receiver)
    }
}

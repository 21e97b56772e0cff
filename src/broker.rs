//! The broker: the domain between the gRPC layer and the store. It enforces
//! the limits, and tells long-running streams when to drain.

use std::time::Duration;

use tokio::sync::watch;

use crate::error::{Error, Result};
use crate::model::NewMessage;
use crate::store::Store;

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

    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
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
    ) -> Result<
        impl std::future::Future<Output = Result<Vec<crate::model::PublishOutcome>>> + Send + 'static,
    > {
        self.check_open()?;
        self.check_batch(&messages)?;
        self.store.enqueue_publish(messages).await
    }

    /// Validates and publishes a batch; answers after the commit.
    ///
    /// Fails with `InvalidArgument` (nothing stored), `NotFound` for an
    /// unknown topic (nothing stored), `Unavailable` while draining or when
    /// storage fails.
    pub async fn publish(
        &self,
        messages: Vec<NewMessage>,
    ) -> Result<Vec<crate::model::PublishOutcome>> {
        self.check_open()?;
        self.check_batch(&messages)?;
        self.store.publish(messages).await
    }
}

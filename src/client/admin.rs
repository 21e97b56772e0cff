//! Admin calls: topics, subscriptions, stats, seek, dead letters and health,
//! with domain arguments and results. Listings follow `next_page_token`
//! themselves.

use std::future::Future;
use std::pin::Pin;

use super::{Connection, Transport};
use crate::error::{Error, Result};
use crate::model::{
    DeadLetter, Page, SeekTarget, Subscription, SubscriptionStats, Topic, TopicSettings,
};
use crate::model::{NewSubscription, SubscriptionPatch, TopicPatch};
use crate::proto::{self, admin_service_client::AdminServiceClient};
use crate::wire;

/// Items per page when a listing is read whole.
pub const DEFAULT_PAGE_SIZE: i32 = 1000;

/// Whether a broker (or one of its services) serves, as its health check says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Serving {
    /// Serving.
    Serving,
    /// Not serving: storage unreachable, or the broker is draining.
    NotServing,
    /// The broker does not know the service asked about.
    ServiceUnknown,
    /// The broker did not say.
    Unknown,
}

impl Serving {
    /// The name grpc.health.v1 gives the status (`SERVING`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Serving::Serving => "SERVING",
            Serving::NotServing => "NOT_SERVING",
            Serving::ServiceUnknown => "SERVICE_UNKNOWN",
            Serving::Unknown => "UNKNOWN",
        }
    }
}

type PageFuture<T> = Pin<Box<dyn Future<Output = Result<Page<T>>> + Send>>;

/// A listing read one page at a time; [`Pages::all`] reads the rest whole.
pub struct Pages<T> {
    fetch: Box<dyn FnMut(String) -> PageFuture<T> + Send>,
    /// The next page's token; `None` after the last page.
    token: Option<String>,
}

impl<T> std::fmt::Debug for Pages<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pages")
            .field("token", &self.token)
            .finish_non_exhaustive()
    }
}

impl<T> Pages<T> {
    pub(super) fn new(fetch: impl FnMut(String) -> PageFuture<T> + Send + 'static) -> Self {
        Pages {
            fetch: Box::new(fetch),
            token: Some(String::new()),
        }
    }

    /// The next page; `None` after the last.
    ///
    /// Fails with the broker's error; the listing can be resumed by calling
    /// again.
    pub async fn next(&mut self) -> Option<Result<Vec<T>>> {
        let token = self.token.clone()?;
        Some((self.fetch)(token).await.map(|page| {
            self.token = (!page.next_page_token.is_empty()).then_some(page.next_page_token);
            page.items
        }))
    }

    /// Every remaining item.
    ///
    /// Fails with the first page's error.
    pub async fn all(mut self) -> Result<Vec<T>> {
        let mut items = Vec::new();
        while let Some(page) = self.next().await {
            items.extend(page?);
        }
        Ok(items)
    }
}

/// Admin calls.
#[derive(Debug, Clone)]
pub struct Admin {
    connection: Connection,
    client: AdminServiceClient<Transport>,
}

/// Calls one admin RPC and maps its status to the crate's error.
macro_rules! call {
    ($self:ident . $rpc:ident ($request:expr)) => {
        $self
            .client
            .clone()
            .$rpc($request)
            .await
            .map(tonic::Response::into_inner)
            .map_err(|s| $self.connection.error(s))
    };
}

/// A required field of a response, or a storage error naming it.
fn sent<T>(value: Option<T>, what: &str) -> Result<T> {
    value.ok_or_else(|| Error::Storage(format!("the broker sent no {what}")))
}

impl Admin {
    /// An admin client on `connection`.
    pub fn new(connection: &Connection) -> Self {
        Admin {
            connection: connection.clone(),
            client: AdminServiceClient::new(connection.transport())
                .max_decoding_message_size(usize::MAX),
        }
    }

    /// Creates a topic with default settings.
    ///
    /// Fails with the broker's error (`AlreadyExists`, `InvalidArgument`).
    pub async fn create_topic(&self, name: &str) -> Result<Topic> {
        self.create_topic_with(name, TopicSettings::default()).await
    }

    /// Creates a topic with `settings`.
    ///
    /// Fails with the broker's error (`AlreadyExists`, `InvalidArgument`).
    pub async fn create_topic_with(&self, name: &str, settings: TopicSettings) -> Result<Topic> {
        let request = proto::CreateTopicRequest {
            topic: Some((name.to_owned(), settings).into()),
        };
        let r = call!(self.create_topic(request))?;
        sent(r.topic, "topic")?.try_into()
    }

    /// A topic.
    ///
    /// Fails with the broker's error (`NotFound`).
    pub async fn get_topic(&self, name: &str) -> Result<Topic> {
        let r = call!(self.get_topic(proto::GetTopicRequest { name: name.into() }))?;
        sent(r.topic, "topic")?.try_into()
    }

    /// Every topic.
    ///
    /// Fails with the broker's error.
    pub async fn list_topics(&self) -> Result<Vec<Topic>> {
        self.topic_pages(DEFAULT_PAGE_SIZE).all().await
    }

    /// The topics, `page_size` at a time.
    pub fn topic_pages(&self, page_size: i32) -> Pages<Topic> {
        let admin = self.clone();
        Pages::new(move |page_token| {
            let admin = admin.clone();
            Box::pin(async move {
                let request = proto::ListTopicsRequest {
                    page_size,
                    page_token,
                };
                let r = call!(admin.list_topics(request))?;
                Ok(Page {
                    items: wire::all(r.topics)?,
                    next_page_token: r.next_page_token,
                })
            })
        })
    }

    /// Changes the settings `patch` sets, leaving the others.
    ///
    /// Fails with the broker's error (`NotFound`, `InvalidArgument`).
    pub async fn update_topic(&self, name: &str, patch: TopicPatch) -> Result<Topic> {
        let request = proto::UpdateTopicRequest::from((name.to_owned(), patch));
        let r = call!(self.update_topic(request))?;
        sent(r.topic, "topic")?.try_into()
    }

    /// Deletes a topic.
    ///
    /// Fails with the broker's error (`NotFound`, `FailedPrecondition` while
    /// it has subscriptions).
    pub async fn delete_topic(&self, name: &str) -> Result<()> {
        call!(self.delete_topic(proto::DeleteTopicRequest { name: name.into() }))?;
        Ok(())
    }

    /// Creates a subscription.
    ///
    /// Fails with the broker's error (`AlreadyExists`, `NotFound` for its
    /// topic, `InvalidArgument` for settings out of bounds).
    pub async fn create_subscription(&self, subscription: NewSubscription) -> Result<Subscription> {
        let request = proto::CreateSubscriptionRequest {
            subscription: Some(subscription.into()),
        };
        let r = call!(self.create_subscription(request))?;
        sent(r.subscription, "subscription")?.try_into()
    }

    /// A subscription.
    ///
    /// Fails with the broker's error (`NotFound`).
    pub async fn get_subscription(&self, name: &str) -> Result<Subscription> {
        let request = proto::GetSubscriptionRequest { name: name.into() };
        let r = call!(self.get_subscription(request))?;
        sent(r.subscription, "subscription")?.try_into()
    }

    /// Every subscription, or those of `topic`.
    ///
    /// Fails with the broker's error.
    pub async fn list_subscriptions(&self, topic: Option<&str>) -> Result<Vec<Subscription>> {
        self.subscription_pages(topic, DEFAULT_PAGE_SIZE)
            .all()
            .await
    }

    /// The subscriptions (of `topic`, if given), `page_size` at a time.
    pub fn subscription_pages(&self, topic: Option<&str>, page_size: i32) -> Pages<Subscription> {
        let admin = self.clone();
        let topic = topic.unwrap_or_default().to_owned();
        Pages::new(move |page_token| {
            let admin = admin.clone();
            let topic = topic.clone();
            Box::pin(async move {
                let request = proto::ListSubscriptionsRequest {
                    topic,
                    page_size,
                    page_token,
                };
                let r = call!(admin.list_subscriptions(request))?;
                Ok(Page {
                    items: wire::all(r.subscriptions)?,
                    next_page_token: r.next_page_token,
                })
            })
        })
    }

    /// Changes the settings `patch` sets (the update mask names exactly
    /// those), leaving the others.
    ///
    /// Fails with the broker's error (`NotFound`, `InvalidArgument`).
    pub async fn update_subscription(
        &self,
        name: &str,
        patch: SubscriptionPatch,
    ) -> Result<Subscription> {
        let request = proto::UpdateSubscriptionRequest::from((name.to_owned(), patch));
        let r = call!(self.update_subscription(request))?;
        sent(r.subscription, "subscription")?.try_into()
    }

    /// Deletes a subscription and its state.
    ///
    /// Fails with the broker's error (`NotFound`).
    pub async fn delete_subscription(&self, name: &str) -> Result<()> {
        let request = proto::DeleteSubscriptionRequest { name: name.into() };
        call!(self.delete_subscription(request))?;
        Ok(())
    }

    /// A subscription's stats.
    ///
    /// Fails with the broker's error (`NotFound`).
    pub async fn stats(&self, subscription: &str) -> Result<SubscriptionStats> {
        let request = proto::GetSubscriptionStatsRequest {
            subscription: subscription.to_owned(),
        };
        let r = call!(self.get_subscription_stats(request))?;
        sent(r.stats, "stats")?.try_into()
    }

    /// Moves a subscription's cursor to a sequence number or a time;
    /// returns the next sequence it delivers.
    ///
    /// Fails with the broker's error (`NotFound`, `InvalidArgument`).
    pub async fn seek(&self, subscription: &str, target: SeekTarget) -> Result<i64> {
        let request = proto::SeekRequest {
            subscription: subscription.to_owned(),
            target: Some(target.into()),
        };
        Ok(call!(self.seek(request))?.next_sequence)
    }

    /// Every dead letter of a subscription.
    ///
    /// Fails with the broker's error (`NotFound`).
    pub async fn list_dead_letters(&self, subscription: &str) -> Result<Vec<DeadLetter>> {
        self.dead_letter_pages(subscription, DEFAULT_PAGE_SIZE)
            .all()
            .await
    }

    /// A subscription's dead letters, `page_size` at a time.
    pub fn dead_letter_pages(&self, subscription: &str, page_size: i32) -> Pages<DeadLetter> {
        let admin = self.clone();
        let subscription = subscription.to_owned();
        Pages::new(move |page_token| {
            let admin = admin.clone();
            let subscription = subscription.clone();
            Box::pin(async move {
                let request = proto::ListDeadLettersRequest {
                    subscription,
                    page_size,
                    page_token,
                };
                let r = call!(admin.list_dead_letters(request))?;
                Ok(Page {
                    items: wire::all(r.dead_letters)?,
                    next_page_token: r.next_page_token,
                })
            })
        })
    }

    /// Makes dead letters deliverable again: those with these sequence
    /// numbers, or all if `sequences` is empty. Returns how many.
    ///
    /// Fails with the broker's error (`NotFound`).
    pub async fn redrive_dead_letters(
        &self,
        subscription: &str,
        sequences: Vec<i64>,
    ) -> Result<i64> {
        let request = proto::RedriveDeadLettersRequest {
            subscription: subscription.to_owned(),
            sequences,
        };
        Ok(call!(self.redrive_dead_letters(request))?.redriven_count)
    }

    /// Deletes dead letters for good: those with these sequence numbers, or
    /// all of them with `None`. Returns how many.
    ///
    /// Fails with the broker's error (`NotFound`, `InvalidArgument` for an
    /// empty list).
    pub async fn purge_dead_letters(
        &self,
        subscription: &str,
        sequences: Option<Vec<i64>>,
    ) -> Result<i64> {
        let request = proto::PurgeDeadLettersRequest {
            subscription: subscription.to_owned(),
            all: sequences.is_none(),
            sequences: sequences.unwrap_or_default(),
        };
        Ok(call!(self.purge_dead_letters(request))?.purged_count)
    }

    /// The health of the broker (`service` empty) or of one of its services.
    ///
    /// Fails with the broker's error (`NotFound` for a service it does not
    /// report on, `Unavailable` if it cannot be reached).
    pub async fn health(&self, service: &str) -> Result<Serving> {
        use tonic_health::pb::health_check_response::ServingStatus;
        let request = tonic_health::pb::HealthCheckRequest {
            service: service.to_owned(),
        };
        let r = tonic_health::pb::health_client::HealthClient::new(self.connection.transport())
            .check(request)
            .await
            .map_err(|s| self.connection.error(s))?
            .into_inner();
        Ok(match ServingStatus::try_from(r.status) {
            Ok(ServingStatus::Serving) => Serving::Serving,
            Ok(ServingStatus::NotServing) => Serving::NotServing,
            Ok(ServingStatus::ServiceUnknown) => Serving::ServiceUnknown,
            Ok(ServingStatus::Unknown) | Err(_) => Serving::Unknown,
        })
    }
}

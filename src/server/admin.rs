//! `tidings.v1.AdminService`: topics, subscriptions, stats, seek and dead
//! letters. Each call decodes, calls the store, encodes.

use tonic::{Request, Response, Status};

use super::convert::{invalid, status};
use crate::broker::Broker;
use crate::model::{self, SeekTarget, SubscriptionSettings, TopicSettings};
use crate::proto::{self, admin_service_server::AdminService};
use crate::store::NewSubscription;
use crate::wire;

/// The admin service.
#[derive(Debug, Clone)]
pub(crate) struct Admin {
    pub(crate) broker: Broker,
}

const DEFAULT_PAGE: usize = 100;
const MAX_PAGE: usize = 1000;

fn page_size(n: i32) -> Result<usize, Status> {
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

fn decode_token(token: &str) -> Result<Option<String>, Status> {
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
        .collect::<Result<Vec<u8>, _>>()?;
    String::from_utf8(bytes).map(Some).map_err(|_| bad())
}

fn name(what: &str, name: &str) -> Result<(), Status> {
    model::validate_name(what, name).map_err(status)
}

#[tonic::async_trait]
impl AdminService for Admin {
    async fn create_topic(
        &self,
        request: Request<proto::CreateTopicRequest>,
    ) -> Result<Response<proto::CreateTopicResponse>, Status> {
        let topic = request
            .into_inner()
            .topic
            .ok_or_else(|| invalid("topic is missing"))?;
        name("topic", &topic.name)?;
        let settings = TopicSettings::try_from(&topic).map_err(status)?;
        let created = self
            .broker
            .store()
            .create_topic(&topic.name, settings)
            .await
            .map_err(status)?;
        tracing::info!(topic = %created.name, "topic created");
        Ok(Response::new(proto::CreateTopicResponse {
            topic: Some(created.into()),
        }))
    }

    async fn get_topic(
        &self,
        request: Request<proto::GetTopicRequest>,
    ) -> Result<Response<proto::GetTopicResponse>, Status> {
        let req = request.into_inner();
        name("topic", &req.name)?;
        let topic = self
            .broker
            .store()
            .get_topic(&req.name)
            .await
            .map_err(status)?;
        Ok(Response::new(proto::GetTopicResponse {
            topic: Some(topic.into()),
        }))
    }

    async fn list_topics(
        &self,
        request: Request<proto::ListTopicsRequest>,
    ) -> Result<Response<proto::ListTopicsResponse>, Status> {
        let req = request.into_inner();
        let size = page_size(req.page_size)?;
        let after = decode_token(&req.page_token)?;
        let topics = self
            .broker
            .store()
            .list_topics(after.as_deref(), size)
            .await
            .map_err(status)?;
        let next_page_token = match topics.last() {
            Some(t) if topics.len() == size => encode_token(&t.name),
            _ => String::new(),
        };
        Ok(Response::new(proto::ListTopicsResponse {
            topics: topics.into_iter().map(Into::into).collect(),
            next_page_token,
        }))
    }

    async fn update_topic(
        &self,
        request: Request<proto::UpdateTopicRequest>,
    ) -> Result<Response<proto::UpdateTopicResponse>, Status> {
        let (topic, patch) = wire::topic_update(request.into_inner()).map_err(status)?;
        name("topic", &topic)?;
        let topic = self
            .broker
            .store()
            .update_topic(&topic, patch)
            .await
            .map_err(status)?;
        Ok(Response::new(proto::UpdateTopicResponse {
            topic: Some(topic.into()),
        }))
    }

    async fn delete_topic(
        &self,
        request: Request<proto::DeleteTopicRequest>,
    ) -> Result<Response<proto::DeleteTopicResponse>, Status> {
        let req = request.into_inner();
        name("topic", &req.name)?;
        self.broker
            .store()
            .delete_topic(&req.name)
            .await
            .map_err(status)?;
        Ok(Response::new(proto::DeleteTopicResponse {}))
    }

    async fn create_subscription(
        &self,
        request: Request<proto::CreateSubscriptionRequest>,
    ) -> Result<Response<proto::CreateSubscriptionResponse>, Status> {
        let sub = request
            .into_inner()
            .subscription
            .ok_or_else(|| invalid("subscription is missing"))?;
        name("subscription", &sub.name)?;
        name("topic", &sub.topic)?;
        let new = NewSubscription::try_from(sub).map_err(status)?;
        new.settings.validate().map_err(status)?;
        let created = self
            .broker
            .store()
            .create_subscription(new)
            .await
            .map_err(status)?;
        tracing::info!(subscription = %created.name, topic = %created.topic, "subscription created");
        Ok(Response::new(proto::CreateSubscriptionResponse {
            subscription: Some(created.into()),
        }))
    }

    async fn get_subscription(
        &self,
        request: Request<proto::GetSubscriptionRequest>,
    ) -> Result<Response<proto::GetSubscriptionResponse>, Status> {
        let req = request.into_inner();
        name("subscription", &req.name)?;
        let sub = self
            .broker
            .store()
            .get_subscription(&req.name)
            .await
            .map_err(status)?;
        Ok(Response::new(proto::GetSubscriptionResponse {
            subscription: Some(sub.into()),
        }))
    }

    async fn list_subscriptions(
        &self,
        request: Request<proto::ListSubscriptionsRequest>,
    ) -> Result<Response<proto::ListSubscriptionsResponse>, Status> {
        let req = request.into_inner();
        let size = page_size(req.page_size)?;
        let after = decode_token(&req.page_token)?;
        let topic = (!req.topic.is_empty()).then_some(req.topic.as_str());
        if let Some(t) = topic {
            name("topic", t)?;
        }
        let subs = self
            .broker
            .store()
            .list_subscriptions(topic, after.as_deref(), size)
            .await
            .map_err(status)?;
        let next_page_token = match subs.last() {
            Some(s) if subs.len() == size => encode_token(&s.name),
            _ => String::new(),
        };
        Ok(Response::new(proto::ListSubscriptionsResponse {
            subscriptions: subs.into_iter().map(Into::into).collect(),
            next_page_token,
        }))
    }

    async fn update_subscription(
        &self,
        request: Request<proto::UpdateSubscriptionRequest>,
    ) -> Result<Response<proto::UpdateSubscriptionResponse>, Status> {
        let req = request.into_inner();
        let (sub_name, given) = wire::subscription_update(req).map_err(status)?;
        name("subscription", &sub_name)?;
        let store = self.broker.store();
        let current = store.get_subscription(&sub_name).await.map_err(status)?;
        let c = current.settings;
        let next = SubscriptionSettings {
            ack_deadline: given.ack_deadline.unwrap_or(c.ack_deadline),
            max_attempts: given.max_attempts.unwrap_or(c.max_attempts),
            min_backoff: given.min_backoff.unwrap_or(c.min_backoff),
            max_backoff: given.max_backoff.unwrap_or(c.max_backoff),
            dead_letter_topic: given.dead_letter_topic.unwrap_or(c.dead_letter_topic),
            ordered: given.ordered.unwrap_or(c.ordered),
        };
        next.validate().map_err(status)?;
        let patch = crate::store::SubscriptionPatch {
            ack_deadline: Some(next.ack_deadline),
            max_attempts: Some(next.max_attempts),
            min_backoff: Some(next.min_backoff),
            max_backoff: Some(next.max_backoff),
            dead_letter_topic: Some(next.dead_letter_topic),
            ordered: Some(next.ordered),
        };
        let updated = store
            .update_subscription(&sub_name, patch)
            .await
            .map_err(status)?;
        Ok(Response::new(proto::UpdateSubscriptionResponse {
            subscription: Some(updated.into()),
        }))
    }

    async fn delete_subscription(
        &self,
        request: Request<proto::DeleteSubscriptionRequest>,
    ) -> Result<Response<proto::DeleteSubscriptionResponse>, Status> {
        let req = request.into_inner();
        name("subscription", &req.name)?;
        self.broker
            .store()
            .delete_subscription(&req.name)
            .await
            .map_err(status)?;
        Ok(Response::new(proto::DeleteSubscriptionResponse {}))
    }

    async fn get_subscription_stats(
        &self,
        request: Request<proto::GetSubscriptionStatsRequest>,
    ) -> Result<Response<proto::GetSubscriptionStatsResponse>, Status> {
        let req = request.into_inner();
        name("subscription", &req.subscription)?;
        let stats = self
            .broker
            .store()
            .stats(&req.subscription)
            .await
            .map_err(status)?;
        Ok(Response::new(proto::GetSubscriptionStatsResponse {
            stats: Some((req.subscription, stats).into()),
        }))
    }

    async fn seek(
        &self,
        request: Request<proto::SeekRequest>,
    ) -> Result<Response<proto::SeekResponse>, Status> {
        let req = request.into_inner();
        name("subscription", &req.subscription)?;
        let target = SeekTarget::try_from(req.target).map_err(status)?;
        let next = self
            .broker
            .store()
            .seek(&req.subscription, target)
            .await
            .map_err(status)?;
        Ok(Response::new(proto::SeekResponse {
            next_sequence: next,
        }))
    }

    async fn list_dead_letters(
        &self,
        request: Request<proto::ListDeadLettersRequest>,
    ) -> Result<Response<proto::ListDeadLettersResponse>, Status> {
        let req = request.into_inner();
        name("subscription", &req.subscription)?;
        let size = page_size(req.page_size)?;
        let after = match decode_token(&req.page_token)? {
            None => 0,
            Some(s) => s
                .parse::<i64>()
                .map_err(|_| invalid("page_token is not one this server issued"))?,
        };
        let (letters, total) = self
            .broker
            .store()
            .list_dead_letters(&req.subscription, after, size)
            .await
            .map_err(status)?;
        let next_page_token = match letters.last() {
            Some(d) if letters.len() == size => encode_token(&d.message.sequence.to_string()),
            _ => String::new(),
        };
        Ok(Response::new(proto::ListDeadLettersResponse {
            dead_letters: letters.into_iter().map(Into::into).collect(),
            next_page_token,
            total_size: total,
        }))
    }

    async fn redrive_dead_letters(
        &self,
        request: Request<proto::RedriveDeadLettersRequest>,
    ) -> Result<Response<proto::RedriveDeadLettersResponse>, Status> {
        let req = request.into_inner();
        name("subscription", &req.subscription)?;
        let count = self
            .broker
            .store()
            .redrive(&req.subscription, req.sequences)
            .await
            .map_err(status)?;
        Ok(Response::new(proto::RedriveDeadLettersResponse {
            redriven_count: count,
        }))
    }

    async fn purge_dead_letters(
        &self,
        request: Request<proto::PurgeDeadLettersRequest>,
    ) -> Result<Response<proto::PurgeDeadLettersResponse>, Status> {
        let req = request.into_inner();
        name("subscription", &req.subscription)?;
        let sequences = match (req.all, req.sequences.is_empty()) {
            (true, true) => None,
            (false, false) => Some(req.sequences),
            (true, false) => return Err(invalid("give either sequences or all, not both")),
            (false, true) => {
                return Err(invalid(
                    "name the sequences to purge, or set all to purge every dead letter",
                ));
            }
        };
        let count = self
            .broker
            .store()
            .purge(&req.subscription, sequences)
            .await
            .map_err(status)?;
        Ok(Response::new(proto::PurgeDeadLettersResponse {
            purged_count: count,
        }))
    }
}

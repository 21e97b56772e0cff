//! `tidings.v1.AdminService`: topics, subscriptions, stats, seek and dead
//! letters. Each call decodes (`wire`), calls the broker, encodes.

use tonic::{Request, Response, Status};

use super::auth::{Caller, Permission};
use super::convert::{invalid, status};
use crate::broker::Broker;
use crate::model::{SeekTarget, TopicSettings};
use crate::proto::{self, admin_service_server::AdminService};
use crate::store::NewSubscription;
use crate::wire;

/// The admin service.
#[derive(Debug, Clone)]
pub(crate) struct Admin {
    pub(crate) broker: Broker,
}

/// Runs an admin change and writes it, with its outcome and who asked, to
/// the audit log.
async fn audited<T>(
    caller: Caller,
    action: &str,
    resource: String,
    change: impl Future<Output = Result<Response<T>, Status>>,
) -> Result<Response<T>, Status> {
    let result = change.await;
    caller.audit(action, &resource, &result);
    result
}

#[tonic::async_trait]
impl AdminService for Admin {
    async fn create_topic(
        &self,
        request: Request<proto::CreateTopicRequest>,
    ) -> Result<Response<proto::CreateTopicResponse>, Status> {
        let resource = request
            .get_ref()
            .topic
            .as_ref()
            .map(|t| t.name.clone())
            .unwrap_or_default();
        audited(Caller::of(&request), "create_topic", resource, async move {
            let topic = request
                .into_inner()
                .topic
                .ok_or_else(|| invalid("topic is missing"))?;
            let settings = TopicSettings::try_from(&topic).map_err(status)?;
            let created = self.broker.create_topic(&topic.name, settings).await;
            Ok(Response::new(proto::CreateTopicResponse {
                topic: Some(created.map_err(status)?.into()),
            }))
        })
        .await
    }

    async fn get_topic(
        &self,
        request: Request<proto::GetTopicRequest>,
    ) -> Result<Response<proto::GetTopicResponse>, Status> {
        let topic = self.broker.get_topic(&request.into_inner().name).await;
        Ok(Response::new(proto::GetTopicResponse {
            topic: Some(topic.map_err(status)?.into()),
        }))
    }

    async fn list_topics(
        &self,
        request: Request<proto::ListTopicsRequest>,
    ) -> Result<Response<proto::ListTopicsResponse>, Status> {
        let req = request.into_inner();
        let page = self
            .broker
            .list_topics(req.page_size, &req.page_token)
            .await;
        let page = page.map_err(status)?;
        Ok(Response::new(proto::ListTopicsResponse {
            topics: page.items.into_iter().map(Into::into).collect(),
            next_page_token: page.next_page_token,
        }))
    }

    async fn update_topic(
        &self,
        request: Request<proto::UpdateTopicRequest>,
    ) -> Result<Response<proto::UpdateTopicResponse>, Status> {
        let resource = request
            .get_ref()
            .topic
            .as_ref()
            .map(|t| t.name.clone())
            .unwrap_or_default();
        audited(Caller::of(&request), "update_topic", resource, async move {
            let (name, patch) = wire::topic_update(request.into_inner()).map_err(status)?;
            let topic = self.broker.update_topic(&name, patch).await;
            Ok(Response::new(proto::UpdateTopicResponse {
                topic: Some(topic.map_err(status)?.into()),
            }))
        })
        .await
    }

    async fn delete_topic(
        &self,
        request: Request<proto::DeleteTopicRequest>,
    ) -> Result<Response<proto::DeleteTopicResponse>, Status> {
        let resource = request.get_ref().name.clone();
        audited(Caller::of(&request), "delete_topic", resource, async move {
            let name = request.into_inner().name;
            self.broker.delete_topic(&name).await.map_err(status)?;
            Ok(Response::new(proto::DeleteTopicResponse {}))
        })
        .await
    }

    async fn create_subscription(
        &self,
        request: Request<proto::CreateSubscriptionRequest>,
    ) -> Result<Response<proto::CreateSubscriptionResponse>, Status> {
        let resource = request
            .get_ref()
            .subscription
            .as_ref()
            .map(|s| s.name.clone())
            .unwrap_or_default();
        audited(
            Caller::of(&request),
            "create_subscription",
            resource,
            async move {
                let sub = request
                    .into_inner()
                    .subscription
                    .ok_or_else(|| invalid("subscription is missing"))?;
                let new = NewSubscription::try_from(sub).map_err(status)?;
                let created = self.broker.create_subscription(new).await;
                Ok(Response::new(proto::CreateSubscriptionResponse {
                    subscription: Some(created.map_err(status)?.into()),
                }))
            },
        )
        .await
    }

    async fn get_subscription(
        &self,
        request: Request<proto::GetSubscriptionRequest>,
    ) -> Result<Response<proto::GetSubscriptionResponse>, Status> {
        let sub = self
            .broker
            .get_subscription(&request.into_inner().name)
            .await;
        Ok(Response::new(proto::GetSubscriptionResponse {
            subscription: Some(sub.map_err(status)?.into()),
        }))
    }

    async fn list_subscriptions(
        &self,
        request: Request<proto::ListSubscriptionsRequest>,
    ) -> Result<Response<proto::ListSubscriptionsResponse>, Status> {
        let req = request.into_inner();
        let topic = (!req.topic.is_empty()).then_some(req.topic.as_str());
        let page = self
            .broker
            .list_subscriptions(topic, req.page_size, &req.page_token)
            .await
            .map_err(status)?;
        Ok(Response::new(proto::ListSubscriptionsResponse {
            subscriptions: page.items.into_iter().map(Into::into).collect(),
            next_page_token: page.next_page_token,
        }))
    }

    async fn update_subscription(
        &self,
        request: Request<proto::UpdateSubscriptionRequest>,
    ) -> Result<Response<proto::UpdateSubscriptionResponse>, Status> {
        let resource = request
            .get_ref()
            .subscription
            .as_ref()
            .map(|s| s.name.clone())
            .unwrap_or_default();
        audited(
            Caller::of(&request),
            "update_subscription",
            resource,
            async move {
                let (name, patch) =
                    wire::subscription_update(request.into_inner()).map_err(status)?;
                let updated = self.broker.update_subscription(&name, patch).await;
                Ok(Response::new(proto::UpdateSubscriptionResponse {
                    subscription: Some(updated.map_err(status)?.into()),
                }))
            },
        )
        .await
    }

    async fn delete_subscription(
        &self,
        request: Request<proto::DeleteSubscriptionRequest>,
    ) -> Result<Response<proto::DeleteSubscriptionResponse>, Status> {
        let resource = request.get_ref().name.clone();
        audited(
            Caller::of(&request),
            "delete_subscription",
            resource,
            async move {
                let name = request.into_inner().name;
                self.broker
                    .delete_subscription(&name)
                    .await
                    .map_err(status)?;
                Ok(Response::new(proto::DeleteSubscriptionResponse {}))
            },
        )
        .await
    }

    async fn get_subscription_stats(
        &self,
        request: Request<proto::GetSubscriptionStatsRequest>,
    ) -> Result<Response<proto::GetSubscriptionStatsResponse>, Status> {
        Caller::of(&request).may(Permission::Consume, &request.get_ref().subscription)?;
        let name = request.into_inner().subscription;
        let stats = self.broker.stats(&name).await.map_err(status)?;
        Ok(Response::new(proto::GetSubscriptionStatsResponse {
            stats: Some((name, stats).into()),
        }))
    }

    async fn seek(
        &self,
        request: Request<proto::SeekRequest>,
    ) -> Result<Response<proto::SeekResponse>, Status> {
        let resource = request.get_ref().subscription.clone();
        audited(Caller::of(&request), "seek", resource, async move {
            let req = request.into_inner();
            let target = SeekTarget::try_from(req.target).map_err(status)?;
            let next = self.broker.seek(&req.subscription, target).await;
            Ok(Response::new(proto::SeekResponse {
                next_sequence: next.map_err(status)?,
            }))
        })
        .await
    }

    async fn list_dead_letters(
        &self,
        request: Request<proto::ListDeadLettersRequest>,
    ) -> Result<Response<proto::ListDeadLettersResponse>, Status> {
        let req = request.into_inner();
        let (page, total) = self
            .broker
            .list_dead_letters(&req.subscription, req.page_size, &req.page_token)
            .await
            .map_err(status)?;
        Ok(Response::new(proto::ListDeadLettersResponse {
            dead_letters: page.items.into_iter().map(Into::into).collect(),
            next_page_token: page.next_page_token,
            total_size: total,
        }))
    }

    async fn redrive_dead_letters(
        &self,
        request: Request<proto::RedriveDeadLettersRequest>,
    ) -> Result<Response<proto::RedriveDeadLettersResponse>, Status> {
        let resource = request.get_ref().subscription.clone();
        audited(
            Caller::of(&request),
            "redrive_dead_letters",
            resource,
            async move {
                let req = request.into_inner();
                let count = self.broker.redrive(&req.subscription, req.sequences).await;
                Ok(Response::new(proto::RedriveDeadLettersResponse {
                    redriven_count: count.map_err(status)?,
                }))
            },
        )
        .await
    }

    async fn purge_dead_letters(
        &self,
        request: Request<proto::PurgeDeadLettersRequest>,
    ) -> Result<Response<proto::PurgeDeadLettersResponse>, Status> {
        let resource = request.get_ref().subscription.clone();
        audited(
            Caller::of(&request),
            "purge_dead_letters",
            resource,
            async move {
                let req = request.into_inner();
                let count = self
                    .broker
                    .purge(&req.subscription, req.sequences, req.all)
                    .await;
                Ok(Response::new(proto::PurgeDeadLettersResponse {
                    purged_count: count.map_err(status)?,
                }))
            },
        )
        .await
    }
}

//! `tidings.v1.SubscriberService`: the Subscribe stream, translated to and
//! from the broker's session (`crate::session`), and the unary calls. Each
//! call decodes (`wire`), calls the broker, encodes.

use std::pin::Pin;

use futures_util::{Stream, StreamExt};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tonic_types::{ErrorDetails, StatusExt};

use super::convert::{invalid, status};
use crate::broker::Broker;
use crate::error::Result;
use crate::model::{AckOutcome, AckStatus, SessionCommand};
use crate::proto::{
    self, AckRequest, AckResponse, ExtendLeaseRequest, ExtendLeaseResponse, NackRequest,
    NackResponse, PullRequest, PullResponse, SubscribeRequest, SubscribeResponse,
    subscriber_service_server::SubscriberService,
};
use crate::wire;

/// The subscriber service.
#[derive(Debug, Clone)]
pub(crate) struct Subscriber {
    pub(crate) broker: Broker,
}

/// Why an outcome was refused: the violation kind and the detail.
fn refusal(o: &AckOutcome) -> (&'static str, String) {
    match &o.status {
        AckStatus::Stale(d) => ("STALE_LEASE", d.clone()),
        AckStatus::Unknown(d) => ("UNKNOWN_ACK_ID", d.clone()),
        AckStatus::Ok(_) => ("OK", String::new()),
    }
}

/// A unary call's outcomes: OK if all succeeded, otherwise
/// FAILED_PRECONDITION listing the refused ones (the others were committed).
fn unary_outcomes(outcomes: Result<Vec<AckOutcome>>) -> Result<Vec<proto::AckOutcome>, Status> {
    let outcomes = outcomes.map_err(status)?;
    let refused: Vec<&AckOutcome> = outcomes
        .iter()
        .filter(|o| !matches!(o.status, AckStatus::Ok(_)))
        .collect();
    let Some(first) = refused.first() else {
        return Ok(outcomes.into_iter().map(Into::into).collect());
    };
    let mut details = ErrorDetails::new();
    for o in &refused {
        let (kind, d) = refusal(o);
        details.add_precondition_failure_violation(kind, o.ack_id.clone(), d);
    }
    let message = format!(
        "{} of {} refused (the others were committed); first: {}",
        refused.len(),
        outcomes.len(),
        refusal(first).1
    );
    Err(Status::with_error_details(
        tonic::Code::FailedPrecondition,
        message,
        details,
    ))
}

type SubscribeStream = Pin<Box<dyn Stream<Item = Result<SubscribeResponse, Status>> + Send>>;

#[tonic::async_trait]
impl SubscriberService for Subscriber {
    type SubscribeStream = SubscribeStream;

    async fn subscribe(
        &self,
        request: Request<Streaming<SubscribeRequest>>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        self.broker.check_open().map_err(status)?;
        let mut inbound = request.into_inner();
        let first = inbound
            .message()
            .await?
            .ok_or_else(|| invalid("the stream ended before its first request"))?;
        let subscription = first.subscription.clone();
        let first = SessionCommand::try_from(first).map_err(status)?;
        // A broken transport ends the commands like a closed stream; a
        // request that does not decode ends the session with its error.
        let commands = inbound
            .take_while(|m| std::future::ready(m.is_ok()))
            .filter_map(|m| std::future::ready(m.ok()))
            .map(SessionCommand::try_from);
        let events = self
            .broker
            .subscribe(&subscription, first, Box::pin(commands))
            .await
            .map_err(status)?;
        let responses = ReceiverStream::new(events).map(|e| e.map(Into::into).map_err(status));
        Ok(Response::new(Box::pin(responses)))
    }

    async fn pull(&self, request: Request<PullRequest>) -> Result<Response<PullResponse>, Status> {
        let req = request.into_inner();
        let wait = wire::opt_duration(req.max_wait.as_ref(), "max_wait").map_err(status)?;
        let deliveries = self
            .broker
            .pull(
                &req.subscription,
                req.max_messages,
                wait.unwrap_or_default(),
            )
            .await
            .map_err(status)?;
        Ok(Response::new(PullResponse {
            messages: deliveries.into_iter().map(Into::into).collect(),
        }))
    }

    async fn ack(&self, request: Request<AckRequest>) -> Result<Response<AckResponse>, Status> {
        let req = request.into_inner();
        let outcomes = self.broker.ack(&req.subscription, req.ack_ids).await;
        Ok(Response::new(AckResponse {
            outcomes: unary_outcomes(outcomes)?,
        }))
    }

    async fn nack(&self, request: Request<NackRequest>) -> Result<Response<NackResponse>, Status> {
        let req = request.into_inner();
        let nacks = wire::all(req.nacks).map_err(status)?;
        let outcomes = self.broker.nack(&req.subscription, nacks).await;
        Ok(Response::new(NackResponse {
            outcomes: unary_outcomes(outcomes)?,
        }))
    }

    async fn extend_lease(
        &self,
        request: Request<ExtendLeaseRequest>,
    ) -> Result<Response<ExtendLeaseResponse>, Status> {
        let req = request.into_inner();
        let extensions = wire::all(req.extensions).map_err(status)?;
        let outcomes = self.broker.extend(&req.subscription, extensions).await;
        Ok(Response::new(ExtendLeaseResponse {
            outcomes: unary_outcomes(outcomes)?,
        }))
    }
}

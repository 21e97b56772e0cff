//! `tidings.v1.SubscriberService`: the Subscribe stream, translated to and
//! from the broker's session (`crate::session`), and the unary calls. Each
//! call decodes (`wire`), calls the broker, encodes.

use std::pin::Pin;

use futures_util::{Stream, StreamExt};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tonic_types::{ErrorDetails, StatusExt};

use super::auth::{Caller, Permission};
use super::convert::{invalid, status, unreadable};
use crate::broker::Broker;
use crate::error::{Error, Result};
use crate::model::{AckOutcome, AckStatus, SessionCommand, cut};
use crate::proto::{
    self, AckRequest, AckResponse, ExtendLeaseRequest, ExtendLeaseResponse, NackRequest,
    NackResponse, PeekRequest, PeekResponse, PullRequest, PullResponse, SubscribeRequest,
    SubscribeResponse, subscriber_service_server::SubscriberService,
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

/// Most refused ids a unary call's error details list: trailers must stay
/// well under the 8 KiB of metadata a default gRPC client accepts.
const LISTED_REFUSALS: usize = 16;
/// Most bytes of one listed refusal's detail.
const DETAIL_BYTES: usize = 120;

/// A unary call's outcomes: OK if all succeeded, otherwise
/// FAILED_PRECONDITION naming how many were refused, with the first
/// [`LISTED_REFUSALS`] of them in the details (the others were committed).
/// Nothing in the status grows with the request: a client that needs every
/// outcome uses the Subscribe stream, which answers each one.
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
    for o in refused.iter().take(LISTED_REFUSALS) {
        let (kind, d) = refusal(o);
        details.add_precondition_failure_violation(
            kind,
            cut(&o.ack_id, DETAIL_BYTES),
            cut(&d, DETAIL_BYTES),
        );
    }
    let listed = if refused.len() > LISTED_REFUSALS {
        format!("the first {LISTED_REFUSALS} are listed in the details")
    } else {
        "they are listed in the details".to_owned()
    };
    let message = format!(
        "{} of {} refused (the others were committed; {listed}); first: {}",
        refused.len(),
        outcomes.len(),
        cut(&refusal(first).1, DETAIL_BYTES)
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
        let caller = Caller::of(&request);
        let mut inbound = request.into_inner();
        let first = inbound
            .message()
            .await
            .map_err(unreadable)?
            .ok_or_else(|| invalid("the stream ended before its first request"))?;
        let subscription = first.subscription.clone();
        caller.may(Permission::Consume, &subscription)?;
        let first = SessionCommand::try_from(first).map_err(status)?;
        // The client closing its side ends the commands; a broken
        // transport (a cancelled stream, a reset connection, a request that
        // cannot be read) ends them with an error, after which the session
        // counts what the stream held as failed attempts; a request that
        // does not convert ends the session with its error.
        let commands = inbound.scan(false, |broke, m| {
            std::future::ready(match (*broke, m) {
                (true, _) => None,
                (false, Ok(r)) => Some(SessionCommand::try_from(r)),
                (false, Err(s)) => {
                    *broke = true;
                    Some(Err(match s.code() {
                        // Too large, or not a valid message.
                        tonic::Code::OutOfRange | tonic::Code::Internal => Error::InvalidArgument(
                            format!("a Subscribe request could not be read: {}", s.message()),
                        ),
                        _ => Error::Unavailable(format!(
                            "the Subscribe stream broke: {}",
                            s.message()
                        )),
                    }))
                }
            })
        });
        let events = self
            .broker
            .subscribe(&subscription, first, Box::pin(commands))
            .await
            .map_err(status)?;
        let responses = ReceiverStream::new(events).map(|e| e.map(Into::into).map_err(status));
        Ok(Response::new(Box::pin(responses)))
    }

    async fn pull(&self, request: Request<PullRequest>) -> Result<Response<PullResponse>, Status> {
        let caller = Caller::of(&request);
        let req = request.into_inner();
        caller.may(Permission::Consume, &req.subscription)?;
        let wait = wire::opt_duration(req.max_wait.as_ref(), "max_wait").map_err(status)?;
        let deliveries = self
            .broker
            .pull(
                &req.subscription,
                req.max_messages,
                wait.unwrap_or_default(),
                req.max_response_bytes,
            )
            .await
            .map_err(status)?;
        Ok(Response::new(PullResponse {
            messages: deliveries.into_iter().map(Into::into).collect(),
        }))
    }

    async fn peek(&self, request: Request<PeekRequest>) -> Result<Response<PeekResponse>, Status> {
        let caller = Caller::of(&request);
        let req = request.into_inner();
        caller.may(Permission::Consume, &req.subscription)?;
        let page = self
            .broker
            .peek(
                &req.subscription,
                req.page_size,
                &req.page_token,
                req.max_response_bytes,
            )
            .await
            .map_err(status)?;
        Ok(Response::new(PeekResponse {
            messages: page.items.into_iter().map(Into::into).collect(),
            next_page_token: page.next_page_token,
        }))
    }

    async fn ack(&self, request: Request<AckRequest>) -> Result<Response<AckResponse>, Status> {
        let caller = Caller::of(&request);
        let req = request.into_inner();
        caller.may(Permission::Consume, &req.subscription)?;
        let outcomes = self.broker.ack(&req.subscription, req.ack_ids).await;
        Ok(Response::new(AckResponse {
            outcomes: unary_outcomes(outcomes)?,
        }))
    }

    async fn nack(&self, request: Request<NackRequest>) -> Result<Response<NackResponse>, Status> {
        let caller = Caller::of(&request);
        let req = request.into_inner();
        caller.may(Permission::Consume, &req.subscription)?;
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
        let caller = Caller::of(&request);
        let req = request.into_inner();
        caller.may(Permission::Consume, &req.subscription)?;
        let extensions = wire::all(req.extensions).map_err(status)?;
        let outcomes = self.broker.extend(&req.subscription, extensions).await;
        Ok(Response::new(ExtendLeaseResponse {
            outcomes: unary_outcomes(outcomes)?,
        }))
    }
}

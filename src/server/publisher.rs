//! `tidings.v1.PublisherService`: decode, call the broker, encode.

use std::pin::Pin;

use futures_util::stream::{FuturesOrdered, StreamExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use super::auth::Caller;
use super::convert::{status, unreadable};
use crate::broker::Broker;
use crate::model::PublishOutcome;
use crate::proto::{
    self, PublishRequest, PublishResponse, PublishStreamRequest, PublishStreamResponse,
    publisher_service_server::PublisherService,
};
use crate::wire;

/// Requests of one PublishStream that may await their commit at once.
const MAX_PIPELINE: usize = 256;

/// The publisher service.
#[derive(Debug, Clone)]
pub(crate) struct Publisher {
    pub(crate) broker: Broker,
}

fn results(outcomes: Vec<PublishOutcome>) -> Vec<proto::PublishResult> {
    outcomes.into_iter().map(Into::into).collect()
}

type PublishFuture =
    Pin<Box<dyn std::future::Future<Output = Result<Vec<PublishOutcome>, Status>> + Send>>;

#[tonic::async_trait]
impl PublisherService for Publisher {
    async fn publish(
        &self,
        request: Request<PublishRequest>,
    ) -> Result<Response<PublishResponse>, Status> {
        let caller = Caller::of(&request);
        let messages = request.into_inner().messages;
        caller.may_publish(&messages)?;
        let messages = wire::new_messages(messages).map_err(status)?;
        let outcomes = self.broker.publish(messages).await.map_err(status)?;
        Ok(Response::new(PublishResponse {
            results: results(outcomes),
        }))
    }

    type PublishStreamStream = ReceiverStream<Result<PublishStreamResponse, Status>>;

    async fn publish_stream(
        &self,
        request: Request<Streaming<PublishStreamRequest>>,
    ) -> Result<Response<Self::PublishStreamStream>, Status> {
        self.broker.check_open().map_err(status)?;
        let caller = Caller::of(&request);
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(64);
        let broker = self.broker.clone();
        // What the stream stored is a prefix of what it sent: once a
        // request fails, none after it is read or stored.
        let chain = crate::store::Chain::new();
        tokio::spawn(
            async move {
            let mut draining = broker.draining();
            let mut pending: FuturesOrdered<PublishFuture> = FuturesOrdered::new();
            let mut reading = true;
            let mut index = 0usize;
            // Why reading stopped early: the stream then ends with this
            // error once the requests before it are answered.
            let mut broke: Option<Status> = None;
            loop {
                if !reading && pending.is_empty() {
                    if let Some(status) = broke {
                        let _ = tx.send(Err(status)).await;
                    }
                    return;
                }
                tokio::select! {
                    biased;
                    Some(result) = pending.next(), if !pending.is_empty() => {
                        let response = result.map(|o| PublishStreamResponse { results: results(o) });
                        let failed = response.is_err();
                        if tx.send(response).await.is_err() || failed {
                            return;
                        }
                    }
                    _ = Broker::drained(&mut draining), if reading => {
                        // Stop taking requests; answer those already taken, then
                        // tell the client to reconnect elsewhere.
                        while let Some(result) = pending.next().await {
                            let response = result.map(|o| PublishStreamResponse { results: results(o) });
                            if tx.send(response).await.is_err() {
                                return;
                            }
                        }
                        let _ = tx
                            .send(Err(Status::unavailable("the broker is shutting down; reconnect and resend unanswered requests")))
                            .await;
                        return;
                    }
                    message = inbound.message(), if reading && pending.len() < MAX_PIPELINE => {
                        match message {
                            Ok(Some(req)) => {
                                let at = index;
                                index += 1;
                                let in_request = move |s: Status| {
                                    Status::new(s.code(), format!("request {at}: {}", s.message()))
                                };
                                let link = chain.link(at as u64);
                                let queued = match caller.may_publish(&req.messages) {
                                    Err(denied) => Err(denied),
                                    Ok(()) => match wire::new_messages(req.messages) {
                                        Ok(messages) => broker.enqueue_publish(messages, link.clone()).await.map_err(status),
                                        Err(e) => Err(status(e)),
                                    },
                                };
                                // Refused before it was queued (here, by the
                                // broker's checks or a full disk): the one
                                // place such a refusal marks the chain.
                                if queued.is_err() {
                                    link.failed();
                                    reading = false;
                                }
                                match queued {
                                    Ok(done) => pending.push_back(Box::pin(async move {
                                        done.await.map_err(|e| in_request(status(e)))
                                    })),
                                    Err(s) => pending.push_back(Box::pin(std::future::ready(Err(in_request(s))))),
                                }
                            }
                            Ok(None) => reading = false,
                            Err(e) => {
                                // A request that could not be read (over
                                // --max-request-bytes, or not a valid
                                // message) ends the stream with an error
                                // naming it; requests after it are not read
                                // and nothing of them is stored.
                                tracing::debug!(error = %e, "publish stream broke");
                                reading = false;
                                let e = unreadable(e);
                                broke = Some(Status::new(
                                    e.code(),
                                    format!(
                                        "request {index}: {}; it and any request after it were not \
                                         stored (the ones before it are answered)",
                                        e.message()
                                    ),
                                ));
                            }
                        }
                    }
                }
            }
        }
            .in_current_span(),
        );
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

//! `tidings.v1.SubscriberService`: the streaming session (flow control, acks,
//! nacks, lease extensions) and the unary calls.

use std::collections::HashMap;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tonic_types::{ErrorDetails, StatusExt};

use super::convert::{invalid, status};
use crate::broker::Broker;
use crate::error::Error;
use crate::model::{self, AckId, AckStatus, Micros, NackItem, now_micros};
use crate::proto::{
    self, AckRequest, AckResponse, ExtendLeaseRequest, ExtendLeaseResponse, NackRequest,
    NackResponse, PullRequest, PullResponse, SubscribeRequest, SubscribeResponse,
    subscriber_service_server::SubscriberService,
};
use crate::wire;

/// Default flow control of a Subscribe stream.
const DEFAULT_MAX_MESSAGES: usize = 1000;
const DEFAULT_MAX_BYTES: usize = 100 * 1024 * 1024;
/// Most messages leased in one store call.
const LEASE_CHUNK: usize = 500;
/// Longest a Pull may wait.
const MAX_PULL_WAIT: Duration = Duration::from_secs(60);

/// The subscriber service.
#[derive(Debug, Clone)]
pub(crate) struct Subscriber {
    pub(crate) broker: Broker,
}

/// Parses ack ids, keeping each one's text for the answer. A malformed id
/// becomes an `Unknown` outcome rather than failing the whole request.
fn parse_ids(ids: &[String]) -> Vec<Result<AckId, String>> {
    ids.iter()
        .map(|s| s.parse::<AckId>().map_err(|e| e.to_string()))
        .collect()
}

/// Splits parsed ids into those to send to the store and the positions of
/// the malformed ones, then merges the store's answers back in order.
fn merge(
    parsed: &[Result<AckId, String>],
    mut answered: impl Iterator<Item = AckStatus>,
) -> Vec<AckStatus> {
    parsed
        .iter()
        .map(|p| match p {
            Ok(_) => answered
                .next()
                .unwrap_or_else(|| AckStatus::Unknown("no answer from storage".into())),
            Err(e) => AckStatus::Unknown(e.clone()),
        })
        .collect()
}

fn extension(d: Option<&prost_types::Duration>) -> Result<Duration, Status> {
    let d = d.ok_or_else(|| invalid("lease extension needs a duration"))?;
    let d = wire::std_duration(d, "extension").map_err(status)?;
    if d.is_zero() || d > Duration::from_secs(12 * 3600) {
        return Err(invalid(format!(
            "extension {d:?} is out of range (1 µs to 12 h)"
        )));
    }
    Ok(d)
}

fn nack_delay(d: Option<&prost_types::Duration>) -> Result<Option<Duration>, Status> {
    wire::opt_duration(d, "nack delay").map_err(status)
}

impl Subscriber {
    async fn acks(&self, sub: &str, ids: &[String]) -> Result<Vec<AckStatus>, Error> {
        let parsed = parse_ids(ids);
        let good: Vec<AckId> = parsed
            .iter()
            .filter_map(|p| p.as_ref().ok().copied())
            .collect();
        let answered = if good.is_empty() {
            Vec::new()
        } else {
            self.broker.store().ack(sub, good).await?
        };
        Ok(merge(&parsed, answered.into_iter()))
    }

    async fn nacks(&self, sub: &str, nacks: &[proto::Nack]) -> Result<Vec<AckStatus>, Status> {
        let ids: Vec<String> = nacks.iter().map(|n| n.ack_id.clone()).collect();
        let parsed = parse_ids(&ids);
        let mut items = Vec::new();
        for (p, n) in parsed.iter().zip(nacks) {
            if let Ok(ack_id) = p {
                items.push(NackItem {
                    ack_id: *ack_id,
                    delay: nack_delay(n.delay.as_ref())?,
                    reason: n.reason.clone(),
                });
            }
        }
        let answered = if items.is_empty() {
            Vec::new()
        } else {
            self.broker.store().nack(sub, items).await.map_err(status)?
        };
        Ok(merge(&parsed, answered.into_iter()))
    }

    async fn extensions(
        &self,
        sub: &str,
        extensions: &[proto::LeaseExtension],
    ) -> Result<Vec<AckStatus>, Status> {
        let ids: Vec<String> = extensions.iter().map(|n| n.ack_id.clone()).collect();
        let parsed = parse_ids(&ids);
        let mut items = Vec::new();
        for (p, e) in parsed.iter().zip(extensions) {
            if let Ok(ack_id) = p {
                items.push((*ack_id, extension(e.extension.as_ref())?));
            }
        }
        let answered = if items.is_empty() {
            Vec::new()
        } else {
            self.broker
                .store()
                .extend(sub, items)
                .await
                .map_err(status)?
        };
        Ok(merge(&parsed, answered.into_iter()))
    }
}

fn outcomes(
    ids: impl IntoIterator<Item = String>,
    operation: model::AckOperation,
    statuses: Vec<AckStatus>,
) -> Vec<proto::AckOutcome> {
    ids.into_iter()
        .zip(statuses)
        .map(|(ack_id, status)| {
            model::AckOutcome {
                ack_id,
                operation,
                status,
            }
            .into()
        })
        .collect()
}

/// A unary call's outcomes: OK if all succeeded, otherwise
/// FAILED_PRECONDITION listing the refused ones (the others were committed).
fn unary_outcomes(outcomes: Vec<proto::AckOutcome>) -> Result<Vec<proto::AckOutcome>, Status> {
    let refused: Vec<&proto::AckOutcome> = outcomes
        .iter()
        .filter(|o| o.result != proto::AckResult::Ok as i32)
        .collect();
    if refused.is_empty() {
        return Ok(outcomes);
    }
    let mut details = ErrorDetails::new();
    for o in &refused {
        let kind = if o.result == proto::AckResult::Stale as i32 {
            "STALE_LEASE"
        } else {
            "UNKNOWN_ACK_ID"
        };
        details.add_precondition_failure_violation(kind, o.ack_id.clone(), o.detail.clone());
    }
    let first = refused[0];
    let message = format!(
        "{} of {} refused (the others were committed); first: {}",
        refused.len(),
        outcomes.len(),
        first.detail
    );
    Err(Status::with_error_details(
        tonic::Code::FailedPrecondition,
        message,
        details,
    ))
}

#[tonic::async_trait]
impl SubscriberService for Subscriber {
    type SubscribeStream = ReceiverStream<Result<SubscribeResponse, Status>>;

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
        model::validate_name("subscription", &first.subscription).map_err(status)?;
        let sub = self
            .broker
            .store()
            .get_subscription(&first.subscription)
            .await
            .map_err(status)?;
        let (tx, rx) = mpsc::channel(16);
        let mut session = Session {
            service: self.clone(),
            subscription: sub.name,
            topic: sub.topic,
            max_messages: DEFAULT_MAX_MESSAGES,
            max_bytes: DEFAULT_MAX_BYTES,
            outstanding: HashMap::new(),
            outstanding_bytes: 0,
            earliest_deadline: Micros::MAX,
            tx,
        };
        session.flow_control(&first)?;
        tokio::spawn(async move { session.run(first, inbound).await });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn pull(&self, request: Request<PullRequest>) -> Result<Response<PullResponse>, Status> {
        self.broker.check_open().map_err(status)?;
        let req = request.into_inner();
        model::validate_name("subscription", &req.subscription).map_err(status)?;
        let max = match req.max_messages {
            0 => 1,
            n @ 1..=1000 => n as usize,
            n => {
                return Err(invalid(format!(
                    "max_messages {n} is out of range (1 to 1000)"
                )));
            }
        };
        let wait = req
            .max_wait
            .as_ref()
            .map(|d| wire::std_duration(d, "max_wait"))
            .transpose()
            .map_err(status)?
            .unwrap_or_default()
            .min(MAX_PULL_WAIT);
        let store = self.broker.store();
        let sub = store
            .get_subscription(&req.subscription)
            .await
            .map_err(status)?;
        let mut topic_news = store.notifier().watch_topic(&sub.topic);
        let mut sub_news = store.notifier().watch_subscription(&sub.name);
        let give_up = Instant::now() + wait;
        loop {
            topic_news.borrow_and_update();
            sub_news.borrow_and_update();
            let batch = store
                .lease(&sub.name, max, DEFAULT_MAX_BYTES)
                .await
                .map_err(status)?;
            if !batch.deliveries.is_empty() || Instant::now() >= give_up {
                let messages = batch.deliveries.into_iter().map(Into::into).collect();
                return Ok(Response::new(PullResponse { messages }));
            }
            let wake = batch
                .next_due
                .map_or(give_up, |due| give_up.min(instant_at(due)));
            tokio::select! {
                _ = topic_news.changed() => {}
                _ = sub_news.changed() => {}
                _ = tokio::time::sleep_until(wake) => {}
            }
        }
    }

    async fn ack(&self, request: Request<AckRequest>) -> Result<Response<AckResponse>, Status> {
        let req = request.into_inner();
        model::validate_name("subscription", &req.subscription).map_err(status)?;
        if req.ack_ids.is_empty() {
            return Err(invalid("ack request has no ack ids"));
        }
        let statuses = self
            .acks(&req.subscription, &req.ack_ids)
            .await
            .map_err(status)?;
        let outcomes = unary_outcomes(outcomes(req.ack_ids, model::AckOperation::Ack, statuses))?;
        Ok(Response::new(AckResponse { outcomes }))
    }

    async fn nack(&self, request: Request<NackRequest>) -> Result<Response<NackResponse>, Status> {
        let req = request.into_inner();
        model::validate_name("subscription", &req.subscription).map_err(status)?;
        if req.nacks.is_empty() {
            return Err(invalid("nack request has no nacks"));
        }
        let statuses = self.nacks(&req.subscription, &req.nacks).await?;
        let ids = req.nacks.into_iter().map(|n| n.ack_id);
        let outcomes = unary_outcomes(outcomes(ids, model::AckOperation::Nack, statuses))?;
        Ok(Response::new(NackResponse { outcomes }))
    }

    async fn extend_lease(
        &self,
        request: Request<ExtendLeaseRequest>,
    ) -> Result<Response<ExtendLeaseResponse>, Status> {
        let req = request.into_inner();
        model::validate_name("subscription", &req.subscription).map_err(status)?;
        if req.extensions.is_empty() {
            return Err(invalid("extend request has no extensions"));
        }
        let statuses = self.extensions(&req.subscription, &req.extensions).await?;
        let ids = req.extensions.into_iter().map(|e| e.ack_id);
        let outcomes = unary_outcomes(outcomes(ids, model::AckOperation::Extend, statuses))?;
        Ok(Response::new(ExtendLeaseResponse { outcomes }))
    }
}

/// The tokio instant at which the wall clock reads `at`.
fn instant_at(at: Micros) -> Instant {
    let now = now_micros();
    Instant::now() + Duration::from_micros((at - now).max(0) as u64)
}

/// One Subscribe stream: what it holds leased, and its flow control.
struct Session {
    service: Subscriber,
    subscription: String,
    topic: String,
    max_messages: usize,
    max_bytes: usize,
    /// Leases held by this stream: deadline and payload size.
    outstanding: HashMap<AckId, (Micros, usize)>,
    outstanding_bytes: usize,
    /// No outstanding lease ends before this (a lower bound: acks and
    /// extensions only move it later), so expiry needs no scan until then.
    earliest_deadline: Micros,
    tx: mpsc::Sender<Result<SubscribeResponse, Status>>,
}

impl Session {
    fn flow_control(&mut self, req: &SubscribeRequest) -> Result<(), Status> {
        let limit = self.service.broker.limits().max_outstanding_messages;
        match req.max_outstanding_messages {
            0 => {}
            n if n < 0 || n as usize > limit => {
                return Err(invalid(format!(
                    "max_outstanding_messages {n} is out of range (1 to {limit})"
                )));
            }
            n => self.max_messages = n as usize,
        }
        match req.max_outstanding_bytes {
            0 => {}
            n if n < 0 => return Err(invalid("max_outstanding_bytes is negative")),
            n => self.max_bytes = usize::try_from(n).unwrap_or(usize::MAX),
        }
        Ok(())
    }

    /// Forgets leases whose deadline passed: the broker will redeliver them,
    /// so they no longer count against flow control.
    fn drop_expired(&mut self, now: Micros) -> Option<Micros> {
        if now < self.earliest_deadline {
            return (self.earliest_deadline != Micros::MAX).then_some(self.earliest_deadline);
        }
        let mut earliest = None;
        let mut freed = 0;
        self.outstanding.retain(|_, (deadline, bytes)| {
            if *deadline <= now {
                freed += *bytes;
                false
            } else {
                earliest = Some(earliest.map_or(*deadline, |e: Micros| e.min(*deadline)));
                true
            }
        });
        self.outstanding_bytes -= freed;
        self.earliest_deadline = earliest.unwrap_or(Micros::MAX);
        earliest
    }

    fn forget(&mut self, id: &str) {
        if let Some((_, bytes)) = id
            .parse::<AckId>()
            .ok()
            .and_then(|id| self.outstanding.remove(&id))
        {
            self.outstanding_bytes -= bytes;
        }
    }

    async fn send(&self, response: Result<SubscribeResponse, Status>) -> bool {
        self.tx.send(response).await.is_ok()
    }

    /// Applies a request's acks, nacks and extensions; answers with their
    /// outcomes. Returns false if the stream should end.
    async fn handle(&mut self, req: SubscribeRequest) -> bool {
        if let Err(s) = self.flow_control(&req) {
            return !self.send(Err(s)).await;
        }
        let mut out = Vec::new();
        let sub = self.subscription.clone();
        if !req.ack_ids.is_empty() {
            match self.service.acks(&sub, &req.ack_ids).await {
                Ok(statuses) => out.extend(outcomes(
                    req.ack_ids.iter().cloned(),
                    model::AckOperation::Ack,
                    statuses,
                )),
                Err(e) => return self.fail(status(e)).await,
            }
            for id in &req.ack_ids {
                self.forget(id);
            }
        }
        if !req.nacks.is_empty() {
            match self.service.nacks(&sub, &req.nacks).await {
                Ok(statuses) => out.extend(outcomes(
                    req.nacks.iter().map(|n| n.ack_id.clone()),
                    model::AckOperation::Nack,
                    statuses,
                )),
                Err(s) => return self.fail(s).await,
            }
            for n in &req.nacks {
                self.forget(&n.ack_id);
            }
        }
        if !req.extensions.is_empty() {
            match self.service.extensions(&sub, &req.extensions).await {
                Ok(statuses) => {
                    for (e, s) in req.extensions.iter().zip(&statuses) {
                        if let (AckStatus::Ok(Some(deadline)), Ok(id)) =
                            (s, e.ack_id.parse::<AckId>())
                            && let Some(entry) = self.outstanding.get_mut(&id)
                        {
                            entry.0 = *deadline;
                        }
                    }
                    out.extend(outcomes(
                        req.extensions.iter().map(|e| e.ack_id.clone()),
                        model::AckOperation::Extend,
                        statuses,
                    ));
                }
                Err(s) => return self.fail(s).await,
            }
        }
        if out.is_empty() {
            return true;
        }
        self.send(Ok(SubscribeResponse {
            messages: Vec::new(),
            outcomes: out,
        }))
        .await
    }

    async fn fail(&mut self, s: Status) -> bool {
        let _ = self.send(Err(s)).await;
        false
    }

    /// Hands leases this stream still holds back for immediate redelivery.
    async fn release_all(&mut self) {
        if self.outstanding.is_empty() {
            return;
        }
        let ids: Vec<AckId> = self.outstanding.drain().map(|(id, _)| id).collect();
        self.outstanding_bytes = 0;
        if let Err(e) = self
            .service
            .broker
            .store()
            .release(&self.subscription, ids)
            .await
        {
            tracing::debug!(error = %e, subscription = %self.subscription, "release on stream end failed; leases will expire");
        }
    }

    async fn run(mut self, first: SubscribeRequest, mut inbound: Streaming<SubscribeRequest>) {
        let broker = self.service.broker.clone();
        let store = broker.store().clone();
        let poll = broker.limits().poll_interval;
        let mut draining = broker.draining();
        let mut topic_news = store.notifier().watch_topic(&self.topic);
        let mut sub_news = store.notifier().watch_subscription(&self.subscription);
        if !self.handle(first).await {
            return self.release_all().await;
        }
        let mut look = true;
        let mut next_due: Option<Micros> = None;
        loop {
            let now = now_micros();
            let lease_end = self.drop_expired(now);
            let credit = self.max_messages.saturating_sub(self.outstanding.len());
            let byte_credit = self.max_bytes.saturating_sub(self.outstanding_bytes);
            // Lease in sizeable batches: wait until half the window is free
            // (or nothing is outstanding) rather than lease a few at a time.
            let low_water = (self.max_messages / 2).clamp(1, LEASE_CHUNK);
            let has_credit =
                byte_credit > 0 && (credit >= low_water || self.outstanding.is_empty());
            if look && has_credit {
                topic_news.borrow_and_update();
                sub_news.borrow_and_update();
                let want = credit.min(LEASE_CHUNK);
                match store.lease(&self.subscription, want, byte_credit).await {
                    Ok(batch) => {
                        next_due = batch.next_due;
                        look = batch.progressed || batch.deliveries.len() == want;
                        if !batch.deliveries.is_empty() {
                            for d in &batch.deliveries {
                                self.outstanding
                                    .insert(d.ack_id, (d.lease_deadline, d.message.payload.len()));
                                self.outstanding_bytes += d.message.payload.len();
                                self.earliest_deadline =
                                    self.earliest_deadline.min(d.lease_deadline);
                            }
                            let messages = batch.deliveries.into_iter().map(Into::into).collect();
                            if !self
                                .send(Ok(SubscribeResponse {
                                    messages,
                                    outcomes: Vec::new(),
                                }))
                                .await
                            {
                                return self.release_all().await;
                            }
                        }
                    }
                    Err(e) => {
                        let _ = self.send(Err(status(e))).await;
                        return self.release_all().await;
                    }
                }
                if look {
                    // Take every ack that arrived meanwhile before leasing
                    // more: a stream with credit left would otherwise lease
                    // again and again while acks wait one per turn.
                    while let Some(Ok(Some(req))) =
                        futures_util::FutureExt::now_or_never(inbound.message())
                    {
                        if !self.handle(req).await {
                            return self.release_all().await;
                        }
                    }
                    continue;
                }
            }
            let mut wake = now + poll.as_micros() as i64;
            if let Some(due) = next_due {
                wake = wake.min(due);
            }
            if let Some(end) = lease_end {
                wake = wake.min(end);
            }
            tokio::select! {
                biased;
                _ = Broker::drained(&mut draining) => {
                    self.release_all().await;
                    let _ = self.send(Err(Status::unavailable("the broker is shutting down; reconnect"))).await;
                    return;
                }
                message = inbound.message() => match message {
                    Ok(Some(req)) => {
                        if !self.handle(req).await {
                            return self.release_all().await;
                        }
                        look = true;
                    }
                    Ok(None) | Err(_) => return self.release_all().await,
                },
                _ = topic_news.changed(), if has_credit => look = true,
                _ = sub_news.changed(), if has_credit => look = true,
                _ = tokio::time::sleep_until(instant_at(wake)) => look = true,
                _ = self.tx.closed() => return self.release_all().await,
            }
        }
    }
}

//! The Subscribe session, the leasing engine of one stream: it takes domain
//! commands (flow control, acks, nacks, extensions) and sends domain events
//! (deliveries, ack outcomes). It leases in batches when half its window is
//! free, wakes on topic and subscription news (with a bounded poll as
//! fallback), forgets leases that expired, and splits deliveries into
//! responses of a bounded size. When the client's stream breaks (cancelled,
//! reset, the consumer killed), each lease it still holds counts as a
//! failed attempt, so a message that crashes its consumer reaches the dead
//! letters; when the client closes its side on purpose, or the broker
//! drains, they are given back without counting. It knows nothing of
//! protobuf.

use std::collections::HashMap;
use std::time::Duration;

use futures_util::{FutureExt, Stream, StreamExt};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::broker::Broker;
use crate::error::{Error, Result};
use crate::model::{
    AckId, AckOperation, AckOutcome, AckStatus, Delivery, FlowControl, Micros, SessionCommand,
    SessionEvent, Subscription, now_micros,
};
use crate::store::{Holder, Route};

/// Default flow control of a Subscribe stream.
const DEFAULT_MAX_MESSAGES: usize = 1000;
/// Default byte window of a Subscribe stream, and the byte budget of a Pull.
pub(crate) const DEFAULT_MAX_BYTES: usize = 100 * 1024 * 1024;
/// How long a session whose client's requests ended waits to see whether
/// the client cancelled the stream rather than closed its side of it.
const CANCEL_GRACE: Duration = Duration::from_millis(100);
/// Most messages leased in one store call.
const LEASE_CHUNK: usize = 500;
/// Most runs a lease names for extension (see `Session::runs`): looking
/// behind each costs a walk of the key's index, every lease; measured with
/// `tidings bench --subscribers 4 --keys 1000 --ordered`, naming 64 of 500
/// runs cost a third of the throughput.
const RUNS_NAMED: usize = 64;

/// The tokio instant at which the wall clock reads `at`.
pub(crate) fn instant_at(at: Micros) -> Instant {
    let now = now_micros();
    Instant::now() + Duration::from_micros((at - now).max(0) as u64)
}

/// About how many bytes a delivery takes in a response: its message's
/// payload, key, attributes and fixed fields, with room for framing.
pub(crate) fn delivery_bytes(d: &Delivery) -> usize {
    d.message.response_bytes()
}

/// The next messages other streams' leases leased to this one, if it takes
/// any.
async fn handed(route: &mut Option<Route>) -> Vec<Delivery> {
    match route {
        Some(route) => route.recv().await,
        None => std::future::pending().await,
    }
}

/// What a stream does after its commands were handled.
enum Next {
    /// Goes on.
    Go,
    /// Ends, its leases counting as failed attempts.
    Abandon,
    /// Ends, its leases given back uncounted.
    GiveBack,
}

/// Whether `next` can join `current` within a request's limits.
fn fits(current: &SessionCommand, next: &SessionCommand) -> bool {
    let max = crate::broker::MAX_SETTLE_ITEMS;
    current.acks.len() + next.acks.len() <= max
        && current.nacks.len() + next.nacks.len() <= max
        && current.extensions.len() + next.extensions.len() <= max
        && current.releases.len() + next.releases.len() <= max
}

/// Adds `next` to `current`: its acks, nacks, extensions and releases after
/// those of `current`, its flow control where it sets one.
fn merge(current: &mut SessionCommand, next: SessionCommand) {
    let flow = &mut current.flow;
    if next.flow.max_outstanding_messages != 0 {
        flow.max_outstanding_messages = next.flow.max_outstanding_messages;
    }
    if next.flow.max_outstanding_bytes != 0 {
        flow.max_outstanding_bytes = next.flow.max_outstanding_bytes;
    }
    if next.flow.max_response_bytes != 0 {
        flow.max_response_bytes = next.flow.max_response_bytes;
    }
    current.acks.extend(next.acks);
    current.nacks.extend(next.nacks);
    current.extensions.extend(next.extensions);
    current.releases.extend(next.releases);
}

/// One Subscribe stream: what it holds leased, and its flow control.
pub(crate) struct Session {
    broker: Broker,
    subscription: String,
    topic: String,
    max_messages: usize,
    max_bytes: usize,
    /// Most message bytes in one response (at least one message is sent).
    max_response_bytes: usize,
    /// Leases held by this stream: deadline and payload size.
    outstanding: HashMap<AckId, (Micros, usize, Option<String>)>,
    outstanding_bytes: usize,
    /// This stream in its leases: an ordered subscription keeps a key
    /// with the stream while it holds any of its messages.
    holder: Holder,
    /// Whether the subscription was ordered when the stream opened (then
    /// its leases name the stream's runs).
    ordered: bool,
    /// No outstanding lease ends before this (a lower bound: acks and
    /// extensions only move it later), so expiry needs no scan until then.
    earliest_deadline: Micros,
    /// Ordered subscriptions: where other streams' leases send the new
    /// messages of keys this stream holds (issue 14).
    route: Option<Route>,
    tx: mpsc::Sender<Result<SessionEvent>>,
}

impl Session {
    /// A session on `sub` that sends its events to `tx`.
    pub(crate) fn new(
        broker: Broker,
        sub: Subscription,
        tx: mpsc::Sender<Result<SessionEvent>>,
    ) -> Self {
        let holder = Holder::new();
        let route = sub
            .settings
            .ordered
            .then(|| broker.routes().open(&sub.name, holder));
        Session {
            max_response_bytes: broker.limits().max_response_bytes,
            broker,
            subscription: sub.name,
            topic: sub.topic,
            max_messages: DEFAULT_MAX_MESSAGES,
            max_bytes: DEFAULT_MAX_BYTES,
            outstanding: HashMap::new(),
            outstanding_bytes: 0,
            holder,
            ordered: sub.settings.ordered,
            earliest_deadline: Micros::MAX,
            route,
            tx,
        }
    }

    /// Applies flow control; zero keeps a value.
    ///
    /// Fails with `InvalidArgument` if a value is out of range.
    pub(crate) fn flow_control(&mut self, flow: &FlowControl) -> Result<()> {
        let limit = self.broker.limits().max_outstanding_messages;
        match flow.max_outstanding_messages {
            0 => {}
            n if n < 0 || n as usize > limit => {
                return Err(Error::InvalidArgument(format!(
                    "max_outstanding_messages {n} is out of range (1 to {limit})"
                )));
            }
            n => self.max_messages = n as usize,
        }
        match flow.max_outstanding_bytes {
            0 => {}
            n if n < 0 => {
                return Err(Error::InvalidArgument(
                    "max_outstanding_bytes is negative".into(),
                ));
            }
            n => self.max_bytes = usize::try_from(n).unwrap_or(usize::MAX),
        }
        if flow.max_response_bytes != 0 {
            self.max_response_bytes = self.broker.response_bytes(flow.max_response_bytes)?;
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
        self.outstanding.retain(|_, (deadline, bytes, _)| {
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

    /// On an ordered subscription, the stream's runs: the keys it holds
    /// messages of, each with the sequence of its latest one, if there are
    /// at most [`RUNS_NAMED`] (with more keys, runs are short and looking
    /// behind each costs more than it brings: their held messages go out
    /// when the runs are acked). Its next lease may extend them with the
    /// messages another stream's lease held back behind them.
    fn runs(&self) -> Vec<(String, i64)> {
        if !self.ordered {
            return Vec::new();
        }
        let mut runs: HashMap<&str, i64> = HashMap::new();
        for (id, (_, _, key)) in &self.outstanding {
            if let Some(key) = key {
                let seq = runs.entry(key).or_insert(id.sequence);
                *seq = (*seq).max(id.sequence);
                if runs.len() > RUNS_NAMED {
                    return Vec::new();
                }
            }
        }
        runs.into_iter().map(|(k, s)| (k.to_owned(), s)).collect()
    }

    fn forget(&mut self, id: &str) {
        if let Some((_, bytes, _)) = id
            .parse::<AckId>()
            .ok()
            .and_then(|id| self.outstanding.remove(&id))
        {
            self.outstanding_bytes -= bytes;
        }
    }

    async fn send(&self, event: Result<SessionEvent>) -> bool {
        self.tx.send(event).await.is_ok()
    }

    /// Applies a command's flow control, acks, nacks and extensions;
    /// answers with their outcomes. Returns false if the stream should end.
    async fn handle(&mut self, command: SessionCommand) -> bool {
        if let Err(e) = self.flow_control(&command.flow) {
            return !self.send(Err(e)).await;
        }
        let mut out: Vec<AckOutcome> = Vec::new();
        let sub = self.subscription.clone();
        if !command.acks.is_empty() {
            let answered = self.broker.ack(&sub, command.acks).await;
            if !self.settled(answered, &mut out).await {
                return false;
            }
        }
        if !command.nacks.is_empty() {
            let answered = self.broker.nack(&sub, command.nacks).await;
            if !self.settled(answered, &mut out).await {
                return false;
            }
        }
        if !command.extensions.is_empty() {
            let answered = self.broker.extend(&sub, command.extensions).await;
            if !self.settled(answered, &mut out).await {
                return false;
            }
        }
        if !command.releases.is_empty() {
            let answered = self.broker.release(&sub, command.releases).await;
            if !self.settled(answered, &mut out).await {
                return false;
            }
        }
        if out.is_empty() {
            return true;
        }
        // An answer follows every delivery leased to this stream before
        // the broker read the requests it answers. The writer sends those
        // that other streams' leases handed this one before it answers
        // anyone, so they are in the mailbox now and go first. A consumer
        // relies on it: a key's delivery that comes before the answer to
        // the nack or release of a failed one may have been leased before
        // the broker read it (which ended its lease too), so it goes back
        // unprocessed (`consumer.rs`); one that comes after is taken as
        // leased afresh and processed.
        if !self.pass_on_handed().await {
            return false;
        }
        self.send(Ok(SessionEvent {
            deliveries: Vec::new(),
            outcomes: out,
        }))
        .await
    }

    /// Takes the broker's answer to acks, nacks or extensions into account
    /// (acked and nacked leases no longer count, extended ones end later)
    /// and adds it to `out`. Returns false if the stream should end.
    async fn settled(
        &mut self,
        answered: Result<Vec<AckOutcome>>,
        out: &mut Vec<AckOutcome>,
    ) -> bool {
        let outcomes = match answered {
            Ok(outcomes) => outcomes,
            Err(e) => return self.fail(e).await,
        };
        for o in &outcomes {
            match (o.operation, &o.status) {
                (AckOperation::Ack | AckOperation::Nack | AckOperation::Release, _) => {
                    self.forget(&o.ack_id)
                }
                (AckOperation::Extend, AckStatus::Ok(Some(deadline))) => {
                    if let Some(entry) = o
                        .ack_id
                        .parse::<AckId>()
                        .ok()
                        .and_then(|id| self.outstanding.get_mut(&id))
                    {
                        entry.0 = *deadline;
                    }
                }
                (AckOperation::Extend, _) => {}
            }
        }
        out.extend(outcomes);
        true
    }

    /// Handles `command` together with the commands already waiting behind
    /// it, merged (one store call per kind for all of them: a client that
    /// acks each message in its own request must not wait for a commit per
    /// request, or its acks would queue here until their leases ended);
    /// then what ended the stream, if that came next.
    async fn take<S>(&mut self, command: SessionCommand, commands: &mut S) -> Next
    where
        S: Stream<Item = Result<SessionCommand>> + Unpin,
    {
        let mut current = command;
        let end = loop {
            match commands.next().now_or_never() {
                None => break None,
                Some(Some(Ok(next))) if fits(&current, &next) => merge(&mut current, next),
                Some(Some(Ok(next))) => {
                    if !self.handle(std::mem::replace(&mut current, next)).await {
                        return Next::Abandon;
                    }
                }
                Some(other) => break Some(other),
            }
        };
        if !self.handle(current).await {
            return Next::Abandon;
        }
        match end {
            None | Some(Some(Ok(_))) => Next::Go,
            Some(Some(Err(e))) => {
                self.fail(e).await;
                Next::Abandon
            }
            Some(None) => Next::GiveBack,
        }
    }

    async fn fail(&mut self, e: Error) -> bool {
        let _ = self.send(Err(e)).await;
        false
    }

    /// Ends the leases this stream still holds, because its client's stream
    /// broke (cancelled, reset, its consumer died) or the client sent what
    /// cannot be served: each counts as a failed attempt, redelivered at
    /// once or dead-lettered after the last one, exactly as if the lease
    /// had expired, only sooner.
    async fn abandon_all(&mut self) {
        self.close_route().await;
        let ids = self.take_outstanding();
        if ids.is_empty() {
            return;
        }
        let reason = "the Subscribe stream ended while the message was leased to it";
        if let Err(e) = self.broker.abandon(&self.subscription, ids, reason).await {
            tracing::debug!(error = %e, subscription = %self.subscription, "ending leases on stream end failed; they will expire");
        }
    }

    /// Gives the leases this stream holds back without counting an attempt:
    /// the client closed its side of the stream on purpose (a graceful
    /// shutdown), or the broker is draining or failed to lease.
    async fn give_back_all(&mut self) {
        self.close_route().await;
        let ids = self.take_outstanding();
        if ids.is_empty() {
            return;
        }
        if let Err(e) = self.broker.give_back(&self.subscription, ids).await {
            tracing::debug!(error = %e, subscription = %self.subscription, "release on drain failed; leases will expire");
        }
    }

    /// The client's requests ended. A client that closed its side on
    /// purpose still reads the stream's end, and gets its leases given
    /// back; but tonic also reads a *cancelled* request stream as ended, and
    /// a cancel (a crashing gRPC client's last act) drops the response side
    /// too, so the session waits a moment for that before deciding: a
    /// cancelled stream's leases count as failed attempts.
    async fn client_closed(&mut self) {
        self.close_route().await;
        if self.outstanding.is_empty() {
            return;
        }
        match tokio::time::timeout(CANCEL_GRACE, self.tx.closed()).await {
            Ok(()) => self.abandon_all().await,
            Err(_) => self.give_back_all().await,
        }
    }

    /// Takes no more messages from other streams' leases; those sent and
    /// not yet received go back without counting an attempt (the client
    /// never saw them).
    async fn close_route(&mut self) {
        let Some(route) = self.route.as_mut() else {
            return;
        };
        let unsent: Vec<AckId> = route.close().into_iter().map(|d| d.ack_id).collect();
        if unsent.is_empty() {
            return;
        }
        if let Err(e) = self.broker.give_back(&self.subscription, unsent).await {
            tracing::debug!(error = %e, subscription = %self.subscription, "giving back undelivered messages failed; their leases will expire");
        }
    }

    /// Counts `deliveries` as this stream's leases.
    fn hold(&mut self, deliveries: &[Delivery]) {
        for d in deliveries {
            let key = d.message.key.clone().filter(|k| !k.is_empty());
            self.outstanding
                .insert(d.ack_id, (d.lease_deadline, d.message.payload.len(), key));
            self.outstanding_bytes += d.message.payload.len();
            self.earliest_deadline = self.earliest_deadline.min(d.lease_deadline);
        }
    }

    /// The messages other streams' leases leased to this one and sent
    /// since the last look.
    fn routed_waiting(&mut self) -> Vec<Delivery> {
        let mut waiting = Vec::new();
        while let Some(deliveries) = self.route.as_mut().and_then(Route::try_recv) {
            waiting.extend(deliveries);
        }
        waiting
    }

    /// Passes on what other streams' leases handed this one since the last
    /// look, if anything. Returns false if the receiver is gone.
    async fn pass_on_handed(&mut self) -> bool {
        let waiting = self.routed_waiting();
        let routed = waiting.len();
        routed == 0 || self.pass_on(waiting, routed).await
    }

    /// Counts `deliveries` as this stream's (`routed` of them sent by other
    /// streams' leases) and sends them in sequence order.
    async fn pass_on(&mut self, mut deliveries: Vec<Delivery>, routed: usize) -> bool {
        self.hold(&deliveries);
        if let Some(route) = &self.route {
            route.set_room(self.room());
            route.counted(routed);
        }
        deliveries.sort_by_key(|d| d.message.sequence);
        self.deliver(deliveries).await
    }

    /// What the window has room for, in messages (none once its bytes
    /// are used).
    fn room(&self) -> usize {
        if self.outstanding_bytes >= self.max_bytes {
            return 0;
        }
        self.max_messages.saturating_sub(self.outstanding.len())
    }

    fn take_outstanding(&mut self) -> Vec<AckId> {
        self.outstanding_bytes = 0;
        self.earliest_deadline = Micros::MAX;
        self.outstanding.drain().map(|(id, _)| id).collect()
    }

    /// Sends deliveries in responses of at most `max_response_bytes` of
    /// messages each (a larger message goes alone). Returns false if the
    /// receiver is gone.
    async fn deliver(&self, deliveries: Vec<Delivery>) -> bool {
        let mut chunk = Vec::new();
        let mut bytes = 0;
        for d in deliveries {
            let size = delivery_bytes(&d);
            if !chunk.is_empty() && bytes + size > self.max_response_bytes {
                let event = SessionEvent {
                    deliveries: std::mem::take(&mut chunk),
                    outcomes: Vec::new(),
                };
                if !self.send(Ok(event)).await {
                    return false;
                }
                bytes = 0;
            }
            bytes += size;
            chunk.push(d);
        }
        chunk.is_empty()
            || self
                .send(Ok(SessionEvent {
                    deliveries: chunk,
                    outcomes: Vec::new(),
                }))
                .await
    }

    /// Runs the session until the commands end, an error ends it, the
    /// receiver of its events is gone or the broker drains; then releases
    /// what it holds.
    pub(crate) async fn run<S>(mut self, first: SessionCommand, mut commands: S)
    where
        S: Stream<Item = Result<SessionCommand>> + Unpin,
    {
        let poll = self.broker.limits().poll_interval;
        let mut draining = self.broker.draining();
        let mut topic_news = self.broker.watch_topic(&self.topic);
        let mut sub_news = self.broker.watch_subscription(&self.subscription);
        if !self.handle(first).await {
            return self.abandon_all().await;
        }
        let mut look = true;
        let mut next_due: Option<Micros> = None;
        loop {
            if !self.pass_on_handed().await {
                return self.abandon_all().await;
            }
            let now = now_micros();
            let lease_end = self.drop_expired(now);
            let credit = self.max_messages.saturating_sub(self.outstanding.len());
            let byte_credit = self.max_bytes.saturating_sub(self.outstanding_bytes);
            if let Some(route) = &self.route {
                route.set_room(self.room());
            }
            // Lease in sizeable batches: wait until half the window is free
            // (or nothing is outstanding) rather than lease a few at a time.
            let low_water = (self.max_messages / 2).clamp(1, LEASE_CHUNK);
            let has_credit =
                byte_credit > 0 && (credit >= low_water || self.outstanding.is_empty());
            if look && has_credit {
                topic_news.borrow_and_update();
                sub_news.borrow_and_update();
                let want = credit.min(LEASE_CHUNK);
                if let Some(route) = &self.route {
                    // What this lease may take is not for other streams'
                    // leases to fill (see `pass_on`).
                    route.set_room(self.room().saturating_sub(want));
                }
                match self
                    .broker
                    .lease(
                        &self.subscription,
                        want,
                        byte_credit,
                        self.holder,
                        self.runs(),
                    )
                    .await
                {
                    Ok(batch) => {
                        next_due = batch.next_due;
                        look = batch.progressed || batch.deliveries.len() == want;
                        // With what other streams' leases handed this one
                        // meanwhile, in sequence order: those sent before
                        // this lease was answered may be a key's earlier
                        // messages, those sent after it its later ones.
                        let mut deliveries = self.routed_waiting();
                        let routed = deliveries.len();
                        deliveries.extend(batch.deliveries);
                        if !deliveries.is_empty() && !self.pass_on(deliveries, routed).await {
                            return self.abandon_all().await;
                        }
                    }
                    Err(e) => {
                        // Leasing failed on the broker's side: what the
                        // stream holds goes back without counting.
                        let _ = self.send(Err(e)).await;
                        return self.give_back_all().await;
                    }
                }
                if look {
                    // Take every ack that arrived meanwhile before leasing
                    // more: a stream with credit left would otherwise lease
                    // again and again while acks wait one per turn.
                    match commands.next().now_or_never() {
                        None => {}
                        Some(Some(Ok(command))) => match self.take(command, &mut commands).await {
                            Next::Go => {}
                            Next::Abandon => return self.abandon_all().await,
                            Next::GiveBack => return self.client_closed().await,
                        },
                        Some(Some(Err(e))) => {
                            self.fail(e).await;
                            return self.abandon_all().await;
                        }
                        Some(None) => return self.client_closed().await,
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
                    self.give_back_all().await;
                    let _ = self.send(Err(Error::Unavailable("the broker is shutting down; reconnect".into()))).await;
                    return;
                }
                command = commands.next() => match command {
                    Some(Ok(command)) => {
                        match self.take(command, &mut commands).await {
                            Next::Go => {}
                            Next::Abandon => return self.abandon_all().await,
                            Next::GiveBack => return self.client_closed().await,
                        }
                        look = true;
                    }
                    Some(Err(e)) => {
                        self.fail(e).await;
                        return self.abandon_all().await;
                    }
                    // The client closed its side: it ends the stream
                    // on purpose, and what it still holds goes back
                    // without counting.
                    None => return self.client_closed().await,
                },
                deliveries = handed(&mut self.route) => {
                    let mut deliveries = deliveries;
                    deliveries.extend(self.routed_waiting());
                    let routed = deliveries.len();
                    if !self.pass_on(deliveries, routed).await {
                        return self.abandon_all().await;
                    }
                }
                _ = topic_news.changed(), if has_credit => look = true,
                _ = sub_news.changed(), if has_credit => look = true,
                _ = tokio::time::sleep_until(instant_at(wake)) => look = true,
                _ = self.tx.closed() => return self.abandon_all().await,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::sync::{mpsc, watch};
    use tokio_stream::wrappers::UnboundedReceiverStream;

    use super::*;
    use crate::broker::Limits;
    use crate::model::{Delivery, LeaseExtension, NewMessage, SubscriptionSettings, TopicSettings};
    use crate::store::{NewSubscription, Store, StoreConfig};

    /// A broker over a fresh SQLite store with topic `t` and subscription
    /// `s` of `settings` from the earliest message; the drain signal comes
    /// back too (the broker drains once that sender is dropped).
    async fn topic_and_sub(
        dir: &tempfile::TempDir,
        settings: SubscriptionSettings,
    ) -> (Broker, Store, watch::Sender<bool>) {
        let store = Store::open(StoreConfig::new(dir.path())).await.unwrap();
        let (drain, draining) = watch::channel(false);
        let limits = Limits {
            poll_interval: Duration::from_millis(50),
            ..Limits::default()
        };
        let broker = Broker::new(store.clone(), limits, draining);
        broker
            .create_topic("t", TopicSettings::default())
            .await
            .unwrap();
        broker
            .create_subscription(NewSubscription {
                name: "s".into(),
                topic: "t".into(),
                settings,
                start: crate::model::StartPosition::Earliest,
            })
            .await
            .unwrap();
        (broker, store, drain)
    }

    /// A broker over a fresh SQLite store with one topic `t`, one message on
    /// it, and a subscription `s` from the earliest message whose leases last
    /// `ack_deadline`.
    /// The store and the drain signal come back too: the broker drains once
    /// that sender is dropped.
    async fn broker(
        dir: &tempfile::TempDir,
        ack_deadline: Duration,
    ) -> (Broker, Store, watch::Sender<bool>) {
        let settings = SubscriptionSettings {
            ack_deadline,
            min_backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(1),
            ..SubscriptionSettings::default()
        };
        let (broker, store, drain) = topic_and_sub(dir, settings).await;
        broker
            .publish(vec![NewMessage {
                id: uuid::Uuid::now_v7(),
                topic: "t".into(),
                key: None,
                payload: b"hello".to_vec(),
                attributes: Vec::new(),
                created_at: None,
            }])
            .await
            .unwrap();
        (broker, store, drain)
    }

    type Commands = mpsc::UnboundedSender<Result<SessionCommand>>;

    async fn open(broker: &Broker) -> (Commands, mpsc::Receiver<Result<SessionEvent>>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let events = broker
            .subscribe(
                "s",
                SessionCommand::default(),
                UnboundedReceiverStream::new(rx),
            )
            .await
            .unwrap();
        (tx, events)
    }

    fn ack(commands: &Commands, delivery: &Delivery) {
        let command = SessionCommand {
            acks: vec![delivery.ack_id.to_string()],
            ..SessionCommand::default()
        };
        commands.send(Ok(command)).unwrap();
    }

    async fn next(events: &mut mpsc::Receiver<Result<SessionEvent>>) -> SessionEvent {
        tokio::time::timeout(Duration::from_secs(10), events.recv())
            .await
            .expect("an event within 10 s")
            .expect("the session is running")
            .expect("no error")
    }

    #[tokio::test]
    async fn redelivers_after_lease_expires() {
        let dir = tempfile::tempdir().unwrap();
        let (broker, store, _drain) = broker(&dir, Duration::from_millis(100)).await;
        let (commands, mut events) = open(&broker).await;
        let first = next(&mut events).await.deliveries;
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].attempt, 1);
        // Not acked: the lease runs out, the session forgets it and leases
        // the message again.
        let again = next(&mut events).await.deliveries;
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].attempt, 2);
        assert_eq!(again[0].message.id, first[0].message.id);
        ack(&commands, &first[0]);
        let outcome = next(&mut events).await.outcomes.remove(0);
        assert!(matches!(outcome.status, AckStatus::Stale(_)), "{outcome:?}");
        ack(&commands, &again[0]);
        let outcome = next(&mut events).await.outcomes.remove(0);
        assert_eq!(outcome.status, AckStatus::Ok(None));
        drop(commands);
        store.close().await;
    }

    #[tokio::test]
    async fn an_extended_lease_outlives_its_first_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let (broker, store, _drain) = broker(&dir, Duration::from_millis(300)).await;
        let (commands, mut events) = open(&broker).await;
        let delivery = next(&mut events).await.deliveries.remove(0);
        commands
            .send(Ok(SessionCommand {
                extensions: vec![LeaseExtension {
                    ack_id: delivery.ack_id.to_string(),
                    extension: Duration::from_secs(30),
                }],
                ..SessionCommand::default()
            }))
            .unwrap();
        let outcome = next(&mut events).await.outcomes.remove(0);
        let AckStatus::Ok(Some(deadline)) = outcome.status else {
            panic!("extension refused: {outcome:?}");
        };
        assert!(deadline > delivery.lease_deadline);
        // Past the first deadline the lease still holds: the ack is taken.
        tokio::time::sleep(Duration::from_millis(500)).await;
        ack(&commands, &delivery);
        let outcome = next(&mut events).await.outcomes.remove(0);
        assert_eq!(outcome.status, AckStatus::Ok(None));
        drop(commands);
        store.close().await;
    }

    #[tokio::test]
    async fn acks_waiting_behind_each_other_are_committed_together() {
        let dir = tempfile::tempdir().unwrap();
        let (broker, store, _drain) = broker(&dir, Duration::from_secs(60)).await;
        let more = (0..99)
            .map(|i| NewMessage {
                id: uuid::Uuid::now_v7(),
                topic: "t".into(),
                key: None,
                payload: format!("m{i}").into_bytes(),
                attributes: Vec::new(),
                created_at: None,
            })
            .collect();
        broker.publish(more).await.unwrap();
        let (commands, mut events) = open(&broker).await;
        let mut leased = Vec::new();
        while leased.len() < 100 {
            leased.extend(next(&mut events).await.deliveries);
        }
        // A hundred requests of one ack each, all waiting when the session
        // looks: answered in one event, after one store call.
        for d in &leased {
            ack(&commands, d);
        }
        let event = next(&mut events).await;
        assert_eq!(event.outcomes.len(), 100, "one answer for all");
        assert!(
            event
                .outcomes
                .iter()
                .all(|o| o.status == AckStatus::Ok(None))
        );
        drop(commands);
        store.close().await;
    }

    fn keyed(key: &str) -> NewMessage {
        NewMessage {
            id: uuid::Uuid::now_v7(),
            topic: "t".into(),
            key: Some(key.into()),
            payload: key.as_bytes().to_vec(),
            attributes: Vec::new(),
            created_at: None,
        }
    }

    /// Waits until `count` messages of subscription `s` are leased.
    async fn in_flight(store: &Store, count: i64) {
        for _ in 0..1000 {
            if store.stats("s").await.unwrap().in_flight == count {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("{count} messages were not leased within 5 s");
    }

    #[tokio::test]
    async fn an_answer_comes_after_what_other_streams_leases_handed_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let settings = SubscriptionSettings {
            ordered: true,
            ..SubscriptionSettings::default()
        };
        let (broker, store, _drain) = topic_and_sub(&dir, settings).await;
        broker.publish(vec![keyed("k")]).await.unwrap();
        // A stream whose client reads nothing yet: its first event fills
        // the channel, so it stops sending its second.
        let sub = store.get_subscription("s").await.unwrap();
        let (tx, mut events) = mpsc::channel(1);
        let (commands, rx) = mpsc::unbounded_channel();
        let session = Session::new(broker.clone(), sub, tx);
        tokio::spawn(session.run(SessionCommand::default(), UnboundedReceiverStream::new(rx)));
        in_flight(&store, 1).await;
        broker.publish(vec![keyed("j")]).await.unwrap();
        in_flight(&store, 2).await;
        // Another stream's lease reads k's next message: it goes to the
        // stream holding k, which is busy sending.
        broker.publish(vec![keyed("k")]).await.unwrap();
        let other = store
            .lease_as("s", 10, 1 << 20, Some((Holder::new(), Vec::new())))
            .await
            .unwrap();
        assert!(other.deliveries.is_empty(), "{:?}", other.deliveries);
        in_flight(&store, 3).await;
        let first = next(&mut events).await.deliveries.remove(0);
        assert_eq!(first.message.key.as_deref(), Some("k"));
        // The client nacks k's first message: the broker reads the nack
        // after it handed k's second, whose lease the nack ended too, so
        // the stream sends that one before the answer.
        commands
            .send(Ok(SessionCommand {
                nacks: vec![crate::model::Nack {
                    ack_id: first.ack_id.to_string(),
                    delay: None,
                    reason: "failed".into(),
                }],
                ..SessionCommand::default()
            }))
            .unwrap();
        let mut seen = Vec::new();
        loop {
            let event = next(&mut events).await;
            seen.extend(event.deliveries.iter().map(|d| d.message.sequence));
            if !event.outcomes.is_empty() {
                assert_eq!(event.outcomes[0].status, AckStatus::Ok(None));
                break;
            }
        }
        assert_eq!(
            seen,
            vec![2, 3],
            "j's delivery and k's second, then the answer"
        );
        drop(commands);
        store.close().await;
    }

    #[tokio::test]
    async fn closing_the_stream_gives_its_leases_back_for_prompt_redelivery() {
        let dir = tempfile::tempdir().unwrap();
        let (broker, store, _drain) = broker(&dir, Duration::from_secs(60)).await;
        let (commands, mut events) = open(&broker).await;
        assert_eq!(next(&mut events).await.deliveries[0].attempt, 1);
        // The client closes its side on purpose: the session ends (its
        // sender is dropped) after giving the lease back, uncounted.
        drop(commands);
        assert!(events.recv().await.is_none());
        let (commands, mut events) = open(&broker).await;
        assert_eq!(next(&mut events).await.deliveries[0].attempt, 1);
        // The client goes away (its receiver dropped): far sooner than the
        // 60 s lease, the message comes again, and that attempt counted.
        drop(events);
        let (_more, mut events) = open(&broker).await;
        assert_eq!(next(&mut events).await.deliveries[0].attempt, 2);
        drop(commands);
        store.close().await;
    }
}

//! The load a fault scenario runs under: publishers on unary Publish and on
//! PublishStream, consumers on the Subscribe stream and on unary Pull and
//! Ack, each recording what it tried and what the broker confirmed in the
//! [`History`]; and the final drain that reads what the broker kept.
//!
//! Every call has a deadline, so a frozen broker or a cut link shows up as a
//! timeout, after which the task opens a new connection: clients recover by
//! themselves, as real ones must. Failed publishes are retried with the same
//! ids half of the time (publish is idempotent by id, G2).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use tidings::client::{
    self, Admin, Backoff, ConnectOptions, Connection, Event, FlowControl, Outgoing, Publisher,
    Subscriber,
};
use tidings::model::{
    AckOperation, Delivery, Micros, NewSubscription, StartPosition, SubscriptionSettings,
};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep, timeout};
use uuid::Uuid;

use super::checker::{History, payload_of};
use crate::harness::{Rng, ms};

/// The topic the load publishes to.
pub(crate) const TOPIC: &str = "load";
/// The subscription the load's consumers consume.
pub(crate) const CONSUMED: &str = "consumed";
/// A subscription nobody consumes during the run: at the end it must hold
/// every confirmed publish, once.
pub(crate) const WITNESS: &str = "witness";

/// The shape of the load.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LoadConfig {
    /// Tasks publishing with unary Publish.
    pub(crate) unary_publishers: u64,
    /// Tasks publishing on a PublishStream, pipelined.
    pub(crate) stream_publishers: u64,
    /// Consumers on the Subscribe stream: every other one acks what it
    /// has in one request, the others one ack per request.
    pub(crate) stream_consumers: u64,
    /// Consumers on unary Pull and Ack.
    pub(crate) pull_consumers: u64,
    /// Payload size in bytes.
    pub(crate) payload: usize,
    /// Deadline of each call.
    pub(crate) call_timeout: Duration,
    /// Seed of the tasks' random choices.
    pub(crate) seed: u64,
}

impl LoadConfig {
    /// Two publishers of each kind, two stream consumers and one pulling
    /// consumer: enough concurrency to interleave, light enough for two
    /// cores shared with the broker and other tests.
    pub(crate) fn new(seed: u64) -> LoadConfig {
        LoadConfig {
            unary_publishers: 2,
            stream_publishers: 2,
            stream_consumers: 2,
            pull_consumers: 1,
            payload: 64,
            call_timeout: Duration::from_secs(1),
            seed,
        }
    }
}

/// Counts the scenarios wait on.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Progress {
    /// Publish calls confirmed.
    pub(crate) confirmed: u64,
    /// Publish calls failed or timed out.
    pub(crate) failed: u64,
    /// Of those, the ones refused with an error (not timed out).
    pub(crate) refused: u64,
    /// Deliveries to the consumers.
    pub(crate) delivered: u64,
}

/// What every load task shares.
#[derive(Clone)]
struct Ctx {
    url: String,
    config: LoadConfig,
    history: Arc<History>,
    progress: Arc<watch::Sender<Progress>>,
    stop_publishing: watch::Receiver<bool>,
    stop_consuming: watch::Receiver<bool>,
}

impl Ctx {
    /// A new connection: after a timeout the old one may sit on a frozen
    /// link that nothing will ever reset.
    fn connect(&self) -> Connection {
        client::connect_with(
            &self.url,
            ConnectOptions {
                connect_timeout: self.config.call_timeout,
                tls: None,
                token: None,
            },
        )
        .expect("a broker URL")
    }

    fn publishing(&self) -> bool {
        !*self.stop_publishing.borrow()
    }

    fn consuming(&self) -> bool {
        !*self.stop_consuming.borrow()
    }

    fn batch(&self, ids: &[Uuid]) -> Vec<Outgoing> {
        ids.iter()
            .map(|id| Outgoing::new(TOPIC, payload_of(*id, self.config.payload)).with_id(*id))
            .collect()
    }

    fn confirmed(&self, ids: &[Uuid], outcomes: &[tidings::model::PublishOutcome]) {
        self.history.confirmed(ids, outcomes);
        self.progress.send_modify(|p| p.confirmed += 1);
    }

    fn failed(&self, kind: &str) {
        self.history.publish_failed(kind);
        self.progress.send_modify(|p| {
            p.failed += 1;
            if kind != "timeout" {
                p.refused += 1;
            }
        });
    }

    fn delivered(&self, d: &Delivery) {
        self.history.delivered(d);
        self.progress.send_modify(|p| p.delivered += 1);
    }
}

/// A fresh batch of 1 to 10 new ids.
fn fresh(rng: &mut Rng) -> Vec<Uuid> {
    (0..1 + rng.below(10)).map(|_| Uuid::now_v7()).collect()
}

/// The name of an error's kind, for the summary.
fn kind(e: &tidings::Error) -> &'static str {
    match e {
        tidings::Error::Unavailable(_) => "unavailable",
        tidings::Error::Storage(_) => "storage",
        tidings::Error::ResourceExhausted(_) => "resource_exhausted",
        _ => "other",
    }
}

/// The load's tasks. Stop it with [`Load::stop`]; dropping it aborts them.
pub(crate) struct Load {
    ctx: Ctx,
    stop_publishing: watch::Sender<bool>,
    stop_consuming: watch::Sender<bool>,
    publishers: Vec<JoinHandle<()>>,
    consumers: Vec<JoinHandle<()>>,
}

impl Drop for Load {
    fn drop(&mut self) {
        for task in self.publishers.iter().chain(&self.consumers) {
            task.abort();
        }
    }
}

impl Load {
    /// Creates the topic and both subscriptions through `url` (retrying
    /// while the broker is not ready), then starts the tasks.
    pub(crate) async fn start(url: &str, config: LoadConfig, history: Arc<History>) -> Load {
        set_up(url).await;
        let (stop_publishing, publishing_rx) = watch::channel(false);
        let (stop_consuming, consuming_rx) = watch::channel(false);
        let ctx = Ctx {
            url: url.to_owned(),
            config,
            history,
            progress: Arc::new(watch::channel(Progress::default()).0),
            stop_publishing: publishing_rx,
            stop_consuming: consuming_rx,
        };
        let mut publishers = Vec::new();
        let mut consumers = Vec::new();
        let mut seed = config.seed;
        let mut next_seed = || {
            seed = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
            seed
        };
        for _ in 0..config.unary_publishers {
            publishers.push(tokio::spawn(unary_publisher(ctx.clone(), next_seed())));
        }
        for _ in 0..config.stream_publishers {
            publishers.push(tokio::spawn(stream_publisher(ctx.clone(), next_seed())));
        }
        for c in 0..config.stream_consumers {
            let batch = c % 2 == 1;
            consumers.push(tokio::spawn(stream_consumer(
                ctx.clone(),
                next_seed(),
                batch,
            )));
        }
        for _ in 0..config.pull_consumers {
            consumers.push(tokio::spawn(pull_consumer(ctx.clone())));
        }
        Load {
            ctx,
            stop_publishing,
            stop_consuming,
            publishers,
            consumers,
        }
    }

    /// The counts so far, and a receiver to wait for later ones.
    pub(crate) fn progress(&self) -> watch::Receiver<Progress> {
        self.ctx.progress.subscribe()
    }

    /// Waits up to `patience` until `cond` holds of the counts; returns
    /// whether it did.
    pub(crate) async fn wait_for(
        &self,
        patience: Duration,
        cond: impl FnMut(&Progress) -> bool,
    ) -> bool {
        let mut progress = self.progress();
        timeout(patience, progress.wait_for(cond)).await.is_ok()
    }

    /// Stops publishing, waits for the publishers' last calls (each has a
    /// deadline), then stops the consumers, whose open leases the broker
    /// releases or lets expire.
    pub(crate) async fn stop(mut self) {
        self.stop_publishing.send_replace(true);
        for task in std::mem::take(&mut self.publishers) {
            task.await.expect("a publisher did not panic");
        }
        self.stop_consuming.send_replace(true);
        for task in std::mem::take(&mut self.consumers) {
            task.await.expect("a consumer did not panic");
        }
    }
}

/// Creates the topic, the consumed subscription (short leases and backoff,
/// so that leases of broken streams come back quickly; attempts enough
/// never to dead-letter) and the witness subscription.
async fn set_up(url: &str) {
    let connection = client::connect(url).expect("a broker URL");
    let admin = Admin::new(&connection);
    let consumed = SubscriptionSettings {
        ack_deadline: Duration::from_secs(2),
        max_attempts: 1000,
        min_backoff: ms(10),
        max_backoff: ms(200),
        ..SubscriptionSettings::default()
    };
    let witness = SubscriptionSettings {
        ack_deadline: Duration::from_secs(60),
        max_attempts: 1000,
        ..SubscriptionSettings::default()
    };
    let give_up = Instant::now() + super::PATIENCE;
    loop {
        let made = async {
            tolerate_existing(admin.create_topic(TOPIC).await.map(drop))?;
            for (name, settings) in [(CONSUMED, &consumed), (WITNESS, &witness)] {
                let sub = NewSubscription {
                    name: name.into(),
                    topic: TOPIC.into(),
                    settings: settings.clone(),
                    start: StartPosition::Earliest,
                };
                tolerate_existing(admin.create_subscription(sub).await.map(drop))?;
            }
            Ok::<(), tidings::Error>(())
        };
        match timeout(Duration::from_secs(5), made).await {
            Ok(Ok(())) => return,
            Ok(Err(e)) if !e.is_retryable() => panic!("set up the load's topic: {e}"),
            _ => {
                assert!(Instant::now() < give_up, "could not set up the topic");
                sleep(ms(100)).await;
            }
        }
    }
}

fn tolerate_existing(made: tidings::Result<()>) -> tidings::Result<()> {
    match made {
        Err(tidings::Error::AlreadyExists(_)) => Ok(()),
        other => other,
    }
}

/// A pause between calls: the load is paced, not a benchmark.
async fn pace(rng: &mut Rng) {
    sleep(ms(10 + rng.below(20))).await;
}

/// Publishes batches with unary Publish, one call at a time.
async fn unary_publisher(ctx: Ctx, seed: u64) {
    let mut rng = Rng::new(seed);
    let mut connection = ctx.connect();
    let mut retry: Option<Vec<Uuid>> = None;
    while ctx.publishing() {
        let ids = match retry.take() {
            Some(ids) if rng.below(2) == 0 => ids,
            _ => fresh(&mut rng),
        };
        ctx.history.attempted(&ids);
        let publisher = Publisher::new(&connection, Backoff::default());
        let batch = ctx.batch(&ids);
        match timeout(ctx.config.call_timeout, publisher.publish_once(&batch)).await {
            Ok(Ok(outcomes)) => ctx.confirmed(&ids, &outcomes),
            Ok(Err(e)) => {
                ctx.failed(kind(&e));
                retry = Some(ids);
            }
            Err(_) => {
                ctx.failed("timeout");
                retry = Some(ids);
                connection = ctx.connect();
            }
        }
        pace(&mut rng).await;
    }
}

/// How a publish stream ended.
enum StreamEnd {
    /// Publishing stopped and every batch was answered.
    Done,
    /// The stream failed; its unanswered batches are indeterminate.
    Broke,
    /// A call ran past its deadline: the link may be frozen.
    TimedOut,
}

/// Batches sent but not answered that a stream publisher may resend.
type Unanswered = VecDeque<Vec<Uuid>>;

/// Publishes batches on PublishStreams with up to four in flight; when a
/// stream breaks, opens another.
async fn stream_publisher(ctx: Ctx, seed: u64) {
    let mut rng = Rng::new(seed);
    let mut connection = ctx.connect();
    let mut unanswered = Unanswered::new();
    while ctx.publishing() {
        let publisher = Publisher::new(&connection, Backoff::default());
        let end = match timeout(ctx.config.call_timeout, publisher.stream(4)).await {
            Ok(Ok(session)) => one_stream(&ctx, session, &mut rng, &mut unanswered).await,
            Ok(Err(e)) => {
                ctx.failed(kind(&e));
                StreamEnd::Broke
            }
            Err(_) => {
                ctx.failed("timeout");
                StreamEnd::TimedOut
            }
        };
        match end {
            StreamEnd::Done => return,
            StreamEnd::Broke => pace(&mut rng).await,
            StreamEnd::TimedOut => connection = ctx.connect(),
        }
    }
}

/// Runs one publish stream until it breaks or publishing stops.
async fn one_stream(
    ctx: &Ctx,
    session: client::PublishSession,
    rng: &mut Rng,
    unanswered: &mut Unanswered,
) -> StreamEnd {
    const DEPTH: usize = 4;
    let (tx, mut rx) = session.split();
    let mut in_flight: VecDeque<Vec<Uuid>> = VecDeque::new();
    let end = loop {
        let mut sent_ok = true;
        while in_flight.len() < DEPTH && ctx.publishing() {
            let ids = match unanswered.pop_front() {
                Some(ids) if rng.below(2) == 0 => ids,
                _ => fresh(rng),
            };
            ctx.history.attempted(&ids);
            let sent = timeout(ctx.config.call_timeout, tx.send(ctx.batch(&ids))).await;
            in_flight.push_back(ids);
            match sent {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    ctx.failed(kind(&e));
                    sent_ok = false;
                    break;
                }
                Err(_) => {
                    ctx.failed("timeout");
                    sent_ok = false;
                    break;
                }
            }
        }
        if !sent_ok {
            break StreamEnd::Broke;
        }
        let Some(ids) = in_flight.front() else {
            break StreamEnd::Done;
        };
        match timeout(ctx.config.call_timeout, rx.next()).await {
            Ok(Ok(Some(outcomes))) => {
                ctx.confirmed(ids, &outcomes);
                in_flight.pop_front();
            }
            Ok(Ok(None)) => break StreamEnd::Broke,
            Ok(Err(e)) => {
                ctx.failed(kind(&e));
                break StreamEnd::Broke;
            }
            Err(_) => {
                ctx.failed("timeout");
                break StreamEnd::TimedOut;
            }
        }
        pace(rng).await;
    };
    // What was not answered is indeterminate; keep a few batches to resend.
    for ids in in_flight {
        unanswered.push_back(ids);
    }
    while unanswered.len() > 8 {
        unanswered.pop_front();
    }
    end
}

/// Consumes on a Subscribe stream, acking at once (one message in twenty is
/// nacked instead, to come back): one ack per request, or with `batch`,
/// one request for every delivery that is already there. A stream silent
/// for three call deadlines is taken for stalled and replaced on a new
/// connection.
async fn stream_consumer(ctx: Ctx, seed: u64, batch: bool) {
    let mut rng = Rng::new(seed);
    let stall = ctx.config.call_timeout * 3;
    let reconnect = Backoff {
        min: ms(50),
        max: ms(500),
        give_up_after: None,
    };
    let mut stop = ctx.stop_consuming.clone();
    while ctx.consuming() {
        let connection = ctx.connect();
        let flow = FlowControl {
            max_messages: 64,
            max_bytes: 1 << 20,
            ..FlowControl::default()
        };
        let mut sub = Subscriber::new(&connection, reconnect).subscribe(CONSUMED, flow);
        // Open leases by ack id: the message and the lease's first deadline.
        let mut leases: HashMap<String, (Uuid, Micros)> = HashMap::new();
        let mut ended = false;
        while !ended {
            let first = tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                event = timeout(stall, sub.next()) => event,
            };
            // Stalled, ended, or refused for good: start over.
            let Ok(Some(Ok(first))) = first else {
                break;
            };
            let mut acks = Vec::new();
            let mut next = Some(first);
            while let Some(event) = next.take() {
                match event {
                    Event::Message(d) => {
                        ctx.delivered(&d);
                        let ack_id = d.ack_id.to_string();
                        if rng.below(20) == 0 {
                            ctx.history.nack_sent();
                            sub.nack(ack_id, Some(ms(10)), "a fault test's nack");
                        } else {
                            ctx.history.ack_sent(d.message.id);
                            leases.insert(ack_id.clone(), (d.message.id, d.lease_deadline));
                            acks.push(ack_id);
                        }
                    }
                    Event::Outcome(o) => {
                        if o.operation == AckOperation::Ack
                            && let Some((id, deadline)) = leases.remove(&o.ack_id)
                        {
                            ctx.history.ack_answered(id, &o.ack_id, deadline, &o.status);
                        }
                    }
                    Event::Malformed { reason, .. } => ctx.history.malformed(&reason),
                }
                if !batch {
                    break;
                }
                match sub.next().now_or_never() {
                    Some(Some(Ok(event))) => next = Some(event),
                    Some(_) => ended = true,
                    None => {}
                }
            }
            if !acks.is_empty() {
                sub.ack(acks);
            }
        }
        pace(&mut rng).await;
    }
}

/// Consumes with unary Pull and Ack.
async fn pull_consumer(ctx: Ctx) {
    let mut connection = ctx.connect();
    let deadline = ctx.config.call_timeout;
    let mut rng = Rng::new(ctx.config.seed);
    while ctx.consuming() {
        let subscriber = Subscriber::new(&connection, Backoff::default());
        let got = match timeout(deadline, subscriber.pull(CONSUMED, 32, ms(100))).await {
            Ok(Ok(got)) => got,
            Ok(Err(_)) => {
                pace(&mut rng).await;
                continue;
            }
            Err(_) => {
                connection = ctx.connect();
                continue;
            }
        };
        if got.is_empty() {
            continue;
        }
        for d in &got {
            ctx.delivered(d);
            ctx.history.ack_sent(d.message.id);
        }
        let ack_ids = got.iter().map(|d| d.ack_id.to_string()).collect();
        match timeout(deadline, subscriber.ack(CONSUMED, ack_ids)).await {
            Ok(Ok(outcomes)) => {
                for (d, o) in got.iter().zip(&outcomes) {
                    ctx.history
                        .ack_answered(d.message.id, &o.ack_id, d.lease_deadline, &o.status);
                }
            }
            Ok(Err(_)) => pace(&mut rng).await,
            Err(_) => connection = ctx.connect(),
        }
    }
}

/// Reads everything the broker kept, once every fault is healed: drains the
/// consumed subscription and the witness with fresh consumers (unary Pull,
/// acking all, until the subscription's backlog is zero) and lists the dead
/// letters.
pub(crate) async fn drain(url: &str, history: &History) {
    let connection = client::connect(url).expect("a broker URL");
    let subscriber = Subscriber::new(&connection, Backoff::default());
    let admin = Admin::new(&connection);
    let give_up = Instant::now() + super::PATIENCE * 3;
    drain_one(&subscriber, &admin, CONSUMED, give_up, |d| {
        history.drained(d)
    })
    .await;
    drain_one(&subscriber, &admin, WITNESS, give_up, |d| {
        history.witnessed(d)
    })
    .await;
    let dead = loop {
        match timeout(Duration::from_secs(5), admin.list_dead_letters(CONSUMED)).await {
            Ok(Ok(dead)) => break dead,
            _ => {
                assert!(Instant::now() < give_up, "could not list the dead letters");
                sleep(ms(100)).await;
            }
        }
    };
    for d in dead {
        history.dead_lettered(d.message.id);
    }
}

async fn drain_one(
    subscriber: &Subscriber,
    admin: &Admin,
    sub: &str,
    give_up: Instant,
    record: impl Fn(&Delivery),
) {
    loop {
        assert!(
            Instant::now() < give_up,
            "the drain of {sub} did not finish: {:?}",
            admin.stats(sub).await
        );
        let got = match timeout(Duration::from_secs(5), subscriber.pull(sub, 1000, ms(200))).await {
            Ok(Ok(got)) => got,
            _ => {
                sleep(ms(100)).await;
                continue;
            }
        };
        if got.is_empty() {
            // Leases of stopped consumers still count in the backlog until
            // they are released or expire.
            match timeout(Duration::from_secs(5), admin.stats(sub)).await {
                Ok(Ok(stats)) if stats.backlog == 0 => return,
                _ => continue,
            }
        }
        for d in &got {
            record(d);
        }
        // The ack must be answered, or the messages would come back and be
        // counted twice; a repeat of an ack that was committed answers
        // UNKNOWN, which is as good.
        let ack_ids: Vec<String> = got.iter().map(|d| d.ack_id.to_string()).collect();
        loop {
            assert!(
                Instant::now() < give_up,
                "the drain's acks were not answered"
            );
            match timeout(Duration::from_secs(5), subscriber.ack(sub, ack_ids.clone())).await {
                Ok(Ok(_)) => break,
                _ => sleep(ms(100)).await,
            }
        }
    }
}

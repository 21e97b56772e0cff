//! `tidings bench`: publish and consume through a broker (an embedded one on a
//! temporary data directory unless a URL is given) and report throughput and
//! latency, in the spirit of `nats bench`. With an inbox URL the subscribers
//! are consumer runtimes with a trivial handler, each message recorded in the
//! inbox of that database.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hdrhistogram::Histogram;
use tokio::sync::Mutex;
use tokio::time::Instant;
use uuid::Uuid;

use tidings::client::{
    self, Admin, Backoff, Connection, Event, FlowControl, Outgoing, Publisher, Subscriber,
};
use tidings::consumer::{BatchIsolation, Consumer, ConsumerConfig, Handler, Monitor};
use tidings::inbox::{Inbox, InboxDatabase};
use tidings::model::{AckStatus, Delivery, StartPosition, SubscriptionSettings};
use tidings::server::{self, ServerConfig};
use tidings::store::NewSubscription;

/// What to run.
#[derive(Debug, Clone)]
pub(crate) struct BenchConfig {
    /// Broker URLs, comma-separated (several instances on one database:
    /// publisher `i` uses URL `i`, subscriber `j` URL `j + 1`, round robin,
    /// so that deliveries cross instances); `None` starts an embedded broker.
    pub(crate) broker: Option<String>,
    /// How to reach `broker`: TLS, token (the global flags).
    pub(crate) connect: client::ConnectOptions,
    /// Publishing tasks, each with its own stream.
    pub(crate) publishers: usize,
    /// Consuming tasks, all on one subscription.
    pub(crate) subscribers: usize,
    /// Messages in all.
    pub(crate) messages: u64,
    /// Payload size in bytes.
    pub(crate) payload_size: usize,
    /// Messages per publish request.
    pub(crate) batch_size: usize,
    /// Requests each publisher keeps in flight.
    pub(crate) pipeline: usize,
    /// Total publish rate in messages per second (`None`: as fast as it goes).
    pub(crate) rate: Option<u64>,
    /// Fsync every commit on the embedded broker.
    pub(crate) fsync: bool,
    /// Consume through the inbox of this database (`sqlite://PATH` or
    /// `postgres://...`): each subscriber is a [`Consumer`] with a trivial
    /// handler. `None`: plain subscribers that ack at once.
    pub(crate) inbox_url: Option<String>,
    /// Inbox transactions running at once in each inbox consumer.
    pub(crate) inbox_concurrency: usize,
    /// Most deliveries in one inbox transaction.
    pub(crate) inbox_max_batch: usize,
    /// Deliveries each inbox consumer holds beyond those full batches take.
    pub(crate) inbox_prefetch: usize,
    /// Every delivery of an inbox batch in its own savepoint
    /// ([`BatchIsolation::Savepoints`]) instead of optimistic batches.
    pub(crate) inbox_savepoints: bool,
    /// Ordering keys the messages cycle through (0: no keys).
    pub(crate) keys: usize,
    /// Make the subscription ordered (a key in flight on one stream at a time).
    pub(crate) ordered: bool,
    /// Most unacked messages each plain subscriber holds (its flow control).
    pub(crate) window: i32,
    /// Publish every message first and start the subscribers only then, so
    /// that consumption starts with the whole backlog waiting; the
    /// end-to-end figure is then the consumption rate.
    pub(crate) backlog: bool,
}

impl Default for BenchConfig {
    fn default() -> Self {
        BenchConfig {
            broker: None,
            connect: client::ConnectOptions::default(),
            publishers: 4,
            subscribers: 0,
            messages: 200_000,
            payload_size: 256,
            batch_size: 100,
            pipeline: 8,
            rate: None,
            fsync: true,
            inbox_url: None,
            inbox_concurrency: ConsumerConfig::default().concurrency,
            inbox_max_batch: ConsumerConfig::default().max_batch,
            inbox_prefetch: ConsumerConfig::default().prefetch,
            inbox_savepoints: false,
            keys: 0,
            ordered: false,
            window: 2000,
            backlog: false,
        }
    }
}

/// What was measured.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct BenchReport {
    /// Messages published.
    pub(crate) messages: u64,
    /// Publish throughput (messages acked by the broker per second).
    pub(crate) publish_msgs_per_sec: f64,
    /// End-to-end throughput (published, delivered and acked per second);
    /// zero without subscribers.
    pub(crate) e2e_msgs_per_sec: f64,
    /// Publish→broker-ack latency, median, ms.
    pub(crate) publish_ack_p50_ms: f64,
    /// Publish→broker-ack latency, 99th percentile, ms.
    pub(crate) publish_ack_p99_ms: f64,
    /// Publish→delivery latency, median, ms.
    pub(crate) e2e_p50_ms: f64,
    /// Publish→delivery latency, 99th percentile, ms.
    pub(crate) e2e_p99_ms: f64,
    /// Deliveries beyond the first per message (redeliveries).
    pub(crate) redelivered: u64,
}

impl BenchReport {
    /// One JSON object.
    pub(crate) fn to_json(&self) -> String {
        format!(
            "{{\"messages\":{},\"publish_msgs_per_sec\":{:.0},\"e2e_msgs_per_sec\":{:.0},\
             \"publish_ack_p50_ms\":{:.3},\"publish_ack_p99_ms\":{:.3},\"e2e_p50_ms\":{:.3},\
             \"e2e_p99_ms\":{:.3},\"redelivered\":{}}}",
            self.messages,
            self.publish_msgs_per_sec,
            self.e2e_msgs_per_sec,
            self.publish_ack_p50_ms,
            self.publish_ack_p99_ms,
            self.e2e_p50_ms,
            self.e2e_p99_ms,
            self.redelivered
        )
    }
}

impl std::fmt::Display for BenchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "messages:            {}", self.messages)?;
        writeln!(
            f,
            "publish:             {:.0} msgs/s",
            self.publish_msgs_per_sec
        )?;
        writeln!(
            f,
            "publish→ack:         p50 {:.2} ms, p99 {:.2} ms",
            self.publish_ack_p50_ms, self.publish_ack_p99_ms
        )?;
        if self.e2e_msgs_per_sec > 0.0 {
            writeln!(
                f,
                "end to end:          {:.0} msgs/s",
                self.e2e_msgs_per_sec
            )?;
            writeln!(
                f,
                "publish→delivery:    p50 {:.2} ms, p99 {:.2} ms",
                self.e2e_p50_ms, self.e2e_p99_ms
            )?;
            writeln!(f, "redelivered:         {}", self.redelivered)?;
        }
        Ok(())
    }
}

pub(crate) fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("static histogram bounds are valid")
}

pub(crate) fn ms(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

/// Runs the benchmark.
///
/// Fails if the embedded broker cannot start, or a publish or the
/// subscription fails for good.
pub(crate) async fn run(config: BenchConfig) -> anyhow::Result<BenchReport> {
    anyhow::ensure!(config.publishers > 0, "--publishers must be at least 1");
    anyhow::ensure!(config.batch_size > 0, "--batch-size must be at least 1");
    let mut embedded = None;
    let url = match &config.broker {
        Some(url) => url.clone(),
        None => {
            let broker = Embedded::start(config.fsync).await?;
            let url = broker.url.clone();
            embedded = Some(broker);
            url
        }
    };
    let connections = url
        .split(',')
        .map(|u| client::connect_with(u.trim(), config.connect.clone()))
        .collect::<Result<Vec<_>, _>>()?;
    let admin = Admin::new(&connections[0]);
    let name = format!("bench-{}", &Uuid::new_v4().simple().to_string()[..8]);
    admin.create_topic(&name).await?;
    if config.subscribers > 0 {
        admin
            .create_subscription(NewSubscription {
                name: name.clone(),
                topic: name.clone(),
                settings: SubscriptionSettings {
                    ordered: config.ordered,
                    ..Default::default()
                },
                start: StartPosition::Earliest,
            })
            .await?;
    }
    let origin = Instant::now();
    let report = measure(&config, &connections, &name, origin).await;
    if let Some(broker) = embedded {
        broker.stop().await;
    }
    report
}

/// A broker the bench runs in process on a temporary data directory.
pub(crate) struct Embedded {
    pub(crate) url: String,
    dir: tempfile::TempDir,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<tidings::Result<()>>,
}

impl Embedded {
    /// Starts it on 127.0.0.1 and a free port.
    pub(crate) async fn start(fsync: bool) -> anyhow::Result<Embedded> {
        let dir = tempfile::tempdir()?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let mut server_config = ServerConfig::new(dir.path());
        server_config.store.fsync = fsync;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(server::run(listener, server_config, async move {
            let _ = stopped.await;
        }));
        Ok(Embedded {
            url: format!("http://{addr}"),
            dir,
            stop,
            task,
        })
    }

    /// Stops it and removes its data.
    pub(crate) async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
        drop(self.dir);
    }
}

async fn measure(
    config: &BenchConfig,
    connections: &[Connection],
    name: &str,
    origin: Instant,
) -> anyhow::Result<BenchReport> {
    let e2e = Arc::new(Mutex::new(histogram()));
    let acked = Arc::new(AtomicU64::new(0));
    let redelivered = Arc::new(AtomicU64::new(0));
    let total = config.messages;
    let counters = (e2e.clone(), acked.clone(), redelivered.clone());
    let mut consuming = if config.backlog {
        None
    } else {
        Some(start_consumers(config, connections, name, origin, &counters).await?)
    };

    let start = Instant::now();
    let publish_hist = Arc::new(Mutex::new(histogram()));
    let mut producers = Vec::new();
    for p in 0..config.publishers {
        let share = total / config.publishers as u64
            + u64::from((p as u64) < total % config.publishers as u64);
        let publisher = Publisher::new(&connections[p % connections.len()], Backoff::default());
        let config = config.clone();
        let name = name.to_owned();
        let hist = publish_hist.clone();
        producers.push(tokio::spawn(async move {
            produce(publisher, &config, &name, share, origin, hist).await
        }));
    }
    for p in producers {
        p.await??;
    }
    let publish_secs = start.elapsed().as_secs_f64();
    // With a backlog, the subscribers start now and the end-to-end figure
    // is the consumption rate of the messages waiting.
    let mut consume_start = start;
    if consuming.is_none() {
        if config.subscribers > 0 {
            // A mark for whoever measures the broker from outside: from
            // here on it only delivers.
            tracing::info!(messages = total, "backlog published; consuming");
        }
        consume_start = Instant::now();
        consuming = Some(start_consumers(config, connections, name, origin, &counters).await?);
    }
    if let Some((consumers, inbox_consumers)) = consuming {
        for c in consumers {
            c.await??;
        }
        if let Some(running) = inbox_consumers {
            redelivered.store(running.finish(total).await?, Ordering::Relaxed);
        }
    }
    let e2e_secs = consume_start.elapsed().as_secs_f64();
    let publish_hist = publish_hist.lock().await;
    let e2e = e2e.lock().await;
    let consumed = config.subscribers > 0;
    Ok(BenchReport {
        messages: total,
        publish_msgs_per_sec: total as f64 / publish_secs,
        e2e_msgs_per_sec: if consumed {
            total as f64 / e2e_secs
        } else {
            0.0
        },
        publish_ack_p50_ms: ms(&publish_hist, 0.5),
        publish_ack_p99_ms: ms(&publish_hist, 0.99),
        e2e_p50_ms: if consumed { ms(&e2e, 0.5) } else { 0.0 },
        e2e_p99_ms: if consumed { ms(&e2e, 0.99) } else { 0.0 },
        redelivered: redelivered.load(Ordering::Relaxed),
    })
}

/// Consuming tasks: plain subscribers, or inbox consumers with `--inbox-url`.
type Consuming = (
    Vec<tokio::task::JoinHandle<anyhow::Result<()>>>,
    Option<InboxConsumers>,
);

/// The shared counters of the consuming tasks: publish→delivery latency,
/// confirmed acks, redeliveries.
type Counters = (Arc<Mutex<Histogram<u64>>>, Arc<AtomicU64>, Arc<AtomicU64>);

/// Starts the subscribers on subscription `name`.
///
/// Fails if the inbox database cannot be opened or migrated.
async fn start_consumers(
    config: &BenchConfig,
    connections: &[Connection],
    name: &str,
    origin: Instant,
    (e2e, acked, redelivered): &Counters,
) -> anyhow::Result<Consuming> {
    let total = config.messages;
    let mut consumers = Vec::new();
    let inbox_consumers = match &config.inbox_url {
        Some(url) if config.subscribers > 0 => {
            Some(start_inbox(config, url, connections, name, origin, e2e.clone()).await?)
        }
        _ => None,
    };
    let plain_subscribers = if inbox_consumers.is_some() {
        0
    } else {
        config.subscribers
    };
    for s in 0..plain_subscribers {
        let connection = &connections[(s + 1) % connections.len()];
        let subscriber = Subscriber::new(connection, Backoff::default());
        let name = name.to_owned();
        let window = config.window;
        let (e2e, acked, redelivered) = (e2e.clone(), acked.clone(), redelivered.clone());
        consumers.push(tokio::spawn(async move {
            consume(
                subscriber,
                &name,
                window,
                origin,
                total,
                e2e,
                acked,
                redelivered,
            )
            .await
        }));
    }
    Ok((consumers, inbox_consumers))
}

/// Starts `config.subscribers` inbox consumers on subscription `name`, each
/// recording its deliveries in the inbox of `url` with the [`Trivial`]
/// handler, which reads a stamp (nanoseconds since `origin`) from the first
/// 8 bytes of each payload into `e2e`.
///
/// Fails for a URL of another kind, or if the inbox cannot be opened or
/// migrated.
pub(crate) async fn start_inbox(
    config: &BenchConfig,
    url: &str,
    connections: &[Connection],
    name: &str,
    origin: Instant,
    e2e: Arc<Mutex<Histogram<u64>>>,
) -> anyhow::Result<InboxConsumers> {
    if url.starts_with("sqlite:") {
        inbox_consumers::<sqlx::Sqlite>(config, url, connections, name, origin, e2e).await
    } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
        inbox_consumers::<sqlx::Postgres>(config, url, connections, name, origin, e2e).await
    } else {
        anyhow::bail!("--inbox-url must start with sqlite: or postgres:")
    }
}

async fn produce(
    publisher: Publisher,
    config: &BenchConfig,
    topic: &str,
    count: u64,
    origin: Instant,
    hist: Arc<Mutex<Histogram<u64>>>,
) -> anyhow::Result<()> {
    let session = publisher.stream(config.pipeline).await?;
    let (tx, mut responses) = session.split();
    let batches = count.div_ceil(config.batch_size as u64);
    let (sent_tx, mut sent_rx) =
        tokio::sync::mpsc::channel::<(Instant, usize)>(config.pipeline.max(1) * 2);
    // Results come back in order; pair each with its send time.
    let reader = tokio::spawn(async move {
        let mut local = histogram();
        while let Some((sent, n)) = sent_rx.recv().await {
            let results = responses
                .next()
                .await?
                .ok_or_else(|| anyhow::anyhow!("publish stream ended early"))?;
            anyhow::ensure!(results.len() == n, "short publish answer");
            let us = sent.elapsed().as_micros() as u64;
            local.record_n(us.max(1), n as u64)?;
        }
        hist.lock().await.add(&local)?;
        anyhow::Ok(())
    });
    let per_publisher_rate = config.rate.map(|r| r as f64 / config.publishers as f64);
    let start = Instant::now();
    let mut sent = 0u64;
    for _ in 0..batches {
        let n = (count - sent).min(config.batch_size as u64) as usize;
        if let Some(rate) = per_publisher_rate {
            let due = start + Duration::from_secs_f64(sent as f64 / rate);
            tokio::time::sleep_until(due).await;
        }
        let stamp = (origin.elapsed().as_nanos() as u64).to_le_bytes();
        let mut payload = vec![0u8; config.payload_size];
        let len = stamp.len().min(payload.len());
        payload[..len].copy_from_slice(&stamp[..len]);
        let messages: Vec<Outgoing> = (0..n)
            .map(|i| {
                let m = Outgoing::new(topic, payload.clone());
                match config.keys {
                    0 => m,
                    keys => m.with_key(format!("k{}", (sent as usize + i) % keys)),
                }
            })
            .collect();
        sent_tx.send((Instant::now(), n)).await?;
        tx.send(messages).await?;
        sent += n as u64;
    }
    drop(sent_tx);
    drop(tx);
    reader.await?
}

#[allow(clippy::too_many_arguments)]
async fn consume(
    subscriber: Subscriber,
    name: &str,
    window: i32,
    origin: Instant,
    total: u64,
    e2e: Arc<Mutex<Histogram<u64>>>,
    acked: Arc<AtomicU64>,
    redelivered: Arc<AtomicU64>,
) -> anyhow::Result<()> {
    let flow = FlowControl {
        max_messages: window.max(1),
        ..Default::default()
    };
    let mut sub = subscriber.subscribe(name, flow);
    let mut local = histogram();
    let mut pending = Vec::new();
    let mut flush = tokio::time::interval(Duration::from_millis(2));
    loop {
        if acked.load(Ordering::Relaxed) >= total {
            break;
        }
        tokio::select! {
            event = sub.next() => match event {
                Some(Ok(Event::Message(m))) => {
                    if m.attempt > 1 {
                        redelivered.fetch_add(1, Ordering::Relaxed);
                    }
                    if let Some(bytes) = m.message.payload.get(..8) {
                        let mut stamp = [0u8; 8];
                        stamp.copy_from_slice(bytes);
                        let sent = u64::from_le_bytes(stamp);
                        let now = origin.elapsed().as_nanos() as u64;
                        local.record((now.saturating_sub(sent) / 1000).max(1))?;
                    }
                    pending.push(m.ack_id.to_string());
                    if pending.len() >= 500 {
                        sub.ack(std::mem::take(&mut pending));
                    }
                }
                Some(Ok(Event::Malformed { ack_id, reason })) => {
                    sub.nack(ack_id, None, reason);
                }
                Some(Ok(Event::Outcome(o))) => {
                    if matches!(o.status, AckStatus::Ok(_)) {
                        acked.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Some(Err(s)) => return Err(s.into()),
                None => anyhow::bail!("subscription ended"),
            },
            _ = flush.tick() => {
                if !pending.is_empty() {
                    sub.ack(std::mem::take(&mut pending));
                }
                if acked.load(Ordering::Relaxed) >= total {
                    break;
                }
            }
        }
    }
    e2e.lock().await.add(&local)?;
    Ok(())
}

/// Inbox consumers running for the bench.
pub(crate) struct InboxConsumers {
    monitors: Vec<Monitor>,
    stops: Vec<tokio::sync::oneshot::Sender<()>>,
    tasks: Vec<tokio::task::JoinHandle<tidings::Result<tidings::consumer::ConsumerStats>>>,
}

impl InboxConsumers {
    /// Waits until `total` acks are confirmed, stops the consumers, and
    /// returns how many deliveries they received beyond one per message.
    pub(crate) async fn finish(self, total: u64) -> anyhow::Result<u64> {
        // Polling the monitors every few ms adds at most that much to a run
        // of seconds.
        let mut tick = tokio::time::interval(Duration::from_millis(5));
        loop {
            let acked: u64 = self.monitors.iter().map(|m| m.stats().acked).sum();
            if acked >= total {
                break;
            }
            if self.tasks.iter().any(|t| t.is_finished()) {
                anyhow::bail!("an inbox consumer ended early");
            }
            tick.tick().await;
        }
        for stop in self.stops {
            let _ = stop.send(());
        }
        let mut received = 0;
        for task in self.tasks {
            received += task.await??.received;
        }
        Ok(received.saturating_sub(total))
    }
}

/// The bench's handler: records publish→handler latency, writes nothing
/// besides the inbox row.
struct Trivial {
    origin: Instant,
    e2e: Arc<Mutex<Histogram<u64>>>,
}

impl<DB: InboxDatabase> Handler<DB> for Trivial {
    type Error = String;

    async fn handle(
        &self,
        delivery: &Delivery,
        _tx: &mut sqlx::Transaction<'static, DB>,
    ) -> Result<(), String> {
        if let Some(stamp) = delivery.message.payload.get(..8) {
            let mut bytes = [0u8; 8];
            bytes.copy_from_slice(stamp);
            let sent = u64::from_le_bytes(bytes);
            let now = self.origin.elapsed().as_nanos() as u64;
            // A value past the histogram's bounds is left out, not fatal.
            let _ = self
                .e2e
                .lock()
                .await
                .record((now.saturating_sub(sent) / 1000).max(1));
        }
        Ok(())
    }
}

async fn inbox_consumers<DB: InboxDatabase>(
    config: &BenchConfig,
    url: &str,
    connections: &[Connection],
    name: &str,
    origin: Instant,
    e2e: Arc<Mutex<Histogram<u64>>>,
) -> anyhow::Result<InboxConsumers> {
    let inbox = Inbox::<DB>::connect(url).await?;
    inbox.migrate().await?;
    let mut running = InboxConsumers {
        monitors: Vec::new(),
        stops: Vec::new(),
        tasks: Vec::new(),
    };
    for s in 0..config.subscribers {
        let consumer = Consumer::new(
            &connections[(s + 1) % connections.len()],
            name,
            inbox.clone(),
            Trivial {
                origin,
                e2e: e2e.clone(),
            },
            ConsumerConfig {
                concurrency: config.inbox_concurrency.max(1),
                max_batch: config.inbox_max_batch.max(1),
                prefetch: config.inbox_prefetch,
                isolation: if config.inbox_savepoints {
                    BatchIsolation::Savepoints
                } else {
                    BatchIsolation::default()
                },
                ..ConsumerConfig::default()
            },
        );
        running.monitors.push(consumer.monitor());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        running.stops.push(stop);
        running.tasks.push(tokio::spawn(consumer.run(async move {
            let _ = stopped.await;
        })));
    }
    Ok(running)
}

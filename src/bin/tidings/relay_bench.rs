//! `tidings bench --outbox-url`: the producer side measured end to end, from
//! the application's commit to the broker's durable ack, through the relay;
//! with `--inbox-url` as well, the whole pipeline, from the commit to the
//! consumer's handler.
//!
//! Without a rate it measures relay throughput: writers fill the outbox first,
//! then a relay drains it. With `--rate` (commits per second) the relay runs
//! while writers commit, and each message's commit→broker-ack latency is
//! recorded. The whole pipeline runs everything at once: writers commit (at
//! the rate, if one is given), the library relay publishes, and inbox
//! consumers (the consumer runtime) process; each payload carries the time
//! of its enqueue, which the handler turns into commit→processed latency.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use hdrhistogram::Histogram;
use sqlx::Pool;
use tokio::time::Instant;
use uuid::Uuid;

use tidings::client::{self, Admin};
use tidings::outbox::{self, Message, Outbox, OutboxDatabase, Relay, RelayConfig};

use crate::bench::{self, BenchConfig, Embedded, histogram, ms};
use tidings::model::{StartPosition, SubscriptionSettings};
use tidings::store::NewSubscription;

/// What to run.
#[derive(Debug, Clone)]
pub(crate) struct RelayBenchConfig {
    /// Broker URL; `None` starts an embedded one.
    pub(crate) broker: Option<String>,
    /// The application database for the outbox (it must hold no pending
    /// rows).
    pub(crate) outbox_url: String,
    /// Writer tasks, each committing its own transactions.
    pub(crate) writers: usize,
    /// Messages in all.
    pub(crate) messages: u64,
    /// Payload size in bytes.
    pub(crate) payload_size: usize,
    /// Messages per transaction.
    pub(crate) per_commit: usize,
    /// Commits per second in all; `None` measures throughput instead.
    pub(crate) rate: Option<u64>,
    /// Wake the relay with NOTIFY (PostgreSQL); `false` polls only.
    pub(crate) listen: bool,
    /// The relay's poll interval.
    pub(crate) poll_interval: Duration,
    /// The relay's batch size.
    pub(crate) relay_batch: usize,
    /// Batches the relay keeps in flight.
    pub(crate) relay_pipeline: usize,
    /// Fsync every commit on the embedded broker.
    pub(crate) fsync: bool,
    /// Ordering keys the messages cycle through (0: no keys).
    pub(crate) keys: usize,
    /// The whole pipeline: consume through the inbox of this database.
    pub(crate) inbox: Option<InboxSide>,
}

/// The consumers of the whole pipeline.
#[derive(Debug, Clone)]
pub(crate) struct InboxSide {
    /// The consumer's database (`sqlite://PATH` or `postgres://...`).
    pub(crate) url: String,
    /// Consumer runtimes on the one subscription.
    pub(crate) subscribers: usize,
    /// Handlers running at once in each.
    pub(crate) concurrency: usize,
    /// Deliveries each holds beyond those being handled.
    pub(crate) prefetch: usize,
    /// Every delivery of a batch in its own savepoint.
    pub(crate) savepoints: bool,
    /// Make the subscription ordered.
    pub(crate) ordered: bool,
}

/// What was measured.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct RelayBenchReport {
    /// Messages relayed.
    pub(crate) messages: u64,
    /// Rows per second the writers committed.
    pub(crate) commit_msgs_per_sec: f64,
    /// Rows per second from the outbox to the broker's ack.
    pub(crate) relay_msgs_per_sec: f64,
    /// Commit→broker-ack latency, median, ms (only with a rate).
    pub(crate) commit_ack_p50_ms: f64,
    /// Commit→broker-ack latency, 99th percentile, ms (only with a rate).
    pub(crate) commit_ack_p99_ms: f64,
    /// Commit→broker-ack latency, maximum, ms (only with a rate).
    pub(crate) commit_ack_max_ms: f64,
    /// Whole pipeline: messages per second from the first commit to the
    /// last processed (zero otherwise).
    pub(crate) e2e_msgs_per_sec: f64,
    /// Whole pipeline: commit→processed latency, median, ms.
    pub(crate) e2e_p50_ms: f64,
    /// Whole pipeline: commit→processed latency, 99th percentile, ms.
    pub(crate) e2e_p99_ms: f64,
    /// Whole pipeline: commit→processed latency, maximum, ms.
    pub(crate) e2e_max_ms: f64,
    /// Whole pipeline: deliveries beyond the first per message.
    pub(crate) redelivered: u64,
}

impl RelayBenchReport {
    /// One JSON object.
    pub(crate) fn to_json(&self) -> String {
        format!(
            "{{\"messages\":{},\"commit_msgs_per_sec\":{:.0},\"relay_msgs_per_sec\":{:.0},\
             \"commit_ack_p50_ms\":{:.3},\"commit_ack_p99_ms\":{:.3},\"commit_ack_max_ms\":{:.3},\
             \"e2e_msgs_per_sec\":{:.0},\"e2e_p50_ms\":{:.3},\"e2e_p99_ms\":{:.3},\
             \"e2e_max_ms\":{:.3},\"redelivered\":{}}}",
            self.messages,
            self.commit_msgs_per_sec,
            self.relay_msgs_per_sec,
            self.commit_ack_p50_ms,
            self.commit_ack_p99_ms,
            self.commit_ack_max_ms,
            self.e2e_msgs_per_sec,
            self.e2e_p50_ms,
            self.e2e_p99_ms,
            self.e2e_max_ms,
            self.redelivered
        )
    }
}

impl std::fmt::Display for RelayBenchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "messages:            {}", self.messages)?;
        writeln!(
            f,
            "committed:           {:.0} msgs/s",
            self.commit_msgs_per_sec
        )?;
        if self.relay_msgs_per_sec > 0.0 {
            writeln!(
                f,
                "relayed:             {:.0} msgs/s",
                self.relay_msgs_per_sec
            )?;
        }
        if self.commit_ack_p99_ms > 0.0 {
            writeln!(
                f,
                "commit→broker ack:   p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
                self.commit_ack_p50_ms, self.commit_ack_p99_ms, self.commit_ack_max_ms
            )?;
        }
        if self.e2e_msgs_per_sec > 0.0 {
            writeln!(
                f,
                "committed→processed: {:.0} msgs/s",
                self.e2e_msgs_per_sec
            )?;
            writeln!(
                f,
                "commit→processed:    p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
                self.e2e_p50_ms, self.e2e_p99_ms, self.e2e_max_ms
            )?;
            writeln!(f, "redelivered:         {}", self.redelivered)?;
        }
        Ok(())
    }
}

/// Commit instants of messages not acked yet, ack instants of messages
/// whose commit was not recorded yet, and the latencies.
struct Times {
    committed: HashMap<Uuid, Instant>,
    acked: HashMap<Uuid, Instant>,
    latency: Histogram<u64>,
}

/// Runs the benchmark.
///
/// Fails if the broker or the database cannot be reached, or the outbox is
/// not empty.
pub(crate) async fn run(config: RelayBenchConfig) -> anyhow::Result<RelayBenchReport> {
    anyhow::ensure!(config.writers > 0, "--publishers must be at least 1");
    anyhow::ensure!(config.per_commit > 0, "--batch-size must be at least 1");
    let (url, embedded) = match &config.broker {
        Some(url) => (url.clone(), None),
        None => {
            let embedded = Embedded::start(config.fsync).await?;
            (embedded.url.clone(), Some(embedded))
        }
    };
    let topic = format!("relay-bench-{}", &Uuid::new_v4().simple().to_string()[..8]);
    Admin::new(&client::connect(&url)?)
        .create_topic(&topic)
        .await?;
    let outbox = Outbox::connect(&config.outbox_url).await?;
    outbox.migrate().await?;
    let pending = outbox.stats().await?.depth;
    anyhow::ensure!(
        pending == 0,
        "the outbox holds {pending} rows; the bench needs an empty one"
    );
    let report = match (outbox.postgres_pool(), outbox.sqlite_pool(), &config.inbox) {
        (Some(pool), _, None) => measure(&config, &url, &topic, pool.clone(), outbox).await,
        (None, Some(pool), None) => measure(&config, &url, &topic, pool.clone(), outbox).await,
        (Some(pool), _, Some(inbox)) => {
            pipeline(&config, inbox, &url, &topic, pool.clone(), outbox).await
        }
        (None, Some(pool), Some(inbox)) => {
            pipeline(&config, inbox, &url, &topic, pool.clone(), outbox).await
        }
        (None, None, _) => Err(anyhow::anyhow!("the outbox has no database pool")),
    };
    if let Some(e) = embedded {
        e.stop().await;
    }
    report
}

async fn measure<DB: OutboxDatabase>(
    config: &RelayBenchConfig,
    url: &str,
    topic: &str,
    pool: Pool<DB>,
    outbox: Outbox,
) -> anyhow::Result<RelayBenchReport> {
    let relay_config = relay_config(config, url);
    let total = config.messages;
    let times = Arc::new(std::sync::Mutex::new(Times {
        committed: HashMap::new(),
        acked: HashMap::new(),
        latency: histogram(),
    }));

    let timed = config.rate.is_some();
    let start_relay = || async {
        let relay = Relay::start(outbox.clone(), relay_config.clone()).await?;
        let mut acks = relay.acked();
        let times = times.clone();
        let tracker = tokio::spawn(async move {
            let mut seen = 0u64;
            while seen < total {
                let ids = acks.recv().await.context("relay acks")?;
                let now = Instant::now();
                seen += ids.len() as u64;
                // A drain only counts: remembering each id would take the
                // CPU the relay is being measured on.
                if !timed {
                    continue;
                }
                let mut t = times.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
                for id in ids.iter() {
                    match t.committed.remove(id) {
                        Some(c) => t.latency.record((now - c).as_micros().max(1) as u64)?,
                        None => {
                            t.acked.insert(*id, now);
                        }
                    }
                }
            }
            anyhow::Ok(())
        });
        anyhow::Ok((relay, tracker))
    };

    let running = if timed {
        Some(start_relay().await?)
    } else {
        None
    };
    let started = Instant::now();
    let mut writers = Vec::new();
    for w in 0..config.writers {
        let pool = pool.clone();
        let times = times.clone();
        let config = config.clone();
        let topic = topic.to_owned();
        let outbox = outbox.clone();
        let share =
            total / config.writers as u64 + u64::from((w as u64) < total % config.writers as u64);
        writers.push(tokio::spawn(async move {
            let stamps = Stamps {
                times: timed.then_some(times),
                origin: None,
            };
            write(pool, outbox, &config, &topic, w, share, stamps).await
        }));
    }
    for w in writers {
        w.await??;
    }
    let commit_secs = started.elapsed().as_secs_f64();
    let (relay, tracker, relay_start) = match running {
        Some((relay, tracker)) => (relay, tracker, started),
        None => {
            let relay_start = Instant::now();
            let (relay, tracker) = start_relay().await?;
            (relay, tracker, relay_start)
        }
    };
    tracker.await??;
    let relay_secs = relay_start.elapsed().as_secs_f64();
    relay.stop().await;
    let hist = times
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .latency
        .clone();
    Ok(RelayBenchReport {
        messages: total,
        commit_msgs_per_sec: total as f64 / commit_secs,
        relay_msgs_per_sec: total as f64 / relay_secs,
        commit_ack_p50_ms: if timed { ms(&hist, 0.5) } else { 0.0 },
        commit_ack_p99_ms: if timed { ms(&hist, 0.99) } else { 0.0 },
        commit_ack_max_ms: if timed { ms(&hist, 1.0) } else { 0.0 },
        ..RelayBenchReport::default()
    })
}

/// The relay's settings for the bench.
fn relay_config(config: &RelayBenchConfig, url: &str) -> RelayConfig {
    let mut relay_config = RelayConfig::new(url);
    relay_config.listen = config.listen;
    relay_config.poll_interval = config.poll_interval;
    relay_config.batch_size = config.relay_batch;
    relay_config.pipeline = config.relay_pipeline;
    relay_config.migrate = false;
    relay_config
}

/// The whole pipeline: writers commit into the outbox while the relay
/// publishes and inbox consumers process, all at once.
async fn pipeline<DB: OutboxDatabase>(
    config: &RelayBenchConfig,
    inbox: &InboxSide,
    url: &str,
    topic: &str,
    pool: Pool<DB>,
    outbox: Outbox,
) -> anyhow::Result<RelayBenchReport> {
    anyhow::ensure!(inbox.subscribers > 0, "--subscribers must be at least 1");
    let connection = client::connect(url)?;
    Admin::new(&connection)
        .create_subscription(NewSubscription {
            name: topic.to_owned(),
            topic: topic.to_owned(),
            settings: SubscriptionSettings {
                ordered: inbox.ordered,
                ..Default::default()
            },
            start: StartPosition::Earliest,
        })
        .await?;
    let origin = Instant::now();
    let e2e = Arc::new(tokio::sync::Mutex::new(histogram()));
    let consumers_config = BenchConfig {
        subscribers: inbox.subscribers,
        inbox_concurrency: inbox.concurrency,
        inbox_prefetch: inbox.prefetch,
        inbox_savepoints: inbox.savepoints,
        ..BenchConfig::default()
    };
    let consumers = bench::start_inbox(
        &consumers_config,
        &inbox.url,
        std::slice::from_ref(&connection),
        topic,
        origin,
        e2e.clone(),
    )
    .await?;
    let relay = Relay::start(outbox.clone(), relay_config(config, url)).await?;
    let total = config.messages;
    let started = Instant::now();
    let mut writers = Vec::new();
    for w in 0..config.writers {
        let (pool, outbox, config, topic) = (
            pool.clone(),
            outbox.clone(),
            config.clone(),
            topic.to_owned(),
        );
        let share =
            total / config.writers as u64 + u64::from((w as u64) < total % config.writers as u64);
        writers.push(tokio::spawn(async move {
            let stamps = Stamps {
                times: None,
                origin: Some(origin),
            };
            write(pool, outbox, &config, &topic, w, share, stamps).await
        }));
    }
    for w in writers {
        w.await??;
    }
    let commit_secs = started.elapsed().as_secs_f64();
    let redelivered = consumers.finish(total).await?;
    let e2e_secs = started.elapsed().as_secs_f64();
    relay.stop().await;
    let hist = e2e.lock().await;
    Ok(RelayBenchReport {
        messages: total,
        commit_msgs_per_sec: total as f64 / commit_secs,
        e2e_msgs_per_sec: total as f64 / e2e_secs,
        e2e_p50_ms: ms(&hist, 0.5),
        e2e_p99_ms: ms(&hist, 0.99),
        e2e_max_ms: ms(&hist, 1.0),
        redelivered,
        ..RelayBenchReport::default()
    })
}

/// What a writer records of its commits: each commit instant (for the
/// commit→broker-ack latency), or a stamp in each payload (nanoseconds since
/// `origin`, taken just before the enqueue, for the inbox handler).
struct Stamps {
    times: Option<Arc<std::sync::Mutex<Times>>>,
    origin: Option<Instant>,
}

/// Writer `writer`: commits `count` messages, `per_commit` per transaction,
/// at its share of the rate, cycling through `keys` ordering keys; records
/// what `stamps` asks for.
async fn write<DB: OutboxDatabase>(
    pool: Pool<DB>,
    outbox: Outbox,
    config: &RelayBenchConfig,
    topic: &str,
    writer: usize,
    count: u64,
    stamps: Stamps,
) -> anyhow::Result<()> {
    let per_writer_rate = config.rate.map(|r| r as f64 / config.writers as f64);
    let payload = vec![b'x'; config.payload_size];
    let start = Instant::now();
    let mut sent = 0u64;
    let mut commits = 0u64;
    while sent < count {
        if let Some(rate) = per_writer_rate {
            tokio::time::sleep_until(start + Duration::from_secs_f64(commits as f64 / rate)).await;
        }
        let n = (count - sent).min(config.per_commit as u64) as usize;
        let mut payload = payload.clone();
        if let Some(origin) = stamps.origin {
            let stamp = (origin.elapsed().as_nanos() as u64).to_le_bytes();
            let len = stamp.len().min(payload.len());
            payload[..len].copy_from_slice(&stamp[..len]);
        }
        let messages: Vec<Message> = (0..n)
            .map(|i| {
                let m = Message::new(topic, payload.clone());
                match config.keys {
                    0 => m,
                    keys => m.with_key(format!("k{}", (writer + sent as usize + i) % keys)),
                }
            })
            .collect();
        let mut tx = pool.begin().await?;
        outbox::enqueue_all(&mut tx, &messages).await?;
        tx.commit().await?;
        let now = Instant::now();
        // Wakes an in-process relay on SQLite; PostgreSQL's is woken by
        // NOTIFY (or polls, when that is what is measured).
        if outbox.sqlite_pool().is_some() {
            outbox.committed();
        }
        if let Some(times) = &stamps.times {
            let mut t = times.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
            for m in &messages {
                // The ack may arrive before this task records the commit:
                // the latency is then below what this can measure; 1 µs.
                if t.acked.remove(&m.id).is_some() {
                    t.latency.record(1)?;
                } else {
                    t.committed.insert(m.id, now);
                }
            }
        }
        sent += n as u64;
        commits += 1;
    }
    Ok(())
}

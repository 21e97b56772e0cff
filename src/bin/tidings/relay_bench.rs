//! `tidings bench --outbox-url`: the producer side measured end to end, from
//! the application's commit to the broker's durable ack, through the relay.
//!
//! Without a rate it measures relay throughput: writers fill the outbox first,
//! then a relay drains it. With `--rate` (commits per second) the relay runs
//! while writers commit, and each message's commit→broker-ack latency is
//! recorded.

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

use crate::bench::{Embedded, histogram, ms};

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
    /// Fsync every commit on the embedded broker.
    pub(crate) fsync: bool,
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
}

impl RelayBenchReport {
    /// One JSON object.
    pub(crate) fn to_json(&self) -> String {
        format!(
            "{{\"messages\":{},\"commit_msgs_per_sec\":{:.0},\"relay_msgs_per_sec\":{:.0},\
             \"commit_ack_p50_ms\":{:.3},\"commit_ack_p99_ms\":{:.3},\"commit_ack_max_ms\":{:.3}}}",
            self.messages,
            self.commit_msgs_per_sec,
            self.relay_msgs_per_sec,
            self.commit_ack_p50_ms,
            self.commit_ack_p99_ms,
            self.commit_ack_max_ms
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
        writeln!(
            f,
            "relayed:             {:.0} msgs/s",
            self.relay_msgs_per_sec
        )?;
        if self.commit_ack_p99_ms > 0.0 {
            writeln!(
                f,
                "commit→broker ack:   p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
                self.commit_ack_p50_ms, self.commit_ack_p99_ms, self.commit_ack_max_ms
            )?;
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
    let report = match (outbox.postgres_pool(), outbox.sqlite_pool()) {
        (Some(pool), _) => measure(&config, &url, &topic, pool.clone(), outbox).await,
        (None, Some(pool)) => measure(&config, &url, &topic, pool.clone(), outbox).await,
        (None, None) => Err(anyhow::anyhow!("the outbox has no database pool")),
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
    let mut relay_config = RelayConfig::new(url);
    relay_config.listen = config.listen;
    relay_config.poll_interval = config.poll_interval;
    relay_config.batch_size = config.relay_batch;
    relay_config.migrate = false;
    let total = config.messages;
    let times = Arc::new(std::sync::Mutex::new(Times {
        committed: HashMap::new(),
        acked: HashMap::new(),
        latency: histogram(),
    }));

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

    let timed = config.rate.is_some();
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
            write(pool, outbox, &config, &topic, share, timed.then_some(times)).await
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
    })
}

/// One writer: commits `count` messages, `per_commit` per transaction, at
/// its share of the rate; records each commit instant if `times` is given.
async fn write<DB: OutboxDatabase>(
    pool: Pool<DB>,
    outbox: Outbox,
    config: &RelayBenchConfig,
    topic: &str,
    count: u64,
    times: Option<Arc<std::sync::Mutex<Times>>>,
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
        let messages: Vec<Message> = (0..n)
            .map(|_| Message::new(topic, payload.clone()))
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
        if let Some(times) = &times {
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

//! The relay's metrics: what its status says (published, duplicates, held,
//! leader, the last publish, each batch's latency) and its outbox's depth,
//! held rows and oldest pending age, read at each scrape.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::histogram::Histogram;
use tokio::sync::watch;

use super::broker::{counter, gauge, gauge_f64, single};
use super::{Metrics, Refresh};
use crate::outbox::{Outbox, OutboxStats, Relay, RelayStatus};

/// Upper bounds of the batch latency histogram, in seconds.
const BATCH_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

impl Metrics {
    /// Adds `relay`'s metrics, and `outbox`'s depth, held rows and oldest
    /// pending age (one query of the outbox per scrape). The batch latency
    /// histogram is fed by a task that ends with the relay.
    pub fn relay(&self, relay: &Relay, outbox: Outbox) {
        let batches = Histogram::new(BATCH_BUCKETS);
        tokio::spawn(watch_batches(relay.watch(), batches.clone()));
        let collector = Arc::new(RelayCollector {
            status: relay.watch(),
            outbox,
            stats: Mutex::new(None),
            failed_reads: AtomicU64::new(0),
            started: Instant::now(),
            batches,
        });
        self.register(|r| r.register_collector(Box::new(collector.clone())));
        self.refresh_with(collector);
    }
}

/// Observes each acked batch's latency until the relay is gone. A batch
/// acked while the previous one is still unseen is observed once, with the
/// later latency (the relay has one batch in flight, so this is rare).
async fn watch_batches(mut status: watch::Receiver<RelayStatus>, histogram: Histogram) {
    let mut seen = status.borrow_and_update().batches;
    while status.changed().await.is_ok() {
        let (batches, latency) = {
            let s = status.borrow_and_update();
            (s.batches, s.last_batch_latency)
        };
        if batches != seen {
            seen = batches;
            if let Some(latency) = latency {
                histogram.observe(latency.as_secs_f64());
            }
        }
    }
}

#[derive(Debug)]
struct RelayCollector {
    status: watch::Receiver<RelayStatus>,
    outbox: Outbox,
    stats: Mutex<Option<OutboxStats>>,
    failed_reads: AtomicU64,
    started: Instant,
    batches: Histogram,
}

impl Refresh for RelayCollector {
    fn refresh(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(async move {
            let stats = match self.outbox.stats().await {
                Ok(s) => Some(s),
                Err(e) => {
                    tracing::warn!(error = %e, "metrics: reading the outbox's depth failed");
                    self.failed_reads.fetch_add(1, Ordering::Relaxed);
                    None
                }
            };
            *self.stats.lock().unwrap_or_else(|e| e.into_inner()) = stats;
        })
    }
}

impl Collector for RelayCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let status = self.status.borrow().clone();
        let e = &mut encoder;
        single(
            e,
            "relay_published_messages",
            "Messages the broker acked (duplicates included)",
            MetricType::Counter,
            status.published,
            counter,
        )?;
        single(
            e,
            "relay_duplicate_messages",
            "Acked messages the broker already had (a resend after a lost ack)",
            MetricType::Counter,
            status.duplicates,
            counter,
        )?;
        single(
            e,
            "relay_held_messages",
            "Rows held after the broker refused them",
            MetricType::Counter,
            status.held,
            counter,
        )?;
        single(
            e,
            "relay_leader",
            "1 while this relay is the one publishing, 0 while it stands by",
            MetricType::Gauge,
            i64::from(status.leader),
            gauge,
        )?;
        single(
            e,
            "relay_failing",
            "1 while the relay's last attempt failed (broker or database unreachable)",
            MetricType::Gauge,
            i64::from(status.last_error.is_some()),
            gauge,
        )?;
        // Since the relay started if it never published: a relay that
        // never got anything through is as silent as one that stopped.
        let since = match status.last_publish {
            Some(at) => SystemTime::now()
                .duration_since(at)
                .unwrap_or_default()
                .as_secs_f64(),
            None => self.started.elapsed().as_secs_f64(),
        };
        single(
            e,
            "relay_seconds_since_last_publish",
            "Seconds since a batch was last acked (since the relay started, if none was)",
            MetricType::Gauge,
            since,
            gauge_f64,
        )?;
        let histogram = e.encode_descriptor(
            "relay_batch_seconds",
            "Time from sending a batch to the broker's durable ack",
            None,
            MetricType::Histogram,
        )?;
        self.batches.encode(histogram)?;
        single(
            e,
            "outbox_read_failures",
            "Scrapes whose read of the outbox failed (its gauges are missing from them)",
            MetricType::Counter,
            self.failed_reads.load(Ordering::Relaxed),
            counter,
        )?;
        let stats = self.stats.lock().unwrap_or_else(|e| e.into_inner());
        let Some(stats) = stats.as_ref() else {
            return Ok(());
        };
        single(
            e,
            "outbox_depth",
            "Rows waiting in the outbox for the relay",
            MetricType::Gauge,
            stats.depth,
            gauge,
        )?;
        single(
            e,
            "outbox_held_rows",
            "Waiting rows the broker refused, held for a retry",
            MetricType::Gauge,
            stats.held,
            gauge,
        )?;
        single(
            e,
            "outbox_oldest_pending_age_seconds",
            "Age of the oldest waiting row (0 when none)",
            MetricType::Gauge,
            stats.oldest_age.map_or(0.0, |a| a.as_secs_f64()),
            gauge_f64,
        )?;
        Ok(())
    }
}

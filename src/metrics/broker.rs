//! The broker's metrics: per topic and per subscription (from the store's
//! counters and one read of its gauges per scrape), the store's group
//! commits, and the gRPC layer's (see `grpc.rs`).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

use super::grpc::GrpcMetrics;
use super::{Metrics, Refresh};
use crate::model::now_micros;
use crate::store::{Store, StoreGauges};

/// A subscription metric: name, help, and how to read it.
type SubscriptionValue = (
    &'static str,
    &'static str,
    fn(&crate::store::SubscriptionGauges) -> i64,
);

/// What the server needs to count its calls and connections.
#[derive(Debug, Clone)]
pub(crate) struct BrokerMetrics {
    pub(crate) grpc: Arc<GrpcMetrics>,
}

impl Metrics {
    /// Adds the broker's metrics over `store`; the server keeps the
    /// returned handles for its gRPC layer.
    pub(crate) fn broker(&self, store: &Store) -> BrokerMetrics {
        let collector = Arc::new(StoreCollector {
            store: store.clone(),
            gauges: Mutex::new(None),
            read_seconds: Mutex::new(0.0),
            failed_reads: AtomicU64::new(0),
        });
        let grpc = Arc::new(GrpcMetrics::new());
        self.register(|r| {
            r.register_collector(Box::new(collector.clone()));
            grpc.register(r);
        });
        self.refresh_with(collector);
        BrokerMetrics { grpc }
    }
}

/// Encodes the store's counters and the gauges read at the last scrape.
#[derive(Debug)]
struct StoreCollector {
    store: Store,
    /// The last read of the gauges; `None` if it failed.
    gauges: Mutex<Option<StoreGauges>>,
    /// How long that read took.
    read_seconds: Mutex<f64>,
    failed_reads: AtomicU64,
}

impl Refresh for StoreCollector {
    fn refresh(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(async move {
            let started = Instant::now();
            let read = self.store.gauges().await;
            *self.read_seconds.lock().unwrap_or_else(|e| e.into_inner()) =
                started.elapsed().as_secs_f64();
            let gauges = match read {
                Ok(g) => Some(g),
                Err(e) => {
                    tracing::warn!(error = %e, "metrics: reading the store's gauges failed");
                    self.failed_reads.fetch_add(1, Ordering::Relaxed);
                    None
                }
            };
            *self.gauges.lock().unwrap_or_else(|e| e.into_inner()) = gauges;
        })
    }
}

/// Encodes one family of a metric type: a series per `(labels, value)`.
fn family<V>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    series: impl IntoIterator<Item = (Vec<(&'static str, String)>, V)>,
    encode: impl Fn(V, prometheus_client::encoding::MetricEncoder) -> std::fmt::Result,
) -> std::fmt::Result {
    let mut metric = encoder.encode_descriptor(name, help, None, kind)?;
    for (labels, value) in series {
        let series = metric.encode_family(&labels)?;
        encode(value, series)?;
    }
    Ok(())
}

pub(super) fn counter(v: u64, e: prometheus_client::encoding::MetricEncoder) -> std::fmt::Result {
    ConstCounter::new(v).encode(e)
}

pub(super) fn gauge(v: i64, e: prometheus_client::encoding::MetricEncoder) -> std::fmt::Result {
    ConstGauge::new(v).encode(e)
}

pub(super) fn gauge_f64(v: f64, e: prometheus_client::encoding::MetricEncoder) -> std::fmt::Result {
    ConstGauge::new(v).encode(e)
}

/// One unlabelled value.
pub(super) fn single<V>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    value: V,
    encode: impl Fn(V, prometheus_client::encoding::MetricEncoder) -> std::fmt::Result,
) -> std::fmt::Result {
    let metric = encoder.encode_descriptor(name, help, None, kind)?;
    encode(value, metric)
}

impl Collector for StoreCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let counters = self.store.counters();
        let e = &mut encoder;

        // Per topic, this process's committed publishes.
        let topics = counters.topics();
        let by_topic = |f: fn(&crate::store::TopicCounts) -> u64| {
            let mut rows: Vec<_> = topics
                .iter()
                .map(|(name, c)| (vec![("topic", name.clone())], f(c)))
                .collect();
            rows.sort_by(|a, b| a.0.cmp(&b.0));
            rows
        };
        family(
            e,
            "topic_published_messages",
            "Messages stored by this broker process since it started",
            MetricType::Counter,
            by_topic(|c| c.published),
            counter,
        )?;
        family(
            e,
            "topic_duplicate_messages",
            "Publishes answered as duplicates (an id the topic already had) since start",
            MetricType::Counter,
            by_topic(|c| c.duplicates),
            counter,
        )?;
        family(
            e,
            "topic_published_bytes",
            "Payload bytes stored since start",
            MetricType::Counter,
            by_topic(|c| c.bytes),
            counter,
        )?;

        // Per subscription, this process's lease endings.
        let subs = counters.subscriptions();
        let by_sub = |f: fn(&crate::store::SubscriptionCounts) -> u64| {
            let mut rows: Vec<_> = subs
                .iter()
                .map(|(name, c)| (vec![("subscription", name.clone())], f(c)))
                .collect();
            rows.sort_by(|a, b| a.0.cmp(&b.0));
            rows
        };
        family(
            e,
            "subscription_nacks",
            "Leases ended by a nack since start",
            MetricType::Counter,
            by_sub(|c| c.nacks),
            counter,
        )?;
        family(
            e,
            "subscription_expired_leases",
            "Leases that expired without an ack since start",
            MetricType::Counter,
            by_sub(|c| c.expired_leases),
            counter,
        )?;
        family(
            e,
            "subscription_dead_lettered_messages",
            "Messages dead-lettered since start",
            MetricType::Counter,
            by_sub(|c| c.dead_lettered),
            counter,
        )?;

        // The store's group commits and its queue.
        let size = e.encode_descriptor(
            "store_group_commit_operations",
            "Operations per committed group",
            None,
            MetricType::Histogram,
        )?;
        counters.commit_size().encode(size)?;
        let latency = e.encode_descriptor(
            "store_commit_seconds",
            "Time from BEGIN to the end of COMMIT of committed groups",
            None,
            MetricType::Histogram,
        )?;
        counters.commit_latency().encode(latency)?;
        single(
            e,
            "store_failed_commits",
            "Groups whose commit failed; their callers were told to retry",
            MetricType::Counter,
            counters.failed_commits(),
            counter,
        )?;
        single(
            e,
            "store_writer_queue_depth",
            "Operations queued for the writer, not yet in a group",
            MetricType::Gauge,
            self.store.queue_depth() as i64,
            gauge,
        )?;
        let healthy = *self.store.health().borrow();
        single(
            e,
            "store_healthy",
            "1 while storage commits (and, on SQLite, the disk is not full), else 0",
            MetricType::Gauge,
            i64::from(healthy),
            gauge,
        )?;
        single(
            e,
            "store_gauge_read_seconds",
            "How long the last scrape's read of the topic and subscription gauges took",
            MetricType::Gauge,
            *self.read_seconds.lock().unwrap_or_else(|e| e.into_inner()),
            gauge_f64,
        )?;
        single(
            e,
            "store_gauge_read_failures",
            "Scrapes whose read of the gauges failed (those gauges are missing from them)",
            MetricType::Counter,
            self.failed_reads.load(Ordering::Relaxed),
            counter,
        )?;

        let gauges = self.gauges.lock().unwrap_or_else(|e| e.into_inner());
        let Some(g) = gauges.as_ref() else {
            return Ok(());
        };
        let topic = |name: &str| vec![("topic", name.to_owned())];
        family(
            e,
            "topic_stored_messages",
            "Messages stored (the span of stored sequence numbers)",
            MetricType::Gauge,
            g.topics.iter().map(|t| (topic(&t.name), t.stored())),
            gauge,
        )?;
        family(
            e,
            "topic_last_sequence",
            "The topic's last sequence number",
            MetricType::Gauge,
            g.topics.iter().map(|t| (topic(&t.name), t.last_seq)),
            gauge,
        )?;
        family(
            e,
            "topic_expired_messages",
            "Messages removed by the topic's max age (stored, shared by instances)",
            MetricType::Counter,
            g.topics
                .iter()
                .map(|t| (topic(&t.name), t.expired.max(0) as u64)),
            counter,
        )?;
        let sub = |s: &crate::store::SubscriptionGauges| {
            vec![("subscription", s.name.clone()), ("topic", s.topic.clone())]
        };
        let subs = &g.subscriptions;
        let gauges: [SubscriptionValue; 6] = [
            (
                "subscription_backlog_messages",
                "Messages not yet acked nor dead-lettered, in flight included",
                |s| s.backlog,
            ),
            ("subscription_leased_messages", "Messages leased now", |s| {
                s.leased
            }),
            ("subscription_dead_letters", "Dead letters kept", |s| {
                s.dead_letters
            }),
            (
                "subscription_blocked_keys",
                "Keys held back by a message waiting for redelivery (ordered subscriptions)",
                |s| s.blocked_keys,
            ),
            (
                "subscription_watermark_lag_messages",
                "The topic's last sequence minus the subscription's ack watermark",
                |s| s.watermark_lag,
            ),
            (
                "subscription_ack_watermark",
                "No message at or below this sequence can be delivered again",
                |s| s.ack_watermark,
            ),
        ];
        for (name, help, value) in gauges {
            family(
                e,
                name,
                help,
                MetricType::Gauge,
                subs.iter().map(|s| (sub(s), value(s))),
                gauge,
            )?;
        }
        let now = now_micros();
        family(
            e,
            "subscription_oldest_unacked_age_seconds",
            "Age of the oldest message not yet acked nor dead-lettered (0 when none)",
            MetricType::Gauge,
            subs.iter().map(|s| {
                let age = s
                    .oldest_unacked_at
                    .map_or(0.0, |at| (now - at).max(0) as f64 / 1e6);
                (sub(s), age)
            }),
            gauge_f64,
        )?;
        let counters: [SubscriptionValue; 3] = [
            (
                "subscription_delivered_messages",
                "Deliveries since the subscription was created (stored, shared by instances)",
                |s| s.delivered,
            ),
            (
                "subscription_acked_messages",
                "Acks since the subscription was created (stored, shared by instances)",
                |s| s.acked,
            ),
            (
                "subscription_redelivered_messages",
                "Deliveries with attempt > 1 since creation (stored, shared by instances)",
                |s| s.redelivered,
            ),
        ];
        for (name, help, value) in counters {
            family(
                e,
                name,
                help,
                MetricType::Counter,
                subs.iter().map(|s| (sub(s), value(s).max(0) as u64)),
                counter,
            )?;
        }
        Ok(())
    }
}

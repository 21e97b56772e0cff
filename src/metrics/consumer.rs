//! The consumer runtime's metrics: its counters and handler latency, read
//! from its [`Monitor`] at each scrape.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;

use super::Metrics;
use crate::consumer::Monitor;

impl Metrics {
    /// Adds a consumer's metrics (from `monitor`), labelled with its
    /// `subscription`. Reading them costs no I/O.
    pub fn consumer(&self, monitor: Monitor, subscription: &str) {
        let collector = ConsumerCollector {
            monitor,
            subscription: subscription.to_owned(),
        };
        self.register(|r| r.register_collector(Box::new(collector)));
    }
}

#[derive(Debug)]
struct ConsumerCollector {
    monitor: Monitor,
    subscription: String,
}

impl Collector for ConsumerCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let stats = self.monitor.stats();
        let labels = [("subscription", self.subscription.as_str())];
        let counters: [(&str, &str, u64); 11] = [
            (
                "consumer_received_messages",
                "Deliveries received",
                stats.received,
            ),
            (
                "consumer_processed_messages",
                "Handlers that ran and committed",
                stats.processed,
            ),
            (
                "consumer_duplicates_skipped",
                "Deliveries whose id the inbox held already: handler skipped, acked",
                stats.duplicates,
            ),
            (
                "consumer_handler_errors",
                "Handlers that failed: rolled back and nacked",
                stats.failed,
            ),
            (
                "consumer_inbox_errors",
                "Deliveries the inbox database failed on: rolled back and nacked",
                stats.errors,
            ),
            (
                "consumer_expired_before_start",
                "Deliveries whose lease ended before their handler could start",
                stats.expired,
            ),
            (
                "consumer_batches",
                "Inbox transactions committed, each a batch of one or more deliveries",
                stats.batches,
            ),
            (
                "consumer_batch_reruns",
                "Batches run again with savepoints after a handler failed in them without",
                stats.reruns,
            ),
            ("consumer_acks", "Acks the broker confirmed", stats.acked),
            (
                "consumer_acks_refused",
                "Acks the broker refused (the lease had ended; the message comes again)",
                stats.ack_refused,
            ),
            (
                "consumer_inbox_pruned_rows",
                "Inbox rows pruned",
                stats.pruned,
            ),
        ];
        for (name, help, value) in counters {
            let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            super::broker::counter(value, metric.encode_family(&labels)?)?;
        }
        let mut metric = encoder.encode_descriptor(
            "consumer_watermark",
            "The subscription's ack watermark at the last pruning (-1: not known yet)",
            None,
            MetricType::Gauge,
        )?;
        super::broker::gauge(stats.watermark, metric.encode_family(&labels)?)?;
        let mut metric = encoder.encode_descriptor(
            "consumer_handler_seconds",
            "How long handlers ran, their batch's commit included",
            None,
            MetricType::Histogram,
        )?;
        self.monitor
            .handler_latency()
            .encode(metric.encode_family(&labels)?)?;
        Ok(())
    }
}

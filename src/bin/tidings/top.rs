//! `tidings top`: a live view of the broker's topics and subscriptions (and
//! an outbox's relays), refreshed on an interval. Rates come from the
//! difference between two refreshes of the broker's own counters, so the
//! first refresh shows none.

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use clap::Args;
use serde_json::{Value, json};
use tidings::client::Admin;
use tidings::config::HumanDuration;
use tidings::model::{SubscriptionStats, now_micros};
use tidings::outbox::{Outbox, OutboxStats};

use crate::output::{self, Format, print_json};
use crate::{interval, shutdown_signal};

#[derive(Debug, Args)]
pub(crate) struct TopArgs {
    /// Refresh every this long.
    #[arg(long, value_parser = interval, default_value = "1s")]
    interval: HumanDuration,
    /// Stop after this many refreshes (default: until stopped).
    #[arg(long)]
    iterations: Option<u64>,
    /// Also show the relays and depth of this outbox database
    /// (postgres://... or sqlite://PATH).
    #[arg(long, env = "TIDINGS_TOP_OUTBOX", hide_env_values = true)]
    outbox: Option<String>,
}

/// One refresh: what the broker (and the outbox) said at one instant.
struct Snapshot {
    at: Instant,
    topics: Vec<(String, i64)>,
    subscriptions: Vec<(String, String, SubscriptionStats)>,
    outbox: Option<OutboxStats>,
}

impl Snapshot {
    async fn take(admin: &Admin, outbox: Option<&Outbox>) -> anyhow::Result<Snapshot> {
        let at = Instant::now();
        let topics = admin
            .list_topics()
            .await?
            .into_iter()
            .map(|t| (t.name, t.last_sequence))
            .collect();
        let mut subscriptions = Vec::new();
        for s in admin.list_subscriptions(None).await? {
            match admin.stats(&s.name).await {
                Ok(stats) => subscriptions.push((s.name, s.topic, stats)),
                // Deleted between the list and its stats.
                Err(tidings::Error::NotFound(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        let outbox = match outbox {
            Some(o) => Some(o.stats().await?),
            None => None,
        };
        Ok(Snapshot {
            at,
            topics,
            subscriptions,
            outbox,
        })
    }
}

/// A per-second rate of a counter between two refreshes; `None` without an
/// earlier one (or if the counter went back, as after a topic was made
/// again).
fn rate(now: i64, before: Option<i64>, elapsed: Duration) -> Option<f64> {
    let before = before?;
    let secs = elapsed.as_secs_f64();
    (now >= before && secs > 0.0).then(|| (now - before) as f64 / secs)
}

/// The view of `now`, with rates against `before`.
struct View<'a> {
    now: &'a Snapshot,
    published_before: HashMap<&'a str, i64>,
    acked_before: HashMap<&'a str, i64>,
    elapsed: Duration,
}

impl<'a> View<'a> {
    fn new(now: &'a Snapshot, before: Option<&'a Snapshot>) -> Self {
        let published_before = before
            .map(|b| b.topics.iter().map(|(n, s)| (n.as_str(), *s)).collect())
            .unwrap_or_default();
        let acked_before = before
            .map(|b| {
                b.subscriptions
                    .iter()
                    .map(|(n, _, s)| (n.as_str(), s.acked))
                    .collect()
            })
            .unwrap_or_default();
        View {
            now,
            published_before,
            acked_before,
            elapsed: before.map_or(Duration::ZERO, |b| now.at.duration_since(b.at)),
        }
    }

    fn publish_rate(&self, topic: &str, last: i64) -> Option<f64> {
        rate(
            last,
            self.published_before.get(topic).copied(),
            self.elapsed,
        )
    }

    fn ack_rate(&self, subscription: &str, acked: i64) -> Option<f64> {
        rate(
            acked,
            self.acked_before.get(subscription).copied(),
            self.elapsed,
        )
    }

    fn json(&self) -> Value {
        let topics: Vec<Value> = self
            .now
            .topics
            .iter()
            .map(|(name, last)| {
                json!({
                    "name": name,
                    "lastSequence": last,
                    "publishRate": self.publish_rate(name, *last),
                })
            })
            .collect();
        let subscriptions: Vec<Value> = self
            .now
            .subscriptions
            .iter()
            .map(|(name, topic, s)| {
                json!({
                    "name": name,
                    "topic": topic,
                    "ackRate": self.ack_rate(name, s.acked),
                    "backlog": s.backlog,
                    "inFlight": s.in_flight,
                    "oldestUnackedAge": s.oldest_unacked_age.map(output::proto_duration),
                    "deadLettered": s.dead_lettered,
                    "blockedKeys": s.blocked_keys,
                })
            })
            .collect();
        let mut v = json!({
            "time": output::rfc3339(now_micros()),
            "topics": topics,
            "subscriptions": subscriptions,
        });
        if let (Some(o), Value::Object(map)) = (&self.now.outbox, &mut v) {
            let relays: Vec<Value> = o
                .relays
                .iter()
                .map(|r| {
                    json!({
                        "relay": r.relay,
                        "alive": r.alive,
                        "leader": r.alive && r.leader,
                        "published": r.published,
                        "heartbeatAge": output::proto_duration(r.heartbeat_age),
                        "lastError": r.last_error,
                    })
                })
                .collect();
            map.insert(
                "outbox".into(),
                json!({
                    "outboxDepth": o.depth,
                    "held": o.held,
                    "oldestPendingAge": o.oldest_age.map(output::proto_duration),
                    "relays": relays,
                }),
            );
        }
        v
    }

    fn text(&self, url: &str, every: Duration) -> String {
        let per_second = |r: Option<f64>| r.map_or_else(|| "-".to_owned(), |r| format!("{r:.1}"));
        let age_text = |d: Option<Duration>| d.map_or_else(|| "-".to_owned(), seconds);
        let mut out = format!(
            "tidings top: {url} at {} (every {})\n\n",
            output::rfc3339(now_micros()),
            output::human_duration(every)
        );
        out.push_str(&format!(
            "{:<32} {:>12} {:>12}\n",
            "TOPIC", "PUBLISHED/S", "LAST SEQ"
        ));
        for (name, last) in &self.now.topics {
            out.push_str(&format!(
                "{:<32} {:>12} {:>12}\n",
                name,
                per_second(self.publish_rate(name, *last)),
                last
            ));
        }
        if self.now.topics.is_empty() {
            out.push_str("no topics\n");
        }
        out.push_str(&format!(
            "\n{:<32} {:<20} {:>9} {:>9} {:>9} {:>10} {:>7} {:>8}\n",
            "SUBSCRIPTION", "TOPIC", "ACKED/S", "BACKLOG", "IN FLIGHT", "OLDEST", "DEAD", "BLOCKED"
        ));
        for (name, topic, s) in &self.now.subscriptions {
            out.push_str(&format!(
                "{:<32} {:<20} {:>9} {:>9} {:>9} {:>10} {:>7} {:>8}\n",
                name,
                topic,
                per_second(self.ack_rate(name, s.acked)),
                s.backlog,
                s.in_flight,
                age_text(s.oldest_unacked_age),
                s.dead_lettered,
                s.blocked_keys
            ));
        }
        if self.now.subscriptions.is_empty() {
            out.push_str("no subscriptions\n");
        }
        if let Some(o) = &self.now.outbox {
            out.push_str(&format!(
                "\noutbox: depth {}, held {}, oldest pending {}\n",
                o.depth,
                o.held,
                age_text(o.oldest_age)
            ));
            out.push_str(&format!(
                "{:<48} {:>6} {:>8} {:>12} {:>10} {}\n",
                "RELAY", "STATE", "LEADER", "PUBLISHED", "HEARTBEAT", "LAST ERROR"
            ));
            for r in &o.relays {
                out.push_str(&format!(
                    "{:<48} {:>6} {:>8} {:>12} {:>10} {}\n",
                    r.relay,
                    if r.alive { "alive" } else { "gone" },
                    r.alive && r.leader,
                    r.published,
                    age_text(Some(r.heartbeat_age)),
                    r.last_error.as_deref().unwrap_or("-")
                ));
            }
            if o.relays.is_empty() {
                out.push_str("no relay reported\n");
            }
        }
        out
    }
}

fn seconds(d: Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}

/// Refreshes until `--iterations` or a signal. A failed refresh (the broker
/// unreachable, say) is reported and the next one tried.
pub(crate) async fn run(
    a: TopArgs,
    admin: &Admin,
    url: &str,
    format: Format,
) -> anyhow::Result<()> {
    let outbox = match &a.outbox {
        Some(db) => Some(crate::remote::open_outbox(db, false, Default::default()).await?),
        None => None,
    };
    let every: Duration = a.interval.into();
    let terminal = std::io::stdout().is_terminal() && format == Format::Text;
    let stop = shutdown_signal();
    tokio::pin!(stop);
    let mut before: Option<Snapshot> = None;
    let mut done = 0u64;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = &mut stop => return Ok(()),
            _ = tick.tick() => {}
        }
        match Snapshot::take(admin, outbox.as_ref()).await {
            Ok(now) => {
                let view = View::new(&now, before.as_ref());
                match format {
                    Format::Json => print_json(&view.json()),
                    Format::Text => {
                        let mut stdout = std::io::stdout().lock();
                        // Clear the screen for a person; frames one after
                        // another, apart, for a pipe or a file.
                        let clear = if terminal { "\x1b[H\x1b[2J" } else { "" };
                        let _ = write!(stdout, "{clear}{}", view.text(url, every));
                        if !terminal {
                            let _ = writeln!(stdout);
                        }
                        let _ = stdout.flush();
                    }
                }
                before = Some(now);
            }
            Err(e) => {
                eprintln!("tidings top: refresh failed ({e:#}); trying again");
                // A bounded run (a script's) that ends on a failure fails.
                if a.iterations.is_some_and(|n| done + 1 >= n) {
                    return Err(e);
                }
            }
        }
        done += 1;
        if a.iterations.is_some_and(|n| done >= n) {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_need_an_earlier_refresh_and_a_counter_that_grew() {
        let second = Duration::from_secs(2);
        assert_eq!(rate(10, None, second), None);
        assert_eq!(rate(10, Some(4), second), Some(3.0));
        assert_eq!(rate(3, Some(4), second), None, "a topic made again");
        assert_eq!(rate(4, Some(4), Duration::ZERO), None);
    }
}

//! Prometheus metrics (issue 13): the real endpoint of a real broker, relay
//! and consumer, scraped over HTTP and parsed with a Prometheus text
//! parser; the values move as the work does. And the alert rules in `ops/`
//! name only metrics that exist.

use std::time::Duration;

use sqlx::{Sqlite, Transaction};
use tidings::client::{self, Backoff};
use tidings::consumer::{Consumer, ConsumerConfig, Handler};
use tidings::inbox::Inbox;
use tidings::metrics::Metrics;
use tidings::model::Delivery;
use tidings::outbox::{Message, Relay};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;

use crate::harness::{Backend, TestBroker, backend_test, ms};
use crate::outbox::{AppDb, relay_config};

/// A metrics endpoint served from this process until dropped.
struct Endpoint {
    addr: std::net::SocketAddr,
    _stop: oneshot::Sender<()>,
}

/// Serves `metrics` on 127.0.0.1:0.
async fn serve(metrics: &Metrics) -> Endpoint {
    let listener = tidings::metrics::bind("127.0.0.1:0")
        .await
        .expect("bind metrics");
    let addr = listener.local_addr().expect("metrics address");
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(metrics.clone().serve(listener, async {
        let _ = stopped.await;
    }));
    Endpoint { addr, _stop: stop }
}

/// `GET path` over HTTP/1.1: the status code, the content type and the body.
async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String, String) {
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to the metrics endpoint");
    let request = format!("GET {path} HTTP/1.1\r\nHost: tidings\r\nConnection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .expect("send request");
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .await
        .expect("read response");
    let (head, body) = response
        .split_once("\r\n\r\n")
        .expect("an HTTP response has a head and a body");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status code");
    let content_type = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-type: ")
                .map(str::to_owned)
        })
        .unwrap_or_default();
    (status, content_type, body.to_owned())
}

/// A parsed scrape.
struct Scraped(prometheus_parse::Scrape);

impl Scraped {
    /// The value of the sample `name` whose labels include `labels`.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.0
            .samples
            .iter()
            .filter(|s| s.metric == name)
            .find(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .and_then(|s| match &s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => Some(*v),
                _ => None,
            })
    }

    /// As [`Scraped::value`], 0 if the series does not exist yet (a
    /// counter before its first increment).
    fn or_zero(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.value(name, labels).unwrap_or(0.0)
    }

    /// The count of the histogram `name` with `labels`.
    fn count(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.value(&format!("{name}_count"), labels).unwrap_or(0.0)
    }
}

/// Scrapes `/metrics` and parses it with a Prometheus text parser.
async fn scrape(endpoint: &Endpoint) -> Scraped {
    let (status, content_type, body) = get(endpoint.addr, "/metrics").await;
    assert_eq!(status, 200, "{body}");
    assert!(
        content_type.starts_with("application/openmetrics-text"),
        "{content_type}"
    );
    assert!(
        body.ends_with("# EOF\n"),
        "an OpenMetrics exposition ends with # EOF"
    );
    let lines = body.lines().map(|l| Ok(l.to_owned()));
    Scraped(prometheus_parse::Scrape::parse(lines).expect("the exposition parses"))
}

/// Scrapes until `check` holds, for values that a background task moves.
async fn scrape_until(
    endpoint: &Endpoint,
    what: &str,
    check: impl Fn(&Scraped) -> bool,
) -> Scraped {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let s = scrape(endpoint).await;
        if check(&s) {
            return s;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(ms(20)).await;
    }
}

/// A broker with metrics, served on their own endpoint.
async fn broker_with_metrics(backend: Backend) -> (TestBroker, Endpoint) {
    let metrics = Metrics::new();
    let endpoint = serve(&metrics).await;
    let broker = TestBroker::start_with(backend, |c| c.metrics = Some(metrics)).await;
    (broker, endpoint)
}

backend_test! {
    async fn broker_metrics_follow_publishes_backlog_and_acks(backend) {
        let (broker, endpoint) = broker_with_metrics(backend).await;
        broker.topic_and_sub("orders", "billing", |_| {}).await;
        let topic = [("topic", "orders")];
        let sub = [("subscription", "billing")];
        let before = scrape(&endpoint).await;
        assert_eq!(before.value("tidings_subscription_backlog_messages", &sub), Some(0.0));
        assert_eq!(before.value("tidings_subscription_oldest_unacked_age_seconds", &sub), Some(0.0));

        let payloads: Vec<String> = (0..10).map(|i| format!("order {i}")).collect();
        let payloads: Vec<&str> = payloads.iter().map(String::as_str).collect();
        broker.publish("orders", &payloads).await;
        let after = scrape(&endpoint).await;
        let published = |s: &Scraped| s.or_zero("tidings_topic_published_messages_total", &topic);
        assert_eq!(published(&after) - published(&before), 10.0, "publish 10 → published +10");
        assert_eq!(
            after.or_zero("tidings_topic_published_bytes_total", &topic),
            payloads.iter().map(|p| p.len()).sum::<usize>() as f64
        );
        assert_eq!(after.value("tidings_topic_stored_messages", &topic), Some(10.0));
        assert_eq!(after.value("tidings_subscription_backlog_messages", &sub), Some(10.0));
        assert_eq!(after.value("tidings_subscription_watermark_lag_messages", &sub), Some(10.0));
        assert!(after.count("tidings_store_commit_seconds", &[]) >= 1.0);
        assert_eq!(
            after.value(
                "tidings_grpc_calls_total",
                &[("method", "tidings.v1.PublisherService/Publish"), ("code", "OK")]
            ),
            Some(1.0)
        );
        assert!(after.value("tidings_grpc_connections", &[]).is_some_and(|c| c >= 1.0));

        // Nobody consumes: the oldest unacked message ages.
        let first_age = after
            .value("tidings_subscription_oldest_unacked_age_seconds", &sub)
            .expect("age");
        tokio::time::sleep(ms(300)).await;
        let later = scrape(&endpoint).await;
        let later_age = later
            .value("tidings_subscription_oldest_unacked_age_seconds", &sub)
            .expect("age");
        assert!(later_age >= first_age + 0.25, "{first_age} then {later_age}");

        // The same ids again: duplicates, nothing stored.
        let again = broker.publisher().publish(&[client::Outgoing::new("orders", "x")]).await;
        let id = again.expect("publish")[0].id;
        let mut m = client::Outgoing::new("orders", "x");
        m.id = id;
        broker.publisher().publish(&[m]).await.expect("publish a duplicate");
        let dup = scrape(&endpoint).await;
        assert_eq!(dup.or_zero("tidings_topic_duplicate_messages_total", &topic), 1.0);
        assert_eq!(dup.value("tidings_subscription_backlog_messages", &sub), Some(11.0));

        // Lease everything: leased 11; nack one, ack the rest.
        let received = broker.pull("billing", 100, ms(500)).await;
        assert_eq!(received.len(), 11);
        let leased = scrape(&endpoint).await;
        assert_eq!(leased.value("tidings_subscription_leased_messages", &sub), Some(11.0));
        broker
            .nack("billing", &received[0].ack_id, Some(ms(1)), "not now")
            .await
            .expect("nack");
        broker
            .ack("billing", received[1..].iter().map(|m| m.ack_id.clone()).collect())
            .await
            .expect("ack");
        let nacked = scrape(&endpoint).await;
        assert_eq!(nacked.or_zero("tidings_subscription_nacks_total", &sub), 1.0);
        assert_eq!(nacked.value("tidings_subscription_backlog_messages", &sub), Some(1.0));
        assert_eq!(nacked.value("tidings_subscription_acked_messages_total", &sub), Some(10.0));

        // The redelivery, acked: everything falls to 0.
        let again = broker.pull("billing", 10, Duration::from_secs(5)).await;
        assert_eq!(again.len(), 1);
        broker.ack("billing", vec![again[0].ack_id.clone()]).await.expect("ack");
        let done = scrape(&endpoint).await;
        assert_eq!(done.value("tidings_subscription_backlog_messages", &sub), Some(0.0));
        assert_eq!(done.value("tidings_subscription_leased_messages", &sub), Some(0.0));
        assert_eq!(done.value("tidings_subscription_oldest_unacked_age_seconds", &sub), Some(0.0));
        assert_eq!(done.value("tidings_subscription_watermark_lag_messages", &sub), Some(0.0));
        assert_eq!(done.value("tidings_subscription_redelivered_messages_total", &sub), Some(1.0));
        assert_eq!(done.value("tidings_store_failed_commits_total", &[]), Some(0.0));
        assert_eq!(done.value("tidings_store_healthy", &[]), Some(1.0));

        // A user error is counted with its code.
        let missing = broker.admin().get_topic("nope").await;
        assert!(missing.is_err());
        let errors = scrape(&endpoint).await;
        assert_eq!(
            errors.value(
                "tidings_grpc_calls_total",
                &[("method", "tidings.v1.AdminService/GetTopic"), ("code", "NOT_FOUND")]
            ),
            Some(1.0)
        );
        broker.stop().await;
    }
}

backend_test! {
    async fn expired_leases_and_dead_letters_are_counted(backend) {
        let (broker, endpoint) = broker_with_metrics(backend).await;
        broker
            .topic_and_sub("orders", "fragile", |s| {
                s.max_attempts = 1;
                s.ack_deadline = Some(crate::harness::pb(ms(100)));
            })
            .await;
        broker.publish("orders", &["a"]).await;
        let received = broker.pull("fragile", 1, ms(500)).await;
        assert_eq!(received.len(), 1);
        let sub = [("subscription", "fragile")];
        let s = scrape_until(&endpoint, "the lease to expire into a dead letter", |s| {
            s.or_zero("tidings_subscription_dead_lettered_messages_total", &sub) == 1.0
        })
        .await;
        assert_eq!(s.or_zero("tidings_subscription_expired_leases_total", &sub), 1.0);
        assert_eq!(s.value("tidings_subscription_dead_letters", &sub), Some(1.0));
        assert_eq!(s.value("tidings_subscription_backlog_messages", &sub), Some(0.0));
        broker.stop().await;
    }
}

#[tokio::test]
async fn open_streams_and_unknown_paths_are_bounded_labels() {
    let (broker, endpoint) = broker_with_metrics(Backend::Sqlite).await;
    broker.topic_and_sub("orders", "live", |_| {}).await;
    let mut subscription = broker.subscribe("live");
    broker.publish("orders", &["one"]).await;
    let received = crate::outbox::receive(&mut subscription, 1).await;
    assert_eq!(received.len(), 1);
    let method = [("method", "tidings.v1.SubscriberService/Subscribe")];
    scrape_until(&endpoint, "an open Subscribe stream", |s| {
        s.value("tidings_grpc_open_calls", &method) == Some(1.0)
    })
    .await;
    drop(subscription);
    scrape_until(&endpoint, "the stream to close", |s| {
        s.value("tidings_grpc_open_calls", &method) == Some(0.0)
    })
    .await;
    let (status, _, _) = get(endpoint.addr, "/other").await;
    assert_eq!(status, 404);
    broker.stop().await;
}

#[tokio::test]
async fn relay_metrics_count_published_and_a_stopped_relay_grows_silent() {
    let broker = TestBroker::start(Backend::Sqlite).await;
    broker.topic_and_sub("orders", "s", |_| {}).await;
    let app = AppDb::create(&Backend::Sqlite).await;
    let metrics = Metrics::new();
    let endpoint = serve(&metrics).await;
    let relay = Relay::start(app.outbox(), relay_config(&broker))
        .await
        .expect("relay");
    metrics.relay(&relay, app.outbox());
    let messages: Vec<Message> = (0..5)
        .map(|i| Message::new("orders", format!("m{i}").into_bytes()))
        .collect();
    app.enqueue(&messages, true).await;
    let s = scrape_until(&endpoint, "the relay to publish 5", |s| {
        s.value("tidings_relay_published_messages_total", &[]) == Some(5.0)
    })
    .await;
    assert_eq!(s.value("tidings_relay_leader", &[]), Some(1.0));
    assert!(s.count("tidings_relay_batch_seconds", &[]) >= 1.0);
    let s = scrape_until(&endpoint, "an empty outbox", |s| {
        s.value("tidings_outbox_depth", &[]) == Some(0.0)
    })
    .await;
    assert_eq!(
        s.value("tidings_outbox_oldest_pending_age_seconds", &[]),
        Some(0.0)
    );

    // Stopped: rows wait, and the time since the last publish grows.
    relay.stop().await;
    app.enqueue(&[Message::new("orders", b"late".to_vec())], true)
        .await;
    let first = scrape(&endpoint).await;
    assert_eq!(first.value("tidings_outbox_depth", &[]), Some(1.0));
    let silent = first
        .value("tidings_relay_seconds_since_last_publish", &[])
        .expect("silence");
    tokio::time::sleep(ms(300)).await;
    let later = scrape(&endpoint).await;
    let silent_later = later
        .value("tidings_relay_seconds_since_last_publish", &[])
        .expect("silence");
    assert!(
        silent_later >= silent + 0.25,
        "{silent} then {silent_later}"
    );
    assert!(
        later
            .value("tidings_outbox_oldest_pending_age_seconds", &[])
            .is_some_and(|a| a >= 0.25)
    );
    app.drop().await;
    broker.stop().await;
}

/// Fails the messages whose payload is "bad".
#[derive(Debug, Clone)]
struct PickyHandler;

impl Handler<Sqlite> for PickyHandler {
    type Error = String;

    async fn handle(
        &self,
        d: &Delivery,
        _tx: &mut Transaction<'static, Sqlite>,
    ) -> Result<(), String> {
        if d.message.payload == b"bad" {
            return Err("bad payload".into());
        }
        Ok(())
    }
}

#[tokio::test]
async fn consumer_metrics_count_processed_and_handler_failures() {
    let broker = TestBroker::start(Backend::Sqlite).await;
    broker
        .topic_and_sub("orders", "shipping", |s| {
            s.max_attempts = 2;
            s.min_backoff = Some(crate::harness::pb(ms(10)));
            s.max_backoff = Some(crate::harness::pb(ms(20)));
        })
        .await;
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("sqlite://{}/inbox.db?mode=rwc", dir.path().display());
    let inbox = Inbox::<Sqlite>::connect(&url).await.expect("inbox");
    inbox.migrate().await.expect("migrate inbox");
    let config = ConsumerConfig {
        prune_interval: None,
        reconnect: Backoff {
            min: ms(20),
            max: ms(200),
            give_up_after: None,
        },
        ..ConsumerConfig::default()
    };
    let consumer = Consumer::new(&broker.connection, "shipping", inbox, PickyHandler, config);
    let metrics = Metrics::new();
    metrics.consumer(consumer.monitor(), "shipping");
    let endpoint = serve(&metrics).await;
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(consumer.run(async {
        let _ = stopped.await;
    }));
    broker.publish("orders", &["good", "bad", "fine"]).await;
    let sub = [("subscription", "shipping")];
    let s = scrape_until(&endpoint, "two processed and a failure per attempt", |s| {
        s.value("tidings_consumer_processed_messages_total", &sub) == Some(2.0)
            && s.value("tidings_consumer_handler_errors_total", &sub) == Some(2.0)
    })
    .await;
    assert_eq!(
        s.value("tidings_consumer_received_messages_total", &sub),
        Some(4.0)
    );
    assert_eq!(s.count("tidings_consumer_handler_seconds", &sub), 4.0);
    assert_eq!(
        s.value("tidings_consumer_duplicates_skipped_total", &sub),
        Some(0.0)
    );
    let _ = stop.send(());
    let _ = task.await;
    broker.stop().await;
}

/// Every `tidings_*` metric the alert rules and the dashboard name is one
/// that a broker, a relay and a consumer expose.
#[tokio::test]
async fn ops_rules_and_dashboard_name_only_exposed_metrics() {
    let (broker, endpoint) = broker_with_metrics(Backend::Sqlite).await;
    broker.topic_and_sub("orders", "s", |_| {}).await;
    broker.publish("orders", &["a"]).await;
    let app = AppDb::create(&Backend::Sqlite).await;
    let relay_metrics = Metrics::new();
    let relay = Relay::start(app.outbox(), relay_config(&broker))
        .await
        .expect("relay");
    relay_metrics.relay(&relay, app.outbox());
    let relay_endpoint = serve(&relay_metrics).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("sqlite://{}/inbox.db?mode=rwc", dir.path().display());
    let inbox = Inbox::<Sqlite>::connect(&url).await.expect("inbox");
    let consumer = Consumer::new(
        &broker.connection,
        "s",
        inbox,
        PickyHandler,
        ConsumerConfig::default(),
    );
    let consumer_metrics = Metrics::new();
    consumer_metrics.consumer(consumer.monitor(), "s");
    let consumer_endpoint = serve(&consumer_metrics).await;
    // Make the call counters exist: a failing call and a good one.
    let _ = broker.admin().get_topic("missing").await;

    let mut exposed = std::collections::HashSet::new();
    for e in [&endpoint, &relay_endpoint, &consumer_endpoint] {
        let (_, _, body) = get(e.addr, "/metrics").await;
        // From the descriptors, so that a family without series yet (no
        // dead letter so far) counts too.
        for line in body.lines() {
            let Some(rest) = line.strip_prefix("# TYPE ") else {
                continue;
            };
            let (name, kind) = rest.split_once(' ').expect("# TYPE name kind");
            let suffixes: &[&str] = match kind {
                "counter" => &["_total"],
                "histogram" => &["_bucket", "_sum", "_count"],
                _ => &[""],
            };
            for suffix in suffixes {
                exposed.insert(format!("{name}{suffix}"));
            }
        }
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("ops");
    for file in ["prometheus/alerts.yml", "grafana/tidings.json"] {
        let text = std::fs::read_to_string(root.join(file)).expect("ops file");
        let mut named = 0;
        for (at, _) in text.match_indices("tidings_") {
            let name: String = text[at..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            // Job names and the like are not metrics.
            if name == "tidings_" || !name.contains('_') {
                continue;
            }
            named += 1;
            assert!(
                exposed.contains(&name),
                "{file} names {name}, which nothing exposes"
            );
        }
        assert!(named > 5, "{file} names metrics");
    }
    relay.stop().await;
    app.drop().await;
    broker.stop().await;
}

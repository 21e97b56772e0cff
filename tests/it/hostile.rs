//! Hostile and careless input: poison messages that crash their consumers,
//! deliveries a default client can receive, limits that cover the whole
//! message, one client's bad input never failing another's, bounded errors,
//! and values outside their range refused with the field named.

use std::time::Duration;

use futures_util::StreamExt;
use tidings::client::{Event, FlowControl, Outgoing};
use tidings::proto::{
    self, publisher_service_client::PublisherServiceClient,
    subscriber_service_client::SubscriberServiceClient,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::Code;

use crate::harness::{Backend, TestBroker, backend_test, ms, pb, wire};
use crate::proxy::Proxy;

/// A wait that must not fail the test by timing out on a loaded machine.
const PATIENCE: Duration = Duration::from_secs(30);

/// Opens a raw Subscribe stream with `first` as its first request.
async fn raw_subscribe(
    b: &TestBroker,
    first: proto::SubscribeRequest,
) -> (
    mpsc::UnboundedSender<proto::SubscribeRequest>,
    tonic::Streaming<proto::SubscribeResponse>,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    tx.send(first).expect("queue the first request");
    let inbound = b
        .raw_subscriber()
        .subscribe(UnboundedReceiverStream::new(rx))
        .await
        .expect("subscribe")
        .into_inner();
    (tx, inbound)
}

fn first_request(sub: &str) -> proto::SubscribeRequest {
    proto::SubscribeRequest {
        subscription: sub.into(),
        ..Default::default()
    }
}

/// The next response carrying messages.
async fn next_messages(
    inbound: &mut tonic::Streaming<proto::SubscribeResponse>,
) -> Vec<proto::ReceivedMessage> {
    loop {
        let r = tokio::time::timeout(PATIENCE, inbound.message())
            .await
            .expect("a response in time")
            .expect("the stream works")
            .expect("the stream is open");
        if !r.messages.is_empty() {
            return r.messages;
        }
    }
}

fn publish_request(messages: Vec<proto::Message>) -> proto::PublishRequest {
    proto::PublishRequest { messages }
}

backend_test! {
    /// A message whose consumer dies with it (its stream cancelled, or its
    /// process killed) uses up an attempt each time and reaches the dead
    /// letters after max_attempts, like a message whose lease expires.
    async fn a_poison_message_that_breaks_streams_is_dead_lettered(backend) {
        let b = TestBroker::start(backend).await;
        b.topic_and_sub("t", "s", |s| {
            s.max_attempts = 3;
            s.min_backoff = Some(pb(ms(1)));
            s.max_backoff = Some(pb(ms(1)));
        })
        .await;
        b.publish("t", &["poison"]).await;
        let upstream: std::net::SocketAddr = b.url.trim_start_matches("http://").parse().expect("address");
        let proxy = Proxy::start(upstream).await;
        for attempt in 1..=3 {
            // Each consumer has its own connection, through the proxy.
            let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", proxy.addr()))
                .expect("endpoint")
                .connect()
                .await
                .expect("connect");
            let (tx, rx) = mpsc::unbounded_channel();
            tx.send(first_request("s")).expect("send");
            let mut inbound = SubscriberServiceClient::new(channel)
                .subscribe(UnboundedReceiverStream::new(rx))
                .await
                .expect("subscribe")
                .into_inner();
            let got = next_messages(&mut inbound).await;
            assert_eq!(got.len(), 1);
            assert_eq!(got[0].attempt, attempt, "attempt {attempt}");
            // The consumer's process dies: its connection goes away, with
            // the stream open and the message unacked.
            proxy.reset();
            drop(inbound);
            drop(tx);
            if attempt < 3 {
                continue;
            }
            let deadline = tokio::time::Instant::now() + PATIENCE;
            loop {
                let dead = b.admin().list_dead_letters("s").await.expect("dead letters");
                if let Some(d) = dead.first() {
                    assert_eq!(d.attempts, 3);
                    assert!(d.reason.contains("stream ended"), "{}", d.reason);
                    break;
                }
                assert!(tokio::time::Instant::now() < deadline, "never dead-lettered");
                tokio::time::sleep(ms(20)).await;
            }
        }
        assert!(b.pull("s", 1, ms(300)).await.is_empty(), "not delivered a 4th time");
        let stats = b.stats("s").await;
        assert_eq!((stats.backlog, stats.dead_lettered), (0, 1), "{stats:?}");
        b.stop().await;
    }
}

backend_test! {
    /// A release gives a message back unprocessed: it comes again at once
    /// with the same attempt number, however often it is released.
    async fn released_messages_come_back_without_using_an_attempt(backend) {
        let b = TestBroker::start(backend).await;
        b.topic_and_sub("t", "s", |s| s.max_attempts = 1).await;
        b.publish("t", &["m"]).await;
        let (tx, mut inbound) = raw_subscribe(&b, first_request("s")).await;
        for _ in 0..3 {
            let got = next_messages(&mut inbound).await;
            assert_eq!(got[0].attempt, 1);
            tx.send(proto::SubscribeRequest {
                release_ack_ids: vec![got[0].ack_id.clone()],
                ..Default::default()
            })
            .expect("send");
        }
        let got = next_messages(&mut inbound).await;
        assert_eq!(got[0].attempt, 1, "max_attempts 1 and still deliverable");
        tx.send(proto::SubscribeRequest {
            ack_ids: vec![got[0].ack_id.clone()],
            ..Default::default()
        })
        .expect("send");
        drop(tx);
        while let Some(r) = inbound.next().await {
            r.expect("the stream ends cleanly");
        }
        let stats = b.stats("s").await;
        assert_eq!((stats.backlog, stats.dead_lettered, stats.acked), (0, 0, 1), "{stats:?}");

        // The client library's release and close do the same.
        b.publish("t", &["n"]).await;
        let mut sub = b.subscribe("s");
        let d = tokio::time::timeout(PATIENCE, sub.next_message())
            .await
            .expect("in time")
            .expect("open")
            .expect("delivery");
        sub.release(vec![d.ack_id.to_string()]);
        loop {
            match tokio::time::timeout(PATIENCE, sub.next()).await.expect("in time") {
                Some(Ok(Event::Outcome(o))) => {
                    assert_eq!(o.operation, tidings::model::AckOperation::Release);
                    assert!(matches!(o.status, tidings::model::AckStatus::Ok(_)), "{o:?}");
                    break;
                }
                Some(Ok(Event::Message(again))) => {
                    assert_eq!(again.attempt, 1);
                    sub.release(vec![again.ack_id.to_string()]);
                }
                other => panic!("{other:?}"),
            }
        }
        sub.close(PATIENCE).await;
        let again = b.pull("s", 1, PATIENCE).await;
        assert_eq!(again[0].attempt, 1, "closing after a release counted nothing");
        b.stop().await;
    }
}

backend_test! {
    /// Ten messages of 1 MiB reach a client that accepts 4 MiB per message
    /// (gRPC's default), on a stream and by Pull; a client may ask for
    /// smaller responses; a message larger than the bound still comes.
    async fn every_response_fits_a_default_client(backend) {
        let b = TestBroker::start_with(backend, |c| {
            c.limits.max_message_bytes = 5 << 20;
        })
        .await;
        b.topic_and_sub("t", "s", |_| {}).await;
        b.topic_and_sub("t", "p", |_| {}).await;
        let mib = vec![7u8; 1 << 20];
        let messages: Vec<Outgoing> = (0..10).map(|_| Outgoing::new("t", mib.clone())).collect();
        for m in &messages {
            b.publisher().publish(std::slice::from_ref(m)).await.expect("publish");
        }
        // gRPC's default receive limit: 4 MiB.
        let mut client = SubscriberServiceClient::new(b.channel.clone());
        let (tx, mut inbound) = {
            let (tx, rx) = mpsc::unbounded_channel();
            tx.send(first_request("s")).expect("send");
            let inbound = client
                .subscribe(UnboundedReceiverStream::new(rx))
                .await
                .expect("subscribe")
                .into_inner();
            (tx, inbound)
        };
        let mut received = 0;
        while received < 10 {
            let got = next_messages(&mut inbound).await;
            assert!(got.len() <= 3, "{} MiB in one response", got.len());
            received += got.len();
            tx.send(proto::SubscribeRequest {
                ack_ids: got.iter().map(|m| m.ack_id.clone()).collect(),
                ..Default::default()
            })
            .expect("ack");
        }
        drop(inbound);
        drop(tx);

        let pulled = client
            .pull(proto::PullRequest {
                subscription: "p".into(),
                max_messages: 10,
                ..Default::default()
            })
            .await
            .expect("a pull under the client's limit")
            .into_inner()
            .messages;
        assert!((1..=3).contains(&pulled.len()), "{}", pulled.len());

        // One message per response when the client asks for 1 byte.
        let flow = FlowControl {
            max_response_bytes: 1,
            ..FlowControl::default()
        };
        let sub = b.subscribe_with("p", flow);
        drop(sub);
        let (tx, mut inbound) = raw_subscribe(
            &b,
            proto::SubscribeRequest {
                subscription: "p".into(),
                max_response_bytes: 1,
                ..Default::default()
            },
        )
        .await;
        for _ in 0..4 {
            assert_eq!(next_messages(&mut inbound).await.len(), 1);
        }
        drop(inbound);
        drop(tx);

        // A 4.5 MiB message, over the response bound, is delivered alone to
        // a client that accepts it.
        b.topic_and_sub("big", "big", |_| {}).await;
        let big = vec![1u8; (9 << 20) / 2];
        b.publisher().publish(&[Outgoing::new("big", big.clone())]).await.expect("publish");
        b.publish("big", &["small"]).await;
        let got = SubscriberServiceClient::new(b.channel.clone())
            .max_decoding_message_size(8 << 20)
            .pull(proto::PullRequest {
                subscription: "big".into(),
                max_messages: 2,
                ..Default::default()
            })
            .await
            .expect("pull")
            .into_inner()
            .messages;
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].message.as_ref().map(|m| m.payload.len()), Some(big.len()));
        b.stop().await;
    }
}

backend_test! {
    /// The size limit covers payload, ordering key and attributes together.
    async fn attributes_count_toward_the_message_limit(backend) {
        let b = TestBroker::start_with(backend, |c| c.limits.max_message_bytes = 1024).await;
        b.topic_and_sub("t", "s", |_| {}).await;
        let mut m = wire(Outgoing::new("t", Vec::new()));
        m.attributes.insert("big".into(), "x".repeat(2000));
        let err = b
            .raw_publisher()
            .publish(publish_request(vec![m]))
            .await
            .expect_err("refused");
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().contains("attributes 2003"), "{}", err.message());
        assert!(err.message().contains("limit is 1024"), "{}", err.message());
        let mut m = wire(Outgoing::new("t", Vec::new()));
        m.attributes.insert(String::new(), "v".into());
        let err = b
            .raw_publisher()
            .publish(publish_request(vec![m]))
            .await
            .expect_err("refused");
        assert!(err.message().contains("empty name"), "{}", err.message());
        assert_eq!(b.stats("s").await.backlog, 0);
        b.stop().await;
    }
}

backend_test! {
    /// Values storage cannot hold are refused before the group commit with
    /// INVALID_ARGUMENT naming them, on both backends, while other clients'
    /// publishes and streams go on unharmed.
    async fn one_clients_bad_input_never_fails_anothers(backend) {
        let b = TestBroker::start(backend).await;
        b.topic_and_sub("t", "s", |_| {}).await;
        let bad = async {
            let mut publisher = b.raw_publisher();
            for i in 0..100 {
                let mut m = wire(Outgoing::new("t", "bad").with_key(format!("k\0{i}")));
                m.topic = "t".into();
                let err = publisher
                    .publish(publish_request(vec![m]))
                    .await
                    .expect_err("a NUL key is refused");
                assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
                assert!(err.message().contains("NUL"), "{}", err.message());
            }
        };
        let good = async {
            let publisher = b.publisher();
            for i in 0..100 {
                publisher
                    .publish(&[Outgoing::new("t", format!("good {i}")).with_key("k")])
                    .await
                    .expect("a good publish is never failed by a bad one");
            }
        };
        tokio::join!(bad, good);
        let leased = b.pull("s", 1, PATIENCE).await;
        let err = b
            .nack("s", &leased[0].ack_id, None, "broke\0here")
            .await
            .expect_err("a NUL reason is refused");
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().contains("reason"), "{}", err.message());
        assert_eq!(b.stats("s").await.backlog, 100);
        b.stop().await;
    }
}

/// Makes storage itself refuse messages with the ordering key `poison`, the
/// way a value no validation foresaw would: a trigger in the broker's own
/// database.
async fn poison_storage(b: &TestBroker, backend: &Backend) {
    use sqlx::Connection;
    match backend {
        Backend::Sqlite => {
            let path = b.data_dir().join("tidings.db");
            let mut c =
                sqlx::sqlite::SqliteConnection::connect(&format!("sqlite://{}", path.display()))
                    .await
                    .expect("open the broker's database");
            sqlx::query("PRAGMA busy_timeout = 10000")
                .execute(&mut c)
                .await
                .expect("busy timeout");
            sqlx::query(
                "CREATE TRIGGER poison BEFORE INSERT ON messages WHEN NEW.key = 'poison' \
                 BEGIN SELECT RAISE(ABORT, 'poison refused by storage'); END",
            )
            .execute(&mut c)
            .await
            .expect("create trigger");
        }
        Backend::Postgres(_) => {
            let url = b.database_url().expect("a database");
            let mut c = sqlx::postgres::PgConnection::connect(url)
                .await
                .expect("connect");
            sqlx::raw_sql(
                "CREATE FUNCTION poison() RETURNS trigger LANGUAGE plpgsql AS $$ \
                 BEGIN IF NEW.key = 'poison' THEN RAISE EXCEPTION 'poison refused by storage'; \
                 END IF; RETURN NEW; END $$; \
                 CREATE TRIGGER poison BEFORE INSERT ON messages \
                 FOR EACH ROW EXECUTE FUNCTION poison();",
            )
            .execute(&mut c)
            .await
            .expect("create trigger");
        }
    }
}

backend_test! {
    /// When storage refuses one request of a group commit, only that
    /// request fails: the others in its group are committed, and a stream
    /// consuming meanwhile never breaks.
    async fn a_request_storage_refuses_fails_alone(backend) {
        let b = TestBroker::start(backend.clone()).await;
        b.topic_and_sub("t", "s", |_| {}).await;
        poison_storage(&b, &backend).await;
        // Alone in its group, it gets its own error too, not "retry".
        let err = b
            .publisher()
            .publish(&[Outgoing::new("t", "alone").with_key("poison")])
            .await
            .expect_err("refused by storage");
        assert!(!err.is_retryable(), "a permanent failure said retry: {err}");
        let mut sub = b.subscribe("s");
        let mut down = sub.down();
        let mut publishers = Vec::new();
        for p in 0..4 {
            let publisher = b.publisher();
            publishers.push(tokio::spawn(async move {
                let (mut good, mut refused) = (0, 0);
                for i in 0..50 {
                    let key = if (i + p) % 5 == 0 { "poison" } else { "fine" };
                    let m = Outgoing::new("t", format!("{p}/{i}")).with_key(key);
                    match publisher.publish(&[m]).await {
                        Ok(_) => {
                            assert_eq!(key, "fine");
                            good += 1;
                        }
                        Err(e) => {
                            assert_eq!(key, "poison", "a good publish failed: {e}");
                            assert!(!e.is_retryable(), "a permanent failure said retry: {e}");
                            refused += 1;
                        }
                    }
                }
                (good, refused)
            }));
        }
        let (mut good, mut refused) = (0, 0);
        for p in publishers {
            let (g, r) = p.await.expect("publisher");
            good += g;
            refused += r;
        }
        assert_eq!((good, refused), (160, 40));
        let mut seen = 0;
        while seen < good {
            let d = tokio::time::timeout(PATIENCE, sub.next_message())
                .await
                .expect("in time")
                .expect("open")
                .expect("delivery");
            sub.ack(vec![d.ack_id.to_string()]);
            seen += 1;
        }
        assert!(down.borrow_and_update().is_none(), "the stream never broke");
        assert!(!down.has_changed().unwrap_or(true), "the stream never broke");
        b.stop().await;
    }
}

backend_test! {
    /// A PublishStream request over --max-request-bytes ends the stream
    /// with an error naming it; nothing after it is stored.
    async fn an_oversized_stream_request_ends_the_stream_with_an_error(backend) {
        let b = TestBroker::start_with(backend, |c| {
            c.max_request_bytes = 64 * 1024;
            c.limits.max_message_bytes = 32 * 1024;
        })
        .await;
        b.topic_and_sub("t", "s", |_| {}).await;
        let (tx, rx) = mpsc::unbounded_channel();
        let request = |payload: Vec<u8>| proto::PublishStreamRequest {
            messages: vec![wire(Outgoing::new("t", payload))],
        };
        tx.send(request(b"first".to_vec())).expect("send");
        let mut inbound = PublisherServiceClient::new(b.channel.clone())
            .publish_stream(UnboundedReceiverStream::new(rx))
            .await
            .expect("open")
            .into_inner();
        let first = inbound.message().await.expect("answered").expect("open");
        assert_eq!(first.results[0].sequence, 1);
        tx.send(request(vec![0; 100 * 1024])).expect("send");
        tx.send(request(b"after".to_vec())).expect("send");
        let err = match tokio::time::timeout(PATIENCE, inbound.message())
            .await
            .expect("in time")
        {
            Ok(Some(r)) => panic!("unexpected answer {r:?}"),
            Ok(None) => panic!("the stream ended with OK"),
            Err(status) => status,
        };
        assert_eq!(err.code(), Code::OutOfRange, "{}", err.message());
        assert!(err.message().contains("request 1"), "{}", err.message());
        let topic = b.admin().get_topic("t").await.expect("topic");
        assert_eq!(topic.last_sequence, 1, "nothing after the oversized request");
        b.stop().await;
    }
}

backend_test! {
    /// Issue 14: what a PublishStream stored is a prefix of what it sent.
    /// Requests queued behind one that fails (a topic that does not exist,
    /// found by the writer; a message the broker refuses before queueing)
    /// are not stored, even when they were read before it failed.
    async fn a_publish_stream_stores_nothing_after_a_failed_request(backend) {
        let b = TestBroker::start(backend).await;
        b.topic_and_sub("t", "s", |_| {}).await;
        let request = |topic: &str, payload: &str| proto::PublishStreamRequest {
            messages: vec![wire(Outgoing::new(topic, payload.as_bytes().to_vec()))],
        };
        let mut bad_id = request("t", "bad id");
        bad_id.messages[0].id = "not a uuid".into();
        let cases = [("missing topic", request("nope", "x")), ("bad message", bad_id)];
        let mut stored = 0;
        for (case, failing) in cases {
            // All sent at once: the broker reads them before the second
            // fails.
            let (tx, rx) = mpsc::unbounded_channel();
            for r in [request("t", "before"), failing, request("t", "after"), request("t", "after")] {
                tx.send(r).expect("send");
            }
            let mut inbound = PublisherServiceClient::new(b.channel.clone())
                .publish_stream(UnboundedReceiverStream::new(rx))
                .await
                .expect("open")
                .into_inner();
            let first = inbound.message().await.expect("answered").expect("open");
            stored += 1;
            assert_eq!(first.results[0].sequence, stored, "{case}");
            let failed = tokio::time::timeout(PATIENCE, inbound.message())
                .await
                .expect("in time");
            assert!(failed.is_err(), "{case}: {failed:?}");
            drop(tx);
            // Whatever else it answers, nothing after the failure is stored.
            tokio::time::sleep(Duration::from_millis(300)).await;
            let topic = b.admin().get_topic("t").await.expect("topic");
            assert_eq!(topic.last_sequence, stored, "{case}: nothing after the failed request");
        }
        b.stop().await;
    }
}

backend_test! {
    /// Nothing a client sends makes an error grow without bound: refused
    /// acks are listed up to a fixed number, long values are cut, and the
    /// count of items per request is limited.
    async fn errors_stay_small_whatever_the_input(backend) {
        let b = TestBroker::start(backend).await;
        b.topic_and_sub("t", "s", |_| {}).await;
        let made_up: Vec<String> = (0..300).map(|i| format!("1-{i:x}-ff-{i:x}")).collect();
        let err = b.ack("s", made_up).await.expect_err("refused");
        assert_eq!(err.code(), Code::FailedPrecondition);
        assert!(err.message().contains("300 of 300 refused"), "{}", err.message());
        let details = err.details().len() + err.message().len();
        assert!(details < 4096, "{details} bytes of status for 300 ids");

        let too_many: Vec<String> = (0..20_000).map(|i| format!("1-{i:x}-ff")).collect();
        let err = b.ack("s", too_many).await.expect_err("refused");
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().contains("limit is 10000"), "{}", err.message());

        let err = b.ack("s", vec!["x".repeat(1 << 20)]).await.expect_err("refused");
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().len() < 200, "{}", err.message());

        let long_name = format!("{}!", "n".repeat(10_000));
        let err = b.admin().get_topic(&long_name).await.expect_err("refused");
        assert!(err.to_string().len() < 200, "{err}");
        let err = b
            .raw_admin()
            .get_subscription(proto::GetSubscriptionRequest {
                name: format!("a\u{1}{}", "b".repeat(200)),
            })
            .await
            .expect_err("refused");
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().len() < 400, "{}", err.message());

        let mut m = wire(Outgoing::new("t", "x"));
        m.id = "u".repeat(100_000);
        let err = b
            .raw_publisher()
            .publish(publish_request(vec![m]))
            .await
            .expect_err("refused");
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().len() < 300, "{}", err.message());
        b.stop().await;
    }
}

backend_test! {
    /// Values outside their range are refused with INVALID_ARGUMENT (or
    /// FAILED_PRECONDITION) naming the field, never stored or clamped.
    async fn values_out_of_range_are_refused(backend) {
        let b = TestBroker::start(backend).await;
        b.topic_and_sub("t", "s", |_| {}).await;
        let year_10000 = prost_types::Timestamp { seconds: 253_402_300_800, nanos: 0 };
        let expect = |r: Result<tonic::Status, String>, code: Code, says: &str| {
            let status = r.unwrap_or_else(|what| panic!("{what} was accepted"));
            assert_eq!(status.code(), code, "{}", status.message());
            assert!(status.message().contains(says), "{:?} should say {says:?}", status.message());
        };

        for t in [
            year_10000,
            prost_types::Timestamp { seconds: -62_135_596_801, nanos: 0 },
            prost_types::Timestamp { seconds: 0, nanos: -1 },
        ] {
            let mut m = wire(Outgoing::new("t", "x"));
            m.create_time = Some(t);
            let r = b.raw_publisher().publish(publish_request(vec![m])).await;
            expect(r.err().ok_or("create_time".into()), Code::InvalidArgument, "create_time");
        }

        let leased = b.pull("s", 1, PATIENCE).await;
        assert!(leased.is_empty(), "nothing was stored");
        b.publish("t", &["m"]).await;
        let leased = b.pull("s", 1, PATIENCE).await;
        let r = b
            .nack("s", &leased[0].ack_id, Some(Duration::from_secs(10 * 365 * 86_400)), "")
            .await;
        expect(r.err().ok_or("a 10-year delay".into()), Code::InvalidArgument, "delay");

        let seek = |target| proto::SeekRequest { subscription: "s".into(), target: Some(target) };
        let r = b.raw_admin().seek(seek(proto::seek_request::Target::Time(year_10000))).await;
        expect(r.err().ok_or("seek to 10000".into()), Code::InvalidArgument, "time");
        let r = b.raw_admin().seek(seek(proto::seek_request::Target::Sequence(-1))).await;
        expect(r.err().ok_or("seek to -1".into()), Code::InvalidArgument, "sequence");

        let r = b
            .raw_admin()
            .create_subscription(proto::CreateSubscriptionRequest {
                subscription: Some(proto::Subscription {
                    name: "future".into(),
                    topic: "t".into(),
                    start: Some(proto::subscription::Start::StartTime(year_10000)),
                    ..Default::default()
                }),
            })
            .await;
        expect(r.err().ok_or("start_time 10000".into()), Code::InvalidArgument, "start_time");

        let r = b
            .raw_subscriber()
            .pull(proto::PullRequest {
                subscription: "s".into(),
                max_messages: 1,
                max_wait: Some(pb(Duration::from_secs(3600))),
                ..Default::default()
            })
            .await;
        expect(r.err().ok_or("max_wait 1h".into()), Code::InvalidArgument, "max_wait");

        for n in 0..3 {
            b.admin().create_topic(&format!("page{n}")).await.expect("topic");
        }
        let page = b
            .raw_admin()
            .list_topics(proto::ListTopicsRequest { page_size: 1, page_token: String::new() })
            .await
            .expect("list")
            .into_inner();
        let token = page.next_page_token;
        b.raw_admin()
            .list_topics(proto::ListTopicsRequest { page_size: 1, page_token: token.clone() })
            .await
            .expect("the token as issued works");
        let r = b
            .raw_admin()
            .list_topics(proto::ListTopicsRequest { page_size: 1, page_token: token.repeat(2) })
            .await;
        expect(r.err().ok_or("a doubled token".into()), Code::InvalidArgument, "page_token");

        b.admin().create_topic("dlt").await.expect("topic");
        b.topic_and_sub("t", "with-dlt", |s| s.dead_letter_topic = "dlt".into()).await;
        let r = b.admin().delete_topic("dlt").await;
        let err = r.expect_err("a topic in use as a dead-letter topic is kept");
        assert!(matches!(err, tidings::Error::FailedPrecondition(_)), "{err}");
        assert!(err.to_string().contains("with-dlt"), "{err}");
        b.admin().get_topic("dlt").await.expect("still there");
        b.stop().await;
    }
}

backend_test! {
    /// Subscription backoffs are bounded like nack delays.
    async fn backoffs_beyond_twelve_hours_are_refused(backend) {
        let b = TestBroker::start(backend).await;
        b.admin().create_topic("t").await.expect("topic");
        let r = b
            .raw_admin()
            .create_subscription(proto::CreateSubscriptionRequest {
                subscription: Some(proto::Subscription {
                    name: "s".into(),
                    topic: "t".into(),
                    max_backoff: Some(pb(Duration::from_secs(13 * 3600))),
                    ..Default::default()
                }),
            })
            .await;
        let err = r.expect_err("refused");
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().contains("max_backoff"), "{}", err.message());
        b.stop().await;
    }
}

/// While PostgreSQL refuses connections, every call that needs it answers
/// UNAVAILABLE (retry), never INTERNAL.
#[tokio::test]
async fn calls_during_a_postgres_outage_answer_unavailable() {
    use sqlx::Connection;
    let Some(backend) = Backend::postgres() else {
        return;
    };
    let Backend::Postgres(admin_url) = &backend else {
        return;
    };
    let b = TestBroker::start(backend.clone()).await;
    b.topic_and_sub("t", "s", |_| {}).await;
    let url = b.database_url().expect("a database").to_owned();
    let name = url.rsplit('/').next().expect("a database name").to_owned();
    let mut admin = sqlx::postgres::PgConnection::connect(admin_url)
        .await
        .expect("connect");
    let refuse = |allow: bool| format!("ALTER DATABASE {name} ALLOW_CONNECTIONS {allow}");
    sqlx::raw_sql(sqlx::AssertSqlSafe(refuse(false)))
        .execute(&mut admin)
        .await
        .expect("refuse connections");
    sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1")
        .bind(&name)
        .execute(&mut admin)
        .await
        .expect("terminate the broker's connections");

    let mut codes = Vec::new();
    let mut a = b.raw_admin();
    let mut s = b.raw_subscriber();
    codes.push((
        "GetTopic",
        a.get_topic(proto::GetTopicRequest { name: "t".into() })
            .await
            .err(),
    ));
    codes.push((
        "ListTopics",
        a.list_topics(proto::ListTopicsRequest::default())
            .await
            .err(),
    ));
    codes.push((
        "GetSubscription",
        a.get_subscription(proto::GetSubscriptionRequest { name: "s".into() })
            .await
            .err(),
    ));
    codes.push((
        "ListSubscriptions",
        a.list_subscriptions(proto::ListSubscriptionsRequest::default())
            .await
            .err(),
    ));
    codes.push((
        "GetSubscriptionStats",
        a.get_subscription_stats(proto::GetSubscriptionStatsRequest {
            subscription: "s".into(),
        })
        .await
        .err(),
    ));
    codes.push((
        "ListDeadLetters",
        a.list_dead_letters(proto::ListDeadLettersRequest {
            subscription: "s".into(),
            ..Default::default()
        })
        .await
        .err(),
    ));
    codes.push((
        "Pull",
        s.pull(proto::PullRequest {
            subscription: "s".into(),
            ..Default::default()
        })
        .await
        .err(),
    ));
    let (tx, rx) = mpsc::unbounded_channel();
    tx.send(first_request("s")).expect("send");
    let subscribe = match s.subscribe(UnboundedReceiverStream::new(rx)).await {
        Err(status) => Some(status),
        Ok(r) => r.into_inner().message().await.err(),
    };
    codes.push(("Subscribe", subscribe));
    codes.push((
        "Publish",
        b.raw_publisher()
            .publish(publish_request(vec![wire(Outgoing::new("t", "x"))]))
            .await
            .err(),
    ));

    sqlx::raw_sql(sqlx::AssertSqlSafe(refuse(true)))
        .execute(&mut admin)
        .await
        .expect("accept connections again");
    for (call, status) in codes {
        let status = status.unwrap_or_else(|| panic!("{call} succeeded during the outage"));
        assert_eq!(
            status.code(),
            Code::Unavailable,
            "{call}: {}",
            status.message()
        );
    }
    b.stop().await;
}

/// A field 1 of bytes: sent where a request's field 1 is a string, with
/// bytes that are not UTF-8, it makes a request that does not decode.
#[derive(Clone, PartialEq, prost::Message)]
struct NotUtf8 {
    #[prost(bytes = "vec", tag = "1")]
    field: Vec<u8>,
}

backend_test! {
    /// A request that is not a valid message is the client's error
    /// (INVALID_ARGUMENT), not the broker's (INTERNAL), unary or streamed.
    async fn undecodable_requests_are_invalid_arguments(backend) {
        let b = TestBroker::start(backend).await;
        b.topic_and_sub("t", "s", |_| {}).await;
        let garbage = NotUtf8 { field: vec![0xff, 0xfe, 0x80] };
        for path in [
            "/tidings.v1.AdminService/GetTopic",
            "/tidings.v1.AdminService/CreateTopic",
            "/tidings.v1.SubscriberService/Pull",
            "/tidings.v1.SubscriberService/Ack",
            "/tidings.v1.PublisherService/Publish",
        ] {
            let mut grpc = tonic::client::Grpc::new(b.channel.clone());
            grpc.ready().await.expect("ready");
            let err = grpc
                .unary::<NotUtf8, NotUtf8, _>(
                    tonic::Request::new(garbage.clone()),
                    tonic::codegen::http::uri::PathAndQuery::from_static(path),
                    tonic_prost::ProstCodec::default(),
                )
                .await
                .expect_err("refused");
            assert_eq!(err.code(), Code::InvalidArgument, "{path}: {}", err.message());
            assert!(err.message().contains("decode"), "{path}: {}", err.message());
        }
        for path in [
            "/tidings.v1.SubscriberService/Subscribe",
            "/tidings.v1.PublisherService/PublishStream",
        ] {
            let mut grpc = tonic::client::Grpc::new(b.channel.clone());
            grpc.ready().await.expect("ready");
            let requests = futures_util::stream::iter(vec![garbage.clone()]);
            let answer = grpc
                .streaming::<_, NotUtf8, NotUtf8, _>(
                    tonic::Request::new(requests),
                    tonic::codegen::http::uri::PathAndQuery::from_static(path),
                    tonic_prost::ProstCodec::default(),
                )
                .await;
            let err = match answer {
                Err(status) => status,
                Ok(r) => {
                    let mut inbound = r.into_inner();
                    loop {
                        match inbound.message().await {
                            Ok(Some(_)) => continue,
                            Ok(None) => panic!("{path}: ended with OK"),
                            Err(status) => break status,
                        }
                    }
                }
            };
            assert_eq!(err.code(), Code::InvalidArgument, "{path}: {}", err.message());
        }
        b.stop().await;
    }
}

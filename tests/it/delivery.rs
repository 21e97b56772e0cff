//! Leases, redelivery, backoff, dead letters and fan-out.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use tidings::client::{Event, FlowControl};
use tidings::model::SubscriptionPatch;
use tidings::proto;
use tonic::Code;

use crate::harness::{TestBroker, backend_test, ms, payload, pb, seq};

backend_test! {
    async fn redelivers_after_lease_expires_with_attempt_two(backend) {
        let b = TestBroker::start(backend).await;
        b.topic_and_sub("t", "s", |s| {
            s.ack_deadline = Some(pb(ms(200)));
            s.min_backoff = Some(pb(ms(10)));
        })
        .await;
        b.publish("t", &["x"]).await;
        // Taken before the lease, so the deadline is at least 200 ms later.
        let leased_at = Instant::now();
        let first = b.pull("s", 1, Duration::from_secs(5)).await;
        assert_eq!(first[0].attempt, 1);
        // Not redelivered while the lease holds.
        assert!(b.pull("s", 1, ms(50)).await.is_empty());
        let second = b.pull("s", 1, Duration::from_secs(5)).await;
        assert!(
            leased_at.elapsed() >= ms(200),
            "redelivered only after the deadline"
        );
        assert_eq!(second.len(), 1);
        assert_eq!(second[0].attempt, 2);
        assert_eq!(seq(&second[0]), seq(&first[0]));
        assert_ne!(second[0].ack_id, first[0].ack_id);
        assert_eq!(b.stats("s").await.redelivered, 1);
        b.stop().await;
    }
}

backend_test! {
    async fn stale_ack_is_refused_in_every_lease_expiry_case(backend) {
        let b = TestBroker::start(backend).await;
        b.topic_and_sub("t", "s", |s| {
            s.ack_deadline = Some(pb(ms(150)));
            s.min_backoff = Some(pb(ms(500)));
            s.max_backoff = Some(pb(ms(500)));
        })
        .await;
        b.publish("t", &["x"]).await;
        let first = b.pull("s", 1, Duration::from_secs(5)).await.remove(0);

        // Expired but not yet redelivered (waiting out the backoff): refused.
        tokio::time::sleep(ms(250)).await;
        let err = b
            .ack("s", vec![first.ack_id.clone()])
            .await
            .expect_err("stale");
        assert_eq!(err.code(), Code::FailedPrecondition);
        assert!(err.message().contains("stale"), "{}", err.message());

        // Long leases from here on: on a slow machine the redelivery's
        // lease could otherwise run out too, and the stream below would
        // get a third attempt before the answer it is asked for.
        let patch = SubscriptionPatch {
            ack_deadline: Some(Duration::from_secs(60)),
            ..Default::default()
        };
        b.admin().update_subscription("s", patch).await.unwrap();

        // Redelivered to someone else: the old lease stays refused, on the
        // stream too, and the new lease works.
        let second = b.pull("s", 1, Duration::from_secs(5)).await.remove(0);
        assert_eq!(second.attempt, 2);
        let mut sub = b.subscribe("s");
        sub.ack(vec![first.ack_id.clone()]);
        match sub.next().await {
            Some(Ok(Event::Outcome(o))) => {
let o = proto::AckOutcome::from(o);
                assert_eq!(o.result, proto::AckResult::Stale as i32);
                assert_eq!(o.ack_id, first.ack_id);
                assert!(o.detail.contains("leased again"), "{}", o.detail);
            }
            other => panic!("expected a stale outcome, got {other:?}"),
        }
        b.ack("s", vec![second.ack_id.clone()])
            .await
            .expect("current lease acks");
        // Acking again: unknown, the message is done.
        let err = b
            .ack("s", vec![second.ack_id.clone()])
            .await
            .expect_err("already acked");
        assert_eq!(err.code(), Code::FailedPrecondition);
        let err = b
            .ack("s", vec!["garbage".into()])
            .await
            .expect_err("malformed");
        assert!(
            err.message().contains("malformed ack id"),
            "{}",
            err.message()
        );
        drop(sub);
        b.stop().await;
    }
}

backend_test! {
    async fn nack_delay_and_backoff_are_honoured(backend) {
        let b = TestBroker::start(backend).await;
        b.topic_and_sub("t", "s", |s| {
            s.min_backoff = Some(pb(ms(200)));
            s.max_backoff = Some(pb(ms(1000)));
        })
        .await;
        b.publish("t", &["x"]).await;

        // An explicit delay wins over the backoff.
        let m = b.pull("s", 1, Duration::from_secs(5)).await.remove(0);
        let t0 = Instant::now();
        b.nack("s", &m.ack_id, Some(ms(400)), "busy").await.unwrap();
        let m = b.pull("s", 1, Duration::from_secs(5)).await.remove(0);
        assert!(
            t0.elapsed() >= ms(400),
            "delay honoured: {:?}",
            t0.elapsed()
        );
        assert_eq!(m.attempt, 2);

        // Without a delay: min_backoff doubled per attempt (attempt 2 → 400 ms).
        let t0 = Instant::now();
        b.nack("s", &m.ack_id, None, "still busy").await.unwrap();
        let m = b.pull("s", 1, Duration::from_secs(5)).await.remove(0);
        assert!(
            t0.elapsed() >= ms(400),
            "backoff honoured: {:?}",
            t0.elapsed()
        );
        assert_eq!(m.attempt, 3);
        b.stop().await;
    }
}

backend_test! {
    async fn max_attempts_dead_letters_with_the_reason_and_redrive_delivers_again(backend) {
        let b = TestBroker::start(backend).await;
        b.admin().create_topic("dlq").await.unwrap();
        b.topic_and_sub("t", "s", |s| {
            s.max_attempts = 2;
            s.min_backoff = Some(pb(ms(10)));
            s.dead_letter_topic = "dlq".into();
        })
        .await;
        b.topic_and_sub("dlq", "dlq-watch", |_| {}).await;
        b.publish("t", &["poison", "fine"]).await;

        for attempt in 1..=2 {
            let got = b.pull("s", 10, Duration::from_secs(5)).await;
            for m in got {
                if payload(&m) == "poison" {
                    assert_eq!(m.attempt, attempt);
                    b.nack(
                        "s",
                        &m.ack_id,
                        None,
                        &format!("cannot parse (try {attempt})"),
                    )
                    .await
                    .unwrap();
                } else {
                    b.ack("s", vec![m.ack_id.to_string()]).await.unwrap();
                }
            }
        }
        assert!(
            b.pull("s", 10, ms(300)).await.is_empty(),
            "dead letters are not delivered"
        );
        let stats = b.stats("s").await;
        assert_eq!(stats.dead_lettered, 1);
        assert_eq!(stats.backlog, 0);

        let list = b
            .raw_admin()
            .list_dead_letters(proto::ListDeadLettersRequest {
                subscription: "s".into(),
                page_size: 10,
                page_token: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(list.total_size, 1);
        let dead = &list.dead_letters[0];
        assert_eq!(dead.attempts, 2);
        assert_eq!(dead.last_failure_reason, "cannot parse (try 2)");
        assert!(dead.first_delivery_time.is_some() && dead.last_delivery_time.is_some());
        assert_eq!(dead.message.as_ref().unwrap().payload, b"poison");

        // A copy went to the dead-letter topic, with where it came from.
        let copy = b
            .pull("dlq-watch", 1, Duration::from_secs(5))
            .await
            .remove(0);
        let attrs = &copy.message.as_ref().unwrap().attributes;
        assert_eq!(attrs["tidings.dead_letter.subscription"], "s");
        assert_eq!(attrs["tidings.dead_letter.reason"], "cannot parse (try 2)");

        let redriven = b
            .raw_admin()
            .redrive_dead_letters(proto::RedriveDeadLettersRequest {
                subscription: "s".into(),
                sequences: vec![],
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(redriven.redriven_count, 1);
        let again = b.pull("s", 1, Duration::from_secs(5)).await.remove(0);
        assert_eq!(payload(&again), "poison");
        assert_eq!(again.attempt, 1, "a redrive starts the attempts over");
        b.ack("s", vec![again.ack_id]).await.unwrap();
        assert_eq!(b.stats("s").await.dead_lettered, 0);
        b.stop().await;
    }
}

backend_test! {
    async fn lease_expiry_on_the_last_attempt_dead_letters_and_purge_removes_it(backend) {
        let b = TestBroker::start(backend).await;
        b.topic_and_sub("t", "s", |s| {
            s.max_attempts = 1;
            s.ack_deadline = Some(pb(ms(100)));
        })
        .await;
        b.publish("t", &["slow"]).await;
        b.pull("s", 1, Duration::from_secs(5)).await;
        let mut dead = 0;
        for _ in 0..100 {
            dead = b.stats("s").await.dead_lettered;
            if dead == 1 {
                break;
            }
            tokio::time::sleep(ms(20)).await;
        }
        assert_eq!(
            dead, 1,
            "expired lease on the last attempt is dead-lettered"
        );
        let err = b
            .raw_admin()
            .purge_dead_letters(proto::PurgeDeadLettersRequest {
                subscription: "s".into(),
                sequences: vec![],
                all: false,
            })
            .await
            .expect_err("purge needs an explicit choice");
        assert_eq!(err.code(), Code::InvalidArgument);
        let purged = b
            .raw_admin()
            .purge_dead_letters(proto::PurgeDeadLettersRequest {
                subscription: "s".into(),
                sequences: vec![],
                all: true,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(purged.purged_count, 1);
        assert_eq!(b.stats("s").await.dead_lettered, 0);
        b.stop().await;
    }
}

backend_test! {
    async fn extended_lease_is_not_redelivered(backend) {
        let b = TestBroker::start(backend).await;
        // A lease long enough that the extension reaches the broker before
        // it ends, however busy the machine; a backoff short enough that,
        // unextended, it would come again within the pull below.
        b.topic_and_sub("t", "s", |s| {
            s.ack_deadline = Some(pb(ms(1000)));
            s.min_backoff = Some(pb(ms(10)));
            s.max_backoff = Some(pb(ms(10)));
        })
        .await;
        b.publish("t", &["x"]).await;
        let m = b.pull("s", 1, Duration::from_secs(5)).await.remove(0);
        let r = b
            .raw_subscriber()
            .extend_lease(proto::ExtendLeaseRequest {
                subscription: "s".into(),
                extensions: vec![proto::LeaseExtension {
                    ack_id: m.ack_id.clone(),
                    extension: Some(pb(Duration::from_secs(5))),
                }],
            })
            .await
            .unwrap()
            .into_inner();
        assert!(r.outcomes[0].lease_deadline.is_some());
        assert!(
            b.pull("s", 1, ms(1500)).await.is_empty(),
            "still leased after the first deadline"
        );
        b.ack("s", vec![m.ack_id.to_string()])
            .await
            .expect("extended lease acks");
        b.stop().await;
    }
}

backend_test! {
    async fn two_consumers_never_hold_the_same_message_at_once(backend) {
        let b = TestBroker::start(backend).await;
        b.topic_and_sub("t", "s", |s| {
            s.ack_deadline = Some(pb(Duration::from_secs(30)))
        })
        .await;
        let payloads: Vec<String> = (0..300).map(|i| format!("m{i}")).collect();
        let refs: Vec<&str> = payloads.iter().map(String::as_str).collect();
        b.publish("t", &refs).await;

        let flow = FlowControl {
            max_messages: 20,
            max_bytes: 1 << 20,
            ..Default::default()
        };
        let mut tasks = Vec::new();
        for _ in 0..2 {
            let mut sub = b.subscribe_with("s", flow);
            tasks.push(tokio::spawn(async move {
                let mut seen = Vec::new();
                loop {
                    match tokio::time::timeout(ms(1500), sub.next_message()).await {
                        Ok(Some(Ok(m))) => {
                            seen.push(seq(&m));
                            // Hold it a little so that both consumers hold leases.
                            tokio::time::sleep(ms(1)).await;
                            sub.ack(vec![m.ack_id.to_string()]);
                        }
                        Ok(other) => panic!("subscription failed: {other:?}"),
                        Err(_) => return seen,
                    }
                }
            }));
        }
        let mut all = Vec::new();
        let mut per_consumer = Vec::new();
        for t in tasks {
            let seen = t.await.unwrap();
            per_consumer.push(seen.len());
            all.extend(seen);
        }
        let unique: HashSet<i64> = all.iter().copied().collect();
        assert_eq!(all.len(), 300, "each message leased once: {per_consumer:?}");
        assert_eq!(unique.len(), 300);
        assert!(
            per_consumer.iter().all(|&n| n > 0),
            "both consumers got work: {per_consumer:?}"
        );
        b.stop().await;
    }
}

backend_test! {
    async fn two_subscriptions_each_get_every_message(backend) {
        let b = TestBroker::start(backend).await;
        b.topic_and_sub("t", "a", |_| {}).await;
        b.topic_and_sub("t", "b", |_| {}).await;
        b.publish("t", &["1", "2", "3"]).await;
        let mut by_sub: HashMap<&str, Vec<String>> = HashMap::new();
        for sub in ["a", "b"] {
            let got = b.pull(sub, 10, Duration::from_secs(5)).await;
            b.ack(sub, got.iter().map(|m| m.ack_id.clone()).collect())
                .await
                .unwrap();
            by_sub.insert(sub, got.iter().map(payload).collect());
        }
        assert_eq!(by_sub["a"], vec!["1", "2", "3"]);
        assert_eq!(by_sub["b"], vec!["1", "2", "3"]);
        b.stop().await;
    }
}

backend_test! {
    async fn subscriber_stream_is_woken_by_a_publish(backend) {
        let b = TestBroker::start_with(backend, |c| c.limits.poll_interval = Duration::from_secs(30)).await;
        b.topic_and_sub("t", "s", |_| {}).await;
        let mut sub = b.subscribe("s");
        // Let the stream go idle, then publish: with a 30 s poll interval only
        // the wake-up can deliver in time.
        tokio::time::sleep(ms(200)).await;
        b.publish("t", &["wake"]).await;
        let m = tokio::time::timeout(Duration::from_secs(5), sub.next_message())
            .await
            .expect("woken without polling")
            .unwrap()
            .unwrap();
        assert_eq!(payload(&m), "wake");
        drop(sub);
        b.stop().await;
    }
}

backend_test! {
    async fn leases_of_a_closed_stream_are_released_for_prompt_redelivery(backend) {
        let b = TestBroker::start(backend).await;
        b.topic_and_sub("t", "s", |s| {
            s.ack_deadline = Some(pb(Duration::from_secs(60)))
        })
        .await;
        b.publish("t", &["x"]).await;
        let mut first = b.subscribe("s");
        let m = first.next_message().await.unwrap().unwrap();
        assert_eq!(m.attempt, 1);
        first.close(Duration::from_secs(10)).await;
        // Far sooner than the 60 s lease: the broker took it back when the
        // client closed the stream, without counting an attempt.
        let again = b.pull("s", 1, Duration::from_secs(10)).await;
        assert_eq!(again.len(), 1, "released lease is redelivered");
        assert_eq!(again[0].attempt, 1);
        // Dropped without closing: back as promptly.
        let mut second = b.subscribe("s");
        b.raw_subscriber()
            .nack(proto::NackRequest {
                subscription: "s".into(),
                nacks: vec![proto::Nack {
                    ack_id: again[0].ack_id.clone(),
                    delay: Some(pb(Duration::ZERO)),
                    reason: String::new(),
                }],
            })
            .await
            .expect("nack");
        let m = second.next_message().await.unwrap().unwrap();
        assert_eq!(m.attempt, 2);
        drop(second);
        let again = b.pull("s", 1, Duration::from_secs(10)).await;
        assert_eq!(again.len(), 1, "a dropped stream's lease is redelivered");
        b.stop().await;
    }
}

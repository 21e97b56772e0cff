//! Ordered subscriptions: per-key order, and a failing key blocks only itself.

use std::time::Duration;

use tidings::client::Outgoing;
use tidings::model::SubscriptionPatch;
use tidings::proto;
use tonic_types::StatusExt;

use crate::harness::{TestBroker, backend_test, ms, payload, pb};

async fn publish_keyed(b: &TestBroker, items: &[(&str, &str)]) {
    let messages: Vec<Outgoing> = items
        .iter()
        .map(|(k, p)| Outgoing::new("t", p.as_bytes()).with_key(*k))
        .collect();
    b.publisher().publish(&messages).await.unwrap();
}

backend_test! {
    async fn ordered_subscription_keeps_key_order_and_a_failing_key_blocks_only_itself(backend) {
        let b = TestBroker::start(backend).await;
        b.topic_and_sub("t", "s", |s| {
            s.ordered = true;
            s.min_backoff = Some(pb(ms(600)));
            s.max_backoff = Some(pb(ms(600)));
        })
        .await;
        publish_keyed(
            &b,
            &[
                ("a", "a1"),
                ("b", "b1"),
                ("a", "a2"),
                ("b", "b2"),
                ("a", "a3"),
                ("b", "b3"),
            ],
        )
        .await;

        // Each key's messages go out together, in order: a run the caller
        // processes in order (issue 14).
        let all = b.pull("s", 10, Duration::from_secs(5)).await;
        assert_eq!(names(&all), vec!["a1", "b1", "a2", "b2", "a3", "b3"]);
        let id = |name: &str| all.iter().find(|m| payload(m) == name).unwrap().ack_id.clone();
        b.nack("s", &id("a1"), None, "a is broken").await.unwrap();
        // The nack ended the leases of a2 and a3: they wait behind a1.
        let (late, _) = refused(b.ack("s", vec![id("a2"), id("a3")]).await);
        assert_eq!(late, vec![id("a2"), id("a3")]);
        // Key b keeps flowing while a waits for its backoff.
        b.ack("s", vec![id("b1"), id("b2"), id("b3")]).await.expect("acked");
        let stats = b.stats("s").await;
        assert_eq!(stats.blocked_keys, 1);
        assert_eq!(stats.blocked_key_sample, vec!["a"]);

        // After the backoff, a1 again with a2 and a3 behind it; their ended
        // leases did not count as attempts.
        let again = b.pull("s", 10, Duration::from_secs(5)).await;
        let seen: Vec<(String, i32)> = again.iter().map(|m| (payload(m), m.attempt)).collect();
        assert_eq!(
            seen,
            vec![("a1".into(), 2), ("a2".into(), 1), ("a3".into(), 1)]
        );
        b.ack("s", again.iter().map(|m| m.ack_id.clone()).collect())
            .await
            .expect("acked in order");
        assert_eq!(b.stats("s").await.blocked_keys, 0);
        b.stop().await;
    }
}

backend_test! {
    async fn dead_lettered_head_unblocks_its_key(backend) {
        let b = TestBroker::start(backend).await;
        b.topic_and_sub("t", "s", |s| {
            s.ordered = true;
            s.max_attempts = 1;
        })
        .await;
        publish_keyed(&b, &[("k", "k1"), ("k", "k2")]).await;
        let head = b.pull("s", 1, Duration::from_secs(5)).await;
        assert_eq!(head.len(), 1);
        b.nack("s", &head[0].ack_id, None, "bad").await.unwrap();
        let next = b.pull("s", 10, Duration::from_secs(5)).await;
        assert_eq!(next.iter().map(payload).collect::<Vec<_>>(), vec!["k2"]);
        b.stop().await;
    }
}

backend_test! {
    async fn key_order_holds_with_many_keys_and_streaming_consumers(backend) {
        let b = TestBroker::start(backend).await;
        b.topic_and_sub("t", "s", |s| s.ordered = true).await;
        let mut items = Vec::new();
        for i in 0..40 {
            for k in 0..5 {
                items.push((format!("k{k}"), format!("{k}:{i}")));
            }
        }
        let messages: Vec<Outgoing> = items
            .iter()
            .map(|(k, p)| Outgoing::new("t", p.as_bytes()).with_key(k.clone()))
            .collect();
        b.publisher().publish(&messages).await.unwrap();
        let mut sub = b.subscribe("s");
        let mut next = [0usize; 5];
        let mut got = 0;
        while got < 200 {
            let m = tokio::time::timeout(Duration::from_secs(5), sub.next_message())
                .await
                .expect("progress")
                .unwrap()
                .unwrap();
            let p = payload(&m);
            let (k, i) = p.split_once(':').unwrap();
            let (k, i): (usize, usize) = (k.parse().unwrap(), i.parse().unwrap());
            assert_eq!(i, next[k], "key {k} in order");
            next[k] += 1;
            got += 1;
            sub.ack(vec![m.ack_id.to_string()]);
        }
        drop(sub);
        b.stop().await;
    }
}

/// The payloads of `messages`, in order.
fn names(messages: &[proto::ReceivedMessage]) -> Vec<String> {
    messages.iter().map(payload).collect()
}

/// The ack ids a unary Ack refused, as its status's details name them
/// (none if it succeeded), and its message.
fn refused(result: Result<proto::AckResponse, tonic::Status>) -> (Vec<String>, String) {
    match result {
        Ok(_) => (Vec::new(), String::new()),
        Err(status) => {
            assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
            let details = status.get_error_details();
            let failure = details.precondition_failure().expect("the refused ids");
            let ids = failure
                .violations
                .iter()
                .map(|v| v.subject.clone())
                .collect();
            (ids, status.message().to_owned())
        }
    }
}

backend_test! {
    /// Issue 14: several consecutive messages of a key go out at once, and
    /// a key's acks are taken in order: an ack whose key has an earlier
    /// message in progress, delivered with it, is refused, and the message
    /// comes again after that one.
    async fn a_run_of_a_key_goes_out_at_once_and_its_acks_are_taken_in_order(backend) {
        let b = TestBroker::start(backend).await;
        b.topic_and_sub("t", "s", |s| s.ordered = true).await;
        publish_keyed(
            &b,
            &[("k", "k1"), ("k", "k2"), ("j", "j1"), ("k", "k3"), ("k", "k4")],
        )
        .await;
        let all = b.pull("s", 10, Duration::from_secs(5)).await;
        assert_eq!(names(&all), vec!["k1", "k2", "j1", "k3", "k4"]);
        let id = |name: &str| all.iter().find(|m| payload(m) == name).unwrap().ack_id.clone();

        // k3 before k1 and k2: refused, and k3 and k4 wait behind them.
        let (early, text) = refused(b.ack("s", vec![id("k3"), id("j1")]).await);
        assert_eq!(early, vec![id("k3")], "j1 is acked");
        assert!(text.contains("ordering key"), "says why: {text}");
        let none = b.pull("s", 10, ms(300)).await;
        assert!(none.is_empty(), "k3 and k4 wait for k1 and k2, got {none:?}");
        let (late, _) = refused(b.ack("s", vec![id("k4")]).await);
        assert_eq!(late, vec![id("k4")], "k4's lease ended with k3's");

        // k1 and k2 in one request, in order: both taken; then k3 and k4
        // come again together, their first attempt still.
        b.ack("s", vec![id("k2"), id("k1")]).await.expect("both acked");
        let again = b.pull("s", 10, Duration::from_secs(5)).await;
        let seen: Vec<(String, i32)> = again.iter().map(|m| (payload(m), m.attempt)).collect();
        assert_eq!(seen, vec![("k3".into(), 1), ("k4".into(), 1)]);
        b.ack("s", again.iter().map(|m| m.ack_id.clone()).collect())
            .await
            .expect("acked");
        let stats = b.stats("s").await;
        assert_eq!((stats.backlog, stats.in_flight), (0, 0), "{stats:?}");
        b.stop().await;
    }
}

backend_test! {
    /// Issue 14: when a run's leases expire, its first message counts the
    /// attempt and the later ones wait behind it, uncounted; the run comes
    /// again whole, in order. A run's last message dead-lettered while an
    /// earlier one is in progress does not let the key's next go ahead.
    async fn an_expired_run_comes_again_whole_and_in_order(backend) {
        let b = TestBroker::start(backend).await;
        b.topic_and_sub("t", "s", |s| {
            s.ordered = true;
            s.ack_deadline = Some(pb(ms(400)));
            s.min_backoff = Some(pb(ms(10)));
            s.max_backoff = Some(pb(ms(10)));
        })
        .await;
        publish_keyed(&b, &[("k", "k1"), ("k", "k2"), ("k", "k3")]).await;
        let first = b.pull("s", 10, Duration::from_secs(5)).await;
        assert_eq!(names(&first), vec!["k1", "k2", "k3"]);
        tokio::time::sleep(ms(600)).await;
        // Long leases from here on: the rest must not depend on timing.
        let patch = SubscriptionPatch {
            ack_deadline: Some(Duration::from_secs(60)),
            ..Default::default()
        };
        b.admin().update_subscription("s", patch).await.unwrap();
        let again = b.pull("s", 10, Duration::from_secs(5)).await;
        let seen: Vec<(String, i32)> = again.iter().map(|m| (payload(m), m.attempt)).collect();
        assert_eq!(
            seen,
            vec![("k1".into(), 2), ("k2".into(), 1), ("k3".into(), 1)]
        );
        let first_ids: Vec<String> = first.iter().map(|m| m.ack_id.clone()).collect();
        let (stale, _) = refused(b.ack("s", first_ids.clone()).await);
        assert_eq!(stale, first_ids);

        // A later message comes while the run is out; k3 is dead-lettered
        // (as on its last attempt): k4 still waits for k1 and k2.
        publish_keyed(&b, &[("k", "k4")]).await;
        let none = b.pull("s", 10, ms(300)).await;
        assert!(none.is_empty(), "k4 waits behind the run, got {none:?}");
        let id = |name: &str| again.iter().find(|m| payload(m) == name).unwrap().ack_id.clone();
        let patch = SubscriptionPatch {
            max_attempts: Some(1),
            ..Default::default()
        };
        b.admin().update_subscription("s", patch).await.unwrap();
        b.nack("s", &id("k3"), None, "poison").await.unwrap();
        assert_eq!(b.stats("s").await.dead_lettered, 1);
        let none = b.pull("s", 10, ms(300)).await;
        assert!(none.is_empty(), "k4 still waits for k1 and k2, got {none:?}");
        b.ack("s", vec![id("k1"), id("k2")]).await.expect("acked");
        let k4 = b.pull("s", 10, Duration::from_secs(5)).await;
        assert_eq!(names(&k4), vec!["k4"]);
        b.stop().await;
    }
}

backend_test! {
    async fn a_redriven_dead_letter_holds_back_the_later_messages_of_its_key(backend) {
        let b = TestBroker::start(backend).await;
        b.topic_and_sub("t", "s", |s| {
            s.ordered = true;
            s.max_attempts = 1;
        })
        .await;
        publish_keyed(&b, &[("k", "k1"), ("k", "k2"), ("k", "k3")]).await;
        let k1 = b.pull("s", 1, Duration::from_secs(5)).await;
        assert_eq!(names(&k1), vec!["k1"]);
        b.nack("s", &k1[0].ack_id, None, "bad").await.unwrap();
        let k2 = b.pull("s", 1, Duration::from_secs(5)).await;
        assert_eq!(names(&k2), vec!["k2"]);

        // k1 comes back while k2 is in flight: it is the key's earliest.
        let redriven = b.admin().redrive_dead_letters("s", vec![]).await.unwrap();
        assert_eq!(redriven, 1);
        let again = b.pull("s", 10, Duration::from_secs(5)).await;
        assert_eq!(names(&again), vec!["k1"]);

        // Acking k2 makes k3 next, but k1, earlier, is still in progress.
        // (k1 went out after k2: its redelivery does not make k2's ack wait.)
        b.ack("s", vec![k2[0].ack_id.clone()]).await.expect("acked");
        let none = b.pull("s", 10, ms(300)).await;
        assert!(none.is_empty(), "k3 waits for the redriven k1, got {none:?}");
        b.ack("s", vec![again[0].ack_id.clone()]).await.unwrap();
        let k3 = b.pull("s", 10, Duration::from_secs(5)).await;
        assert_eq!(names(&k3), vec!["k3"]);
        b.stop().await;
    }
}

backend_test! {
    async fn ordering_switched_off_and_on_keeps_a_key_behind_its_message_in_flight(backend) {
        let b = TestBroker::start(backend).await;
        b.topic_and_sub("t", "s", |s| s.ordered = true).await;
        publish_keyed(&b, &[("k", "k1")]).await;
        let k1 = b.pull("s", 10, Duration::from_secs(5)).await;
        assert_eq!(names(&k1), vec!["k1"]);
        // k2 and k3 come while k1 is in flight: they are held behind it.
        publish_keyed(&b, &[("k", "k2"), ("k", "k3")]).await;
        let none = b.pull("s", 10, ms(300)).await;
        assert!(none.is_empty(), "k2 and k3 wait for k1, got {none:?}");

        // Unordered, then ordered again before anyone pulls: k2 and k3 are
        // no longer held, yet k1 is in flight and k2 is earlier than k3.
        for ordered in [false, true] {
            let patch = SubscriptionPatch {
                ordered: Some(ordered),
                ..Default::default()
            };
            b.admin().update_subscription("s", patch).await.unwrap();
        }
        let none = b.pull("s", 10, ms(300)).await;
        assert!(none.is_empty(), "k2 and k3 wait for k1, got {none:?}");
        b.ack("s", vec![k1[0].ack_id.clone()]).await.unwrap();
        let k2 = b.pull("s", 10, Duration::from_secs(5)).await;
        assert_eq!(names(&k2), vec!["k2"]);
        b.ack("s", vec![k2[0].ack_id.clone()]).await.unwrap();
        let k3 = b.pull("s", 10, Duration::from_secs(5)).await;
        assert_eq!(names(&k3), vec!["k3"]);
        b.stop().await;
    }
}

/// The next event of `sub` within five seconds.
async fn next_event(sub: &mut tidings::client::Subscription) -> tidings::client::Event {
    tokio::time::timeout(Duration::from_secs(5), sub.next())
        .await
        .expect("an event in time")
        .expect("the subscription goes on")
        .expect("no error")
}

backend_test! {
    /// Issue 14: a key stays with the stream that holds its messages: a
    /// later message of the key goes to that stream before the earlier
    /// ones are acked, not to another stream, and the stream's acks are
    /// taken in key order.
    async fn a_key_stays_with_the_stream_holding_it(backend) {
        use tidings::client::Event;
        use tidings::model::AckStatus;

        let b = TestBroker::start(backend).await;
        b.topic_and_sub("t", "s", |s| s.ordered = true).await;
        let mut first = b.subscribe("s");
        publish_keyed(&b, &[("k", "k1")]).await;
        let Event::Message(k1) = next_event(&mut first).await else {
            panic!("k1 first");
        };
        // A second stream is there, asking, when k2 comes.
        let mut second = b.subscribe("s");
        tokio::time::sleep(ms(200)).await;
        publish_keyed(&b, &[("k", "k2")]).await;
        let Event::Message(k2) = next_event(&mut first).await else {
            panic!("k2 next, on the stream holding k1");
        };
        assert_eq!(k2.message.payload, b"k2");
        let nothing = tokio::time::timeout(ms(300), second.next_message()).await;
        assert!(nothing.is_err(), "the other stream gets nothing of k: {nothing:?}");

        // k2's ack before k1's is refused, and ends k2's lease.
        first.ack(vec![k2.ack_id.to_string()]);
        let Event::Outcome(refused) = next_event(&mut first).await else {
            panic!("the ack's outcome");
        };
        assert!(
            matches!(&refused.status, AckStatus::Stale(why) if why.contains("ordering key")),
            "{refused:?}"
        );
        first.ack(vec![k1.ack_id.to_string()]);
        drop(second);
        // k1's ack is taken; k2 comes again, its first attempt still.
        let (mut acked, mut again) = (None, None);
        while acked.is_none() || again.is_none() {
            match next_event(&mut first).await {
                Event::Outcome(o) => acked = Some(o.status),
                Event::Message(m) => again = Some(m),
                Event::Malformed { reason, .. } => panic!("{reason}"),
            }
        }
        assert_eq!(acked, Some(AckStatus::Ok(None)));
        let again = again.expect("k2 again");
        assert_eq!((again.message.payload.as_slice(), again.attempt), (&b"k2"[..], 1));
        drop(first);
        b.stop().await;
    }
}

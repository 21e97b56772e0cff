//! Ordered subscriptions: per-key order, and a failing key blocks only itself.

use std::time::Duration;

use tidings::client::Outgoing;
use tidings::model::SubscriptionPatch;
use tidings::proto;

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

        // Only the head of each key is handed out.
        let heads = b.pull("s", 10, Duration::from_secs(5)).await;
        let mut names: Vec<String> = heads.iter().map(payload).collect();
        names.sort();
        assert_eq!(names, vec!["a1", "b1"]);
        let a1 = heads.iter().find(|m| payload(m) == "a1").unwrap();
        let b1 = heads.iter().find(|m| payload(m) == "b1").unwrap();
        b.nack("s", &a1.ack_id, None, "a is broken").await.unwrap();
        b.ack("s", vec![b1.ack_id.clone()]).await.unwrap();

        // Key b keeps flowing while a waits for its backoff.
        let mut b_seen = Vec::new();
        while b_seen.len() < 2 {
            let got = b.pull("s", 10, Duration::from_secs(5)).await;
            assert!(!got.is_empty(), "key b is not blocked by key a");
            for m in got {
                let p = payload(&m);
                assert!(p.starts_with('b'), "key a is held back, got {p}");
                b_seen.push(p);
                b.ack("s", vec![m.ack_id.to_string()]).await.unwrap();
            }
        }
        assert_eq!(b_seen, vec!["b2", "b3"]);
        let stats = b.stats("s").await;
        assert_eq!(stats.blocked_keys, 1);
        assert_eq!(stats.blocked_key_sample, vec!["a"]);

        // After the backoff, a1 again, then a2 and a3 in order, one at a time.
        let mut a_seen = Vec::new();
        while a_seen.len() < 3 {
            let got = b.pull("s", 10, Duration::from_secs(5)).await;
            assert_eq!(got.len(), 1, "one message per key at a time");
            a_seen.push((payload(&got[0]), got[0].attempt));
            b.ack("s", vec![got[0].ack_id.clone()]).await.unwrap();
        }
        assert_eq!(
            a_seen,
            vec![("a1".into(), 2), ("a2".into(), 1), ("a3".into(), 1)]
        );
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
        let head = b.pull("s", 10, Duration::from_secs(5)).await;
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

backend_test! {
    async fn a_redriven_dead_letter_holds_back_the_later_messages_of_its_key(backend) {
        let b = TestBroker::start(backend).await;
        b.topic_and_sub("t", "s", |s| {
            s.ordered = true;
            s.max_attempts = 1;
        })
        .await;
        publish_keyed(&b, &[("k", "k1"), ("k", "k2"), ("k", "k3")]).await;
        let k1 = b.pull("s", 10, Duration::from_secs(5)).await;
        assert_eq!(names(&k1), vec!["k1"]);
        b.nack("s", &k1[0].ack_id, None, "bad").await.unwrap();
        let k2 = b.pull("s", 10, Duration::from_secs(5)).await;
        assert_eq!(names(&k2), vec!["k2"]);

        // k1 comes back while k2 is in flight: it is the key's earliest.
        let redriven = b.admin().redrive_dead_letters("s", vec![]).await.unwrap();
        assert_eq!(redriven, 1);
        let again = b.pull("s", 10, Duration::from_secs(5)).await;
        assert_eq!(names(&again), vec!["k1"]);

        // Acking k2 makes k3 next, but k1, earlier, is still in progress.
        b.ack("s", vec![k2[0].ack_id.clone()]).await.unwrap();
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
        publish_keyed(&b, &[("k", "k1"), ("k", "k2"), ("k", "k3")]).await;
        let k1 = b.pull("s", 10, Duration::from_secs(5)).await;
        assert_eq!(names(&k1), vec!["k1"]);

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

//! Ordered subscriptions: per-key order, and a failing key blocks only itself.

use std::time::Duration;

use tidings::client::{FlowControl, Outgoing};
use tidings::model::SubscriptionPatch;
use tidings::proto;
use tonic_types::StatusExt;

use crate::harness::{TestBroker, backend_test, ms, payload, pb, seq};

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

backend_test! {
    /// Keys that a list of them written as text must escape (quotes,
    /// backslashes, control characters, brackets, characters outside the
    /// BMP) are told apart and kept in order while two streams with small
    /// windows pass them back and forth, so that messages are held back,
    /// handed on and probed by key: every message comes once, each key's
    /// in order, and nothing is left behind.
    async fn keys_that_need_escaping_keep_their_order(backend) {
        let keys = [
            "plain",
            "quo\"te",
            "back\\slash",
            "back\\\"both",
            "tab\tand\nnewline",
            "\u{1}control",
            "],[\"x\",1],[\"",
            "crab \u{1f980} and é",
            "\\u0041 \u{2028}",
        ];
        const EACH: usize = 12;
        let b = TestBroker::start(backend).await;
        b.topic_and_sub("t", "s", |s| s.ordered = true).await;
        let flow = FlowControl {
            max_messages: 3,
            ..FlowControl::default()
        };
        let (mut one, mut two) = (b.subscribe_with("s", flow), b.subscribe_with("s", flow));
        let mut messages = Vec::new();
        for i in 0..EACH {
            for (k, key) in keys.iter().enumerate() {
                messages.push(Outgoing::new("t", format!("{k}:{i}").as_bytes()).with_key(*key));
            }
        }
        b.publisher().publish(&messages).await.unwrap();
        let mut next = [0usize; 9];
        for _ in 0..keys.len() * EACH {
            let next_one = async {
                tokio::select! {
                    m = one.next_message() => (m, true),
                    m = two.next_message() => (m, false),
                }
            };
            let (m, first) = tokio::time::timeout(Duration::from_secs(10), next_one)
                .await
                .expect("progress: no key is left held back");
            let m = m.expect("stream open").expect("a message");
            let text = payload(&m);
            let (k, i) = text.split_once(':').unwrap();
            let (k, i): (usize, usize) = (k.parse().unwrap(), i.parse().unwrap());
            assert_eq!(m.message.key.as_deref(), Some(keys[k]), "{text}");
            assert_eq!(i, next[k], "key {:?} in order, once each", keys[k]);
            next[k] += 1;
            let on = if first { &mut one } else { &mut two };
            on.ack(vec![m.ack_id.to_string()]);
        }
        assert_eq!(next, [EACH; 9]);
        for _ in 0..100 {
            if b.stats("s").await.acked == (keys.len() * EACH) as i64 {
                break;
            }
            tokio::time::sleep(ms(50)).await;
        }
        let stats = b.stats("s").await;
        assert_eq!(
            (stats.acked, stats.backlog, stats.in_flight, stats.redelivered),
            ((keys.len() * EACH) as i64, 0, 0, 0),
            "{stats:?}"
        );
        drop((one, two));
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

/// Publishes `(key, payload)` messages straight into `store`'s topic `t`.
async fn store_publish(store: &tidings::store::Store, items: &[(&str, &str)]) {
    let messages = items
        .iter()
        .map(|(key, payload)| tidings::model::NewMessage {
            id: uuid::Uuid::new_v4(),
            topic: "t".into(),
            key: Some((*key).into()),
            payload: payload.as_bytes().to_vec(),
            attributes: Vec::new(),
            created_at: None,
        })
        .collect();
    store.publish(messages).await.expect("publish");
}

/// The payloads of `deliveries`, as text.
fn payloads(deliveries: &[tidings::model::Delivery]) -> Vec<String> {
    deliveries
        .iter()
        .map(|d| String::from_utf8_lossy(&d.message.payload).into_owned())
        .collect()
}

backend_test! {
    /// Issue 14: on an ordered subscription, the new messages of a key that
    /// a stream of this process holds go to that stream when another
    /// stream's lease reads them, as far as its window has room, instead of
    /// waiting held back until its run is acked; when it acks its run, the
    /// messages held behind go to it at once. Without that stream they wait
    /// held back, as before.
    async fn a_keys_new_messages_are_handed_to_the_stream_holding_it(backend) {
        use tidings::model::{
            AckStatus, NewSubscription, StartPosition, SubscriptionSettings, TopicSettings,
        };
        use tidings::store::Holder;

        let opened = crate::harness::TestStore::open(backend).await;
        let store = &opened.store;
        store.create_topic("t", TopicSettings::default()).await.expect("topic");
        let settings = SubscriptionSettings { ordered: true, ..SubscriptionSettings::default() };
        let sub = NewSubscription {
            name: "s".into(),
            topic: "t".into(),
            settings,
            start: StartPosition::Earliest,
        };
        store.create_subscription(sub).await.expect("subscription");
        let (a, b) = (Holder::new(), Holder::new());
        let lease = |holder: Holder| store.lease_as("s", 10, 1 << 20, Some((holder, Vec::new())));

        // Stream a holds k's run, with room for one more message.
        let mut route = store.routes().open("s", a);
        route.set_room(1);
        store_publish(store, &[("k", "k1")]).await;
        let k1 = lease(a).await.expect("lease").deliveries;
        assert_eq!(payloads(&k1), ["k1"]);

        // b's lease reads k2 and k3: k2 goes to a, k3 waits (a is full).
        store_publish(store, &[("k", "k2"), ("k", "k3"), ("j", "j1")]).await;
        let other = lease(b).await.expect("lease").deliveries;
        assert_eq!(payloads(&other), ["j1"]);
        let k2 = route.try_recv().expect("k2 handed to the stream holding k");
        assert_eq!(payloads(&k2), ["k2"]);
        route.counted(1);
        assert!(route.try_recv().is_none(), "a had room for one");
        assert!(lease(b).await.expect("lease").deliveries.is_empty(), "k3 is a's");

        // a acks its run (its window frees the two): k3 is leased to it
        // at once, on its first attempt.
        route.set_room(0);
        let acked = store
            .ack("s", vec![k1[0].ack_id, k2[0].ack_id])
            .await
            .expect("ack");
        assert_eq!(acked, [AckStatus::Ok(None), AckStatus::Ok(None)]);
        let k3 = route.try_recv().expect("k3 handed on the ack");
        assert_eq!(payloads(&k3), ["k3"]);
        assert_eq!(k3[0].attempt, 1);
        assert!(lease(b).await.expect("lease").deliveries.is_empty(), "k3 is a's");

        // a's stream is gone: k4 waits held back behind k3, then goes to
        // whoever leases once k3 is acked.
        drop(route);
        store_publish(store, &[("k", "k4")]).await;
        assert!(lease(b).await.expect("lease").deliveries.is_empty(), "k4 waits behind k3");
        store.ack("s", vec![k3[0].ack_id]).await.expect("ack");
        let k4 = lease(b).await.expect("lease").deliveries;
        assert_eq!(payloads(&k4), ["k4"]);
        opened.close().await;
    }
}

backend_test! {
    /// Issue 14: with several streams, each taking some keys' messages by
    /// its own leases and being handed others by the other streams' leases
    /// and acks, while messages are still being published, every key's
    /// messages are received in order, each once, and no ack is refused.
    async fn handed_and_leased_messages_of_a_key_arrive_in_order(backend) {
        use std::collections::HashMap;
        use std::sync::{Arc, Mutex};
        use tidings::client::{Event, FlowControl};
        use tidings::model::AckStatus;

        const KEYS: usize = 6;
        const ROUNDS: usize = 400;
        let b = TestBroker::start(backend).await;
        b.topic_and_sub("t", "s", |s| s.ordered = true).await;
        // Per key, the next message due; a stream records what it got
        // before acking it, so a key's next message, wherever it goes,
        // is looked at after its earlier ones.
        let next: Arc<Mutex<HashMap<usize, usize>>> = Arc::default();
        let total = KEYS * ROUNDS;
        let got = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut streams = Vec::new();
        for _ in 0..4 {
            let flow = FlowControl { max_messages: 8, ..FlowControl::default() };
            let mut sub = b.subscribe_with("s", flow);
            let (next, got) = (next.clone(), got.clone());
            streams.push(tokio::spawn(async move {
                // Until every message is in and this stream's acks are
                // answered (a stream dropped with acks on the way would
                // end their leases as failed attempts).
                let mut unanswered = 0usize;
                while got.load(std::sync::atomic::Ordering::SeqCst) < total || unanswered > 0 {
                    let event = tokio::time::timeout(Duration::from_millis(200), sub.next()).await;
                    let Ok(event) = event else { continue };
                    match event.expect("the stream goes on").expect("no error") {
                        Event::Message(m) => {
                            let p = payload(&m);
                            let (k, i) = p.split_once(':').expect("key:index");
                            let (k, i): (usize, usize) =
                                (k.parse().expect("key"), i.parse().expect("index"));
                            {
                                let mut next = next.lock().expect("lock");
                                let due = next.entry(k).or_default();
                                assert_eq!((i, m.attempt), (*due, 1), "key {k} in order, once");
                                *due += 1;
                            }
                            got.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            unanswered += 1;
                            sub.ack(vec![m.ack_id.to_string()]);
                        }
                        Event::Outcome(o) => {
                            assert_eq!(o.status, AckStatus::Ok(None), "no ack refused: {o:?}");
                            unanswered -= 1;
                        }
                        Event::Malformed { reason, .. } => panic!("{reason}"),
                    }
                }
            }));
        }
        for round in 0..ROUNDS / 10 {
            let mut items = Vec::new();
            for i in round * 10..(round + 1) * 10 {
                for k in 0..KEYS {
                    items.push(Outgoing::new("t", format!("{k}:{i}").into_bytes()).with_key(format!("k{k}")));
                }
            }
            b.publisher().publish(&items).await.expect("publish");
        }
        for stream in streams {
            tokio::time::timeout(Duration::from_secs(60), stream)
                .await
                .expect("every message in time")
                .expect("in order");
        }
        assert_eq!(got.load(std::sync::atomic::Ordering::SeqCst), total);
        b.stop().await;
    }
}

backend_test! {
    /// Issue 14: a stream is handed a key's messages only as far as its
    /// flow-control window has room: never more outstanding than it asked
    /// for, the rest going to it as it acks, and none to the other stream.
    async fn a_stream_is_handed_no_more_than_its_window(backend) {
        use tidings::client::{Event, FlowControl};

        let b = TestBroker::start(backend).await;
        b.topic_and_sub("t", "s", |s| s.ordered = true).await;
        let flow = FlowControl { max_messages: 3, ..FlowControl::default() };
        let mut holding = b.subscribe_with("s", flow);
        publish_keyed(&b, &[("k", "k0")]).await;
        let Event::Message(k0) = next_event(&mut holding).await else {
            panic!("k0 first");
        };
        let mut other = b.subscribe("s");
        tokio::time::sleep(ms(200)).await;
        let items: Vec<(String, String)> =
            (1..10).map(|i| ("k".to_owned(), format!("k{i}"))).collect();
        let items: Vec<(&str, &str)> = items.iter().map(|(k, p)| (k.as_str(), p.as_str())).collect();
        publish_keyed(&b, &items).await;
        publish_keyed(&b, &[("j", "j0")]).await;
        let j0 = tokio::time::timeout(Duration::from_secs(5), other.next_message())
            .await
            .expect("j0 in time")
            .expect("a message")
            .expect("no error");
        assert_eq!(payload(&j0), "j0");

        // The holding stream acks only when nothing more comes: what it
        // holds unacked never passes its window, and a quiet stream has
        // its window full (or everything).
        let mut outstanding = vec![k0];
        let (mut next, mut unanswered) = (1, 0);
        loop {
            match tokio::time::timeout(ms(300), holding.next()).await {
                Err(_) => {
                    assert_eq!(unanswered, 0, "acks answered");
                    if next == 10 && outstanding.is_empty() {
                        break;
                    }
                    assert!(outstanding.len() == 3 || next == 10, "quiet with room: {next}");
                    unanswered = outstanding.len();
                    holding.ack(outstanding.drain(..).map(|m| m.ack_id.to_string()).collect());
                }
                Ok(event) => match event.expect("goes on").expect("no error") {
                    Event::Message(m) => {
                        assert_eq!(payload(&m), format!("k{next}"));
                        next += 1;
                        outstanding.push(m);
                        assert!(outstanding.len() <= 3, "no more than the window");
                    }
                    Event::Outcome(o) => {
                        assert_eq!(o.status, tidings::model::AckStatus::Ok(None));
                        unanswered -= 1;
                    }
                    Event::Malformed { reason, .. } => panic!("{reason}"),
                },
            }
        }
        let nothing = tokio::time::timeout(ms(300), other.next_message()).await;
        assert!(nothing.is_err(), "the other stream gets nothing of k: {nothing:?}");
        drop((holding, other));
        b.stop().await;
    }
}

backend_test! {
    /// Issue 14: the embedded broker's writer keeps the messages it holds
    /// back, so that handing them on does not read them again. What it
    /// kept must never outlive the rows: a topic deleted and created again
    /// may get the same id and the same sequences (SQLite), and its
    /// messages handed on behind a nacked head are the new ones.
    async fn held_messages_of_a_deleted_topic_never_come_back_in_a_new_one(backend) {
        let b = TestBroker::start(backend).await;
        let ordered = |s: &mut proto::Subscription| {
            s.ordered = true;
            s.min_backoff = Some(pb(ms(10)));
            s.max_backoff = Some(pb(ms(10)));
        };
        b.topic_and_sub("t", "s", ordered).await;
        publish_keyed(&b, &[("k", "old1"), ("k", "old2"), ("k", "old3")]).await;
        let head = b.pull("s", 1, Duration::from_secs(5)).await;
        assert_eq!(names(&head), vec!["old1"]);
        // old2 and old3 are read past the cursor and held behind old1.
        let none = b.pull("s", 10, ms(300)).await;
        assert!(none.is_empty(), "held behind old1, got {none:?}");
        let admin = b.admin();
        admin.delete_subscription("s").await.unwrap();
        admin.delete_topic("t").await.unwrap();

        b.topic_and_sub("t", "s", ordered).await;
        publish_keyed(&b, &[("k", "new1"), ("k", "new2"), ("k", "new3")]).await;
        let run = b.pull("s", 10, Duration::from_secs(5)).await;
        assert_eq!(names(&run), vec!["new1", "new2", "new3"]);
        // The nack holds new2 and new3 back behind new1; after its backoff
        // they are handed on with it.
        b.nack("s", &run[0].ack_id, None, "again").await.unwrap();
        let again = b.pull("s", 10, Duration::from_secs(5)).await;
        assert_eq!(names(&again), vec!["new1", "new2", "new3"]);
        let sequences: Vec<i64> = again.iter().map(seq).collect();
        let first: Vec<i64> = run.iter().map(seq).collect();
        assert_eq!(sequences, first, "the same messages, in order");
        b.ack("s", again.iter().map(|m| m.ack_id.clone()).collect())
            .await
            .expect("acked in order");
        b.stop().await;
    }
}

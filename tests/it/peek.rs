//! Peek: the messages waiting on a subscription, shown without being
//! touched (issue 15).

use std::collections::HashMap;
use std::time::Duration;

use tidings::client;
use tidings::model::{MessageState, PeekedMessage};
use tidings::proto;

use crate::harness::{TestBroker, backend_test, ms, pb};

/// Publishes `(key, payload)` pairs in order.
async fn publish_keyed(b: &TestBroker, topic: &str, messages: &[(&str, &str)]) {
    let messages: Vec<client::Outgoing> = messages
        .iter()
        .map(|(k, p)| client::Outgoing::new(topic, p.as_bytes()).with_key(*k))
        .collect();
    b.publisher().publish(&messages).await.expect("publish");
}

/// The peeked messages by payload.
fn by_payload(peeked: &[PeekedMessage]) -> HashMap<String, &PeekedMessage> {
    peeked
        .iter()
        .map(|p| (String::from_utf8_lossy(&p.message.payload).into_owned(), p))
        .collect()
}

/// Stats fields that any delivery, attempt or ack would change.
fn counters(s: &tidings::model::SubscriptionStats) -> (i64, i64, i64, i64, i64, i64) {
    (
        s.backlog,
        s.in_flight,
        s.delivered,
        s.acked,
        s.redelivered,
        s.dead_lettered,
    )
}

backend_test! {
    async fn peek_shows_every_state_and_changes_nothing(backend) {
        let b = TestBroker::start(backend).await;
        b.topic_and_sub("t", "s", |s| {
            s.ordered = true;
            s.ack_deadline = Some(pb(Duration::from_secs(30)));
            s.min_backoff = Some(pb(ms(10)));
        })
        .await;
        publish_keyed(&b, "t", &[("a", "a1")]).await;
        let mut leased = b.pull("s", 1, Duration::from_secs(5)).await;
        publish_keyed(
            &b,
            "t",
            &[("a", "a2"), ("b", "b1"), ("c", "c1"), ("d", "d1"), ("e", "e1")],
        )
        .await;
        // The next lease reads three new messages: b1 and c1 are leased, a2
        // is held behind a1, in flight; d1 and e1 are not reached.
        leased.extend(b.pull("s", 3, Duration::from_secs(5)).await);
        let ids: HashMap<String, String> = leased
            .iter()
            .map(|d| {
                let m = d.message.as_ref().expect("message");
                (String::from_utf8_lossy(&m.payload).into_owned(), d.ack_id.clone())
            })
            .collect();
        assert_eq!(ids.len(), 3, "{:?}", ids.keys());
        for p in ["a1", "b1", "c1"] {
            assert!(ids.contains_key(p), "{p} leased: {:?}", ids.keys());
        }
        b.nack("s", &ids["b1"], Some(Duration::from_secs(600)), "later").await.unwrap();
        b.nack("s", &ids["c1"], Some(Duration::ZERO), "now").await.unwrap();

        let subscriber = b.subscriber();
        let before = b.stats("s").await;
        let peeked = subscriber.peek("s", 100).await.expect("peek");
        let again = subscriber.peek("s", 100).await.expect("peek again");
        let after = b.stats("s").await;
        assert_eq!(counters(&before), counters(&after), "peek changes no counter");
        assert_eq!(peeked, again, "peek changes nothing it shows");

        let sequences: Vec<i64> = peeked.iter().map(|p| p.message.sequence).collect();
        assert_eq!(sequences, vec![1, 2, 3, 4, 5, 6], "every waiting message, in order");
        let p = by_payload(&peeked);
        assert_eq!(p["a1"].state, MessageState::Leased);
        assert_eq!(p["a1"].attempts, 1);
        assert!(p["a1"].available_at.is_some(), "a lease shows its deadline");
        assert_eq!(p["a2"].state, MessageState::Held);
        assert_eq!(p["a2"].attempts, 0);
        assert_eq!(p["b1"].state, MessageState::Backoff);
        assert_eq!(p["b1"].attempts, 1);
        assert_eq!(p["b1"].reason, "later");
        assert_eq!(p["c1"].state, MessageState::Ready);
        assert_eq!(p["c1"].reason, "now");
        assert_eq!(p["d1"].state, MessageState::New);
        assert_eq!(p["e1"].state, MessageState::New);
        assert_eq!(p["e1"].attempts, 0);
        assert_eq!(p["e1"].available_at, None);

        // Nothing was leased by looking: c1, d1 and e1 come next with the
        // attempts they had (c1's one nack; d1 and e1 never delivered).
        let next = b.pull("s", 10, Duration::from_secs(5)).await;
        let attempts: HashMap<String, i32> = next
            .iter()
            .map(|d| {
                let m = d.message.as_ref().expect("message");
                (String::from_utf8_lossy(&m.payload).into_owned(), d.attempt)
            })
            .collect();
        assert_eq!(
            attempts,
            HashMap::from([("c1".into(), 2), ("d1".into(), 1), ("e1".into(), 1)])
        );

        // Acked messages are gone from the view; a1's ack frees a2.
        b.ack("s", vec![ids["a1"].clone()]).await.unwrap();
        let p = subscriber.peek("s", 100).await.expect("peek");
        let states: HashMap<String, MessageState> = by_payload(&p)
            .into_iter()
            .map(|(k, v)| (k, v.state))
            .collect();
        assert!(!states.contains_key("a1"), "{states:?}");
        assert_eq!(states["a2"], MessageState::Ready);
        b.stop().await;
    }
}

/// Peeks at subscription "s" page by page until the last; returns the
/// sequences seen and each page's size.
async fn walk(
    raw: &mut proto::subscriber_service_client::SubscriberServiceClient<tonic::transport::Channel>,
    page_size: i32,
    max_response_bytes: i32,
) -> (Vec<i64>, Vec<usize>) {
    let mut token = String::new();
    let mut seen = Vec::new();
    let mut sizes = Vec::new();
    for _ in 0..100 {
        let r = raw
            .peek(proto::PeekRequest {
                subscription: "s".into(),
                page_size,
                page_token: token.clone(),
                max_response_bytes,
            })
            .await
            .expect("peek")
            .into_inner();
        sizes.push(r.messages.len());
        seen.extend(
            r.messages
                .iter()
                .map(|p| p.message.as_ref().expect("message").sequence),
        );
        if r.next_page_token.is_empty() {
            break;
        }
        token = r.next_page_token;
    }
    (seen, sizes)
}

backend_test! {
    async fn peek_pages_by_count_and_by_response_bytes(backend) {
        let b = TestBroker::start(backend).await;
        b.topic_and_sub("t", "s", |_| {}).await;
        let payloads: Vec<String> = (0..25).map(|i| format!("m{i:02}-{}", "x".repeat(300))).collect();
        let refs: Vec<&str> = payloads.iter().map(String::as_str).collect();
        b.publish("t", &refs).await;
        // One message leased, so pages mix delivery rows and new messages.
        let leased = b.pull("s", 1, Duration::from_secs(5)).await;
        assert_eq!(leased.len(), 1);

        let mut raw = b.raw_subscriber();
        // By count: pages of 10, 10 and 5, then no token.
        let (seen, sizes) = walk(&mut raw, 10, 0).await;
        assert_eq!(seen, (1..=25).collect::<Vec<i64>>());
        assert_eq!(sizes, [10, 10, 5]);
        // By bytes: a bound under one message still shows one per page, and
        // the tokens walk every message.
        let (seen, sizes) = walk(&mut raw, 0, 1).await;
        assert_eq!(seen, (1..=25).collect::<Vec<i64>>());
        assert!(sizes.iter().all(|&n| n == 1), "{sizes:?}");
        assert_eq!(b.stats("s").await.delivered, 1, "peeking delivered nothing");

        // Bad input names the problem.
        for (request, expected) in [
            (proto::PeekRequest { subscription: "s".into(), page_size: -1, ..Default::default() }, "page_size"),
            (proto::PeekRequest { subscription: "s".into(), page_token: "zz".into(), ..Default::default() }, "page_token"),
            (proto::PeekRequest { subscription: "s".into(), max_response_bytes: -5, ..Default::default() }, "max_response_bytes"),
        ] {
            let err = raw.peek(request).await.expect_err("refused");
            assert_eq!(err.code(), tonic::Code::InvalidArgument);
            assert!(err.message().contains(expected), "{}", err.message());
        }
        let err = raw
            .peek(proto::PeekRequest { subscription: "nope".into(), ..Default::default() })
            .await
            .expect_err("unknown");
        assert_eq!(err.code(), tonic::Code::NotFound);
        b.stop().await;
    }
}

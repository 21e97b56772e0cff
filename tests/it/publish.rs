//! Publishing: delivery end to end, idempotent ids, and bad input.

use std::time::Duration;

use tidings::client::{Event, Outgoing};
use tidings::proto;
use tonic::Code;
use uuid::Uuid;

use crate::harness::Coded;
use crate::harness::{TestBroker, backend_test, payload, seq};

backend_test! {
    async fn published_message_is_delivered_and_acked(backend) {
        let b = TestBroker::start(backend).await;
        b.topic_and_sub("orders", "billing", |_| {}).await;
        let seqs = b.publish("orders", &["one", "two"]).await;
        assert_eq!(seqs, vec![1, 2]);

        let mut sub = b.subscribe("billing");
        let mut got = Vec::new();
        while got.len() < 2 {
            let m = sub.next_message().await.expect("open").expect("message");
            assert_eq!(m.attempt, 1);
            got.push((seq(&m), payload(&m)));
            sub.ack(vec![m.ack_id.to_string()]);
        }
        assert_eq!(got, vec![(1, "one".into()), (2, "two".into())]);
        let mut acked = 0;
        while acked < 2 {
            if let Some(Ok(Event::Outcome(o))) = sub.next().await {
                let o = proto::AckOutcome::from(o);
                assert_eq!(o.result, proto::AckResult::Ok as i32, "{}", o.detail);
                acked += 1;
            }
        }
        let stats = b.stats("billing").await;
        assert_eq!((stats.backlog, stats.acked, stats.delivered), (0, 2, 2));
        drop(sub);
        b.stop().await;
    }
}

backend_test! {
    async fn same_id_again_is_a_duplicate_with_the_original_sequence(backend) {
        let b = TestBroker::start(backend).await;
        b.topic_and_sub("orders", "billing", |_| {}).await;
        let id = Uuid::now_v7();
        let first = b
            .publisher()
            .publish(&[Outgoing::new("orders", "x").with_id(id)])
            .await
            .unwrap();
        assert!(!first[0].duplicate);
        b.publish("orders", &["other"]).await;
        // Again alone, and twice within one batch.
        let again = b
            .publisher()
            .publish(&[
                Outgoing::new("orders", "x").with_id(id),
                Outgoing::new("orders", "x").with_id(id),
            ])
            .await
            .unwrap();
        for r in &again {
            assert!(r.duplicate);
            assert_eq!(r.sequence, first[0].sequence);
        }
        let topic = b
            .raw_admin()
            .get_topic(proto::GetTopicRequest {
                name: "orders".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .topic
            .unwrap();
        assert_eq!(topic.last_sequence, 2, "stored once");
        assert_eq!(b.stats("billing").await.backlog, 2);
        b.stop().await;
    }
}

backend_test! {
    async fn duplicate_is_recognised_after_the_message_is_acked_and_deleted(backend) {
        let b = TestBroker::start(backend).await;
        b.topic_and_sub("orders", "billing", |_| {}).await;
        let id = Uuid::now_v7();
        let m = Outgoing::new("orders", "x").with_id(id);
        let seq1 = b
            .publisher()
            .publish(std::slice::from_ref(&m))
            .await
            .unwrap()[0]
            .sequence;
        let got = b.pull("billing", 1, Duration::from_secs(5)).await;
        b.ack("billing", vec![got[0].ack_id.clone()]).await.unwrap();
        // Maintenance deletes the acked message: replaying from sequence 1 finds
        // nothing once it is gone. The dedup entry must outlive it.
        let mut gone = false;
        for _ in 0..100 {
            let mut admin = b.raw_admin();
            admin
                .seek(proto::SeekRequest {
                    subscription: "billing".into(),
                    target: Some(proto::seek_request::Target::Sequence(1)),
                })
                .await
                .unwrap();
            let again = b.pull("billing", 1, Duration::from_millis(50)).await;
            if again.is_empty() {
                gone = true;
                break;
            }
            b.ack("billing", vec![again[0].ack_id.clone()])
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(gone, "the acked message was deleted");
        let b = b.restart().await;
        let again = b.publisher().publish(&[m]).await.unwrap();
        assert!(again[0].duplicate);
        assert_eq!(again[0].sequence, seq1);
        assert!(
            b.pull("billing", 1, Duration::from_millis(300))
                .await
                .is_empty()
        );
        b.stop().await;
    }
}

backend_test! {
    async fn pipelined_stream_answers_each_request_in_order(backend) {
        let b = TestBroker::start(backend).await;
        b.topic_and_sub("orders", "billing", |_| {}).await;
        let mut session = b.publisher().stream(16).await.unwrap();
        for i in 0..50 {
            let messages = (0..10)
                .map(|j| {
                    Outgoing::new("orders", format!("{i}-{j}")).with_key("k")
                })
                .collect();
            session.send(messages).await.unwrap();
        }
        let mut last = 0;
        for _ in 0..50 {
            let results = session.next().await.unwrap().expect("answer");
            assert_eq!(results.len(), 10);
            for r in results {
                assert!(r.sequence > last, "sequences increase in request order");
                last = r.sequence;
            }
        }
        assert_eq!(last, 500);
        b.stop().await;
    }
}

async fn expect_refused(b: &TestBroker, message: proto::Message, code: Code, says: &str) {
    let err = b
        .raw_publisher()
        .publish(proto::PublishRequest {
            messages: vec![message],
        })
        .await
        .expect_err("refused");
    assert_eq!(err.code(), code, "{}", err.message());
    assert!(
        err.message().contains(says),
        "message {:?} should name the problem ({says:?})",
        err.message()
    );
}

backend_test! {
    async fn bad_input_gets_the_right_status_and_stores_nothing(backend) {
        let b = TestBroker::start_with(backend, |c| c.limits.max_message_bytes = 1024).await;
        b.topic_and_sub("orders", "billing", |_| {}).await;
        let good = || crate::harness::wire(Outgoing::new("orders", "x"));

        let mut m = good();
        m.id = String::new();
        expect_refused(&b, m, Code::InvalidArgument, "id is missing").await;
        let mut m = good();
        m.id = "not-a-uuid".into();
        expect_refused(&b, m, Code::InvalidArgument, "not a UUID").await;
        let mut m = good();
        m.topic = String::new();
        expect_refused(&b, m, Code::InvalidArgument, "topic name is empty").await;
        let mut m = good();
        m.topic = "no such topic!".into();
        expect_refused(&b, m, Code::InvalidArgument, "contains").await;
        let mut m = good();
        m.topic = "missing".into();
        expect_refused(&b, m, Code::NotFound, "topic \"missing\" does not exist").await;
        let mut m = good();
        m.payload = vec![0; 1025];
        expect_refused(
            &b,
            m,
            Code::InvalidArgument,
            "the message is 1025 bytes (payload 1025, ordering key 0, attributes 0); the limit is 1024",
        )
        .await;

        // A batch with one bad message stores none of it.
        let err = b
            .raw_publisher()
            .publish(proto::PublishRequest {
                messages: vec![
                    good(),
                    proto::Message {
                        topic: "missing".into(),
                        ..good()
                    },
                ],
            })
            .await
            .expect_err("refused");
        assert_eq!(err.code(), Code::NotFound);

        let err = b
            .raw_subscriber()
            .pull(proto::PullRequest {
                subscription: "nobody".into(),
                max_messages: 1,
                max_wait: None,
                ..Default::default()
            })
            .await
            .expect_err("unknown subscription");
        assert_eq!(err.code(), Code::NotFound);
        assert!(
            err.message()
                .contains("subscription \"nobody\" does not exist")
        );

        let mut sub = b.subscribe("nobody");
        let err = sub
            .next()
            .await
            .expect("an answer")
            .expect_err("unknown subscription");
        assert_eq!(err.code(), Code::NotFound);

        let stats = b.stats("billing").await;
        assert_eq!(stats.backlog, 0, "nothing was stored");
        b.stop().await;
    }
}

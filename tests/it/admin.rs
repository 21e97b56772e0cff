//! Topics, subscriptions, pagination, seek, start positions and max age.

use std::time::Duration;

use tidings::proto::{self, subscription::Start};
use tonic::Code;

use crate::harness::{Coded, new_sub};
use crate::harness::{TestBroker, backend_test, ms, payload, pb};

backend_test! {
    async fn topics_and_subscriptions_are_created_listed_paged_and_deleted(backend) {
        let b = TestBroker::start(backend).await;
        let admin = b.admin();
        let mut raw = b.raw_admin();
        for i in 0..5 {
            admin.create_topic(&format!("topic-{i}")).await.unwrap();
        }
        let err = admin.create_topic("topic-0").await.expect_err("taken");
        assert_eq!(err.code(), Code::AlreadyExists);
        let err = admin.create_topic("").await.expect_err("empty");
        assert_eq!(err.code(), Code::InvalidArgument);

        let mut names = Vec::new();
        let mut token = String::new();
        loop {
            let page = raw
                .list_topics(proto::ListTopicsRequest {
                    page_size: 2,
                    page_token: token,
                })
                .await
                .unwrap()
                .into_inner();
            assert!(page.topics.len() <= 2);
            names.extend(page.topics.into_iter().map(|t| t.name));
            if page.next_page_token.is_empty() {
                break;
            }
            token = page.next_page_token;
        }
        assert_eq!(
            names,
            (0..5).map(|i| format!("topic-{i}")).collect::<Vec<_>>()
        );
        let err = raw
            .list_topics(proto::ListTopicsRequest {
                page_size: 2,
                page_token: "zz".into(),
            })
            .await
            .expect_err("bad token");
        assert_eq!(err.code(), Code::InvalidArgument);

        b.topic_and_sub("topic-0", "sub-0", |_| {}).await;
        let err = raw
            .delete_topic(proto::DeleteTopicRequest {
                name: "topic-0".into(),
            })
            .await
            .expect_err("has subscriptions");
        assert_eq!(err.code(), Code::FailedPrecondition);
        assert!(err.message().contains("sub-0"), "{}", err.message());

        let err = admin
            .create_subscription(new_sub(proto::Subscription {
                name: "orphan".into(),
                topic: "nope".into(),
                ..Default::default()
            }))
            .await
            .expect_err("unknown topic");
        assert_eq!(err.code(), Code::NotFound);
        let err = admin
            .create_subscription(new_sub(proto::Subscription {
                name: "bad".into(),
                topic: "topic-1".into(),
                max_attempts: -1,
                ..Default::default()
            }))
            .await
            .expect_err("bad setting");
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().contains("max_attempts"));

        let updated = raw
            .update_subscription(proto::UpdateSubscriptionRequest {
                subscription: Some(proto::Subscription {
                    name: "sub-0".into(),
                    ack_deadline: Some(pb(Duration::from_secs(7))),
                    max_attempts: 3,
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["ack_deadline".into(), "max_attempts".into()],
                }),
            })
            .await
            .unwrap()
            .into_inner()
            .subscription
            .unwrap();
        assert_eq!(updated.ack_deadline.unwrap().seconds, 7);
        assert_eq!(updated.max_attempts, 3);

        raw.delete_subscription(proto::DeleteSubscriptionRequest {
            name: "sub-0".into(),
        })
        .await
        .unwrap();
        raw.delete_topic(proto::DeleteTopicRequest {
            name: "topic-0".into(),
        })
        .await
        .unwrap();
        let err = raw
            .get_topic(proto::GetTopicRequest {
                name: "topic-0".into(),
            })
            .await
            .expect_err("gone");
        assert_eq!(err.code(), Code::NotFound);
        b.stop().await;
    }
}

backend_test! {
    async fn start_position_latest_skips_earlier_messages_and_seek_replays(backend) {
        let b = TestBroker::start(backend).await;
        // "early" exists first: it keeps the old messages stored (a
        // message no subscription still needs may be deleted at once).
        b.topic_and_sub("t", "early", |_| {}).await;
        b.publish("t", &["old1", "old2"]).await;
        b.admin()
            .create_subscription(new_sub(proto::Subscription {
                name: "late".into(),
                topic: "t".into(),
                start: Some(Start::StartPosition(proto::StartPosition::Latest as i32)),
                ..Default::default()
            }))
            .await
            .unwrap();
        b.publish("t", &["new"]).await;
        let got = b.pull("late", 10, Duration::from_secs(5)).await;
        assert_eq!(got.iter().map(payload).collect::<Vec<_>>(), vec!["new"]);
        b.ack("late", got.iter().map(|m| m.ack_id.clone()).collect())
            .await
            .unwrap();
        let got = b.pull("early", 10, Duration::from_secs(5)).await;
        assert_eq!(
            got.iter().map(payload).collect::<Vec<_>>(),
            vec!["old1", "old2", "new"]
        );

        // "early" keeps the old messages stored, so "late" can seek back to them.
        let next = b
            .raw_admin()
            .seek(proto::SeekRequest {
                subscription: "late".into(),
                target: Some(proto::seek_request::Target::Sequence(2)),
            })
            .await
            .unwrap()
            .into_inner()
            .next_sequence;
        assert_eq!(next, 2);
        let got = b.pull("late", 10, Duration::from_secs(5)).await;
        assert_eq!(
            got.iter().map(payload).collect::<Vec<_>>(),
            vec!["old2", "new"]
        );
        b.stop().await;
    }
}

backend_test! {
    async fn stats_report_backlog_in_flight_and_oldest_unacked_age(backend) {
        let b = TestBroker::start(backend).await;
        b.topic_and_sub("t", "s", |_| {}).await;
        b.publish("t", &["1", "2", "3"]).await;
        tokio::time::sleep(ms(100)).await;
        let leased = b.pull("s", 1, Duration::from_secs(5)).await;
        let stats = b.stats("s").await;
        assert_eq!(stats.backlog, 3);
        assert_eq!(stats.in_flight, 1);
        let age = stats.oldest_unacked_age.unwrap();
        assert!(age >= Duration::from_millis(100), "{age:?}");
        b.ack("s", leased.iter().map(|m| m.ack_id.clone()).collect())
            .await
            .unwrap();
        let stats = b.stats("s").await;
        assert_eq!((stats.backlog, stats.in_flight, stats.acked), (2, 0, 1));
        assert_eq!(stats.ack_watermark, 1);
        b.stop().await;
    }
}

backend_test! {
    async fn max_age_expires_unacked_messages_and_counts_them(backend) {
        let b = TestBroker::start(backend).await;
        let topic = proto::Topic {
            name: "t".into(),
            max_age: Some(pb(ms(200))),
            ..Default::default()
        };
        b.raw_admin()
            .create_topic(proto::CreateTopicRequest { topic: Some(topic) })
            .await
            .unwrap();
        b.topic_and_sub("t", "s", |_| {}).await;
        b.publish("t", &["a", "b"]).await;
        let mut expired = 0;
        for _ in 0..100 {
            tokio::time::sleep(ms(20)).await;
            let t = b
                .raw_admin()
                .get_topic(proto::GetTopicRequest { name: "t".into() })
                .await
                .unwrap()
                .into_inner()
                .topic
                .unwrap();
            expired = t.expired_count;
            if expired == 2 {
                break;
            }
        }
        assert_eq!(expired, 2);
        assert_eq!(b.stats("s").await.backlog, 0);
        assert!(b.pull("s", 10, ms(100)).await.is_empty());
        b.stop().await;
    }
}

/// Sends `rounds` UpdateSubscription calls for `sub`, each masking only
/// `field`, to the value `make(round)` gives.
async fn update_repeatedly(
    mut raw: proto::admin_service_client::AdminServiceClient<tonic::transport::Channel>,
    sub: &str,
    field: &str,
    rounds: u64,
    make: impl Fn(u64) -> proto::Subscription,
) {
    for round in 1..=rounds {
        raw.update_subscription(proto::UpdateSubscriptionRequest {
            subscription: Some(proto::Subscription {
                name: sub.into(),
                ..make(round)
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec![field.into()],
            }),
        })
        .await
        .unwrap();
    }
}

backend_test! {
    /// Issue 10: UpdateSubscription read the row and wrote every field back,
    /// so an update of one field could undo a concurrent update of another.
    async fn concurrent_updates_of_different_fields_both_survive(backend) {
        let b = TestBroker::start(backend).await;
        b.topic_and_sub("t", "s", |_| {}).await;
        const ROUNDS: u64 = 40;
        for trial in 0..5u64 {
            let deadline = |round: u64| Duration::from_secs(100 * trial + round);
            let attempts = |round: u64| (100 * trial + round) as i32;
            let raw = b.raw_admin();
            let deadlines = update_repeatedly(raw.clone(), "s", "ack_deadline", ROUNDS, |r| {
                proto::Subscription { ack_deadline: Some(pb(deadline(r))), ..Default::default() }
            });
            let maxes = update_repeatedly(raw.clone(), "s", "max_attempts", ROUNDS, |r| {
                proto::Subscription { max_attempts: attempts(r), ..Default::default() }
            });
            let others = update_repeatedly(raw.clone(), "s", "ordered", ROUNDS, |r| {
                proto::Subscription { ordered: r % 2 == 0, ..Default::default() }
            });
            tokio::join!(deadlines, maxes, others);
            let sub = b.raw_admin()
                .get_subscription(proto::GetSubscriptionRequest { name: "s".into() })
                .await
                .unwrap()
                .into_inner()
                .subscription
                .unwrap();
            assert_eq!(sub.ack_deadline, Some(pb(deadline(ROUNDS))), "trial {trial}");
            assert_eq!(sub.max_attempts, attempts(ROUNDS), "trial {trial}");
            assert!(sub.ordered, "trial {trial}");
        }
        b.stop().await;
    }
}

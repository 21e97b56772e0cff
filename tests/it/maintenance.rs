//! Maintenance rounds (issue 11, item 8): an idle round costs nothing
//! however many topics and subscriptions exist, and a topic or subscription
//! touched after a long idle time is still maintained (retention, max age,
//! lease expiry).

use std::time::Duration;

use futures_util::future::join_all;
use tidings::model::{
    AckId, NewMessage, NewSubscription, StartPosition, SubscriptionSettings, TopicSettings,
};
use tidings::store::{MaintenanceReport, Store};

use crate::harness::{TestStore, backend_test, ms};

/// Idle topics created by the tests, beside the few they use.
const IDLE_TOPICS: usize = 2000;

/// Creates `count` topics named `idle-N`, a few hundred at a time.
async fn create_idle_topics(store: &Store, count: usize) {
    let names: Vec<String> = (0..count).map(|i| format!("idle-{i:05}")).collect();
    for chunk in names.chunks(250) {
        for created in join_all(
            chunk
                .iter()
                .map(|name| store.create_topic(name, TopicSettings::default())),
        )
        .await
        {
            created.expect("create topic");
        }
    }
}

async fn create_topic(store: &Store, name: &str, retention: Duration, max_age: Duration) {
    let settings = TopicSettings { retention, max_age };
    store
        .create_topic(name, settings)
        .await
        .expect("create topic");
}

async fn create_sub(
    store: &Store,
    name: &str,
    topic: &str,
    tune: impl FnOnce(&mut SubscriptionSettings),
) {
    let mut settings = SubscriptionSettings::default();
    tune(&mut settings);
    store
        .create_subscription(NewSubscription {
            name: name.into(),
            topic: topic.into(),
            settings,
            start: StartPosition::Earliest,
        })
        .await
        .expect("create subscription");
}

async fn publish(store: &Store, topic: &str, count: usize) {
    let messages = (0..count)
        .map(|i| NewMessage {
            id: uuid::Uuid::new_v4(),
            topic: topic.into(),
            key: None,
            payload: format!("m{i}").into_bytes(),
            attributes: Vec::new(),
            created_at: None,
        })
        .collect();
    store.publish(messages).await.expect("publish");
}

/// Leases up to `max` messages of `sub`.
async fn lease(store: &Store, sub: &str, max: usize) -> Vec<AckId> {
    let batch = store.lease(sub, max, 1 << 20).await.expect("lease");
    batch.deliveries.iter().map(|d| d.ack_id).collect()
}

/// One round, checked to have succeeded.
async fn round(store: &Store) -> MaintenanceReport {
    store.maintain().await.expect("maintenance round")
}

/// Adds what round `r` did to `sum`.
fn add(sum: &mut MaintenanceReport, r: &MaintenanceReport) {
    sum.deleted += r.deleted;
    sum.expired += r.expired;
    sum.leases_expired += r.leases_expired;
    sum.topics_examined += r.topics_examined;
    sum.subscriptions_examined += r.subscriptions_examined;
}

/// Runs rounds until one says nothing is left over (the first rounds after
/// open look at everything once); returns the sum of what they did.
async fn settle(store: &Store) -> MaintenanceReport {
    let mut sum = MaintenanceReport::default();
    for _ in 0..1000 {
        let r = round(store).await;
        add(&mut sum, &r);
        if !r.more {
            return sum;
        }
    }
    panic!("maintenance never settled: every round left more to do");
}

/// Runs rounds (letting time pass between them) until `done` holds for the
/// sum of what they did.
async fn rounds_until(store: &Store, what: &str, done: impl Fn(&MaintenanceReport) -> bool) {
    let mut sum = MaintenanceReport::default();
    for _ in 0..1000 {
        add(&mut sum, &settle(store).await);
        if done(&sum) {
            return;
        }
        tokio::time::sleep(ms(10)).await;
    }
    panic!("maintenance never {what}: {sum:?}");
}

backend_test! {
    async fn idle_round_examines_only_what_changed_not_every_topic(backend) {
        let ts = TestStore::open(backend).await;
        let store = &ts.store;
        create_idle_topics(store, IDLE_TOPICS).await;
        // A few subscriptions with messages leased (their deadlines far
        // away) and unacked: state, but nothing due.
        for i in 0..5 {
            let topic = format!("idle-{i:05}");
            let sub = format!("sub-{i}");
            create_sub(store, &sub, &topic, |_| {}).await;
            publish(store, &topic, 3).await;
            assert_eq!(lease(store, &sub, 2).await.len(), 2);
        }
        settle(store).await;

        let idle = round(store).await;
        assert_eq!(
            (idle.topics_examined, idle.subscriptions_examined),
            (0, 0),
            "an idle round looked at topics or subscriptions: {idle:?}"
        );

        // A publish to one topic and an ack on another's subscription: the
        // next round looks at those two topics only.
        publish(store, "idle-00100", 1).await;
        let leased = lease(store, "sub-3", 1).await;
        let acked = store.ack("sub-3", leased).await.expect("ack");
        assert_eq!(acked.len(), 1);
        let busy = round(store).await;
        assert_eq!(busy.topics_examined, 2, "{busy:?}");

        let idle = round(store).await;
        assert_eq!(
            (idle.topics_examined, idle.subscriptions_examined),
            (0, 0),
            "{idle:?}"
        );
        ts.close().await;
    }
}

backend_test! {
    async fn topics_and_subscriptions_touched_after_idle_are_still_maintained(backend) {
        let ts = TestStore::open(backend).await;
        let store = &ts.store;
        create_idle_topics(store, 200).await;
        create_topic(store, "plain", Duration::ZERO, Duration::ZERO).await;
        create_topic(store, "kept", Duration::from_secs(2), Duration::ZERO).await;
        create_topic(store, "aged", Duration::ZERO, ms(300)).await;
        create_sub(store, "s", "plain", |s| {
            s.ack_deadline = ms(100);
            s.min_backoff = ms(1);
            s.max_backoff = ms(1);
        })
        .await;
        create_sub(store, "k", "kept", |_| {}).await;
        create_sub(store, "a", "aged", |_| {}).await;
        settle(store).await;
        let idle = round(store).await;
        assert_eq!((idle.topics_examined, idle.subscriptions_examined), (0, 0));

        // Leases taken after the idle time expire with nobody leasing again.
        publish(store, "plain", 2).await;
        assert_eq!(lease(store, "s", 2).await.len(), 2);
        rounds_until(store, "expired the leases", |r| r.leases_expired == 2).await;
        assert_eq!(store.stats("s").await.expect("stats").in_flight, 0);

        // Acked messages are removed (no retention).
        let mut again = Vec::new();
        for _ in 0..1000 {
            again.extend(lease(store, "s", 2).await);
            if again.len() == 2 {
                break;
            }
            tokio::time::sleep(ms(2)).await;
        }
        assert_eq!(again.len(), 2, "the expired leases are redelivered");
        store.ack("s", again).await.expect("ack");
        rounds_until(store, "deleted the acked messages", |r| r.deleted == 2).await;

        // A retention outlives the ack, then the messages go, with nothing
        // touching the topic in between.
        publish(store, "kept", 3).await;
        let leased = lease(store, "k", 3).await;
        store.ack("k", leased).await.expect("ack");
        let first = settle(store).await;
        assert_eq!(first.deleted, 0, "kept for the retention: {first:?}");
        rounds_until(store, "deleted after the retention", |r| r.deleted == 3).await;

        // Unacked messages past the topic's max age expire.
        publish(store, "aged", 2).await;
        rounds_until(store, "expired by max age", |r| r.expired == 2).await;
        assert_eq!(store.stats("a").await.expect("stats").backlog, 0);

        settle(store).await;
        let idle = round(store).await;
        assert_eq!((idle.topics_examined, idle.subscriptions_examined), (0, 0), "{idle:?}");
        ts.close().await;
    }
}

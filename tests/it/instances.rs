//! Several broker instances on one PostgreSQL database: commit order,
//! wake-ups across instances, and leases that hold across instances.

use std::collections::HashMap;
use std::time::Duration;

use sqlx::Connection;
use tidings::client::Outgoing;

use crate::harness::{Backend, TestBroker, ms, payload, pb, seq};

async fn postgres_broker(
    tune: impl FnOnce(&mut tidings::server::ServerConfig),
) -> Option<TestBroker> {
    let backend @ Backend::Postgres(_) = Backend::postgres()? else {
        return None;
    };
    Some(TestBroker::start_with(backend, tune).await)
}

#[tokio::test]
async fn a_sequence_number_that_commits_late_is_not_skipped() {
    let Some(b) = postgres_broker(|_| {}).await else {
        return;
    };
    b.topic_and_sub("t", "s", |_| {}).await;
    assert_eq!(b.publish("t", &["first"]).await, vec![1]);

    // Another publisher's transaction takes sequence 2 and stays open.
    let mut slow = sqlx::postgres::PgConnection::connect(b.database_url().unwrap())
        .await
        .unwrap();
    sqlx::query("BEGIN").execute(&mut slow).await.unwrap();
    let (topic_id, last): (i64, i64) =
        sqlx::query_as("SELECT id, last_seq FROM topics WHERE name = 't' FOR UPDATE")
            .fetch_one(&mut slow)
            .await
            .unwrap();
    let late = last + 1;
    let id = uuid::Uuid::now_v7();
    sqlx::query(
        "INSERT INTO messages (topic_id, seq, id, payload, published_at) VALUES ($1, $2, $3, $4, 0)",
    )
    .bind(topic_id)
    .bind(late)
    .bind(id.as_bytes().to_vec())
    .bind(b"late".to_vec())
    .execute(&mut slow)
    .await
    .unwrap();
    sqlx::query("INSERT INTO dedup (topic_id, id, seq, published_at) VALUES ($1, $2, $3, 0)")
        .bind(topic_id)
        .bind(id.as_bytes().to_vec())
        .bind(late)
        .execute(&mut slow)
        .await
        .unwrap();
    sqlx::query("UPDATE topics SET last_seq = $1 WHERE id = $2")
        .bind(late)
        .bind(topic_id)
        .execute(&mut slow)
        .await
        .unwrap();

    // A later publish through the broker cannot take sequence 3 and commit
    // while sequence 2 is open: it waits for the counter row.
    let publisher = b.publisher();
    let later = tokio::spawn(async move {
        publisher
            .publish(&[Outgoing::new("t", "later")])
            .await
            .unwrap()[0]
            .sequence
    });
    tokio::time::sleep(ms(500)).await;
    assert!(
        !later.is_finished(),
        "the later publish waited for the open transaction"
    );

    sqlx::query("COMMIT").execute(&mut slow).await.unwrap();
    assert_eq!(later.await.unwrap(), late + 1);

    let got = b.pull("s", 10, Duration::from_secs(5)).await;
    let order: Vec<(i64, String)> = got.iter().map(|m| (seq(m), payload(m))).collect();
    assert_eq!(
        order,
        vec![(1, "first".into()), (2, "late".into()), (3, "later".into())],
        "nothing skipped, in sequence order"
    );
    b.stop().await;
}

#[tokio::test]
async fn a_publish_on_one_instance_wakes_a_subscriber_on_another() {
    // With a 30 s poll interval only NOTIFY can deliver in time.
    let slow_poll =
        |c: &mut tidings::server::ServerConfig| c.limits.poll_interval = Duration::from_secs(30);
    let Some(a) = postgres_broker(slow_poll).await else {
        return;
    };
    let b = a.another(slow_poll).await;
    a.topic_and_sub("t", "s", |_| {}).await;
    let mut sub = b.subscribe("s");
    tokio::time::sleep(ms(300)).await;
    let mut latencies = Vec::new();
    for i in 0..20 {
        let sent = std::time::Instant::now();
        a.publish("t", &[&format!("m{i}")]).await;
        let m = tokio::time::timeout(Duration::from_secs(5), sub.next_message())
            .await
            .expect("woken across instances without polling")
            .unwrap()
            .unwrap();
        latencies.push(sent.elapsed());
        assert_eq!(payload(&m), format!("m{i}"));
        sub.ack(vec![m.ack_id.to_string()]);
    }
    latencies.sort();
    eprintln!(
        "cross-instance publish→delivery: median {:?}, max {:?}",
        latencies[10], latencies[19]
    );
    drop(sub);
    b.stop().await;
    a.stop().await;
}

#[tokio::test]
async fn consumers_on_different_instances_never_hold_the_same_message() {
    let Some(a) = postgres_broker(|_| {}).await else {
        return;
    };
    let b = a.another(|_| {}).await;
    a.topic_and_sub("t", "s", |s| {
        s.ack_deadline = Some(pb(Duration::from_secs(60)))
    })
    .await;
    let payloads: Vec<String> = (0..400).map(|i| format!("m{i}")).collect();
    let refs: Vec<&str> = payloads.iter().map(String::as_str).collect();
    a.publish("t", &refs[..200]).await;
    b.publish("t", &refs[200..]).await;

    let flow = tidings::client::FlowControl {
        max_messages: 20,
        max_bytes: 1 << 20,
        ..Default::default()
    };
    let mut tasks = Vec::new();
    for broker in [&a, &b] {
        for _ in 0..2 {
            let mut sub = broker.subscribe_with("s", flow);
            tasks.push(tokio::spawn(async move {
                let mut seen = Vec::new();
                loop {
                    match tokio::time::timeout(ms(2000), sub.next_message()).await {
                        Ok(Some(Ok(m))) => {
                            seen.push(payload(&m));
                            sub.ack(vec![m.ack_id.to_string()]);
                        }
                        Ok(other) => panic!("subscription failed: {other:?}"),
                        Err(_) => return seen,
                    }
                }
            }));
        }
    }
    let mut count: HashMap<String, usize> = HashMap::new();
    let mut per_consumer = Vec::new();
    for t in tasks {
        let seen = t.await.unwrap();
        per_consumer.push(seen.len());
        for p in seen {
            *count.entry(p).or_default() += 1;
        }
    }
    assert_eq!(
        count.len(),
        400,
        "every message delivered: {per_consumer:?}"
    );
    assert!(count.values().all(|&n| n == 1), "no message leased twice");
    assert!(
        per_consumer.iter().filter(|&&n| n > 0).count() >= 2,
        "{per_consumer:?}"
    );
    b.stop().await;
    a.stop().await;
}

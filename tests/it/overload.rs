//! Issue 16: a broker that falls behind must not turn its own delay into
//! redeliveries and dead letters; an ack after a lease ended answers STALE.

use std::time::Duration;

use sqlx::Connection;
use tonic::Code;

use crate::harness::{TestBroker, backend_test, ms, payload, pb};

/// Holds the broker's writer: on SQLite a transaction holding the database's
/// write lock (the writer's BEGIN waits for it); on PostgreSQL a lock on the
/// subscription's delivery rows (the writer's ack check waits for it).
/// Dropping the returned connection's transaction lets the writer go.
enum Hold {
    Sqlite(sqlx::SqliteConnection),
    Postgres(sqlx::PgConnection),
}

/// A connection to `url` with a transaction open.
async fn pg_transaction(url: &str) -> sqlx::PgConnection {
    let mut conn = sqlx::PgConnection::connect(url).await.expect("connect");
    sqlx::query("BEGIN")
        .execute(&mut conn)
        .await
        .expect("begin");
    conn
}

impl Hold {
    /// Holds publishing: SQLite's write lock, or PostgreSQL's topics table
    /// (the writer's per-topic counter lock waits for it).
    async fn publishing(b: &TestBroker) -> Hold {
        match b.database_url() {
            None => Hold::take(b, "").await,
            Some(url) => {
                let mut conn = pg_transaction(url).await;
                sqlx::query("LOCK TABLE topics IN EXCLUSIVE MODE")
                    .execute(&mut conn)
                    .await
                    .expect("lock topics");
                Hold::Postgres(conn)
            }
        }
    }

    async fn take(b: &TestBroker, sub: &str) -> Hold {
        match b.database_url() {
            None => {
                let path = b.data_dir().join("tidings.db");
                let url = format!("sqlite://{}", path.display());
                let mut conn = sqlx::SqliteConnection::connect(&url).await.expect("open");
                sqlx::query("BEGIN IMMEDIATE")
                    .execute(&mut conn)
                    .await
                    .expect("take the write lock");
                Hold::Sqlite(conn)
            }
            Some(url) => {
                let mut conn = pg_transaction(url).await;
                let locked: Vec<i64> = sqlx::query_scalar(
                    "SELECT d.seq FROM deliveries d JOIN subscriptions s ON s.id = d.sub_id \
                     WHERE s.name = $1 FOR UPDATE OF d",
                )
                .bind(sub)
                .fetch_all(&mut conn)
                .await
                .expect("lock the delivery rows");
                assert!(!locked.is_empty(), "a delivery row to lock");
                Hold::Postgres(conn)
            }
        }
    }

    async fn release(self) {
        match self {
            Hold::Sqlite(mut c) => {
                sqlx::query("ROLLBACK")
                    .execute(&mut c)
                    .await
                    .expect("rollback");
            }
            Hold::Postgres(mut c) => {
                sqlx::query("ROLLBACK")
                    .execute(&mut c)
                    .await
                    .expect("rollback");
            }
        }
    }
}

backend_test! {
    /// Issue 16: an ack that reached the broker before its lease's deadline
    /// counts, even when the writer gets to it only after the deadline.
    async fn ack_that_arrived_in_time_counts_while_the_writer_is_held(backend) {
        let b = TestBroker::start(backend).await;
        let lease = Duration::from_secs(1);
        b.topic_and_sub("t", "s", |s| {
            s.ack_deadline = Some(pb(lease));
            s.max_attempts = 2;
        })
        .await;
        b.publish("t", &["m"]).await;
        let got = b.pull("s", 1, Duration::from_secs(5)).await;
        assert_eq!(got.len(), 1);
        let ack_id = got[0].ack_id.clone();

        let hold = Hold::take(&b, "s").await;
        let acking = {
            let b = b.raw_subscriber();
            let ack_id = ack_id.clone();
            tokio::spawn(async move {
                let mut b = b;
                b.ack(tidings::proto::AckRequest {
                    subscription: "s".into(),
                    ack_ids: vec![ack_id],
                })
                .await
            })
        };
        // The lease runs out while the ack waits for the writer.
        tokio::time::sleep(lease + ms(500)).await;
        assert!(!acking.is_finished(), "the writer was held");
        hold.release().await;
        let answer = acking.await.expect("ack task");
        assert!(answer.is_ok(), "an ack that came in time is honoured: {answer:?}");

        let stats = b.stats("s").await;
        assert_eq!(stats.acked, 1, "{stats:?}");
        assert_eq!(stats.redelivered, 0, "{stats:?}");
        assert_eq!(stats.dead_lettered, 0, "{stats:?}");
        assert_eq!(stats.backlog, 0, "{stats:?}");
        assert!(b.pull("s", 1, ms(300)).await.is_empty(), "nothing comes back");
        b.stop().await;
    }
}

backend_test! {
    /// Issue 16: an ack sent after its lease expired answers STALE, also
    /// once the message was redelivered and acked under its new lease.
    async fn ack_after_expiry_is_stale_even_once_the_message_is_done(backend) {
        let b = TestBroker::start(backend).await;
        b.topic_and_sub("t", "s", |s| {
            s.ack_deadline = Some(pb(Duration::from_secs(1)));
            s.min_backoff = Some(pb(ms(1)));
            s.max_backoff = Some(pb(ms(1)));
        })
        .await;
        b.publish("t", &["m"]).await;
        let first = b.pull("s", 1, Duration::from_secs(5)).await;
        assert_eq!(first.len(), 1);
        // Expired and redelivered.
        let second = loop {
            let got = b.pull("s", 1, Duration::from_secs(5)).await;
            if !got.is_empty() {
                break got;
            }
        };
        assert_eq!(payload(&second[0]), "m");
        // The old lease, while the new one is current: stale.
        let err = b.ack("s", vec![first[0].ack_id.clone()]).await.expect_err("old lease");
        assert_eq!(err.code(), Code::FailedPrecondition);
        assert!(err.message().contains("stale"), "{}", err.message());
        b.ack("s", vec![second[0].ack_id.clone()]).await.expect("current lease");
        // The expired lease once the message is done (its row gone): stale
        // too, not unknown.
        let err = b.ack("s", vec![first[0].ack_id.clone()]).await.expect_err("done");
        assert_eq!(err.code(), Code::FailedPrecondition);
        assert!(err.message().contains("stale"), "{}", err.message());
        // The current lease acked again within it: a repeated ack, unknown.
        let err = b.ack("s", vec![second[0].ack_id.clone()]).await.expect_err("again");
        assert_eq!(err.code(), Code::FailedPrecondition);
        assert!(err.message().contains("already acked"), "{}", err.message());
        b.stop().await;
    }
}

backend_test! {
    /// Issue 16: a call whose client deadline passes while the broker works
    /// answers DEADLINE_EXCEEDED (tonic's own answer is CANCELLED, which a
    /// client cannot tell from a call it cancelled).
    async fn a_call_past_its_deadline_answers_deadline_exceeded(backend) {
        let b = TestBroker::start(backend).await;
        b.topic_and_sub("t", "s", |_| {}).await;
        let hold = Hold::publishing(&b).await;
        let mut publisher = b.raw_publisher();
        let mut request = tonic::Request::new(tidings::proto::PublishRequest {
            messages: vec![tidings::proto::Message {
                id: uuid::Uuid::now_v7().to_string(),
                topic: "t".into(),
                payload: b"late".to_vec(),
                ..Default::default()
            }],
        });
        request.set_timeout(ms(1000));
        let answer = publisher.publish(request).await;
        hold.release().await;
        let err = answer.expect_err("the broker was held past the deadline");
        assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
        b.stop().await;
    }
}

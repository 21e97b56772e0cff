//! The outbox and its relay: enqueue in the application's transaction, relay
//! to the real broker, on SQLite and on PostgreSQL (the application's
//! database on the same backend as the broker's).

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use sqlx::{PgPool, SqlitePool};
use tempfile::TempDir;
use tidings::client::Backoff;
use tidings::outbox::{self, Message, Outbox, Relay, RelayConfig};
use tidings::proto;
use uuid::Uuid;

use crate::harness::{
    Backend, TestBroker, backend_test, drop_database, fresh_database, ms, payload,
};

/// The application's own database, holding the outbox.
pub(crate) enum AppDb {
    Sqlite {
        pool: SqlitePool,
        url: String,
        _dir: TempDir,
    },
    Postgres {
        pool: PgPool,
        url: String,
        admin: String,
        name: String,
    },
}

/// Runs `$body` with `$pool` bound to the application's pool, whichever
/// backend it is (the code is the same, the types differ).
macro_rules! on_pool {
    ($app:expr, |$pool:ident| $body:expr) => {
        match $app {
            AppDb::Sqlite { pool: $pool, .. } => $body,
            AppDb::Postgres { pool: $pool, .. } => $body,
        }
    };
}

impl AppDb {
    /// A fresh application database on `backend`, with the outbox migrated
    /// and a `counters` table the tests' writers serialize on.
    pub(crate) async fn create(backend: &Backend) -> AppDb {
        let db = match backend {
            Backend::Sqlite => {
                let dir = tempfile::tempdir().expect("temp dir");
                let url = format!("sqlite://{}/app.db", dir.path().display());
                let options: sqlx::sqlite::SqliteConnectOptions = url.parse().expect("url");
                let pool = sqlx::sqlite::SqlitePoolOptions::new()
                    .max_connections(8)
                    .connect_with(
                        options
                            .create_if_missing(true)
                            .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
                            .busy_timeout(Duration::from_secs(30)),
                    )
                    .await
                    .expect("open SQLite");
                AppDb::Sqlite {
                    pool,
                    url,
                    _dir: dir,
                }
            }
            Backend::Postgres(admin) => {
                let (url, name) = fresh_database(admin).await;
                let pool = sqlx::postgres::PgPoolOptions::new()
                    .max_connections(12)
                    .connect(&url)
                    .await
                    .expect("connect PostgreSQL");
                AppDb::Postgres {
                    pool,
                    url,
                    admin: admin.clone(),
                    name,
                }
            }
        };
        db.outbox().migrate().await.expect("migrate outbox");
        db.exec("CREATE TABLE counters (key TEXT PRIMARY KEY, n BIGINT NOT NULL)")
            .await;
        db
    }

    pub(crate) fn url(&self) -> &str {
        match self {
            AppDb::Sqlite { url, .. } | AppDb::Postgres { url, .. } => url,
        }
    }

    /// An outbox handle over the application's pool.
    pub(crate) fn outbox(&self) -> Outbox {
        match self {
            AppDb::Sqlite { pool, .. } => Outbox::sqlite(pool.clone()),
            AppDb::Postgres { pool, .. } => Outbox::postgres(pool.clone()),
        }
    }

    /// Runs plain SQL, as an application in any language would.
    pub(crate) async fn exec(&self, sql: &str) {
        let sql = sqlx::AssertSqlSafe(sql.to_owned());
        on_pool!(self, |pool| sqlx::raw_sql(sql)
            .execute(pool)
            .await
            .map(|_| ()))
        .expect("plain SQL");
    }

    /// Enqueues `messages` in one transaction that commits or rolls back.
    /// A transaction the database refuses as a conflict (`Unavailable`:
    /// SQLite's busy snapshot under concurrent writers) is run again, as an
    /// application would.
    pub(crate) async fn enqueue(&self, messages: &[Message], commit: bool) {
        for attempt in 1.. {
            let result: Result<(), tidings::Error> = on_pool!(self, |pool| {
                let mut tx = pool.begin().await.expect("begin");
                match outbox::enqueue_all(&mut tx, messages).await {
                    Err(e) => Err(e),
                    Ok(_) if commit => tx.commit().await.map_err(tidings::Error::from),
                    Ok(_) => tx.rollback().await.map_err(tidings::Error::from),
                }
            });
            match result {
                Ok(()) => return,
                Err(tidings::Error::Unavailable(e)) if attempt < 50 => {
                    eprintln!("enqueue attempt {attempt}: {e}; again");
                    tokio::time::sleep(ms(10)).await;
                }
                Err(e) => panic!("enqueue: {e}"),
            }
        }
    }

    /// One writer's transaction: takes the next number of `key` from the
    /// counters table (serializing writers of a key, as an application's own
    /// row would) and enqueues a message carrying it. Returns the message id
    /// and the number. Retries the whole transaction on a conflict.
    pub(crate) async fn next_in_key(&self, topic: &str, key: &str) -> (Uuid, i64) {
        for _ in 0..50 {
            if let Ok(done) = self.try_next_in_key(topic, key).await {
                return done;
            }
            tokio::time::sleep(ms(5)).await;
        }
        panic!("writer kept failing");
    }

    async fn try_next_in_key(&self, topic: &str, key: &str) -> Result<(Uuid, i64), tidings::Error> {
        const BUMP: &str = "INSERT INTO counters (key, n) VALUES ($1, 1) \
                            ON CONFLICT (key) DO UPDATE SET n = counters.n + 1 RETURNING n";
        on_pool!(self, |pool| {
            let mut tx = pool.begin().await?;
            let n: i64 = sqlx::query_scalar(BUMP)
                .bind(key)
                .fetch_one(&mut *tx)
                .await?;
            let m = Message::new(topic, n.to_string()).with_key(key);
            let id = outbox::enqueue(&mut tx, &m).await?;
            tx.commit().await?;
            Ok((id, n))
        })
    }

    /// Holds a lock that makes deletes from the outbox wait (and inserts;
    /// reads go on) until the returned transaction is dropped.
    pub(crate) async fn block_deletes(&self) -> DeleteBlock {
        match self {
            AppDb::Sqlite { pool, .. } => {
                let mut tx = pool.begin().await.expect("begin");
                // Any write statement takes SQLite's one write lock.
                sqlx::query("UPDATE counters SET n = n WHERE 0")
                    .execute(&mut *tx)
                    .await
                    .expect("write lock");
                DeleteBlock::Sqlite(tx)
            }
            AppDb::Postgres { pool, .. } => {
                let mut tx = pool.begin().await.expect("begin");
                sqlx::query("LOCK TABLE tidings_outbox IN SHARE MODE")
                    .execute(&mut *tx)
                    .await
                    .expect("table lock");
                DeleteBlock::Postgres(tx)
            }
        }
    }

    /// Rows left in the outbox.
    pub(crate) async fn depth(&self) -> i64 {
        self.outbox().stats().await.expect("outbox stats").depth
    }

    pub(crate) async fn drop(self) {
        match self {
            AppDb::Sqlite { pool, .. } => pool.close().await,
            AppDb::Postgres {
                pool, admin, name, ..
            } => {
                pool.close().await;
                drop_database(&admin, &name).await;
            }
        }
    }
}

/// A transaction holding a lock on the outbox; dropping it rolls back.
#[allow(dead_code)]
pub(crate) enum DeleteBlock {
    Sqlite(sqlx::Transaction<'static, sqlx::Sqlite>),
    Postgres(sqlx::Transaction<'static, sqlx::Postgres>),
}

/// A broker with topic "orders" and subscription "s" on it, an application
/// database, and a relay between them.
pub(crate) struct Scene {
    pub(crate) broker: TestBroker,
    pub(crate) app: AppDb,
    pub(crate) relay: Relay,
}

impl Scene {
    pub(crate) async fn start(backend: &Backend, ordered: bool) -> Scene {
        let broker = TestBroker::start(backend.clone()).await;
        broker
            .topic_and_sub("orders", "s", |s| s.ordered = ordered)
            .await;
        let app = AppDb::create(backend).await;
        let relay = Relay::start(app.outbox(), relay_config(&broker))
            .await
            .expect("relay");
        Scene { broker, app, relay }
    }

    /// Stops the relay, checks the outbox is empty, and cleans up.
    pub(crate) async fn finish(self) {
        self.relay.stop().await;
        assert_eq!(self.app.depth().await, 0, "acked rows are deleted");
        self.app.drop().await;
        self.broker.stop().await;
    }
}

/// Relay settings for tests: fast polls, retries and holds.
pub(crate) fn relay_config(broker: &TestBroker) -> RelayConfig {
    let mut c = RelayConfig::new(broker.url.clone());
    c.poll_interval = ms(50);
    c.retry = Backoff {
        min: ms(20),
        max: ms(200),
        give_up_after: None,
    };
    c.hold_min = ms(50);
    c.hold_max = ms(200);
    c.heartbeat_interval = ms(100);
    c
}

/// Receives from `sub` until `n` distinct messages arrived, acking each;
/// returns them in arrival order (each id once).
pub(crate) async fn receive(
    sub: &mut tidings::client::Subscription,
    n: usize,
) -> Vec<tidings::model::Delivery> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    while out.len() < n {
        let m = tokio::time::timeout(Duration::from_secs(30), sub.next_message())
            .await
            .expect("messages arrive in time")
            .expect("subscription open")
            .expect("no error");
        sub.ack(vec![m.ack_id.to_string()]);
        let id = m.message.id;
        if seen.insert(id) {
            out.push(m);
        }
    }
    out
}

fn id_of(m: &tidings::model::Delivery) -> Uuid {
    m.message.id
}

/// The topic's last sequence number: how many messages the broker stored.
pub(crate) async fn stored(broker: &TestBroker, topic: &str) -> i64 {
    broker
        .raw_admin()
        .get_topic(proto::GetTopicRequest { name: topic.into() })
        .await
        .expect("get topic")
        .into_inner()
        .topic
        .expect("topic")
        .last_sequence
}

backend_test! {
    async fn rolled_back_enqueue_never_publishes_committed_one_always_does(backend) {
        let Scene { broker, app, relay } = Scene::start(&backend, false).await;
        let mut sub = broker.subscribe("s");

        let rolled_back: Vec<Message> = (0..3).map(|i| Message::new("orders", format!("rb{i}"))).collect();
        let committed: Vec<Message> = (0..5).map(|i| Message::new("orders", format!("ok{i}"))).collect();
        app.enqueue(&rolled_back, false).await;
        app.enqueue(&committed, true).await;
        // A marker committed after both: once it arrives, anything of the
        // rolled-back transaction would have arrived before it.
        let marker = Message::new("orders", "marker");
        app.enqueue(std::slice::from_ref(&marker), true).await;

        let got = receive(&mut sub, 6).await;
        let ids: Vec<Uuid> = got.iter().map(id_of).collect();
        let mut want: Vec<Uuid> = committed.iter().map(|m| m.id).collect();
        want.push(marker.id);
        assert_eq!(ids, want, "exactly the committed messages, in order, with their enqueue ids");
        assert_eq!(stored(&broker, "orders").await, 6);
        for m in &rolled_back {
            assert!(!ids.contains(&m.id));
        }
        Scene { broker, app, relay }.finish().await;
    }
}

backend_test! {
    async fn broker_down_for_seconds_then_back_delivers_every_message_once(backend) {
        let Scene { broker, app, relay } = Scene::start(&backend, false).await;
        let mut status = relay.watch();

        let before: Vec<Message> = (0..50).map(|i| Message::new("orders", format!("a{i}"))).collect();
        app.enqueue(&before, true).await;
        status
            .wait_for(|s| s.published >= 50)
            .await
            .expect("relay running");

        let paused = broker.pause().await;
        let during: Vec<Message> = (0..200).map(|i| Message::new("orders", format!("b{i}"))).collect();
        for chunk in during.chunks(20) {
            app.enqueue(chunk, true).await;
        }
        // The relay keeps failing while the broker is down (its backoff is
        // capped at 200ms here, so this takes several seconds).
        let failures_seen = tokio::time::Instant::now();
        status
            .wait_for(|s| s.last_error.is_some())
            .await
            .expect("relay running");
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(relay.status().last_error.is_some(), "still failing while the broker is down");
        let stats = app.outbox().stats().await.expect("stats");
        assert_eq!(stats.depth, 200, "rows wait in the outbox");
        assert!(stats.oldest_age.expect("oldest") >= failures_seen.elapsed());

        let broker = paused.resume().await;
        status
            .wait_for(|s| s.published >= 250 && s.last_error.is_none())
            .await
            .expect("relay running");
        let mut sub = broker.subscribe("s");
        let got = receive(&mut sub, 250).await;
        let ids: Vec<Uuid> = got.iter().map(id_of).collect();
        let want: Vec<Uuid> = before.iter().chain(&during).map(|m| m.id).collect();
        assert_eq!(ids, want, "every message once, in order");
        assert_eq!(stored(&broker, "orders").await, 250, "nothing stored twice");
        Scene { broker, app, relay }.finish().await;
    }
}

backend_test! {
    async fn late_committing_lower_number_is_neither_skipped_nor_reordered(backend) {
        let Scene { broker, app, relay } = Scene::start(&backend, false).await;
        let mut sub = broker.subscribe("s");
        match &app {
            AppDb::Postgres { pool, .. } => {
                // T1 takes the lower number for key "k" and stays open.
                let mut t1 = pool.begin().await.expect("begin");
                let early = Message::new("orders", "k-first").with_key("k");
                outbox::enqueue(&mut t1, &early).await.expect("enqueue");
                // A row of another key commits meanwhile with a higher
                // number: it is relayed at once, past the open gap.
                let other = Message::new("orders", "other-key").with_key("j");
                app.enqueue(std::slice::from_ref(&other), true).await;
                let got = receive(&mut sub, 1).await;
                assert_eq!(id_of(&got[0]), other.id);
                // A second writer of key "k" waits for T1's key lock, so it
                // can neither take a number below T1's nor commit first.
                let second = Message::new("orders", "k-second").with_key("k");
                let pool2 = pool.clone();
                let m2 = second.clone();
                let t2 = tokio::spawn(async move {
                    let mut tx = pool2.begin().await.expect("begin");
                    outbox::enqueue(&mut tx, &m2).await.expect("enqueue");
                    tx.commit().await.expect("commit");
                });
                wait_for_lock_waiter(pool).await;
                t1.commit().await.expect("commit");
                t2.await.expect("second writer");
                let got = receive(&mut sub, 2).await;
                let ids: Vec<Uuid> = got.iter().map(id_of).collect();
                assert_eq!(ids, vec![early.id, second.id], "the late commit is relayed, first in its key");
            }
            AppDb::Sqlite { pool, .. } => {
                // SQLite runs one write transaction at a time: a second
                // writer waits for the first, so numbers follow commits.
                let mut t1 = pool.begin().await.expect("begin");
                let early = Message::new("orders", "k-first").with_key("k");
                outbox::enqueue(&mut t1, &early).await.expect("enqueue");
                let second = Message::new("orders", "k-second").with_key("k");
                let pool2 = pool.clone();
                let m2 = second.clone();
                let t2 = tokio::spawn(async move {
                    let mut tx = pool2.begin().await.expect("begin");
                    outbox::enqueue(&mut tx, &m2).await.expect("enqueue");
                    tx.commit().await.expect("commit");
                });
                tokio::task::yield_now().await;
                t1.commit().await.expect("commit");
                t2.await.expect("second writer");
                let got = receive(&mut sub, 2).await;
                let ids: Vec<Uuid> = got.iter().map(id_of).collect();
                assert_eq!(ids, vec![early.id, second.id]);
            }
        }
        assert_eq!(stored(&broker, "orders").await, if matches!(app, AppDb::Postgres { .. }) { 3 } else { 2 });
        Scene { broker, app, relay }.finish().await;
    }
}

/// Waits until some session of the database waits for an advisory lock.
async fn wait_for_lock_waiter(pool: &PgPool) {
    for _ in 0..2000 {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted",
        )
        .fetch_one(pool)
        .await
        .expect("pg_locks");
        if waiting > 0 {
            return;
        }
        tokio::time::sleep(ms(5)).await;
    }
    panic!("the second writer never waited for the key lock");
}

backend_test! {
    async fn per_key_order_holds_with_concurrent_writers_and_two_relays(backend) {
        let broker = TestBroker::start(backend.clone()).await;
        broker
            .topic_and_sub("orders", "s", |s| s.ordered = true)
            .await;
        let app = AppDb::create(&backend).await;
        // Two relays, each with its own pool, as two processes would be.
        let second_outbox = Outbox::connect(app.url()).await.expect("second pool");
        let first = Relay::start(app.outbox(), relay_config(&broker)).await.expect("relay 1");
        let second = Relay::start(second_outbox, relay_config(&broker)).await.expect("relay 2");

        const WRITERS: usize = 6;
        const PER_WRITER: usize = 150;
        const KEYS: u64 = 8;
        let app = std::sync::Arc::new(app);
        let mut writers = Vec::new();
        for w in 0..WRITERS {
            let app = app.clone();
            writers.push(tokio::spawn(async move {
                let mut rng = crate::harness::Rng::new(w as u64 + 11);
                for _ in 0..PER_WRITER {
                    let key = format!("k{}", rng.below(KEYS));
                    app.next_in_key("orders", &key).await;
                }
            }));
        }
        // Halfway, the relay doing the work stops; the other carries on (on
        // PostgreSQL it takes over the leader lock).
        let (mut a, mut b) = (first.watch(), second.watch());
        while a.borrow().published + b.borrow().published < 300 {
            tokio::select! {
                r = a.changed() => r.expect("relay 1 running"),
                r = b.changed() => r.expect("relay 2 running"),
            }
        }
        let (busy, other) = if first.status().published >= second.status().published {
            (first, second)
        } else {
            (second, first)
        };
        busy.stop().await;
        let second = other;
        for w in writers {
            w.await.expect("writer");
        }
        let total = WRITERS * PER_WRITER;
        let mut sub = broker.subscribe("s");
        let got = receive(&mut sub, total).await;
        let mut last: HashMap<String, i64> = HashMap::new();
        for m in &got {
            let key = m.message.key.clone().unwrap_or_default();
            let n: i64 = payload(m).parse().expect("number");
            let prev = last.insert(key.clone(), n).unwrap_or(0);
            assert_eq!(n, prev + 1, "key {} out of order: {} after {}", key, n, prev);
        }
        assert_eq!(stored(&broker, "orders").await, total as i64, "each message stored once");
        second.stop().await;
        let app = std::sync::Arc::into_inner(app).expect("writers done");
        assert_eq!(app.depth().await, 0);
        app.drop().await;
        broker.stop().await;
    }
}

backend_test! {
    async fn plain_sql_inserts_are_relayed(backend) {
        let Scene { broker, app, relay } = Scene::start(&backend, false).await;
        let mut sub = broker.subscribe("s");
        // What a Python, Ruby, Go or shell program writes: only the columns
        // it cares about, every other one has a default.
        app.exec(
            "BEGIN; \
             INSERT INTO counters (key, n) VALUES ('order-1', 1); \
             INSERT INTO tidings_outbox (topic, key, payload) VALUES ('orders', 'customer-7', 'created'); \
             INSERT INTO tidings_outbox (topic, payload, attributes) \
               VALUES ('orders', 'no key', '{\"source\": \"script\", \"n\": 3}'); \
             COMMIT;",
        )
        .await;
        app.exec(
            "BEGIN; INSERT INTO tidings_outbox (topic, payload) VALUES ('orders', 'rolled back'); ROLLBACK;",
        )
        .await;
        app.exec("INSERT INTO tidings_outbox (topic, key, payload) VALUES ('orders', 'customer-7', 'paid')")
            .await;
        let got = receive(&mut sub, 3).await;
        let payloads: Vec<String> = got.iter().map(payload).collect();
        assert_eq!(payloads, vec!["created", "no key", "paid"]);
        let first = proto::Message::from(got[0].message.clone());
        assert_eq!(first.key, "customer-7");
        assert_eq!(Uuid::parse_str(&first.id).expect("uuid").get_version_num(), 7, "default ids are UUID v7");
        let second = proto::Message::from(got[1].message.clone());
        assert_eq!(second.key, "");
        assert_eq!(second.attributes.get("source").map(String::as_str), Some("script"));
        assert_eq!(second.attributes.get("n").map(String::as_str), Some("3"));
        assert_eq!(stored(&broker, "orders").await, 3);
        Scene { broker, app, relay }.finish().await;
    }
}

backend_test! {
    async fn refused_message_waits_with_its_key_until_the_broker_accepts_it(backend) {
        let Scene { broker, app, relay } = Scene::start(&backend, true).await;
        let mut status = relay.watch();
        let mut sub = broker.subscribe("s");
        // "late" does not exist yet: its rows wait. Rows of other topics and
        // keys flow past them.
        let early = Message::new("late", "l1").with_key("k");
        let blocked = Message::new("late", "l2").with_key("k");
        let free = Message::new("orders", "o1").with_key("k");
        app.enqueue(&[early.clone(), blocked.clone(), free.clone()], true).await;
        let got = receive(&mut sub, 1).await;
        assert_eq!(id_of(&got[0]), free.id);
        // `published` counts rows after their delete.
        status
            .wait_for(|s| s.held >= 1 && s.published >= 1)
            .await
            .expect("relay running");
        let stats = app.outbox().stats().await.expect("stats");
        assert_eq!(stats.depth, 2, "refused rows are kept, never dropped");
        assert!(stats.held >= 1);
        assert!(stats.held_error.as_deref().unwrap_or("").contains("late"), "{stats:?}");

        broker.topic_and_sub("late", "late-s", |_| {}).await;
        let mut late = broker.subscribe("late-s");
        let got = receive(&mut late, 2).await;
        let ids: Vec<Uuid> = got.iter().map(id_of).collect();
        assert_eq!(ids, vec![early.id, blocked.id], "in order once the topic exists");
        Scene { broker, app, relay }.finish().await;
    }
}

backend_test! {
    /// The relay deletes a batch's rows after the ack; a row it skipped
    /// (held) among them stays, though its number lies inside the batch's
    /// range (on PostgreSQL a dense list is deleted by range and list).
    async fn issue_14_a_held_row_among_a_batchs_rows_is_not_deleted(backend) {
        let broker = TestBroker::start(backend.clone()).await;
        broker.topic_and_sub("orders", "s", |_| {}).await;
        let app = AppDb::create(&backend).await;
        let messages: Vec<Message> = (0..20)
            .map(|i| Message::new("orders", format!("m{i}")))
            .collect();
        app.enqueue(&messages, true).await;
        let held = &messages[10];
        let later = match &app {
            AppDb::Sqlite { .. } => "9000000000000000",
            AppDb::Postgres { .. } => "now() + interval '1 hour'",
        };
        app.exec(&format!(
            "UPDATE tidings_outbox SET not_before = {later}, last_error = 'held by the test' \
             WHERE id = '{}'",
            held.id
        ))
        .await;
        let relay = Relay::start(app.outbox(), relay_config(&broker))
            .await
            .expect("relay");
        relay
            .watch()
            .wait_for(|s| s.published >= 19)
            .await
            .expect("relay running");
        // A few polls and sweeps from the lowest row.
        tokio::time::sleep(ms(300)).await;
        let stats = app.outbox().stats().await.expect("stats");
        assert_eq!((stats.depth, stats.held), (1, 1), "the held row stays: {stats:?}");
        assert_eq!(stored(&broker, "orders").await, 19);
        relay.stop().await;
        app.drop().await;
        broker.stop().await;
    }
}

backend_test! {
    async fn stats_report_depth_oldest_age_and_last_publish(backend) {
        let broker = TestBroker::start(backend.clone()).await;
        broker.topic_and_sub("orders", "s", |_| {}).await;
        let app = AppDb::create(&backend).await;
        app.enqueue(&[Message::new("orders", "a"), Message::new("orders", "b")], true).await;
        let before = app.outbox().stats().await.expect("stats");
        assert_eq!(before.depth, 2);
        assert!(before.oldest_age.is_some());
        assert!(before.relays.is_empty());

        let relay = Relay::start(app.outbox(), relay_config(&broker)).await.expect("relay");
        let mut status = relay.watch();
        status.wait_for(|s| s.published >= 2).await.expect("relay running");
        // The relay writes its report at its next heartbeat (100ms here).
        let mut report = None;
        for _ in 0..200 {
            let s = app.outbox().stats().await.expect("stats");
            if let Some(r) = s.relays.iter().find(|r| r.published >= 2) {
                assert_eq!(s.depth, 0);
                assert_eq!(s.oldest_age, None);
                report = Some(r.clone());
                break;
            }
            tokio::time::sleep(ms(20)).await;
        }
        let report = report.expect("the relay reported its publishes");
        assert!(report.leader);
        assert!(report.last_publish.is_some());
        relay.stop().await;
        assert!(app.outbox().stats().await.expect("stats").relays.is_empty(), "a stopped relay removes its row");
        app.drop().await;
        broker.stop().await;
    }
}

backend_test! {
    async fn an_outbox_made_by_an_older_tidings_gains_the_heartbeat_interval(backend) {
        let app = AppDb::create(&backend).await;
        app.exec("ALTER TABLE tidings_outbox_relays DROP COLUMN heartbeat_interval_us").await;
        // A row an older relay wrote, without its interval.
        let now = match &backend {
            Backend::Sqlite => "CAST((julianday('now') - 2440587.5) * 86400000000.0 AS INTEGER)",
            Backend::Postgres(_) => "now()",
        };
        app.exec(&format!(
            "INSERT INTO tidings_outbox_relays (relay, started_at, heartbeat_at, leader, published) \
             VALUES ('old', {now}, {now}, true, 0)"
        ))
        .await;
        app.outbox().migrate().await.expect("migrate an older outbox");
        app.outbox().migrate().await.expect("and again");
        let stats = app.outbox().stats().await.expect("stats");
        let old = &stats.relays[0];
        assert_eq!(old.heartbeat_interval, None);
        assert!(old.alive, "judged by the default interval: {old:?}");
        assert_eq!(stats.leaders, vec!["old".to_owned()]);
        app.drop().await;
    }
}

backend_test! {
    async fn issue_14_a_refusal_in_the_middle_of_a_pipeline_neither_reorders_a_key_nor_loses_a_row(backend) {
        // The broker refuses messages over 1 KiB: one row of each key "k0"
        // to "k3" in the middle of the outbox is over it. With several
        // batches in flight, batches after a refused one may well be stored
        // by the broker; none of them may hold a later row of its key.
        let broker = TestBroker::start_with(backend.clone(), |c| c.limits.max_message_bytes = 1024).await;
        broker.topic_and_sub("orders", "s", |s| s.ordered = true).await;
        let app = AppDb::create(&backend).await;
        const KEYS: usize = 4;
        const ROWS: usize = 12;
        let refused_at = |key: usize| 3 + 2 * key;
        let mut messages = Vec::new();
        let mut refused = Vec::new();
        for i in 0..ROWS {
            for key in 0..KEYS {
                let text = format!("k{key}-{i}");
                let body = if i == refused_at(key) { format!("{text}{}", "x".repeat(2048)) } else { text };
                let m = Message::new("orders", body).with_key(format!("k{key}"));
                if i == refused_at(key) {
                    refused.push((m.id, format!("k{key}-{i}")));
                }
                messages.push(m);
                for j in 0..3 {
                    messages.push(Message::new("orders", format!("free-{i}-{key}-{j}")));
                }
            }
        }
        app.enqueue(&messages, true).await;
        let mut config = relay_config(&broker);
        config.batch_size = 2;
        config.pipeline = 8;
        let relay = Relay::start(app.outbox(), config).await.expect("relay");
        let mut status = relay.watch();

        // Everything but each key from its refused row on reaches the
        // broker; those rows wait in the outbox, and none of them was stored.
        let waiting: usize = (0..KEYS).map(|key| ROWS - refused_at(key)).sum();
        let through = (messages.len() - waiting) as u64;
        status
            .wait_for(|s| s.held >= KEYS as u64 && s.published >= through)
            .await
            .expect("relay running");
        let mut sub = broker.subscribe("s");
        let got = receive(&mut sub, through as usize).await;
        let of_key = |got: &[tidings::model::Delivery], key: usize| -> Vec<String> {
            got.iter().map(payload).filter(|p| p.starts_with(&format!("k{key}-"))).collect()
        };
        for key in 0..KEYS {
            let expected: Vec<String> = (0..refused_at(key)).map(|i| format!("k{key}-{i}")).collect();
            assert_eq!(of_key(&got, key), expected, "k{key}'s rows before its refused one, in order");
        }
        assert_eq!(app.depth().await, waiting as i64, "the refused rows and the later rows of their keys wait");
        assert_eq!(stored(&broker, "orders").await, through as i64, "nothing after a refused row was stored");

        // The application fixes the rows: they go through, and the rest of
        // their keys after them, in order.
        for (id, text) in &refused {
            let small = match &app {
                AppDb::Sqlite { .. } => format!("CAST('{text}' AS BLOB)"),
                AppDb::Postgres { .. } => format!("convert_to('{text}', 'UTF8')"),
            };
            app.exec(&format!("UPDATE tidings_outbox SET payload = {small} WHERE id = '{id}'")).await;
        }
        // (A redelivery of an earlier message, its ack overtaken by a lease
        // expiry on a loaded machine, is not one of these.)
        let early: HashSet<Uuid> = got.iter().map(id_of).collect();
        let mut rest = Vec::new();
        while rest.len() < waiting {
            let more = receive(&mut sub, waiting - rest.len()).await;
            rest.extend(more.into_iter().filter(|m| !early.contains(&id_of(m))));
        }
        for key in 0..KEYS {
            let expected: Vec<String> = (refused_at(key)..ROWS).map(|i| format!("k{key}-{i}")).collect();
            assert_eq!(of_key(&rest, key), expected, "then the rest of k{key}, in order");
        }
        assert_eq!(stored(&broker, "orders").await, messages.len() as i64, "each row stored once");
        drop(sub);
        Scene { broker, app, relay }.finish().await;
    }
}

/// Deletes wait on a lock the test holds; the relay reads and sends the
/// next batches meanwhile, up to a pipeline's worth of deletes waiting. Once
/// they go through, the sweep from the lowest row finds nothing to send
/// again. PostgreSQL only: SQLite has one write lock for the whole
/// database, so a test holding it stalls every write of the relay (its
/// heartbeat too), not only the deletes.
#[tokio::test]
async fn issue_14_the_relay_sends_on_while_answered_batches_are_deleted() {
    let Some(backend) = Backend::postgres() else {
        return;
    };
    const BATCH: usize = 4;
    const PIPELINE: usize = 4;
    let broker = TestBroker::start(backend.clone()).await;
    broker.topic_and_sub("orders", "s", |_| {}).await;
    let app = AppDb::create(&backend).await;
    let config = || {
        let mut config = relay_config(&broker);
        config.batch_size = BATCH;
        config.pipeline = PIPELINE;
        config
    };
    let until_stored = |n: i64, what: &'static str| {
        let broker = &broker;
        async move {
            let patience = Instant::now() + Duration::from_secs(20);
            loop {
                let stored = stored(broker, "orders").await;
                if stored >= n {
                    return;
                }
                assert!(Instant::now() < patience, "{what}: {stored} stored");
                tokio::time::sleep(ms(20)).await;
            }
        }
    };
    let published = |relay: &Relay, n: u64| {
        let mut status = relay.watch();
        async move {
            tokio::time::timeout(
                Duration::from_secs(20),
                status.wait_for(|s| s.published >= n),
            )
            .await
            .expect("the relay publishes in time")
            .expect("relay running")
            .clone()
        }
    };

    let messages: Vec<Message> = (0..48)
        .map(|i| Message::new("orders", format!("m{i}")))
        .collect();
    app.enqueue(&messages, true).await;
    let block = app.block_deletes().await;
    let relay = Relay::start(app.outbox(), config()).await.expect("relay");
    // A pipeline in flight and a pipeline's worth waiting to be deleted:
    // twice what a relay that waits for each delete could have sent.
    until_stored(
        (2 * PIPELINE * BATCH) as i64,
        "the relay stopped sending while deletes waited",
    )
    .await;
    assert_eq!(
        app.depth().await,
        messages.len() as i64,
        "nothing was deleted yet"
    );
    drop(block);
    published(&relay, messages.len() as u64).await;
    relay.stop().await;

    // The outbox's last rows are answered while their deletes wait: the
    // relay, caught up, sweeps from the lowest row only once they went.
    // (The lock holds inserts too: they go in first, for a new relay.)
    let last: Vec<Message> = (0..BATCH)
        .map(|i| Message::new("orders", format!("last{i}")))
        .collect();
    app.enqueue(&last, true).await;
    let block = app.block_deletes().await;
    let relay = Relay::start(app.outbox(), config()).await.expect("relay");
    let all = (messages.len() + last.len()) as i64;
    until_stored(all, "the last rows were not sent").await;
    // A few poll intervals for a sweep that would send them again.
    tokio::time::sleep(ms(300)).await;
    drop(block);
    let done = published(&relay, last.len() as u64).await;
    assert_eq!(done.duplicates, 0, "no row was sent twice: {done:?}");
    assert_eq!(stored(&broker, "orders").await, all);
    Scene { broker, app, relay }.finish().await;
}

/// One key's rows go out in several batches at once (the broker stores
/// nothing a stream sent after a request that failed, so nothing needs to
/// wait for an earlier batch of its key): with deletes held, the relay gets
/// a pipeline in flight and a pipeline's worth waiting to be deleted stored,
/// all of one key, in order. PostgreSQL only, as above.
#[tokio::test]
async fn issue_14_a_keys_rows_are_in_several_batches_in_flight() {
    let Some(backend) = Backend::postgres() else {
        return;
    };
    const BATCH: usize = 4;
    const PIPELINE: usize = 4;
    let broker = TestBroker::start(backend.clone()).await;
    broker
        .topic_and_sub("orders", "s", |s| s.ordered = true)
        .await;
    let app = AppDb::create(&backend).await;
    let mut config = relay_config(&broker);
    config.batch_size = BATCH;
    config.pipeline = PIPELINE;
    let messages: Vec<Message> = (0..48)
        .map(|i| Message::new("orders", format!("m{i}")).with_key("k"))
        .collect();
    app.enqueue(&messages, true).await;
    let block = app.block_deletes().await;
    let relay = Relay::start(app.outbox(), config).await.expect("relay");
    let want = (2 * PIPELINE * BATCH) as i64;
    let patience = Instant::now() + Duration::from_secs(20);
    loop {
        let stored = stored(&broker, "orders").await;
        if stored >= want {
            break;
        }
        assert!(
            Instant::now() < patience,
            "one key's rows waited for each batch's answer: {stored} stored"
        );
        tokio::time::sleep(ms(20)).await;
    }
    drop(block);
    let mut sub = broker.subscribe("s");
    let got = receive(&mut sub, messages.len()).await;
    let expected: Vec<String> = (0..messages.len()).map(|i| format!("m{i}")).collect();
    assert_eq!(
        got.iter().map(payload).collect::<Vec<_>>(),
        expected,
        "in order"
    );
    drop(sub);
    Scene { broker, app, relay }.finish().await;
}

/// A relay busy with a backlog reads on from its cursor without sweeping
/// from the lowest row. A transaction that took a lower number than the
/// backlog's commits after the cursor passed its number, and the next row
/// of its key commits right after, numbered past the backlog: the late row
/// still goes first in its key. PostgreSQL only: SQLite runs one write
/// transaction at a time, so its numbers follow commits.
#[tokio::test]
async fn a_busy_relay_keeps_a_key_in_order_across_a_late_commit() {
    let Some(backend) = Backend::postgres() else {
        return;
    };
    let broker = TestBroker::start(backend.clone()).await;
    broker
        .topic_and_sub("orders", "s", |s| s.ordered = true)
        .await;
    let app = AppDb::create(&backend).await;
    let AppDb::Postgres { pool, .. } = &app else {
        unreachable!("a PostgreSQL backend makes a PostgreSQL application database");
    };
    // Started first: its start migrates the outbox, which would wait for
    // an open transaction that wrote to it.
    let mut config = relay_config(&broker);
    config.batch_size = 10;
    let relay = Relay::start(app.outbox(), config).await.expect("relay");
    // T1 takes the lower number for key "k" and stays open.
    let mut t1 = pool.begin().await.expect("begin");
    let early = Message::new("orders", "k-first").with_key("k");
    outbox::enqueue(&mut t1, &early).await.expect("enqueue");
    // A backlog of other keys, committed: numbered after T1's row.
    const BACKLOG: usize = 3000;
    let backlog: Vec<Message> = (0..BACKLOG)
        .map(|i| Message::new("orders", format!("b{i}")).with_key(format!("b{}", i % 50)))
        .collect();
    for chunk in backlog.chunks(500) {
        app.enqueue(chunk, true).await;
    }
    // Small batches: the relay works through the backlog from its cursor,
    // which passes T1's number (not yet visible) at its first read.
    let mut status = relay.watch();
    while status.borrow().published == 0 {
        status.changed().await.expect("relay running");
    }
    // While the relay is still in the backlog, T1 commits and the next
    // row of "k" right after it, numbered past the backlog.
    t1.commit().await.expect("commit");
    let second = Message::new("orders", "k-second").with_key("k");
    app.enqueue(std::slice::from_ref(&second), true).await;
    assert!(
        relay.status().published < BACKLOG as u64,
        "the relay was still busy with the backlog when both rows committed"
    );

    let mut sub = broker.subscribe("s");
    let got = receive(&mut sub, BACKLOG + 2).await;
    let of_k: Vec<Uuid> = got
        .iter()
        .filter(|m| m.message.key.as_deref() == Some("k"))
        .map(id_of)
        .collect();
    assert_eq!(
        of_k,
        vec![early.id, second.id],
        "the late commit goes first in its key"
    );
    assert_eq!(
        stored(&broker, "orders").await,
        BACKLOG as i64 + 2,
        "each message stored once"
    );
    Scene { broker, app, relay }.finish().await;
}

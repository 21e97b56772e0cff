//! The inbox and the consumer runtime (issue 5): duplicates skipped whatever
//! delivered them twice, rollback and backoff on handler errors, per-key
//! order with concurrency, lease extension, graceful shutdown, pruning by the
//! ack watermark, and the `shipping` example killed with SIGKILL under load.
//! Every case runs with the broker and the consumer's database on the backend
//! under test.

use std::collections::HashMap;
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sqlx::{Pool, Postgres, Sqlite, Transaction};
use tempfile::TempDir;
use tidings::client::{self, Backoff};
use tidings::consumer::{
    BatchIsolation, Consumer, ConsumerConfig, ConsumerStats, Handler, Monitor,
};
use tidings::inbox::{Inbox, InboxDatabase, Recorded};
use tidings::model::Delivery;
use tidings::proto;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::{Notify, Semaphore, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::harness::new_sub;
use crate::harness::{
    Backend, Rng, TestBroker, backend_test, drop_database, fresh_database, ms, pb,
};

/// Runs `$scenario::<DB>(backend)` with the consumer's database type of the
/// backend under test.
macro_rules! on_backend {
    ($backend:expr, $scenario:ident) => {
        match $backend {
            Backend::Sqlite => $scenario::<Sqlite>(Backend::Sqlite).await,
            b @ Backend::Postgres(_) => $scenario::<Postgres>(b).await,
        }
    };
}

/// Bounds every wait of these tests, so that a failure ends the test.
const PATIENCE: Duration = Duration::from_secs(60);

async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(PATIENCE, f)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// Polls `check` until it holds (for broker state that has no signal).
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    within(what, async {
        while !check().await {
            tokio::time::sleep(ms(20)).await;
        }
    })
    .await
}

// ---- the consumer's database ----

/// A fresh consumer database on the backend under test.
struct ConsumerDb {
    url: String,
    _dir: Option<TempDir>,
    /// PostgreSQL: the admin URL and the database name, to drop it.
    pg: Option<(String, String)>,
}

impl ConsumerDb {
    async fn create(backend: &Backend) -> ConsumerDb {
        match backend {
            Backend::Sqlite => {
                let dir = tempfile::tempdir().expect("temp dir");
                let url = format!("sqlite://{}", dir.path().join("consumer.db").display());
                ConsumerDb {
                    url,
                    _dir: Some(dir),
                    pg: None,
                }
            }
            Backend::Postgres(admin) => {
                let (url, name) = fresh_database(admin).await;
                ConsumerDb {
                    url,
                    _dir: None,
                    pg: Some((admin.clone(), name)),
                }
            }
        }
    }

    async fn drop(self) {
        if let Some((admin, name)) = self.pg {
            drop_database(&admin, &name).await;
        }
    }
}

/// What the tests need of a consumer database beyond the inbox: an
/// `effects` table the handler writes to, and a few reads.
trait TestDb: InboxDatabase {
    fn create_effects(pool: &Pool<Self>) -> impl Future<Output = ()> + Send;
    fn insert_effect(
        tx: &mut Transaction<'static, Self>,
        d: &Delivery,
    ) -> impl Future<Output = Result<(), sqlx::Error>> + Send;
    /// `(message_id, attempt, key, payload)` in insertion order.
    fn effects(pool: &Pool<Self>) -> impl Future<Output = Vec<Effect>> + Send;
    /// The inbox's sequences for `subscription`, in order.
    fn inbox_sequences(
        pool: &Pool<Self>,
        subscription: &str,
    ) -> impl Future<Output = Vec<i64>> + Send;
    fn count(pool: &Pool<Self>, sql: &'static str) -> impl Future<Output = i64> + Send;
    /// A statement that fails (on PostgreSQL it aborts the transaction).
    fn failing_statement(
        tx: &mut Transaction<'static, Self>,
    ) -> impl Future<Output = Result<(), sqlx::Error>> + Send;
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Effect {
    message_id: String,
    attempt: i64,
    key: Option<String>,
    payload: String,
}

fn effect_of(row: (String, i64, Option<String>, String)) -> Effect {
    Effect {
        message_id: row.0,
        attempt: row.1,
        key: row.2,
        payload: row.3,
    }
}

/// Implements [`TestDb`] for `$db`, whose effects table has `$id` as its
/// key. The statements use `$1` placeholders, which sqlx accepts on SQLite
/// too.
macro_rules! test_db {
    ($db:ty, $id:literal) => {
        impl TestDb for $db {
            async fn create_effects(pool: &Pool<Self>) {
                sqlx::query(concat!(
                    "CREATE TABLE effects (id ",
                    $id,
                    " PRIMARY KEY, message_id TEXT NOT NULL, \
                     attempt BIGINT NOT NULL, key TEXT, payload TEXT NOT NULL)"
                ))
                .execute(pool)
                .await
                .expect("create effects");
            }

            async fn failing_statement(
                tx: &mut Transaction<'static, Self>,
            ) -> Result<(), sqlx::Error> {
                sqlx::query("SELECT missing FROM no_such_table")
                    .execute(&mut **tx)
                    .await
                    .map(|_| ())
            }

            async fn insert_effect(
                tx: &mut Transaction<'static, Self>,
                d: &Delivery,
            ) -> Result<(), sqlx::Error> {
                sqlx::query(
                    "INSERT INTO effects (message_id, attempt, key, payload) \
                     VALUES ($1, $2, $3, $4)",
                )
                .bind(d.message.id.to_string())
                .bind(i64::from(d.attempt))
                .bind(d.message.key.clone())
                .bind(String::from_utf8_lossy(&d.message.payload).into_owned())
                .execute(&mut **tx)
                .await
                .map(|_| ())
            }

            async fn effects(pool: &Pool<Self>) -> Vec<Effect> {
                sqlx::query_as("SELECT message_id, attempt, key, payload FROM effects ORDER BY id")
                    .fetch_all(pool)
                    .await
                    .expect("read effects")
                    .into_iter()
                    .map(effect_of)
                    .collect()
            }

            async fn inbox_sequences(pool: &Pool<Self>, subscription: &str) -> Vec<i64> {
                sqlx::query_scalar(
                    "SELECT sequence FROM tidings_inbox WHERE subscription = $1 ORDER BY sequence",
                )
                .bind(subscription)
                .fetch_all(pool)
                .await
                .expect("read inbox")
            }

            async fn count(pool: &Pool<Self>, sql: &'static str) -> i64 {
                sqlx::query_scalar(sql)
                    .fetch_one(pool)
                    .await
                    .expect("count")
            }
        }
    };
}

test_db!(Sqlite, "INTEGER");
test_db!(Postgres, "BIGSERIAL");

/// The consumer's database, migrated, with its inbox.
struct Db<DB: TestDb> {
    inbox: Inbox<DB>,
    db: ConsumerDb,
}

impl<DB: TestDb> Db<DB> {
    async fn open(backend: &Backend) -> Db<DB> {
        let db = ConsumerDb::create(backend).await;
        let inbox = Inbox::<DB>::connect(&db.url).await.expect("connect");
        inbox.migrate().await.expect("migrate");
        DB::create_effects(inbox.pool()).await;
        Db { inbox, db }
    }

    async fn effects(&self) -> Vec<Effect> {
        DB::effects(self.inbox.pool()).await
    }

    async fn inbox_sequences(&self, subscription: &str) -> Vec<i64> {
        DB::inbox_sequences(self.inbox.pool(), subscription).await
    }

    async fn close(self) {
        self.inbox.pool().close().await;
        self.db.drop().await;
    }
}

/// A broker and a consumer database, both on `backend`.
async fn setup<DB: TestDb>(backend: &Backend) -> (TestBroker, Db<DB>) {
    (
        TestBroker::start(backend.clone()).await,
        Db::open(backend).await,
    )
}

async fn teardown<DB: TestDb>(broker: TestBroker, db: Db<DB>) {
    db.close().await;
    broker.stop().await;
}

// ---- a handler that records what it was asked to do ----

/// What the handler does with one delivery.
#[derive(Debug, Clone, Copy, Default)]
struct Plan {
    /// Wait for [`Recorder::release`] (after telling [`Recorder::started`]).
    gate: bool,
    /// Take this long.
    sleep: Option<Duration>,
    /// Fail (after writing its effect, which must then roll back).
    fail: bool,
    /// Run a failing statement after writing its effect, ignore the error
    /// and return Ok.
    swallow: bool,
}

#[derive(Debug, Clone)]
struct Call {
    payload: String,
    attempt: i32,
    at: Instant,
}

type Planner = dyn Fn(&Delivery) -> Plan + Send + Sync;

/// Writes one effect row per call, in the inbox transaction, and keeps a
/// log of its calls.
#[derive(Clone)]
struct Recorder {
    plan: Arc<Planner>,
    calls: Arc<Mutex<Vec<Call>>>,
    running: Arc<AtomicUsize>,
    max_running: Arc<AtomicUsize>,
    started: Arc<Notify>,
    gate: Arc<Semaphore>,
}

impl Recorder {
    fn new(plan: impl Fn(&Delivery) -> Plan + Send + Sync + 'static) -> Recorder {
        Recorder {
            plan: Arc::new(plan),
            calls: Arc::default(),
            running: Arc::default(),
            max_running: Arc::default(),
            started: Arc::default(),
            gate: Arc::new(Semaphore::new(0)),
        }
    }

    fn plain() -> Recorder {
        Recorder::new(|_| Plan::default())
    }

    fn calls(&self) -> Vec<Call> {
        self.calls.lock().expect("calls lock").clone()
    }

    /// Waits until a gated call has started.
    async fn started(&self) {
        within("a gated handler to start", self.started.notified()).await;
    }

    /// Lets `n` gated calls go on.
    fn release(&self, n: usize) {
        self.gate.add_permits(n);
    }
}

impl<DB: TestDb> Handler<DB> for Recorder {
    type Error = String;

    async fn handle(&self, d: &Delivery, tx: &mut Transaction<'static, DB>) -> Result<(), String> {
        let plan = (self.plan)(d);
        self.calls.lock().expect("calls lock").push(Call {
            payload: String::from_utf8_lossy(&d.message.payload).into_owned(),
            attempt: d.attempt,
            at: Instant::now(),
        });
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_running.fetch_max(now, Ordering::SeqCst);
        let result = async {
            DB::insert_effect(tx, d).await.map_err(|e| e.to_string())?;
            if plan.gate {
                self.started.notify_one();
                self.gate
                    .acquire()
                    .await
                    .map_err(|e| e.to_string())?
                    .forget();
            }
            if let Some(d) = plan.sleep {
                tokio::time::sleep(d).await;
            }
            if plan.fail {
                return Err(format!("boom on attempt {}", d.attempt));
            }
            if plan.swallow {
                let _ = DB::failing_statement(tx).await;
            }
            Ok(())
        }
        .await;
        self.running.fetch_sub(1, Ordering::SeqCst);
        result
    }
}

// ---- running a consumer ----

/// A consumer running in a task, until [`Running::stop`].
struct Running {
    monitor: Monitor,
    stop: oneshot::Sender<()>,
    task: JoinHandle<tidings::Result<ConsumerStats>>,
}

impl Running {
    async fn wait_for(&self, what: &str, done: impl Fn(&ConsumerStats) -> bool) -> ConsumerStats {
        match tokio::time::timeout(PATIENCE, self.monitor.wait_for(done)).await {
            Ok(stats) => stats,
            Err(_) => panic!("timed out waiting for {what}: {:?}", self.monitor.stats()),
        }
    }

    /// Shuts down gracefully; returns the final stats.
    async fn stop(self) -> ConsumerStats {
        let _ = self.stop.send(());
        within("the consumer to stop", self.task)
            .await
            .expect("consumer task did not panic")
            .expect("consumer ran without error")
    }
}

/// Settings for tests: quick reconnects, no pruning unless asked.
fn test_config(tune: impl FnOnce(&mut ConsumerConfig)) -> ConsumerConfig {
    let mut config = ConsumerConfig {
        concurrency: 4,
        prune_interval: None,
        shutdown_timeout: Duration::from_secs(10),
        reconnect: Backoff {
            min: ms(20),
            max: ms(200),
            give_up_after: None,
        },
        ..ConsumerConfig::default()
    };
    tune(&mut config);
    config
}

fn start<DB: TestDb>(
    broker: &TestBroker,
    subscription: &str,
    db: &Db<DB>,
    handler: &Recorder,
    tune: impl FnOnce(&mut ConsumerConfig),
) -> Running {
    let consumer = Consumer::new(
        &broker.connection,
        subscription,
        db.inbox.clone(),
        handler.clone(),
        test_config(tune),
    );
    let monitor = consumer.monitor();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(consumer.run(async move {
        let _ = stopped.await;
    }));
    Running {
        monitor,
        stop,
        task,
    }
}

/// Subscription settings: quick backoff, many attempts, then `tune`.
fn quick(tune: impl FnOnce(&mut proto::Subscription)) -> impl FnOnce(&mut proto::Subscription) {
    move |s| {
        s.max_attempts = 100;
        s.min_backoff = Some(pb(ms(10)));
        s.max_backoff = Some(pb(ms(50)));
        tune(s);
    }
}

// ---- duplicates ----

backend_test! {
    /// A handler that outlives its lease (no extension) has its message
    /// redelivered while it runs; the redelivery waits on the inbox row,
    /// finds it committed, and is skipped.
    async fn lease_expiry_redelivery_runs_the_handler_once(backend) {
        on_backend!(backend, lease_expiry_case)
    }
}

async fn lease_expiry_case<DB: TestDb>(backend: Backend) {
    let (broker, db) = setup::<DB>(&backend).await;
    broker
        .topic_and_sub("t", "s", quick(|s| s.ack_deadline = Some(pb(ms(300)))))
        .await;
    let handler = Recorder::new(|d| Plan {
        sleep: (d.attempt == 1).then(|| ms(1000)),
        ..Plan::default()
    });
    let running = start(&broker, "s", &db, &handler, |c| {
        c.concurrency = 2;
        c.extend_leases = false;
    });
    broker.publish("t", &["once"]).await;
    running.wait_for("the ack", |s| s.acked >= 1).await;
    let stats = running.stop().await;

    assert_eq!(handler.calls().len(), 1, "the handler ran once");
    assert_eq!(db.effects().await.len(), 1, "one effect");
    assert!(
        stats.ack_refused >= 1,
        "the first ack came too late: {stats:?}"
    );
    assert!(
        stats.duplicates >= 1,
        "the redelivery was skipped: {stats:?}"
    );
    assert!(broker.stats("s").await.redelivered >= 1);
    teardown(broker, db).await;
}

backend_test! {
    /// A message's lease runs out while it waits behind a busy transaction,
    /// so the broker delivers it again and both deliveries land in one
    /// batch, whose ids are recorded up front: the first is expired and
    /// gives its row back, and the second, recorded in its own savepoint,
    /// runs the handler. Nothing is acked as a duplicate of a row that does
    /// not commit.
    async fn a_redelivery_in_the_batch_of_its_expired_delivery_runs_once(backend) {
        on_backend!(backend, repeat_in_batch_case)
    }
}

async fn repeat_in_batch_case<DB: TestDb>(backend: Backend) {
    let (broker, db) = setup::<DB>(&backend).await;
    broker
        .topic_and_sub("t", "s", quick(|s| s.ack_deadline = Some(pb(ms(1000)))))
        .await;
    let handler = Recorder::new(|d| Plan {
        gate: d.message.payload == b"gate" && d.attempt == 1,
        ..Plan::default()
    });
    let running = start(&broker, "s", &db, &handler, |c| {
        c.concurrency = 1;
        c.extend_leases = false;
    });
    broker.publish("t", &["gate"]).await;
    handler.started().await;
    broker.publish("t", &["x"]).await;
    // The gate, x, and both again once their leases ran out: x's first
    // delivery has expired, its second is fresh.
    running
        .wait_for("two deliveries of each", |s| s.received >= 4)
        .await;
    handler.release(1);
    running.wait_for("x processed", |s| s.processed >= 2).await;
    eventually("everything acked", || async {
        let s = broker.stats("s").await;
        s.backlog == 0 && s.in_flight == 0
    })
    .await;
    let stats = running.stop().await;

    let mut effects: Vec<String> = db.effects().await.into_iter().map(|e| e.payload).collect();
    effects.sort();
    assert_eq!(
        effects,
        ["gate", "x"],
        "each message took effect once: {stats:?}"
    );
    let x_calls = handler
        .calls()
        .into_iter()
        .filter(|c| c.payload == "x")
        .count();
    assert_eq!(x_calls, 1, "x's handler ran once: {stats:?}");
    teardown(broker, db).await;
}

backend_test! {
    /// The consumer commits but its ack never reaches the broker (the
    /// broker restarts in between, and the consumer stops before it could
    /// resend); the next consumer gets the message again and skips it.
    async fn lost_ack_redelivery_runs_the_handler_once(backend) {
        on_backend!(backend, lost_ack_case)
    }
}

async fn lost_ack_case<DB: TestDb>(backend: Backend) {
    let (broker, db) = setup::<DB>(&backend).await;
    broker
        .topic_and_sub("t", "s", quick(|s| s.ack_deadline = Some(pb(ms(500)))))
        .await;
    let handler = Recorder::new(|d| Plan {
        gate: d.attempt == 1,
        ..Plan::default()
    });
    let first = start(&broker, "s", &db, &handler, |c| {
        c.concurrency = 1;
        c.shutdown_timeout = ms(300);
    });
    broker.publish("t", &["once"]).await;
    handler.started().await;
    // The restarted broker listens elsewhere: the first consumer's ack has
    // nowhere to go.
    let broker = broker.restart().await;
    handler.release(1);
    first.wait_for("the commit", |s| s.processed >= 1).await;
    let first = first.stop().await;
    assert_eq!(first.acked, 0, "the ack was lost: {first:?}");

    let second = start(&broker, "s", &db, &handler, |_| {});
    second.wait_for("the ack", |s| s.acked >= 1).await;
    let second = second.stop().await;
    assert_eq!(second.duplicates, 1, "{second:?}");
    assert_eq!(second.processed, 0, "{second:?}");
    assert_eq!(handler.calls().len(), 1, "the handler ran once");
    assert_eq!(db.effects().await.len(), 1, "one effect");
    // Delivered again (with the same attempt number: a broker restart is
    // not the consumer's failure).
    assert!(broker.stats("s").await.delivered >= 2);
    teardown(broker, db).await;
}

backend_test! {
    /// A message whose last attempt committed but was never acked is
    /// dead-lettered; pruning keeps its inbox row (the dead letter holds
    /// the watermark below it), so a redrive finds the row and skips it.
    /// Once acked, the watermark passes it and the row goes.
    async fn redrive_of_a_dead_letter_committed_before_runs_the_handler_once(backend) {
        on_backend!(backend, redrive_case)
    }
}

async fn redrive_case<DB: TestDb>(backend: Backend) {
    let (broker, db) = setup::<DB>(&backend).await;
    broker
        .topic_and_sub("t", "s", |s| {
            s.max_attempts = 1;
            s.ack_deadline = Some(pb(ms(200)));
        })
        .await;
    let seq = broker.publish("t", &["once"]).await[0];

    // What a consumer does at the message's last attempt, killed between
    // its commit and its ack.
    let got = broker.pull("s", 1, ms(5000)).await;
    assert_eq!(got.len(), 1);
    let id: uuid::Uuid = got[0]
        .message
        .as_ref()
        .expect("message")
        .id
        .parse()
        .expect("uuid");
    let mut tx = db.inbox.begin().await.expect("begin");
    assert_eq!(
        Inbox::<DB>::record(&mut tx, "s", id, seq)
            .await
            .expect("record"),
        Recorded::New
    );
    let delivery = Delivery {
        message: tidings::model::StoredMessage {
            id,
            topic: "t".into(),
            key: None,
            payload: b"once".to_vec(),
            attributes: Vec::new(),
            created_at: None,
            sequence: seq,
            published_at: 0,
        },
        ack_id: got[0].ack_id.parse().expect("ack id"),
        attempt: 1,
        lease_deadline: 0,
    };
    DB::insert_effect(&mut tx, &delivery).await.expect("effect");
    tx.commit().await.expect("commit");
    eventually("the dead letter", || async {
        broker.stats("s").await.dead_lettered == 1
    })
    .await;

    let handler = Recorder::plain();
    let running = start(&broker, "s", &db, &handler, |c| {
        c.prune_interval = Some(ms(20));
    });
    let stats = running
        .wait_for("two pruning rounds", |s| s.prune_rounds >= 2)
        .await;
    assert!(
        stats.watermark < seq,
        "the dead letter holds the watermark: {stats:?}"
    );
    assert!(db.inbox.contains("s", id).await.expect("contains"));

    let redriven = broker
        .raw_admin()
        .redrive_dead_letters(proto::RedriveDeadLettersRequest {
            subscription: "s".into(),
            sequences: vec![seq],
        })
        .await
        .expect("redrive")
        .into_inner();
    assert_eq!(redriven.redriven_count, 1);
    running.wait_for("the ack", |s| s.acked >= 1).await;
    running
        .wait_for("the row to be pruned", |s| s.pruned >= 1)
        .await;
    assert!(!db.inbox.contains("s", id).await.expect("contains"));
    let stats = running.stop().await;
    assert_eq!(stats.duplicates, 1, "{stats:?}");
    assert!(handler.calls().is_empty(), "the handler did not run again");
    assert_eq!(db.effects().await.len(), 1, "one effect");
    let after = broker.stats("s").await;
    assert_eq!((after.dead_lettered, after.backlog), (0, 0));
    teardown(broker, db).await;
}

// ---- failures ----

backend_test! {
    /// A failing handler's writes roll back; the message is nacked with the
    /// error as reason and no delay, so it comes again after the
    /// subscription's backoff, with attempt 2; one that keeps failing is
    /// dead-lettered with the last error as its reason.
    async fn handler_error_rolls_back_and_redelivers_after_backoff(backend) {
        on_backend!(backend, handler_error_case)
    }
}

async fn handler_error_case<DB: TestDb>(backend: Backend) {
    let backoff = ms(300);
    let (broker, db) = setup::<DB>(&backend).await;
    broker
        .topic_and_sub("t", "s", |s| {
            s.max_attempts = 2;
            s.min_backoff = Some(pb(backoff));
            s.max_backoff = Some(pb(backoff));
        })
        .await;
    let handler = Recorder::new(|d| Plan {
        fail: d.message.payload == b"always" || d.attempt == 1,
        ..Plan::default()
    });
    let running = start(&broker, "s", &db, &handler, |_| {});
    broker.publish("t", &["later", "always"]).await;
    running
        .wait_for("one ack and three failures", |s| {
            s.acked >= 1 && s.failed >= 3
        })
        .await;
    eventually("the dead letter", || async {
        broker.stats("s").await.dead_lettered == 1
    })
    .await;
    let stats = running.stop().await;
    assert_eq!((stats.processed, stats.failed), (1, 3), "{stats:?}");

    let effects = db.effects().await;
    assert_eq!(
        effects.len(),
        1,
        "failed attempts left nothing: {effects:?}"
    );
    assert_eq!(
        (effects[0].payload.as_str(), effects[0].attempt),
        ("later", 2)
    );
    let later: Vec<Call> = handler
        .calls()
        .into_iter()
        .filter(|c| c.payload == "later")
        .collect();
    assert_eq!(later.iter().map(|c| c.attempt).collect::<Vec<_>>(), [1, 2]);
    assert!(
        later[1].at - later[0].at >= backoff,
        "redelivered after the backoff, not at once: {:?}",
        later[1].at - later[0].at
    );
    let dead = broker
        .raw_admin()
        .list_dead_letters(proto::ListDeadLettersRequest {
            subscription: "s".into(),
            ..Default::default()
        })
        .await
        .expect("list dead letters")
        .into_inner()
        .dead_letters;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].last_failure_reason, "boom on attempt 2");
    teardown(broker, db).await;
}

// ---- order, leases, shutdown ----

backend_test! {
    /// Four handlers at once on an ordered subscription with several keys,
    /// some messages failing once: each key's messages take effect in
    /// publish order, each once.
    async fn per_key_order_holds_with_concurrency_above_one(backend) {
        on_backend!(backend, order_case)
    }
}

/// Publishes `per_key` messages `"k{k} {n}"` (n from 1) for each of `keys`
/// keys, keyed by `k{k}`.
async fn publish_keyed(broker: &TestBroker, keys: usize, per_key: usize) {
    let mut messages = Vec::new();
    for n in 1..=per_key {
        for k in 0..keys {
            messages
                .push(client::Outgoing::new("t", format!("k{k} {n}")).with_key(format!("k{k}")));
        }
    }
    broker
        .publisher()
        .publish(&messages)
        .await
        .expect("publish");
}

/// The number `n` of a [`publish_keyed`] message (0 for any other).
fn keyed_n(d: &tidings::model::Delivery) -> u64 {
    let text = String::from_utf8_lossy(&d.message.payload);
    text.rsplit(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// Asserts that the effects are those of [`publish_keyed`]'s messages,
/// each once, and in publish order within each key.
fn assert_keyed_order(effects: &[Effect], keys: usize, per_key: usize) {
    assert_eq!(effects.len(), keys * per_key, "one effect per message");
    let mut by_key: HashMap<String, Vec<usize>> = HashMap::new();
    for e in effects {
        let n = e
            .payload
            .rsplit(' ')
            .next()
            .and_then(|n| n.parse().ok())
            .expect("n");
        by_key
            .entry(e.key.clone().expect("key"))
            .or_default()
            .push(n);
    }
    assert_eq!(by_key.len(), keys);
    for (key, ns) in by_key {
        assert_eq!(ns, (1..=per_key).collect::<Vec<_>>(), "order of {key}");
    }
}

async fn order_case<DB: TestDb>(backend: Backend) {
    const KEYS: usize = 5;
    const PER_KEY: usize = 30;
    let (broker, db) = setup::<DB>(&backend).await;
    broker
        .topic_and_sub("t", "s", quick(|s| s.ordered = true))
        .await;
    let handler = Recorder::new(|d| {
        let n = keyed_n(d);
        Plan {
            sleep: Some(ms(n % 4)),
            fail: n % 7 == 3 && d.attempt == 1,
            ..Plan::default()
        }
    });
    let running = start(&broker, "s", &db, &handler, |c| c.concurrency = 4);
    publish_keyed(&broker, KEYS, PER_KEY).await;
    let total = (KEYS * PER_KEY) as u64;
    running
        .wait_for("every message acked", |s| s.acked >= total)
        .await;
    let stats = running.stop().await;
    assert!(stats.failed > 0, "some messages failed once: {stats:?}");
    assert_keyed_order(&db.effects().await, KEYS, PER_KEY);
    if matches!(backend, Backend::Postgres(_)) {
        // SQLite has one writer, which each handler's transaction takes at
        // its start, so only PostgreSQL shows handlers overlapping.
        assert!(
            handler.max_running.load(Ordering::SeqCst) >= 2,
            "handlers ran concurrently"
        );
    }
    teardown(broker, db).await;
}

backend_test! {
    /// Issue 14: an ordered subscription hands a consumer several messages
    /// of a key at once; when the first of a key outlives its lease (no
    /// extension) or fails, the later ones are held back behind it, and
    /// the effects stay once each, in publish order per key.
    async fn per_key_order_holds_across_lease_expiries_of_runs(backend) {
        on_backend!(backend, run_expiry_case)
    }
}

async fn run_expiry_case<DB: TestDb>(backend: Backend) {
    const KEYS: usize = 4;
    const PER_KEY: usize = 12;
    let (broker, db) = setup::<DB>(&backend).await;
    broker
        .topic_and_sub(
            "t",
            "s",
            quick(|s| {
                s.ordered = true;
                s.ack_deadline = Some(pb(ms(400)));
            }),
        )
        .await;
    // Published before the consumer starts, so that its first lease takes
    // each key's messages as one run.
    publish_keyed(&broker, KEYS, PER_KEY).await;
    let handler = Recorder::new(|d| {
        let n = keyed_n(d);
        Plan {
            // The first message of each key outlives its lease once.
            sleep: (n == 1 && d.attempt == 1).then(|| ms(700)),
            fail: n % 5 == 2 && d.attempt == 1,
            ..Plan::default()
        }
    });
    let running = start(&broker, "s", &db, &handler, |c| {
        c.concurrency = 4;
        c.extend_leases = false;
    });
    let total = (KEYS * PER_KEY) as u64;
    eventually("every message to take effect", || async {
        db.effects().await.len() >= KEYS * PER_KEY
    })
    .await;
    eventually("the subscription to drain", || async {
        let s = broker.stats("s").await;
        s.backlog == 0 && s.in_flight == 0
    })
    .await;
    let stats = running.stop().await;
    assert!(stats.processed >= total, "{stats:?}");
    assert!(stats.failed > 0, "some messages failed once: {stats:?}");
    assert!(
        broker.stats("s").await.redelivered > 0,
        "leases expired and runs came again"
    );
    assert_keyed_order(&db.effects().await, KEYS, PER_KEY);
    teardown(broker, db).await;
}

backend_test! {
    /// A handler that runs four times its lease keeps the lease by
    /// extension: no redelivery, the ack is accepted.
    async fn long_handler_keeps_its_lease(backend) {
        on_backend!(backend, lease_extension_case)
    }
}

async fn lease_extension_case<DB: TestDb>(backend: Backend) {
    let (broker, db) = setup::<DB>(&backend).await;
    broker
        .topic_and_sub("t", "s", quick(|s| s.ack_deadline = Some(pb(ms(300)))))
        .await;
    let handler = Recorder::new(|_| Plan {
        sleep: Some(ms(1200)),
        ..Plan::default()
    });
    let running = start(&broker, "s", &db, &handler, |_| {});
    broker.publish("t", &["slow"]).await;
    running.wait_for("the ack", |s| s.acked >= 1).await;
    let stats = running.stop().await;
    assert_eq!(stats.ack_refused, 0, "{stats:?}");
    assert_eq!(handler.calls().len(), 1);
    assert_eq!(broker.stats("s").await.redelivered, 0);
    assert_eq!(db.effects().await.len(), 1);
    teardown(broker, db).await;
}

backend_test! {
    /// Shutdown lets the running handler finish and acks it; messages
    /// received but not started are released to the next consumer.
    async fn shutdown_finishes_running_handlers_and_releases_the_rest(backend) {
        on_backend!(backend, shutdown_case)
    }
}

async fn shutdown_case<DB: TestDb>(backend: Backend) {
    let (broker, db) = setup::<DB>(&backend).await;
    broker.topic_and_sub("t", "s", quick(|_| {})).await;
    let handler = Recorder::new(|d| Plan {
        gate: d.message.payload == b"a",
        ..Plan::default()
    });
    let first = start(&broker, "s", &db, &handler, |c| c.concurrency = 1);
    broker.publish("t", &["a", "b", "c"]).await;
    handler.started().await;
    first
        .wait_for("all three received", |s| s.received >= 3)
        .await;
    let _ = first.stop.send(());
    handler.release(1);
    let stats = within("the consumer to stop", first.task)
        .await
        .expect("no panic")
        .expect("no error");
    assert_eq!((stats.processed, stats.acked), (1, 1), "{stats:?}");
    eventually("the rest released", || async {
        broker.stats("s").await.in_flight == 0
    })
    .await;

    let second = start(&broker, "s", &db, &handler, |_| {});
    second.wait_for("the rest", |s| s.acked >= 2).await;
    second.stop().await;
    let mut payloads: Vec<String> = db.effects().await.into_iter().map(|e| e.payload).collect();
    payloads.sort();
    assert_eq!(payloads, ["a", "b", "c"]);
    teardown(broker, db).await;
}

backend_test! {
    /// A handler still running at the shutdown timeout is cancelled: its
    /// writes roll back and its message goes to the next consumer.
    async fn shutdown_timeout_rolls_back_a_stuck_handler(backend) {
        on_backend!(backend, shutdown_timeout_case)
    }
}

async fn shutdown_timeout_case<DB: TestDb>(backend: Backend) {
    let (broker, db) = setup::<DB>(&backend).await;
    broker.topic_and_sub("t", "s", quick(|_| {})).await;
    let handler = Recorder::new(|d| Plan {
        gate: d.attempt == 1,
        ..Plan::default()
    });
    let first = start(&broker, "s", &db, &handler, |c| {
        c.shutdown_timeout = ms(200)
    });
    broker.publish("t", &["stuck"]).await;
    handler.started().await;
    let stats = first.stop().await;
    assert_eq!((stats.processed, stats.acked), (0, 0), "{stats:?}");
    assert!(db.effects().await.is_empty(), "rolled back");

    let second = start(&broker, "s", &db, &handler, |_| {});
    second.wait_for("the ack", |s| s.acked >= 1).await;
    second.stop().await;
    let effects = db.effects().await;
    assert_eq!(effects.len(), 1);
    assert_eq!(effects[0].attempt, 2);
    teardown(broker, db).await;
}

// ---- group commit (issue 14) ----

backend_test! {
    /// A handler that catches a failed statement and returns Ok: on
    /// PostgreSQL its transaction is aborted and a COMMIT would roll it
    /// back without an error. With either isolation, no delivery is acked
    /// without its effect: the batch fails, comes again and commits.
    async fn a_swallowed_database_error_never_acks_a_batch_without_its_effects(backend) {
        on_backend!(backend, swallowed_error_case)
    }
}

async fn swallowed_error_case<DB: TestDb>(backend: Backend) {
    let (broker, db) = setup::<DB>(&backend).await;
    broker.topic_and_sub("t", "s", quick(|_| {})).await;
    let handler = Recorder::new(|d| Plan {
        swallow: d.message.payload.starts_with(b"swallow") && d.attempt == 1,
        ..Plan::default()
    });
    for (isolation, payload) in [
        (BatchIsolation::Savepoints, "swallow-1"),
        (BatchIsolation::default(), "swallow-2"),
    ] {
        let running = start(&broker, "s", &db, &handler, |c| c.isolation = isolation);
        broker.publish("t", &[payload]).await;
        running.wait_for("the ack", |s| s.acked >= 1).await;
        running.stop().await;
    }
    let effects: Vec<String> = db.effects().await.into_iter().map(|e| e.payload).collect();
    assert_eq!(
        effects,
        ["swallow-1", "swallow-2"],
        "every acked message has its effect"
    );
    assert_eq!(
        DB::count(db.inbox.pool(), "SELECT COUNT(*) FROM tidings_inbox").await,
        2
    );
    teardown(broker, db).await;
}

backend_test! {
    /// Deliveries waiting when a transaction begins share it; with
    /// savepoints, a handler that fails rolls back to its own, so the
    /// batch's other deliveries commit together, each handler having run
    /// once, and only the failed one comes again.
    async fn a_failing_handler_in_a_batch_rolls_back_alone(backend) {
        on_backend!(backend, batch_failure_case)
    }
}

async fn batch_failure_case<DB: TestDb>(backend: Backend) {
    let (broker, db) = setup::<DB>(&backend).await;
    broker.topic_and_sub("t", "s", quick(|_| {})).await;
    let handler = Recorder::new(|d| Plan {
        gate: d.message.payload == b"gate",
        fail: d.message.payload == b"bad" && d.attempt == 1,
        ..Plan::default()
    });
    let running = start(&broker, "s", &db, &handler, |c| {
        c.concurrency = 1;
        c.isolation = BatchIsolation::Savepoints;
    });
    broker.publish("t", &["gate"]).await;
    handler.started().await;
    // The gate's transaction is the only one, and its batch was taken
    // before these arrive: they wait together for the next.
    broker.publish("t", &["a", "b", "bad", "c", "d"]).await;
    running
        .wait_for("all six received", |s| s.received >= 6)
        .await;
    handler.release(1);
    running
        .wait_for("every message acked", |s| s.acked >= 6)
        .await;
    let stats = running.stop().await;
    assert_eq!(
        (stats.processed, stats.failed, stats.errors),
        (6, 1, 0),
        "{stats:?}"
    );
    assert_eq!(
        stats.batches, 3,
        "the gate alone, the five waiting in one transaction, then the failed one again: {stats:?}"
    );

    let mut effects: Vec<(String, i64)> = db
        .effects()
        .await
        .into_iter()
        .map(|e| (e.payload, e.attempt))
        .collect();
    effects.sort();
    let expected: Vec<(String, i64)> = [
        ("a", 1),
        ("b", 1),
        ("bad", 2),
        ("c", 1),
        ("d", 1),
        ("gate", 1),
    ]
    .into_iter()
    .map(|(p, a)| (p.to_owned(), a))
    .collect();
    assert_eq!(
        effects, expected,
        "the failed attempt's effect rolled back alone"
    );
    let mut calls: Vec<(String, i32)> = handler
        .calls()
        .into_iter()
        .map(|c| (c.payload, c.attempt))
        .collect();
    calls.sort();
    assert_eq!(
        calls.iter().filter(|(p, _)| p == "bad").count(),
        2,
        "only the failed message came again: {calls:?}"
    );
    assert_eq!(calls.len(), 7, "{calls:?}");
    assert_eq!(stats.reruns, 0, "{stats:?}");
    teardown(broker, db).await;
}

backend_test! {
    /// Without savepoints (the default), a handler that fails rolls its
    /// whole batch back; the batch runs again at once with savepoints and
    /// without the failed delivery, so the others commit with one effect
    /// each (those before the failed one ran twice) and only the failed
    /// one comes again. Batches keep their savepoints for `careful_for`
    /// after a failure: a second failure then costs no second run.
    async fn an_optimistic_batch_runs_again_without_its_failed_delivery(backend) {
        on_backend!(backend, optimistic_failure_case)
    }
}

async fn optimistic_failure_case<DB: TestDb>(backend: Backend) {
    let (broker, db) = setup::<DB>(&backend).await;
    broker.topic_and_sub("t", "s", quick(|_| {})).await;
    let handler = Recorder::new(|d| Plan {
        gate: d.message.payload.starts_with(b"gate"),
        fail: d.message.payload.starts_with(b"bad") && d.attempt == 1,
        ..Plan::default()
    });
    let running = start(&broker, "s", &db, &handler, |c| {
        c.concurrency = 1;
        c.isolation = BatchIsolation::Optimistic {
            careful_for: Duration::from_secs(600),
        };
    });
    // Two rounds: each a gate alone, then five deliveries waiting for the
    // one transaction, the third of them failing once.
    for (round, names) in [
        ["gate1", "a", "b", "bad1", "c", "d"],
        ["gate2", "e", "f", "bad2", "g", "h"],
    ]
    .iter()
    .enumerate()
    {
        broker.publish("t", &names[..1]).await;
        handler.started().await;
        broker.publish("t", &names[1..]).await;
        let want = 6 * (round as u64 + 1);
        running
            .wait_for("the round received", |s| s.received >= want)
            .await;
        handler.release(1);
        running
            .wait_for("the round acked", |s| s.acked >= want)
            .await;
    }
    let stats = running.stop().await;
    assert_eq!(
        (stats.processed, stats.failed, stats.errors, stats.reruns),
        (12, 2, 0, 1),
        "only the first failure ran its batch again: {stats:?}"
    );
    let mut effects: Vec<(String, i64)> = db
        .effects()
        .await
        .into_iter()
        .map(|e| (e.payload, e.attempt))
        .collect();
    effects.sort();
    let mut expected: Vec<(String, i64)> =
        ["a", "b", "c", "d", "e", "f", "g", "h", "gate1", "gate2"]
            .into_iter()
            .map(|p| (p.to_owned(), 1))
            .collect();
    expected.extend([("bad1".to_owned(), 2), ("bad2".to_owned(), 2)]);
    expected.sort();
    assert_eq!(effects, expected, "one effect per message");
    let calls = handler.calls();
    let count = |name: &str| calls.iter().filter(|c| c.payload == name).count();
    let counts: Vec<(&str, usize)> = [
        "gate1", "a", "b", "bad1", "c", "d", "gate2", "e", "f", "bad2", "g", "h",
    ]
    .into_iter()
    .map(|n| (n, count(n)))
    .collect();
    assert_eq!(
        counts,
        [
            ("gate1", 1),
            // Before the failure in a batch without savepoints: again.
            ("a", 2),
            ("b", 2),
            // Failed, then redelivered.
            ("bad1", 2),
            ("c", 1),
            ("d", 1),
            // Within careful_for: savepoints, nothing runs twice.
            ("gate2", 1),
            ("e", 1),
            ("f", 1),
            ("bad2", 2),
            ("g", 1),
            ("h", 1),
        ],
        "{calls:?}"
    );
    teardown(broker, db).await;
}

backend_test! {
    /// An ordered subscription with many keys ready at once, consumed in
    /// batches by two transactions, some messages failing once: each
    /// key's messages take effect in publish order, each once, and the
    /// deliveries shared transactions.
    async fn per_key_order_holds_with_batches(backend) {
        on_backend!(backend, batch_order_case)
    }
}

async fn batch_order_case<DB: TestDb>(backend: Backend) {
    const KEYS: usize = 24;
    const PER_KEY: usize = 12;
    let (broker, db) = setup::<DB>(&backend).await;
    broker
        .topic_and_sub("t", "s", quick(|s| s.ordered = true))
        .await;
    publish_keyed(&broker, KEYS, PER_KEY).await;
    let handler = Recorder::new(|d| {
        let text = String::from_utf8_lossy(&d.message.payload).into_owned();
        let (k, n) = text.split_once(' ').expect("key and n");
        let k: usize = k[1..].parse().expect("k");
        let n: usize = n.parse().expect("n");
        Plan {
            fail: (k + n).is_multiple_of(5) && d.attempt == 1,
            ..Plan::default()
        }
    });
    let running = start(&broker, "s", &db, &handler, |c| c.concurrency = 2);
    let total = (KEYS * PER_KEY) as u64;
    running
        .wait_for("every message acked", |s| s.acked >= total)
        .await;
    let stats = running.stop().await;
    assert!(stats.failed > 0, "some messages failed once: {stats:?}");
    assert!(
        stats.batches < stats.processed,
        "transactions held several deliveries: {stats:?}"
    );
    assert_keyed_order(&db.effects().await, KEYS, PER_KEY);
    teardown(broker, db).await;
}

// ---- pruning and replays ----

backend_test! {
    /// Pruning by the broker's watermark removes rows at or below it and
    /// keeps every row whose message is leased, waiting for redelivery or
    /// dead-lettered (and, conservatively, acked rows above the watermark).
    async fn pruning_never_removes_an_id_that_could_come_back(backend) {
        on_backend!(backend, pruning_case)
    }
}

async fn pruning_case<DB: TestDb>(backend: Backend) {
    let (broker, db) = setup::<DB>(&backend).await;
    broker.topic_and_sub("t", "s", |s| s.max_attempts = 2).await;
    let seqs = broker.publish("t", &["1", "2", "3", "4", "5", "6"]).await;
    let got = broker.pull("s", 6, ms(5000)).await;
    assert_eq!(got.len(), 6);
    // Each was processed and committed; which ones the broker heard of
    // differs.
    for m in &got {
        let message = m.message.as_ref().expect("message");
        let mut tx = db.inbox.begin().await.expect("begin");
        let id = message.id.parse().expect("uuid");
        Inbox::<DB>::record(&mut tx, "s", id, message.sequence)
            .await
            .expect("record");
        tx.commit().await.expect("commit");
    }
    let ack_of = |seq: i64| {
        got.iter()
            .find(|m| m.message.as_ref().expect("message").sequence == seq)
            .expect("delivered")
            .ack_id
            .clone()
    };
    // 1, 2, 4 acked; 3 still leased; 5 waiting for redelivery; 6 dead.
    broker
        .ack("s", vec![ack_of(seqs[0]), ack_of(seqs[1]), ack_of(seqs[3])])
        .await
        .expect("ack");
    broker
        .nack(
            "s",
            &ack_of(seqs[4]),
            Some(Duration::from_secs(600)),
            "later",
        )
        .await
        .expect("nack 5");
    broker
        .nack("s", &ack_of(seqs[5]), Some(Duration::ZERO), "again")
        .await
        .expect("nack 6");
    let again = broker.pull("s", 1, ms(5000)).await;
    assert_eq!(again.len(), 1);
    broker
        .nack("s", &again[0].ack_id, None, "dead")
        .await
        .expect("nack 6 again");
    assert_eq!(broker.stats("s").await.dead_lettered, 1);

    let watermark = broker.stats("s").await.ack_watermark;
    assert_eq!(watermark, seqs[1], "the leased message holds the watermark");
    let pruned = db.inbox.prune_through("s", watermark).await.expect("prune");
    assert_eq!(pruned, 2);
    assert_eq!(db.inbox_sequences("s").await, seqs[2..].to_vec());

    broker.ack("s", vec![ack_of(seqs[2])]).await.expect("ack 3");
    let watermark = broker.stats("s").await.ack_watermark;
    assert_eq!(watermark, seqs[3], "the waiting message holds it now");
    db.inbox.prune_through("s", watermark).await.expect("prune");
    assert_eq!(
        db.inbox_sequences("s").await,
        seqs[4..].to_vec(),
        "the waiting and the dead-lettered message keep their rows"
    );
    teardown(broker, db).await;
}

/// Creates `topic` with a retention, so that acked messages stay for a
/// Seek back.
async fn kept_topic(broker: &TestBroker, topic: &str) {
    broker
        .raw_admin()
        .create_topic(proto::CreateTopicRequest {
            topic: Some(proto::Topic {
                name: topic.into(),
                retention: Some(pb(Duration::from_secs(3600))),
                ..Default::default()
            }),
        })
        .await
        .expect("topic");
}

/// Seeks `subscription` back to sequence `to`.
async fn seek(broker: &TestBroker, subscription: &str, to: i64) {
    broker
        .raw_admin()
        .seek(proto::SeekRequest {
            subscription: subscription.into(),
            target: Some(proto::seek_request::Target::Sequence(to)),
        })
        .await
        .expect("seek");
}

backend_test! {
    /// A Seek back replays: the inbox skips the ids it still holds and runs
    /// the handler for those it pruned; `forget_from` before the Seek makes
    /// the replay run the handler for every message again.
    async fn seek_back_replays_what_the_inbox_no_longer_holds(backend) {
        on_backend!(backend, replay_case)
    }
}

async fn replay_case<DB: TestDb>(backend: Backend) {
    let (broker, db) = setup::<DB>(&backend).await;
    kept_topic(&broker, "t").await;
    broker.topic_and_sub("t", "s", quick(|_| {})).await;
    let seqs = broker.publish("t", &["1", "2", "3", "4"]).await;
    let handler = Recorder::plain();
    let running = start(&broker, "s", &db, &handler, |_| {});
    running.wait_for("four acks", |s| s.acked >= 4).await;
    // As if the last pruning round had seen a watermark of 2.
    db.inbox.prune_through("s", seqs[1]).await.expect("prune");
    seek(&broker, "s", seqs[0]).await;
    running.wait_for("the replay", |s| s.acked >= 8).await;
    let stats = running.monitor.stats();
    assert_eq!((stats.processed, stats.duplicates), (6, 2), "{stats:?}");

    db.inbox.forget_from("s", seqs[0]).await.expect("forget");
    seek(&broker, "s", seqs[0]).await;
    running.wait_for("the full replay", |s| s.acked >= 12).await;
    let stats = running.stop().await;
    assert_eq!((stats.processed, stats.duplicates), (10, 2), "{stats:?}");
    assert_eq!(db.effects().await.len(), 10);
    teardown(broker, db).await;
}

backend_test! {
    /// A redelivered message whose id the inbox holds is acked as soon as
    /// its batch has recorded its ids, not after the batch's other
    /// handlers and commit: a batch that outlasts the lease would
    /// otherwise see such acks refused and the messages come again.
    async fn a_duplicate_is_acked_before_its_batch_commits(backend) {
        on_backend!(backend, early_duplicate_case)
    }
}

async fn early_duplicate_case<DB: TestDb>(backend: Backend) {
    let (broker, db) = setup::<DB>(&backend).await;
    kept_topic(&broker, "t").await;
    broker.topic_and_sub("t", "s", quick(|_| {})).await;
    let handler = Recorder::new(|d| Plan {
        gate: d.message.payload == b"gate",
        ..Plan::default()
    });
    let seqs = broker.publish("t", &["dup"]).await;
    let first = start(&broker, "s", &db, &handler, |_| {});
    first.wait_for("dup acked", |s| s.acked >= 1).await;
    first.stop().await;
    // dup comes again (a Seek back), the gated message right behind it:
    // one lease, one batch.
    broker.publish("t", &["gate"]).await;
    seek(&broker, "s", seqs[0]).await;
    let running = start(&broker, "s", &db, &handler, |c| c.concurrency = 1);
    handler.started().await;
    let stats = running
        .wait_for("the duplicate acked while the gate holds", |s| s.acked >= 1)
        .await;
    assert_eq!(
        (stats.duplicates, stats.batches),
        (1, 0),
        "acked before any transaction committed: {stats:?}"
    );
    handler.release(1);
    running.wait_for("gate acked", |s| s.acked >= 2).await;
    let stats = running.stop().await;
    assert_eq!((stats.processed, stats.duplicates), (1, 1), "{stats:?}");
    let mut effects: Vec<String> = db.effects().await.into_iter().map(|e| e.payload).collect();
    effects.sort();
    assert_eq!(effects, ["dup", "gate"]);
    teardown(broker, db).await;
}

backend_test! {
    /// The inbox recognises a recorded id as a duplicate, its migration can
    /// run again, and the fallback retention removes rows by age only.
    async fn inbox_records_once_and_prunes_by_age(backend) {
        on_backend!(backend, inbox_case)
    }
}

async fn inbox_case<DB: TestDb>(backend: Backend) {
    let db = Db::<DB>::open(&backend).await;
    db.inbox
        .migrate()
        .await
        .expect("migrating again is harmless");
    let id = uuid::Uuid::now_v7();
    for expected in [Recorded::New, Recorded::Duplicate] {
        let mut tx = db.inbox.begin().await.expect("begin");
        let got = Inbox::<DB>::record(&mut tx, "s", id, 1)
            .await
            .expect("record");
        assert_eq!(got, expected);
        tx.commit().await.expect("commit");
    }
    // Another subscription processes the same message on its own.
    let mut tx = db.inbox.begin().await.expect("begin");
    let other = Inbox::<DB>::record(&mut tx, "other", id, 1)
        .await
        .expect("record");
    assert_eq!(other, Recorded::New);
    tx.rollback().await.expect("rollback");
    assert!(!db.inbox.contains("other", id).await.expect("contains"));

    let kept = db
        .inbox
        .prune_older_than("s", Duration::from_secs(3600))
        .await
        .expect("prune");
    assert_eq!(kept, 0);
    // processed_at has millisecond resolution.
    tokio::time::sleep(ms(20)).await;
    let gone = db.inbox.prune_older_than("s", ms(5)).await.expect("prune");
    assert_eq!(gone, 1);
    assert!(!db.inbox.contains("s", id).await.expect("contains"));
    db.close().await;
}

// ---- the shipping example under SIGKILL ----

/// The `shipping` example binary, which `cargo test` builds (a filtered
/// `cargo test --test it` does not: build it with `cargo build --example
/// shipping`).
fn shipping_binary() -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("test executable");
    let target = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps");
    let path = target.join("examples").join("shipping");
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --example shipping` (a plain `cargo test` builds it)",
        path.display()
    );
    path
}

/// What one `shipping` process logged, up to its end.
#[derive(Debug, Default, Clone, Copy)]
struct ShippingLog {
    /// Redeliveries skipped because the inbox held their id.
    duplicates: u64,
    /// Inbox transactions begun, and those of them with several deliveries.
    batches: u64,
    shared_batches: u64,
    /// Inbox transactions committed.
    committed: u64,
    /// Deliveries whose lease ran out before their handler could start.
    expired: u64,
}

impl ShippingLog {
    fn add(&mut self, other: ShippingLog) {
        self.duplicates += other.duplicates;
        self.batches += other.batches;
        self.shared_batches += other.shared_batches;
        self.committed += other.committed;
        self.expired += other.expired;
    }

    /// Books one stderr line of the consumer runtime's debug log.
    fn read(&mut self, line: &str) {
        if line.contains("duplicate delivery skipped") {
            self.duplicates += 1;
        } else if line.contains("inbox batch began") {
            self.batches += 1;
            // `deliveries=N` (NO_COLOR keeps colour codes out).
            let n: String = line
                .rsplit("deliveries=")
                .next()
                .unwrap_or("")
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            if n.parse::<u64>().is_ok_and(|n| n >= 2) {
                self.shared_batches += 1;
            }
        } else if line.contains("inbox batch committed") {
            self.committed += 1;
        } else if line.contains("lease ended before the handler could start") {
            self.expired += 1;
        }
    }
}

/// A running `shipping` process; `log` reads its stderr until it ends.
struct Shipping {
    child: tokio::process::Child,
    log: JoinHandle<ShippingLog>,
    /// How many inbox transactions it has logged as committed so far.
    commits: watch::Receiver<u64>,
}

async fn spawn_shipping(broker: &str, database_url: &str, ack_delay: Duration) -> Shipping {
    let mut child = tokio::process::Command::new(shipping_binary())
        .args(["--broker", broker, "--database-url", database_url])
        .args(["--concurrency", "4", "--prune-interval-ms", "100"])
        .args(["--ack-delay-ms", &ack_delay.as_millis().to_string()])
        .env("RUST_LOG", "warn,tidings::consumer=debug")
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start shipping");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let line = within("shipping to start", lines.next_line())
        .await
        .expect("read stdout")
        .expect("a line");
    assert!(line.starts_with("shipping: consuming"), "{line}");
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let stderr = child.stderr.take().expect("stderr");
    let (committed, commits) = watch::channel(0u64);
    let log = tokio::spawn(async move {
        let mut log = ShippingLog::default();
        let mut lines = BufReader::new(stderr).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            log.read(&line);
            committed.send_if_modified(|seen| {
                let changed = *seen != log.committed;
                *seen = log.committed;
                changed
            });
        }
        log
    });
    Shipping {
        child,
        log,
        commits,
    }
}

/// A SIGKILL run of the `shipping` example: the orders published meanwhile,
/// and how often it is killed.
struct KillRun {
    customers: usize,
    rounds: usize,
    /// Pause between two rounds (an order for every customer each).
    every: Duration,
    kills: usize,
    seed: u64,
    /// The subscription's ack deadline.
    lease: Duration,
    /// How long the consumer's acks wait to share a request.
    ack_delay: Duration,
}

/// What a [`KillRun`] saw.
#[derive(Debug)]
struct KillReport {
    kills: usize,
    /// Kills that came while an inbox transaction was open.
    kills_in_transaction: usize,
    redelivered: i64,
    log: ShippingLog,
}

backend_test! {
    /// The `shipping` example, killed with SIGKILL a dozen times under load
    /// (so, many times between a commit and its ack) and restarted: every
    /// order is shipped exactly once and in order per customer.
    async fn sigkilled_consumer_ships_each_order_once(backend) {
        on_backend!(backend, sigkill_case)
    }
}

async fn sigkill_case<DB: TestDb>(backend: Backend) {
    let run = KillRun {
        customers: 30,
        rounds: 120,
        every: ms(30),
        kills: 12,
        seed: 0x5417,
        lease: ms(1000),
        // Long enough that a kill the test sends on seeing a commit
        // reaches the consumer before that commit's acks leave, however
        // loaded the machine.
        ack_delay: ms(300),
    };
    let report = kill_shipping::<DB>(&backend, run).await;
    let skipped = report.log.duplicates;
    eprintln!(
        "{} kills: {} redeliveries, {skipped} duplicates skipped",
        report.kills, report.redelivered
    );
    assert!(report.kills >= 10);
    assert!(
        report.redelivered > 0,
        "kills caused redeliveries: {report:?}"
    );
    assert!(
        skipped > 0,
        "some kills fell between a commit and its ack ({skipped} duplicates skipped)"
    );
}

backend_test! {
    /// Issue 14: the `shipping` example, its orders coming faster than its
    /// transactions commit so that they hold several deliveries each, is
    /// killed with SIGKILL sixteen times, mostly while a batch's transaction
    /// is open: every order is shipped exactly once and in order per
    /// customer.
    async fn sigkilled_consumer_mid_batch_ships_each_order_once(backend) {
        on_backend!(backend, sigkill_batch_case)
    }
}

async fn sigkill_batch_case<DB: TestDb>(backend: Backend) {
    let run = KillRun {
        customers: 40,
        rounds: 60,
        every: ms(10),
        kills: 16,
        seed: 0xba7c4,
        lease: ms(1000),
        ack_delay: ms(2),
    };
    let report = kill_shipping::<DB>(&backend, run).await;
    eprintln!("{report:?}");
    assert!(
        report.log.shared_batches > 0,
        "transactions held several deliveries: {report:?}"
    );
    assert!(
        report.kills_in_transaction > 0,
        "some kills came while a transaction was open: {report:?}"
    );
}

backend_test! {
    /// The `shipping` example on leases shorter than its batches take
    /// (100 ms), killed with SIGKILL eight times: deliveries run out of
    /// lease before their handler starts, their key is fenced and they go
    /// back, while the broker still leases the key's next messages to the
    /// stream until it reads the release. None of those may take effect
    /// before the one released: every order is shipped exactly once and in
    /// order per customer.
    async fn sigkilled_consumer_on_short_leases_ships_each_order_once(backend) {
        on_backend!(backend, short_lease_case)
    }
}

async fn short_lease_case<DB: TestDb>(backend: Backend) {
    let run = KillRun {
        customers: 40,
        rounds: 40,
        every: ms(10),
        kills: 8,
        seed: 0x5e4d,
        lease: ms(100),
        ack_delay: ms(2),
    };
    let report = kill_shipping::<DB>(&backend, run).await;
    eprintln!("{report:?}");
    assert!(
        report.log.expired > 0,
        "some leases ran out before their handler started: {report:?}"
    );
}

/// Runs `shipping` against a broker of its own while orders arrive,
/// killing it with SIGKILL `run.kills` times and restarting it, then lets
/// a last process drain the subscription and stop on SIGTERM; asserts that
/// every order was shipped exactly once and in order per customer.
async fn kill_shipping<DB: TestDb>(backend: &Backend, run: KillRun) -> KillReport {
    let dir = tempfile::tempdir().expect("temp dir");
    let broker_db = match backend {
        Backend::Sqlite => None,
        Backend::Postgres(admin) => Some(fresh_database(admin).await),
    };
    let broker = crate::crash::spawn_broker_with(
        dir.path(),
        broker_db.as_ref().map(|(url, _)| url.as_str()),
        "127.0.0.1:0",
    )
    .await;
    let connection = client::connect(&broker.url).expect("connection");
    let admin = client::Admin::new(&connection);
    admin.create_topic("orders").await.expect("topic");
    // Shipping's subscription, made here first with short leases so that a
    // test's redeliveries come quickly.
    admin
        .create_subscription(new_sub(proto::Subscription {
            name: "shipping".into(),
            topic: "orders".into(),
            ordered: true,
            ack_deadline: Some(pb(run.lease)),
            max_attempts: 1000,
            min_backoff: Some(pb(ms(10))),
            max_backoff: Some(pb(ms(100))),
            start: Some(proto::subscription::Start::StartPosition(
                proto::StartPosition::Earliest as i32,
            )),
            ..Default::default()
        }))
        .await
        .expect("subscription");
    let consumer_db = ConsumerDb::create(backend).await;

    // Orders arrive while the consumer is killed and restarted.
    let publisher = client::Publisher::new(&connection, Backoff::default());
    let KillRun {
        customers,
        rounds,
        every,
        kills: planned,
        seed,
        lease: _,
        ack_delay,
    } = run;
    let producing = tokio::spawn(async move {
        for n in 1..=rounds {
            let round: Vec<client::Outgoing> = (0..customers)
                .map(|c| {
                    client::Outgoing::new("orders", format!("order-{c}-{n} customer-{c} {n}"))
                        .with_key(format!("customer-{c}"))
                })
                .collect();
            publisher.publish(&round).await.expect("publish");
            tokio::time::sleep(every).await;
        }
    });

    let mut log = ShippingLog::default();
    let mut rng = Rng::new(seed);
    let mut kills = 0;
    let mut kills_in_transaction = 0;
    for round in 0..planned {
        let mut shipping = spawn_shipping(&broker.url, &consumer_db.url, ack_delay).await;
        tokio::time::sleep(ms(100 + rng.below(300))).await;
        if round % 2 == 1 {
            // Every other kill follows the next commit the consumer logs
            // at once: its acks wait `ack_delay` to share a request, so
            // with a delay longer than the test takes to react such a kill
            // falls between a commit and its ack.
            shipping.commits.borrow_and_update();
            let _ = tokio::time::timeout(ms(2000), shipping.commits.changed()).await;
        }
        shipping.child.kill().await.expect("SIGKILL");
        kills += 1;
        let ended = within("the killed process's log", shipping.log)
            .await
            .expect("log reader");
        if ended.batches > ended.committed {
            kills_in_transaction += 1;
        }
        log.add(ended);
    }
    within("the producer", producing).await.expect("producer");
    // The last process drains on leases long enough for the machine: with
    // leases shorter than it takes to work through the backlog its window
    // holds, most of its work would be redone, the more the slower the
    // machine. The kills above ran on the test's short leases.
    let patch = tidings::model::SubscriptionPatch {
        ack_deadline: Some(Duration::from_secs(10)),
        ..Default::default()
    };
    admin
        .update_subscription("shipping", patch)
        .await
        .expect("longer leases");
    let mut shipping = spawn_shipping(&broker.url, &consumer_db.url, ack_delay).await;
    eventually("the subscription to drain", || async {
        let s = admin.stats("shipping").await.expect("stats");
        s.backlog == 0 && s.in_flight == 0
    })
    .await;
    let pid = shipping.child.id().expect("pid").to_string();
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill -TERM");
    assert!(status.success());
    let exit = within("shipping to stop on SIGTERM", shipping.child.wait())
        .await
        .expect("wait");
    assert!(exit.success(), "graceful shutdown exits 0: {exit}");
    log.add(
        within("the last log", shipping.log)
            .await
            .expect("log reader"),
    );

    let inbox = Inbox::<DB>::connect(&consumer_db.url)
        .await
        .expect("connect");
    let pool = inbox.pool();
    let total = (customers * rounds) as i64;
    assert_eq!(
        DB::count(pool, "SELECT COUNT(*) FROM shipments").await,
        total
    );
    assert_eq!(
        DB::count(pool, "SELECT COUNT(DISTINCT order_id) FROM shipments").await,
        total
    );
    assert_eq!(
        DB::count(pool, "SELECT COUNT(*) FROM order_violations").await,
        0
    );
    assert_eq!(
        DB::count(pool, "SELECT MIN(last_n) FROM customer_progress").await,
        rounds as i64
    );
    let stats = admin.stats("shipping").await.expect("stats");
    pool.close().await;
    drop(broker);
    consumer_db.drop().await;
    if let (Backend::Postgres(admin_url), Some((_, name))) = (backend, broker_db) {
        drop_database(admin_url, &name).await;
    }
    KillReport {
        kills,
        kills_in_transaction,
        redelivered: stats.redelivered,
        log,
    }
}

// ---- a dead link to the consumer's database ----

/// Issue 16: the consumer runtime's own database steps are bounded. With
/// its inbox database black-holed (packets dropped, no reset) while a
/// transaction is open, the commit fails within `database_timeout` and the
/// delivery is nacked instead of hanging for good; once the link heals
/// every message is processed, its effect exactly once.
#[tokio::test]
async fn a_black_holed_inbox_database_fails_fast_and_every_message_is_processed_once() {
    use crate::proxy::{Proxy, through, upstream_of};

    let Some(backend) = Backend::postgres() else {
        return;
    };
    let Backend::Postgres(admin) = &backend else {
        return;
    };
    let broker = TestBroker::start(Backend::Sqlite).await;
    broker.topic_and_sub("t", "s", quick(|_| {})).await;
    let db = Db::<Postgres>::open(&backend).await;
    let proxy = Proxy::start(upstream_of(admin)).await;
    let proxied = Inbox::<Postgres>::connect(&through(&db.db.url, proxy.addr()))
        .await
        .expect("inbox through the proxy");
    // The slow message's handler is still running when the link dies, so
    // its transaction's COMMIT is what meets the dead link.
    let handler = Recorder::new(|d| Plan {
        sleep: (d.message.payload == b"slow").then_some(ms(1500)),
        ..Plan::default()
    });
    let consumer = Consumer::new(
        &broker.connection,
        "s",
        proxied,
        handler.clone(),
        test_config(|c| c.database_timeout = Duration::from_secs(1)),
    );
    let monitor = consumer.monitor();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(consumer.run(async move {
        let _ = stopped.await;
    }));
    let running = Running {
        monitor,
        stop,
        task,
    };

    let healthy: Vec<String> = (0..20).map(|i| format!("a{i}")).collect();
    let healthy: Vec<&str> = healthy.iter().map(String::as_str).collect();
    broker.publish("t", &healthy).await;
    running
        .wait_for("the first messages on a healthy link", |s| {
            s.processed >= 20
        })
        .await;

    broker.publish("t", &["slow"]).await;
    eventually("the slow handler to start", || {
        let started = handler.calls().iter().any(|c| c.payload == "slow");
        async move { started }
    })
    .await;
    proxy.black_hole();
    let noticed = tokio::time::timeout(
        Duration::from_secs(20),
        running.monitor.wait_for(|s| s.errors > 0),
    )
    .await;
    assert!(
        noticed.is_ok(),
        "the consumer hangs on a black-holed database"
    );
    let later: Vec<String> = (0..29).map(|i| format!("b{i}")).collect();
    let later: Vec<&str> = later.iter().map(String::as_str).collect();
    broker.publish("t", &later).await;

    proxy.heal();
    // The slow message's COMMIT may reach the database after the heal:
    // its redelivery then finds its id and is skipped.
    let stats = running
        .wait_for("every message done after the heal", |s| {
            s.processed + s.duplicates >= 50
        })
        .await;
    let effects = db.effects().await;
    let mut ids: Vec<String> = effects.iter().map(|e| e.message_id.clone()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 50, "every message's effect: {stats:?}");
    assert_eq!(effects.len(), 50, "no effect twice: {stats:?}");
    running.stop().await;
    db.close().await;
    broker.stop().await;
}

//! Helpers that start a real broker in-process and talk to it over gRPC.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tempfile::TempDir;
use tidings::client::{
    self, Admin, Backoff, Connection, FlowControl, Publisher, Subscriber, Subscription,
};
use tidings::model::Delivery;
use tidings::proto::{
    self, publisher_service_client::PublisherServiceClient,
    subscriber_service_client::SubscriberServiceClient,
};
use tidings::server::{self, ServerConfig};
use tidings::store::NewSubscription;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;

/// The environment variable naming a PostgreSQL server for the tests (a URL
/// whose database the tests may use to create and drop their own).
pub(crate) const PG_ENV: &str = "TIDINGS_TEST_DATABASE_URL";

/// The local PostgreSQL server's default address, used when
/// [`PG_ENV`] is unset and something listens there.
const LOCAL_PG: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// Whether a server accepts connections on PostgreSQL's default local port.
fn local_postgres_answers() -> bool {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], 5432));
    std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(300)).is_ok()
}

/// Which storage a test runs on.
#[derive(Debug, Clone)]
pub(crate) enum Backend {
    Sqlite,
    /// The admin URL; each broker gets a fresh database beside it.
    Postgres(String),
}

impl Backend {
    /// PostgreSQL: the server the environment names, or else the local
    /// server at its default address if one answers there. Without either
    /// (or with the variable set empty) the test is skipped with a message,
    /// except under CI, which must not skip.
    pub(crate) fn postgres() -> Option<Backend> {
        match std::env::var(PG_ENV) {
            Ok(url) if !url.is_empty() => Some(Backend::Postgres(url)),
            Err(_) if local_postgres_answers() => Some(Backend::Postgres(LOCAL_PG.to_owned())),
            _ if std::env::var_os("CI").is_some() => {
                panic!("CI must run the PostgreSQL suite: set {PG_ENV}")
            }
            _ => {
                // Written to the stream itself, not through eprintln!, which
                // the test harness captures for passing tests.
                use std::io::Write;
                let _ = writeln!(
                    std::io::stderr(),
                    "skipped: no PostgreSQL for the tests ({PG_ENV} unset and nothing on \
                     127.0.0.1:5432, or {PG_ENV} set empty), so this PostgreSQL test did not run"
                );
                None
            }
        }
    }
}

/// Defines a test that runs once on SQLite and once on PostgreSQL.
macro_rules! backend_test {
    ($(#[$meta:meta])* async fn $name:ident($backend:ident) $body:block) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            $(#[$meta])*
            async fn case($backend: crate::harness::Backend) $body

            #[tokio::test]
            async fn sqlite() {
                case(crate::harness::Backend::Sqlite).await
            }

            #[tokio::test]
            async fn postgres() {
                if let Some(backend) = crate::harness::Backend::postgres() {
                    case(backend).await
                }
            }
        }
    };
}
pub(crate) use backend_test;

/// Replaces the database name of a PostgreSQL URL.
pub(crate) fn with_database(url: &str, database: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, format!("?{q}")),
        None => (url, String::new()),
    };
    let after_scheme = base.find("://").map_or(0, |i| i + 3);
    let base = match base[after_scheme..].find('/') {
        Some(slash) => &base[..after_scheme + slash],
        None => base,
    };
    format!("{base}/{database}{query}")
}

/// Creates a fresh, empty database next to the one `admin_url` names.
pub(crate) async fn fresh_database(admin_url: &str) -> (String, String) {
    use sqlx::Connection;
    let name = format!("tidings_test_{}", uuid::Uuid::new_v4().simple());
    let mut admin = sqlx::postgres::PgConnection::connect(admin_url)
        .await
        .expect("PostgreSQL reachable");
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut admin)
        .await
        .expect("create test database");
    (with_database(admin_url, &name), name)
}

/// Drops a database made by [`fresh_database`].
pub(crate) async fn drop_database(admin_url: &str, name: &str) {
    use sqlx::Connection;
    if let Ok(mut admin) = sqlx::postgres::PgConnection::connect(admin_url).await {
        let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
        )))
        .execute(&mut admin)
        .await;
    }
}

/// A broker running in this process on a temporary data directory or a
/// fresh PostgreSQL database.
pub(crate) struct TestBroker {
    #[allow(dead_code)]
    pub(crate) url: String,
    pub(crate) connection: Connection,
    pub(crate) channel: Channel,
    data: PathBuf,
    database: Option<(String, String, String)>,
    _dir: Option<TempDir>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<tidings::Result<()>>>,
}

/// Server settings tuned for fast tests: frequent maintenance and polling.
pub(crate) fn test_config(data: &Path) -> ServerConfig {
    let mut config = ServerConfig::new(data);
    config.store.maintenance_interval = Duration::from_millis(50);
    config.limits.poll_interval = Duration::from_millis(100);
    config
}

impl TestBroker {
    /// Starts a broker on fresh storage.
    pub(crate) async fn start(backend: Backend) -> TestBroker {
        Self::start_with(backend, |_| {}).await
    }

    /// Starts a broker on fresh storage after `tune` adjusts the config.
    pub(crate) async fn start_with(
        backend: Backend,
        tune: impl FnOnce(&mut ServerConfig),
    ) -> TestBroker {
        let dir = tempfile::tempdir().expect("temp dir");
        let data = dir.path().to_path_buf();
        let database = match &backend {
            Backend::Sqlite => None,
            Backend::Postgres(admin) => {
                let (url, name) = fresh_database(admin).await;
                Some((admin.clone(), url, name))
            }
        };
        let mut b = Self::start_on(&data, database, "127.0.0.1:0", tune).await;
        b._dir = Some(dir);
        b
    }

    /// Stops gracefully, keeping the storage and the address, so that
    /// clients configured with this broker's URL see it down.
    pub(crate) async fn pause(mut self) -> PausedBroker {
        self.shutdown().await;
        PausedBroker {
            addr: self.url.trim_start_matches("http://").to_owned(),
            data: self.data.clone(),
            database: self.database.take(),
            dir: self._dir.take(),
        }
    }

    /// Starts a broker on existing storage.
    async fn start_on(
        data: &Path,
        database: Option<(String, String, String)>,
        bind: &str,
        tune: impl FnOnce(&mut ServerConfig),
    ) -> TestBroker {
        let listener = tokio::net::TcpListener::bind(bind).await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut config = test_config(data);
        if let Some((_, url, _)) = &database {
            config.store.storage = tidings::store::Storage::Postgres(url.clone());
        }
        tune(&mut config);
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server::run(listener, config, async move {
            let _ = stopped.await;
        }));
        let url = format!("http://{addr}");
        let connection = client::connect(&url).expect("connection");
        TestBroker {
            url,
            channel: connection.channel(),
            connection,
            data: data.to_path_buf(),
            database,
            _dir: None,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Shuts down gracefully, checks that the server stopped cleanly, and
    /// drops the test's PostgreSQL database.
    pub(crate) async fn stop(mut self) {
        self.shutdown().await;
        if let Some((admin, _, name)) = self.database.take() {
            drop_database(&admin, &name).await;
        }
    }

    async fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let result = tokio::time::timeout(Duration::from_secs(20), task)
                .await
                .expect("graceful shutdown finished in time")
                .expect("server task did not panic");
            result.expect("server stopped without error");
        }
    }

    /// Starts another broker instance on the same PostgreSQL database (the
    /// caller stops it; the database goes with the first instance).
    pub(crate) async fn another(&self, tune: impl FnOnce(&mut ServerConfig)) -> TestBroker {
        let database = self
            .database
            .clone()
            .expect("another instance needs PostgreSQL");
        let mut next =
            Self::start_on(&self.data.clone(), Some(database), "127.0.0.1:0", tune).await;
        // Only the first instance drops the database.
        next.database = None;
        next
    }

    /// The folder of this broker's SQLite database (unused on PostgreSQL).
    pub(crate) fn data_dir(&self) -> &Path {
        &self.data
    }

    /// The URL of this broker's PostgreSQL database, if it has one.
    pub(crate) fn database_url(&self) -> Option<&str> {
        self.database.as_ref().map(|(_, url, _)| url.as_str())
    }

    /// Stops gracefully and starts again on the same storage.
    pub(crate) async fn restart(mut self) -> TestBroker {
        self.shutdown().await;
        let dir = self._dir.take();
        let database = self.database.take();
        let mut next = Self::start_on(&self.data.clone(), database, "127.0.0.1:0", |_| {}).await;
        next._dir = dir;
        next
    }

    pub(crate) fn admin(&self) -> Admin {
        Admin::new(&self.connection)
    }

    pub(crate) fn publisher(&self) -> Publisher {
        Publisher::new(&self.connection, Backoff::default())
    }

    pub(crate) fn raw_publisher(&self) -> PublisherServiceClient<Channel> {
        PublisherServiceClient::new(self.channel.clone())
    }

    pub(crate) fn raw_subscriber(&self) -> SubscriberServiceClient<Channel> {
        SubscriberServiceClient::new(self.channel.clone())
    }

    pub(crate) fn subscriber(&self) -> Subscriber {
        Subscriber::new(&self.connection, Backoff::default())
    }

    pub(crate) fn subscribe(&self, subscription: &str) -> Subscription {
        Subscriber::new(&self.connection, Backoff::default())
            .subscribe(subscription, FlowControl::default())
    }

    pub(crate) fn subscribe_with(&self, subscription: &str, flow: FlowControl) -> Subscription {
        Subscriber::new(&self.connection, Backoff::default()).subscribe(subscription, flow)
    }

    /// Creates a topic and a subscription on it (from the earliest message)
    /// with `tune` applied to the subscription.
    pub(crate) async fn topic_and_sub(
        &self,
        topic: &str,
        sub: &str,
        tune: impl FnOnce(&mut proto::Subscription),
    ) {
        let admin = self.admin();
        if let Err(e) = admin.create_topic(topic).await {
            assert!(matches!(e, tidings::Error::AlreadyExists(_)), "{e}");
        }
        let mut s = proto::Subscription {
            name: sub.into(),
            topic: topic.into(),
            start: Some(proto::subscription::Start::StartPosition(
                proto::StartPosition::Earliest as i32,
            )),
            ..Default::default()
        };
        tune(&mut s);
        let s = NewSubscription::try_from(s).expect("a subscription in its wire form");
        admin
            .create_subscription(s)
            .await
            .expect("create subscription");
    }

    /// Publishes one message per payload; returns their sequence numbers.
    pub(crate) async fn publish(&self, topic: &str, payloads: &[&str]) -> Vec<i64> {
        let messages: Vec<client::Outgoing> = payloads
            .iter()
            .map(|p| client::Outgoing::new(topic, p.as_bytes()))
            .collect();
        self.publisher()
            .publish(&messages)
            .await
            .expect("publish")
            .into_iter()
            .map(|r| r.sequence)
            .collect()
    }

    /// Unary pull of up to `max`, waiting up to `wait` for the first.
    pub(crate) async fn pull(
        &self,
        sub: &str,
        max: i32,
        wait: Duration,
    ) -> Vec<proto::ReceivedMessage> {
        self.raw_subscriber()
            .pull(proto::PullRequest {
                subscription: sub.into(),
                max_messages: max,
                max_wait: Some(pb(wait)),
                ..Default::default()
            })
            .await
            .expect("pull")
            .into_inner()
            .messages
    }

    pub(crate) async fn ack(
        &self,
        sub: &str,
        ack_ids: Vec<String>,
    ) -> Result<proto::AckResponse, tonic::Status> {
        self.raw_subscriber()
            .ack(proto::AckRequest {
                subscription: sub.into(),
                ack_ids,
            })
            .await
            .map(|r| r.into_inner())
    }

    pub(crate) async fn nack(
        &self,
        sub: &str,
        ack_id: &str,
        delay: Option<Duration>,
        reason: &str,
    ) -> Result<proto::NackResponse, tonic::Status> {
        self.raw_subscriber()
            .nack(proto::NackRequest {
                subscription: sub.into(),
                nacks: vec![proto::Nack {
                    ack_id: ack_id.into(),
                    delay: delay.map(pb),
                    reason: reason.into(),
                }],
            })
            .await
            .map(|r| r.into_inner())
    }

    pub(crate) async fn stats(&self, sub: &str) -> tidings::model::SubscriptionStats {
        self.admin().stats(sub).await.expect("stats")
    }
}

/// A store opened directly, without a server, for tests that run
/// maintenance rounds themselves (`Store::maintain`) and read what each
/// round did: its own timer runs one round at open, then once an hour.
pub(crate) struct TestStore {
    pub(crate) store: tidings::store::Store,
    database: Option<(String, String)>,
    _dir: TempDir,
}

impl TestStore {
    /// Opens a store on fresh storage (SQLite without fsync, or a fresh
    /// PostgreSQL database).
    pub(crate) async fn open(backend: Backend) -> TestStore {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut config = tidings::store::StoreConfig::new(dir.path());
        config.fsync = false;
        config.maintenance_interval = Duration::from_secs(3600);
        let mut database = None;
        if let Backend::Postgres(admin) = &backend {
            let (url, name) = fresh_database(admin).await;
            config.storage = tidings::store::Storage::Postgres(url);
            database = Some((admin.clone(), name));
        }
        let store = tidings::store::Store::open(config)
            .await
            .expect("store opens");
        TestStore {
            store,
            database,
            _dir: dir,
        }
    }

    /// Closes the store and drops its PostgreSQL database.
    pub(crate) async fn close(self) {
        self.store.close().await;
        if let Some((admin, name)) = &self.database {
            drop_database(admin, name).await;
        }
    }
}

/// A broker stopped by [`TestBroker::pause`]: its storage and address.
pub(crate) struct PausedBroker {
    addr: String,
    data: PathBuf,
    database: Option<(String, String, String)>,
    dir: Option<TempDir>,
}

impl PausedBroker {
    /// Starts the broker again on its storage and its old address.
    pub(crate) async fn resume(self) -> TestBroker {
        let mut b = TestBroker::start_on(&self.data, self.database, &self.addr, |_| {}).await;
        b._dir = self.dir;
        b
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

pub(crate) fn pb(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

pub(crate) fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// A delivery as the streaming client (domain) or unary Pull (wire) gives it.
pub(crate) trait Received {
    /// The payload as text.
    fn text(&self) -> String;
    /// The message's sequence number.
    fn sequence(&self) -> i64;
}

impl Received for proto::ReceivedMessage {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.message.as_ref().expect("message").payload).into_owned()
    }

    fn sequence(&self) -> i64 {
        self.message.as_ref().expect("message").sequence
    }
}

impl Received for Delivery {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.message.payload).into_owned()
    }

    fn sequence(&self) -> i64 {
        self.message.sequence
    }
}

impl<T: Received> Received for &T {
    fn text(&self) -> String {
        (*self).text()
    }

    fn sequence(&self) -> i64 {
        (*self).sequence()
    }
}

pub(crate) fn payload(m: &impl Received) -> String {
    m.text()
}

pub(crate) fn seq(m: &impl Received) -> i64 {
    m.sequence()
}

/// The wire form of a message to publish, for tests of the wire API.
pub(crate) fn wire(m: client::Outgoing) -> proto::Message {
    proto::Message::from(tidings::model::NewMessage::from(m))
}

/// A small deterministic pseudo-random generator for load tests.
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }

    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

/// A subscription `name` on `topic` from its earliest message, with the
/// broker's defaults otherwise.
pub(crate) fn from_earliest(name: &str, topic: &str) -> NewSubscription {
    new_sub(proto::Subscription {
        name: name.into(),
        topic: topic.into(),
        start: Some(proto::subscription::Start::StartPosition(
            proto::StartPosition::Earliest as i32,
        )),
        ..Default::default()
    })
}

/// A subscription to create, written in its wire form (unset fields take the
/// broker's defaults, as they would over the wire).
pub(crate) fn new_sub(s: proto::Subscription) -> NewSubscription {
    NewSubscription::try_from(s).expect("a subscription in its wire form")
}

/// The gRPC code and message of a client error, for assertions written
/// against the wire API's codes.
pub(crate) trait Coded {
    /// The code the broker answered with.
    fn code(&self) -> tonic::Code;
    /// The message.
    fn message(&self) -> String;
}

impl Coded for tidings::Error {
    fn code(&self) -> tonic::Code {
        use tidings::Error;
        match self {
            Error::InvalidArgument(_) => tonic::Code::InvalidArgument,
            Error::NotFound(_) => tonic::Code::NotFound,
            Error::AlreadyExists(_) => tonic::Code::AlreadyExists,
            Error::FailedPrecondition(_) => tonic::Code::FailedPrecondition,
            Error::ResourceExhausted(_) => tonic::Code::ResourceExhausted,
            Error::Unavailable(_) => tonic::Code::Unavailable,
            Error::Storage(_) => tonic::Code::Internal,
        }
    }

    fn message(&self) -> String {
        self.to_string()
    }
}

impl TestBroker {
    /// The generated admin client, for tests of the wire API itself.
    pub(crate) fn raw_admin(
        &self,
    ) -> tidings::proto::admin_service_client::AdminServiceClient<Channel> {
        tidings::proto::admin_service_client::AdminServiceClient::new(self.channel.clone())
    }
}

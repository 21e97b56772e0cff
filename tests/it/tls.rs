//! TLS, mutual TLS, certificate rotation and connection hygiene (issue 12),
//! with certificates the tests make themselves.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, date_time_ymd,
};
use tempfile::TempDir;
use tidings::client::{self, Admin, ClientTls, ConnectOptions, Outgoing, Publisher};
use tidings::proto;
use tidings::server::{self, ClientAuth, ServerConfig, TlsFiles};
use tokio::io::AsyncReadExt;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::harness::test_config;

/// A certificate authority of the test's own.
struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().expect("key");
        Ca {
            issuer: CertifiedIssuer::self_signed(params, key).expect("CA"),
        }
    }

    fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A certificate for `name` (also its DNS name), and its key, in PEM;
    /// `expired` makes one whose validity ended long ago.
    fn leaf(&self, name: &str, expired: bool) -> (String, String) {
        let mut params = CertificateParams::new(vec![name.to_owned()]).expect("params");
        params.distinguished_name.push(DnType::CommonName, name);
        if expired {
            params.not_before = date_time_ymd(2000, 1, 1);
            params.not_after = date_time_ymd(2001, 1, 1);
        }
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &self.issuer).expect("sign");
        (cert.pem(), key.serialize_pem())
    }
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    // Written beside and renamed, as cert-manager and the like do, so the
    // broker never reads half a file.
    let tmp = dir.join(format!("{name}.tmp"));
    std::fs::write(&tmp, text).expect("write");
    std::fs::rename(&tmp, &path).expect("rename");
    path
}

/// A broker on 127.0.0.1:0 with the network settings `tune` makes.
struct Broker {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<tidings::Result<()>>,
    _data: TempDir,
}

impl Broker {
    async fn start(tune: impl FnOnce(&mut ServerConfig)) -> Broker {
        let data = TempDir::new().expect("tempdir");
        let mut config = test_config(data.path());
        tune(&mut config);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server::run(listener, config, async move {
            let _ = stopped.await;
        }));
        Broker {
            addr,
            stop: Some(stop),
            task,
            _data: data,
        }
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.task).await;
    }

    /// A client over TLS trusting `ca`, with `identity` if given.
    fn client(&self, ca: &str, identity: Option<(String, String)>) -> client::Connection {
        let tls = ClientTls {
            ca: Some(ca.as_bytes().to_vec()),
            identity: identity.map(|(c, k)| (c.into_bytes(), k.into_bytes())),
            domain: Some("localhost".into()),
        };
        let options = ConnectOptions {
            connect_timeout: Duration::from_secs(2),
            tls: Some(tls),
            token: None,
        };
        client::connect_with(&format!("https://{}", self.addr), options).expect("connect")
    }
}

/// Whether a health call on `connection` succeeds.
async fn works(connection: &client::Connection) -> Result<(), String> {
    Admin::new(connection)
        .health("")
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

fn tls_files(dir: &Path, ca: &Ca, client_ca: Option<&Ca>, auth: ClientAuth) -> TlsFiles {
    let (cert, key) = ca.leaf("localhost", false);
    TlsFiles {
        cert: write(dir, "server.pem", &cert),
        key: write(dir, "server.key", &key),
        client_ca: client_ca.map(|c| write(dir, "clients.pem", &c.pem())),
        client_auth: auth,
    }
}

#[tokio::test]
async fn tls_serves_clients_that_trust_its_ca_and_nothing_in_plain_text() {
    let dir = TempDir::new().expect("tempdir");
    let ca = Ca::new("tidings test CA");
    let files = tls_files(dir.path(), &ca, None, ClientAuth::None);
    let broker = Broker::start(|c| c.network.tls = Some(files)).await;

    let connection = broker.client(&ca.pem(), None);
    works(&connection).await.expect("TLS client");
    let admin = Admin::new(&connection);
    admin.create_topic("orders").await.expect("create topic");
    let published = Publisher::new(&connection, client::Backoff::default())
        .publish(&[Outgoing::new("orders", b"over TLS".to_vec())])
        .await
        .expect("publish over TLS");
    assert_eq!(published[0].sequence, 1);

    // Another CA's client does not trust the broker.
    let stranger = broker.client(&Ca::new("another CA").pem(), None);
    let e = works(&stranger).await.expect_err("untrusted server");
    assert!(e.contains("unavailable"), "{e}");
    // Plain text to a TLS port gets nowhere.
    let plain = client::connect_with(
        &format!("http://{}", broker.addr),
        ConnectOptions {
            connect_timeout: Duration::from_secs(2),
            tls: None,
            token: None,
        },
    )
    .expect("connect");
    works(&plain).await.expect_err("plain text refused");
    broker.stop().await;
}

#[tokio::test]
async fn mutual_tls_refuses_clients_without_a_good_certificate() {
    let dir = TempDir::new().expect("tempdir");
    let ca = Ca::new("tidings test CA");
    let files = tls_files(dir.path(), &ca, Some(&ca), ClientAuth::Required);
    let broker = Broker::start(|c| c.network.tls = Some(files)).await;

    let good = broker.client(&ca.pem(), Some(ca.leaf("billing-service", false)));
    works(&good)
        .await
        .expect("a client with a good certificate");

    let none = broker.client(&ca.pem(), None);
    works(&none).await.expect_err("no certificate");
    let foreign = broker.client(
        &ca.pem(),
        Some(Ca::new("another CA").leaf("mallory", false)),
    );
    works(&foreign)
        .await
        .expect_err("a certificate of another CA");
    let expired = broker.client(&ca.pem(), Some(ca.leaf("billing-service", true)));
    works(&expired).await.expect_err("an expired certificate");
    broker.stop().await;
}

#[tokio::test]
async fn optional_client_certificates_let_clients_without_one_in() {
    let dir = TempDir::new().expect("tempdir");
    let ca = Ca::new("tidings test CA");
    let files = tls_files(dir.path(), &ca, Some(&ca), ClientAuth::Optional);
    let broker = Broker::start(|c| c.network.tls = Some(files)).await;
    works(&broker.client(&ca.pem(), None))
        .await
        .expect("no certificate");
    works(&broker.client(&ca.pem(), Some(ca.leaf("svc", false))))
        .await
        .expect("a good certificate");
    let foreign = broker.client(
        &ca.pem(),
        Some(Ca::new("another CA").leaf("mallory", false)),
    );
    works(&foreign)
        .await
        .expect_err("a bad certificate is still refused");
    broker.stop().await;
}

#[tokio::test]
async fn a_rotated_certificate_is_served_without_a_restart() {
    let dir = TempDir::new().expect("tempdir");
    let old_ca = Ca::new("old CA");
    let new_ca = Ca::new("new CA");
    let files = tls_files(dir.path(), &old_ca, None, ClientAuth::None);
    let (cert_path, key_path) = (files.cert.clone(), files.key.clone());
    let broker = Broker::start(|c| {
        c.network.tls = Some(files);
        c.network.tls_reload_interval = Duration::from_millis(50);
    })
    .await;
    works(&broker.client(&old_ca.pem(), None))
        .await
        .expect("old certificate");
    works(&broker.client(&new_ca.pem(), None))
        .await
        .expect_err("not yet the new one");

    // A file that does not load keeps the certificate in use.
    write(dir.path(), "server.pem", "not a certificate");
    tokio::time::sleep(Duration::from_millis(300)).await;
    works(&broker.client(&old_ca.pem(), None))
        .await
        .expect("still the old certificate after a bad write");

    let (cert, key) = new_ca.leaf("localhost", false);
    write(dir.path(), "server.key", &key);
    write(dir.path(), "server.pem", &cert);
    assert!(cert_path.exists() && key_path.exists());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match works(&broker.client(&new_ca.pem(), None)).await {
            Ok(()) => break,
            Err(e) if Instant::now() > deadline => {
                panic!("the new certificate was never served: {e}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    works(&broker.client(&old_ca.pem(), None))
        .await
        .expect_err("the old certificate is gone");
    broker.stop().await;
}

/// Reads from `socket` until it is closed by the other side; returns when
/// (or `None` if it stayed open until `deadline`).
async fn closed_by(socket: &mut tokio::net::TcpStream, deadline: Instant) -> Option<Instant> {
    let mut buf = [0u8; 256];
    loop {
        match tokio::time::timeout_at(deadline.into(), socket.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0) | Err(_)) => return Some(Instant::now()),
            // The server's HTTP/2 preface and settings: keep reading.
            Ok(Ok(_)) => {}
        }
    }
}

#[tokio::test]
async fn idle_connections_over_the_cap_are_closed_and_a_client_still_gets_in() {
    let broker = Broker::start(|c| {
        c.network.max_connections = 20;
        c.network.idle_timeout = Duration::from_millis(800);
    })
    .await;
    // Thirty sockets that never send a byte.
    let opened = Instant::now();
    let mut silent = Vec::new();
    for _ in 0..30 {
        silent.push(
            tokio::net::TcpStream::connect(broker.addr)
                .await
                .expect("connect"),
        );
    }
    // Each watched from now on, so the instant it is closed is seen.
    let deadline = Instant::now() + Duration::from_secs(10);
    let watchers: Vec<_> = silent
        .into_iter()
        .map(|mut socket| tokio::spawn(async move { closed_by(&mut socket, deadline).await }))
        .collect();
    // A well-behaved client, with a subscription stream open across the
    // idle timeout: a call in progress keeps its connection.
    let options = ConnectOptions {
        connect_timeout: Duration::from_secs(2),
        tls: None,
        token: None,
    };
    let connection =
        client::connect_with(&format!("http://{}", broker.addr), options).expect("connect");
    let admin = Admin::new(&connection);
    let retry = client::Backoff {
        min: Duration::from_millis(50),
        max: Duration::from_millis(200),
        give_up_after: Some(Duration::from_secs(10)),
    };
    let started = Instant::now();
    let publisher = Publisher::new(&connection, retry);
    // Over the cap at first: the client gets in once the idle ones go.
    let mut created = admin.create_topic("orders").await;
    while created.is_err() && started.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        created = admin.create_topic("orders").await;
    }
    created.expect("a client gets in");
    admin
        .create_subscription(tidings::store::NewSubscription {
            name: "billing".into(),
            topic: "orders".into(),
            settings: Default::default(),
            start: tidings::model::StartPosition::Earliest,
        })
        .await
        .expect("subscription");
    // A raw stream, which does not reconnect: if its connection were
    // closed, it would end.
    let mut raw =
        proto::subscriber_service_client::SubscriberServiceClient::new(connection.channel());
    let (requests, rx) = tokio::sync::mpsc::channel(4);
    requests
        .send(proto::SubscribeRequest {
            subscription: "billing".into(),
            ..Default::default()
        })
        .await
        .expect("first request");
    let mut stream = raw
        .subscribe(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("subscribe")
        .into_inner();

    // The ten over the cap were closed at once; the twenty within it after
    // the idle timeout.
    let mut after = Vec::new();
    for watcher in watchers {
        let closed = watcher
            .await
            .expect("watcher")
            .expect("every silent socket is closed");
        after.push(closed.duration_since(opened));
    }
    let early = after
        .iter()
        .filter(|d| **d < Duration::from_millis(600))
        .count();
    let idle = after
        .iter()
        .filter(|d| **d >= Duration::from_millis(750))
        .count();
    assert_eq!((early, idle), (10, 20), "closed after: {after:?}");

    tokio::time::sleep(Duration::from_millis(1500)).await;
    publisher
        .publish(&[Outgoing::new("orders", b"after the idle timeout".to_vec())])
        .await
        .expect("publish");
    let response = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("delivered in time")
        .expect("the stream in progress was never cut")
        .expect("a response");
    let m = response.messages[0].message.as_ref().expect("message");
    assert_eq!(m.payload, b"after the idle timeout");
    drop(requests);
    broker.stop().await;
}

#[tokio::test]
async fn a_client_certificate_names_its_principal() {
    let dir = TempDir::new().expect("tempdir");
    let ca = Ca::new("tidings test CA");
    let files = tls_files(dir.path(), &ca, Some(&ca), ClientAuth::Required);
    let access = dir.path().join("access.json");
    let rules = serde_json::json!({"principals": [
        {"name": "ops", "certificates": ["ops.internal"], "admin": true},
        {"name": "billing-service", "certificates": ["billing.internal"], "consume": ["billing"]},
    ]});
    std::fs::write(&access, rules.to_string()).expect("access file");
    let broker = Broker::start(|c| {
        c.network.tls = Some(files);
        c.access_file = Some(access);
    })
    .await;
    let ops = Admin::new(&broker.client(&ca.pem(), Some(ca.leaf("ops.internal", false))));
    ops.create_topic("orders").await.expect("ops is admin");
    for name in ["billing", "shipping"] {
        ops.create_subscription(tidings::store::NewSubscription {
            name: name.into(),
            topic: "orders".into(),
            settings: Default::default(),
            start: tidings::model::StartPosition::Earliest,
        })
        .await
        .expect("subscription");
    }
    let billing = broker.client(&ca.pem(), Some(ca.leaf("billing.internal", false)));
    let subscriber = client::Subscriber::new(&billing, client::Backoff::default());
    subscriber
        .peek("billing", 10)
        .await
        .expect("its own subscription");
    let e = subscriber
        .peek("shipping", 10)
        .await
        .expect_err("another subscription");
    assert!(e.to_string().contains("PERMISSION_DENIED"), "{e}");
    let e = Admin::new(&billing)
        .create_topic("x")
        .await
        .expect_err("no admin right");
    assert!(e.to_string().contains("PERMISSION_DENIED"), "{e}");
    // A good certificate whose name the access file does not list.
    let stranger = broker.client(&ca.pem(), Some(ca.leaf("stranger.internal", false)));
    let e = client::Subscriber::new(&stranger, client::Backoff::default())
        .peek("billing", 10)
        .await
        .expect_err("no principal");
    assert!(
        e.to_string().contains("UNAUTHENTICATED") && e.to_string().contains("stranger.internal"),
        "{e}"
    );
    broker.stop().await;
}

#[tokio::test]
async fn the_relay_reaches_a_broker_with_tls_and_a_token() {
    use tidings::outbox::{Message, Relay, RelayConfig};
    let dir = TempDir::new().expect("tempdir");
    let ca = Ca::new("tidings test CA");
    // Client certificates optional: the admin shows one, the relay a token.
    let files = tls_files(dir.path(), &ca, Some(&ca), ClientAuth::Optional);
    let digest = ring::digest::digest(&ring::digest::SHA256, b"relay-token");
    let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    let rules = serde_json::json!({"principals": [
        {"name": "ops", "certificates": ["ops.internal"], "admin": true},
        {"name": "relay", "tokens": [format!("sha256:{hex}")], "publish": ["orders"]},
    ]});
    let access = dir.path().join("access.json");
    std::fs::write(&access, rules.to_string()).expect("access file");
    let broker = Broker::start(|c| {
        c.network.tls = Some(files);
        c.access_file = Some(access);
    })
    .await;
    let app = crate::outbox::AppDb::create(&crate::harness::Backend::Sqlite).await;
    app.enqueue(&[Message::new("orders", b"over TLS".to_vec())], true)
        .await;
    let mut config = RelayConfig::new(format!("https://{}", broker.addr));
    config.poll_interval = Duration::from_millis(50);
    config.connect = ConnectOptions {
        connect_timeout: Duration::from_secs(2),
        tls: Some(ClientTls {
            ca: Some(ca.pem().into_bytes()),
            identity: None,
            domain: Some("localhost".into()),
        }),
        token: Some("relay-token".into()),
    };
    // The admin, by its certificate, makes the topic and watches it.
    let ca_pem = ca.pem();
    let ops = Admin::new(&broker.client(&ca_pem, Some(ca.leaf("ops.internal", false))));
    ops.create_topic("orders").await.expect("topic");
    let relay = Relay::start(app.outbox(), config).await.expect("relay");
    let deadline = Instant::now() + Duration::from_secs(10);
    while ops.get_topic("orders").await.expect("topic").last_sequence < 1 {
        assert!(Instant::now() < deadline, "the relay never published");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(app.depth().await, 0, "the row left the outbox once stored");
    relay.stop().await;
    app.drop().await;
    broker.stop().await;
}

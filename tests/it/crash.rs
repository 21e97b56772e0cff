//! Crash test: the real `tidings` binary under publish load, killed with
//! SIGKILL at random moments and restarted on the same data directory.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tidings::client;
use tidings::proto::{self, publisher_service_client::PublisherServiceClient};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tonic::transport::Channel;
use uuid::Uuid;

use crate::harness::{Backend, Rng, drop_database, fresh_database, ms};
use crate::harness::{from_earliest, new_sub};

/// A `tidings serve` child process.
pub(crate) struct Broker {
    pub(crate) child: Child,
    pub(crate) url: String,
}

/// Starts the binary on `dir` (or on PostgreSQL at `database_url`),
/// listening on `listen`, and reads the address it bound.
pub(crate) async fn spawn_broker_with(
    dir: &Path,
    database_url: Option<&str>,
    listen: &str,
) -> Broker {
    spawn_broker_args(dir, database_url, listen, &[]).await
}

/// Starts the binary as [`spawn_broker_with`] does, with `extra` flags
/// after the test's short intervals.
pub(crate) async fn spawn_broker_args(
    dir: &Path,
    database_url: Option<&str>,
    listen: &str,
    extra: &[String],
) -> Broker {
    let mut command = Command::new(env!("CARGO_BIN_EXE_tidings"));
    command.args(["serve", "--listen", listen]);
    // The storage is one choice: a folder or a database URL.
    match database_url {
        Some(url) => command.args(["--database-url", url]),
        None => command.arg("--data-dir").arg(dir),
    };
    let child = command
        .args([
            "--maintenance-interval",
            "100ms",
            "--poll-interval",
            "100ms",
        ])
        .args(extra)
        .env("RUST_LOG", "error")
        .stdout(Stdio::piped())
        .stderr(if std::env::var_os("TIDINGS_TEST_BROKER_LOGS").is_some() {
            Stdio::inherit()
        } else {
            Stdio::null()
        })
        .kill_on_drop(true)
        .spawn()
        .expect("start tidings");
    listening(child).await.expect("a line")
}

/// Reads the address a `tidings serve` child prints once it serves (its
/// stdout must be piped); `None` if it exited without one.
pub(crate) async fn listening(mut child: Child) -> Option<Broker> {
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .expect("broker started in time")
        .expect("read stdout")?;
    let addr = line
        .strip_prefix("tidings listening on ")
        .expect("address line")
        .to_owned();
    Some(Broker {
        child,
        url: format!("http://{addr}"),
    })
}

#[derive(Default)]
struct Ledger {
    attempted: HashSet<String>,
    acked: HashSet<String>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acked_publishes_survive_sigkill_cycles_under_load_on_sqlite() {
    sigkill_cycles(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acked_publishes_survive_sigkill_cycles_under_load_on_postgres() {
    let Some(Backend::Postgres(admin_url)) = Backend::postgres() else {
        return;
    };
    let (url, name) = fresh_database(&admin_url).await;
    sigkill_cycles(Some(&url)).await;
    drop_database(&admin_url, &name).await;
}

/// Publishes from four tasks while the broker is killed with SIGKILL twelve
/// times; then checks that every acked publish is delivered and nothing
/// unpublished is.
async fn sigkill_cycles(database_url: Option<&str>) {
    let dir = tempfile::tempdir().unwrap();
    let any_port = "127.0.0.1:0";
    let mut broker = spawn_broker_with(dir.path(), database_url, any_port).await;
    let connection = client::connect(&broker.url).unwrap();
    let channel = connection.channel();
    let admin = client::Admin::new(&connection);
    admin.create_topic("load").await.unwrap();
    admin
        .create_subscription(from_earliest("drain", "load"))
        .await
        .unwrap();

    let current: Arc<Mutex<Channel>> = Arc::new(Mutex::new(channel));
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut publishers = Vec::new();
    for p in 0..4u64 {
        let (current, ledger, stop) = (current.clone(), ledger.clone(), stop.clone());
        publishers.push(tokio::spawn(async move {
            let mut rng = Rng::new(0x5eed + p);
            while !stop.load(Ordering::Relaxed) {
                let n = 1 + rng.below(20) as usize;
                let ids: Vec<String> = (0..n).map(|_| Uuid::now_v7().to_string()).collect();
                let messages = ids
                    .iter()
                    .map(|id| proto::Message {
                        id: id.clone(),
                        topic: "load".into(),
                        payload: id.clone().into_bytes(),
                        ..Default::default()
                    })
                    .collect();
                ledger.lock().unwrap().attempted.extend(ids.iter().cloned());
                let channel = current.lock().unwrap().clone();
                let mut client = PublisherServiceClient::new(channel);
                let call = client.publish(proto::PublishRequest { messages });
                match tokio::time::timeout(Duration::from_secs(2), call).await {
                    Ok(Ok(_)) => ledger.lock().unwrap().acked.extend(ids),
                    _ => tokio::time::sleep(ms(20)).await,
                }
            }
        }));
    }

    let mut rng = Rng::new(0xc0ffee);
    let mut kills = 0;
    for _ in 0..12 {
        tokio::time::sleep(ms(150 + rng.below(350))).await;
        broker.child.kill().await.expect("SIGKILL");
        kills += 1;
        broker = spawn_broker_with(dir.path(), database_url, any_port).await;
        *current.lock().unwrap() = client::connect(&broker.url).unwrap().channel();
    }
    tokio::time::sleep(ms(300)).await;
    stop.store(true, Ordering::Relaxed);
    for p in publishers {
        p.await.unwrap();
    }
    assert!(kills >= 10);

    let ledger = std::mem::take(&mut *ledger.lock().unwrap());
    assert!(
        ledger.acked.len() > 500,
        "enough load: {} acked",
        ledger.acked.len()
    );

    // Drain after a final restart.
    broker.child.kill().await.expect("SIGKILL");
    let broker = spawn_broker_with(dir.path(), database_url, any_port).await;
    let channel = client::connect(&broker.url).unwrap().channel();
    let mut sub = proto::subscriber_service_client::SubscriberServiceClient::new(channel);
    let mut delivered = HashSet::new();
    loop {
        let got = sub
            .pull(proto::PullRequest {
                subscription: "drain".into(),
                max_messages: 1000,
                max_wait: Some(prost_types::Duration {
                    seconds: 1,
                    nanos: 0,
                }),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .messages;
        if got.is_empty() {
            break;
        }
        let ack_ids = got.iter().map(|m| m.ack_id.clone()).collect();
        for m in got {
            delivered.insert(m.message.unwrap().id);
        }
        sub.ack(proto::AckRequest {
            subscription: "drain".into(),
            ack_ids,
        })
        .await
        .unwrap();
    }
    let lost: Vec<&String> = ledger.acked.difference(&delivered).collect();
    assert!(
        lost.is_empty(),
        "{} acked messages lost, e.g. {:?}",
        lost.len(),
        lost.first()
    );
    let invented: Vec<&String> = delivered.difference(&ledger.attempted).collect();
    assert!(
        invented.is_empty(),
        "delivered but never published: {invented:?}"
    );
    drop(broker);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_on_one_database_survive_a_sigkill_of_one() {
    let Some(Backend::Postgres(admin_url)) = Backend::postgres() else {
        return;
    };
    let (url, name) = fresh_database(&admin_url).await;
    let dir = tempfile::tempdir().unwrap();
    let mut brokers = Vec::new();
    for _ in 0..3 {
        brokers.push(spawn_broker_with(dir.path(), Some(&url), "127.0.0.1:0").await);
    }
    let urls: Vec<String> = brokers.iter().map(|b| b.url.clone()).collect();
    let connections: Vec<client::Connection> =
        urls.iter().map(|u| client::connect(u).unwrap()).collect();
    let channels: Vec<Channel> = connections.iter().map(|c| c.channel()).collect();
    let admin = client::Admin::new(&connections[0]);
    admin.create_topic("load").await.unwrap();
    admin
        .create_subscription(new_sub(proto::Subscription {
            name: "work".into(),
            topic: "load".into(),
            ack_deadline: Some(prost_types::Duration {
                seconds: 2,
                nanos: 0,
            }),
            start: Some(proto::subscription::Start::StartPosition(
                proto::StartPosition::Earliest as i32,
            )),
            ..Default::default()
        }))
        .await
        .unwrap();

    let ledger = Arc::new(Mutex::new(Ledger::default()));
    // Per message id: deliveries, and acks the broker confirmed. Leases are
    // exclusive exactly when no message is confirmed acked twice.
    let seen: Arc<Mutex<HashMap<String, (usize, usize)>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));

    // A consumer on each instance; each acks what it gets at once.
    let mut consumers = Vec::new();
    for connection in &connections {
        let subscriber = client::Subscriber::new(connection, client::Backoff::default());
        let mut sub = subscriber.subscribe(
            "work",
            client::FlowControl {
                max_messages: 50,
                max_bytes: 1 << 20,
                ..Default::default()
            },
        );
        let seen = seen.clone();
        consumers.push(tokio::spawn(async move {
            let mut leases: HashMap<String, String> = HashMap::new();
            while let Some(event) = sub.next().await {
                match event {
                    Ok(client::Event::Message(m)) => {
                        let id = m.message.id.to_string();
                        seen.lock().unwrap().entry(id.clone()).or_default().0 += 1;
                        leases.insert(m.ack_id.to_string(), id);
                        sub.ack(vec![m.ack_id.to_string()]);
                    }
                    Ok(client::Event::Outcome(o)) => {
                        let o = proto::AckOutcome::from(o);
                        let id = leases.remove(&o.ack_id);
                        if let Some(id) = id.filter(|_| o.result == proto::AckResult::Ok as i32) {
                            seen.lock().unwrap().entry(id).or_default().1 += 1;
                        }
                    }
                    Ok(client::Event::Malformed { .. }) | Err(_) => {}
                }
            }
        }));
    }

    // A publisher on each instance.
    let mut publishers = Vec::new();
    for (p, channel) in channels.iter().enumerate() {
        let (channel, ledger, stop) = (channel.clone(), ledger.clone(), stop.clone());
        publishers.push(tokio::spawn(async move {
            let mut rng = Rng::new(0xfeed + p as u64);
            let mut client = PublisherServiceClient::new(channel);
            while !stop.load(Ordering::Relaxed) {
                let n = 1 + rng.below(20) as usize;
                let ids: Vec<String> = (0..n).map(|_| Uuid::now_v7().to_string()).collect();
                let messages = ids
                    .iter()
                    .map(|id| proto::Message {
                        id: id.clone(),
                        topic: "load".into(),
                        payload: id.clone().into_bytes(),
                        ..Default::default()
                    })
                    .collect();
                ledger.lock().unwrap().attempted.extend(ids.iter().cloned());
                let call = client.publish(proto::PublishRequest { messages });
                match tokio::time::timeout(Duration::from_secs(2), call).await {
                    Ok(Ok(_)) => ledger.lock().unwrap().acked.extend(ids),
                    _ => tokio::time::sleep(ms(50)).await,
                }
            }
        }));
    }

    // Kill the middle instance mid-run and bring it back on the same port,
    // so that its clients reconnect by themselves.
    tokio::time::sleep(ms(1500)).await;
    brokers[1].child.kill().await.expect("SIGKILL");
    tokio::time::sleep(ms(500)).await;
    let addr = urls[1].trim_start_matches("http://").to_owned();
    brokers[1] = spawn_broker_with(dir.path(), Some(&url), &addr).await;
    tokio::time::sleep(ms(1500)).await;
    stop.store(true, Ordering::Relaxed);
    for p in publishers {
        p.await.unwrap();
    }
    let ledger = std::mem::take(&mut *ledger.lock().unwrap());
    assert!(
        ledger.acked.len() > 300,
        "enough load: {} acked",
        ledger.acked.len()
    );

    // Every acked publish gets delivered (leases of the killed instance's
    // consumer expire after 2 s and go to the others). Its ack's outcome may
    // have been lost with the killed instance, so acks are not required.
    let mut missing = usize::MAX;
    for _ in 0..300 {
        missing = {
            let seen = seen.lock().unwrap();
            ledger
                .acked
                .iter()
                .filter(|id| !seen.contains_key(*id))
                .count()
        };
        if missing == 0 {
            break;
        }
        tokio::time::sleep(ms(100)).await;
    }
    assert_eq!(missing, 0, "acked publishes never delivered");
    for c in consumers {
        c.abort();
    }
    let seen = std::mem::take(&mut *seen.lock().unwrap());
    let invented: Vec<&String> = seen
        .keys()
        .filter(|id| !ledger.attempted.contains(*id))
        .collect();
    assert!(
        invented.is_empty(),
        "delivered but never published: {invented:?}"
    );
    let twice: Vec<(&String, &(usize, usize))> = seen.iter().filter(|(_, s)| s.1 > 1).collect();
    assert!(
        twice.is_empty(),
        "acked twice, so leased to two consumers at once: {twice:?}"
    );
    for b in &mut brokers {
        b.child.kill().await.ok();
    }
    drop_database(&admin_url, &name).await;
}

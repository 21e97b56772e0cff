//! Crash test: the real `tidings` binary under publish load, killed with
//! SIGKILL at random moments and restarted on the same data directory.

use std::collections::HashSet;
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

use crate::harness::{Rng, ms};

/// A `tidings serve` child process.
struct Broker {
    child: Child,
    url: String,
}

/// Starts the binary on `dir` and reads the address it bound.
async fn spawn_broker(dir: &Path) -> Broker {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tidings"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir)
        .args([
            "--maintenance-interval",
            "100ms",
            "--poll-interval",
            "100ms",
        ])
        .env("RUST_LOG", "error")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start tidings");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .expect("broker started in time")
        .expect("read stdout")
        .expect("a line");
    let addr = line
        .strip_prefix("tidings listening on ")
        .expect("address line")
        .to_owned();
    Broker {
        child,
        url: format!("http://{addr}"),
    }
}

#[derive(Default)]
struct Ledger {
    attempted: HashSet<String>,
    acked: HashSet<String>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acked_publishes_survive_sigkill_cycles_under_load() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = spawn_broker(dir.path()).await;
    let channel = client::channel(&broker.url).unwrap();
    let admin = client::Admin::new(channel.clone());
    admin.create_topic("load").await.unwrap();
    admin
        .create_subscription(proto::Subscription {
            name: "drain".into(),
            topic: "load".into(),
            start: Some(proto::subscription::Start::StartPosition(
                proto::StartPosition::Earliest as i32,
            )),
            ..Default::default()
        })
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
        broker = spawn_broker(dir.path()).await;
        *current.lock().unwrap() = client::channel(&broker.url).unwrap();
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
    let broker = spawn_broker(dir.path()).await;
    let channel = client::channel(&broker.url).unwrap();
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

//! Crash test of the relay: the real `tidings relay` process, killed with
//! SIGKILL right after the broker stores what it sent (before it can delete
//! the rows) many times while the application keeps committing.

use std::collections::HashSet;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tidings::outbox::Message;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use uuid::Uuid;

use crate::harness::{Rng, TestBroker, backend_test, ms};
use crate::outbox::{AppDb, receive, stored};

/// Starts `tidings relay` on the application's database and waits until it
/// runs; counts the duplicates it reports into `duplicates`.
async fn spawn_relay(app: &AppDb, broker: &TestBroker, duplicates: Arc<AtomicU64>) -> Child {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tidings"))
        .args(["--log-format", "json", "relay", "--broker", &broker.url])
        .args(["--database-url", app.url()])
        .args(["--poll-interval", "20ms", "--retry-max", "200ms"])
        .args(["--heartbeat-interval", "100ms", "--batch-size", "100"])
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start tidings relay");
    let stderr = child.stderr.take().expect("stderr");
    tokio::spawn(async move {
        let mut lines = BufReader::new(stderr).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(n) = line
                .split("\"duplicates\":")
                .nth(1)
                .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
                .and_then(|n| n.parse::<u64>().ok())
                .filter(|_| line.contains("already had"))
            {
                duplicates.fetch_add(n, Ordering::Relaxed);
            }
        }
    });
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .expect("relay started in time")
        .expect("read stdout")
        .expect("a line");
    assert_eq!(line, "tidings relay started");
    child
}

backend_test! {
    async fn relay_killed_between_publish_and_delete_stores_each_message_once(backend) {
        let broker = TestBroker::start(backend.clone()).await;
        broker.topic_and_sub("orders", "watch", |_| {}).await;
        broker.topic_and_sub("orders", "all", |_| {}).await;
        let app = Arc::new(AppDb::create(&backend).await);

        // The application keeps committing messages in small transactions.
        let enqueued = Arc::new(Mutex::new(Vec::<Uuid>::new()));
        let writing = Arc::new(AtomicBool::new(true));
        let mut writers = Vec::new();
        for w in 0..3u64 {
            let (app, enqueued, writing) = (app.clone(), enqueued.clone(), writing.clone());
            writers.push(tokio::spawn(async move {
                let mut rng = Rng::new(w + 1);
                while writing.load(Ordering::Relaxed) {
                    let batch: Vec<Message> = (0..1 + rng.below(5))
                        .map(|i| Message::new("orders", format!("w{w}-{i}")))
                        .collect();
                    app.enqueue(&batch, true).await;
                    enqueued.lock().expect("ids").extend(batch.iter().map(|m| m.id));
                    tokio::time::sleep(ms(rng.below(3))).await;
                }
            }));
        }

        // Each cycle: a fresh relay; the moment the broker delivers a message
        // it stored (so the relay has its ack, or is about to), SIGKILL the
        // relay. In every other cycle the test also holds a lock that makes
        // the relay's delete wait, so the kill surely falls between the
        // broker's ack and the delete.
        let duplicates = Arc::new(AtomicU64::new(0));
        let mut watch = broker.subscribe("watch");
        const KILLS: usize = 30;
        for cycle in 0..KILLS {
            let mut relay = spawn_relay(&app, &broker, duplicates.clone()).await;
            let lock = if cycle % 2 == 0 { Some(app.block_deletes().await) } else { None };
            let m = tokio::time::timeout(Duration::from_secs(30), watch.next_message())
                .await
                .expect("the relay publishes")
                .expect("subscription open")
                .expect("no error");
            relay.start_kill().expect("SIGKILL");
            relay.wait().await.expect("relay exited");
            drop(lock);
            watch.ack(vec![m.ack_id.to_string()]);
        }
        writing.store(false, Ordering::Relaxed);
        for w in writers {
            w.await.expect("writer");
        }

        // A last relay drains the outbox.
        let mut relay = spawn_relay(&app, &broker, duplicates.clone()).await;
        let mut drained = false;
        for _ in 0..1500 {
            if app.depth().await == 0 {
                drained = true;
                break;
            }
            tokio::time::sleep(ms(20)).await;
        }
        assert!(drained, "the outbox drains after the kills");
        // `tidings stats --outbox` reads the same numbers the relay reports.
        let stats = Command::new(env!("CARGO_BIN_EXE_tidings"))
            .args(["stats", "--outbox", app.url()])
            .output()
            .await
            .expect("tidings stats");
        let text = String::from_utf8_lossy(&stats.stdout);
        assert!(stats.status.success(), "{text}");
        assert!(text.contains("outbox_depth: 0\n"), "{text}");
        assert!(text.contains("leader=true"), "{text}");
        // SIGTERM stops the relay cleanly.
        let pid = relay.id().expect("pid").to_string();
        let term = Command::new("kill").args(["-TERM", &pid]).status().await.expect("kill");
        assert!(term.success());
        let exit = tokio::time::timeout(Duration::from_secs(30), relay.wait())
            .await
            .expect("relay stopped in time")
            .expect("relay exited");
        assert!(exit.success(), "relay exited with {exit}");

        let ids: Vec<Uuid> = enqueued.lock().expect("ids").clone();
        let distinct: HashSet<Uuid> = ids.iter().copied().collect();
        assert_eq!(distinct.len(), ids.len());
        assert_eq!(
            stored(&broker, "orders").await,
            ids.len() as i64,
            "each outbox message stored exactly once"
        );
        let mut all = broker.subscribe("all");
        let got = receive(&mut all, ids.len()).await;
        let delivered: HashSet<Uuid> = got
            .iter()
            .map(|m| m.message.id)
            .collect();
        assert_eq!(delivered, distinct, "exactly the committed messages reached the broker");
        // The kills did land between the broker's ack and the delete: the
        // restarted relays resent rows the broker already had.
        let duplicates = duplicates.load(Ordering::Relaxed);
        eprintln!("{} messages, {KILLS} kills, {duplicates} resent rows answered as duplicates", ids.len());
        assert!(duplicates >= (KILLS / 2) as u64, "fewer resends than kills inside the window");
        drop(all);
        drop(watch);
        Arc::into_inner(app).expect("writers done").drop().await;
        broker.stop().await;
    }
}

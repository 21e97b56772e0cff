//! Crash tests of the relay: the real `tidings relay` process, killed with
//! SIGKILL right after the broker stores what it sent (before it can delete
//! the rows) many times while the application keeps committing; and a
//! killed relay seen as gone by `tidings stats --outbox` (issue 15).

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
    let fast = ["--poll-interval", "20ms", "--heartbeat-interval", "100ms"];
    spawn_relay_with(app, broker, &fast, duplicates).await
}

/// Waits (up to 30 s) for the outbox of `app` to be empty.
async fn wait_drained(app: &AppDb) {
    for _ in 0..1500 {
        if app.depth().await == 0 {
            return;
        }
        tokio::time::sleep(ms(20)).await;
    }
    panic!("the outbox drains after the kills");
}

/// [`spawn_relay`] with these flags added.
async fn spawn_relay_with(
    app: &AppDb,
    broker: &TestBroker,
    flags: &[&str],
    duplicates: Arc<AtomicU64>,
) -> Child {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tidings"))
        .args(["--log-format", "json", "relay", "--broker", &broker.url])
        .args(["--database-url", app.url()])
        .args(["--retry-max", "200ms", "--batch-size", "100"])
        .args(flags)
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
            let lock = if cycle % 2 == 0 {
                // Once the relay has written its first heartbeat: the lock
                // is to hold its delete, not its start.
                reported(&app, &relay).await;
                // The lock holds the writers too, and the rows already in
                // the outbox may all have been published by the relay just
                // killed (a republished message is a duplicate, which
                // delivers nothing): one message committed now is surely
                // new to the broker.
                let fresh = Message::new("orders", format!("fresh-{cycle}"));
                app.enqueue(std::slice::from_ref(&fresh), true).await;
                enqueued.lock().expect("ids").push(fresh.id);
                Some(app.block_deletes().await)
            } else {
                None
            };
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
        wait_drained(&app).await;
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

/// `tidings stats --outbox URL` (the real binary) with `--output format`:
/// its standard output.
async fn outbox_stats(app: &AppDb, format: &str) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_tidings"))
        .args(["--output", format, "stats", "--outbox", app.url()])
        .output()
        .await
        .expect("tidings stats");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// The relay names in `tidings stats --output json --outbox`: the leaders,
/// the live relays and the gone ones.
async fn relays_seen(app: &AppDb) -> (Vec<String>, Vec<String>, Vec<String>) {
    let text = outbox_stats(app, "json").await;
    let v: serde_json::Value = serde_json::from_str(&text).expect("stats JSON");
    let names = |alive: bool| -> Vec<String> {
        v["relays"]
            .as_array()
            .expect("relays")
            .iter()
            .filter(|r| r["alive"].as_bool() == Some(alive))
            .map(|r| {
                assert!(r["heartbeatAge"].as_str().is_some(), "{r}");
                assert_eq!(r["heartbeatInterval"], "0.200s", "{r}");
                r["relay"].as_str().expect("name").to_owned()
            })
            .collect()
    };
    let leaders = v["leaders"]
        .as_array()
        .expect("leaders")
        .iter()
        .map(|l| l.as_str().expect("name").to_owned())
        .collect();
    (leaders, names(true), names(false))
}

/// Waits until the relay `relay` runs has written its row in
/// `tidings_outbox_relays`.
async fn reported(app: &AppDb, relay: &Child) {
    let pid = format!("-{}-", relay.id().expect("running"));
    let give_up = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let stats = app.outbox().stats().await.expect("outbox stats");
        if stats.relays.iter().any(|r| r.relay.contains(&pid)) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < give_up,
            "relay {pid} never reported"
        );
        tokio::time::sleep(ms(10)).await;
    }
}

/// The relay a process runs: its name holds the process id.
fn named(names: &[String], relay: &Child) -> bool {
    let pid = format!("-{}-", relay.id().expect("running"));
    names.iter().any(|n| n.contains(&pid))
}

/// Polls `tidings stats` until `done` holds of what it lists.
async fn stats_until(
    app: &AppDb,
    what: &str,
    done: impl Fn(&[String], &[String], &[String]) -> bool,
) -> (Vec<String>, Vec<String>, Vec<String>) {
    let give_up = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (leaders, alive, gone) = relays_seen(app).await;
        if done(&leaders, &alive, &gone) {
            return (leaders, alive, gone);
        }
        assert!(
            tokio::time::Instant::now() < give_up,
            "{what}: leaders {leaders:?}, alive {alive:?}, gone {gone:?}"
        );
        tokio::time::sleep(ms(100)).await;
    }
}

backend_test! {
    async fn issue_15_a_killed_relay_shows_as_gone_and_the_survivor_leads(backend) {
        // PostgreSQL elects one leader; SQLite has none (every relay
        // publishes and reports itself leader), so there "leader" lists
        // every live relay, and what holds is that a killed one leaves it.
        let elected = !matches!(backend, crate::harness::Backend::Sqlite);
        let broker = TestBroker::start(backend.clone()).await;
        broker.topic_and_sub("orders", "s", |_| {}).await;
        let app = AppDb::create(&backend).await;
        let flags = ["--poll-interval", "50ms", "--heartbeat-interval", "200ms"];
        let none = Arc::new(AtomicU64::new(0));
        let mut first = spawn_relay_with(&app, &broker, &flags, none.clone()).await;
        stats_until(&app, "the first relay leads", |leaders, _, _| named(leaders, &first)).await;
        let second = spawn_relay_with(&app, &broker, &flags, none.clone()).await;
        let (leaders, _, gone) = stats_until(&app, "both relays report", |_, alive, _| {
            named(alive, &first) && named(alive, &second)
        })
        .await;
        assert!(gone.is_empty(), "{gone:?}");
        assert!(named(&leaders, &first), "{leaders:?}");
        assert_eq!(named(&leaders, &second), !elected, "{leaders:?}");
        let first_pid = format!("-{}-", first.id().expect("running"));

        first.start_kill().expect("SIGKILL");
        first.wait().await.expect("relay exited");
        let killed = |names: &[String]| names.iter().any(|n| n.contains(&first_pid));
        let (leaders, alive, gone) = stats_until(&app, "the killed relay is gone, the other leads", |leaders, _, gone| {
            killed(gone) && named(leaders, &second) && leaders.len() == 1
        })
        .await;
        assert!(!killed(&alive), "{alive:?}");
        // Nothing is lost on the way: the survivor publishes.
        app.enqueue(&[Message::new("orders", "after the kill")], true).await;
        let mut sub = broker.subscribe("s");
        crate::outbox::receive(&mut sub, 1).await;

        // The text output says the same: the leader by name, the killed
        // relay as gone with how long since it was heard.
        let text = outbox_stats(&app, "text").await;
        assert!(text.contains(&format!("\nleader: {}\n", leaders[0])), "{text}");
        let line = text
            .lines()
            .find(|l| l.contains(&gone[0]))
            .expect("a line for the killed relay");
        assert!(line.contains("state=gone"), "{line}");
        assert!(line.contains("s ago"), "{line}");
        assert!(line.contains("heartbeat_interval=200ms"), "{line}");
        let line = text
            .lines()
            .find(|l| l.starts_with("relay: ") && l.contains(&leaders[0]))
            .expect("a line for the leader");
        assert!(line.contains("state=alive leader=true"), "{line}");

        drop(sub);
        drop(second);
        app.drop().await;
        broker.stop().await;
    }
}

backend_test! {
    async fn issue_14_pipelined_relay_keeps_each_key_in_order_across_kills(backend) {
        let broker = TestBroker::start(backend.clone()).await;
        broker.topic_and_sub("orders", "watch", |_| {}).await;
        broker.topic_and_sub("orders", "all", |_| {}).await;
        let app = Arc::new(AppDb::create(&backend).await);

        // Writers under load: keyed rows numbered per key (the counters
        // table serializes a key's writers, as an application's row would),
        // and bursts of rows without a key, which the pipeline never fences.
        let writing = Arc::new(AtomicBool::new(true));
        let keyed = Arc::new(AtomicU64::new(0));
        let loose = Arc::new(AtomicU64::new(0));
        let mut writers = Vec::new();
        for w in 0..3u64 {
            let (app, writing, keyed) = (app.clone(), writing.clone(), keyed.clone());
            writers.push(tokio::spawn(async move {
                let mut rng = Rng::new(w + 7);
                while writing.load(Ordering::Relaxed) {
                    app.next_in_key("orders", &format!("k{}", rng.below(6))).await;
                    keyed.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
        {
            let (app, writing, loose) = (app.clone(), writing.clone(), loose.clone());
            writers.push(tokio::spawn(async move {
                while writing.load(Ordering::Relaxed) {
                    let batch: Vec<Message> =
                        (0..20).map(|i| Message::new("orders", format!("free-{i}"))).collect();
                    app.enqueue(&batch, true).await;
                    loose.fetch_add(batch.len() as u64, Ordering::Relaxed);
                    tokio::time::sleep(ms(2)).await;
                }
            }));
        }

        // Each cycle: a relay with small batches (about 8 rows: the byte
        // limit), several in flight, killed
        // at a random moment after the broker stored something of it.
        let flags = [
            "--poll-interval", "20ms", "--heartbeat-interval", "100ms",
            "--max-batch-bytes", "700", "--pipeline", "6",
        ];
        let none = Arc::new(AtomicU64::new(0));
        let mut watch = broker.subscribe("watch");
        let mut rng = Rng::new(99);
        const KILLS: usize = 12;
        for _ in 0..KILLS {
            let mut relay = spawn_relay_with(&app, &broker, &flags, none.clone()).await;
            let m = tokio::time::timeout(Duration::from_secs(30), watch.next_message())
                .await
                .expect("the relay publishes")
                .expect("subscription open")
                .expect("no error");
            tokio::time::sleep(ms(rng.below(40))).await;
            relay.start_kill().expect("SIGKILL");
            relay.wait().await.expect("relay exited");
            watch.ack(vec![m.ack_id.to_string()]);
        }
        writing.store(false, Ordering::Relaxed);
        for w in writers {
            w.await.expect("writer");
        }

        // A last relay drains the outbox.
        let mut relay = spawn_relay_with(&app, &broker, &flags, none.clone()).await;
        wait_drained(&app).await;
        relay.start_kill().expect("SIGKILL");
        relay.wait().await.expect("relay exited");

        let total = keyed.load(Ordering::Relaxed) + loose.load(Ordering::Relaxed);
        assert_eq!(stored(&broker, "orders").await, total as i64, "each row stored exactly once");
        let mut all = broker.subscribe("all");
        let got = receive(&mut all, total as usize).await;
        // The order the broker stored (its sequence numbers), per key: what
        // the relay decides.
        let mut by_seq: Vec<_> = got.iter().collect();
        by_seq.sort_by_key(|m| m.message.sequence);
        let mut last: std::collections::HashMap<String, i64> = Default::default();
        let mut keyed_seen = 0;
        for m in by_seq {
            let Some(key) = m.message.key.clone().filter(|k| !k.is_empty()) else { continue };
            keyed_seen += 1;
            let n: i64 = crate::harness::payload(m).parse().expect("number");
            let prev = last.insert(key.clone(), n).unwrap_or(0);
            assert_eq!(n, prev + 1, "key {key}: {n} stored after {prev}");
        }
        assert_eq!(keyed_seen, keyed.load(Ordering::Relaxed));
        eprintln!("{total} messages ({keyed_seen} keyed), {KILLS} kills");
        drop(all);
        drop(watch);
        Arc::into_inner(app).expect("writers done").drop().await;
        broker.stop().await;
    }
}

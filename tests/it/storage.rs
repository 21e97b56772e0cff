//! SQLite storage faults (issue 11, items 9 and 11): one broker per data
//! directory, the WAL given back, the on-disk cost of a message, and a
//! full disk the broker gets out of by itself.

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use sqlx::Connection;
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection};
use tidings::client::{self, Outgoing};
use tidings::proto::{self, publisher_service_client::PublisherServiceClient};
use tidings::server;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

use crate::crash::{Broker, listening, spawn_broker_with};
use crate::harness::{Backend, TestBroker, from_earliest, test_config, wire};

const KIB: usize = 1024;

/// The size of a file, 0 if it does not exist.
fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// Messages of `size` payload bytes on `topic`, each payload distinct.
fn kib_messages(topic: &str, n: usize, size: usize) -> Vec<Outgoing> {
    (0..n)
        .map(|i| {
            let mut payload = format!("{i:08}-").into_bytes();
            payload.resize(size, b'x');
            Outgoing::new(topic, payload)
        })
        .collect()
}

/// A read-only connection to a broker's database file beside the broker.
async fn peek_db(dir: &Path) -> SqliteConnection {
    SqliteConnection::connect_with(
        &SqliteConnectOptions::new()
            .filename(dir.join("tidings.db"))
            .read_only(true),
    )
    .await
    .expect("open the database read-only")
}

// ---- item 11: one broker per data directory ----

#[tokio::test]
async fn a_second_broker_on_one_data_dir_is_refused_and_the_first_serves_on() {
    let b = TestBroker::start(Backend::Sqlite).await;
    b.topic_and_sub("t", "s", |_| {}).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let second = tokio::time::timeout(
        Duration::from_secs(30),
        server::run(listener, test_config(b.data_dir()), async {}),
    )
    .await
    .expect("the second broker gave up at once");
    let err = second.expect_err("a second broker on the same folder is refused");
    let text = err.to_string();
    assert!(
        matches!(err, tidings::Error::FailedPrecondition(_)),
        "{text}"
    );
    assert!(text.contains("another tidings broker"), "{text}");
    assert!(
        text.contains(&b.data_dir().display().to_string()),
        "names the folder: {text}"
    );
    // The first broker was not disturbed.
    assert_eq!(b.publish("t", &["still here"]).await, vec![1]);
    // And the folder is free again once it stops.
    let b = b.restart().await;
    assert_eq!(b.publish("t", &["after restart"]).await, vec![2]);
    b.stop().await;
}

#[tokio::test]
async fn a_second_tidings_serve_on_one_data_dir_exits_with_a_clear_message() {
    let dir = tempfile::tempdir().expect("temp dir");
    let first = spawn_broker_with(dir.path(), None, "127.0.0.1:0").await;
    let output = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_tidings"))
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir.path())
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the second broker exited in time")
    .expect("run tidings");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "exits non-zero: {stderr}");
    assert!(
        String::from_utf8_lossy(&output.stdout).is_empty(),
        "never says it is listening"
    );
    assert!(stderr.contains("another tidings broker"), "{stderr}");
    assert!(
        stderr.contains(&dir.path().display().to_string()),
        "names the folder: {stderr}"
    );
    let pid = first.child.id().expect("the first broker runs");
    assert!(
        stderr.contains(&format!("process {pid}")),
        "names the holder: {stderr}"
    );
    // The first broker serves on.
    let connection = client::connect(&first.url).expect("connection");
    client::Admin::new(&connection)
        .create_topic("t")
        .await
        .expect("the first broker still serves");
}

// ---- item 9a: the WAL is given back ----

#[tokio::test]
async fn the_wal_is_emptied_when_the_store_is_idle_and_at_shutdown() {
    let b = TestBroker::start(Backend::Sqlite).await;
    b.topic_and_sub("t", "s", |_| {}).await;
    let wal = b.data_dir().join("tidings.db-wal");
    // A reader holding a snapshot keeps the WAL from starting over, as a
    // slow reader does in production: a burst grows it to its full size.
    let mut reader = peek_db(b.data_dir()).await;
    sqlx::query("BEGIN").execute(&mut reader).await.unwrap();
    let _: i64 = sqlx::query_scalar("SELECT count(*) FROM topics")
        .fetch_one(&mut reader)
        .await
        .unwrap();
    let publisher = b.publisher();
    for _ in 0..8 {
        publisher
            .publish(&kib_messages("t", 512, KIB))
            .await
            .expect("publish");
    }
    let grown = file_len(&wal);
    assert!(grown >= 4 << 20, "the burst grew the WAL: {grown} bytes");
    sqlx::query("COMMIT").execute(&mut reader).await.unwrap();
    reader.close().await.unwrap();
    // Acked messages are deleted by maintenance (more writes to the WAL).
    let mut acked = 0;
    while acked < 4096 {
        let got = b.pull("s", 1000, Duration::from_secs(5)).await;
        assert!(!got.is_empty(), "everything is delivered");
        acked += got.len();
        b.ack("s", got.iter().map(|m| m.ack_id.clone()).collect())
            .await
            .expect("ack");
    }
    // Idle now: the checkpointer empties the WAL.
    let bound = 64 * 1024;
    let deadline = Instant::now() + Duration::from_secs(60);
    while file_len(&wal) > bound {
        assert!(
            Instant::now() < deadline,
            "an idle store's WAL stayed at {} bytes (it grew to {grown})",
            file_len(&wal)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // More writes, then a clean shutdown: the WAL is left empty.
    publisher
        .publish(&kib_messages("t", 512, KIB))
        .await
        .expect("publish");
    let dir = b.data_dir().to_path_buf();
    let paused = b.pause().await;
    assert!(
        file_len(&dir.join("tidings.db-wal")) <= bound,
        "a clean shutdown leaves {} bytes of WAL",
        file_len(&dir.join("tidings.db-wal"))
    );
    paused.resume().await.stop().await;
}

// ---- item 9b: what a message costs on disk ----

/// Bytes of the database's pages in use (its file size less free pages, WAL
/// included, as a reader sees it).
async fn used_bytes(dir: &Path) -> u64 {
    let mut c = peek_db(dir).await;
    let pages: i64 = sqlx::query_scalar("PRAGMA page_count")
        .fetch_one(&mut c)
        .await
        .unwrap();
    let free: i64 = sqlx::query_scalar("PRAGMA freelist_count")
        .fetch_one(&mut c)
        .await
        .unwrap();
    let size: i64 = sqlx::query_scalar("PRAGMA page_size")
        .fetch_one(&mut c)
        .await
        .unwrap();
    c.close().await.unwrap();
    ((pages - free) * size) as u64
}

#[tokio::test]
async fn a_kib_payload_costs_less_than_twice_its_size_on_disk() {
    let b = TestBroker::start(Backend::Sqlite).await;
    b.topic_and_sub("t", "s", |_| {}).await;
    let before = used_bytes(b.data_dir()).await;
    let n = 4000;
    for chunk in kib_messages("t", n, KIB).chunks(500) {
        b.publisher().publish(chunk).await.expect("publish");
    }
    let after = used_bytes(b.data_dir()).await;
    let per_message = (after - before) as f64 / n as f64;
    // Written to the stream itself: the figure is worth seeing.
    let _ = writeln!(
        std::io::stderr(),
        "{n} messages of {KIB} payload bytes: {} bytes of pages, {per_message:.0} bytes \
         per message ({:.2}x the payload)",
        after - before,
        per_message / KIB as f64
    );
    assert!(
        per_message < 2.0 * KIB as f64,
        "a 1 KiB message takes {per_message:.0} bytes on disk"
    );
    b.stop().await;
}

#[tokio::test]
async fn a_data_dir_of_the_first_schema_is_migrated_with_its_messages() {
    let b = TestBroker::start(Backend::Sqlite).await;
    b.topic_and_sub("t", "s", |_| {}).await;
    let payloads: Vec<String> = (0..300).map(|i| format!("m{i}")).collect();
    let refs: Vec<&str> = payloads.iter().map(String::as_str).collect();
    b.publish("t", &refs).await;
    let first = b.pull("s", 100, Duration::from_secs(5)).await;
    b.ack("s", first.iter().map(|m| m.ack_id.clone()).collect())
        .await
        .unwrap();
    let dir = b.data_dir().to_path_buf();
    let paused = b.pause().await;

    // Put the messages back in the first schema's table, as a broker of
    // that version left them.
    let mut c = SqliteConnection::connect_with(
        &SqliteConnectOptions::new().filename(dir.join("tidings.db")),
    )
    .await
    .unwrap();
    sqlx::raw_sql(
        "BEGIN;
         CREATE TABLE messages_v1 (
             topic_id INTEGER NOT NULL, seq INTEGER NOT NULL, id BLOB NOT NULL, key TEXT,
             payload BLOB NOT NULL, attributes BLOB, created_at INTEGER,
             published_at INTEGER NOT NULL, PRIMARY KEY (topic_id, seq)) WITHOUT ROWID;
         INSERT INTO messages_v1 SELECT topic_id, seq, id, key, payload, attributes,
             created_at, published_at FROM messages;
         DROP TABLE messages;
         ALTER TABLE messages_v1 RENAME TO messages;
         DELETE FROM tidings_migrations WHERE version > 1;
         COMMIT;",
    )
    .execute(&mut c)
    .await
    .unwrap();
    c.close().await.unwrap();

    let b = paused.resume().await;
    let mut seen = Vec::new();
    while seen.len() < 200 {
        let got = b.pull("s", 100, Duration::from_secs(5)).await;
        assert!(!got.is_empty(), "{} of 200 delivered", seen.len());
        for m in &got {
            let message = m.message.as_ref().unwrap();
            seen.push((
                message.sequence,
                String::from_utf8_lossy(&message.payload).into_owned(),
            ));
        }
        b.ack("s", got.iter().map(|m| m.ack_id.clone()).collect())
            .await
            .unwrap();
    }
    seen.sort();
    let expected: Vec<(i64, String)> = (101..=300).map(|s| (s, format!("m{}", s - 1))).collect();
    assert_eq!(seen, expected);
    assert_eq!(b.publish("t", &["next"]).await, vec![301]);
    // The broker answered, so it has migrated.
    let mut c = peek_db(&dir).await;
    let index: Option<String> = sqlx::query_scalar(
        "SELECT name FROM sqlite_master WHERE type = 'index' AND name = 'messages_by_seq'",
    )
    .fetch_optional(&mut c)
    .await
    .unwrap();
    assert!(index.is_some(), "the messages table was rebuilt");
    c.close().await.unwrap();
    b.stop().await;
}

// ---- item 9c, 9d: a full disk ----

/// A small tmpfs mounted by the test, unmounted when dropped (lazily, so a
/// broker still running cannot keep it).
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// Mounts `size` (as mount's `size=`, e.g. "24m"), or says on stderr
    /// why it could not and returns `None`.
    fn mount(size: &str) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().expect("temp dir");
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status();
        match status {
            Ok(s) if s.success() => Some(Tmpfs { dir }),
            other => {
                let _ = writeln!(
                    std::io::stderr(),
                    "skipped: cannot mount a tmpfs ({other:?}; the test needs root), \
                     so this disk-full test did not run"
                );
                None
            }
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Grows the file system to `size`, as a volume given more room.
    fn grow(&self, size: &str) {
        let status = std::process::Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(self.dir.path())
            .status()
            .expect("mount");
        assert!(status.success(), "remount to {size}: {status:?}");
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// Free bytes on the filesystem of `path`, as `df` tells.
fn free_on(path: &Path) -> usize {
    let out = std::process::Command::new("df")
        .args(["-B1", "--output=avail"])
        .arg(path)
        .output()
        .expect("run df");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .expect("df prints the free bytes")
}

/// Writes a file of `len` bytes that something other than the broker
/// keeps on its disk.
fn write_filler(path: &Path, len: usize) {
    let mut file = std::fs::File::create(path).expect("create filler");
    file.write_all(&vec![7u8; len]).expect("write filler");
    file.sync_all().expect("sync filler");
}

/// Starts the binary on `data` with a small reserve, logging to `log`.
async fn spawn_logged(data: &Path, log: &Path, reserve: u64) -> Broker {
    // The crash tests' launcher, with the logs kept in a file.
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_tidings"));
    command
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data)
        .env("TIDINGS_DISK_RESERVE", reserve.to_string())
        .args([
            "--maintenance-interval",
            "100ms",
            "--poll-interval",
            "100ms",
        ])
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)
                .expect("log file"),
        )
        .kill_on_drop(true);
    let child = command.spawn().expect("start tidings");
    listening(child).await.unwrap_or_else(|| {
        panic!(
            "the broker exited: {}",
            std::fs::read_to_string(log).unwrap_or_default()
        )
    })
}

async fn status(channel: &Channel) -> i32 {
    HealthClient::new(channel.clone())
        .check(HealthCheckRequest::default())
        .await
        .expect("health answers")
        .into_inner()
        .status
}

/// Waits (up to a minute) for health to read `want`.
async fn wait_for(channel: &Channel, want: ServingStatus) {
    let mut stream = HealthClient::new(channel.clone())
        .watch(HealthCheckRequest::default())
        .await
        .expect("health watch")
        .into_inner();
    let wait = async {
        while let Some(r) = stream.message().await.expect("health watch") {
            if r.status == want as i32 {
                return;
            }
        }
        panic!("the health watch ended");
    };
    tokio::time::timeout(Duration::from_secs(60), wait)
        .await
        .unwrap_or_else(|_| panic!("health did not turn {want:?}"));
}

/// Publishes batches of 1 KiB messages until the broker refuses with
/// RESOURCE_EXHAUSTED; records the ids of acked publishes. Returns the
/// refusal's message.
async fn publish_until_refused(
    publisher: &mut PublisherServiceClient<Channel>,
    acked: &mut HashSet<String>,
) -> String {
    for _ in 0..2000 {
        let messages: Vec<proto::Message> =
            kib_messages("t", 200, KIB).into_iter().map(wire).collect();
        let ids: Vec<String> = messages.iter().map(|m| m.id.clone()).collect();
        match publisher.publish(proto::PublishRequest { messages }).await {
            Ok(_) => acked.extend(ids),
            Err(s) if s.code() == tonic::Code::ResourceExhausted => return s.message().to_owned(),
            // The group that hit the full disk: nothing of it committed.
            Err(s) if s.code() == tonic::Code::Unavailable => {}
            Err(s) => panic!("unexpected refusal: {s:?}"),
        }
    }
    panic!("the disk never filled");
}

/// Publishes until the broker refuses, and again whenever it finds room of
/// its own (its WAL cut back once copied into the database), until it
/// stays full: health NOT_SERVING and the WAL the same size over several
/// checkpoint rounds (emptied, or holding what a database file without room
/// to grow cannot take). Returns the last refusal's message.
async fn fill_until_stably_full(
    channel: &Channel,
    publisher: &mut PublisherServiceClient<Channel>,
    acked: &mut HashSet<String>,
    wal: &Path,
) -> String {
    let rounds = Duration::from_secs(1);
    for _ in 0..20 {
        let refusal = publish_until_refused(publisher, acked).await;
        let (mut size, mut since) = (file_len(wal), Instant::now());
        while status(channel).await == ServingStatus::NotServing as i32 {
            let now = file_len(wal);
            if now != size {
                (size, since) = (now, Instant::now());
            } else if since.elapsed() >= rounds {
                return refusal;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    panic!("the broker never stayed full");
}

/// Pulls up to `max` messages of subscription "s" (waiting up to `wait`
/// for the first) and acks them; checks that the acks commit. Each call is
/// retried (at most twice) on UNAVAILABLE, as its contract says: a group
/// that ran into the full disk is refused as a whole.
async fn pull_and_ack(channel: &Channel, max: i32, wait: Duration) -> Vec<proto::Message> {
    let mut subscriber =
        proto::subscriber_service_client::SubscriberServiceClient::new(channel.clone());
    let mut attempts = 0;
    let got = loop {
        attempts += 1;
        let pulled = subscriber
            .pull(proto::PullRequest {
                subscription: "s".into(),
                max_messages: max,
                max_wait: Some(crate::harness::pb(wait)),
                ..Default::default()
            })
            .await;
        match pulled {
            Ok(r) => break r.into_inner().messages,
            Err(s) if s.code() == tonic::Code::Unavailable && attempts < 3 => {
                tokio::time::sleep(Duration::from_millis(250)).await
            }
            Err(s) => panic!("deliveries go on, the disk full or not: {s:?}"),
        }
    };
    if got.is_empty() {
        return Vec::new();
    }
    let ack_ids: Vec<String> = got.iter().map(|m| m.ack_id.clone()).collect();
    let mut attempts = 0;
    let r = loop {
        attempts += 1;
        let acked = subscriber
            .ack(proto::AckRequest {
                subscription: "s".into(),
                ack_ids: ack_ids.clone(),
            })
            .await;
        match acked {
            Ok(r) => break r.into_inner(),
            Err(s) if s.code() == tonic::Code::Unavailable && attempts < 3 => {
                tokio::time::sleep(Duration::from_millis(250)).await
            }
            Err(s) => panic!("acks go on, the disk full or not: {s:?}"),
        }
    };
    assert!(
        r.outcomes
            .iter()
            .all(|o| o.result == proto::AckResult::Ok as i32),
        "{r:?}"
    );
    got.into_iter().filter_map(|m| m.message).collect()
}

/// Pulls and acks 10 messages; records their ids.
async fn ack_some(channel: &Channel, got_ids: &mut HashSet<String>) {
    let got = pull_and_ack(channel, 10, Duration::from_secs(5)).await;
    assert_eq!(got.len(), 10);
    got_ids.extend(got.into_iter().map(|m| m.id));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_publishes_keeps_acking_and_recovers_by_itself() {
    let Some(fs) = Tmpfs::mount("40m") else {
        return;
    };
    let started = Instant::now();
    let logs = tempfile::tempdir().expect("temp dir");
    let log = logs.path().join("broker.log");
    let data: PathBuf = fs.path().join("data");
    let reserve: u64 = 4 << 20;
    let mut broker = spawn_logged(&data, &log, reserve).await;
    assert_eq!(
        file_len(&data.join("tidings.reserve")),
        reserve,
        "the reserve is made at start"
    );
    let connection = client::connect(&broker.url).expect("connection");
    let admin = client::Admin::new(&connection);
    admin.create_topic("t").await.unwrap();
    admin
        .create_subscription(from_earliest("s", "t"))
        .await
        .unwrap();
    // Something else takes a third of the disk.
    let filler = fs.path().join("filler");
    write_filler(&filler, 12 << 20);

    let mut channel = connection.channel();
    let mut publisher = PublisherServiceClient::new(channel.clone());
    let mut acked = HashSet::new();
    let mut delivered = HashSet::new();
    let wal = data.join("tidings.db-wal");
    let refusal = fill_until_stably_full(&channel, &mut publisher, &mut acked, &wal).await;
    assert!(
        refusal.contains("disk") && refusal.contains("full") && refusal.contains("data"),
        "the refusal says why: {refusal}"
    );
    // Still refused, and health says so; the reserve was given up.
    let again = publisher
        .publish(proto::PublishRequest {
            messages: vec![wire(Outgoing::new("t", "more"))],
        })
        .await
        .expect_err("publishing stays refused while the disk is full");
    assert_eq!(again.code(), tonic::Code::ResourceExhausted, "{again:?}");
    assert_eq!(status(&channel).await, ServingStatus::NotServing as i32);
    assert!(
        !data.join("tidings.reserve").exists(),
        "the reserve is given up"
    );
    ack_some(&channel, &mut delivered).await;

    // Space comes back: the broker serves again by itself.
    std::fs::remove_file(&filler).unwrap();
    wait_for(&channel, ServingStatus::Serving).await;
    let ok = publisher
        .publish(proto::PublishRequest {
            messages: kib_messages("t", 10, KIB).into_iter().map(wire).collect(),
        })
        .await
        .expect("publishing works again");
    acked.extend(ok.into_inner().results.into_iter().map(|r| r.id));
    assert_eq!(
        file_len(&data.join("tidings.reserve")),
        reserve,
        "the reserve is made again"
    );

    // Full again, and a restart while full (SIGKILL, the reserve given
    // up): the broker starts, refuses publishes, acks, and serves again
    // once space is back.
    let filler = fs.path().join("filler2");
    write_filler(
        &filler,
        (8 << 20).min(free_on(fs.path()).saturating_sub(512 << 10)),
    );
    fill_until_stably_full(&channel, &mut publisher, &mut acked, &wal).await;
    broker.child.kill().await.unwrap();
    let broker = spawn_logged(&data, &log, reserve).await;
    let connection = client::connect(&broker.url).expect("connection");
    channel = connection.channel();
    publisher = PublisherServiceClient::new(channel.clone());
    fill_until_stably_full(&channel, &mut publisher, &mut acked, &wal).await;
    let refused = publisher
        .publish(proto::PublishRequest {
            messages: vec![wire(Outgoing::new("t", "more"))],
        })
        .await
        .expect_err("a broker restarted on a full disk refuses publishes");
    assert_eq!(
        refused.code(),
        tonic::Code::ResourceExhausted,
        "{refused:?}"
    );
    ack_some(&channel, &mut delivered).await;
    // Space comes back, enough for the WAL the restart found: the volume
    // grows (removing the second filler alone frees 8 MiB at most, and
    // whether the checkpoint then fits depends on how much of the WAL the
    // killed broker had copied; refusing until it fits is right).
    std::fs::remove_file(&filler).unwrap();
    fs.grow("80m");
    wait_for(&channel, ServingStatus::Serving).await;
    let ok = publisher
        .publish(proto::PublishRequest {
            messages: vec![wire(Outgoing::new("t", "last"))],
        })
        .await
        .expect("publishing works again after the restart");
    acked.extend(ok.into_inner().results.into_iter().map(|r| r.id));

    // No acked publish was lost.
    loop {
        let got = pull_and_ack(&channel, 1000, Duration::from_millis(500)).await;
        if got.is_empty() {
            break;
        }
        delivered.extend(got.into_iter().map(|m| m.id));
    }
    let lost: Vec<&String> = acked.difference(&delivered).collect();
    assert!(lost.is_empty(), "{} acked publishes lost", lost.len());
    drop(broker);

    // The logs stayed bounded: no line per failed group or checkpoint. Each
    // of the two broker processes logs failed group commits and commits
    // after failures (two kinds) at most once, then once per 5 s, and
    // failed checkpoints once, then once per 30 s.
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let count = |needle: &str| text.lines().filter(|l| l.contains(needle)).count();
    let processes = 2;
    let allowed = |kinds: usize, every: u64| {
        processes * kinds * (1 + (started.elapsed().as_secs() / every) as usize)
    };
    assert!(
        count("the disk is full") >= 1,
        "the full disk is logged:\n{text}"
    );
    let groups = count("group commit failed;")
        + count("group commits still failing")
        + count("storage works again");
    assert!(
        groups <= allowed(2, 5),
        "{groups} lines about failed group commits:\n{text}"
    );
    let checkpoints = count("WAL checkpoint failed;");
    assert!(
        checkpoints <= allowed(1, 30),
        "{checkpoints} lines about failed checkpoints:\n{text}"
    );
    drop(fs);
}

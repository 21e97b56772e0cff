//! The real `tidings` binary: bad configuration is refused at start with a
//! clear message (never a panic in a background task later), and the client
//! commands behave as a new user needs (issue 15): no silent waits, JSON
//! output, every API verb.

use std::process::{Output, Stdio};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

use crate::harness::{Backend, TestBroker};

/// Runs `tidings` with `args` and `env`, giving it 20 seconds to exit (a
/// command that started would not).
async fn tidings(args: &[&str], env: &[(&str, &str)]) -> Output {
    let run = Command::new(env!("CARGO_BIN_EXE_tidings"))
        .args(args)
        .env_remove("TIDINGS_DATABASE_URL")
        .env_remove("TIDINGS_BROKER")
        .env_remove("TIDINGS_OUTPUT")
        .env_remove("TIDINGS_CONNECT_TIMEOUT")
        .envs(env.iter().copied())
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(Duration::from_secs(20), run)
        .await
        .expect("tidings exited instead of running")
        .expect("run tidings")
}

/// Runs `tidings serve` with `args` on a temporary data directory and port
/// 0, with `env` set.
async fn serve_with(args: &[&str], env: &[(&str, &str)]) -> Output {
    let dir = tempfile::tempdir().expect("temp dir");
    let data_dir = dir.path().to_str().expect("a UTF-8 temp dir");
    let mut all = vec!["serve", "--listen", "127.0.0.1:0", "--data-dir", data_dir];
    all.extend_from_slice(args);
    tidings(&all, env).await
}

async fn serve(args: &[&str]) -> Output {
    serve_with(args, &[]).await
}

/// Checks that the run failed, said `expected` on stderr, and did not panic.
fn refused(output: &Output, expected: &str) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "exited successfully: {stderr}");
    assert!(stderr.contains(expected), "no {expected:?} in: {stderr}");
    assert!(!stderr.contains("panicked"), "panicked: {stderr}");
    assert!(
        !String::from_utf8_lossy(&output.stdout).contains("listening"),
        "started listening"
    );
}

#[tokio::test]
async fn serve_refuses_a_zero_maintenance_interval() {
    let output = serve(&["--maintenance-interval", "0"]).await;
    refused(&output, "an interval must be longer than zero");
    refused(&output, "--maintenance-interval");
}

#[tokio::test]
async fn serve_refuses_an_absurd_duration() {
    let output = serve(&["--dedup-window", "99999999999999999999999s"]).await;
    refused(
        &output,
        "is too long; the longest accepted duration is 36500d",
    );
    let output = serve(&["--poll-interval", "99999999999999999999999s"]).await;
    refused(&output, "is too long");
}

#[tokio::test]
async fn serve_refuses_a_zero_interval_from_the_environment() {
    let output = serve_with(&[], &[("TIDINGS_KEEPALIVE_INTERVAL", "0s")]).await;
    refused(&output, "an interval must be longer than zero");
}

#[tokio::test]
async fn relay_refuses_a_zero_poll_interval() {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("sqlite://{}", dir.path().join("app.db").display());
    let args = ["relay", "--database-url", &url, "--poll-interval", "0ms"];
    let output = tidings(&args, &[]).await;
    refused(&output, "an interval must be longer than zero");
}

/// Issue 16: the relay's database bounds are flags (each with its
/// environment variable, its default in --help), checked like serve's.
#[tokio::test]
async fn relay_database_bounds_are_flags_checked_at_start() {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("sqlite://{}", dir.path().join("app.db").display());
    let relay = ["relay", "--database-url", &url, "--create-if-missing"];
    for (flag, value) in [
        ("--statement-timeout", "0s"),
        ("--operation-timeout", "0ms"),
        ("--database-connect-timeout", "0"),
    ] {
        let output = tidings(&[&relay[..], &[flag, value]].concat(), &[]).await;
        refused(&output, "an interval must be longer than zero");
        refused(&output, flag);
    }
    let absurd = [(
        "TIDINGS_RELAY_OPERATION_TIMEOUT",
        "99999999999999999999999s",
    )];
    let output = tidings(&relay, &absurd).await;
    refused(&output, "is too long");
    let output = tidings(&relay, &[("TIDINGS_RELAY_STATEMENT_TIMEOUT", "soon")]).await;
    refused(&output, "invalid value 'soon' for '--statement-timeout");

    let help = tidings(&["relay", "--help"], &[]).await;
    let help = String::from_utf8_lossy(&help.stdout);
    for shown in [
        "TIDINGS_RELAY_STATEMENT_TIMEOUT",
        "TIDINGS_RELAY_OPERATION_TIMEOUT",
        "TIDINGS_RELAY_DATABASE_CONNECT_TIMEOUT",
        "[default: 10s]",
    ] {
        assert!(help.contains(shown), "no {shown} in: {help}");
    }

    let args = [
        &["--broker", "127.0.0.1:1"][..],
        &relay,
        &[
            "--statement-timeout",
            "2s",
            "--database-connect-timeout",
            "1500ms",
        ],
    ]
    .concat();
    let (mut child, _) = first_line(&args, false, "tidings relay started").await;
    child.kill().await.expect("kill relay");
}

/// Issue 10: a database URL silently overrode a data directory. The storage
/// is one choice now, and both together are refused at start.
#[tokio::test]
async fn serve_refuses_a_data_dir_and_a_database_url_together() {
    let output = serve(&["--database-url", "postgres://postgres@127.0.0.1:1/none"]).await;
    refused(&output, "--database-url");
    refused(&output, "--data-dir");
}

/// Issue 15: a data directory that cannot be created must fail the start
/// before `listening` is printed (scripts wait for that line), and logs to a
/// pipe carry no colour codes.
#[tokio::test]
async fn serve_on_an_unusable_data_dir_never_says_listening() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"not a folder").expect("write a file");
    let data_dir = file.join("data");
    let data_dir = data_dir.to_str().expect("a UTF-8 temp dir");
    let output = tidings(
        &["serve", "--listen", "127.0.0.1:0", "--data-dir", data_dir],
        &[],
    )
    .await;
    refused(&output, data_dir);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !stderr.contains('\x1b'),
        "colour codes in a pipe: {stderr:?}"
    );
}

/// Starts `tidings` with `args` and returns the first line it prints on
/// `stdout` (or `stderr`) that contains `wanted`, within 20 seconds; the
/// child is killed when the returned handle drops.
pub(crate) async fn first_line(
    args: &[&str],
    from_stderr: bool,
    wanted: &str,
) -> (tokio::process::Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tidings"))
        .args(args)
        .env_remove("TIDINGS_DATABASE_URL")
        .env_remove("TIDINGS_BROKER")
        .env_remove("TIDINGS_OUTPUT")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start tidings");
    let reader: Box<dyn tokio::io::AsyncRead + Unpin + Send> = if from_stderr {
        Box::new(child.stderr.take().expect("stderr"))
    } else {
        Box::new(child.stdout.take().expect("stdout"))
    };
    let mut lines = BufReader::new(reader).lines();
    let line = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(line) = lines.next_line().await.expect("read the output") {
            if line.contains(wanted) {
                return line;
            }
        }
        panic!("tidings ended without printing {wanted:?}");
    })
    .await
    .expect("tidings did not print it in time");
    (child, line)
}

#[tokio::test]
async fn serve_listens_on_a_host_name() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data_dir = dir.path().to_str().expect("a UTF-8 temp dir");
    let args = ["serve", "--listen", "localhost:0", "--data-dir", data_dir];
    let (mut child, line) = first_line(&args, false, "tidings listening on").await;
    assert!(line.contains(":"), "{line}");
    child.kill().await.expect("kill serve");
}

#[tokio::test]
async fn serve_refuses_a_public_address_without_tls_and_access_control() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data_dir = dir.path().to_str().expect("a UTF-8 temp dir");
    let refusal = ["serve", "--listen", "0.0.0.0:0", "--data-dir", data_dir];
    let output = tidings(&refusal, &[]).await;
    refused(
        &output,
        "without TLS (--tls-cert, --tls-key) and access control",
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--allow-insecure"), "{stderr}");
    let args = [
        "serve",
        "--listen",
        "0.0.0.0:0",
        "--data-dir",
        data_dir,
        "--allow-insecure",
    ];
    let (mut child, line) = first_line(&args, false, "tidings listening on").await;
    assert!(line.contains("0.0.0.0:"), "{line}");
    child.kill().await.expect("kill serve");
}

#[tokio::test]
async fn admin_changes_are_audited_with_their_principal_and_tokens_come_from_the_cli() {
    let dir = tempfile::tempdir().expect("temp dir");
    let hash = |t: &str| {
        let d = ring::digest::digest(&ring::digest::SHA256, t.as_bytes());
        let hex: String = d.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        format!("sha256:{hex}")
    };
    let access = dir.path().join("access.json");
    let rules = serde_json::json!({"principals": [
        {"name": "ops", "tokens": [hash("s3cret-admin")], "admin": true},
        {"name": "reader", "tokens": [hash("s3cret-reader")], "consume": ["*"]},
    ]});
    std::fs::write(&access, rules.to_string()).expect("access file");
    let data = dir.path().join("data");
    let mut serve = Command::new(env!("CARGO_BIN_EXE_tidings"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&data)
        .arg("--access-file")
        .arg(&access)
        .env_remove("TIDINGS_DATABASE_URL")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start tidings");
    let mut lines = BufReader::new(serve.stdout.take().expect("stdout")).lines();
    let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
        .await
        .expect("listening in time")
        .expect("read")
        .expect("a line");
    let addr = line.trim_start_matches("tidings listening on ").to_owned();
    let broker = format!("http://{addr}");
    let no_token = tidings(&["--broker", &broker, "topics", "create", "orders"], &[]).await;
    let stderr = String::from_utf8_lossy(&no_token.stderr);
    assert!(
        !no_token.status.success() && stderr.contains("UNAUTHENTICATED"),
        "{stderr}"
    );
    let reader = tidings(
        &["--broker", &broker, "topics", "create", "orders"],
        &[("TIDINGS_TOKEN", "s3cret-reader")],
    )
    .await;
    let stderr = String::from_utf8_lossy(&reader.stderr);
    assert!(
        !reader.status.success() && stderr.contains("PERMISSION_DENIED"),
        "{stderr}"
    );
    let ops = tidings(
        &[
            "--broker",
            &broker,
            "--token",
            "s3cret-admin",
            "topics",
            "create",
            "orders",
        ],
        &[],
    )
    .await;
    assert!(
        ops.status.success(),
        "{}",
        String::from_utf8_lossy(&ops.stderr)
    );
    serve.kill().await.expect("kill serve");
    let mut log = String::new();
    use tokio::io::AsyncReadExt;
    serve
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut log)
        .await
        .expect("read the log");
    let change = log
        .lines()
        .find(|l| l.contains("admin change") && l.contains("create_topic"))
        .unwrap_or_else(|| panic!("no audit line for the change in: {log}"));
    assert!(
        change.contains("ops") && change.contains("orders"),
        "{change}"
    );
    assert!(
        log.lines()
            .any(|l| l.contains("admin call refused") && l.contains("CreateTopic")),
        "the refused call is audited too: {log}"
    );
    assert!(!log.contains("s3cret"), "tokens never reach the log: {log}");
}

#[tokio::test]
async fn serve_raises_the_open_file_limit_to_the_hard_limit() {
    let dir = tempfile::tempdir().expect("temp dir");
    let script = format!(
        "ulimit -Sn 256 && exec {} serve --listen 127.0.0.1:0 --data-dir {}",
        env!("CARGO_BIN_EXE_tidings"),
        dir.path().display()
    );
    let mut child = Command::new("sh")
        .args(["-c", &script])
        .env_remove("TIDINGS_DATABASE_URL")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start tidings");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
        .await
        .expect("listening in time")
        .expect("read")
        .expect("a line");
    assert!(line.contains("tidings listening on"), "{line}");
    let pid = child.id().expect("pid");
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    let files = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("an open files line");
    let numbers: Vec<&str> = files.split_whitespace().skip(3).take(2).collect();
    assert_eq!(numbers.len(), 2, "{files}");
    assert_eq!(
        numbers[0], numbers[1],
        "soft limit raised to the hard one: {files}"
    );
    assert_ne!(numbers[0], "256", "{files}");
    child.kill().await.expect("kill serve");
}

/// An address nobody listens on: a port bound and released.
fn unused_address() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    drop(listener);
    addr.to_string()
}

/// Issue 15: commands against a missing broker used to wait a minute, or
/// forever, and then not say where they had tried.
#[tokio::test]
async fn a_missing_broker_is_reported_within_the_timeout_with_its_address() {
    let addr = unused_address();
    let url = format!("http://{addr}");
    for command in [
        vec!["publish", "--topic", "orders", "hi"],
        vec!["health"],
        vec!["topics", "list"],
    ] {
        let mut args = vec!["--broker", &addr, "--connect-timeout", "2s"];
        args.extend(command.iter().copied());
        let output = tidings(&args, &[]).await;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{command:?} succeeded");
        assert!(stderr.contains(&url), "{command:?}: no {url} in {stderr}");
        assert!(
            stderr.contains("tidings serve"),
            "{command:?}: no hint in {stderr}"
        );
    }
    // A subscription keeps trying, but says so.
    let args = [
        "--broker",
        &url,
        "--connect-timeout",
        "2s",
        "subscribe",
        "s",
    ];
    let (mut child, line) = first_line(&args, true, "reconnecting to").await;
    assert!(line.contains(&url), "{line}");
    child.kill().await.expect("kill subscribe");
}

#[tokio::test]
async fn broker_urls_without_a_scheme_work_and_unknown_schemes_are_refused() {
    let broker = TestBroker::start(Backend::Sqlite).await;
    let bare = broker.url.trim_start_matches("http://").to_owned();
    let output = tidings(&["--broker", &bare, "health"], &[]).await;
    assert!(output.status.success(), "{output:?}");
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "SERVING");
    // https:// means TLS: against a plain-text broker it fails rather than
    // quietly speaking plain text.
    let https = format!("https://{bare}");
    let output = tidings(&["--broker", &https, "health"], &[]).await;
    refused(&output, &https);
    let grpc = format!("grpc://{bare}");
    let output = tidings(&["--broker", &grpc, "health"], &[]).await;
    refused(&output, &format!("use http://{bare}"));
    broker.stop().await;
}

/// Runs a client command against `broker`, expecting success; returns its
/// standard output.
async fn ok(broker: &TestBroker, args: &[&str]) -> String {
    let mut all = vec!["--broker", broker.url.as_str()];
    all.extend_from_slice(args);
    let output = tidings(&all, &[]).await;
    assert!(
        output.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Runs a client command with `--output json` and parses each line.
async fn json(broker: &TestBroker, args: &[&str]) -> Vec<serde_json::Value> {
    let mut all = vec!["--output", "json"];
    all.extend_from_slice(args);
    let stdout = ok(broker, &all).await;
    let values: Vec<serde_json::Value> = stdout
        .lines()
        .map(|line| {
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{args:?}: {e}: {line:?}"))
        })
        .collect();
    assert!(!values.is_empty(), "{args:?} printed nothing");
    values
}

#[tokio::test]
async fn every_printing_command_prints_json() {
    let broker = TestBroker::start(Backend::Sqlite).await;
    let b = &broker;
    let t = &json(b, &["topics", "create", "orders", "--retention", "10m"]).await[0];
    assert_eq!(t["name"], "orders");
    assert_eq!(t["retention"], "600s");
    assert!(
        t["createTime"].as_str().is_some_and(|s| s.ends_with('Z')),
        "{t}"
    );
    let s = &json(
        b,
        &[
            "subscriptions",
            "create",
            "billing",
            "--topic",
            "orders",
            "--start",
            "earliest",
        ],
    )
    .await[0];
    assert_eq!(s["ackDeadline"], "30s");
    assert_eq!(s["maxAttempts"], 10);
    let r = &json(
        b,
        &[
            "publish",
            "--topic",
            "orders",
            "--key",
            "k1",
            "--attribute",
            "a=1",
            "--attribute",
            "b=x=y",
            "hello",
        ],
    )
    .await[0];
    assert_eq!(r["results"][0]["sequence"], 1);
    let m = &json(b, &["subscribe", "billing", "--max", "1", "--no-ack"]).await[0];
    assert_eq!(m["message"]["payloadText"], "hello");
    assert_eq!(m["message"]["payload"], "aGVsbG8=");
    assert_eq!(m["message"]["key"], "k1");
    assert_eq!(m["message"]["attributes"]["a"], "1");
    assert_eq!(m["message"]["attributes"]["b"], "x=y");
    assert_eq!(m["attempt"], 1);
    let p = &json(b, &["peek", "billing"]).await[0];
    assert_eq!(p["messages"][0]["message"]["payloadText"], "hello");
    assert_eq!(p["messages"][0]["state"], "MESSAGE_STATE_READY");
    assert_eq!(p["messages"][0]["attempts"], 0);
    json(b, &["topics", "list"]).await;
    json(b, &["topics", "get", "orders"]).await;
    json(b, &["subscriptions", "list"]).await;
    json(b, &["subscriptions", "get", "billing"]).await;
    let st = &json(b, &["stats", "billing"]).await[0];
    assert_eq!(st["subscription"], "billing");
    json(b, &["subscriptions", "stats", "billing"]).await;
    let d = &json(b, &["dead-letters", "list", "billing"]).await[0];
    assert_eq!(d["deadLetters"], serde_json::json!([]));
    json(b, &["dead-letters", "redrive", "billing"]).await;
    json(b, &["dead-letters", "purge", "billing", "--all"]).await;
    let h = &json(b, &["health"]).await[0];
    assert_eq!(h["status"], "SERVING");
    let seek = &json(b, &["subscriptions", "seek", "billing", "--sequence", "1"]).await[0];
    assert_eq!(seek["nextSequence"], 1);
    broker.stop().await;
}

#[tokio::test]
async fn create_if_not_exists_succeeds_twice() {
    let broker = TestBroker::start(Backend::Sqlite).await;
    let b = &broker;
    for _ in 0..2 {
        ok(b, &["topics", "create", "orders", "--if-not-exists"]).await;
        let args = [
            "subscriptions",
            "create",
            "billing",
            "--topic",
            "orders",
            "--if-not-exists",
        ];
        ok(b, &args).await;
    }
    let output = tidings(
        &["--broker", &broker.url, "topics", "create", "orders"],
        &[],
    )
    .await;
    refused(&output, "orders");
    broker.stop().await;
}

#[tokio::test]
async fn updates_change_only_the_settings_given() {
    let broker = TestBroker::start(Backend::Sqlite).await;
    let b = &broker;
    ok(b, &["topics", "create", "orders"]).await;
    ok(b, &["topics", "create", "dead"]).await;
    let t = &json(b, &["topics", "update", "orders", "--max-age", "2h"]).await[0];
    assert_eq!(t["maxAge"], "7200s");
    assert_eq!(t["retention"], "0s");
    let text = ok(b, &["topics", "get", "orders"]).await;
    assert!(text.contains("max_age: 2h"), "{text}");
    assert!(text.contains("retention: none"), "{text}");
    ok(
        b,
        &[
            "subscriptions",
            "create",
            "billing",
            "--topic",
            "orders",
            "--ack-deadline",
            "10m",
        ],
    )
    .await;
    let s = &json(
        b,
        &["subscriptions", "update", "billing", "--max-attempts", "3"],
    )
    .await[0];
    assert_eq!(s["maxAttempts"], 3);
    assert_eq!(s["ackDeadline"], "600s");
    let s = &json(
        b,
        &[
            "subscriptions",
            "update",
            "billing",
            "--ordered",
            "true",
            "--dead-letter-topic",
            "dead",
        ],
    )
    .await[0];
    assert_eq!(s["ordered"], true);
    assert_eq!(s["deadLetterTopic"], "dead");
    assert_eq!(s["maxAttempts"], 3);
    let s = &json(
        b,
        &[
            "subscriptions",
            "update",
            "billing",
            "--no-dead-letter-topic",
        ],
    )
    .await[0];
    assert_eq!(s["deadLetterTopic"], "");
    let text = ok(b, &["subscriptions", "get", "billing"]).await;
    assert!(text.contains("ack_deadline: 10m"), "{text}");
    // The broker's complaint names the flag, not the API field.
    let args = [
        "--broker",
        &broker.url,
        "subscriptions",
        "update",
        "billing",
        "--max-attempts",
        "0",
    ];
    refused(&tidings(&args, &[]).await, "--max-attempts");
    let text = ok(b, &["dead-letters", "list", "billing"]).await;
    assert_eq!(text.trim(), "no dead letters");
    let text = ok(
        b,
        &[
            "subscriptions",
            "seek",
            "billing",
            "--time",
            "2000-01-01T00:00:00Z",
        ],
    )
    .await;
    assert!(text.contains("delivers from sequence 1"), "{text}");
    broker.stop().await;
}

/// Issue 15: a mistyped SQLite path made a new empty database and relayed
/// nothing, forever.
#[tokio::test]
async fn relay_refuses_a_missing_sqlite_file_unless_told_to_create_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("missing.db");
    let url = format!("sqlite://{}", path.display());
    let output = tidings(&["relay", "--database-url", &url], &[]).await;
    refused(&output, &path.display().to_string());
    refused(&output, "--create-if-missing");
    assert!(
        !path.exists(),
        "the refused relay created {}",
        path.display()
    );
    let output = tidings(&["stats", "--outbox", &url], &[]).await;
    refused(&output, &path.display().to_string());
    let args = [
        "--broker",
        "127.0.0.1:1",
        "relay",
        "--database-url",
        &url,
        "--create-if-missing",
    ];
    let (mut child, _) = first_line(&args, false, "tidings relay started").await;
    child.kill().await.expect("kill relay");
    assert!(path.exists());
}

/// `subscribe --max N` leases only what it shows, and what it shows with
/// `--no-ack` (or leases beyond N) goes back without counting an attempt:
/// with max_attempts 1, looking at a message twice never dead-letters it.
#[tokio::test]
async fn peek_shows_waiting_messages_and_changes_no_counter() {
    let broker = TestBroker::start(Backend::Sqlite).await;
    let b = &broker;
    b.topic_and_sub("orders", "billing", |s| s.max_attempts = 1)
        .await;
    b.publish("orders", &["first", "second", "third"]).await;
    let before = b.stats("billing").await;
    for _ in 0..3 {
        let text = ok(b, &["peek", "billing", "--max", "2"]).await;
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(lines[0].starts_with("seq=1\t"), "{text}");
        assert!(lines[0].contains("state=new\tattempts=0\tfirst"), "{text}");
        assert!(lines[1].contains("second"), "{text}");
    }
    let after = b.stats("billing").await;
    let counters = |s: &tidings::model::SubscriptionStats| {
        (
            s.backlog,
            s.in_flight,
            s.delivered,
            s.acked,
            s.redelivered,
            s.dead_lettered,
        )
    };
    assert_eq!(
        counters(&before),
        counters(&after),
        "peek changes no counter"
    );
    // Still first in line, on its first attempt: with max_attempts 1, a
    // counted look would have dead-lettered it.
    let shown = json(b, &["subscribe", "billing", "--max", "1"]).await;
    assert_eq!(shown[0]["attempt"], 1);
    assert_eq!(shown[0]["message"]["payloadText"], "first");
    let text = ok(b, &["peek", "billing"]).await;
    assert!(text.starts_with("seq=2\t"), "{text}");
    b.topic_and_sub("other", "idle", |_| {}).await;
    assert_eq!(ok(b, &["peek", "idle"]).await.trim(), "no messages waiting");
    broker.stop().await;
}

#[tokio::test]
async fn top_shows_rates_backlog_and_oldest_age() {
    let broker = TestBroker::start(Backend::Sqlite).await;
    let b = &broker;
    b.topic_and_sub("orders", "billing", |_| {}).await;
    b.publish("orders", &["a", "b", "c"]).await;
    // Publishes land between the first and the second refresh.
    let publisher = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        b.publish("orders", &["d", "e"]).await;
    };
    let (frames, ()) = tokio::join!(
        json(b, &["top", "--interval", "700ms", "--iterations", "2"]),
        publisher
    );
    assert_eq!(frames.len(), 2, "{frames:?}");
    let (first, second) = (&frames[0], &frames[1]);
    assert_eq!(first["topics"][0]["name"], "orders");
    assert_eq!(first["topics"][0]["lastSequence"], 3);
    assert!(
        first["topics"][0]["publishRate"].is_null(),
        "no rate on the first refresh"
    );
    assert_eq!(second["topics"][0]["lastSequence"], 5);
    let rate = second["topics"][0]["publishRate"].as_f64().expect("a rate");
    assert!(rate > 0.0, "{second}");
    let sub = &second["subscriptions"][0];
    assert_eq!(sub["name"], "billing");
    assert_eq!(sub["backlog"], 5);
    assert_eq!(sub["ackRate"], 0.0);
    assert!(
        sub["oldestUnackedAge"]
            .as_str()
            .is_some_and(|s| s.ends_with('s')),
        "{sub}"
    );

    let text = ok(b, &["top", "--interval", "100ms", "--iterations", "1"]).await;
    assert!(text.contains("SUBSCRIPTION"), "{text}");
    let row = text
        .lines()
        .find(|l| l.starts_with("billing"))
        .expect("a billing row");
    assert!(row.split_whitespace().any(|w| w == "5"), "backlog 5: {row}");
    assert!(
        !text.contains('\x1b'),
        "no terminal codes off a terminal: {text:?}"
    );
    broker.stop().await;
}

#[tokio::test]
async fn subscribe_gives_back_what_it_does_not_ack() {
    let broker = TestBroker::start(Backend::Sqlite).await;
    let b = &broker;
    b.topic_and_sub("orders", "billing", |s| s.max_attempts = 1)
        .await;
    let payloads: Vec<String> = (0..20).map(|i| format!("m{i}")).collect();
    let refs: Vec<&str> = payloads.iter().map(String::as_str).collect();
    b.publish("orders", &refs).await;
    for _ in 0..2 {
        let shown = json(b, &["subscribe", "billing", "--max", "3", "--no-ack"]).await;
        assert_eq!(shown.len(), 3);
        assert!(shown.iter().all(|m| m["attempt"] == 1), "{shown:?}");
        let stats = b.stats("billing").await;
        assert_eq!(
            (stats.backlog, stats.in_flight, stats.dead_lettered),
            (20, 0, 0),
            "nothing held, nothing dead-lettered: {stats:?}"
        );
    }
    let acked = json(b, &["subscribe", "billing", "--max", "5"]).await;
    assert_eq!(acked.len(), 5);
    let stats = b.stats("billing").await;
    assert_eq!(
        (stats.backlog, stats.in_flight, stats.dead_lettered),
        (15, 0, 0),
        "{stats:?}"
    );
    broker.stop().await;
}

#[tokio::test]
async fn serve_refuses_a_message_limit_over_the_request_limit() {
    let output = serve(&[
        "--max-message-bytes",
        "2000000",
        "--max-request-bytes",
        "1000000",
    ])
    .await;
    refused(
        &output,
        "max_message_bytes (2000000) does not fit in max_request_bytes (1000000)",
    );
}

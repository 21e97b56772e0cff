//! The real `tidings` binary given bad configuration: it must refuse it at
//! start with a clear message, never panic in a background task later.

use std::process::Output;
use std::time::Duration;

use tokio::process::Command;

/// Runs `tidings` with `args` and `env`, giving it 20 seconds to exit (a
/// command that started would not).
async fn tidings(args: &[&str], env: &[(&str, &str)]) -> Output {
    let run = Command::new(env!("CARGO_BIN_EXE_tidings"))
        .args(args)
        .env_remove("TIDINGS_DATABASE_URL")
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

/// Issue 10: a database URL silently overrode a data directory. The storage
/// is one choice now, and both together are refused at start.
#[tokio::test]
async fn serve_refuses_a_data_dir_and_a_database_url_together() {
    let output = serve(&["--database-url", "postgres://postgres@127.0.0.1:1/none"]).await;
    refused(&output, "--database-url");
    refused(&output, "--data-dir");
}

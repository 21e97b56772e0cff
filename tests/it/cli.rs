//! The real `tidings` binary given bad configuration: it must refuse it at
//! start with a clear message, never panic in a background task later.

use std::process::Output;
use std::time::Duration;

use tokio::process::Command;

/// Runs `tidings serve` with `args` on a temporary data directory and port
/// 0, giving it 20 seconds to exit (a broker that started would not).
async fn serve(args: &[&str]) -> Output {
    let dir = tempfile::tempdir().expect("temp dir");
    let run = Command::new(env!("CARGO_BIN_EXE_tidings"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .args(args)
        .env_remove("TIDINGS_DATABASE_URL")
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(Duration::from_secs(20), run)
        .await
        .expect("tidings serve exited instead of running")
        .expect("run tidings")
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
    let dir = tempfile::tempdir().expect("temp dir");
    let output = Command::new(env!("CARGO_BIN_EXE_tidings"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .env("TIDINGS_KEEPALIVE_INTERVAL", "0s")
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(20), output)
        .await
        .expect("tidings serve exited")
        .expect("run tidings");
    refused(&output, "an interval must be longer than zero");
}

#[tokio::test]
async fn relay_refuses_a_zero_poll_interval() {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("sqlite://{}", dir.path().join("app.db").display());
    let output = Command::new(env!("CARGO_BIN_EXE_tidings"))
        .args(["relay", "--database-url", &url, "--poll-interval", "0ms"])
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(20), output)
        .await
        .expect("tidings relay exited")
        .expect("run tidings");
    refused(&output, "an interval must be longer than zero");
}

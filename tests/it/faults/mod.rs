//! The fault-injection suite (issue 11): the real `tidings` binary under
//! concurrent publish and consume load while faults are injected: SIGKILL
//! and SIGSTOP, a full disk, PostgreSQL connections terminated and refused,
//! and cut links between client and broker and between broker and
//! PostgreSQL. Every scenario records a [`checker::History`], heals every
//! fault, drains what the broker kept and checks that nothing confirmed was
//! lost, nothing unpublished appeared and no confirmed ack was undone.
//!
//! `cargo test` runs the short form. `scripts/faults.sh` runs the long form
//! through the same tests, with these environment variables:
//!
//! - `TIDINGS_FAULTS_CYCLES`: fault cycles per scenario (default 4);
//! - `TIDINGS_FAULTS_SECONDS`: the longest one fault lasts, in seconds
//!   (default 1); each lasts a random span up to it;
//! - `TIDINGS_FAULTS_SEED`: the seed of the random choices (default: from
//!   the clock; each scenario prints the one it used).

mod broker;
mod checker;
mod disk;
mod load;
mod network;
mod postgres;
mod process;

use std::sync::Arc;
use std::time::Duration;

use tempfile::TempDir;
use tokio::time::{Instant, sleep};

use self::broker::Storage;
use self::checker::{History, Summary};
use self::load::{Load, LoadConfig};
use crate::harness::{Backend, Rng, drop_database, fresh_database, ms};

/// How long a scenario waits for anything before it declares it hung: far
/// above every bound the broker and the load set, so only a hang fails it.
pub(crate) const PATIENCE: Duration = Duration::from_secs(20);

/// The length of a run, from the environment.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Params {
    /// Fault cycles per scenario.
    pub(crate) cycles: u32,
    /// The longest one fault lasts.
    pub(crate) fault_max: Duration,
    /// The seed of the run's random choices.
    pub(crate) seed: u64,
}

impl Params {
    /// Reads `TIDINGS_FAULTS_CYCLES`, `TIDINGS_FAULTS_SECONDS` and
    /// `TIDINGS_FAULTS_SEED`.
    pub(crate) fn from_env() -> Params {
        fn var<T: std::str::FromStr>(name: &str) -> Option<T> {
            let text = std::env::var(name).ok()?;
            match text.trim().parse() {
                Ok(v) => Some(v),
                Err(_) => panic!("{name}={text:?} is not a number"),
            }
        }
        let seconds: f64 = var("TIDINGS_FAULTS_SECONDS").unwrap_or(1.0);
        assert!(
            (0.01..=3600.0).contains(&seconds),
            "TIDINGS_FAULTS_SECONDS out of range"
        );
        let seed = var("TIDINGS_FAULTS_SEED").unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        });
        Params {
            cycles: var("TIDINGS_FAULTS_CYCLES").unwrap_or(4),
            fault_max: Duration::from_secs_f64(seconds),
            seed,
        }
    }
}

/// Fresh storage for one scenario: a temporary SQLite folder, or a fresh
/// PostgreSQL database that [`Fresh::remove`] drops.
pub(crate) struct Fresh {
    storage: Storage,
    /// The admin URL and the database's name, on PostgreSQL.
    database: Option<(String, String)>,
    _dir: TempDir,
}

impl Fresh {
    /// Makes the storage for `backend`.
    pub(crate) async fn new(backend: &Backend) -> Fresh {
        let dir = tempfile::tempdir().expect("a temporary folder");
        let (storage, database) = match backend {
            Backend::Sqlite => (Storage::Dir(dir.path().join("data")), None),
            Backend::Postgres(admin) => {
                let (url, name) = fresh_database(admin).await;
                (Storage::Postgres(url), Some((admin.clone(), name)))
            }
        };
        Fresh {
            storage,
            database,
            _dir: dir,
        }
    }

    /// Where the broker keeps its messages.
    pub(crate) fn storage(&self) -> Storage {
        self.storage.clone()
    }

    /// The name of the PostgreSQL database, if any.
    pub(crate) fn database_name(&self) -> Option<String> {
        self.database.as_ref().map(|(_, name)| name.clone())
    }

    /// Drops the PostgreSQL database, if any.
    pub(crate) async fn remove(self) {
        if let Some((admin, name)) = &self.database {
            drop_database(admin, name).await;
        }
    }
}

/// The admin URL of the PostgreSQL server for the scenarios that need one,
/// or `None` (the test is skipped, except under CI).
pub(crate) fn postgres_admin_url() -> Option<String> {
    match Backend::postgres()? {
        Backend::Postgres(admin) => Some(admin),
        Backend::Sqlite => None,
    }
}

/// The name of a backend in a scenario's report.
pub(crate) fn label(backend: &Backend) -> &'static str {
    match backend {
        Backend::Sqlite => "SQLite",
        Backend::Postgres(_) => "PostgreSQL",
    }
}

/// One scenario's run: the load, its history, and the random choices of
/// the faults.
pub(crate) struct Run {
    name: String,
    params: Params,
    rng: Rng,
    history: Arc<History>,
    load: Load,
    started: Instant,
    /// Fault cycles begun.
    cycles: u32,
}

impl Run {
    /// Starts the load through `url` and waits until it publishes and
    /// consumes.
    pub(crate) async fn start(name: &str, url: &str, params: Params, config: LoadConfig) -> Run {
        let history = Arc::new(History::default());
        let load = Load::start(url, config, history.clone()).await;
        let going = load
            .wait_for(PATIENCE, |p| p.confirmed > 0 && p.delivered > 0)
            .await;
        assert!(going, "{name}: the load did not get going");
        Run {
            name: name.to_owned(),
            params,
            rng: Rng::new(params.seed),
            history,
            load,
            started: Instant::now(),
            cycles: 0,
        }
    }

    /// The load, to wait on its progress.
    pub(crate) fn load(&self) -> &Load {
        &self.load
    }

    /// How long the next fault lasts: a random span from a quarter of the
    /// longest to the longest.
    pub(crate) fn fault_span(&mut self) -> Duration {
        let max = self.params.fault_max.as_millis() as u64;
        ms(max / 4 + self.rng.below(max - max / 4 + 1))
    }

    /// Begins a fault cycle: lets the load run unharmed for a random while
    /// first. The wait paces the faults; no check depends on it.
    pub(crate) async fn next_cycle(&mut self) {
        self.cycles += 1;
        sleep(ms(200 + self.rng.below(400))).await;
    }

    /// Waits until, with every fault healed, publishes are confirmed and
    /// messages delivered again.
    pub(crate) async fn recovered(&self) {
        let now = *self.load.progress().borrow();
        let back = self
            .load
            .wait_for(PATIENCE, |p| {
                p.confirmed > now.confirmed && p.delivered > now.delivered
            })
            .await;
        assert!(
            back,
            "{}: the broker did not recover within {PATIENCE:?} after the faults were healed",
            self.name
        );
    }

    /// Stops the load, drains what the broker kept through `url` (every
    /// fault healed), prints the summary and fails the test if the broker
    /// broke a promise.
    pub(crate) async fn finish(self, url: &str) -> Summary {
        let faulted = self.started.elapsed();
        self.load.stop().await;
        load::drain(url, &self.history).await;
        let summary = self.history.summary();
        println!(
            "{}: {} cycles over {:.1?} (longest fault {:?}, seed {}), {:.1?} in all\n{summary}",
            self.name,
            self.cycles,
            faulted,
            self.params.fault_max,
            self.params.seed,
            self.started.elapsed(),
        );
        summary.assert_valid(&self.name);
        assert!(
            summary.confirmed > 0,
            "{}: nothing was confirmed",
            self.name
        );
        summary
    }
}

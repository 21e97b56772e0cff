//! The real `tidings serve` as a child process that the fault scenarios
//! kill, stop and restart on the same address and storage.

use std::path::{Path, PathBuf};

use tokio::process::Child;

/// Where a broker keeps its messages.
#[derive(Debug, Clone)]
pub(crate) enum Storage {
    /// A SQLite data directory.
    Dir(PathBuf),
    /// A PostgreSQL URL.
    Postgres(String),
}

/// A `tidings serve` child process. Dropping it kills the process.
#[derive(Debug)]
pub(crate) struct BrokerProcess {
    child: Child,
    storage: Storage,
    /// Flags added to every start.
    extra: Vec<String>,
    /// The address it listens on, the same after every restart.
    addr: String,
    /// Starts so far (the first included).
    pub(crate) starts: u32,
}

impl BrokerProcess {
    /// Starts the broker on `storage` on a free port of 127.0.0.1, with the
    /// test's short intervals and `extra` flags.
    pub(crate) async fn start(storage: Storage, extra: &[&str]) -> BrokerProcess {
        let extra: Vec<String> = extra.iter().map(|s| (*s).to_owned()).collect();
        let (child, addr) = spawn(&storage, &extra, "127.0.0.1:0").await;
        BrokerProcess {
            child,
            storage,
            extra,
            addr,
            starts: 1,
        }
    }

    /// The URL clients use to reach it.
    pub(crate) fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Its listening address.
    pub(crate) fn addr(&self) -> std::net::SocketAddr {
        self.addr.parse().expect("a numeric address")
    }

    /// Kills it with SIGKILL and waits until it is gone.
    pub(crate) async fn kill(&mut self) {
        if self.exited().is_some() {
            return;
        }
        // Resume it first in case it is stopped: a stopped process dies of
        // SIGKILL too, but only a running one closes its sockets promptly.
        self.signal("CONT");
        self.child.kill().await.expect("SIGKILL the broker");
    }

    /// Starts it again on the same storage and address (after [`kill`] or
    /// after it exited by itself).
    ///
    /// [`kill`]: BrokerProcess::kill
    pub(crate) async fn restart(&mut self) {
        let _ = self.child.kill().await;
        let (child, addr) = spawn(&self.storage, &self.extra, &self.addr).await;
        assert_eq!(addr, self.addr, "restarted on its address");
        self.child = child;
        self.starts += 1;
    }

    /// Whether the process has exited by itself, and how.
    pub(crate) fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().expect("poll the broker process")
    }

    /// Sends SIGSTOP: the process freezes, its sockets stay open.
    pub(crate) fn freeze(&self) {
        self.signal("STOP");
    }

    /// Sends SIGCONT after [`freeze`](BrokerProcess::freeze).
    pub(crate) fn thaw(&self) {
        self.signal("CONT");
    }

    /// Sends a signal by name with kill(1): the crate forbids the unsafe
    /// code a direct call to kill(2) would take.
    fn signal(&self, name: &str) {
        let Some(pid) = self.child.id() else {
            return;
        };
        let status = std::process::Command::new("kill")
            .arg(format!("-{name}"))
            .arg(pid.to_string())
            .status()
            .expect("run kill(1)");
        assert!(status.success(), "kill -{name} {pid} failed");
    }
}

/// Starts `tidings serve` listening on `listen`; returns the child and the
/// address it announced once its store was open.
async fn spawn(storage: &Storage, extra: &[String], listen: &str) -> (Child, String) {
    let (dir, url) = match storage {
        Storage::Dir(dir) => (dir.as_path(), None),
        // The folder is not used with a database URL.
        Storage::Postgres(url) => (Path::new(""), Some(url.as_str())),
    };
    let broker = crate::crash::spawn_broker_args(dir, url, listen, extra).await;
    let addr = broker
        .url
        .strip_prefix("http://")
        .expect("an http URL")
        .to_owned();
    (broker.child, addr)
}

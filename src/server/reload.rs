//! Settings read from files and read again when the files change: the TLS
//! certificate (rotated by cert-manager and the like) and the access file.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use crate::error::Result;

/// A value read from `paths`, read again by [`Reloading::reload_if_changed`]
/// once one of their modification times changed. A change that does not
/// load (a file half written, a key that does not match its certificate)
/// keeps the value in force, and is logged once.
pub(crate) struct Reloading<T> {
    what: &'static str,
    paths: Vec<PathBuf>,
    read: Box<dyn Fn() -> Result<T> + Send + Sync>,
    current: RwLock<(Arc<T>, Vec<Option<SystemTime>>)>,
}

impl<T> std::fmt::Debug for Reloading<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloading")
            .field("what", &self.what)
            .field("paths", &self.paths)
            .finish_non_exhaustive()
    }
}

impl<T> Reloading<T> {
    /// Reads the value now; `what` names it in the log.
    ///
    /// Fails as `read` does.
    pub(crate) fn new(
        what: &'static str,
        paths: Vec<PathBuf>,
        read: impl Fn() -> Result<T> + Send + Sync + 'static,
    ) -> Result<Reloading<T>> {
        let stamps = stamps(&paths);
        let value = read()?;
        Ok(Reloading {
            what,
            paths,
            read: Box::new(read),
            current: RwLock::new((Arc::new(value), stamps)),
        })
    }

    /// The value in force.
    pub(crate) fn get(&self) -> Arc<T> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .0
            .clone()
    }

    /// Reads the value again if a file changed since it was read.
    pub(crate) fn reload_if_changed(&self) {
        let now = stamps(&self.paths);
        if self.current.read().unwrap_or_else(|e| e.into_inner()).1 == now {
            return;
        }
        let read = (self.read)();
        let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
        // The stamps are remembered either way, so that the same bad files
        // are logged once.
        current.1 = now;
        match read {
            Ok(value) => {
                current.0 = Arc::new(value);
                tracing::info!(what = self.what, files = ?self.paths, "changed: the new version is in force");
            }
            Err(e) => tracing::error!(
                what = self.what,
                error = %e,
                "changed but does not load; the previous version stays in force"
            ),
        }
    }
}

/// Modification times of `paths` (`None` for one that cannot be read).
fn stamps(paths: &[PathBuf]) -> Vec<Option<SystemTime>> {
    paths
        .iter()
        .map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
        .collect()
}

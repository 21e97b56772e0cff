//! What the SQLite store keeps in its data directory besides the database:
//! the lock that makes one broker its owner (`tidings.lock`), and the disk
//! reserve (`tidings.reserve`) with the watch on free space that decides
//! when the disk counts as full.
//!
//! A full disk must not wedge the broker: acks, deletions and checkpoints
//! need a little space to free more. So the store holds a reserve file and
//! gives it up when the disk fills; while the disk is full it refuses
//! publishes (`ResourceExhausted`) but keeps acking, deleting and
//! checkpointing, and health reads NOT_SERVING. Once space is back it makes
//! the reserve again and publishes are accepted, without a restart.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use crate::error::{Error, Result};

/// The file whose exclusive lock a broker holds while it owns the folder.
pub(super) const LOCK_FILE: &str = "tidings.lock";
/// The file holding the disk reserve.
pub(super) const RESERVE_FILE: &str = "tidings.reserve";

/// Below this many free bytes the disk counts as full.
pub(super) const LOW_SPACE: u64 = 1 << 20;

/// The exclusive advisory lock (`flock`) on a data directory's
/// [`LOCK_FILE`], held from open until the store's writer is gone: a second
/// broker, in another process or in this one, is refused at open. The
/// operating system releases it when the process ends, however it ends.
#[derive(Debug)]
pub(super) struct DirLock {
    _file: File,
}

impl DirLock {
    /// Takes the lock of `dir`, which must exist.
    ///
    /// Fails with `FailedPrecondition` naming the folder if another broker
    /// holds it, `Unavailable` if the lock file cannot be opened.
    pub(super) fn take(dir: &Path) -> Result<DirLock> {
        let path = dir.join(LOCK_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| {
                Error::Unavailable(format!("cannot open the lock file {}: {e}", path.display()))
            })?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = match holder.trim() {
                    pid if !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()) => {
                        format!(" (process {pid})")
                    }
                    _ => String::new(),
                };
                return Err(Error::FailedPrecondition(format!(
                    "the data directory {} is in use by another tidings broker{holder}, which \
                     holds the lock on {}; two brokers on one SQLite folder would corrupt \
                     delivery: stop the other broker or give this one another --data-dir",
                    dir.display(),
                    path.display()
                )));
            }
            Err(TryLockError::Error(e)) => {
                return Err(Error::Unavailable(format!(
                    "cannot lock {}: {e}",
                    path.display()
                )));
            }
        }
        // The holder's process id, for the message a second broker prints.
        // Only informative: a full disk may refuse it.
        if file.set_len(0).is_ok() {
            let _ = writeln!(file, "{}", std::process::id());
        }
        Ok(DirLock { _file: file })
    }
}

/// How long a broker opening a folder waits for the lock of one that is
/// stopping: a broker restarted at once, in the same process or by a
/// supervisor, may find the lock still held for a moment, since a process
/// being spawned anywhere in the old broker's process keeps a copy of every
/// descriptor (the lock file's too) until it starts its program.
pub(super) const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

impl DirLock {
    /// [`DirLock::take`], trying again for up to `wait` while another broker
    /// holds the lock.
    pub(super) async fn take_within(dir: &Path, wait: std::time::Duration) -> Result<DirLock> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match DirLock::take(dir) {
                Err(Error::FailedPrecondition(_)) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
                taken => return taken,
            }
        }
    }
}

/// Free bytes on the filesystem holding `dir` for an unprivileged writer;
/// `None` if the system cannot tell.
fn free_bytes(dir: &Path) -> Option<u64> {
    #[cfg(unix)]
    {
        rustix::fs::statvfs(dir)
            .ok()
            .map(|s| s.f_bavail.saturating_mul(s.f_frsize))
    }
    #[cfg(not(unix))]
    {
        let _ = dir;
        None
    }
}

/// What to do about disk space, decided from measurements alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Plan {
    /// The disk counts as full: publishes are refused.
    pub(super) full: bool,
    /// Give the reserve up now.
    pub(super) release: bool,
    /// Make the reserve (again).
    pub(super) create: bool,
}

/// Decides, from the state (`full`, reserve `held`) and the measurements
/// (`free` bytes on the filesystem; whether the next checkpoint `fits`, that
/// is, can grow the database file and leave the floor free), whether the
/// disk counts as full and what becomes of a reserve of `reserve` bytes.
///
/// While the reserve is held, the disk turns full only below
/// [`LOW_SPACE`] free (or when a checkpoint does not fit), and then the
/// reserve is given up. Without the reserve (given up, or never made), the
/// disk counts as full unless there is room: the checkpoint fits and the
/// filesystem has twice the reserve free plus twice [`LOW_SPACE`], enough
/// to make the reserve again and as much again to write in. The gap between
/// the floor and that room keeps the state from flapping. The reserve is
/// made again whenever the disk is not full and has room for it and the
/// margin. Free pages inside the database file (left by deleted messages)
/// do not count: new messages reuse them, but every write needs WAL space
/// on the filesystem first.
pub(super) fn plan(full: bool, held: bool, free: u64, fits: bool, reserve: u64) -> Plan {
    let margin = 2 * LOW_SPACE;
    let room = fits && free >= reserve.saturating_mul(2).saturating_add(margin);
    let full = if full || !held {
        !room
    } else {
        !fits || free < LOW_SPACE
    };
    Plan {
        full,
        release: full && held,
        create: !full && !held && reserve > 0 && free >= reserve.saturating_add(margin),
    }
}

/// The disk space of a data directory: the reserve and whether the disk
/// counts as full. Shared by the writer (which reports failed groups), the
/// checkpointer (which measures on every round) and the store (which
/// refuses publishes while full).
#[derive(Debug)]
pub(super) struct Space {
    dir: PathBuf,
    reserve: u64,
    full: watch::Sender<bool>,
    /// Whether the reserve file is in place. Every change of the file is
    /// made under this lock.
    held: Mutex<bool>,
}

impl Space {
    /// Looks at `dir` (locked already): gives the reserve up at once if the
    /// disk is full, so that opening and migrating can write, or makes the
    /// reserve of `reserve` bytes if it is missing and there is room.
    pub(super) async fn open(dir: &Path, reserve: u64) -> Arc<Space> {
        let path = dir.join(RESERVE_FILE);
        let held = match std::fs::metadata(&path) {
            Ok(meta) if reserve > 0 && meta.len() >= reserve => true,
            Ok(_) => {
                // A reserve from an earlier, larger or disabled setting.
                let _ = std::fs::remove_file(&path);
                false
            }
            Err(_) => false,
        };
        let space = Arc::new(Space {
            dir: dir.to_path_buf(),
            reserve,
            full: watch::channel(false).0,
            held: Mutex::new(held),
        });
        space.settle(true).await;
        space
    }

    /// A receiver that reads `true` while the disk counts as full.
    pub(super) fn watch(&self) -> watch::Receiver<bool> {
        self.full.subscribe()
    }

    /// The data directory.
    pub(super) fn dir(&self) -> &Path {
        &self.dir
    }

    /// Free bytes on the data directory's filesystem, if the system tells.
    pub(super) fn free(&self) -> Option<u64> {
        free_bytes(&self.dir)
    }

    fn lock_held(&self) -> std::sync::MutexGuard<'_, bool> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A group commit failed: if the disk is (nearly) full, that is why, so
    /// the reserve is given up for the acks and checkpoints that free
    /// space. Cheap: one `statvfs`, and at most one file removal.
    pub(super) fn after_failure(&self) {
        if free_bytes(&self.dir).is_some_and(|free| free < LOW_SPACE) {
            self.enter_full("a group commit failed");
        }
    }

    /// A write failed with SQLite's "database or disk is full".
    pub(super) fn disk_full(&self, what: &str) {
        self.enter_full(what);
    }

    fn enter_full(&self, why: &str) {
        let mut held = self.lock_held();
        let released = *held && self.release(&mut held);
        if self.full.send_if_modified(|f| !std::mem::replace(f, true)) {
            tracing::warn!(
                data_dir = %self.dir.display(),
                free = free_bytes(&self.dir),
                released_reserve = if released { self.reserve } else { 0 },
                cause = why,
                "the disk is full: publishing is refused until space is freed; \
                 acks, deliveries and checkpoints go on"
            );
        }
    }

    /// Removes the reserve file; true if it was removed.
    fn release(&self, held: &mut bool) -> bool {
        let path = self.dir.join(RESERVE_FILE);
        match std::fs::remove_file(&path) {
            Ok(()) => {
                *held = false;
                true
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                *held = false;
                false
            }
            Err(e) => {
                tracing::error!(path = %path.display(), error = %e, "cannot remove the disk reserve");
                false
            }
        }
    }

    /// Measures free space (given whether the next checkpoint `fits`) and
    /// acts on [`plan`]: enters or leaves the full state, gives
    /// the reserve up or makes it again. File work runs off the async
    /// threads.
    pub(super) async fn settle(self: &Arc<Self>, fits: bool) {
        let space = Arc::clone(self);
        let _ = tokio::task::spawn_blocking(move || space.settle_now(fits)).await;
    }

    fn settle_now(&self, fits: bool) {
        let Some(free) = free_bytes(&self.dir) else {
            return;
        };
        let mut held = self.lock_held();
        let was_full = *self.full.borrow();
        let plan = plan(was_full, *held, free, fits, self.reserve);
        if plan.full && !was_full {
            drop(held);
            self.enter_full("free space fell below the floor, or a checkpoint needs more");
            return;
        }
        if plan.release {
            self.release(&mut held);
        }
        if plan.create {
            match self.create() {
                Ok(()) => *held = true,
                Err(e) => tracing::warn!(
                    data_dir = %self.dir.display(),
                    reserve = self.reserve,
                    error = %e,
                    "cannot make the disk reserve; trying again later"
                ),
            }
        }
        if was_full && !plan.full {
            self.full.send_replace(false);
            tracing::info!(
                data_dir = %self.dir.display(),
                free = free_bytes(&self.dir),
                reserve_held = *held,
                "disk space is back: publishing resumes"
            );
        }
    }

    /// Writes the reserve file: allocated blocks, not a sparse file, so
    /// that removing it really frees space.
    fn create(&self) -> std::io::Result<()> {
        let path = self.dir.join(RESERVE_FILE);
        let result = (|| {
            let mut file = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(&path)?;
            allocate(&mut file, self.reserve)?;
            file.sync_all()
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&path);
        }
        result
    }
}

/// Gives `file` `len` bytes of allocated blocks: `fallocate` where the
/// filesystem has it, else written zeros.
fn allocate(file: &mut File, len: u64) -> std::io::Result<()> {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        use rustix::fs::{FallocateFlags, fallocate};
        match fallocate(&*file, FallocateFlags::empty(), 0, len) {
            Ok(()) => return Ok(()),
            Err(rustix::io::Errno::OPNOTSUPP | rustix::io::Errno::NOSYS) => {}
            Err(e) => return Err(e.into()),
        }
    }
    let chunk = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        file.write_all(&chunk[..n])?;
        left -= n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn a_nearly_full_disk_turns_full_and_gives_the_reserve_up() {
        let p = plan(false, true, LOW_SPACE - 1, true, 64 * MIB);
        assert_eq!(
            p,
            Plan {
                full: true,
                release: true,
                create: false
            }
        );
        // Plenty of room: nothing changes.
        let p = plan(false, true, 500 * MIB, true, 64 * MIB);
        assert!(!p.full && !p.release && !p.create, "{p:?}");
    }

    #[test]
    fn a_checkpoint_without_room_to_grow_the_database_means_full() {
        let p = plan(false, true, 20 * MIB, false, 64 * MIB);
        assert!(p.full && p.release, "{p:?}");
        // However much is free: the WAL cannot be emptied, so writes eat
        // what is left.
        let p = plan(true, false, 500 * MIB, false, 64 * MIB);
        assert!(p.full && !p.create, "{p:?}");
    }

    #[test]
    fn the_released_reserve_alone_does_not_end_the_full_state() {
        // Just after giving 64 MiB up, about 64 MiB are free: not enough to
        // make the reserve again and write, so publishing stays refused.
        let p = plan(true, false, 64 * MIB, true, 64 * MIB);
        assert!(p.full && !p.create, "{p:?}");
    }

    #[test]
    fn freed_space_ends_the_full_state_and_makes_the_reserve_again() {
        let p = plan(true, false, 200 * MIB, true, 64 * MIB);
        assert_eq!(
            p,
            Plan {
                full: false,
                release: false,
                create: true
            }
        );
    }

    #[test]
    fn a_disk_without_room_for_the_reserve_counts_as_full() {
        // A restart on a full disk, the reserve given up before: full from
        // the start, until there is room again.
        let p = plan(false, false, 4 * MIB, true, 64 * MIB);
        assert!(p.full && !p.create, "{p:?}");
        let p = plan(false, false, 200 * MIB, true, 64 * MIB);
        assert!(!p.full && p.create, "{p:?}");
    }

    #[test]
    fn without_a_reserve_only_the_margin_counts() {
        let p = plan(false, false, 2 * LOW_SPACE - 1, true, 0);
        assert!(p.full && !p.release && !p.create, "{p:?}");
        let p = plan(true, false, 2 * LOW_SPACE, true, 0);
        assert!(!p.full && !p.create, "{p:?}");
    }

    #[test]
    fn a_second_lock_on_a_folder_is_refused_with_its_name() {
        let dir = tempfile::tempdir().expect("temp dir");
        let first = DirLock::take(dir.path()).expect("first lock");
        let err = DirLock::take(dir.path()).expect_err("second lock");
        let text = err.to_string();
        assert!(matches!(err, Error::FailedPrecondition(_)), "{text}");
        assert!(text.contains(&dir.path().display().to_string()), "{text}");
        assert!(text.contains("another tidings broker"), "{text}");
        assert!(
            text.contains(&format!("process {}", std::process::id())),
            "{text}"
        );
        drop(first);
        DirLock::take(dir.path()).expect("the lock is free again");
    }

    #[tokio::test]
    async fn a_lock_let_go_within_the_wait_is_taken_and_one_kept_is_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        let first = DirLock::take(dir.path()).expect("first lock");
        let short = std::time::Duration::from_millis(100);
        let err = DirLock::take_within(dir.path(), short)
            .await
            .expect_err("the lock is still held after the wait");
        assert!(matches!(err, Error::FailedPrecondition(_)), "{err}");
        let letting_go = tokio::spawn(async move {
            tokio::time::sleep(short).await;
            drop(first);
        });
        DirLock::take_within(dir.path(), LOCK_WAIT)
            .await
            .expect("the lock let go within the wait is taken");
        letting_go.await.expect("task");
    }
}

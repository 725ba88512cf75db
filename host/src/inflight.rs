//! Work in flight and last use of each container, in a store every host
//! process on the machine shares: the CLI, `serve` and `gc` agree, and no
//! workload can write it.
//!
//! The store is a directory under the host's state directory (beside the
//! workspaces, never mounted into a container). A running execute or file
//! transfer holds an exclusive `flock` on a file of its own named after the
//! container; counting in-flight work is trying those locks. The kernel drops
//! a lock when its process dies, so a crashed host leaves nothing that looks
//! busy (its stale files are removed by the next count). Last use is the
//! mtime of one file per container, set when a command ends: no engine call,
//! and nothing inside the container (workspace mtimes, processes) counts.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nix::fcntl::{Flock, FlockArg};

/// The shared store of one workspace root's containers.
#[derive(Debug, Clone)]
pub struct InFlight {
    running: PathBuf,
    last_used: PathBuf,
}

/// Held while one execute or transfer runs; dropping it ends the work.
#[derive(Debug)]
pub struct Work {
    path: PathBuf,
    _lock: Flock<File>,
    last_used: PathBuf,
}

impl Drop for Work {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        touch(&self.last_used);
    }
}

impl InFlight {
    /// The store under `state_dir` (created owner-only when missing).
    pub fn new(state_dir: &Path) -> Self {
        InFlight {
            running: state_dir.join("running"),
            last_used: state_dir.join("last-used"),
        }
    }

    fn ensure_dirs(&self) -> std::io::Result<()> {
        for dir in [&self.running, &self.last_used] {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)?;
        }
        Ok(())
    }

    /// Marks one piece of work on `container_id` as running until the
    /// returned guard drops. `None` (logged) when the store is unusable:
    /// the work still runs.
    pub fn begin(&self, container_id: &str) -> Option<Work> {
        let result = (|| -> std::io::Result<Work> {
            self.ensure_dirs()?;
            let path = self
                .running
                .join(format!("{container_id}.{}", unique_suffix()));
            let file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)?;
            let lock = Flock::lock(file, FlockArg::LockExclusiveNonblock)
                .map_err(|(_, e)| std::io::Error::from(e))?;
            let last_used = self.last_used.join(container_id);
            touch(&last_used);
            Ok(Work {
                path,
                _lock: lock,
                last_used,
            })
        })();
        match result {
            Ok(work) => Some(work),
            Err(e) => {
                tracing::warn!(container = container_id, error = %e, "cannot record work in flight");
                None
            }
        }
    }

    /// Pieces of work running on `container_id`, in any host process.
    pub fn count(&self, container_id: &str) -> usize {
        let Ok(entries) = std::fs::read_dir(&self.running) else {
            return 0;
        };
        let prefix = format!("{container_id}.");
        let mut running = 0;
        for entry in entries.flatten() {
            let name = entry.file_name();
            if !name.to_string_lossy().starts_with(&prefix) {
                continue;
            }
            let Ok(file) = File::open(entry.path()) else {
                continue;
            };
            match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                // Nobody holds it: its process ended without cleaning up.
                Ok(_stale) => {
                    let _ = std::fs::remove_file(entry.path());
                }
                Err(_) => running += 1,
            }
        }
        running
    }

    /// Unix ms of the end of the last command on `container_id` (or of the
    /// start of one still running), if any host process recorded one.
    pub fn last_used_ms(&self, container_id: &str) -> Option<u64> {
        let modified = std::fs::metadata(self.last_used.join(container_id))
            .and_then(|m| m.modified())
            .ok()?;
        Some(modified.duration_since(UNIX_EPOCH).ok()?.as_millis() as u64)
    }

    /// Forgets a removed container.
    pub fn forget(&self, container_id: &str) {
        let _ = std::fs::remove_file(self.last_used.join(container_id));
    }

    /// Waits until `container_id` has no work in flight or `grace` passed;
    /// the work still running then.
    pub async fn drain(&self, container_id: &str, grace: Duration) -> usize {
        let deadline = tokio::time::Instant::now() + grace;
        loop {
            let running = self.count(container_id);
            if running == 0 || tokio::time::Instant::now() >= deadline {
                return running;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn touch(path: &Path) {
    let now = SystemTime::now();
    let done = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .and_then(|f| f.set_modified(now));
    if let Err(e) = done {
        tracing::debug!(path = %path.display(), error = %e, "cannot record last use");
    }
}

fn unique_suffix() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static SEQ: AtomicU64 = AtomicU64::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn work_counts_while_held_and_last_use_moves_at_its_end() {
        let dir = tempfile::tempdir().unwrap();
        let store = InFlight::new(dir.path());
        assert_eq!(store.count("c1"), 0);
        let a = store.begin("c1").unwrap();
        let b = store.begin("c1").unwrap();
        assert_eq!((store.count("c1"), store.count("c2")), (2, 0));
        let started = store.last_used_ms("c1").unwrap();
        std::thread::sleep(Duration::from_millis(20));
        drop(a);
        assert_eq!(store.count("c1"), 1);
        drop(b);
        assert_eq!(store.count("c1"), 0);
        assert!(store.last_used_ms("c1").unwrap() > started);
    }

    #[test]
    fn a_crashed_process_leaves_nothing_busy() {
        // A lock file whose holder died: the kernel released the lock.
        let dir = tempfile::tempdir().unwrap();
        let store = InFlight::new(dir.path());
        store.ensure_dirs().unwrap();
        std::fs::write(store.running.join("c1.999-0"), b"").unwrap();
        assert_eq!(store.count("c1"), 0);
        assert!(
            !store.running.join("c1.999-0").exists(),
            "stale file cleaned"
        );
    }

    #[test]
    fn another_process_sees_the_work() {
        // flock is per open file: a second store object, as in another
        // process, sees the same count.
        let dir = tempfile::tempdir().unwrap();
        let _work = InFlight::new(dir.path()).begin("c1").unwrap();
        assert_eq!(InFlight::new(dir.path()).count("c1"), 1);
    }
}

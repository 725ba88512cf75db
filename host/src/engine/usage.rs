//! Work in flight, last use and the threads of each container, in a store
//! every host process on the machine shares: the CLI, `serve` and `gc`
//! agree, and no workload can write it.
//!
//! The store is a directory under the host's state directory (beside the
//! workspaces, never mounted into a container). A running execute or file
//! transfer holds an exclusive `flock` on a file of its own named after the
//! container; counting in-flight work is trying those locks. The kernel drops
//! a lock when its process dies, so a crashed host leaves nothing that looks
//! busy (its stale files are removed by the next count). Last use is the
//! mtime of one file per container, set when a command ends: no engine call,
//! and nothing inside the container (workspace mtimes, processes) counts.
//! The threads that used a backend are one empty file each, under the
//! container's name; a destroy in progress is one `closing` file.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nix::fcntl::{Flock, FlockArg};

use crate::state::{self, Create};

/// The shared store of one workspace root's containers. Keys are container
/// names (`sandbox.{namespace}.{backend}`), known before a container exists.
#[derive(Debug, Clone)]
pub struct Usage {
    running: PathBuf,
    last_used: PathBuf,
    threads: PathBuf,
    closing: PathBuf,
    destroyed: PathBuf,
    /// The agent-link writer locks (`provider::agent_link`): removed with
    /// their container.
    links: PathBuf,
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

/// Held while a container is being removed: no new work starts on it. A
/// locked file, so a crashed remover blocks nothing.
#[derive(Debug)]
pub struct Closing {
    path: PathBuf,
    _lock: Flock<File>,
}

/// Why a container is closing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closure {
    /// A destroy: new work is refused.
    Destroy,
    /// An idle or capacity removal: new work waits for its outcome.
    Evict,
}

impl Closure {
    fn tag(self) -> &'static str {
        match self {
            Closure::Destroy => "destroy",
            Closure::Evict => "evict",
        }
    }
}

impl Drop for Closing {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Why work could not be admitted on a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The container is being removed, for this reason.
    Closing(Closure),
}

impl Usage {
    /// The store under `state_dir` (created owner-only when missing).
    pub fn new(state_dir: &Path) -> Self {
        Usage {
            running: state_dir.join("running"),
            last_used: state_dir.join("last-used"),
            threads: state_dir.join("threads"),
            closing: state_dir.join("closing"),
            destroyed: state_dir.join("destroyed"),
            links: state_dir.join("links"),
        }
    }

    fn ensure_dirs(&self) -> std::io::Result<()> {
        for dir in [
            &self.running,
            &self.last_used,
            &self.threads,
            &self.closing,
            &self.destroyed,
        ] {
            state::create_dir(dir)?;
        }
        Ok(())
    }

    /// Marks one piece of work on `container` as running until the returned
    /// guard drops. `Ok(None)` (logged) when the store is unusable: the work
    /// still runs. Refused while the container is being removed.
    ///
    /// The work is recorded first and the closing marks read after, while a
    /// remover marks first and counts after: of a begin and a removal that
    /// race, at least one sees the other, so a removal never kills work
    /// that was admitted.
    pub fn begin(&self, container: &str) -> Result<Option<Work>, Refusal> {
        let work = self.record(container);
        if let Some(why) = self.closing(container) {
            drop(work);
            return Err(Refusal::Closing(why));
        }
        Ok(work)
    }

    fn record(&self, container: &str) -> Option<Work> {
        let result = (|| -> std::io::Result<Work> {
            self.ensure_dirs()?;
            // Locked under a name no count looks at, then renamed: a count
            // never sees the file unlocked and takes it for a crashed one.
            let nonce = unique_suffix();
            let staging = self.running.join(format!(".staging-{nonce}"));
            let file = state::open(&staging, Create::New)?;
            let lock = Flock::lock(file, FlockArg::LockExclusiveNonblock)
                .map_err(|(_, e)| std::io::Error::from(e))?;
            let path = self.running.join(format!("{container}.{nonce}"));
            std::fs::rename(&staging, &path)?;
            let last_used = self.last_used.join(container);
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
                tracing::warn!(container, error = %e, "cannot record work in flight");
                None
            }
        }
    }

    /// Work running on `container` now, from any host process. A store that
    /// exists but cannot be read counts as busy: never evict on a guess.
    pub fn count(&self, container: &str) -> usize {
        let entries = match std::fs::read_dir(&self.running) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return 0,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the in-flight store; counting as busy");
                return 1;
            }
        };
        let prefix = format!("{container}.");
        let mut running = 0;
        for entry in entries.flatten() {
            let name = entry.file_name();
            if !name.to_string_lossy().starts_with(&prefix) {
                continue;
            }
            let file = match state::open_existing(&entry.path()) {
                Ok(file) => file,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                // Not this user's to lock (a record root made before its
                // files were handed over), or a planted link: it proves
                // nothing, and counting it would keep the container busy
                // for good.
                Err(e) => {
                    tracing::warn!(path = %entry.path().display(), error = %e, "an in-flight record that cannot be locked is ignored");
                    continue;
                }
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

    /// Unix ms of the end of the last command on `container` (or of the
    /// start of one still running), if any host process recorded one.
    pub fn last_used_ms(&self, container: &str) -> Option<u64> {
        let modified = std::fs::metadata(self.last_used.join(container))
            .and_then(|m| m.modified())
            .ok()?;
        Some(modified.duration_since(UNIX_EPOCH).ok()?.as_millis() as u64)
    }

    /// Records a use of `container` now (an ensure without a command).
    pub fn touch(&self, container: &str) {
        if self.ensure_dirs().is_ok() {
            touch(&self.last_used.join(container));
        }
    }

    /// Forgets the last use of a removed container.
    pub fn forget(&self, container: &str) {
        let _ = std::fs::remove_file(self.last_used.join(container));
    }

    /// Removes the agent-link lock of a removed container (its id: links
    /// are per container, not per name).
    pub fn forget_link(&self, container_id: &str) {
        let _ = std::fs::remove_file(self.links.join(container_id));
    }

    /// Records that `thread` uses the backend of `container`.
    pub fn add_thread(&self, container: &str, thread: &str) {
        let dir = self.threads.join(container);
        let done = self.ensure_dirs().and_then(|()| {
            state::create_dir(&dir)?;
            state::open(&dir.join(thread), Create::OrOpen).map(drop)
        });
        if let Err(e) = done {
            tracing::debug!(container, error = %e, "cannot record the thread");
        }
    }

    /// Drops `thread` from the backend of `container`.
    pub fn release_thread(&self, container: &str, thread: &str) {
        let _ = std::fs::remove_file(self.threads.join(container).join(thread));
    }

    /// Threads recorded on the backend of `container`.
    pub fn threads(&self, container: &str) -> usize {
        std::fs::read_dir(self.threads.join(container)).map_or(0, |d| d.flatten().count())
    }

    /// Forgets every thread of a destroyed backend.
    pub fn forget_threads(&self, container: &str) {
        let _ = std::fs::remove_dir_all(self.threads.join(container));
    }

    /// Marks `container` as being removed (`why`) until the guard drops.
    pub fn close(&self, container: &str, why: Closure) -> Option<Closing> {
        let path = self
            .closing
            .join(format!("{container}.{}.{}", why.tag(), unique_suffix()));
        let made = self.ensure_dirs().and_then(|()| {
            let file = state::open(&path, Create::New)?;
            Flock::lock(file, FlockArg::LockExclusiveNonblock)
                .map_err(|(_, e)| std::io::Error::from(e))
        });
        match made {
            Ok(lock) => Some(Closing { path, _lock: lock }),
            Err(e) => {
                tracing::warn!(container, error = %e, "cannot mark the container closing");
                None
            }
        }
    }

    /// Why `container` is being removed now, by any host process (a destroy
    /// wins over an eviction); stale marks of crashed processes are cleaned.
    pub fn closing(&self, container: &str) -> Option<Closure> {
        let entries = std::fs::read_dir(&self.closing).ok()?;
        let prefix = format!("{container}.");
        let mut found = None;
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(&prefix)) else {
                continue;
            };
            let why = if rest.starts_with("destroy.") {
                Closure::Destroy
            } else if rest.starts_with("evict.") {
                Closure::Evict
            } else {
                continue;
            };
            let Ok(file) = state::open_existing(&entry.path()) else {
                continue;
            };
            if Flock::lock(file, FlockArg::LockExclusiveNonblock).is_ok() {
                let _ = std::fs::remove_file(entry.path());
                continue;
            }
            if why == Closure::Destroy {
                return Some(why);
            }
            found = Some(why);
        }
        found
    }

    /// Records that a destroy is removing `container` now, so the commands
    /// it kills can say why (in any host process).
    pub fn mark_destroyed(&self, container: &str) {
        if self.ensure_dirs().is_ok() {
            touch(&self.destroyed.join(container));
        }
    }

    /// Whether a destroy removed `container` at or after `since_ms`.
    pub fn destroyed_since(&self, container: &str, since_ms: u64) -> bool {
        std::fs::metadata(self.destroyed.join(container))
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .is_some_and(|t| t.as_millis() as u64 + 1 >= since_ms)
    }

    /// Waits until `container` has no work in flight or `deadline` passed;
    /// the work still running then.
    pub async fn drain(&self, container: &str, deadline: tokio::time::Instant) -> usize {
        loop {
            let running = self.count(container);
            if running == 0 || tokio::time::Instant::now() >= deadline {
                return running;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn touch(path: &Path) {
    let now = SystemTime::now();
    let done = state::open(path, Create::OrOpen).and_then(|f| f.set_modified(now));
    if let Err(e) = done {
        tracing::debug!(path = %path.display(), error = %e, "cannot record last use");
    }
}

/// Unique across processes and restarts (pid reuse): pid, a counter, and
/// the clock's nanoseconds.
fn unique_suffix() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!(
        "{}-{}-{nanos}",
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
        let store = Usage::new(dir.path());
        assert_eq!(store.count("c1"), 0);
        let a = store.begin("c1").unwrap().unwrap();
        let b = store.begin("c1").unwrap().unwrap();
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
        let store = Usage::new(dir.path());
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
        let _work = Usage::new(dir.path()).begin("c1").unwrap().unwrap();
        assert_eq!(Usage::new(dir.path()).count("c1"), 1);
    }

    #[test]
    fn a_count_racing_a_begin_never_loses_the_work() {
        // The bug: begin created the file, then locked it; a count in
        // between found it unlocked and deleted it as stale.
        let dir = tempfile::tempdir().unwrap();
        let store = Usage::new(dir.path());
        let counter = {
            let store = store.clone();
            std::thread::spawn(move || {
                for _ in 0..2000 {
                    store.count("c1");
                }
            })
        };
        for _ in 0..2000 {
            let work = store.begin("c1").unwrap().unwrap();
            assert!(work.path.exists(), "a count removed running work");
            drop(work);
        }
        counter.join().unwrap();
    }

    #[test]
    fn a_closing_container_admits_no_new_work() {
        let dir = tempfile::tempdir().unwrap();
        let store = Usage::new(dir.path());
        let closing = store.close("c1", Closure::Destroy).unwrap();
        assert_eq!(
            store.begin("c1").unwrap_err(),
            Refusal::Closing(Closure::Destroy)
        );
        assert_eq!(store.count("c1"), 0, "the refused work is not counted");
        assert!(store.begin("c2").unwrap().is_some());
        drop(closing);
        assert!(store.begin("c1").unwrap().is_some());
    }

    #[test]
    fn a_closing_mark_of_a_crashed_process_blocks_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Usage::new(dir.path());
        store.ensure_dirs().unwrap();
        std::fs::write(store.closing.join("c1.destroy.999-0-0"), b"").unwrap();
        assert_eq!(store.closing("c1"), None);
        assert!(store.begin("c1").unwrap().is_some());
        let evict = store.close("c1", Closure::Evict).unwrap();
        assert_eq!(store.closing("c1"), Some(Closure::Evict));
        let destroy = store.close("c1", Closure::Destroy).unwrap();
        assert_eq!(store.closing("c1"), Some(Closure::Destroy));
        drop((evict, destroy));
        assert_eq!(store.closing("c1"), None);
    }

    #[test]
    fn threads_are_recorded_released_and_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let store = Usage::new(dir.path());
        store.add_thread("c1", "alice-1");
        store.add_thread("c1", "alice-1");
        store.add_thread("c1", "alice-2");
        assert_eq!(store.threads("c1"), 2);
        store.release_thread("c1", "alice-1");
        assert_eq!(store.threads("c1"), 1);
        store.forget_threads("c1");
        assert_eq!(store.threads("c1"), 0);
    }
}

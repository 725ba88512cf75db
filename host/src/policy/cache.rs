//! A cache of compiled policy components, so a short-lived process (the
//! CLI) deserializes native code in milliseconds instead of compiling the
//! component at every start.
//!
//! Keyed by the component's SHA-256 and wasmtime's compatibility hash of the
//! engine (version, compiler settings, target): any change misses.
//! Deserializing is `unsafe` in wasmtime because the file is trusted to be
//! wasmtime's own output: the cache therefore only reads from a directory
//! and files owned by this user and writable by nobody else, and writes
//! atomically (temp file, then rename).

use std::hash::{Hash, Hasher};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use wasmtime::component::Component;
use wasmtime::Engine;

/// Why a compiled component was not written to the cache (only logged).
#[derive(Debug, thiserror::Error)]
enum StoreError {
    #[error("serializing the compiled component")]
    Serialize(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// `action` and the path it failed on.
    #[error("{action} {}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl StoreError {
    fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> StoreError {
        let path = path.to_owned();
        move |source| StoreError::Io {
            action,
            path,
            source,
        }
    }
}

#[derive(Debug, Clone)]
pub struct ComponentCache {
    dir: PathBuf,
}

impl ComponentCache {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        ComponentCache { dir: dir.into() }
    }

    /// The compiled component, and whether it came from the cache: read
    /// when a trusted entry exists, else compiled and stored (a failure to
    /// store is only logged). Compiling holds a lock file beside the entry,
    /// so processes starting together compile a component once: the others
    /// wait, then read what the first one stored.
    pub fn load_or_compile(
        &self,
        engine: &Engine,
        bytes: &[u8],
    ) -> wasmtime::Result<(Component, bool)> {
        let key = key(engine, bytes);
        let path = self.dir.join(format!("{key}.cwasm"));
        if let Some(component) = self.read(engine, &path) {
            return Ok((component, true));
        }
        let _compiling = self.lock(&key);
        if let Some(component) = self.read(engine, &path) {
            return Ok((component, true));
        }
        let component = Component::new(engine, bytes)?;
        if let Err(e) = self.store(&path, &component) {
            tracing::debug!(
                dir = %self.dir.display(),
                error = &e as &dyn std::error::Error,
                "component cache not written"
            );
        }
        Ok((component, false))
    }

    fn read(&self, engine: &Engine, path: &Path) -> Option<Component> {
        if !self.trusted(path) {
            return None;
        }
        // SAFETY: the file was written by `store` below (wasmtime's own
        // serialization) into a directory only this user can write, and
        // the key binds it to these bytes and this engine's settings.
        match unsafe { Component::deserialize_file(engine, path) } {
            Ok(component) => Some(component),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "dropping an unusable cache entry");
                let _ = std::fs::remove_file(path);
                None
            }
        }
    }

    /// An exclusive lock on `key`'s compilation, held until dropped; `None`
    /// (compile anyway) when the directory cannot hold one, or is not
    /// private (another user could hold the lock forever).
    fn lock(&self, key: &str) -> Option<nix::fcntl::Flock<std::fs::File>> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .ok()?;
        if !private(&self.dir) {
            return None;
        }
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(self.dir.join(format!("{key}.lock")))
            .ok()?;
        nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive).ok()
    }

    fn store(&self, path: &Path, component: &Component) -> Result<(), StoreError> {
        let serialized = component
            .serialize()
            .map_err(|e| StoreError::Serialize(e.into()))?;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .map_err(StoreError::io("creating", &self.dir))?;
        let tmp = self
            .dir
            .join(format!(".{}.{}.tmp", std::process::id(), rand_suffix()));
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(StoreError::io("creating", &tmp))?;
        file.write_all(&serialized)
            .and_then(|()| file.sync_all())
            .map_err(StoreError::io("writing", &tmp))?;
        std::fs::rename(&tmp, path).map_err(StoreError::io("renaming into place", &tmp))?;
        Ok(())
    }

    fn trusted(&self, path: &Path) -> bool {
        private(&self.dir) && private(path)
    }
}

/// Owned by this user, writable by nobody else, not a symlink.
fn private(p: &Path) -> bool {
    let me = nix::unistd::geteuid().as_raw();
    std::fs::symlink_metadata(p)
        .map(|m| m.uid() == me && m.mode() & 0o022 == 0 && !m.file_type().is_symlink())
        .unwrap_or(false)
}

fn key(engine: &Engine, bytes: &[u8]) -> String {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    engine.precompile_compatibility_hash().hash(&mut hasher);
    let component = match crate::policy::embedded::known_digest(bytes) {
        Some(digest) => digest.to_owned(),
        None => hex::encode(Sha256::digest(bytes)),
    };
    format!("{}-{:016x}", &component[..40], hasher.finish())
}

fn rand_suffix() -> u64 {
    use std::hash::BuildHasher;
    std::collections::hash_map::RandomState::new().hash_one(std::time::SystemTime::now())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_time_digests_match_the_shipped_bytes() {
        use sandbox_artifacts::shipped;
        for (bytes, at_build) in [
            (shipped::PER_USER, shipped::PER_USER_SHA256),
            (shipped::PER_THREAD, shipped::PER_THREAD_SHA256),
        ] {
            assert_eq!(crate::policy::embedded::known_digest(bytes), Some(at_build));
            assert_eq!(at_build, hex::encode(Sha256::digest(bytes)));
        }
        assert!(crate::policy::embedded::known_digest(b"\0asm").is_none());
    }

    #[test]
    fn a_second_load_comes_from_the_cache_and_a_tampered_dir_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ComponentCache::new(dir.path().join("c"));
        let engine = Engine::default();
        let bytes = crate::policy::embedded::PER_THREAD;
        assert!(
            !cache.load_or_compile(&engine, bytes).unwrap().1,
            "compiled"
        );
        let entries: Vec<_> = std::fs::read_dir(dir.path().join("c"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "cwasm"))
            .collect();
        assert_eq!(entries.len(), 1, "one entry written");
        let path = &entries[0];
        assert!(cache.trusted(path));
        assert!(cache.load_or_compile(&engine, bytes).unwrap().1, "cached");

        // A world-writable cache directory is not trusted.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path().join("c"), std::fs::Permissions::from_mode(0o777))
            .unwrap();
        assert!(!cache.trusted(path));
    }

    /// Bug: processes starting together (a CLI burst, serve and its
    /// workers) each paid the compile (11.5 s and 426 MB for a Python
    /// policy) before the first one had stored it.
    #[test]
    fn loads_racing_for_one_component_compile_it_once() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ComponentCache::new(dir.path().join("c"));
        let engine = Engine::default();
        let bytes = crate::policy::embedded::PER_USER;
        let cached: Vec<bool> = std::thread::scope(|s| {
            let loads: Vec<_> = (0..4)
                .map(|_| s.spawn(|| cache.load_or_compile(&engine, bytes).unwrap().1))
                .collect();
            loads.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(cached.iter().filter(|c| !**c).count(), 1, "{cached:?}");
    }
}

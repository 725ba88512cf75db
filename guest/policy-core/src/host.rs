//! What a policy asks of its host, as a plain Rust trait, so the decision
//! logic is tested natively against a fake host. The types are the
//! contract's (`sandbox-contract`); only the log level is this crate's, as
//! the decisions need five of `wasi:logging`'s six levels.

use sandbox_contract::{BackendId, Container, Result};

/// How important a log line is (mapped onto `wasi:logging` levels).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
}

/// The host capabilities a policy uses: the world's `containers` import,
/// the wall clock, `wasi:config/store` and `wasi:logging`.
pub trait Host {
    /// The container the host labelled for `backend`, if any.
    fn find(&mut self, backend: &BackendId) -> Result<Option<Container>>;
    /// Every container the host labelled in its namespace.
    fn list(&mut self) -> Result<Vec<Container>>;
    /// Creates (not starts) the container of `backend`; the host derives
    /// its name and workspace. A container that already exists is returned.
    fn create(&mut self, backend: &BackendId) -> Result<Container>;
    fn start(&mut self, container_id: &str) -> Result<()>;
    /// The current state, `None` when the container is gone.
    fn inspect(&mut self, container_id: &str) -> Result<Option<Container>>;
    /// False when the container was already gone; `Refused` when the host
    /// keeps it (work in flight, during `maintain`).
    fn remove(&mut self, container_id: &str) -> Result<bool>;
    /// Unix time in ms, the clock of `Container::last_used_ms`.
    fn now_ms(&mut self) -> u64;
    /// The deployment's settings for the policy (`[policy_config]`).
    fn config(&mut self) -> Vec<(String, String)>;
    fn log(&mut self, level: Level, message: &str);
}

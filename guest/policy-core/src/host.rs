//! What a policy asks of its host, as a plain Rust trait.
//!
//! These types mirror the WIT `types` interface one to one so the decision
//! logic can be tested natively against a fake host.

use std::fmt;

/// Mirrors WIT `types.error`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    InvalidId(String),
    DockerUnavailable(String),
    Refused(String),
    NotFound(String),
    Other(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::InvalidId(m) => write!(f, "invalid id: {m}"),
            Error::DockerUnavailable(m) => write!(f, "docker unavailable: {m}"),
            Error::Refused(m) => write!(f, "refused: {m}"),
            Error::NotFound(m) => write!(f, "not found: {m}"),
            Error::Other(m) => write!(f, "{m}"),
        }
    }
}

impl std::error::Error for Error {}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Mirrors WIT `types.container-status` (Docker's container states).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Created,
    Running,
    Paused,
    Restarting,
    Removing,
    Exited,
    Dead,
}

/// Mirrors WIT `types.container`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Container {
    pub id: String,
    pub name: String,
    pub backend_id: String,
    pub workspace: String,
    pub status: Status,
    /// Unix ms of the last known use (see WIT `container.last-used-ms`).
    pub last_used_ms: u64,
}

/// Mirrors WIT `types.backend`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    pub id: String,
    pub user_id: String,
    pub workspace: String,
}

/// Mirrors WIT `logging.level`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
}

/// The host capabilities a policy may use (WIT `containers`, `workspaces`,
/// `logging`).
pub trait Host {
    fn find(&mut self, backend_id: &str) -> Result<Option<Container>>;
    fn list(&mut self) -> Result<Vec<Container>>;
    fn create(&mut self, backend_id: &str, workspace: &str) -> Result<Container>;
    fn start(&mut self, container_id: &str) -> Result<()>;
    fn inspect(&mut self, container_id: &str) -> Result<Option<Container>>;
    fn remove(&mut self, container_id: &str) -> Result<bool>;
    fn prepare_workspace(&mut self, name: &str) -> Result<()>;
    /// Unix time in ms (WIT `context.now-ms`).
    fn now_ms(&mut self) -> u64;
    /// The deployment's policy settings (WIT `context.policy-config`).
    fn policy_config(&mut self) -> Vec<(String, String)>;
    fn log(&mut self, level: Level, message: &str);
}

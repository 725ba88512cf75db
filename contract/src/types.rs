//! The WIT `types` interface as Rust types, field for field.

use std::fmt;

#[cfg(feature = "host")]
use wasmtime::component::{ComponentType, Lift, Lower};

/// WIT `error`: why an operation failed.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "host", derive(ComponentType, Lift, Lower))]
#[cfg_attr(feature = "host", component(variant))]
pub enum Error {
    /// A thread, user or backend id outside the allow-list.
    #[cfg_attr(feature = "host", component(name = "invalid-id"))]
    InvalidId(String),
    /// The Docker engine did not answer in time, or failed.
    #[cfg_attr(feature = "host", component(name = "docker-unavailable"))]
    DockerUnavailable(String),
    /// The host refused the operation.
    #[cfg_attr(feature = "host", component(name = "refused"))]
    Refused(String),
    /// The container, image or backend does not exist.
    #[cfg_attr(feature = "host", component(name = "not-found"))]
    NotFound(String),
    /// Anything else, for humans.
    #[cfg_attr(feature = "host", component(name = "other"))]
    Other(String),
}

impl Error {
    /// The variant's name, as in the WIT: stable, for matching and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::InvalidId(_) => "invalid-id",
            Error::DockerUnavailable(_) => "docker-unavailable",
            Error::Refused(_) => "refused",
            Error::NotFound(_) => "not-found",
            Error::Other(_) => "other",
        }
    }

    /// The message without the kind.
    pub fn message(&self) -> &str {
        match self {
            Error::InvalidId(m)
            | Error::DockerUnavailable(m)
            | Error::Refused(m)
            | Error::NotFound(m)
            | Error::Other(m) => m,
        }
    }
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

/// A result with the contract's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// WIT `container-status`: Docker's container states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "host", derive(ComponentType, Lift, Lower))]
#[cfg_attr(feature = "host", component(enum))]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "serde", serde(rename_all = "lowercase"))]
#[repr(u8)]
pub enum Status {
    #[cfg_attr(feature = "host", component(name = "created"))]
    Created,
    #[cfg_attr(feature = "host", component(name = "running"))]
    Running,
    #[cfg_attr(feature = "host", component(name = "paused"))]
    Paused,
    #[cfg_attr(feature = "host", component(name = "restarting"))]
    Restarting,
    #[cfg_attr(feature = "host", component(name = "removing"))]
    Removing,
    #[cfg_attr(feature = "host", component(name = "exited"))]
    Exited,
    #[cfg_attr(feature = "host", component(name = "dead"))]
    Dead,
}

impl Status {
    /// Every status, in WIT order.
    pub const ALL: [Status; 7] = [
        Status::Created,
        Status::Running,
        Status::Paused,
        Status::Restarting,
        Status::Removing,
        Status::Exited,
        Status::Dead,
    ];

    /// Docker's (and the WIT's) name for the state.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Created => "created",
            Status::Running => "running",
            Status::Paused => "paused",
            Status::Restarting => "restarting",
            Status::Removing => "removing",
            Status::Exited => "exited",
            Status::Dead => "dead",
        }
    }

    /// The status Docker calls `name`; `None` for anything else.
    pub fn parse(name: &str) -> Option<Status> {
        Status::ALL.into_iter().find(|s| s.as_str() == name)
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// WIT `container`: a container the host labelled for a backend. Filled by
/// the host from Docker and its own records; see the WIT for each field.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "host", derive(ComponentType, Lift, Lower))]
#[cfg_attr(feature = "host", component(record))]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
pub struct Container {
    /// The engine's container id.
    pub id: String,
    /// The name the host derived from the backend id.
    pub name: String,
    /// The backend this container serves.
    #[cfg_attr(feature = "host", component(name = "backend-id"))]
    pub backend_id: String,
    /// Docker's state.
    pub status: Status,
    /// Unix ms of the end of the last command, now while one runs, else the
    /// creation time.
    #[cfg_attr(feature = "host", component(name = "last-used-ms"))]
    pub last_used_ms: u64,
    /// Commands and file transfers running on it now, from any host
    /// process on this machine.
    #[cfg_attr(feature = "host", component(name = "in-flight"))]
    pub in_flight: u32,
    /// Threads that used the backend and were not released since.
    pub threads: u32,
}

/// WIT `removal`: one removal `maintain` decided.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "host", derive(ComponentType, Lift, Lower))]
#[cfg_attr(feature = "host", component(record))]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct Removal {
    /// The container removed (or, in a dry run, to remove).
    #[cfg_attr(feature = "host", component(name = "container-id"))]
    pub container_id: String,
    /// Its backend.
    #[cfg_attr(feature = "host", component(name = "backend-id"))]
    pub backend_id: String,
    /// Why, for humans.
    pub reason: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_names_round_trip_and_match_docker() {
        for s in Status::ALL {
            assert_eq!(Status::parse(s.as_str()), Some(s));
        }
        assert_eq!(Status::Running.to_string(), "running");
        assert_eq!(Status::parse("Running"), None);
    }

    #[test]
    fn errors_show_their_kind_and_keep_their_message() {
        let e = Error::Refused("no".into());
        assert_eq!(e.to_string(), "refused: no");
        assert_eq!(e.kind(), "refused");
        assert_eq!(e.message(), "no");
    }
}

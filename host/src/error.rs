//! The host's typed errors, and their conversions at the WIT boundary.

use crate::runtime::bindings::sandbox::policy::types::Error as WitError;

/// Everything a sandbox operation can fail with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SandboxError {
    /// A thread, user, backend or workspace id outside the allow-list.
    #[error("invalid id: {0}")]
    InvalidId(String),
    /// The Docker engine did not answer in time or failed.
    #[error("docker unavailable: {0}")]
    DockerUnavailable(String),
    /// A host rule refused the operation (unlabelled container, symlinked
    /// workspace, a policy answer that breaks the contract...).
    #[error("refused: {0}")]
    Refused(String),
    /// A container, image or backend that does not exist.
    #[error("not found: {0}")]
    NotFound(String),
    /// The policy instance trapped (panic, deadline, memory limit); it was
    /// dropped and the next call gets a fresh instance.
    #[error("policy trapped: {0}")]
    PolicyTrap(String),
    /// The policy component could not be loaded or failed its self-check.
    #[error("policy refused at load: {0}")]
    PolicyLoad(String),
    #[error("{0}")]
    Other(String),
}

impl SandboxError {
    /// A short stable name for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            SandboxError::InvalidId(_) => "invalid-id",
            SandboxError::DockerUnavailable(_) => "docker-unavailable",
            SandboxError::Refused(_) => "refused",
            SandboxError::NotFound(_) => "not-found",
            SandboxError::PolicyTrap(_) => "policy-trap",
            SandboxError::PolicyLoad(_) => "policy-load",
            SandboxError::Other(_) => "other",
        }
    }
}

impl From<policy_core::Error> for SandboxError {
    fn from(e: policy_core::Error) -> Self {
        match e {
            policy_core::Error::InvalidId(m) => SandboxError::InvalidId(m),
            policy_core::Error::DockerUnavailable(m) => SandboxError::DockerUnavailable(m),
            policy_core::Error::Refused(m) => SandboxError::Refused(m),
            policy_core::Error::NotFound(m) => SandboxError::NotFound(m),
            policy_core::Error::Other(m) => SandboxError::Other(m),
        }
    }
}

impl From<WitError> for SandboxError {
    fn from(e: WitError) -> Self {
        match e {
            WitError::InvalidId(m) => SandboxError::InvalidId(m),
            WitError::DockerUnavailable(m) => SandboxError::DockerUnavailable(m),
            WitError::Refused(m) => SandboxError::Refused(m),
            WitError::NotFound(m) => SandboxError::NotFound(m),
            WitError::Other(m) => SandboxError::Other(m),
        }
    }
}

impl From<SandboxError> for WitError {
    fn from(e: SandboxError) -> Self {
        match e {
            SandboxError::InvalidId(m) => WitError::InvalidId(m),
            SandboxError::DockerUnavailable(m) => WitError::DockerUnavailable(m),
            SandboxError::Refused(m) => WitError::Refused(m),
            SandboxError::NotFound(m) => WitError::NotFound(m),
            other => WitError::Other(other.to_string()),
        }
    }
}

pub type Result<T, E = SandboxError> = std::result::Result<T, E>;

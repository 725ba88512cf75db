//! The host's typed errors, and their conversions at the WIT boundary.

use sandbox_contract::Error as ContractError;

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
    /// Anything else (an engine error, a workspace or transfer failure on
    /// the host); the message says what.
    #[error("{0}")]
    Other(String),
}

/// Characters of policy-supplied text kept in an error or a log line.
pub const POLICY_TEXT_MAX_CHARS: usize = 512;

/// Text that came from a policy, made safe for a log, a terminal or an HTTP
/// body: at most 512 characters, control characters
/// (newlines, escapes) shown escaped, so it can neither flood nor forge.
pub fn policy_text(text: &str) -> String {
    let mut out = String::new();
    for (i, c) in text.chars().enumerate() {
        if i == POLICY_TEXT_MAX_CHARS {
            out.push_str("[...]");
            break;
        }
        // Also the invisible bidi and zero-width marks that reorder a line.
        let invisible = matches!(c, '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}'
            | '\u{2066}'..='\u{2069}' | '\u{FEFF}');
        if c.is_control() || invisible || c == '\\' {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

impl SandboxError {
    /// A trap of a policy instance, its message (which may quote the
    /// component: names, traps) bounded and escaped.
    pub fn policy_trap(message: &str) -> Self {
        SandboxError::PolicyTrap(policy_text(message))
    }

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

/// A contract error. Its text may be a policy's, so it is bounded and
/// escaped.
impl From<ContractError> for SandboxError {
    fn from(e: ContractError) -> Self {
        match e {
            ContractError::InvalidId(m) => SandboxError::InvalidId(policy_text(&m)),
            ContractError::DockerUnavailable(m) => SandboxError::DockerUnavailable(policy_text(&m)),
            ContractError::Refused(m) => SandboxError::Refused(policy_text(&m)),
            ContractError::NotFound(m) => SandboxError::NotFound(policy_text(&m)),
            ContractError::Other(m) => SandboxError::Other(policy_text(&m)),
        }
    }
}

/// What a policy is told when a host operation fails.
impl From<SandboxError> for ContractError {
    fn from(e: SandboxError) -> Self {
        match e {
            SandboxError::InvalidId(m) => ContractError::InvalidId(m),
            SandboxError::DockerUnavailable(m) => ContractError::DockerUnavailable(m),
            SandboxError::Refused(m) => ContractError::Refused(m),
            SandboxError::NotFound(m) => ContractError::NotFound(m),
            other => ContractError::Other(other.to_string()),
        }
    }
}

/// The library's result: [`SandboxError`] unless said otherwise.
pub type Result<T, E = SandboxError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_text_cannot_forge_lines_clear_screens_or_flood() {
        // The bug: maintain's error was logged verbatim, 5 MB per tick, with a
        // newline and a forged INFO line and a screen-clearing escape.
        let hostile = format!("oops\n2026-01-01 INFO forged\x1b[2J{}", "x".repeat(5 << 20));
        let shown = SandboxError::from(ContractError::Other(hostile)).to_string();
        assert!(
            !shown.contains('\n') && !shown.contains('\x1b'),
            "{shown:.80}"
        );
        assert!(shown.contains("\\n2026") && shown.contains("\\u{1b}[2J"));
        assert!(shown.len() < 2 * POLICY_TEXT_MAX_CHARS, "{}", shown.len());
    }
}

//! The policy components this host ships, built by the `sandbox-artifacts`
//! crate (`artifacts/build.rs`).

use sandbox_artifacts::shipped::{PER_THREAD_SHA256, PER_USER_SHA256};

/// The per-user policy, the default: all threads of a user share one
/// container and one workspace.
pub const PER_USER: &[u8] = sandbox_artifacts::shipped::PER_USER;

/// The per-thread policy, the original behaviour: one container per thread.
pub const PER_THREAD: &[u8] = sandbox_artifacts::shipped::PER_THREAD;

/// The SHA-256 (hex) of `bytes` when they are a shipped policy, computed
/// at build time.
pub fn known_digest(bytes: &[u8]) -> Option<&'static str> {
    if bytes == PER_USER {
        Some(PER_USER_SHA256)
    } else if bytes == PER_THREAD {
        Some(PER_THREAD_SHA256)
    } else {
        None
    }
}

/// A shipped policy by name (`per-user`, `per-thread`).
pub fn builtin(name: &str) -> Option<&'static [u8]> {
    match name {
        "per-user" => Some(PER_USER),
        "per-thread" => Some(PER_THREAD),
        _ => None,
    }
}

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

/// The `[policy_config]` keys the shipped policies read.
pub const SHIPPED_KEYS: [&str; 3] = ["idle_ttl_secs", "max_containers", "thread_destroy"];

/// The keys of `policy_config` that a shipped policy does not read (a
/// typo, or a setting meant for another policy), when `component` is a
/// shipped one; none otherwise (another policy's keys are its own).
pub fn unread_keys<'a>(
    component: &[u8],
    policy_config: impl IntoIterator<Item = &'a String>,
) -> Vec<String> {
    if known_digest(component).is_none() {
        return Vec::new();
    }
    policy_config
        .into_iter()
        .filter(|key| !SHIPPED_KEYS.contains(&key.as_str()))
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_typo_in_a_shipped_policys_settings_is_found() {
        let keys = ["idle_ttl_secs".to_owned(), "idle_ttl_sec".to_owned()];
        assert_eq!(unread_keys(PER_USER, &keys), ["idle_ttl_sec"]);
        assert_eq!(unread_keys(PER_THREAD, &keys), ["idle_ttl_sec"]);
        assert!(unread_keys(b"another component", &keys).is_empty());
    }
}

//! The policy components this host ships, built by `build.rs`.

/// The per-user policy, the default: all threads of a user share one
/// container and one workspace.
pub const PER_USER: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/per_user.wasm"));

/// The per-thread policy, the original behaviour: one container per thread.
pub const PER_THREAD: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/per_thread.wasm"));

/// A shipped policy by name (`per-user`, `per-thread`).
pub fn builtin(name: &str) -> Option<&'static [u8]> {
    match name {
        "per-user" => Some(PER_USER),
        "per-thread" => Some(PER_THREAD),
        _ => None,
    }
}

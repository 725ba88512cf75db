//! The per-thread placement policy: one backend (id = thread id) and one
//! container per thread; the workspace is still the user's. It ships to
//! prove that policies swap without recompiling the host.
#![cfg(target_arch = "wasm32")]

policy_core::export_policy!(policy_core::mapping::PerThread);

//! The per-user placement policy, the host's embedded default: every thread
//! `{user}-{rest}` of a user shares one backend (id = user id), one container
//! and the user's workspace. Lazy creation, adoption of the host-labelled
//! container on a cache miss, re-creation when the container stopped or
//! vanished; the lifecycle settings are `policy_core::Lifecycle`'s.
#![cfg(target_arch = "wasm32")]

policy_core::export_policy!(policy_core::mapping::PerUser);

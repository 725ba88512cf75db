//! The per-user placement policy, the host's embedded default: every thread
//! `{user}-{rest}` of a user shares one backend (id = user id), one container
//! and one workspace. Lazy creation, adoption of the host-labelled container
//! on a cache miss, re-creation when the container stopped or vanished.
#![cfg(target_arch = "wasm32")]

type Selected = policy_core::mapping::PerUser;

include!("../../component.rs");

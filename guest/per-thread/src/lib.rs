//! The per-thread placement policy, the original behaviour: one backend
//! (id = thread id) and one container per thread; the workspace is still the
//! user's. It ships to prove that policies swap without recompiling the host.
#![cfg(target_arch = "wasm32")]

type Selected = policy_core::mapping::PerThread;

include!("../../component.rs");

//! Per-user Docker sandboxes for AI agents, placed by a hot-swappable
//! WebAssembly policy.
//!
//! An agent platform runs model-written commands in containers, one backend
//! per conversation thread (`{user_id}-{rest}`). A [`Sandbox`] asks a policy
//! component (the `sandbox` world, `wit/sandbox.wit`) which container serves
//! a thread and keeps it alive; the host implements the world's typed
//! container capabilities with bollard and owns image, mounts, limits and
//! names. The per-user policy is embedded; any component targeting the world
//! can replace it without recompiling the host.
//!
//! Layout, one folder per layer, each handing typed values to the next:
//! - `policy/`: the wasmtime runtime; calls the policy component and
//!   verifies every answer before the host acts on it;
//! - `engine/`: the host's own state and rules over its containers:
//!   ownership labels, work in flight and last use (shared by every host
//!   process), lifecycle slots, container plans, workspaces;
//! - `dataplane/`: executes and file transfers inside a container;
//! - `provider/`: container engines (Docker via bollard; in-memory);
//! - [`Sandbox`] is the facade over the three, `lifecycle` holds gc and
//!   maintenance, `serve` the HTTP API; the contract's vocabulary (ids,
//!   status, errors) comes from the `sandbox-contract` crate.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use sandbox_host::{Config, Sandbox};
//! let sandbox = Sandbox::new(Config::load(None)?).await?;
//! let a = sandbox.get_thread_backend("alice-1").await?;
//! let b = sandbox.get_thread_backend("alice-2").await?;
//! assert_eq!(a.id(), b.id()); // one backend, one container per user
//! println!("{}", a.execute("uname -a").await?.output);
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

mod dataplane;
mod engine;
mod error;
mod lifecycle;
mod policy;
mod sandbox;
mod view;

pub mod config;
pub mod image;
pub mod provider;
#[cfg(feature = "serve")]
pub mod serve;

pub use config::Config;
pub use dataplane::{exec, files, transfer};
pub use engine::plan::ContainerPlan;
pub use engine::{now_ms, Engine, ManagedContainer, RemoveMode};
pub use error::{policy_text, SandboxError};
pub use exec::{ExecOptions, ExecResponse, StreamKind};
pub use lifecycle::GcEntry;
pub use policy::client::VerifiedContainer;
pub use policy::containment::{ComponentNeeds, InstanceLimits, Peak};
pub use policy::embedded as policies;
pub use policy::measure::{resident_bytes, InstanceCost};
pub use policy::source::PolicySource;
pub use policy::LoadReport;
pub use sandbox::{Backend, Counters, Sandbox, ThreadInfo};
pub use sandbox_contract::{BackendId, Removal, Status, ThreadId, UserId};
pub use view::BackendView;

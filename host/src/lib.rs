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
//! Layout:
//! - [`runtime`]: wasmtime engine, policy loading and self-check, per-key
//!   lanes of policy instances, the world's imports;
//! - [`capabilities`]: the host's rules over every container operation;
//! - [`provider`]: container engines (Docker via bollard; in-memory);
//! - [`plan`], [`naming`], [`workspace`]: what a container looks like, what
//!   it is called, where its workspace lives;
//! - [`sandbox`]: the library API; [`image`]: the local image recipe.
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

pub mod agent;
pub mod capabilities;
pub mod config;
pub mod error;
pub mod exec;
pub mod files;
pub mod image;
pub mod inflight;
pub mod naming;
pub mod plan;
pub mod policies;
pub mod provider;
pub mod runtime;
pub mod sandbox;
pub mod serve;
pub mod view;
pub mod workspace;

pub use capabilities::ManagedContainer;
pub use config::Config;
pub use error::SandboxError;
pub use exec::ExecResponse;
pub use sandbox::{Backend, PolicySource, Sandbox};
pub use view::BackendView;

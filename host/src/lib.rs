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
//! # Layers
//!
//! Bottom to top. A module names modules of its own layer and of the layers
//! below it, never above, and no two units name each other (`cargo xtask
//! layers`, run by the test command, checks every `crate::` and `super::`
//! path and the crate root's re-exports against this list). A `(face only)`
//! layer reaches the others only through what the crate root publishes.
//!
//! 1. `base`: `error`, `config`, `state`
//! 2. `wire`: `dataplane`, `egress`
//! 3. `provider`: `provider`
//! 4. `engine`: `engine`
//! 5. `policy`: `policy`
//! 6. `facade`: `sandbox`, `view`
//! 7. `surface` (face only): `image`, `serve`
//!
//! - `error`, `config`: the typed errors and the validated configuration,
//!   with its defaults; the contract's vocabulary (ids, status, errors)
//!   comes from the `sandbox-contract` crate, below them all; `state`: the
//!   host's state directory, checked before it is trusted;
//! - `dataplane`: the wire into a container: exec requests and their bounded
//!   output, the file transfer scripts and sinks, the in-container agent;
//!   `egress`: the proxy sandboxes with `network = "egress"` reach out by;
//! - `provider`: container engines (Docker via bollard; in-memory), and the
//!   container plan they are handed;
//! - `engine`: the host's own state and rules over its containers:
//!   ownership labels, work in flight and last use (shared by every host
//!   process), lifecycle slots, workspaces, the clocks;
//! - `policy`: the wasmtime runtime; calls the policy component and verifies
//!   every answer before the host acts on it;
//! - `sandbox`: [`Sandbox`] and [`Backend`], the facade over the three, with
//!   gc and maintenance; `view`: what the CLI and the API show of a backend;
//! - `image`, `serve`: the sandbox images and the HTTP API, on the face.
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

pub mod config;
mod dataplane;
mod egress;
mod engine;
mod error;
mod policy;
mod provider;
mod sandbox;
mod state;
mod view;

pub mod image;
#[cfg(feature = "serve")]
pub mod serve;

pub use config::Config;
pub use egress::EgressCounts;
pub use engine::clock::now_ms;
pub use engine::ManagedContainer;
pub use error::{policy_text, Result, SandboxError};
pub use exec::{ExecOptions, ExecResponse, StreamKind};
pub use policy::client::VerifiedContainer;
pub use policy::containment::{InstanceLimits, Peak};
pub use policy::measure::{resident_bytes, InstanceCost};
pub use policy::source::PolicySource;
pub use policy::LoadReport;
pub use provider::docker::DockerProvider;
pub use provider::memory::MemoryProvider;
pub use provider::{
    ContainerPlan, ContainerProvider, ContainerRecord, ContainerStats, ExecIo, ProviderError,
    ProviderResult,
};
pub use sandbox::{
    Backend, Counters, GcEntry, GcOptions, GcReport, PortConnection, Sandbox, ThreadInfo,
};
pub use sandbox_contract::{BackendId, Removal, Status, ThreadId, UserId};
pub use view::BackendView;

/// Executes: what to run and how, and what came back.
pub mod exec {
    pub use crate::dataplane::exec::{
        check_execution_id, new_execution_id, EndReason, ExecOptions, ExecOutput, ExecRequest,
        ExecResponse, OutputSink, StreamKind, MAX_EXECUTION_ID_LEN, TIMEOUT_EXIT_CODE,
    };
}

/// File transfers: uploads, downloads and their per-file errors and caps.
pub mod files {
    pub use crate::dataplane::files::{
        DownloadResult, FileError, FileInfo, FileLimits, Upload, UploadResult, MAX_BATCH_BYTES,
        MAX_FILE_BYTES, MAX_FILE_BYTES_ENV,
    };
}

/// Background processes and terminals: how to start one, and what it is.
pub mod processes {
    pub use crate::dataplane::processes::{
        OutputChunk, ProcessId, ProcessInfo, ProcessOptions, ProcessOutput, Signal, TerminalSize,
        LOGIN_SHELL,
    };
    pub use sandbox_agent::protocol::{
        MAX_INLINE_STDIN as MAX_STDIN_WRITE, MAX_PROCESSES, MAX_READ_WAIT_MS, PROC_HEAD, PROC_TAIL,
    };
}

/// The embedded policy components (per-user, the default; per-thread).
pub mod policies {
    pub use crate::policy::embedded::*;
}

/// What the benchmark drives beyond the face: the engine under the policy
/// (its native-policy case) and the raw create body (its raw-bollard case).
/// Not a stable API.
#[cfg(feature = "bench-internals")]
#[doc(hidden)]
pub mod internals {
    pub use crate::engine::ownership::ownership_labels;
    pub use crate::engine::{Engine, RemoveMode};
    pub use crate::provider::docker::create_body;
}

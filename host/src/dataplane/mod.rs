//! The data plane's wire: what the host sends into a backend's container
//! and how it reads what comes back, below the provider that carries it.
//! [`exec`] builds and bounds a command (timeout, output cap, environment,
//! working directory); [`files`] holds the transfer scripts and byte-exact
//! sinks; [`agent`] is the in-container helper (`sandbox-agent`) the host
//! mounts into every container; [`processes`] the background processes
//! and terminals it keeps. The facade's executes and transfers that
//! use them are `Backend`'s, in `sandbox/`.

pub mod agent;
pub mod exec;
pub mod files;
pub mod processes;

/// Where the workspace is mounted in every container.
pub const WORKSPACE_MOUNT: &str = "/workspace";

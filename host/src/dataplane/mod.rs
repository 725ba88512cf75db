//! The data plane: what runs inside a backend's container once the policy
//! placed it. [`exec`] builds and bounds a command (timeout, output cap,
//! environment, working directory), [`run`] runs it; [`transfer`] moves files; [`files`]
//! holds their scripts and byte-exact sinks; [`agent`] is the in-container
//! helper that kills a timed-out command's whole process tree.

pub mod agent;
pub mod exec;
pub mod files;
pub mod run;
pub mod transfer;

//! The part of `sandbox-agent` the host shares: the wire protocol of
//! `sandbox-agent serve` ([`protocol`]). The binary itself is `main.rs`.

pub mod protocol;

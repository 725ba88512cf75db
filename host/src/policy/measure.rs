//! What one instance of a policy costs, measured rather than assumed: for
//! `sandbox policy check`, so operators can size `policy_pool_bytes`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{CompiledPolicy, PolicyInstance};
use crate::engine::Engine;
use crate::error::SandboxError;

/// The cost of one instance, averaged over a few.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct InstanceCost {
    /// Instances measured.
    pub instances: usize,
    /// Instantiating one, on average.
    pub instantiate: Duration,
    /// One warm call of the pure mapping, on average.
    pub warm_call: Duration,
    /// Resident memory one instance adds to the host process (after one
    /// call), in bytes; `None` where `/proc/self/statm` cannot be read.
    pub rss_bytes: Option<u64>,
}

/// Instantiates `n` instances of `policy` side by side, calls each once,
/// and reports their average cost.
pub async fn instance_cost(
    policy: &CompiledPolicy,
    host: &Arc<Engine>,
    n: usize,
) -> Result<InstanceCost, SandboxError> {
    let n = n.max(1);
    let before = resident_bytes();
    let mut instances: Vec<PolicyInstance> = Vec::with_capacity(n);
    let started = Instant::now();
    for _ in 0..n {
        instances.push(policy.instantiate(host.clone()).await?);
    }
    let instantiate = started.elapsed() / n as u32;
    // The first call of each instance touches its memory as a real one does.
    for instance in &mut instances {
        instance.backend_id("measure-1").await?;
    }
    let after = resident_bytes();
    let started = Instant::now();
    for instance in &mut instances {
        instance.backend_id("measure-2").await?;
    }
    let warm_call = started.elapsed() / n as u32;
    Ok(InstanceCost {
        instances: n,
        instantiate,
        warm_call,
        rss_bytes: before
            .zip(after)
            .map(|(b, a)| a.saturating_sub(b) / n as u64),
    })
}

/// This process's resident memory, in bytes.
pub fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .unwrap_or(4096) as u64;
    Some(pages * page)
}

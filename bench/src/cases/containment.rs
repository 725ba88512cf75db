//! `--containment POLICY`: many users' instances of a policy that allocates
//! without bound all grow past their limit at once; the host's peak RSS must
//! stay under the host-wide policy memory cap (instead of the table).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use futures_util::{stream, StreamExt};
use sandbox_host::config::Config;
use sandbox_host::MemoryProvider;
use sandbox_host::{PolicySource, Sandbox};

use crate::measure::rss;

/// Many users' policy instances trying to grow past their limit together:
/// the host-wide pool must hold the process's RSS.
pub(crate) async fn containment(policy: PathBuf, users: usize) -> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    let config = Config {
        namespace: format!("bench-{}", std::process::id()),
        workspace_root: root.path().to_owned(),
        maintenance_interval_secs: 0.0,
        ..Config::load(None)?
    };
    let sandbox = Sandbox::with_provider(
        config.clone(),
        Arc::new(MemoryProvider::new()),
        PolicySource::File(policy),
    )
    .await?;
    let (_, before) = rss();
    let started = Instant::now();
    let results = stream::iter(0..users)
        .map(|i| {
            let sandbox = sandbox.clone();
            async move { sandbox.get_thread_backend(&format!("alloc-{i}")).await }
        })
        .buffer_unordered(users)
        .collect::<Vec<_>>()
        .await;
    let trapped = results
        .iter()
        .filter(|r| matches!(r, Err(sandbox_host::SandboxError::PolicyTrap(_))))
        .count();
    let (peak, after) = rss();
    let mib = |b: u64| b as f64 / 1048576.0;
    println!(
        "containment: {users} users' instances grew past {} MiB each in {:.1}s; {trapped} trapped",
        config.policy_memory_bytes >> 20,
        started.elapsed().as_secs_f64()
    );
    println!(
        "host RSS: {:.0} MiB before, peak {:.0} MiB, {:.0} MiB after; host-wide policy memory cap {} MiB (uncapped it would be {} MiB)",
        mib(before),
        mib(peak),
        mib(after),
        config.policy_memory_total_bytes >> 20,
        (config.policy_memory_bytes >> 20) * users
    );
    anyhow::ensure!(trapped == users, "every instance must trap: {results:?}");
    anyhow::ensure!(
        peak.saturating_sub(before) <= config.policy_memory_total_bytes as u64 + (64 << 20),
        "peak RSS grew by more than the cap"
    );
    Ok(())
}

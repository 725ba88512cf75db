//! Measuring: wall time of one future, this process's RSS, the engine's RSS
//! (dockerd, containerd, shims) and a container's memory, so the latency and
//! footprint cases all sample the same way.

use std::time::{Duration, Instant};

use anyhow::Context;
use bollard::Docker;
use futures_util::StreamExt;

pub(crate) async fn timed<T>(
    f: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<(T, Duration)> {
    let start = Instant::now();
    let out = f.await?;
    Ok((out, start.elapsed()))
}

/// `VmHWM` (peak RSS) and `VmRSS` of this process, in bytes.
pub(crate) fn rss() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    };
    (field("VmHWM:"), field("VmRSS:"))
}

pub(crate) fn rss_kib() -> u64 {
    proc_rss_kib("self")
}

pub(crate) fn proc_rss_kib(pid: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

/// RSS of dockerd, containerd and every containerd shim.
pub(crate) fn engine_rss_kib() -> u64 {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let pid = e.file_name().to_string_lossy().into_owned();
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
            let comm = comm.trim();
            (comm == "dockerd" || comm == "containerd" || comm.starts_with("containerd-shim"))
                .then(|| proc_rss_kib(&pid))
        })
        .sum()
}

pub(crate) async fn container_memory(docker: &Docker, id: &str) -> anyhow::Result<u64> {
    let options = bollard::query_parameters::StatsOptionsBuilder::default()
        .stream(false)
        .one_shot(true)
        .build();
    let mut stats = docker.stats(id, Some(options));
    let s = stats.next().await.context("no stats")??;
    Ok(s.memory_stats.and_then(|m| m.usage).unwrap_or(0))
}

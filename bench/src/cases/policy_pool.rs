//! Case 10: what a policy costs by the language it is written in: the Rust
//! per-user policy against the same policy in Python (componentize-py),
//! each on the in-memory provider so only the policy path is measured:
//! warm path and its share of one exec, cold instantiate, memory per
//! instance, the host's RSS with 1,000 and 10,000 users, and the warm p99
//! when 50 users call at once (instances come from a pool bounded by
//! memory, so they queue for one rather than each owning one).
//!
//! The RSS rows run in a child process each (`--pool-footprint`), so one
//! policy's allocations do not hide in the other's numbers.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use sandbox_host::config::Config;
use sandbox_host::MemoryProvider;
use sandbox_host::{resident_bytes, PolicySource, Sandbox};

use super::{my_ids, Bench};
use crate::report::{ms, percentile};

/// Where `cargo test-all` builds the Python per-user policy.
pub(crate) const PYTHON_POLICY_ENV: &str = "SANDBOX_PYTHON_POLICY";

/// The Python policy: `$SANDBOX_PYTHON_POLICY`, else the xtask's build.
pub(crate) fn python_policy() -> PathBuf {
    std::env::var_os(PYTHON_POLICY_ENV).map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/policies/python-per-user.wasm"),
        PathBuf::from,
    )
}

/// A sandbox with `policy` on the in-memory provider.
async fn memory_sandbox(
    config: &Config,
    root: &Path,
    policy: PolicySource,
) -> anyhow::Result<Sandbox> {
    let config = Config {
        workspace_root: root.to_owned(),
        sandbox_user: Some(my_ids()),
        maintenance_interval_secs: 0.0,
        ..config.clone()
    };
    Ok(Sandbox::with_provider(config, Arc::new(MemoryProvider::new()), policy).await?)
}

/// One warm policy path: the mapping and `ensure-container` of a user
/// whose container exists.
async fn policy_path(sandbox: &Sandbox, thread: &str) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let backend = sandbox.get_thread_backend(thread).await?;
    backend.ensure_container().await?;
    Ok(start.elapsed())
}

fn us(d: Duration) -> String {
    format!("{:.1} us", d.as_secs_f64() * 1e6)
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1 << 20) as f64)
}

impl Bench {
    /// (10) Rust and Python policies side by side.
    pub(crate) async fn policy_pool(&mut self, exec_median: Duration) -> anyhow::Result<()> {
        let python = python_policy();
        anyhow::ensure!(
            python.exists(),
            "{} is missing: `cargo test-all` builds it (or set {PYTHON_POLICY_ENV})",
            python.display()
        );
        let policies = [
            ("Rust", PolicySource::Builtin("per-user".into())),
            ("Python", PolicySource::File(python.clone())),
        ];
        let rounds = if self.smoke { 200 } else { 3000 };
        let mut rows = Vec::new();
        for (lang, source) in policies {
            let root = tempfile::tempdir()?;
            let sandbox = memory_sandbox(&self.config, root.path(), source).await?;
            policy_path(&sandbox, "alice-1").await?;
            let mut warm = Vec::with_capacity(rounds);
            for _ in 0..rounds {
                warm.push(policy_path(&sandbox, "alice-1").await?);
            }
            let cost = sandbox.policy_instance_cost(8).await?;
            let report = sandbox.policy_report();
            // 50 users at once, warm: they share the pool's instances.
            let sandbox = Arc::new(sandbox);
            let users = 50;
            for u in 0..users {
                policy_path(&sandbox, &format!("c{u}-1")).await?;
            }
            let per_user = if self.smoke { 4 } else { 40 };
            // One burst first, so the pool has grown to what 50 callers
            // need: the measured p99 is of warm calls, not of making the
            // instances (each ~1 ms for Python, on the same 2 cores).
            let warmup = (0..users).map(|u| {
                let sandbox = sandbox.clone();
                tokio::spawn(async move { policy_path(&sandbox, &format!("c{u}-1")).await })
            });
            for r in futures_util::future::join_all(warmup).await {
                r??;
            }
            let calls = (0..users).map(|u| {
                let sandbox = sandbox.clone();
                tokio::spawn(async move {
                    let mut lat = Vec::with_capacity(per_user);
                    for _ in 0..per_user {
                        lat.push(policy_path(&sandbox, &format!("c{u}-1")).await?);
                    }
                    anyhow::Ok(lat)
                })
            });
            let mut together = Vec::new();
            for r in futures_util::future::join_all(calls).await {
                together.extend(r??);
            }
            rows.push((
                lang,
                warm,
                cost,
                report,
                together,
                sandbox.policy_pool_capacity(),
            ));
        }
        for (lang, warm, cost, report, together, capacity) in &rows {
            let med = percentile(warm, 0.5);
            self.table.add(
                &format!("10. warm policy path, {lang} policy (memory provider), and its share of one warm exec"),
                format!("{} (p99 {})", us(med), us(percentile(warm, 0.99))),
                ms(exec_median),
                format!("{:.3}%", 100.0 * med.as_secs_f64() / exec_median.as_secs_f64()),
                if *lang == "Python" { "< 1 ms" } else { "(context)" },
            );
            self.table.add(
                &format!("10. {lang} policy: compile (or cache read), cold instantiate, memory per instance"),
                format!(
                    "compile {} ({}), instantiate {}",
                    ms(report.compile_time),
                    if report.cached { "cached" } else { "compiled" },
                    ms(cost.instantiate)
                ),
                format!(
                    "{} linear memory and tables, {} resident",
                    mib(report.peak.charged_bytes as u64),
                    cost.rss_bytes.map_or_else(|| "?".into(), mib)
                ),
                format!("pool of {capacity}"),
                "report",
            );
            self.table.add(
                &format!("10. {lang} policy: warm p99 with 50 users calling at once (default pool budget)"),
                format!("p99 {}", ms(percentile(together, 0.99))),
                format!("p50 {}", ms(percentile(together, 0.5))),
                format!("{} calls", together.len()),
                "p99 < 5 ms",
            );
        }
        let user_counts: &[usize] = if self.smoke {
            &[200, 1000]
        } else {
            &[1000, 10_000]
        };
        for (lang, flag) in [
            ("Rust", "per-user".to_owned()),
            ("Python", python.display().to_string()),
        ] {
            let mut cells = Vec::new();
            for &users in user_counts {
                let out = tokio::process::Command::new(std::env::current_exe()?)
                    .args(["--pool-footprint", &flag, "--users", &users.to_string()])
                    .output()
                    .await?;
                anyhow::ensure!(
                    out.status.success(),
                    "the footprint child failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                let text = String::from_utf8(out.stdout)?;
                let rss: u64 = text
                    .trim()
                    .parse()
                    .with_context(|| format!("child said {text:?}"))?;
                cells.push(format!("{users} users: {}", mib(rss)));
            }
            self.table.add(
                &format!("10. host RSS, {lang} policy, every user warm (memory provider, one process each)"),
                cells.join(", "),
                String::new(),
                String::new(),
                if lang == "Python" { "< 1 GiB at 10,000" } else { "report" },
            );
        }
        Ok(())
    }
}

/// The child of the RSS rows: serves `users` users once each with `policy`
/// (`per-user`, or a component path) and prints the process's peak RSS in
/// bytes.
pub(crate) async fn pool_footprint(policy: String, users: usize) -> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    let source = if policy == "per-user" {
        PolicySource::Builtin(policy)
    } else {
        PolicySource::File(policy.into())
    };
    let config = Config {
        namespace: format!("bench-pool-{}", std::process::id()),
        ..Config::load(None)?
    };
    let sandbox = Arc::new(memory_sandbox(&config, root.path(), source).await?);
    // Eight callers at a time, like a busy server.
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let workers = (0..8).map(|_| {
        let (sandbox, next) = (sandbox.clone(), next.clone());
        tokio::spawn(async move {
            loop {
                let u = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if u >= users {
                    return anyhow::Ok(());
                }
                policy_path(&sandbox, &format!("u{u}-1")).await?;
            }
        })
    });
    for w in futures_util::future::join_all(workers).await {
        w??;
    }
    let peak = peak_rss().or_else(resident_bytes).unwrap_or(0);
    println!("{peak}");
    Ok(())
}

/// This process's peak resident memory (VmHWM), in bytes.
fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

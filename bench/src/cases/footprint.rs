//! Case 7: footprint. Host RSS per backend on the in-memory provider, and
//! containers, container memory and engine RSS for the same threads under
//! the per-user and the per-thread policy: what one container per user
//! saves.

use std::sync::Arc;

use sandbox_host::config::Config;
use sandbox_host::DockerProvider;
use sandbox_host::MemoryProvider;
use sandbox_host::{PolicySource, Sandbox};

use super::{my_ids, Bench};
use crate::measure::{container_memory, engine_rss_kib, rss_kib};

impl Bench {
    /// (7) footprint.
    pub(crate) async fn footprint(&mut self) -> anyhow::Result<()> {
        let n = if self.smoke { 500 } else { 10_000 };
        let root = tempfile::tempdir()?;
        let config = Config {
            workspace_root: root.path().to_owned(),
            sandbox_user: Some(my_ids()),
            ..self.config.clone()
        };
        let rss_before = rss_kib();
        let sandbox = Sandbox::with_provider(
            config,
            Arc::new(MemoryProvider::new()),
            PolicySource::Builtin("per-user".into()),
        )
        .await?;
        for i in 0..n {
            let b = sandbox.get_thread_backend(&format!("fp{i}-1")).await?;
            b.ensure_container().await?;
        }
        let rss_after = rss_kib();
        let delta = rss_after.saturating_sub(rss_before);
        let instances = sandbox.policy_instances();
        self.table.add(
            &format!(
                "7. host RSS with {n} backends in use (in-memory provider; {instances} policy instances alive, lent per call from the pool)"
            ),
            format!("{:.1} MiB (+{:.1} KiB/backend)", delta as f64 / 1024.0, delta as f64 / n as f64),
            format!("{:.1} MiB before", rss_before as f64 / 1024.0),
            "-".into(),
            "(report)",
        );
        drop(sandbox);

        let (users, threads) = if self.smoke { (2, 3) } else { (10, 10) };
        let mut figures = Vec::new();
        for policy in ["per-user", "per-thread"] {
            let ns = format!("{}-{}", self.config.namespace, &policy[4..]);
            let config = Config {
                namespace: ns.clone(),
                ..self.config.clone()
            };
            let sandbox = Sandbox::with_provider(
                config.clone(),
                Arc::new(DockerProvider::from_config(&config)),
                PolicySource::Builtin(policy.into()),
            )
            .await?;
            let engine_before = engine_rss_kib();
            let batch: Vec<String> = (0..users).map(|_| self.fresh_user("fp")).collect();
            for u in &batch {
                for t in 0..threads {
                    sandbox
                        .get_thread_backend(&format!("{u}-{t}"))
                        .await?
                        .execute("true")
                        .await?;
                }
            }
            let containers = sandbox.list().await?;
            let mut memory = 0u64;
            for c in &containers {
                memory += container_memory(&self.docker, &c.id).await.unwrap_or(0);
            }
            let engine_delta = engine_rss_kib().saturating_sub(engine_before);
            figures.push((policy, containers.len(), memory, engine_delta));
            for u in &batch {
                sandbox.destroy_user_backend(u).await?;
            }
        }
        let show = |f: &(&str, usize, u64, u64)| {
            format!(
                "{}: {} containers, {:.1} MiB in containers, +{:.1} MiB engine (dockerd+shims)",
                f.0,
                f.1,
                f.2 as f64 / 1048576.0,
                f.3 as f64 / 1024.0
            )
        };
        self.table.add(
            &format!(
                "7. {} threads of {users} users: per-user vs per-thread policy",
                users * threads
            ),
            show(&figures[0]),
            show(&figures[1]),
            format!(
                "{:.1}x fewer containers",
                figures[1].1 as f64 / figures[0].1.max(1) as f64
            ),
            ">= 10x fewer",
        );
        Ok(())
    }
}

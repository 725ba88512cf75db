//! Case 4: many users' first calls at once (exactly one container per user,
//! concurrent faster than sequential) and warm-exec throughput at
//! concurrency 50 against raw bollard: the per-key lanes must neither race
//! nor serialize.

use std::time::Instant;

use futures_util::{stream, StreamExt};

use super::Bench;
use crate::baseline::raw_exec;
use crate::report::ms;

impl Bench {
    /// (4) 20 users x 10 threads, all first calls at once; then warm
    /// throughput at concurrency 50.
    pub(crate) async fn concurrency(&mut self) -> anyhow::Result<()> {
        let (users, threads) = if self.smoke { (4, 3) } else { (20, 10) };
        let batch: Vec<String> = (0..users).map(|_| self.fresh_user("conc")).collect();
        let before = self.sandbox.list().await?.len();
        let start = Instant::now();
        let calls = batch
            .iter()
            .flat_map(|u| (0..threads).map(move |t| format!("{u}-{t}")));
        let tasks: Vec<_> = calls
            .map(|thread| {
                let sandbox = self.sandbox.clone();
                tokio::spawn(async move {
                    let b = sandbox.get_thread_backend(&thread).await?;
                    b.execute("true").await
                })
            })
            .collect();
        for t in futures_util::future::join_all(tasks).await {
            t??;
        }
        let concurrent = start.elapsed();
        let created = self.sandbox.list().await?.len() - before;

        let seq_users: Vec<String> = (0..users).map(|_| self.fresh_user("seq")).collect();
        let start = Instant::now();
        for u in &seq_users {
            for t in 0..threads {
                let b = self.sandbox.get_thread_backend(&format!("{u}-{t}")).await?;
                b.execute("true").await?;
            }
        }
        let sequential = start.elapsed();
        for u in &seq_users {
            self.sandbox.destroy_user_backend(u).await?;
        }
        self.table.add(
            &format!(
                "4. {users} users x {threads} threads, first calls at once: containers created"
            ),
            created.to_string(),
            format!("{users} expected"),
            if created == users {
                "exact".into()
            } else {
                "WRONG".into()
            },
            &format!("exactly {users}"),
        );
        self.table.add(
            "4. same burst: concurrent wall vs sequential wall",
            ms(concurrent),
            ms(sequential),
            format!("{:.3}", concurrent.as_secs_f64() / sequential.as_secs_f64()),
            "<= 0.5",
        );

        // Warm throughput at concurrency 50 over those users' containers.
        let total = if self.smoke { 50 } else { 600 };
        let mut backends = Vec::new();
        let mut containers = Vec::new();
        for u in &batch {
            let b = self.sandbox.get_thread_backend(&format!("{u}-0")).await?;
            containers.push(b.ensure_container().await?.id);
            backends.push(b);
        }
        let (mut ours, mut raw) = (vec![], vec![]);
        for _ in 0..3 {
            let start = Instant::now();
            stream::iter(0..total)
                .map(|i| {
                    let b = backends[i % backends.len()].clone();
                    async move { b.execute("true").await }
                })
                .buffer_unordered(50)
                .for_each(|r| async move {
                    r.expect("warm execute");
                })
                .await;
            ours.push(total as f64 / start.elapsed().as_secs_f64());
            let start = Instant::now();
            let docker = &self.docker;
            let containers = &containers;
            stream::iter(0..total)
                .map(|i| async move { raw_exec(docker, &containers[i % containers.len()]).await })
                .buffer_unordered(50)
                .for_each(|r| async move {
                    r.expect("raw exec");
                })
                .await;
            raw.push(total as f64 / start.elapsed().as_secs_f64());
        }
        let median = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let (ours, raw) = (median(&mut ours), median(&mut raw));
        self.table.add(
            "4. warm executes at concurrency 50: throughput vs raw bollard (median of 3 interleaved rounds)",
            format!("{ours:.0}/s"),
            format!("{raw:.0}/s"),
            format!("{:.3}", ours / raw),
            ">= 8",
        );
        for u in &batch {
            self.sandbox.destroy_user_backend(u).await?;
        }
        Ok(())
    }
}

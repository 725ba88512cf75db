//! Cases 13 and 14: what the stronger tiers cost, side by side in one run.
//! 13: gVisor (`runsc`) against the engine's default runtime (`runc`) for a
//! warm execute, a cold first call and a file transfer, each pair
//! interleaved. 14: a write-heavy command in a workspace bounded by
//! `workspace_quota` (its own loop-mounted ext4) against a plain bind
//! mount.

use std::time::{Duration, Instant};

use sandbox_host::config::Config;
use sandbox_host::files::Upload;
use sandbox_host::{DockerProvider, PolicySource, Sandbox};

use super::Bench;
use crate::report::{med_p95, ms, percentile, ratio};

async fn sandbox_of(config: Config) -> anyhow::Result<Sandbox> {
    let provider = std::sync::Arc::new(DockerProvider::from_config(&config));
    Ok(Sandbox::with_provider(config, provider, PolicySource::Builtin("per-user".into())).await?)
}

/// Lazily unmounts what is mounted under `root` (the quota case's
/// workspaces) when dropped.
struct Unmount(std::path::PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let table = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let root = self.0.to_string_lossy().into_owned();
        for point in table.lines().filter_map(|l| l.split(' ').nth(4)) {
            if point.starts_with(&root) {
                let _ = std::process::Command::new("umount")
                    .args(["-l", point])
                    .status();
            }
        }
    }
}

impl Bench {
    /// (13) gVisor against runc: warm execute, cold first call, a file
    /// transfer both ways.
    pub(crate) async fn isolation_tiers(&mut self) -> anyhow::Result<()> {
        let tier = |runtime: Option<&str>, tag: &str| Config {
            namespace: format!("{}-{tag}", self.config.namespace),
            runtime: runtime.map(str::to_owned),
            ..self.config.clone()
        };
        let gvisor = sandbox_of(tier(Some("runsc"), "runsc"))
            .await
            .map_err(|e| {
                anyhow::anyhow!("{e}: case 13 needs runsc registered (cargo test-all does it)")
            })?;
        let runc = sandbox_of(tier(None, "runc")).await?;
        let (g, r) = (
            gvisor.get_thread_backend("tier-1").await?,
            runc.get_thread_backend("tier-1").await?,
        );
        g.execute("true").await?;
        r.execute("true").await?;
        let (mut warm_g, mut warm_r) = (vec![], vec![]);
        for _ in 0..self.iterations {
            let t = Instant::now();
            g.execute("true").await?;
            warm_g.push(t.elapsed());
            let t = Instant::now();
            r.execute("true").await?;
            warm_r.push(t.elapsed());
        }
        self.table.add(
            "13a. warm execute `true`: gVisor (runsc) vs runc",
            med_p95(&warm_g),
            med_p95(&warm_r),
            format!("{:.2}", ratio(&warm_g, &warm_r)),
            "(report)",
        );

        let cold_runs = if self.smoke { 2 } else { 8 };
        let (mut cold_g, mut cold_r) = (vec![], vec![]);
        for i in 0..cold_runs {
            for (sandbox, samples) in [(&gvisor, &mut cold_g), (&runc, &mut cold_r)] {
                let user = format!("cold{i}");
                let t = Instant::now();
                sandbox
                    .get_thread_backend(&format!("{user}-1"))
                    .await?
                    .execute("true")
                    .await?;
                samples.push(t.elapsed());
                sandbox.destroy_user_backend(&user).await?;
            }
        }
        self.table.add(
            "13b. cold first call (create, start, execute): gVisor vs runc",
            med_p95(&cold_g),
            med_p95(&cold_r),
            format!("{:.2}", ratio(&cold_g, &cold_r)),
            "(report)",
        );

        let mib = if self.smoke { 5 } else { 50 };
        let content: Vec<u8> = (0..mib << 20).map(|i| (i % 251) as u8).collect();
        let (mut move_g, mut move_r) = (vec![], vec![]);
        for _ in 0..3 {
            for (b, samples) in [(&g, &mut move_g), (&r, &mut move_r)] {
                let t = Instant::now();
                b.upload_files(vec![Upload {
                    path: "blob.bin".into(),
                    content: content.clone(),
                    mode: None,
                }])
                .await?;
                let down = b.download_files(&["blob.bin".to_owned()]).await?;
                anyhow::ensure!(down[0].content.as_ref().map(Vec::len) == Some(content.len()));
                samples.push(t.elapsed());
            }
        }
        self.table.add(
            &format!("13c. {mib} MiB file up and back down: gVisor vs runc"),
            ms(percentile(&move_g, 0.5)),
            ms(percentile(&move_r, 0.5)),
            format!("{:.2}", ratio(&move_g, &move_r)),
            "(report)",
        );
        let _ = gvisor.destroy_user_backend("tier").await;
        let _ = runc.destroy_user_backend("tier").await;
        Ok(())
    }

    /// (14) writes into a quota-bounded workspace vs a plain bind mount.
    pub(crate) async fn quota_cost(&mut self) -> anyhow::Result<()> {
        anyhow::ensure!(
            nix::unistd::geteuid().is_root(),
            "case 14 mounts filesystems (workspace_quota): run it as root"
        );
        let root = tempfile::tempdir()?;
        let _unmount = Unmount(root.path().canonicalize()?);
        let bounded = sandbox_of(Config {
            namespace: format!("{}-quota", self.config.namespace),
            workspace_root: root.path().to_owned(),
            workspace_quota: 1 << 30,
            ..self.config.clone()
        })
        .await?;
        let plain = sandbox_of(Config {
            namespace: format!("{}-plain", self.config.namespace),
            ..self.config.clone()
        })
        .await?;
        let (q, p) = (
            bounded.get_thread_backend("quota-1").await?,
            plain.get_thread_backend("quota-1").await?,
        );
        let mib = if self.smoke { 16 } else { 200 };
        let files = if self.smoke { 200 } else { 2000 };
        // Big sequential writes made durable, then many small files.
        let work = format!(
            "dd if=/dev/zero of=big bs=1M count={mib} conv=fsync 2>/dev/null && rm big && \
             mkdir -p many && i=0; while [ $i -lt {files} ]; do echo $i > many/$i; \
             i=$((i+1)); done; sync; rm -rf many"
        );
        q.execute("true").await?;
        p.execute("true").await?;
        let (mut ours, mut base) = (vec![], vec![]);
        for _ in 0..3 {
            for (b, samples) in [(&q, &mut ours), (&p, &mut base)] {
                let t = Instant::now();
                let r = b
                    .execute_with(
                        &work,
                        sandbox_host::ExecOptions {
                            timeout: Some(Duration::from_secs(600)),
                            ..Default::default()
                        },
                    )
                    .await?;
                anyhow::ensure!(r.exit_code == 0, "{r:?}");
                samples.push(t.elapsed());
            }
        }
        self.table.add(
            &format!(
                "14. {mib} MiB written with fsync + {files} small files: workspace_quota (loop ext4) vs bind mount"
            ),
            ms(percentile(&ours, 0.5)),
            ms(percentile(&base, 0.5)),
            format!("{:.2}", ratio(&ours, &base)),
            "(report)",
        );
        let _ = bounded.destroy_user_backend("quota").await;
        let _ = plain.destroy_user_backend("quota").await;
        Ok(())
    }
}

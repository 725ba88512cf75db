//! Case 6: `sandbox exec` as a whole process (start-up, component cache,
//! engine round trips) against `docker exec`: the CLI must be no slower
//! than the tool it replaces.

use super::Bench;
use crate::baseline::docker_cli;
use crate::measure::timed;
use crate::report::{med_p95, ratio};

impl Bench {
    /// (6) `sandbox exec` as a process vs `docker exec`.
    pub(crate) async fn cli_process(&mut self) -> anyhow::Result<()> {
        let exe = std::env::current_exe()?.with_file_name("sandbox");
        if !exe.exists() {
            println!(
                "  6. skipped: {} missing (cargo build --release --bins)",
                exe.display()
            );
            return Ok(());
        }
        let b = self.sandbox.get_thread_backend("cli-1").await?;
        b.execute("true").await?;
        let container = b.ensure_container().await?.id;
        let run_ours = || {
            let mut cmd = tokio::process::Command::new(&exe);
            cmd.args(["exec", "cli-1", "--", "true"])
                .env("SANDBOX_NAMESPACE", &self.config.namespace)
                .env("SANDBOX_WORKSPACE_ROOT", &self.config.workspace_root)
                .env("SANDBOX_IMAGE", &self.config.image)
                .env("RUST_LOG", "error")
                .stdout(std::process::Stdio::null());
            cmd
        };
        // Warm the component cache once, as any second run would find it.
        run_ours().status().await?;
        let (mut ours, mut cli) = (vec![], vec![]);
        let n = if self.smoke {
            3
        } else {
            self.iterations.min(30)
        };
        for _ in 0..n {
            ours.push(
                timed(async {
                    let s = run_ours().status().await?;
                    anyhow::ensure!(s.success(), "sandbox exec failed");
                    Ok(())
                })
                .await?
                .1,
            );
            cli.push(timed(docker_cli(&["exec", &container, "true"])).await?.1);
        }
        self.table.add(
            "6. `sandbox exec alice-1 -- true` process vs `docker exec C true`",
            med_p95(&ours),
            med_p95(&cli),
            format!("{:.3}", ratio(&ours, &cli)),
            "<= 0.5",
        );
        Ok(())
    }
}

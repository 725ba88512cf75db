//! Case 1: warm `execute("true")` on a running container, through the
//! in-container agent, against raw bollard and `docker exec`; and the
//! agent's memory in each container.

use std::time::Duration;

use super::Bench;
use crate::baseline::{docker_cli, raw_exec};
use crate::measure::timed;
use crate::report::{med_p95, percentile, ratio};

/// The pause before each timed call.
pub(super) const SETTLE: Duration = Duration::from_millis(20);

impl Bench {
    /// (1) warm execute("true").
    pub(crate) async fn warm_exec(&mut self) -> anyhow::Result<Duration> {
        let backend = self.sandbox.get_thread_backend("warm-1").await?;
        backend.execute("true").await?;
        let container = backend.ensure_container().await?.id;
        let (mut ours, mut raw, mut cli) = (vec![], vec![], vec![]);
        let mut via_agent = 0;
        for _ in 0..self.iterations {
            // Each timed call starts on a machine at rest: what the engine
            // does after an exec returned (the shim's and dockerd's
            // clean-up) must not land in the next call's time, whichever
            // kind it is.
            tokio::time::sleep(SETTLE).await;
            let (r, took) = timed(async { Ok(backend.execute("true").await?) }).await?;
            via_agent += usize::from(r.via_agent);
            ours.push(took);
            tokio::time::sleep(SETTLE).await;
            raw.push(timed(raw_exec(&self.docker, &container)).await?.1);
            tokio::time::sleep(SETTLE).await;
            cli.push(timed(docker_cli(&["exec", &container, "true"])).await?.1);
        }
        let case = format!(
            "1. warm execute(\"true\") through the agent ({via_agent}/{} via the agent)",
            self.iterations
        );
        self.table.add(
            &format!("{case} vs raw bollard exec"),
            med_p95(&ours),
            med_p95(&raw),
            format!("{:.3}", ratio(&ours, &raw)),
            "median <= 0.05",
        );
        self.table.add(
            &format!("{case} vs `docker exec C true`"),
            med_p95(&ours),
            med_p95(&cli),
            format!("{:.3}", ratio(&ours, &cli)),
            "(context)",
        );
        // The agent's resident memory in this container: init and serve
        // (root, out of the workload's reach, but their status is readable).
        let kib = self.agent_rss_kib("warm").await?;
        self.table.add(
            "1. the agent's memory per container (init + serve, resident)",
            format!("{:.2} MiB", kib as f64 / 1024.0),
            "init + serve".to_owned(),
            String::new(),
            "report",
        );
        Ok(percentile(&ours, 0.5))
    }
}

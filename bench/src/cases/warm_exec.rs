//! Case 1: warm `execute("true")` on a running container, against raw
//! bollard and `docker exec`: what the library adds to every call.

use std::time::Duration;

use super::Bench;
use crate::baseline::{docker_cli, raw_exec};
use crate::measure::timed;
use crate::report::{med_p95, percentile, ratio};

impl Bench {
    /// (1) warm execute("true").
    pub(crate) async fn warm_exec(&mut self) -> anyhow::Result<Duration> {
        let backend = self.sandbox.get_thread_backend("warm-1").await?;
        backend.execute("true").await?;
        let container = backend.ensure_container().await?.id;
        let (mut ours, mut raw, mut cli) = (vec![], vec![], vec![]);
        for _ in 0..self.iterations {
            ours.push(timed(async { Ok(backend.execute("true").await?) }).await?.1);
            raw.push(timed(raw_exec(&self.docker, &container)).await?.1);
            cli.push(timed(docker_cli(&["exec", &container, "true"])).await?.1);
        }
        let case = "1. warm execute(\"true\")";
        self.table.add(
            &format!("{case} vs raw bollard exec"),
            med_p95(&ours),
            med_p95(&raw),
            format!("{:.3}", ratio(&ours, &raw)),
            "<= 1.05",
        );
        self.table.add(
            &format!("{case} vs `docker exec C true`"),
            med_p95(&ours),
            med_p95(&cli),
            format!("{:.3}", ratio(&ours, &cli)),
            "<= 0.75",
        );
        Ok(percentile(&ours, 0.5))
    }
}

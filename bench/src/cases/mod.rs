//! The benchmark cases, one module each, run in order on one [`Bench`]:
//! one library instance, one engine connection and one table shared by all,
//! so every ratio compares contenders measured in the same run.

use anyhow::Context;
use bollard::Docker;
use sandbox_host::config::{Config, UserIds};
use sandbox_host::Sandbox;

use crate::report::Table;

mod cli_process;
mod cold_start;
mod concurrency;
pub(crate) mod containment;
mod egress;
mod file_transfer;
mod footprint;
mod head_of_line;
mod http_load;
mod isolation;
mod policy_cost;
pub(crate) mod policy_pool;
mod preview;
mod scale;
mod warm_exec;

/// What every case shares: the library under test (per-user policy, Docker
/// provider), a raw engine connection for the baselines, the report.
pub(crate) struct Bench {
    pub(crate) config: Config,
    pub(crate) sandbox: Sandbox,
    pub(crate) docker: Docker,
    pub(crate) iterations: usize,
    pub(crate) smoke: bool,
    pub(crate) table: Table,
    pub(crate) user_seq: usize,
    /// The cases to run; all when empty.
    pub(crate) only: Vec<u32>,
    /// Live users case 15 grows to.
    pub(crate) scale_users: usize,
}

impl Bench {
    /// A user id no earlier case has used.
    fn fresh_user(&mut self, tag: &str) -> String {
        self.user_seq += 1;
        format!("{tag}{}", self.user_seq)
    }
}

pub(crate) async fn run(bench: &mut Bench) -> anyhow::Result<()> {
    let wanted = |n: u32, bench: &Bench| bench.only.is_empty() || bench.only.contains(&n);
    // Case 1's median is the unit of cases 3 and 10: always measured.
    let exec_median = bench.warm_exec().await.context("case 1")?;
    if wanted(2, bench) {
        bench.cold_start().await.context("case 2")?;
    }
    if wanted(3, bench) {
        bench.policy_cost(exec_median).await.context("case 3")?;
    }
    if wanted(4, bench) {
        bench.concurrency().await.context("case 4")?;
    }
    if wanted(5, bench) {
        bench.head_of_line().await.context("case 5")?;
    }
    if wanted(6, bench) {
        bench.cli_process().await.context("case 6")?;
    }
    if wanted(7, bench) {
        bench.footprint().await.context("case 7")?;
    }
    if wanted(8, bench) {
        bench.http_load().await.context("case 8")?;
    }
    if wanted(9, bench) {
        bench.file_transfer().await.context("case 9")?;
    }
    if wanted(10, bench) {
        bench.policy_pool(exec_median).await.context("case 10")?;
    }
    if wanted(11, bench) {
        bench.egress().await.context("case 11")?;
    }
    if wanted(12, bench) {
        bench.preview().await.context("case 12")?;
    }
    if wanted(13, bench) {
        bench.isolation_tiers().await.context("case 13")?;
    }
    if wanted(14, bench) {
        bench.quota_cost().await.context("case 14")?;
    }
    if wanted(15, bench) {
        bench.scale().await.context("case 15")?;
    }
    Ok(())
}

pub(crate) fn my_ids() -> UserIds {
    // This process's ids, or 1000:1000 when it is root: a root sandbox
    // user is refused.
    Config::default().sandbox_user()
}

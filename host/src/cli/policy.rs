//! `sandbox policy`: check a policy component against the `sandbox` world, or export a built-in one.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use sandbox_host::{policies, Config, InstanceCost, LoadReport};

use super::open;

#[derive(clap::Subcommand)]
pub enum PolicyCommand {
    /// Load a component, check it targets the `sandbox` world and passes the self-check.
    Check {
        /// The policy component (.wasm).
        path: PathBuf,
    },
    /// Write a built-in policy component (per-user, per-thread) to a file.
    Export {
        /// `per-user` or `per-thread`.
        name: String,
        /// Where to write the component.
        output: PathBuf,
    },
}

pub async fn run(config: Config, command: PolicyCommand) -> anyhow::Result<ExitCode> {
    match command {
        PolicyCommand::Check { path } => {
            let sandbox = open(
                Config {
                    policy: Some(path.clone()),
                    ..config
                },
                false,
            )
            .await?;
            let backend = sandbox.backend_id("alice-1").await?;
            let report = sandbox.policy_report();
            println!(
                "{}: ok, policy {:?} targets the sandbox world {} (alice-1 -> backend {backend})",
                path.display(),
                sandbox.policy_name(),
                report.world,
            );
            let defined: Vec<String> = sandbox
                .config()
                .profiles()
                .into_iter()
                .map(|p| p.name.to_string())
                .collect();
            let profile = match sandbox.profile_of("alice-1").await {
                Ok(profile) if report.world == "0.3" => {
                    format!("{profile} (a 0.3 policy cannot choose: every backend gets it)")
                }
                Ok(profile) => profile,
                Err(e) => format!("refused: {e}"),
            };
            println!(
                "  profiles:     backend {backend} gets {profile}; this host defines {}",
                defined.join(", ")
            );
            let cost = sandbox.policy_instance_cost(MEASURED_INSTANCES).await?;
            print!(
                "{}",
                describe(&report, &cost, sandbox.policy_pool_capacity())
            );
            Ok(ExitCode::SUCCESS)
        }
        PolicyCommand::Export { name, output } => {
            let bytes = policies::builtin(&name)
                .with_context(|| format!("no built-in policy {name:?} (per-user, per-thread)"))?;
            std::fs::write(&output, bytes)
                .with_context(|| format!("writing {}", output.display()))?;
            println!("wrote {} ({} bytes)", output.display(), bytes.len());
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Instances `policy check` makes to measure one's cost.
const MEASURED_INSTANCES: usize = 8;

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1 << 20) as f64)
}

/// What an operator needs to size the pool: compile, instantiate and call
/// times, memory per instance, the limits and how many instances fit.
fn describe(report: &LoadReport, cost: &InstanceCost, capacity: usize) -> String {
    let ms = |d: std::time::Duration| format!("{:.2} ms", d.as_secs_f64() * 1e3);
    let needs = &report.needs;
    let limits = &report.limits;
    let rss = cost.rss_bytes.map_or_else(|| "unknown".to_owned(), mib);
    format!(
        "  compile:      {} ({})\n\
         \x20 instantiate:  {} (self-check), {} on average over {} more\n\
         \x20 warm call:    {} (backend-id)\n\
         \x20 memory:       {} linear memory and tables per instance, {} resident each\n\
         \x20 declares:     {} core instances, {} memories, {} tables\n\
         \x20 limits:       {} per memory, {} table elements (sized from the self-check, within the ceilings)\n\
         \x20 pool:         up to {} instances alive (policy_pool_bytes / memory per instance, within max_policy_instances)\n",
        ms(report.compile_time),
        if report.cached { "read from the component cache" } else { "compiled, now cached" },
        ms(report.instantiate_time),
        ms(cost.instantiate),
        cost.instances,
        ms(cost.warm_call),
        mib(report.peak.charged_bytes as u64),
        rss,
        needs.core_instances,
        needs.memories,
        needs.tables,
        mib(limits.memory_bytes as u64),
        limits.table_elements,
        capacity,
    )
}

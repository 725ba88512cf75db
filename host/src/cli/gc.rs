//! `sandbox gc`: remove managed containers no backend owns any more, or older than a given age.

use std::process::ExitCode;
use std::time::Duration;

use sandbox_host::{Config, GcOptions};

use super::{age_arg, open};

#[derive(clap::Args)]
pub struct GcArgs {
    /// Only list what would be removed.
    #[arg(long)]
    pub dry_run: bool,
    /// Also remove containers created longer ago than this: 12h, 7d,
    /// 90m, or plain seconds.
    #[arg(long, visible_alias = "max-age-secs", value_name = "DURATION", value_parser = age_arg)]
    pub max_age: Option<Duration>,
    /// Also collect the containers another policy made (another component,
    /// told by the digest label): a server run with another `--policy`
    /// than this command's. Without it they are left alone but for the
    /// host's orphan rules (stopped, dead, mislabelled).
    #[arg(long)]
    pub other_policies: bool,
    /// Also replace idle containers made with other settings than this
    /// command's (`ls` marks them outdated). Without it they are listed and
    /// left to the server's maintenance, which replaces them when idle: a
    /// shell with other settings (root's default sandbox user, another
    /// config file) must not remove the server's containers.
    #[arg(long)]
    pub outdated: bool,
    /// Print the removals as JSON.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(config: Config, args: GcArgs) -> anyhow::Result<ExitCode> {
    let GcArgs {
        dry_run,
        max_age,
        other_policies,
        outdated,
        json,
    } = args;
    let sandbox = open(config, false).await?;
    let report = sandbox
        .gc_with(GcOptions {
            max_age,
            dry_run,
            other_policies,
            replace_outdated: outdated,
        })
        .await?;
    for claim in &report.unconfirmed {
        eprintln!(
            "note: the policy claimed to remove {} ({}), which the engine does not confirm: not counted",
            claim.container_id, claim.reason
        );
    }
    if !report.other_policies.is_empty() {
        eprintln!(
            "note: {} container(s) of another policy than {} ({}) left alone; --other-policies collects them",
            report.other_policies.len(),
            sandbox.policy_name(),
            sandbox.policy_digest()
        );
    }
    for c in &report.outdated {
        eprintln!(
            "note: {} (backend {}) is outdated ({}): left in place; the server's maintenance \
             replaces it when idle, or run gc with --outdated",
            c.name,
            c.backend_id,
            c.outdated.as_deref().unwrap_or("?")
        );
    }
    for c in &report.elsewhere {
        eprintln!(
            "note: {} (backend {}) is managed by sandbox processes whose workspace root is {}: left alone; run gc there",
            c.name,
            c.backend_id,
            c.managed_elsewhere.as_deref().unwrap_or("?")
        );
    }
    let entries = &report.entries;
    if json {
        println!("{}", serde_json::to_string_pretty(entries)?);
    } else {
        for c in &report.other_policies {
            println!(
                "left alone {} (backend {}): made by policy {} ({})",
                c.name,
                c.backend_id,
                c.policy,
                c.policy_digest.as_deref().unwrap_or("no digest")
            );
        }
        for e in entries {
            let verb = match (dry_run, e.removed) {
                (true, _) => "would remove",
                (false, true) => "removed",
                (false, false) => "kept",
            };
            println!(
                "{verb} {} (backend {}): {}",
                e.container.name, e.container.backend_id, e.reason
            );
        }
        if dry_run {
            println!("{} container(s) would be removed", entries.len());
        } else {
            let removed = entries.iter().filter(|e| e.removed).count();
            println!("{removed} container(s) removed");
        }
    }
    Ok(ExitCode::SUCCESS)
}

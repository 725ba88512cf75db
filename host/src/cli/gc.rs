//! `sandbox gc`: remove managed containers no backend owns any more, or older than a given age.

use std::process::ExitCode;
use std::time::Duration;

use sandbox_host::Config;

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
    #[arg(long)]
    pub json: bool,
}

pub async fn run(config: Config, args: GcArgs) -> anyhow::Result<ExitCode> {
    let GcArgs {
        dry_run,
        max_age,
        json,
    } = args;
    let sandbox = open(config, false).await?;
    let entries = sandbox.gc(max_age, dry_run).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&entries)?);
    } else {
        for e in &entries {
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

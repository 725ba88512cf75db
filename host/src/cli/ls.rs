//! `sandbox ls`: list the containers this namespace manages, as a table or as JSON.

use std::process::ExitCode;

use sandbox_host::{BackendView, Config};

use super::open;

#[derive(clap::Args)]
pub struct LsArgs {
    /// Print the containers as JSON (the shape of `GET /v1/backends`).
    #[arg(long)]
    pub json: bool,
    /// Also memory and CPU time from the engine.
    #[arg(long)]
    pub stats: bool,
}

pub async fn run(config: Config, args: LsArgs) -> anyhow::Result<ExitCode> {
    let LsArgs { json, stats } = args;
    let sandbox = open(config, false).await?;
    let containers = sandbox.list().await?;
    let now = sandbox_host::now_ms();
    let mut rows = Vec::new();
    for c in containers {
        let usage = if stats && c.status == sandbox_host::Status::Running {
            sandbox.stats(&c.id).await.ok()
        } else {
            None
        };
        rows.push(BackendView::new(c, now).with_stats(usage));
    }
    if json {
        // The same view as `GET /v1/backends`, plus `stats` when asked for.
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        print!(
            "{:<24} {:<14} {:<10} {:<12} {:>8} {:>9}",
            "BACKEND", "CONTAINER", "STATE", "POLICY", "IDLE", "IN-FLIGHT"
        );
        if stats {
            print!(" {:>10} {:>9}", "MEMORY", "CPU");
        }
        println!("  NAME");
        let mut notes = Vec::new();
        for BackendView {
            container: c,
            idle_secs: idle,
            stats: usage,
        } in rows
        {
            let short = &c.id[..c.id.len().min(12)];
            let state = format!("{:?}", c.status).to_lowercase();
            print!(
                "{:<24} {short:<14} {state:<10} {:<12} {:>7}s {:>9}",
                c.backend_id, c.policy, idle, c.in_flight
            );
            if stats {
                match usage {
                    Some(u) => print!(
                        " {:>8.1}Mi {:>8.2}s",
                        u.memory_bytes as f64 / 1048576.0,
                        u.cpu_seconds
                    ),
                    None => print!(" {:>10} {:>9}", "-", "-"),
                }
            }
            println!("  {}", c.name);
            if let Some(why) = &c.outdated {
                notes.push(format!("{} is replaced when next idle: {why}", c.name));
            }
            if let Some(root) = &c.managed_elsewhere {
                notes.push(format!(
                    "{} is managed by sandbox processes whose workspace root is {root}; \
                     this one leaves it alone (run with --workspace-root {root})",
                    c.name
                ));
            }
        }
        for note in notes {
            eprintln!("note: {note}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

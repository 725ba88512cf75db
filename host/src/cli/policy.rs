//! `sandbox policy`: check a policy component against the `sandbox` world, or export a built-in one.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use sandbox_host::{policies, Config};

use super::open;

#[derive(clap::Subcommand)]
pub enum PolicyCommand {
    /// Load a component, check it targets the `sandbox` world and passes the self-check.
    Check { path: PathBuf },
    /// Write a built-in policy component (per-user, per-thread) to a file.
    Export { name: String, output: PathBuf },
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
            println!(
                "{}: ok, policy {:?} targets the sandbox world (alice-1 -> backend {backend})",
                path.display(),
                sandbox.policy_name()
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

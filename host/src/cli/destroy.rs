//! `sandbox destroy`: end a user's backend, or the one serving a thread, after a grace period for running commands.

use std::process::ExitCode;

use anyhow::bail;
use sandbox_host::Config;

use super::open;

#[derive(clap::Args)]
pub struct DestroyArgs {
    /// The user whose backend goes (its container; the workspace stays).
    #[arg(long, conflicts_with = "thread", required_unless_present = "thread")]
    pub user: Option<String>,
    /// The thread to destroy: the policy decides whether its backend's
    /// container goes (by default it does, and so the whole user's).
    #[arg(long)]
    pub thread: Option<String>,
    /// Do not wait for commands in flight: kill them now.
    #[arg(long)]
    pub force: bool,
}

pub async fn run(config: Config, args: DestroyArgs) -> anyhow::Result<ExitCode> {
    let DestroyArgs {
        user,
        thread,
        force,
    } = args;
    let grace = if force {
        std::time::Duration::ZERO
    } else {
        std::time::Duration::from_secs_f64(config.destroy_grace_secs)
    };
    let sandbox = open(config, false).await?;
    let destroyed = match (user, thread) {
        (Some(user), _) => sandbox.destroy_user_backend_within(&user, grace).await?,
        (None, Some(thread)) => {
            sandbox
                .destroy_thread_backend_within(&thread, grace)
                .await?
        }
        (None, None) => bail!("give --user or --thread"),
    };
    println!(
        "{}",
        if destroyed {
            "destroyed"
        } else {
            "nothing to destroy"
        }
    );
    Ok(ExitCode::SUCCESS)
}

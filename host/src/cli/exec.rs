//! `sandbox exec`: run a command in a thread's sandbox, streaming its output, and exit with its code.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use sandbox_host::exec::{EndReason, ExecOptions, StreamKind};
use sandbox_host::Config;

use super::{open, timeout_arg, EXIT_SANDBOX_ERROR};

#[derive(clap::Args)]
pub struct ExecArgs {
    /// The thread whose user's sandbox runs it: `{user}` or `{user}-{rest}`
    /// (user: 1-64 of a-z 0-9 _; rest: 1-128 of A-Z a-z 0-9 _ -).
    pub thread_id: String,
    /// Wall-clock limit: 2s, 500ms, 1m30s, or plain seconds (2, 0.5); at
    /// most 24h (default: exec_timeout_secs).
    #[arg(long, value_name = "DURATION", value_parser = timeout_arg)]
    pub timeout: Option<Duration>,
    /// Environment variable for the command, KEY=VALUE (repeatable).
    #[arg(short, long = "env", value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// Working directory under /workspace, created when missing.
    #[arg(short, long)]
    pub workdir: Option<String>,
    /// Pass this process's stdin to the command.
    #[arg(short, long, conflicts_with = "detach")]
    pub interactive: bool,
    /// Start it in the background, print its id and exit: it runs on in
    /// the sandbox (see `sandbox ps`, `logs`, `kill`); --timeout then
    /// bounds it (none by default).
    #[arg(short, long)]
    pub detach: bool,
    /// The command, after the thread id (as `docker exec CONTAINER CMD...`;
    /// a `--` before it is allowed): one argument is a shell string, several
    /// are quoted and joined.
    #[arg(
        required = true,
        num_args = 1..,
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "COMMAND"
    )]
    pub command: Vec<String>,
}

pub async fn run(config: Config, args: ExecArgs) -> anyhow::Result<ExitCode> {
    let ExecArgs {
        thread_id,
        timeout,
        env,
        workdir,
        interactive,
        detach,
        command,
    } = args;
    let command = match command.as_slice() {
        [single] => single.clone(),
        many => shlex::try_join(many.iter().map(String::as_str)).context("quoting the command")?,
    };
    let env = env
        .iter()
        .map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .with_context(|| format!("--env {kv:?}: expected KEY=VALUE"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    if detach {
        let options = sandbox_host::processes::ProcessOptions {
            env,
            workdir,
            timeout,
            terminal: None,
        };
        return super::processes::detach(config, &thread_id, &command, options).await;
    }
    // Streamed, not buffered: input of any size costs a few chunks.
    let mut stdin = interactive.then(|| super::stdin::blocking_reader(std::io::stdin()));
    let options = ExecOptions {
        timeout,
        env,
        workdir,
        ..ExecOptions::default()
    };
    // Registered now, before any work starts: a Ctrl-C that comes while the
    // command is being set up must still kill it, not this process alone.
    let mut interrupt = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let sandbox = open(config, true).await?;
    let backend = sandbox.get_thread_backend(&thread_id).await?;
    // Live output: each chunk is printed as it arrives.
    let print = |kind, bytes: &[u8]| {
        use std::io::Write;
        let _ = match kind {
            StreamKind::Stdout => std::io::stdout()
                .write_all(bytes)
                .and_then(|()| std::io::stdout().flush()),
            StreamKind::Stderr => std::io::stderr().write_all(bytes),
        };
    };
    let run = async {
        match stdin.as_mut() {
            Some(stdin) => {
                backend
                    .execute_streaming_stdin(&command, options, stdin, print)
                    .await
            }
            None => backend.execute_streaming(&command, options, print).await,
        }
    };
    // Ctrl-C kills the remote command too (`docker exec` leaves it
    // running): dropping the call kills its processes.
    let interrupted = {
        tokio::pin!(run);
        tokio::select! {
            response = &mut run => Some(response?),
            _ = interrupt.recv() => None,
        }
        // `run` is dropped here: an unfinished call is killed.
    };
    let Some(response) = interrupted else {
        eprintln!("[interrupted: the command was killed]");
        sandbox.settle().await;
        return Ok(ExitCode::from(130));
    };
    match response.reason {
        Some(EndReason::Timeout) => {
            eprintln!("[timed out: every process of the command was killed]")
        }
        Some(EndReason::Destroyed) => eprintln!(
            "[killed: the backend was destroyed while the command ran (reason: destroyed)]"
        ),
        Some(EndReason::Cancelled) => eprintln!("[cancelled: the command was killed]"),
        // The agent's note is on stderr already.
        Some(EndReason::OutOfMemory) | None => {}
    }
    Ok(ExitCode::from(
        u8::try_from(response.exit_code).unwrap_or(EXIT_SANDBOX_ERROR),
    ))
}

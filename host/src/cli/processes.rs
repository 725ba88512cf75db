//! `sandbox exec -d`, `ps`, `logs` and `kill`: background processes of a
//! thread's sandbox, kept by its agent, so this CLI may exit and come back.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use sandbox_host::exec::StreamKind;
use sandbox_host::processes::{ProcessId, ProcessInfo, ProcessOptions, ProcessOutput, Signal};
use sandbox_host::{Backend, Config};

use super::open;

#[derive(clap::Args)]
pub struct PsArgs {
    /// The thread whose user's sandbox to list.
    pub thread_id: String,
    /// One JSON object per line instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args)]
pub struct LogsArgs {
    /// The thread whose user's sandbox runs it.
    pub thread_id: String,
    /// The process's id (as `exec -d` and `ps` print it).
    pub process_id: ProcessId,
    /// Keep printing its output as it comes, until it ends; then exit with
    /// its exit code.
    #[arg(short, long)]
    pub follow: bool,
}

#[derive(clap::Args)]
pub struct KillArgs {
    /// The thread whose user's sandbox runs it.
    pub thread_id: String,
    /// The process's id.
    pub process_id: ProcessId,
    /// The signal: TERM, INT, HUP, QUIT, KILL, USR1, USR2, CONT, STOP or
    /// WINCH (with or without SIG, or its number); sent to its whole tree.
    #[arg(short, long, default_value = "KILL")]
    pub signal: Signal,
    /// Also forget it (its output too): `ps` no longer lists it.
    #[arg(long)]
    pub rm: bool,
}

/// `exec -d`: starts the command in the background and prints its id.
pub async fn detach(
    config: Config,
    thread_id: &str,
    command: &str,
    options: ProcessOptions,
) -> anyhow::Result<ExitCode> {
    let sandbox = open(config, true).await?;
    let backend = sandbox.get_thread_backend(thread_id).await?;
    let info = backend.start_process(command, options).await?;
    println!("{}", info.id);
    Ok(ExitCode::SUCCESS)
}

pub async fn ps(config: Config, args: PsArgs) -> anyhow::Result<ExitCode> {
    let sandbox = open(config, false).await?;
    let backend = sandbox.get_thread_backend(&args.thread_id).await?;
    let processes = backend.processes().await?;
    let mut out = std::io::stdout().lock();
    if args.json {
        for p in &processes {
            writeln!(out, "{}", serde_json::to_string(p)?)?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    writeln!(out, "{:<32}  {:<10}  {:>8}  COMMAND", "ID", "STATUS", "AGE")?;
    let now = sandbox_host::now_ms();
    for p in &processes {
        let age = Duration::from_millis(now.saturating_sub(p.started_ms));
        writeln!(
            out,
            "{:<32}  {:<10}  {:>8}  {}",
            p.id,
            status(p),
            short_age(age),
            one_line(&p.command)
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

fn status(p: &ProcessInfo) -> String {
    match (p.running, p.exit_code, p.terminal) {
        (true, _, true) => "terminal".into(),
        (true, _, false) => "running".into(),
        (false, Some(code), _) => format!("exit {code}"),
        (false, None, _) => "ended".into(),
    }
}

fn short_age(age: Duration) -> String {
    let s = age.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86400 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}

fn one_line(command: &str) -> String {
    // Whitespace runs (newlines of a script included) as one space.
    let line = command.split_whitespace().collect::<Vec<_>>().join(" ");
    if line.chars().count() > 80 {
        format!("{}...", line.chars().take(77).collect::<String>())
    } else {
        line
    }
}

pub async fn logs(config: Config, args: LogsArgs) -> anyhow::Result<ExitCode> {
    let sandbox = open(config, false).await?;
    let backend = sandbox.get_thread_backend(&args.thread_id).await?;
    let mut offsets = (0, 0);
    loop {
        let wait = if args.follow {
            Duration::from_secs(25)
        } else {
            Duration::ZERO
        };
        let output = backend
            .process_output(&args.process_id, offsets, wait)
            .await?;
        let drained = output.chunks.is_empty();
        offsets = print_output(&output, offsets)?;
        if !args.follow || (drained && !output.info.running) {
            if args.follow {
                let code = output.info.exit_code.unwrap_or(0);
                return Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)));
            }
            if drained {
                return Ok(ExitCode::SUCCESS);
            }
        }
    }
}

/// Prints the chunks (a note where bytes were dropped); the next offsets.
fn print_output(output: &ProcessOutput, mut offsets: (u64, u64)) -> anyhow::Result<(u64, u64)> {
    for chunk in &output.chunks {
        let at = match chunk.stream {
            StreamKind::Stdout => &mut offsets.0,
            StreamKind::Stderr => &mut offsets.1,
        };
        let note = (chunk.offset > *at).then(|| {
            format!(
                "\n[... {} bytes of output dropped (a process keeps the first 16 KiB and the \
                 last 256 KiB of each stream) ...]\n",
                chunk.offset - *at
            )
        });
        *at = chunk.offset + chunk.data.len() as u64;
        match chunk.stream {
            StreamKind::Stdout => {
                let mut out = std::io::stdout().lock();
                if let Some(note) = &note {
                    out.write_all(note.as_bytes())?;
                }
                out.write_all(&chunk.data)?;
                out.flush()?;
            }
            StreamKind::Stderr => {
                let mut err = std::io::stderr().lock();
                if let Some(note) = &note {
                    err.write_all(note.as_bytes())?;
                }
                err.write_all(&chunk.data)?;
            }
        }
    }
    Ok(offsets)
}

pub async fn kill(config: Config, args: KillArgs) -> anyhow::Result<ExitCode> {
    let sandbox = open(config, false).await?;
    let backend = sandbox.get_thread_backend(&args.thread_id).await?;
    if args.rm {
        backend.remove_process(&args.process_id).await?;
    } else {
        backend
            .signal_process(&args.process_id, args.signal)
            .await?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Reads the process's output from `offsets` and prints it; used by
/// `shell` too.
pub(super) async fn read_and_print(
    backend: &Backend,
    id: &ProcessId,
    offsets: (u64, u64),
    wait: Duration,
) -> anyhow::Result<(ProcessOutput, (u64, u64))> {
    let output = backend.process_output(id, offsets, wait).await?;
    let next = print_output(&output, offsets)?;
    Ok((output, next))
}

//! `sandbox shell`: a terminal in a thread's sandbox, like `docker exec
//! -it`. This terminal is put in raw mode, so every key (Ctrl-C included)
//! goes to the sandbox's foreground process; its size follows this one's
//! (SIGWINCH); the exit code is the remote command's. The terminal is a
//! background process of the sandbox's agent, ended when this exits.

use std::io::{IsTerminal, Read};
use std::os::fd::AsFd;
use std::process::ExitCode;
use std::time::Duration;

use nix::sys::termios::{self, SetArg, Termios};
use sandbox_host::processes::{ProcessId, ProcessOptions, TerminalSize, LOGIN_SHELL};
use sandbox_host::Config;
use tokio::signal::unix::{signal, SignalKind};

use super::open;

#[derive(clap::Args)]
pub struct ShellArgs {
    /// The thread whose user's sandbox to open a terminal in.
    pub thread_id: String,
    /// Run this instead of a login shell (bash, else sh); one argument is a
    /// shell string, several are quoted and joined.
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "COMMAND"
    )]
    pub command: Vec<String>,
}

/// This terminal's mode before raw mode, restored when dropped.
struct RawMode(Termios);

impl RawMode {
    fn enter() -> Option<RawMode> {
        let stdin = std::io::stdin();
        let before = termios::tcgetattr(stdin.as_fd()).ok()?;
        let mut raw = before.clone();
        termios::cfmakeraw(&mut raw);
        termios::tcsetattr(stdin.as_fd(), SetArg::TCSANOW, &raw).ok()?;
        Some(RawMode(before))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = termios::tcsetattr(std::io::stdin().as_fd(), SetArg::TCSANOW, &self.0);
    }
}

/// This terminal's size, if stdout is one.
fn local_size() -> Option<TerminalSize> {
    let mut size: nix::libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: TIOCGWINSZ into a local winsize.
    let ok = unsafe { nix::libc::ioctl(1, nix::libc::TIOCGWINSZ, &mut size) } == 0;
    (ok && size.ws_row > 0 && size.ws_col > 0).then_some(TerminalSize {
        rows: size.ws_row,
        cols: size.ws_col,
    })
}

pub async fn run(config: Config, args: ShellArgs) -> anyhow::Result<ExitCode> {
    let command = match args.command.as_slice() {
        [] => LOGIN_SHELL.to_owned(),
        [single] => single.clone(),
        many => shlex::try_join(many.iter().map(String::as_str))?,
    };
    let sandbox = open(config, true).await?;
    let backend = sandbox.get_thread_backend(&args.thread_id).await?;
    let options = ProcessOptions {
        terminal: Some(local_size().unwrap_or_default()),
        ..ProcessOptions::default()
    };
    let info = backend.start_process(&command, options).await?;
    let id: ProcessId = info.id.parse()?;
    let raw = std::io::stdin()
        .is_terminal()
        .then(RawMode::enter)
        .flatten();
    let code = session(&backend, &id, raw.is_some()).await;
    drop(raw);
    // Whatever ended the session, the terminal's processes end with it.
    let _ = backend.remove_process(&id).await;
    let code = code?;
    Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)))
}

/// Carries keys in and output out until the remote command ends: its
/// exit code (130 when this process was interrupted outside raw mode).
async fn session(
    backend: &sandbox_host::Backend,
    id: &ProcessId,
    raw: bool,
) -> anyhow::Result<i64> {
    let (keys_tx, mut keys) = tokio::sync::mpsc::channel::<Option<Vec<u8>>>(16);
    // Reading stdin blocks: a thread of its own, which ends with the process.
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        let mut buf = [0u8; 4096];
        loop {
            match stdin.read(&mut buf) {
                Ok(0) | Err(_) => {
                    let _ = keys_tx.blocking_send(None);
                    return;
                }
                Ok(n) => {
                    if keys_tx.blocking_send(Some(buf[..n].to_vec())).is_err() {
                        return;
                    }
                }
            }
        }
    });
    let mut resized = signal(SignalKind::window_change())?;
    let mut interrupted = signal(SignalKind::interrupt())?;
    let output = async {
        let mut offsets = (0, 0);
        loop {
            let (read, next) =
                super::processes::read_and_print(backend, id, offsets, Duration::from_secs(25))
                    .await?;
            if read.chunks.is_empty() && !read.info.running {
                return Ok::<i64, anyhow::Error>(read.info.exit_code.unwrap_or(1));
            }
            offsets = next;
        }
    };
    tokio::pin!(output);
    let mut input_open = true;
    loop {
        tokio::select! {
            code = &mut output => return code,
            key = keys.recv(), if input_open => match key.flatten() {
                Some(bytes) => type_keys(backend, id, bytes).await?,
                None => {
                    // End of input: Ctrl-D, once, as a terminal would.
                    input_open = false;
                    let _ = backend.write_process(id, Some(vec![4])).await;
                }
            },
            _ = resized.recv() => {
                if let Some(size) = local_size() {
                    let _ = backend.resize_process(id, size).await;
                }
            }
            _ = interrupted.recv(), if !raw => return Ok(130),
        }
    }
}

/// Types `bytes` into the terminal (the backend waits, bounded, while its
/// input queue is full); only a terminal that is gone ends the session.
async fn type_keys(
    backend: &sandbox_host::Backend,
    id: &ProcessId,
    bytes: Vec<u8>,
) -> anyhow::Result<()> {
    match backend.write_process(id, Some(bytes)).await {
        Err(e @ sandbox_host::SandboxError::NotFound(_)) => Err(e.into()),
        // Ended: the output loop sees it and returns the exit code.
        Err(_) | Ok(()) => Ok(()),
    }
}

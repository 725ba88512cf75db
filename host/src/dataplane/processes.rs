//! Background processes and terminals: what the host asks of a container's
//! agent about them ([`ProcessOp`]) and what comes back ([`ProcessAnswer`]),
//! checked and typed at this edge. The agent keeps the processes and their
//! output (see `sandbox_agent::protocol`, version 4), so they outlive the
//! host process that started them.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use sandbox_agent::protocol::{
    DoneStatus, ProcInfo, EXEC_MARKER_VAR, MAX_PROCESSES, MAX_REQUEST_LINE,
};

use super::exec::{enter_workdir, resolve_workdir, StreamKind};
use super::WORKSPACE_MOUNT;
use crate::error::SandboxError;

/// A process's id: 32 lowercase hex digits, drawn by the host from the
/// kernel's random source. A process lives in its user's container, so
/// another user's request never reaches it, whatever id it names.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ProcessId(String);

impl ProcessId {
    /// A fresh id.
    pub fn new() -> std::io::Result<Self> {
        use std::io::Read;
        let mut bytes = [0u8; 16];
        std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
        Ok(ProcessId(
            bytes.iter().map(|b| format!("{b:02x}")).collect(),
        ))
    }

    /// The id's text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for ProcessId {
    type Error = SandboxError;

    fn try_from(id: String) -> Result<Self, SandboxError> {
        if id.len() == 32 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            Ok(ProcessId(id))
        } else {
            Err(SandboxError::InvalidId(format!(
                "process id {}: 32 lowercase hex digits",
                sandbox_contract::shown(&id)
            )))
        }
    }
}

impl std::str::FromStr for ProcessId {
    type Err = SandboxError;

    fn from_str(id: &str) -> Result<Self, SandboxError> {
        ProcessId::try_from(id.to_owned())
    }
}

impl From<ProcessId> for String {
    fn from(id: ProcessId) -> String {
        id.0
    }
}

impl std::fmt::Display for ProcessId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The command of a terminal opened without one: a login shell (bash
/// where the image has it, else sh).
pub const LOGIN_SHELL: &str =
    "if command -v bash >/dev/null 2>&1; then exec bash -l; else exec sh -l; fi";

/// A terminal's size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "serve", derive(schemars::JsonSchema))]
pub struct TerminalSize {
    /// Lines.
    pub rows: u16,
    /// Columns.
    pub cols: u16,
}

impl TerminalSize {
    /// 1..=9999 each (what the agent's wire carries).
    pub fn check(self) -> Result<Self, SandboxError> {
        if (1..=9999).contains(&self.rows) && (1..=9999).contains(&self.cols) {
            Ok(self)
        } else {
            Err(SandboxError::Refused(format!(
                "terminal size {}x{}: rows and columns are 1..=9999",
                self.rows, self.cols
            )))
        }
    }
}

impl Default for TerminalSize {
    fn default() -> Self {
        TerminalSize { rows: 24, cols: 80 }
    }
}

/// How to start a background process.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProcessOptions {
    /// Extra environment variables.
    pub env: Vec<(String, String)>,
    /// Working directory, absolute under `/workspace` or relative to it.
    pub workdir: Option<String>,
    /// Killed (its whole tree) after this long; none: runs until it ends.
    pub timeout: Option<Duration>,
    /// Runs on a terminal of this size (one output stream, stdout).
    pub terminal: Option<TerminalSize>,
}

/// A checked spawn.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessRequest {
    pub id: ProcessId,
    /// `sh -c`, the working directory's `cd` included.
    pub command: String,
    /// `KEY=value`, the marker ([`EXEC_MARKER_VAR`] = the id) included.
    pub env: Vec<String>,
    pub timeout: Option<Duration>,
    pub terminal: Option<TerminalSize>,
}

impl ProcessRequest {
    pub fn new(command: &str, options: ProcessOptions) -> Result<Self, SandboxError> {
        if command.contains('\0') {
            return Err(SandboxError::Refused(
                "the command contains a NUL byte".into(),
            ));
        }
        let id = ProcessId::new()
            .map_err(|e| SandboxError::Other(format!("drawing a process id: {e}")))?;
        let mut env = vec![format!("{EXEC_MARKER_VAR}={id}")];
        env.extend(super::exec::checked_env(options.env)?);
        if options.terminal.is_some() {
            env.push("TERM=xterm-256color".to_owned());
        }
        // One request line carries it all (base64 of the command and the
        // environment): past it, a clear refusal rather than a lost frame.
        let payload = command.len() + env.iter().map(|e| e.len() + 1).sum::<usize>() + 64;
        if payload.div_ceil(3) * 4 + 256 > MAX_REQUEST_LINE {
            return Err(SandboxError::Refused(format!(
                "the command and its environment take {payload} bytes: a background process \
                 takes at most {} (write a script to the workspace and run that)",
                (MAX_REQUEST_LINE - 256) / 4 * 3 - 64
            )));
        }
        let workdir = resolve_workdir(options.workdir.as_deref())?;
        // The agent starts every call in `/workspace`.
        let command = if workdir == WORKSPACE_MOUNT {
            command.to_owned()
        } else {
            enter_workdir(&workdir, command)
        };
        Ok(ProcessRequest {
            id,
            command,
            env,
            timeout: options.timeout,
            terminal: options.terminal.map(TerminalSize::check).transpose()?,
        })
    }
}

/// A signal a process may be sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Signal(u8);

impl Signal {
    const NAMES: [(&'static str, u8); 10] = [
        ("HUP", 1),
        ("INT", 2),
        ("QUIT", 3),
        ("KILL", 9),
        ("USR1", 10),
        ("USR2", 12),
        ("TERM", 15),
        ("CONT", 18),
        ("STOP", 19),
        ("WINCH", 28),
    ];
    /// SIGHUP.
    pub const HUP: Signal = Signal(1);
    /// SIGKILL.
    pub const KILL: Signal = Signal(9);
    /// SIGTERM.
    pub const TERM: Signal = Signal(15);

    /// Its number.
    pub fn number(self) -> u8 {
        self.0
    }
}

impl std::str::FromStr for Signal {
    type Err = SandboxError;

    /// `TERM`, `SIGTERM`, `term` or `15`.
    fn from_str(s: &str) -> Result<Self, SandboxError> {
        let upper = s.to_ascii_uppercase();
        let name = upper.strip_prefix("SIG").unwrap_or(&upper);
        Signal::NAMES
            .iter()
            .find(|(n, number)| *n == name || number.to_string() == name)
            .map(|(_, number)| Signal(*number))
            .ok_or_else(|| {
                let names: Vec<&str> = Signal::NAMES.iter().map(|(n, _)| *n).collect();
                SandboxError::Refused(format!(
                    "signal {}: one of {}",
                    sandbox_contract::shown(s),
                    names.join(", ")
                ))
            })
    }
}

/// A process as listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "serve", derive(schemars::JsonSchema))]
pub struct ProcessInfo {
    /// Its id (32 hex digits).
    pub id: String,
    /// The command as given (its first 4 KiB), without the host's `cd`.
    pub command: String,
    /// Unix time in ms.
    pub started_ms: u64,
    /// Still running.
    pub running: bool,
    /// Its shell-style status once ended (137: killed; 124: its timeout).
    pub exit_code: Option<i64>,
    /// It runs on a terminal (its output is all stdout).
    pub terminal: bool,
    /// Bytes it wrote to stdout so far (kept: the first 16 KiB and the
    /// last 256 KiB of each stream).
    pub stdout_bytes: u64,
    /// Bytes it wrote to stderr so far.
    pub stderr_bytes: u64,
}

impl ProcessInfo {
    fn from_wire(info: ProcInfo) -> Self {
        let command = match info.command.split_once('\n') {
            Some((cd, rest)) if cd.starts_with("mkdir -p ") && cd.ends_with("|| exit 126") => {
                rest.to_owned()
            }
            _ => info.command,
        };
        ProcessInfo {
            id: info.proc,
            command,
            started_ms: info.started_ms,
            running: info.status.is_none(),
            exit_code: info.status.map(i64::from),
            terminal: info.tty,
            stdout_bytes: info.out_total,
            stderr_bytes: info.err_total,
        }
    }
}

/// Output of a process from some offset of a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputChunk {
    /// Which stream.
    pub stream: StreamKind,
    /// Where `data` starts in its stream: past the offset asked for when
    /// the bytes between were dropped (the middle of a long output).
    pub offset: u64,
    /// The bytes.
    pub data: Vec<u8>,
}

/// An answer to a read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessOutput {
    /// Stdout's first, in order.
    pub chunks: Vec<OutputChunk>,
    /// The process after them.
    pub info: ProcessInfo,
}

impl ProcessOutput {
    /// Where the next read of each stream starts.
    pub fn next_offsets(&self, asked: (u64, u64)) -> (u64, u64) {
        let mut next = asked;
        for chunk in &self.chunks {
            let end = chunk.offset + chunk.data.len() as u64;
            match chunk.stream {
                StreamKind::Stdout => next.0 = next.0.max(end),
                StreamKind::Stderr => next.1 = next.1.max(end),
            }
        }
        next
    }
}

/// What the host asks of the agent about processes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProcessOp {
    Spawn(ProcessRequest),
    List,
    Read {
        id: ProcessId,
        stdout_at: u64,
        stderr_at: u64,
        wait: Duration,
    },
    /// `None` closes its stdin.
    Write {
        id: ProcessId,
        data: Option<Vec<u8>>,
    },
    Signal {
        id: ProcessId,
        signal: Signal,
    },
    Resize {
        id: ProcessId,
        size: TerminalSize,
    },
    Forget {
        id: ProcessId,
    },
}

impl ProcessOp {
    /// The process it is about, if one.
    pub fn process(&self) -> Option<&ProcessId> {
        match self {
            ProcessOp::Spawn(r) => Some(&r.id),
            ProcessOp::List => None,
            ProcessOp::Read { id, .. }
            | ProcessOp::Write { id, .. }
            | ProcessOp::Signal { id, .. }
            | ProcessOp::Resize { id, .. }
            | ProcessOp::Forget { id } => Some(id),
        }
    }
}

/// What the agent answered: every `proc` and `chunk` frame, in order.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ProcessAnswer {
    pub procs: Vec<ProcessInfo>,
    pub chunks: Vec<OutputChunk>,
}

impl ProcessAnswer {
    pub fn push_proc(&mut self, info: ProcInfo) {
        self.procs.push(ProcessInfo::from_wire(info));
    }

    /// The one process a read answers about.
    pub fn into_output(self, id: &ProcessId) -> Result<ProcessOutput, SandboxError> {
        let info = self
            .procs
            .into_iter()
            .find(|p| p.id == id.as_str())
            .ok_or_else(|| {
                SandboxError::Other(format!("the agent did not describe process {id}"))
            })?;
        Ok(ProcessOutput {
            chunks: self.chunks,
            info,
        })
    }
}

/// The error for a request the agent did not carry out.
pub fn refusal(status: DoneStatus, op: &ProcessOp) -> SandboxError {
    let id = op.process().map_or_else(String::new, |id| format!(" {id}"));
    match status {
        DoneStatus::Ok => SandboxError::Other("not a refusal".into()),
        DoneStatus::Unknown => {
            SandboxError::NotFound(format!("no process{id} in this thread's sandbox"))
        }
        DoneStatus::Exists => SandboxError::Refused(format!("process{id} exists already")),
        DoneStatus::Full => SandboxError::Refused(format!(
            "{MAX_PROCESSES} background processes and terminals run in this sandbox already: \
             stop or remove some first"
        )),
        DoneStatus::Ended => SandboxError::Refused(format!("process{id} has ended")),
        DoneStatus::Closed => SandboxError::Refused(format!("the stdin of process{id} is closed")),
        DoneStatus::Busy => SandboxError::Refused(format!(
            "the sandbox's agent has too many requests about process{id} waiting: try again"
        )),
        DoneStatus::Invalid => SandboxError::Refused(match op {
            ProcessOp::Resize { .. } => format!("process{id} has no terminal to resize"),
            _ => format!("the agent refused the request about process{id}"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_ids_are_32_hex_and_fresh() {
        let a = ProcessId::new().unwrap();
        let b = ProcessId::new().unwrap();
        assert_ne!(a, b);
        assert_eq!(a.as_str().len(), 32);
        assert!(a.as_str().parse::<ProcessId>().is_ok());
        for bad in [
            "",
            "x",
            &"A".repeat(32),
            &"0".repeat(31),
            "../../../etc/passwd",
        ] {
            assert!(bad.parse::<ProcessId>().is_err(), "{bad}");
        }
    }

    #[test]
    fn signals_by_name_or_number() {
        for (s, n) in [
            ("TERM", 15),
            ("sigint", 2),
            ("SIGKILL", 9),
            ("1", 1),
            ("winch", 28),
        ] {
            assert_eq!(s.parse::<Signal>().unwrap().number(), n, "{s}");
        }
        for bad in ["SEGV", "0", "64", "", "SIGSIGTERM"] {
            assert!(bad.parse::<Signal>().is_err(), "{bad}");
        }
    }

    #[test]
    fn a_spawn_carries_its_id_as_marker_and_enters_its_workdir() {
        let options = ProcessOptions {
            env: vec![("A".into(), "1".into())],
            workdir: Some("app".into()),
            terminal: Some(TerminalSize { rows: 10, cols: 20 }),
            ..ProcessOptions::default()
        };
        let r = ProcessRequest::new("npm run dev", options).unwrap();
        assert_eq!(r.env[0], format!("{EXEC_MARKER_VAR}={}", r.id));
        assert!(r.env.contains(&"A=1".to_owned()));
        assert!(r.command.ends_with("\nnpm run dev"));
        assert!(r.command.contains("/workspace/app"));
        let bad = ProcessOptions {
            terminal: Some(TerminalSize { rows: 0, cols: 20 }),
            ..ProcessOptions::default()
        };
        assert!(ProcessRequest::new("x", bad).is_err());
        assert!(ProcessRequest::new("a\0b", ProcessOptions::default()).is_err());
        let huge = "x".repeat(MAX_REQUEST_LINE);
        let err = ProcessRequest::new(&huge, ProcessOptions::default()).unwrap_err();
        assert!(err.to_string().contains("write a script"), "{err}");
    }

    #[test]
    fn the_shown_command_drops_the_hosts_cd() {
        let options = ProcessOptions {
            workdir: Some("src".into()),
            ..ProcessOptions::default()
        };
        let r = ProcessRequest::new("echo hi\necho there", options).unwrap();
        let info = ProcessInfo::from_wire(ProcInfo {
            proc: r.id.to_string(),
            started_ms: 1,
            status: Some(0),
            tty: false,
            out_total: 0,
            err_total: 0,
            command: r.command,
        });
        assert_eq!(info.command, "echo hi\necho there");
    }

    #[test]
    fn next_offsets_follow_the_chunks() {
        let output = ProcessOutput {
            chunks: vec![
                OutputChunk {
                    stream: StreamKind::Stdout,
                    offset: 100,
                    data: vec![0; 10],
                },
                OutputChunk {
                    stream: StreamKind::Stderr,
                    offset: 3,
                    data: vec![0; 2],
                },
            ],
            info: ProcessInfo {
                id: String::new(),
                command: String::new(),
                started_ms: 0,
                running: true,
                exit_code: None,
                terminal: false,
                stdout_bytes: 110,
                stderr_bytes: 5,
            },
        };
        assert_eq!(output.next_offsets((5, 3)), (110, 5));
    }
}

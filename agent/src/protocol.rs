//! The wire between the host and `sandbox-agent serve`: one frame per line
//! over the container's attach stream (the agent's stdin and stdout), in
//! ASCII, with every byte string in base64. A line is a verb and
//! space-separated fields; nothing else parses.
//!
//! ```text
//! host -> agent                                agent -> host
//! ping NONCE                                   pong NONCE BOOT NOW VERSION
//! exec ID START_BY TIMEOUT_MS ENV CMD STDIN|-  ack ID | stale ID
//! kill ID MARKER                               out ID DATA | err ID DATA
//!                                              exit ID CODE OOM BG
//!                                              killed ID 0|1
//!                                              hello BOOT VERSION | bad REASON
//! ```
//!
//! `START_BY` is a Unix time in ms by the host's wall clock, which the
//! container shares and cannot set (`NOW` in a pong is informative only):
//! an exec read later (the agent was stopped while the host gave up on it)
//! is refused with `stale`, never run late.
//! The host starts every frame with a newline, so the rest of a frame cut
//! off mid-way (a broken connection) is a line of its own, refused, and
//! never glued to the next frame; the agent skips empty lines.
//! `ENV` is the base64 of `KEY=value` entries joined by NUL. Both sides bound
//! a line before they parse it ([`MAX_REQUEST_LINE`], [`MAX_REPLY_LINE`]),
//! and the host treats every reply as untrusted input: another process in
//! the container may write into the agent's stdout.
//!
//! # Versions
//!
//! `VERSION` is [`PROTOCOL_VERSION`], the version of this table. A container
//! keeps the agent binary it was created with across host upgrades, so a
//! host may meet an agent of another version. Any change to this table (a
//! verb, a field, what one means, a bound the other side relies on) bumps
//! the version, and a host speaks to an agent of its own version only.
//! What never changes, so that every host can learn every agent's version:
//! `ping NONCE`, and `hello` and `pong` up to and including their `VERSION`
//! field (a later version may add fields after it). The agents before
//! versions (version 0, [`UNVERSIONED`]) sent `hello BOOT` and
//! `pong NONCE BOOT NOW`.
//!
//! [`Reply::parse`] refuses a `hello` or `pong` of any other version with
//! [`ParseError::Version`], which names the version the agent speaks. The
//! host then treats that agent as unusable: the link closes at once (no
//! acknowledgement is awaited) and its executes go through `docker exec`,
//! whose command line (`sandbox-agent reap`, `kill`) every version keeps.
//! The host never states its own version: it is the side that adapts, and
//! it sends nothing but a ping before the agent's pong told it the version.
//! The container's `sandbox.agent` label names the version as well
//! (`serve-v3`), so a host usually picks `docker exec` from the label alone,
//! before it attaches.
//!
//! The values both ends must agree on beyond the frames (the marker's
//! environment variable, the exit statuses with a meaning, where the agent
//! is mounted) are defined here too, once.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;

/// The version of this protocol (see the module doc's "Versions").
///
/// 2: the agent runs as root with only the capabilities it needs, and runs
/// each command as the sandbox user in a group of its own (`init --user`);
/// `kill` ends the call's group. The frames are those of 1.
///
/// 3: `exit` carries `OOM`, how many processes of the container the
/// out-of-memory killer ended while the call ran, and `BG`, how many
/// background processes kept the call's output open after its command
/// exited and were killed so the call could end.
///
/// 4: background processes and terminals (`spawn`, `procs`, `read`,
/// `write`, `signal`, `resize`, `forget`; `proc`, `chunk`, `done`). On the
/// plane (a session of a host's socket, [`PLANE_MOUNT`]), also an exec
/// whose stdin and stdout are a plane pipe (`@NAME` for its stdin) and
/// `port`: only hosts that mount the plane send them, to agents of the
/// same build.
pub const PROTOCOL_VERSION: u32 = 4;
/// The version of the agents before versions, whose `hello` and `pong` state
/// none.
pub const UNVERSIONED: u32 = 0;

/// Where the host mounts the agent inside every container (read-only).
pub const AGENT_MOUNT: &str = "/.sandbox/agent";

/// Where the host mounts the container's plane directory (read-only): each
/// host process that talks to the agent binds a socket there, named
/// `NAME` + [`PLANE_SOCKET_SUFFIX`], and the agent connects to it. The
/// wire on it is this one, as on the attach stream.
pub const PLANE_MOUNT: &str = "/.sandbox/plane";
/// The ending of a socket the agent connects to in [`PLANE_MOUNT`] (a
/// socket being set up has another).
pub const PLANE_SOCKET_SUFFIX: &str = ".sock";
/// The ending of a socket offered for one call's bytes (an exec's stdin and
/// stdout, a port's connection): the agent connects to it when a request
/// names it, never on its own.
pub const PLANE_PIPE_SUFFIX: &str = ".pipe";

/// The environment variable carrying a call's id (its marker) into every
/// process it starts: `sandbox-agent kill MARKER` and the host's kill script
/// find a call's processes by it.
pub const EXEC_MARKER_VAR: &str = "SANDBOX_EXEC_ID";
/// Bounds of a marker (a plain token, see [`valid_marker`]).
pub const MIN_MARKER: usize = 8;
/// The longest marker (the longest token, [`MAX_TOKEN`]).
pub const MAX_MARKER: usize = MAX_TOKEN;

/// Exit status of a call stopped at its deadline (as `timeout(1)`).
pub const EXIT_TIMED_OUT: u8 = 124;
/// Exit status when the agent itself could not run the call (a usage
/// error, a failed system call): the agent's fault, not the command's.
pub const EXIT_AGENT_FAILED: u8 = 125;
/// Exit status of a command that could not start (as a shell's): no
/// process or thread to spare, its start-by time passed, a working
/// directory that cannot be entered.
pub const EXIT_CANNOT_RUN: u8 = 126;
/// Exit status of a program that was not found (as a shell's).
pub const EXIT_NOT_FOUND: u8 = 127;
/// Exit status of a call ended by SIGKILL (128 + 9): killed, or cancelled
/// before it started.
pub const EXIT_KILLED: u8 = 137;

/// Longest request line (an exec with its inline stdin).
pub const MAX_REQUEST_LINE: usize = 1024 * 1024;
/// Stdin bytes an exec may carry inline; more goes through `docker exec`.
pub const MAX_INLINE_STDIN: usize = 512 * 1024;
/// Bytes of output per `out` / `err` frame.
pub const CHUNK: usize = 16 * 1024;
/// Longest reply line: an output frame of [`CHUNK`] bytes and its header.
pub const MAX_REPLY_LINE: usize = CHUNK / 3 * 4 + 256;
/// The longest token (ids, nonces, markers, boot ids).
pub const MAX_TOKEN: usize = 64;
/// Processes an agent keeps (running, or ended and not yet forgotten): a
/// spawn past it forgets the oldest ended one, or is refused (`full`).
pub const MAX_PROCESSES: usize = 32;
/// Bytes of each output stream a process keeps from its start.
pub const PROC_HEAD: usize = 16 * 1024;
/// Bytes of each output stream a process keeps from its end.
pub const PROC_TAIL: usize = 256 * 1024;
/// Bytes of output one `read` answers at most.
pub const MAX_READ: usize = 256 * 1024;
/// The longest a `read` waits for output.
pub const MAX_READ_WAIT_MS: u64 = 30_000;
/// Bytes of a process's command a `proc` frame shows.
pub const SHOWN_COMMAND: usize = 4096;
/// The signals a `signal` may send (by number): HUP, INT, QUIT, KILL,
/// USR1, USR2, TERM, CONT, STOP, WINCH.
pub const SIGNALS: [u8; 10] = [1, 2, 3, 9, 10, 12, 15, 18, 19, 28];

/// What the host asks of the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Answered by `pong` with the same nonce and the agent's boot id.
    Ping { nonce: String },
    /// Runs a command (see [`Exec`]).
    Exec(Exec),
    /// Ends every process carrying [`EXEC_MARKER_VAR`]`=marker`.
    Kill { id: String, marker: String },
    /// Starts a background process or terminal (see [`Spawn`]).
    Spawn(Spawn),
    /// Lists the processes kept: a `proc` frame each.
    Procs { id: String },
    /// The output of `proc` past the offsets, waiting up to `wait_ms` for
    /// some (or its end): `chunk` frames, then its `proc` frame.
    Read {
        id: String,
        proc: String,
        out_at: u64,
        err_at: u64,
        wait_ms: u64,
    },
    /// Bytes for the process's stdin (its terminal's input); `None` closes
    /// it (not a terminal's).
    Write {
        id: String,
        proc: String,
        data: Option<Vec<u8>>,
    },
    /// Sends one of [`SIGNALS`] to every process of `proc`'s tree.
    Signal {
        id: String,
        proc: String,
        signal: u8,
    },
    /// Sets a terminal's size.
    Resize {
        id: String,
        proc: String,
        rows: u16,
        cols: u16,
    },
    /// Kills `proc`'s tree if it runs, and forgets it.
    Forget { id: String, proc: String },
    /// Connects to `127.0.0.1:port` (or `[::1]`) as the sandbox user and
    /// carries the connection on the plane socket `pipe` (+
    /// [`PLANE_PIPE_SUFFIX`]): `done ID ok` once connected, else a `stderr`
    /// frame saying why and `done ID invalid`.
    Port { id: String, pipe: String, port: u16 },
}

/// `sh -c command` in the background under `reap`, as an exec's, kept by
/// the agent under the host's id `proc`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spawn {
    pub id: String,
    pub proc: String,
    /// Unix ms by the host's clock: not started when read later.
    pub start_by_ms: u64,
    /// 0: no deadline.
    pub timeout_ms: u64,
    /// A terminal of these rows and columns; `None`: pipes.
    pub tty: Option<(u16, u16)>,
    pub env: Vec<String>,
    pub command: String,
}

/// A process as a `proc` frame shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcInfo {
    pub proc: String,
    pub started_ms: u64,
    /// `None` while it runs.
    pub status: Option<u8>,
    pub tty: bool,
    /// Bytes written to each stream so far.
    pub out_total: u64,
    pub err_total: u64,
    /// At most [`SHOWN_COMMAND`] bytes of it.
    pub command: String,
}

/// How a process request ended (`done ID STATUS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DoneStatus {
    Ok,
    /// No process of that id.
    Unknown,
    /// A process of that id exists already (a spawn is never run twice).
    Exists,
    /// [`MAX_PROCESSES`] run already.
    Full,
    /// The process has ended.
    Ended,
    /// Its stdin is closed.
    Closed,
    /// Too much at once (reads waiting, writes queued): try again.
    Busy,
    /// A request that does not apply (a resize of pipes, a signal not
    /// allowed).
    Invalid,
}

impl DoneStatus {
    const ALL: [(DoneStatus, &'static str); 8] = [
        (DoneStatus::Ok, "ok"),
        (DoneStatus::Unknown, "unknown"),
        (DoneStatus::Exists, "exists"),
        (DoneStatus::Full, "full"),
        (DoneStatus::Ended, "ended"),
        (DoneStatus::Closed, "closed"),
        (DoneStatus::Busy, "busy"),
        (DoneStatus::Invalid, "invalid"),
    ];

    pub fn as_str(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(s, _)| *s == self)
            .map_or("ok", |(_, t)| t)
    }

    fn parse(token: Option<&str>) -> Result<Self, ParseError> {
        Self::ALL
            .iter()
            .find(|(_, t)| Some(*t) == token)
            .map(|(s, _)| *s)
            .ok_or_else(|| bad("status"))
    }
}

/// `sh -c command` under `reap` (its own subreaper and deadline).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exec {
    pub id: String,
    /// Unix ms, by the agent's clock: not started when read later.
    pub start_by_ms: u64,
    pub timeout_ms: u64,
    /// `KEY=value` entries.
    pub env: Vec<String>,
    pub command: String,
    pub stdin: Option<Vec<u8>>,
    /// The plane socket `NAME` + [`PLANE_PIPE_SUFFIX`] that is the
    /// command's stdin and stdout, raw (its stderr and status come as
    /// frames): encoded as `@NAME` in place of the stdin field.
    pub pipe: Option<String>,
}

/// What the agent says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// Said once when a serve process starts (`hello BOOT VERSION`, the
    /// version being [`PROTOCOL_VERSION`]).
    Hello {
        boot: String,
    },
    /// The answer to a ping (`pong NONCE BOOT NOW VERSION`).
    Pong {
        nonce: String,
        boot: String,
        /// The agent's clock, Unix ms.
        now_ms: u64,
    },
    /// The request `id` was read whole and is being carried out.
    Ack {
        id: String,
    },
    /// The exec `id` was read after its start-by time: it never runs.
    Stale {
        id: String,
    },
    Stdout {
        id: String,
        data: Vec<u8>,
    },
    Stderr {
        id: String,
        data: Vec<u8>,
    },
    /// The call ended with this shell-style status ([`EXIT_TIMED_OUT`]: its
    /// deadline).
    Exit {
        id: String,
        code: u8,
        /// Processes the container's out-of-memory killer ended while the
        /// call ran (any call's: the counter is the container's).
        oom_kills: u32,
        /// Background processes that held the call's output open after its
        /// command exited, killed so that the call could end.
        background_killed: u32,
    },
    Killed {
        id: String,
        all_gone: bool,
    },
    /// A request line that did not parse; it was dropped.
    Bad {
        reason: String,
    },
    /// One process (an answer to `procs` or `read`).
    Proc {
        id: String,
        info: ProcInfo,
    },
    /// Output of a process from offset `at` of its stream.
    Chunk {
        id: String,
        stderr: bool,
        at: u64,
        data: Vec<u8>,
    },
    /// The end of the answer to a process request.
    Done {
        id: String,
        status: DoneStatus,
    },
}

/// Why a line did not parse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParseError {
    /// Not a frame of this protocol: dropped by the agent (which answers
    /// `bad`), and the end of its link for the host.
    Bad(String),
    /// A `hello` or `pong` of another version of this protocol: the version
    /// the agent speaks ([`UNVERSIONED`] when the line states none). Nothing
    /// more of the line is read: it is another protocol's.
    Version(u32),
}

impl std::fmt::Display for ParseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ParseError::Bad(what) => f.write_str(what),
            ParseError::Version(theirs) => write!(
                f,
                "protocol version {theirs} (this side speaks {PROTOCOL_VERSION})"
            ),
        }
    }
}

fn bad(what: &str) -> ParseError {
    ParseError::Bad(what.to_owned())
}

/// A plain token: `[A-Za-z0-9_-]{1,64}`.
pub fn valid_token(token: &str) -> bool {
    (1..=MAX_TOKEN).contains(&token.len())
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// A call's marker: a plain token of [`MIN_MARKER`]..=[`MAX_MARKER`]
/// characters (the host's execution id). It is matched against whole
/// environment entries, so nothing else is accepted.
pub fn valid_marker(marker: &str) -> bool {
    marker.len() >= MIN_MARKER && valid_token(marker)
}

fn token(field: Option<&str>, what: &str) -> Result<String, ParseError> {
    match field {
        Some(t) if valid_token(t) => Ok(t.to_owned()),
        _ => Err(bad(what)),
    }
}

/// A small count: 1 to 6 ASCII digits.
fn count(field: Option<&str>) -> Option<u32> {
    field
        .filter(|c| (1..=6).contains(&c.len()) && c.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|c| c.parse().ok())
}

fn bytes(field: Option<&str>, what: &str) -> Result<Vec<u8>, ParseError> {
    STANDARD
        .decode(field.ok_or_else(|| bad(what))?)
        .map_err(|_| bad(what))
}

/// Decimal digits only, at most 15 of them.
fn number(field: Option<&str>, what: &str) -> Result<u64, ParseError> {
    field
        .filter(|t| (1..=15).contains(&t.len()) && t.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|t| t.parse().ok())
        .ok_or_else(|| bad(what))
}

/// The version field of a `hello` or `pong`: checked after the fields that
/// precede it, before any that follow (a later version may add some).
/// `Ok` only for [`PROTOCOL_VERSION`] with nothing after it.
fn version(mut rest: std::str::Split<'_, char>) -> Result<(), ParseError> {
    let theirs = match rest.next() {
        None => UNVERSIONED,
        // Canonical decimal: no sign, no leading zero, at most 9 digits.
        Some(v)
            if (1..=9).contains(&v.len())
                && v.bytes().all(|b| b.is_ascii_digit())
                && (v == "0" || !v.starts_with('0')) =>
        {
            v.parse().map_err(|_| bad("version"))?
        }
        Some(_) => return Err(bad("version")),
    };
    if theirs != PROTOCOL_VERSION {
        return Err(ParseError::Version(theirs));
    }
    end(rest)
}

fn encode(data: &[u8]) -> String {
    STANDARD.encode(data)
}

/// A process id: a plain token.
fn proc_id(field: Option<&str>) -> Result<String, ParseError> {
    token(field, "proc")
}

/// `KEY=value` entries joined by NUL.
fn env_field(field: Option<&str>) -> Result<Vec<String>, ParseError> {
    let env = String::from_utf8(bytes(field, "env")?).map_err(|_| bad("env"))?;
    let env: Vec<String> = if env.is_empty() {
        Vec::new()
    } else {
        env.split('\0').map(str::to_owned).collect()
    };
    if env
        .iter()
        .any(|kv| !kv.contains('=') || kv.starts_with('='))
    {
        return Err(bad("env"));
    }
    Ok(env)
}

fn command_field(field: Option<&str>) -> Result<String, ParseError> {
    let command = String::from_utf8(bytes(field, "command")?).map_err(|_| bad("command"))?;
    if command.contains('\0') {
        return Err(bad("command"));
    }
    Ok(command)
}

/// A terminal size: 1 to 4 digits, 1..=9999.
fn dimension(field: Option<&str>) -> Result<u16, ParseError> {
    field
        .filter(|d| (1..=4).contains(&d.len()) && d.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|d| d.parse().ok())
        .filter(|d| *d > 0)
        .ok_or_else(|| bad("size"))
}

fn tty_field(field: Option<&str>) -> Result<Option<(u16, u16)>, ParseError> {
    match field {
        Some("-") => Ok(None),
        Some(size) => {
            let (rows, cols) = size.split_once('x').ok_or_else(|| bad("tty"))?;
            Ok(Some((dimension(Some(rows))?, dimension(Some(cols))?)))
        }
        None => Err(bad("tty")),
    }
}

/// The longest prefix of `command` of at most [`SHOWN_COMMAND`] bytes that
/// ends on a character boundary.
pub fn shown_command(command: &str) -> &str {
    let mut end = command.len().min(SHOWN_COMMAND);
    while !command.is_char_boundary(end) {
        end -= 1;
    }
    &command[..end]
}

/// Splits a line (without its newline, at most `max` bytes) into fields,
/// refusing anything but printable ASCII separated by single spaces.
fn fields(line: &[u8], max: usize) -> Result<std::str::Split<'_, char>, ParseError> {
    if line.len() > max {
        return Err(bad("line too long"));
    }
    if line.is_empty() || !line.iter().all(|b| b.is_ascii_graphic() || *b == b' ') {
        return Err(bad("not a frame"));
    }
    // Checked ASCII above.
    let text = std::str::from_utf8(line).map_err(|_| bad("not a frame"))?;
    Ok(text.split(' '))
}

fn end(mut rest: std::str::Split<'_, char>) -> Result<(), ParseError> {
    match rest.next() {
        None => Ok(()),
        Some(_) => Err(bad("trailing fields")),
    }
}

impl Request {
    /// The frame's id (a ping's nonce).
    pub fn id(&self) -> &str {
        match self {
            Request::Ping { nonce: id }
            | Request::Exec(Exec { id, .. })
            | Request::Kill { id, .. }
            | Request::Spawn(Spawn { id, .. })
            | Request::Procs { id }
            | Request::Read { id, .. }
            | Request::Write { id, .. }
            | Request::Signal { id, .. }
            | Request::Resize { id, .. }
            | Request::Forget { id, .. }
            | Request::Port { id, .. } => id,
        }
    }

    /// The line: a newline (see the module doc), the frame, a newline.
    pub fn encode(&self) -> String {
        match self {
            Request::Ping { nonce } => format!("\nping {nonce}\n"),
            Request::Exec(Exec {
                id,
                start_by_ms,
                timeout_ms,
                env,
                command,
                stdin,
                pipe,
            }) => format!(
                "\nexec {id} {start_by_ms} {timeout_ms} {} {} {}\n",
                encode(env.join("\0").as_bytes()),
                encode(command.as_bytes()),
                match (pipe, stdin) {
                    (Some(pipe), _) => format!("@{pipe}"),
                    (None, Some(stdin)) => encode(stdin),
                    (None, None) => "-".to_owned(),
                }
            ),
            Request::Kill { id, marker } => format!("\nkill {id} {marker}\n"),
            Request::Spawn(Spawn {
                id,
                proc,
                start_by_ms,
                timeout_ms,
                tty,
                env,
                command,
            }) => format!(
                "\nspawn {id} {proc} {start_by_ms} {timeout_ms} {} {} {}\n",
                tty.map_or_else(|| "-".to_owned(), |(r, c)| format!("{r}x{c}")),
                encode(env.join("\0").as_bytes()),
                encode(command.as_bytes()),
            ),
            Request::Procs { id } => format!("\nprocs {id}\n"),
            Request::Read {
                id,
                proc,
                out_at,
                err_at,
                wait_ms,
            } => format!("\nread {id} {proc} {out_at} {err_at} {wait_ms}\n"),
            Request::Write { id, proc, data } => format!(
                "\nwrite {id} {proc} {}\n",
                data.as_deref().map_or_else(|| "-".to_owned(), encode)
            ),
            Request::Signal { id, proc, signal } => format!("\nsignal {id} {proc} {signal}\n"),
            Request::Resize {
                id,
                proc,
                rows,
                cols,
            } => format!("\nresize {id} {proc} {rows} {cols}\n"),
            Request::Forget { id, proc } => format!("\nforget {id} {proc}\n"),
            Request::Port { id, pipe, port } => format!("\nport {id} {pipe} {port}\n"),
        }
    }

    /// Parses one line (without its newline), strictly.
    pub fn parse(line: &[u8]) -> Result<Self, ParseError> {
        let mut f = fields(line, MAX_REQUEST_LINE)?;
        let request = match f.next() {
            Some("ping") => Request::Ping {
                nonce: token(f.next(), "nonce")?,
            },
            Some("exec") => {
                let id = token(f.next(), "id")?;
                let start_by_ms = number(f.next(), "start-by")?;
                let timeout_ms = number(f.next(), "timeout")?;
                let env = env_field(f.next())?;
                let command = command_field(f.next())?;
                let (stdin, pipe) = match f.next() {
                    Some("-") => (None, None),
                    Some(named) if named.starts_with('@') => {
                        (None, Some(token(named.get(1..), "pipe")?))
                    }
                    other => {
                        let data = bytes(other, "stdin")?;
                        if data.len() > MAX_INLINE_STDIN {
                            return Err(bad("stdin"));
                        }
                        (Some(data), None)
                    }
                };
                Request::Exec(Exec {
                    id,
                    start_by_ms,
                    timeout_ms,
                    env,
                    command,
                    stdin,
                    pipe,
                })
            }
            Some("kill") => Request::Kill {
                id: token(f.next(), "id")?,
                marker: token(f.next(), "marker")?,
            },
            Some("spawn") => Request::Spawn(Spawn {
                id: token(f.next(), "id")?,
                proc: proc_id(f.next())?,
                start_by_ms: number(f.next(), "start-by")?,
                timeout_ms: number(f.next(), "timeout")?,
                tty: tty_field(f.next())?,
                env: env_field(f.next())?,
                command: command_field(f.next())?,
            }),
            Some("procs") => Request::Procs {
                id: token(f.next(), "id")?,
            },
            Some("read") => Request::Read {
                id: token(f.next(), "id")?,
                proc: proc_id(f.next())?,
                out_at: number(f.next(), "offset")?,
                err_at: number(f.next(), "offset")?,
                wait_ms: number(f.next(), "wait")?.min(MAX_READ_WAIT_MS),
            },
            Some("write") => {
                let id = token(f.next(), "id")?;
                let proc = proc_id(f.next())?;
                let data = match f.next() {
                    Some("-") => None,
                    other => {
                        let data = bytes(other, "data")?;
                        if data.is_empty() || data.len() > MAX_INLINE_STDIN {
                            return Err(bad("data"));
                        }
                        Some(data)
                    }
                };
                Request::Write { id, proc, data }
            }
            Some("signal") => Request::Signal {
                id: token(f.next(), "id")?,
                proc: proc_id(f.next())?,
                signal: count(f.next())
                    .and_then(|s| u8::try_from(s).ok())
                    .ok_or_else(|| bad("signal"))?,
            },
            Some("resize") => Request::Resize {
                id: token(f.next(), "id")?,
                proc: proc_id(f.next())?,
                rows: dimension(f.next())?,
                cols: dimension(f.next())?,
            },
            Some("forget") => Request::Forget {
                id: token(f.next(), "id")?,
                proc: proc_id(f.next())?,
            },
            Some("port") => Request::Port {
                id: token(f.next(), "id")?,
                pipe: token(f.next(), "pipe")?,
                port: f
                    .next()
                    .and_then(|p| p.parse::<u16>().ok())
                    .filter(|p| *p > 0 && count(Some(&p.to_string())).is_some())
                    .ok_or_else(|| bad("port"))?,
            },
            _ => return Err(bad("unknown verb")),
        };
        end(f)?;
        Ok(request)
    }
}

impl Reply {
    /// The line, newline included.
    pub fn encode(&self) -> String {
        match self {
            Reply::Hello { boot } => format!("hello {boot} {PROTOCOL_VERSION}\n"),
            Reply::Pong {
                nonce,
                boot,
                now_ms,
            } => format!("pong {nonce} {boot} {now_ms} {PROTOCOL_VERSION}\n"),
            Reply::Stale { id } => format!("stale {id}\n"),
            Reply::Ack { id } => format!("ack {id}\n"),
            Reply::Stdout { id, data } => format!("out {id} {}\n", encode(data)),
            Reply::Stderr { id, data } => format!("err {id} {}\n", encode(data)),
            Reply::Exit {
                id,
                code,
                oom_kills,
                background_killed,
            } => format!("exit {id} {code} {oom_kills} {background_killed}\n"),
            Reply::Killed { id, all_gone } => format!("killed {id} {}\n", u8::from(*all_gone)),
            Reply::Bad { reason } => format!("bad {reason}\n"),
            Reply::Proc { id, info } => format!(
                "proc {id} {} {} {} {} {} {} {}\n",
                info.proc,
                info.started_ms,
                info.status
                    .map_or_else(|| "-".to_owned(), |c| c.to_string()),
                u8::from(info.tty),
                info.out_total,
                info.err_total,
                encode(shown_command(&info.command).as_bytes()),
            ),
            Reply::Chunk {
                id,
                stderr,
                at,
                data,
            } => format!(
                "chunk {id} {} {at} {}\n",
                if *stderr { "e" } else { "o" },
                encode(data)
            ),
            Reply::Done { id, status } => format!("done {id} {}\n", status.as_str()),
        }
    }

    /// Parses one line (without its newline), strictly: the host's guard
    /// against anything else written into the agent's stdout. A `hello` or
    /// `pong` of another version is [`ParseError::Version`].
    pub fn parse(line: &[u8]) -> Result<Self, ParseError> {
        let mut f = fields(line, MAX_REPLY_LINE)?;
        let reply = match f.next() {
            Some("hello") => {
                let boot = token(f.next(), "boot")?;
                version(f)?;
                return Ok(Reply::Hello { boot });
            }
            Some("pong") => {
                let nonce = token(f.next(), "nonce")?;
                let boot = token(f.next(), "boot")?;
                let now_ms = number(f.next(), "now")?;
                version(f)?;
                return Ok(Reply::Pong {
                    nonce,
                    boot,
                    now_ms,
                });
            }
            Some("stale") => Reply::Stale {
                id: token(f.next(), "id")?,
            },
            Some("ack") => Reply::Ack {
                id: token(f.next(), "id")?,
            },
            Some(verb @ ("out" | "err")) => {
                let id = token(f.next(), "id")?;
                let data = bytes(f.next(), "data")?;
                if data.is_empty() || data.len() > CHUNK {
                    return Err(bad("data"));
                }
                if verb == "out" {
                    Reply::Stdout { id, data }
                } else {
                    Reply::Stderr { id, data }
                }
            }
            Some("exit") => Reply::Exit {
                id: token(f.next(), "id")?,
                code: f
                    .next()
                    .filter(|c| c.len() <= 3 && c.bytes().all(|b| b.is_ascii_digit()))
                    .and_then(|c| c.parse().ok())
                    .ok_or_else(|| bad("code"))?,
                oom_kills: count(f.next()).ok_or_else(|| bad("oom"))?,
                background_killed: count(f.next()).ok_or_else(|| bad("bg"))?,
            },
            Some("killed") => Reply::Killed {
                id: token(f.next(), "id")?,
                all_gone: match f.next() {
                    Some("0") => false,
                    Some("1") => true,
                    _ => return Err(bad("killed")),
                },
            },
            Some("bad") => Reply::Bad {
                reason: token(f.next(), "reason")?,
            },
            Some("proc") => {
                let id = token(f.next(), "id")?;
                let proc = proc_id(f.next())?;
                let started_ms = number(f.next(), "started")?;
                let status = match f.next() {
                    Some("-") => None,
                    c => Some(
                        c.filter(|c| c.len() <= 3 && c.bytes().all(|b| b.is_ascii_digit()))
                            .and_then(|c| c.parse().ok())
                            .ok_or_else(|| bad("state"))?,
                    ),
                };
                let tty = match f.next() {
                    Some("0") => false,
                    Some("1") => true,
                    _ => return Err(bad("tty")),
                };
                let out_total = number(f.next(), "out")?;
                let err_total = number(f.next(), "err")?;
                let command =
                    String::from_utf8(bytes(f.next(), "command")?).map_err(|_| bad("command"))?;
                if command.len() > SHOWN_COMMAND {
                    return Err(bad("command"));
                }
                Reply::Proc {
                    id,
                    info: ProcInfo {
                        proc,
                        started_ms,
                        status,
                        tty,
                        out_total,
                        err_total,
                        command,
                    },
                }
            }
            Some("chunk") => {
                let id = token(f.next(), "id")?;
                let stderr = match f.next() {
                    Some("o") => false,
                    Some("e") => true,
                    _ => return Err(bad("stream")),
                };
                let at = number(f.next(), "offset")?;
                let data = bytes(f.next(), "data")?;
                if data.is_empty() || data.len() > CHUNK {
                    return Err(bad("data"));
                }
                Reply::Chunk {
                    id,
                    stderr,
                    at,
                    data,
                }
            }
            Some("done") => Reply::Done {
                id: token(f.next(), "id")?,
                status: DoneStatus::parse(f.next())?,
            },
            _ => return Err(bad("unknown verb")),
        };
        end(f)?;
        Ok(reply)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(s: &str) -> &[u8] {
        let s = s.strip_suffix('\n').unwrap();
        s.strip_prefix('\n').unwrap_or(s).as_bytes()
    }

    #[test]
    fn every_frame_round_trips() {
        let requests = [
            Request::Ping { nonce: "n1".into() },
            Request::Exec(Exec {
                id: "a-1".into(),
                start_by_ms: 1_800_000_000_000,
                timeout_ms: 1500,
                env: vec![format!("{EXEC_MARKER_VAR}=abcdefgh"), "X=a b=c".into()],
                command: "echo 'hi'\nexit 3".into(),
                stdin: Some(b"\x00\xff".to_vec()),
                pipe: None,
            }),
            Request::Exec(Exec {
                id: "a-2".into(),
                start_by_ms: 0,
                timeout_ms: 0,
                env: vec![],
                command: String::new(),
                stdin: None,
                pipe: None,
            }),
            Request::Exec(Exec {
                id: "a-3".into(),
                start_by_ms: 1,
                timeout_ms: 2,
                env: vec![],
                command: "cat".into(),
                stdin: None,
                pipe: Some("0123abcd".into()),
            }),
            Request::Port {
                id: "p-1".into(),
                pipe: "0123abcd".into(),
                port: 8080,
            },
            Request::Kill {
                id: "k".into(),
                marker: "abcdefgh".into(),
            },
        ];
        for r in requests {
            assert_eq!(Request::parse(line(&r.encode())), Ok(r.clone()), "{r:?}");
        }
        let replies = [
            Reply::Hello { boot: "b".into() },
            Reply::Pong {
                nonce: "n".into(),
                boot: "b".into(),
                now_ms: 1_800_000_000_000,
            },
            Reply::Stale { id: "a".into() },
            Reply::Ack { id: "a".into() },
            Reply::Stdout {
                id: "a".into(),
                data: vec![0, 255, b'\n'],
            },
            Reply::Stderr {
                id: "a".into(),
                data: vec![b' '; CHUNK],
            },
            Reply::Exit {
                id: "a".into(),
                code: 255,
                oom_kills: 3,
                background_killed: 99999,
            },
            Reply::Killed {
                id: "a".into(),
                all_gone: true,
            },
            Reply::Bad {
                reason: "env".into(),
            },
        ];
        for r in replies {
            let encoded = r.encode();
            assert!(encoded.len() <= MAX_REPLY_LINE + 1);
            assert_eq!(Reply::parse(line(&encoded)), Ok(r.clone()), "{r:?}");
        }
    }

    /// Anything a workload could write into the agent's stdout that is not
    /// exactly a frame is refused, never half-read.
    #[test]
    fn forged_and_garbled_replies_are_refused() {
        for garbage in [
            "",
            "exit",
            "exit a",
            "exit a 256 0 0",
            "exit a -1 0 0",
            "exit a 1",
            "exit a 1 2",
            "exit a 1 2 3 4",
            "exit a 1 0 1234567",
            "exit a 1 0 -1",
            "exit a 1 x 0",
            "exit a  1 0 0",
            "exit a\t1",
            "exit ../x 1",
            "out a !!!",
            "out a ",
            "out a AAAA AAAA",
            "ack a\u{7f}",
            "pong n",
            "killed a 2",
            "EXIT a 1",
            "exit a 0001",
        ] {
            assert!(Reply::parse(garbage.as_bytes()).is_err(), "{garbage:?}");
        }
        let long = format!("out a {}", "A".repeat(MAX_REPLY_LINE));
        assert!(Reply::parse(long.as_bytes()).is_err());
        let oversized = format!("out a {}", encode(&vec![0; CHUNK + 1]));
        assert!(Reply::parse(oversized.as_bytes()).is_err());
        let id = "x".repeat(MAX_TOKEN + 1);
        assert!(Reply::parse(format!("ack {id}").as_bytes()).is_err());
    }

    #[test]
    fn process_frames_round_trip() {
        let requests = [
            Request::Spawn(Spawn {
                id: "s-1".into(),
                proc: "0123456789abcdef0123456789abcdef".into(),
                start_by_ms: 1_800_000_000_000,
                timeout_ms: 0,
                tty: Some((24, 80)),
                env: vec!["A=1".into()],
                command: "busybox httpd -f -p 8080".into(),
            }),
            Request::Spawn(Spawn {
                id: "s-2".into(),
                proc: "p".into(),
                start_by_ms: 1,
                timeout_ms: 5,
                tty: None,
                env: vec![],
                command: "x".into(),
            }),
            Request::Procs { id: "l".into() },
            Request::Read {
                id: "r".into(),
                proc: "p".into(),
                out_at: 5,
                err_at: 0,
                wait_ms: 1000,
            },
            Request::Write {
                id: "w".into(),
                proc: "p".into(),
                data: Some(b"\x03".to_vec()),
            },
            Request::Write {
                id: "w".into(),
                proc: "p".into(),
                data: None,
            },
            Request::Signal {
                id: "k".into(),
                proc: "p".into(),
                signal: 15,
            },
            Request::Resize {
                id: "z".into(),
                proc: "p".into(),
                rows: 50,
                cols: 200,
            },
            Request::Forget {
                id: "f".into(),
                proc: "p".into(),
            },
        ];
        for r in requests {
            assert_eq!(Request::parse(line(&r.encode())), Ok(r.clone()), "{r:?}");
        }
        let replies = [
            Reply::Proc {
                id: "l".into(),
                info: ProcInfo {
                    proc: "p".into(),
                    started_ms: 7,
                    status: Some(137),
                    tty: true,
                    out_total: 1 << 40,
                    err_total: 0,
                    command: "é".repeat(SHOWN_COMMAND / 2),
                },
            },
            Reply::Proc {
                id: "l".into(),
                info: ProcInfo {
                    proc: "p".into(),
                    started_ms: 7,
                    status: None,
                    tty: false,
                    out_total: 1,
                    err_total: 2,
                    command: String::new(),
                },
            },
            Reply::Chunk {
                id: "r".into(),
                stderr: true,
                at: 99,
                data: vec![7; CHUNK],
            },
            Reply::Done {
                id: "r".into(),
                status: DoneStatus::Busy,
            },
        ];
        for r in replies {
            let encoded = r.encode();
            assert!(encoded.len() <= MAX_REPLY_LINE + 1);
            assert_eq!(Reply::parse(line(&encoded)), Ok(r.clone()), "{r:?}");
        }
        for s in DoneStatus::ALL.map(|(s, _)| s) {
            let done = Reply::Done {
                id: "d".into(),
                status: s,
            };
            assert_eq!(Reply::parse(line(&done.encode())), Ok(done));
        }
        // Past the bounds: no size 0, no tty without x, no unknown status,
        // a read's wait capped.
        for garbage in [
            "spawn a p 1 0 0x80 AA== AA==",
            "spawn a p 1 0 24 AA== AA==",
            "resize a p 0 80",
            "resize a p 10000 80",
            "signal a p 1000",
            "write a p ",
        ] {
            assert!(Request::parse(garbage.as_bytes()).is_err(), "{garbage:?}");
        }
        assert!(Reply::parse(b"done a maybe").is_err());
        assert!(Reply::parse(b"chunk a x 0 AAAA").is_err());
        assert!(Reply::parse(b"proc a p 1 256 0 0 0 AA==").is_err());
        let read = Request::parse(b"read a p 0 0 999999999").unwrap();
        assert!(matches!(read, Request::Read { wait_ms, .. } if wait_ms == MAX_READ_WAIT_MS));
        assert_eq!(
            shown_command(&"é".repeat(SHOWN_COMMAND)).len(),
            SHOWN_COMMAND
        );
    }

    #[test]
    fn hello_and_pong_state_the_version() {
        let hello = Reply::Hello { boot: "b".into() }.encode();
        assert_eq!(hello, format!("hello b {PROTOCOL_VERSION}\n"));
        let pong = Reply::Pong {
            nonce: "n".into(),
            boot: "b".into(),
            now_ms: 7,
        }
        .encode();
        assert_eq!(pong, format!("pong n b 7 {PROTOCOL_VERSION}\n"));
    }

    /// An agent from before versions (a container created by an older
    /// host) is refused as such, not as garbage: the host falls back at once.
    #[test]
    fn an_unversioned_hello_or_pong_is_refused_as_version_0() {
        for old in ["hello b", "pong n b 1800000000000"] {
            assert_eq!(
                Reply::parse(old.as_bytes()),
                Err(ParseError::Version(UNVERSIONED)),
                "{old:?}"
            );
        }
    }

    /// A newer agent may add fields after the version: they are not read,
    /// and the version it speaks is what the host learns.
    #[test]
    fn another_version_is_reported_as_such() {
        let future = PROTOCOL_VERSION + 1;
        for line in [
            format!("hello b {future}"),
            format!("pong n b 5 {future}"),
            format!("pong n b 5 {future} more fields"),
            "hello b 0".to_owned(),
            "hello b 999999999".to_owned(),
        ] {
            let theirs = line
                .split(' ')
                .nth(if line.starts_with("hello") { 2 } else { 4 });
            let theirs: u32 = theirs.unwrap().parse().unwrap();
            assert_eq!(
                Reply::parse(line.as_bytes()),
                Err(ParseError::Version(theirs)),
                "{line:?}"
            );
        }
        let e = Reply::parse(format!("hello b {future}").as_bytes()).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("protocol version {future} (this side speaks {PROTOCOL_VERSION})")
        );
    }

    /// The version field is strict too: our own version with anything after
    /// it, or a field that is not a canonical number, is garbage.
    #[test]
    fn a_garbled_version_is_garbage() {
        let v = PROTOCOL_VERSION;
        for garbage in [
            format!("hello b {v} x"),
            format!("pong n b 5 {v} x"),
            format!("hello b 0{v}"),
            format!("hello b +{v}"),
            "hello b -1".to_owned(),
            "hello b x".to_owned(),
            "hello b 1234567890".to_owned(),
            "hello".to_owned(),
            "pong n b".to_owned(),
        ] {
            assert!(
                matches!(Reply::parse(garbage.as_bytes()), Err(ParseError::Bad(_))),
                "{garbage:?}"
            );
        }
    }

    #[test]
    fn a_marker_is_a_plain_token_of_8_to_64() {
        assert!(valid_marker("py-cancel-0001"));
        assert!(valid_marker(&"x".repeat(MAX_MARKER)));
        assert!(!valid_marker("short"));
        assert!(!valid_marker(&format!("a=b\0{EXEC_MARKER_VAR}=x")));
        assert!(!valid_marker(&"x".repeat(MAX_MARKER + 1)));
    }

    #[test]
    fn requests_are_strict_too() {
        for garbage in [
            "exec a 1 10 - - -",
            "exec a 1 x AA== AA== -",
            "exec a 1 10 AA== AA==",
            "exec a 10 AA== AA== -",
            "kill a",
            "ping",
            "run a",
        ] {
            assert!(Request::parse(garbage.as_bytes()).is_err(), "{garbage:?}");
        }
        // An environment entry without '=' or with a NUL in the command.
        let env = encode(b"NOEQUALS");
        let cmd = encode(b"true");
        assert!(Request::parse(format!("exec a 1 1 {env} {cmd} -").as_bytes()).is_err());
        let env = encode(b"A=1");
        let cmd = encode(b"a\0b");
        assert!(Request::parse(format!("exec a 1 1 {env} {cmd} -").as_bytes()).is_err());
    }
}

//! The data plane: what `execute` takes and returns, the bounded output
//! buffer, and the script that kills a timed-out call's processes.

use std::collections::VecDeque;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use sandbox_agent::protocol::{
    valid_marker, EXEC_MARKER_VAR, EXIT_CANNOT_RUN, EXIT_KILLED, EXIT_TIMED_OUT, MAX_MARKER,
    MIN_MARKER,
};

use super::WORKSPACE_MOUNT;
use crate::error::SandboxError;

/// Exit code reported for a call stopped by its timeout (as `timeout(1)`):
/// the agent's [`EXIT_TIMED_OUT`], as the host's `i64` exit codes.
pub const TIMEOUT_EXIT_CODE: i64 = EXIT_TIMED_OUT as i64;

/// Caller-given environment variables as `KEY=value` entries: names of
/// `[A-Za-z_][A-Za-z0-9_]*` (never the marker's), values without NUL.
pub fn checked_env(env: Vec<(String, String)>) -> Result<Vec<String>, SandboxError> {
    env.into_iter()
        .map(|(key, value)| {
            let valid_key = key
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid_key || key == EXEC_MARKER_VAR || value.contains('\0') {
                return Err(SandboxError::Refused(format!(
                    "environment variable {} is not allowed",
                    sandbox_contract::shown(&key)
                )));
            }
            Ok(format!("{key}={value}"))
        })
        .collect()
}

/// Exit code reported for a call the host cancelled (128 + SIGINT): the
/// host's own, which the agent never reports.
const CANCELLED_EXIT_CODE: i64 = 130;

/// Per-call options of `execute`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ExecOptions {
    /// Wall-clock limit; the configured default when `None`.
    pub timeout: Option<Duration>,
    /// Extra environment variables.
    pub env: Vec<(String, String)>,
    /// Working directory, absolute under `/workspace` or relative to it.
    pub workdir: Option<String>,
    /// Bytes written to the command's stdin (then closed).
    pub stdin: Option<Vec<u8>>,
    /// The execution's id, to cancel it by; a fresh random one when `None`.
    /// 8..=64 characters of `[A-Za-z0-9_-]`. Scoped to the thread's user:
    /// another user's execution of the same id is no concern.
    pub execution_id: Option<String>,
}

/// The longest caller-chosen execution id (the agent's longest marker).
pub const MAX_EXECUTION_ID_LEN: usize = MAX_MARKER;

/// Checks a caller-chosen execution id: it becomes the call's marker, an
/// environment value the agent and the kill script match on, so only a
/// plain token is allowed ([`valid_marker`]).
pub fn check_execution_id(id: &str) -> Result<(), SandboxError> {
    if valid_marker(id) {
        Ok(())
    } else {
        Err(SandboxError::InvalidId(format!(
            "execution id {}: {MIN_MARKER}..={MAX_EXECUTION_ID_LEN} characters of [A-Za-z0-9_-]",
            sandbox_contract::shown(id)
        )))
    }
}

/// One command to run with `sh -c` in a backend's container, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecRequest {
    /// The shell command (`sh -c`), the working directory's `cd` included.
    pub command: String,
    /// Bytes of combined output kept (head and tail); the middle is dropped.
    pub output_limit: usize,
    /// Wall-clock limit; the whole process tree is killed past it.
    pub timeout: Duration,
    /// `KEY=value` pairs, the marker included.
    pub env: Vec<String>,
    /// Where the exec starts: always `/workspace`, which exists. A requested
    /// working directory is created and entered by `command` itself (see
    /// `enter_workdir`), so a missing one is not a runtime error.
    pub workdir: String,
    /// Bytes written to the command's stdin (then closed).
    pub stdin: Option<Vec<u8>>,
    /// This call's id, also in `env` as [`EXEC_MARKER_VAR`].
    pub marker: String,
    /// `uid:gid` to run as; the container's configured user when `None`.
    pub user: Option<String>,
    /// When true, `timeout` counts from the last byte moved in either
    /// direction (file transfers: a large file takes what it takes, a stalled
    /// one is stopped), not from the start.
    pub idle_timeout: bool,
    /// Run under `sandbox-agent` (the container has it mounted): the agent
    /// enforces `timeout` on the whole process tree, the host keeps its own
    /// deadline `AGENT_GRACE` later as a fallback.
    pub agent: bool,
    /// The container's main process is `sandbox-agent serve`: the call may
    /// skip the engine and go to the agent over the attach stream.
    pub agent_serves: bool,
}

/// How long after the agent's deadline the host's own deadline falls.
pub const AGENT_GRACE: Duration = Duration::from_secs(2);

impl ExecRequest {
    /// Checks the options and builds the request.
    pub fn new(
        command: &str,
        options: ExecOptions,
        output_limit: usize,
        default_timeout: Duration,
    ) -> Result<Self, SandboxError> {
        if command.contains('\0') {
            return Err(SandboxError::Refused(
                "the command contains a NUL byte".into(),
            ));
        }
        let marker = match options.execution_id {
            Some(id) => {
                check_execution_id(&id)?;
                id
            }
            None => new_marker(),
        };
        let mut env = vec![format!("{EXEC_MARKER_VAR}={marker}")];
        env.extend(checked_env(options.env)?);
        let workdir = resolve_workdir(options.workdir.as_deref())?;
        let command = if workdir == WORKSPACE_MOUNT {
            command.to_owned()
        } else {
            enter_workdir(&workdir, command)
        };
        Ok(ExecRequest {
            command,
            output_limit,
            timeout: options.timeout.unwrap_or(default_timeout),
            env,
            workdir: WORKSPACE_MOUNT.to_owned(),
            stdin: options.stdin,
            marker,
            user: None,
            idle_timeout: false,
            agent: false,
            agent_serves: false,
        })
    }
}

/// `command` preceded by a line that creates `dir` (as the sandbox user, the
/// exec's user) and enters it; exit code 126 ([`EXIT_CANNOT_RUN`]) when that
/// fails. `dir` is already confined to `/workspace` by [`resolve_workdir`].
pub fn enter_workdir(dir: &str, command: &str) -> String {
    let dir = shlex::try_quote(dir).expect("resolve_workdir refuses NUL");
    format!("mkdir -p {dir} && cd {dir} || exit {EXIT_CANNOT_RUN}\n{command}")
}

/// Confines a working directory to `/workspace`, lexically (`..` refused).
pub fn resolve_workdir(workdir: Option<&str>) -> Result<String, SandboxError> {
    let Some(dir) = workdir else {
        return Ok(WORKSPACE_MOUNT.to_owned());
    };
    let relative = match dir.strip_prefix(WORKSPACE_MOUNT) {
        Some(rest) if rest.is_empty() || rest.starts_with('/') => rest.trim_start_matches('/'),
        _ if dir.starts_with('/') => {
            return Err(SandboxError::Refused(format!(
                "working directory {} is outside {WORKSPACE_MOUNT}",
                sandbox_contract::shown(dir)
            )))
        }
        _ => dir,
    };
    let mut parts = Vec::new();
    for part in relative.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                return Err(SandboxError::Refused(format!(
                    "working directory {} leaves {WORKSPACE_MOUNT}",
                    sandbox_contract::shown(dir)
                )))
            }
            p if p.contains('\0') => {
                return Err(SandboxError::Refused("NUL in working directory".into()))
            }
            p => parts.push(p),
        }
    }
    Ok(if parts.is_empty() {
        WORKSPACE_MOUNT.to_owned()
    } else {
        format!("{WORKSPACE_MOUNT}/{}", parts.join("/"))
    })
}

/// A fresh random execution id.
pub fn new_execution_id() -> String {
    new_marker()
}

fn new_marker() -> String {
    use std::hash::BuildHasher;
    let a = std::collections::hash_map::RandomState::new().hash_one(std::time::SystemTime::now());
    let b = std::collections::hash_map::RandomState::new().hash_one(std::process::id());
    format!("{a:016x}{b:016x}")
}

/// The result of `execute`, with deepagents' `ExecuteResponse` semantics:
/// stdout and stderr combined in arrival order, the exit code, and whether
/// the output was cut at the byte limit; plus whether the timeout fired, and
/// stdout and stderr each on their own (raw bytes too, for binary output).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "serve", derive(schemars::JsonSchema))]
pub struct ExecResponse {
    /// stdout and stderr, in arrival order, capped (head and tail kept).
    pub output: String,
    /// stdout alone, capped like `output` (its own head and tail), as text
    /// (invalid UTF-8 replaced).
    #[serde(default)]
    pub stdout: String,
    /// stderr alone, capped like `output`, as text. A command the host
    /// ended (`reason` set) has the host's note here.
    #[serde(default)]
    pub stderr: String,
    /// The bytes `stdout` was decoded from, exactly as kept (a truncation
    /// marker between head and tail when `truncated`).
    #[serde(skip)]
    pub stdout_bytes: Vec<u8>,
    /// The bytes `stderr` was decoded from.
    #[serde(skip)]
    pub stderr_bytes: Vec<u8>,
    /// The command's exit code; 124 when the timeout killed it.
    pub exit_code: i64,
    /// Whether output was dropped at the cap (any stream: each is at most
    /// the combined output, so a cut in one is a cut in `output`).
    pub truncated: bool,
    /// Whether the timeout fired (`exit_code` is then 124).
    #[serde(default)]
    pub timed_out: bool,
    /// The execution's id, in its thread's user's namespace
    /// (`Sandbox::cancel`, `DELETE /v1/threads/{thread_id}/executions/{id}`).
    #[serde(default)]
    pub execution_id: String,
    /// Why the command ended, when the host or the kernel ended it:
    /// `timeout` (exit 124), `cancelled` (130), `destroyed` (137, its
    /// backend was destroyed) or `oom` (137, the out-of-memory killer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<EndReason>,
    /// Background processes that still held the command's output when it
    /// exited, killed so that the call could end (named on `stderr`); a job
    /// that detached its output (`cmd >log 2>&1 &`) is not one and lives on.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub background_killed: u32,
    /// Whether the in-container agent ran it (false: a `docker exec`).
    #[serde(skip)]
    pub via_agent: bool,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// The note a command killed by the out-of-memory killer gets on stderr.
pub const OUT_OF_MEMORY_NOTE: &str =
    "[sandbox: the command was killed: out of memory (the sandbox's memory limit was reached)]\n";

/// Why the host ended a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "serve", derive(schemars::JsonSchema))]
#[serde(rename_all = "lowercase")]
pub enum EndReason {
    /// It ran past its timeout; its process tree was killed.
    Timeout,
    /// It was cancelled (by id, a client that went away, or Ctrl-C).
    Cancelled,
    /// Its backend was destroyed while it ran, past the grace period.
    Destroyed,
    /// The kernel's out-of-memory killer ended it: the sandbox's memory
    /// limit (`limits.memory_bytes`) was reached (exit 137).
    #[serde(rename = "oom")]
    OutOfMemory,
}

impl EndReason {
    /// The exit code reported for a command the host ended this way.
    pub fn exit_code(self) -> i64 {
        match self {
            EndReason::Timeout => TIMEOUT_EXIT_CODE,
            EndReason::Cancelled => CANCELLED_EXIT_CODE,
            EndReason::Destroyed | EndReason::OutOfMemory => i64::from(EXIT_KILLED),
        }
    }
}

impl ExecResponse {
    /// The response of a command the host ended for `reason`, with no
    /// output of its own (what streamed live was already delivered): the
    /// host's note in `output` and `stderr`, nothing on `stdout`.
    pub fn ended(execution_id: &str, reason: EndReason) -> Self {
        let why = match reason {
            EndReason::Timeout => "[sandbox: the command timed out]\n",
            EndReason::Cancelled => "[sandbox: the command was cancelled]\n",
            EndReason::Destroyed => {
                "[sandbox: the command was killed: its backend was destroyed]\n"
            }
            EndReason::OutOfMemory => OUT_OF_MEMORY_NOTE,
        };
        ExecResponse {
            output: why.to_owned(),
            stdout: String::new(),
            stderr: why.to_owned(),
            stdout_bytes: Vec::new(),
            stderr_bytes: why.as_bytes().to_vec(),
            exit_code: reason.exit_code(),
            truncated: false,
            timed_out: reason == EndReason::Timeout,
            execution_id: execution_id.to_owned(),
            reason: Some(reason),
            background_killed: 0,
            via_agent: false,
        }
    }
}

/// Which stream a chunk of live output came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "serve", derive(schemars::JsonSchema))]
#[serde(rename_all = "lowercase")]
pub enum StreamKind {
    /// The command's standard output.
    Stdout,
    /// The command's standard error.
    Stderr,
}

/// A callback receiving output chunks as they arrive.
pub type OutputSink<'a> = &'a mut (dyn FnMut(StreamKind, &[u8]) + Send);

/// Keeps the first and last bytes of the output, at most `limit` in all,
/// whatever the command prints; the middle is replaced by a marker.
/// Buffers grow with what arrives (never past their share of `limit`), so a
/// quiet stream costs nothing.
#[derive(Debug)]
pub struct CappedOutput {
    head: Vec<u8>,
    tail: VecDeque<u8>,
    head_limit: usize,
    tail_limit: usize,
    dropped: u64,
}

impl CappedOutput {
    /// Keeps at most `limit` bytes: the first half and the last half.
    pub fn new(limit: usize) -> Self {
        CappedOutput {
            head: Vec::new(),
            tail: VecDeque::new(),
            head_limit: limit - limit / 2,
            tail_limit: limit / 2,
            dropped: 0,
        }
    }

    /// Adds a chunk, dropping from the middle past the cap.
    pub fn push(&mut self, mut chunk: &[u8]) {
        let room = self.head_limit - self.head.len();
        if room > 0 {
            let take = room.min(chunk.len());
            // Doubling, but never past the head's share.
            let want = (self.head.len() + take)
                .max(self.head.capacity() * 2)
                .clamp(1024.min(self.head_limit), self.head_limit);
            if want > self.head.capacity() {
                self.head.reserve_exact(want - self.head.len());
            }
            self.head.extend_from_slice(&chunk[..take]);
            chunk = &chunk[take..];
        }
        if chunk.is_empty() {
            return;
        }
        if self.tail_limit == 0 {
            self.dropped += chunk.len() as u64;
            return;
        }
        if self.tail.capacity() < self.tail_limit {
            self.tail.reserve_exact(self.tail_limit - self.tail.len());
        }
        if chunk.len() >= self.tail_limit {
            self.dropped += (self.tail.len() + chunk.len() - self.tail_limit) as u64;
            self.tail.clear();
            self.tail.extend(&chunk[chunk.len() - self.tail_limit..]);
            return;
        }
        let overflow = (self.tail.len() + chunk.len()).saturating_sub(self.tail_limit);
        self.tail.drain(..overflow);
        self.dropped += overflow as u64;
        self.tail.extend(chunk);
    }

    /// Whether anything was dropped.
    pub fn truncated(&self) -> bool {
        self.dropped > 0
    }

    /// The kept bytes: the head, a `[... N bytes truncated ...]` marker when
    /// anything was dropped, the tail.
    pub fn into_bytes(self) -> Vec<u8> {
        let mut bytes = self.head;
        if self.dropped > 0 {
            bytes.extend_from_slice(
                format!("\n[... {} bytes truncated ...]\n", self.dropped).as_bytes(),
            );
        }
        bytes.extend(self.tail);
        bytes
    }
}

/// What one exec printed: the combined output and each stream alone, each
/// capped at the same limit (so at most three times the limit is held).
#[derive(Debug)]
pub struct ExecOutput {
    combined: CappedOutput,
    stdout: CappedOutput,
    stderr: CappedOutput,
}

impl ExecOutput {
    /// Keeps at most `limit` bytes of each: combined, stdout, stderr.
    pub fn new(limit: usize) -> Self {
        ExecOutput {
            combined: CappedOutput::new(limit),
            stdout: CappedOutput::new(limit),
            stderr: CappedOutput::new(limit),
        }
    }

    /// Adds a chunk of `kind`, in arrival order.
    pub fn push(&mut self, kind: StreamKind, chunk: &[u8]) {
        self.combined.push(chunk);
        match kind {
            StreamKind::Stdout => self.stdout.push(chunk),
            StreamKind::Stderr => self.stderr.push(chunk),
        }
    }

    /// The response (text with invalid UTF-8 replaced, including characters
    /// cut by the cap; the raw bytes kept beside it).
    pub fn finish(self, exit_code: i64, timed_out: bool) -> ExecResponse {
        let truncated =
            self.combined.truncated() || self.stdout.truncated() || self.stderr.truncated();
        let stdout_bytes = self.stdout.into_bytes();
        let stderr_bytes = self.stderr.into_bytes();
        ExecResponse {
            output: String::from_utf8_lossy(&self.combined.into_bytes()).into_owned(),
            stdout: String::from_utf8_lossy(&stdout_bytes).into_owned(),
            stderr: String::from_utf8_lossy(&stderr_bytes).into_owned(),
            stdout_bytes,
            stderr_bytes,
            exit_code,
            truncated,
            timed_out,
            execution_id: String::new(),
            reason: timed_out.then_some(EndReason::Timeout),
            background_killed: 0,
            via_agent: false,
        }
    }
}

/// Kills every process of a call: those carrying its marker, and their
/// descendants (which may have cleared their environment). Where the shell's
/// `read` takes `-d` (busybox ash, bash) it is fork-free (only builtins and
/// /proc reads), so it works when the call exhausted the container's pids
/// limit. dash (Debian's `sh`, the Python image) has no `read -d` and drops
/// NUL bytes, which would blur one environment entry into the next: there
/// each process costs a `tr | grep` (the agent, which kills without forking,
/// is the first line of defence). Processes are stopped before they are
/// killed so a fork loop cannot outrun it; repeats until none is left. Run
/// as `sh -c SCRIPT kill MARKER`. (Its marker entry is
/// [`EXEC_MARKER_VAR`], spelled out: a test holds the two together.)
pub const KILL_SCRIPT: &str = r#"
m="SANDBOX_EXEC_ID=$1"; me=$$
nul_read=0
# By behaviour, not by exit status: a shell whose read lacks -d fails it
# with a status of its own. The first NUL-ended field of our own command
# line is never empty.
if IFS= read -r -d "" first < "/proc/$$/cmdline" 2>/dev/null && [ -n "$first" ]; then nul_read=1; fi
marked() {
  if [ $nul_read = 0 ]; then
    tr '\0' '\n' < "/proc/$1/environ" | grep -qxF -e "$m"
    return
  fi
  while IFS= read -r -d "" kv; do [ "$kv" = "$m" ] && return 0; done < "/proc/$1/environ"
  return 1
}
for round in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20; do
  set=" "
  for d in /proc/[0-9]*; do
    p=${d#/proc/}
    [ "$p" = "$me" ] && continue
    marked "$p" 2>/dev/null && set="$set$p "
  done
  grew=1
  while [ $grew = 1 ]; do
    grew=0
    for d in /proc/[0-9]*; do
      p=${d#/proc/}
      case "$set" in *" $p "*) continue ;; esac
      read -r _ _ _ ppid _ < "$d/stat" 2>/dev/null || continue
      case "$set" in *" $ppid "*) set="$set$p "; grew=1 ;; esac
    done
  done
  [ "$set" = " " ] && exit 0
  kill -STOP $set 2>/dev/null
  kill -KILL $set 2>/dev/null
done
exit 1
"#;

#[cfg(test)]
mod tests {
    use super::*;

    /// The kept text and whether anything was dropped.
    fn kept(out: CappedOutput) -> (String, bool) {
        let truncated = out.truncated();
        (String::from_utf8(out.into_bytes()).unwrap(), truncated)
    }

    #[test]
    fn head_and_tail_are_kept_around_a_marker() {
        let mut out = CappedOutput::new(10);
        out.push(b"0123456789abcdefghij");
        let (text, truncated) = kept(out);
        assert!(truncated);
        assert!(text.starts_with("01234"), "{text}");
        assert!(text.ends_with("fghij"), "{text}");
        assert!(text.contains("[... 10 bytes truncated ...]"));
    }

    #[test]
    fn small_chunks_keep_the_tail_rolling() {
        let mut out = CappedOutput::new(4);
        for b in b"abcdefgh".chunks(1) {
            out.push(b);
        }
        let (text, _) = kept(out);
        assert!(text.starts_with("ab") && text.ends_with("gh"), "{text}");
        assert!(text.contains("[... 4 bytes truncated ...]"));
    }

    #[test]
    fn output_at_the_cap_is_not_truncated() {
        let mut out = CappedOutput::new(3);
        out.push(b"abc");
        assert_eq!(kept(out), ("abc".to_owned(), false));
    }

    #[test]
    fn memory_stays_bounded_under_a_flood() {
        let mut out = CappedOutput::new(1000);
        let chunk = vec![b'x'; 64 * 1024];
        for _ in 0..1000 {
            out.push(&chunk);
        }
        assert!(out.head.len() + out.tail.len() <= 1000);
        assert!(out.head.capacity() <= 500, "{}", out.head.capacity());
        assert_eq!(out.dropped, 64 * 1024 * 1000 - 1000);
    }

    /// Bug: a quiet stream preallocated 64 KiB; with three buffers per exec
    /// that tripled the footprint of every call in flight.
    #[test]
    fn a_quiet_stream_allocates_nothing() {
        let out = CappedOutput::new(1 << 20);
        assert_eq!((out.head.capacity(), out.tail.capacity()), (0, 0));
        let mut out = CappedOutput::new(1 << 20);
        out.push(b"hi");
        assert!(out.head.capacity() <= 1024, "{}", out.head.capacity());
    }

    /// Bug: stdout and stderr came back only mixed in `output`, and binary
    /// output only as lossy text.
    #[test]
    fn each_stream_is_kept_alone_as_exact_bytes_beside_the_combined_output() {
        let mut out = ExecOutput::new(100);
        out.push(StreamKind::Stdout, b"\xff\x00a");
        out.push(StreamKind::Stderr, b"err");
        out.push(StreamKind::Stdout, b"b");
        let r = out.finish(3, false);
        assert_eq!(r.stdout_bytes, b"\xff\x00ab");
        assert_eq!(r.stderr_bytes, b"err");
        assert_eq!(r.stdout, "\u{fffd}\u{0}ab");
        assert_eq!(r.stderr, "err");
        assert_eq!(r.output, "\u{fffd}\u{0}aerrb", "arrival order");
        assert_eq!((r.exit_code, r.truncated, r.timed_out), (3, false, false));
        let json = serde_json::to_value(&r).unwrap();
        assert!(
            json.get("stdout_bytes").is_none(),
            "raw bytes stay off the wire"
        );
    }

    #[test]
    fn each_stream_has_its_own_head_and_tail_under_the_same_cap() {
        let mut out = ExecOutput::new(10);
        out.push(StreamKind::Stdout, b"0123456789abcdefghij");
        out.push(StreamKind::Stderr, b"E");
        let r = out.finish(0, false);
        assert!(r.truncated);
        assert_eq!(r.stdout, "01234\n[... 10 bytes truncated ...]\nfghij");
        assert_eq!(r.stderr, "E", "a short stream is whole");
        assert!(r.output.ends_with("ghijE"), "{}", r.output);
        // Alone, stderr stays under the cap while the combined output is cut.
        let mut out = ExecOutput::new(10);
        out.push(StreamKind::Stdout, b"0123456789");
        out.push(StreamKind::Stderr, b"abcde");
        let r = out.finish(0, false);
        assert!(r.truncated);
        assert_eq!(
            (r.stdout.as_str(), r.stderr.as_str()),
            ("0123456789", "abcde")
        );
    }

    #[test]
    fn an_ended_command_has_the_note_on_stderr_and_nothing_on_stdout() {
        let r = ExecResponse::ended("id-123456", EndReason::Cancelled);
        assert_eq!(r.stdout, "");
        assert_eq!(r.stderr, r.output);
        assert_eq!(r.stderr_bytes, r.output.as_bytes());
        assert_eq!((r.exit_code, r.reason), (130, Some(EndReason::Cancelled)));
    }

    #[test]
    fn working_directories_stay_under_the_workspace() {
        assert_eq!(resolve_workdir(None).unwrap(), "/workspace");
        assert_eq!(
            resolve_workdir(Some("src/app")).unwrap(),
            "/workspace/src/app"
        );
        assert_eq!(
            resolve_workdir(Some("/workspace/x/./y/")).unwrap(),
            "/workspace/x/y"
        );
        for bad in [
            "/etc",
            "..",
            "a/../../b",
            "/workspace/../etc",
            "/workspaces",
        ] {
            assert!(resolve_workdir(Some(bad)).is_err(), "{bad}");
        }
    }

    /// Bug: `exec -w sub` on a missing directory failed in the OCI runtime
    /// (its error on stdout, exit 126) instead of creating it.
    #[test]
    fn a_working_directory_is_created_by_the_command_itself() {
        let t = Duration::from_secs(1);
        let options = ExecOptions {
            workdir: Some("new dir/sub".into()),
            ..Default::default()
        };
        let r = ExecRequest::new("pwd", options, 10, t).unwrap();
        assert_eq!(
            r.workdir, "/workspace",
            "the exec starts where a directory exists"
        );
        assert_eq!(
            r.command,
            "mkdir -p '/workspace/new dir/sub' && cd '/workspace/new dir/sub' || exit 126\npwd"
        );
        let plain = ExecRequest::new("pwd", ExecOptions::default(), 10, t).unwrap();
        assert_eq!(
            plain.command, "pwd",
            "no working directory: the command as given"
        );

        // The script itself, run by this host's sh on a scratch directory.
        let scratch = tempfile::tempdir().unwrap();
        let dir = scratch.path().join("a b/it's");
        let script = enter_workdir(dir.to_str().unwrap(), "pwd; echo \"$0\"");
        let out = std::process::Command::new("sh")
            .args(["-c", &script, "sh"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            format!("{}\nsh\n", dir.display())
        );
        assert!(dir.is_dir());
        // Not enterable (a file in the way): 126, the command never runs.
        let file = scratch.path().join("file");
        std::fs::write(&file, "").unwrap();
        let script = enter_workdir(file.join("x").to_str().unwrap(), "echo ran");
        let out = std::process::Command::new("sh")
            .args(["-c", &script])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(126));
        assert!(!String::from_utf8_lossy(&out.stdout).contains("ran"));
    }

    #[test]
    fn the_kill_script_matches_the_agents_marker_variable() {
        assert!(KILL_SCRIPT.contains(&format!("m=\"{EXEC_MARKER_VAR}=$1\"")));
    }

    #[test]
    fn execution_ids_are_the_agents_markers() {
        assert!(check_execution_id("py-cancel-0001").is_ok());
        assert!(check_execution_id(&"x".repeat(MAX_EXECUTION_ID_LEN)).is_ok());
        for bad in ["short", "with space-0001", "a=b-000000"] {
            assert!(check_execution_id(bad).is_err(), "{bad:?}");
        }
        assert!(check_execution_id(&"x".repeat(MAX_EXECUTION_ID_LEN + 1)).is_err());
        // Every id the host makes up is one too.
        assert!(check_execution_id(&new_execution_id()).is_ok());
    }

    #[test]
    fn environment_keys_are_checked_and_the_marker_is_reserved() {
        let t = Duration::from_secs(1);
        let ok = ExecOptions {
            env: vec![("FOO_1".into(), "a b".into())],
            ..Default::default()
        };
        let r = ExecRequest::new("true", ok, 10, t).unwrap();
        assert!(r.env.contains(&"FOO_1=a b".to_string()));
        assert!(r.env[0].starts_with(&format!("{EXEC_MARKER_VAR}=")));
        for key in ["1X", "A-B", "", EXEC_MARKER_VAR, "A=B"] {
            let o = ExecOptions {
                env: vec![(key.into(), "v".into())],
                ..Default::default()
            };
            assert!(ExecRequest::new("true", o, 10, t).is_err(), "{key}");
        }
    }
}

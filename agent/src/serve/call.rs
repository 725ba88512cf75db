//! One exec of `serve`: `sh -c COMMAND` with the call's environment, its
//! output relayed as frames, then its status. Run as the sandbox user (serve
//! is root), `serve` supervises the command itself (`supervise.rs`);
//! otherwise (serve runs as the workload's user, in containers of older
//! hosts) under `sandbox-agent reap`, which makes itself the call's
//! subreaper.

use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::JoinHandle;

use sandbox_agent::protocol::{
    Exec, Reply, AGENT_MOUNT, CHUNK, EXIT_CANNOT_RUN, EXIT_KILLED, EXIT_NOT_FOUND, PLANE_MOUNT,
    PLANE_PIPE_SUFFIX,
};

use super::{now_ms, Calls, Replies};
use crate::identity::SandboxUser;
use crate::kill::kill_marked;
use crate::{procs, AGENT_FAILED};

/// A call acknowledged to the host, to run on a thread of its own.
pub(crate) struct Call {
    pub replies: Replies,
    pub exec: Exec,
    /// Its [`sandbox_agent::protocol::EXEC_MARKER_VAR`] value.
    pub marker: String,
    pub calls: Calls,
    /// The user the command runs as and its group (none: as serve).
    pub run_as: Option<(SandboxUser, libc::gid_t)>,
}

impl Call {
    /// Runs the call and reports its status.
    pub fn run(self) {
        let (replies, id) = (self.replies.clone(), self.exec.id.clone());
        let (calls, marker) = (self.calls.clone(), self.marker.clone());
        let oom_before = oom_kills();
        let (code, background_killed) = self.start_and_wait();
        calls.end(&marker);
        let oom_kills = match (oom_before, oom_kills()) {
            (Some(before), Some(after)) => {
                u32::try_from(after.saturating_sub(before)).unwrap_or(u32::MAX)
            }
            _ => 0,
        };
        replies.say(Reply::Exit {
            id,
            code,
            oom_kills,
            background_killed,
        });
    }

    /// The call's status: its own, 137 when cancelled before it started,
    /// 126 when it could not start (or would start past its start-by time);
    /// and how many background processes were killed to end it.
    fn start_and_wait(self) -> (u8, u32) {
        match self.run_as {
            Some(run_as) => self.supervised(run_as),
            None => self.under_reap(),
        }
    }

    /// As the sandbox user in the call's group, supervised by this thread.
    fn supervised(mut self, (user, group): (SandboxUser, libc::gid_t)) -> (u8, u32) {
        let pipe = match self.plane_pipe() {
            Ok(pipe) => pipe,
            Err(code) => return (code, 0),
        };
        // By its path: a search of PATH costs a failed exec per directory
        // before it, each a lookup in the image's filesystem (a round trip
        // to the engine's fuse-overlayfs on some hosts, 0.15 ms each).
        let mut cmd = Command::new(SHELL);
        cmd.arg0("sh").args(["-c", &self.exec.command]);
        if let Err(e) = connect_io(&mut cmd, &self.exec, pipe) {
            self.say_cannot_start(&e.to_string());
            return (EXIT_CANNOT_RUN, 0);
        }
        let filter = sandbox_filter();
        // SAFETY: drop_to makes async-signal-safe syscalls only.
        unsafe { cmd.pre_exec(move || crate::identity::drop_to(user, group, filter)) };
        let child = match self.spawn_as_user(&mut cmd, (user, group)) {
            Ok(child) => child,
            Err(code) => return (code, 0),
        };
        // The plane pipe's copies went with `cmd`: only the command holds it.
        drop(cmd);
        let timeout = std::time::Duration::from_millis(self.exec.timeout_ms);
        let ended = super::supervise::supervise(
            child,
            self.exec.stdin.take(),
            timeout,
            (user, group),
            &self.replies,
            &self.exec.id,
        );
        (ended.code, ended.background_killed)
    }

    /// Under `sandbox-agent reap`, which reports back on a pipe.
    fn under_reap(mut self) -> (u8, u32) {
        let (mut child, report) = match self.start_reap() {
            Ok(started) => started,
            Err(code) => return (code, 0),
        };
        let Some(relays) = self.connect(&mut child) else {
            // No thread to spare (the pids limit): rather than run it half
            // connected, end it as one that could not start.
            let _ = child.kill();
            kill_marked(&self.marker);
            let _ = child.wait();
            self.say_cannot_start("no thread to spare");
            return (EXIT_CANNOT_RUN, 0);
        };
        for relay in relays.into_iter().flatten() {
            let _ = relay.join();
        }
        let code = status_of(child.wait());
        // Written by `reap` just before it exits; empty when it died.
        let mut text = String::new();
        let _ = std::fs::File::from(report)
            .take(16)
            .read_to_string(&mut text);
        (code, text.trim().parse().unwrap_or(0))
    }

    /// The plane pipe the host offered with the request, connected before
    /// anything starts (an exec whose stdin and stdout it is).
    fn plane_pipe(&self) -> Result<Option<std::os::unix::net::UnixStream>, u8> {
        let Some(name) = &self.exec.pipe else {
            return Ok(None);
        };
        connect_pipe(name).map(Some).map_err(|e| {
            self.say_cannot_start(&format!("the host's pipe: {e}"));
            EXIT_CANNOT_RUN
        })
    }

    /// Spawns `cmd` unless the call was cancelled or is past its start-by
    /// time; the status to report when it does not start.
    ///
    /// Held through the spawn, which returns once the child has exec'd (so
    /// is in the call's group and carries the marker): a kill either sees
    /// it or stops it. For `reap`, which is root until it execs (the
    /// workload cannot stop it on the way).
    fn spawn_unless_cancelled(&self, cmd: &mut Command) -> Result<Child, u8> {
        self.calls
            .while_held(&self.marker, |cancelled| {
                self.may_start(cancelled).map(|()| cmd.spawn())
            })?
            .map_err(|e| self.spawn_failed(e))
    }

    /// Whether the call may start: not cancelled, not past its start-by
    /// time; else the status to report.
    fn may_start(&self, cancelled: bool) -> Result<(), u8> {
        if cancelled {
            Err(EXIT_KILLED)
        } else if now_ms() > self.exec.start_by_ms {
            Err(EXIT_CANNOT_RUN)
        } else {
            Ok(())
        }
    }

    /// Says why a spawn failed; the status to report.
    fn spawn_failed(&self, e: std::io::Error) -> u8 {
        self.say_cannot_start(&e.to_string());
        if e.kind() == std::io::ErrorKind::NotFound {
            EXIT_NOT_FOUND
        } else {
            EXIT_CANNOT_RUN
        }
    }

    /// Spawns `cmd`, which becomes the sandbox user before it execs, unless
    /// the call was cancelled or is past its start-by time; the status to
    /// report when it does not start, or was cancelled while starting.
    ///
    /// Not under the registry's lock, unlike [`Self::spawn_unless_cancelled`]:
    /// between its privilege drop and its exec the child is the workload's
    /// to stop, and a spawn waits for the exec. Held through it, the lock
    /// would stall every call and kill of this serve; so a kill read
    /// meanwhile is seen here afterwards, and ends the child's group.
    fn spawn_as_user(
        &self,
        cmd: &mut Command,
        (user, group): (SandboxUser, libc::gid_t),
    ) -> Result<Child, u8> {
        self.calls
            .while_held(&self.marker, |cancelled| self.may_start(cancelled))?;
        let mut child = cmd.spawn().map_err(|e| self.spawn_failed(e))?;
        if self.calls.while_held(&self.marker, |cancelled| cancelled) {
            let _ = child.kill();
            procs::kill_group(group, Some(user));
            let _ = child.wait();
            return Err(EXIT_KILLED);
        }
        Ok(child)
    }

    /// Starts `reap` unless the call was cancelled or is past its start-by
    /// time; the status to report when it does not start.
    fn start_reap(&self) -> Result<(Child, std::os::fd::OwnedFd), u8> {
        let (report, report_write) = procs::pipe().ok_or_else(|| {
            self.say_cannot_start("no pipe");
            EXIT_CANNOT_RUN
        })?;
        let pipe = self.plane_pipe()?;
        let mut cmd = reap_command(&self.exec, report_write, pipe).map_err(|e| {
            self.say_cannot_start(&e.to_string());
            EXIT_CANNOT_RUN
        })?;
        let child = self.spawn_unless_cancelled(&mut cmd)?;
        // The parent's copy of the write end went with `cmd` (dropped here):
        // the read end sees its end when `reap` exits.
        drop(cmd);
        Ok((child, report))
    }

    fn say_cannot_start(&self, why: &str) {
        say_stderr(
            &self.replies,
            &self.exec.id,
            &format!("cannot start the command: {why}"),
        );
    }

    /// Feeds the call's stdin and relays its output, each on a thread of its
    /// own; the relays to wait for, `None` when a thread could not start.
    fn connect(&mut self, child: &mut Child) -> Option<[Option<JoinHandle<()>>; 2]> {
        let mut threads_ok = true;
        if let (Some(mut pipe), Some(bytes)) = (child.stdin.take(), self.exec.stdin.take()) {
            // The command may exit without reading it all.
            threads_ok &= std::thread::Builder::new()
                .spawn(move || {
                    let _ = pipe.write_all(&bytes);
                })
                .is_ok();
        }
        let id = &self.exec.id;
        let relays = [
            relay(child.stdout.take(), self.replies.clone(), id.clone(), true),
            relay(child.stderr.take(), self.replies.clone(), id.clone(), false),
        ];
        if !threads_ok || relays.iter().any(Result::is_err) {
            return None;
        }
        let [out, err] = relays;
        Some([out.ok().flatten(), err.ok().flatten()])
    }
}

/// Connects to the plane pipe `name` the host offered for a call.
pub(crate) fn connect_pipe(name: &str) -> std::io::Result<std::os::unix::net::UnixStream> {
    if !sandbox_agent::protocol::valid_token(name) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a pipe name",
        ));
    }
    let Some(dir) = super::plane::dir() else {
        return Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("no plane at {PLANE_MOUNT}"),
        ));
    };
    std::os::unix::net::UnixStream::connect(format!("{dir}/{name}{PLANE_PIPE_SUFFIX}"))
}

/// The shell every call runs in: any image with `/bin/sh` works.
const SHELL: &str = "/bin/sh";

/// The seccomp filter every command of the sandbox user runs under, built
/// once.
fn sandbox_filter() -> &'static crate::seccomp::Filter {
    static FILTER: std::sync::OnceLock<crate::seccomp::Filter> = std::sync::OnceLock::new();
    FILTER.get_or_init(crate::seccomp::Filter::new)
}

/// `sandbox-agent reap --timeout-ms N -- sh -c COMMAND` with the call's
/// environment and pipes (stdin and stdout the plane `pipe` when there is
/// one).
fn reap_command(
    exec: &Exec,
    report: std::os::fd::OwnedFd,
    pipe: Option<std::os::unix::net::UnixStream>,
) -> std::io::Result<Command> {
    use std::os::fd::AsRawFd;
    let exe = std::env::current_exe().unwrap_or_else(|_| AGENT_MOUNT.into());
    let mut cmd = Command::new(exe);
    cmd.args(["reap", "--timeout-ms", &exec.timeout_ms.to_string()]);
    cmd.args(["--report-fd", &REPORT_FD.to_string()]);
    let fd = report.as_raw_fd();
    // SAFETY: dup2 and fcntl only, between fork and exec; `report` lives in
    // the closure (so in `cmd`) until the spawn is done.
    unsafe {
        cmd.pre_exec(move || {
            let _keep = &report;
            let placed = if fd == REPORT_FD {
                libc::fcntl(fd, libc::F_SETFD, 0)
            } else {
                libc::dup2(fd, REPORT_FD)
            };
            if placed < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    };
    cmd.args(["--", "sh", "-c", &exec.command]);
    connect_io(&mut cmd, exec, pipe)?;
    Ok(cmd)
}

/// The call's environment and pipes: stdin and stdout the plane `pipe`
/// when there is one, else pipes (stdin only when the call has bytes for
/// it); stderr a pipe.
fn connect_io(
    cmd: &mut Command,
    exec: &Exec,
    pipe: Option<std::os::unix::net::UnixStream>,
) -> std::io::Result<()> {
    cmd.stderr(Stdio::piped());
    match pipe {
        Some(pipe) => {
            let output = pipe.try_clone()?;
            cmd.stdin(Stdio::from(std::os::fd::OwnedFd::from(pipe)))
                .stdout(Stdio::from(std::os::fd::OwnedFd::from(output)));
        }
        None => {
            cmd.stdin(if exec.stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped());
        }
    }
    for kv in &exec.env {
        if let Some((key, value)) = kv.split_once('=') {
            cmd.env(key, value);
        }
    }
    Ok(())
}

/// Where `reap` writes how many background processes it killed.
const REPORT_FD: libc::c_int = 3;

/// Processes of this container the out-of-memory killer ended so far (the
/// memory cgroup's counter, v1 or v2), if the container shows it. The file
/// stays open: each call reads it twice, and a read at offset 0 of a
/// cgroup file renders it anew.
fn oom_kills() -> Option<u64> {
    use std::os::unix::fs::FileExt;
    static COUNTER: std::sync::OnceLock<Option<std::fs::File>> = std::sync::OnceLock::new();
    let file = COUNTER.get_or_init(|| {
        [
            "/sys/fs/cgroup/memory/memory.oom_control",
            "/sys/fs/cgroup/memory.events",
        ]
        .iter()
        .find_map(|path| std::fs::File::open(path).ok())
    });
    let mut buf = [0u8; 512];
    let n = file.as_ref()?.read_at(&mut buf, 0).ok()?;
    std::str::from_utf8(&buf[..n])
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("oom_kill "))
        .and_then(|n| n.trim().parse().ok())
}

/// `reap`'s status as the shell-style status of the frame.
pub(crate) fn status_of(waited: std::io::Result<ExitStatus>) -> u8 {
    use std::os::unix::process::ExitStatusExt;
    let code = match waited {
        Ok(status) => status
            .code()
            .or_else(|| status.signal().map(|s| 128 + s))
            .unwrap_or(AGENT_FAILED),
        Err(_) => AGENT_FAILED,
    };
    u8::try_from(code).unwrap_or(255)
}

fn say_stderr(replies: &Replies, id: &str, message: &str) {
    replies.say(Reply::Stderr {
        id: id.to_owned(),
        data: format!("sandbox-agent: {message}\n").into_bytes(),
    });
}

/// Reports a call that could not start (exit 126, as a shell would).
pub(crate) fn cannot_start(replies: &Replies, id: String, e: &std::io::Error) {
    say_stderr(replies, &id, &format!("cannot start the command: {e}"));
    replies.say(Reply::Exit {
        id,
        code: EXIT_CANNOT_RUN,
        oom_kills: 0,
        background_killed: 0,
    });
}

/// Relays one output pipe as frames of at most [`CHUNK`] bytes.
fn relay(
    from: Option<impl Read + Send + 'static>,
    replies: Replies,
    id: String,
    stdout: bool,
) -> std::io::Result<Option<JoinHandle<()>>> {
    let Some(mut from) = from else {
        return Ok(None);
    };
    std::thread::Builder::new()
        .spawn(move || {
            let mut buf = vec![0u8; CHUNK];
            loop {
                match from.read(&mut buf) {
                    Ok(0) => return,
                    Ok(n) => {
                        let (id, data) = (id.clone(), buf[..n].to_vec());
                        let reply = if stdout {
                            Reply::Stdout { id, data }
                        } else {
                            Reply::Stderr { id, data }
                        };
                        if !replies.say(reply) {
                            return;
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => return,
                }
            }
        })
        .map(Some)
}

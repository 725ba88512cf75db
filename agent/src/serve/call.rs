//! One exec of `serve`: `sandbox-agent reap` with the call's environment,
//! its output relayed as frames, then its status.

use std::io::{Read, Write};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::JoinHandle;

use sandbox_agent::protocol::{
    Exec, Reply, AGENT_MOUNT, CHUNK, EXIT_CANNOT_RUN, EXIT_KILLED, PLANE_MOUNT, PLANE_PIPE_SUFFIX,
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
    /// and how many background processes `reap` killed to end it.
    fn start_and_wait(mut self) -> (u8, u32) {
        let (mut child, report) = match self.start() {
            Ok(started) => started,
            Err(code) => return (code, 0),
        };
        let Some(relays) = self.connect(&mut child) else {
            // No thread to spare (the pids limit): rather than run it half
            // connected, end it as one that could not start.
            let _ = child.kill();
            match self.run_as {
                Some((user, group)) => {
                    procs::kill_group(group, Some(user));
                }
                None => {
                    kill_marked(&self.marker);
                }
            }
            let _ = child.wait();
            say_stderr(
                &self.replies,
                &self.exec.id,
                "cannot start the command: no thread to spare",
            );
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

    /// Starts `reap` unless the call was cancelled or is past its start-by
    /// time; the status to report when it does not start.
    fn start(&self) -> Result<(Child, std::os::fd::OwnedFd), u8> {
        let (report, report_write) = procs::pipe().ok_or_else(|| {
            say_stderr(
                &self.replies,
                &self.exec.id,
                "cannot start the command: no pipe",
            );
            EXIT_CANNOT_RUN
        })?;
        // An exec whose stdin and stdout are a plane pipe: connected before
        // anything starts (the host offered it with the request).
        let pipe = match &self.exec.pipe {
            None => None,
            Some(name) => match connect_pipe(name) {
                Ok(stream) => Some(stream),
                Err(e) => {
                    say_stderr(
                        &self.replies,
                        &self.exec.id,
                        &format!("cannot start the command: the host's pipe: {e}"),
                    );
                    return Err(EXIT_CANNOT_RUN);
                }
            },
        };
        let mut cmd = command(&self.exec, self.run_as, report_write, pipe).map_err(|e| {
            say_stderr(
                &self.replies,
                &self.exec.id,
                &format!("cannot start the command: {e}"),
            );
            EXIT_CANNOT_RUN
        })?;
        // Held through the spawn, which returns once `reap` has exec'd (so
        // carries the marker): a kill either sees it or stops it.
        let spawned = self.calls.while_held(&self.marker, |cancelled| {
            if cancelled {
                return Err(EXIT_KILLED);
            }
            if now_ms() > self.exec.start_by_ms {
                return Err(EXIT_CANNOT_RUN);
            }
            Ok(cmd.spawn())
        })?;
        // The parent's copy of the write end went with `cmd` (dropped here):
        // the read end sees its end when `reap` exits.
        drop(cmd);
        spawned.map(|child| (child, report)).map_err(|e| {
            say_stderr(
                &self.replies,
                &self.exec.id,
                &format!("cannot start the command: {e}"),
            );
            EXIT_CANNOT_RUN
        })
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

/// `sandbox-agent reap --timeout-ms N [--user U:G --group G] -- sh -c
/// COMMAND` with the call's environment and pipes (stdin and stdout the
/// plane `pipe` when there is one).
fn command(
    exec: &Exec,
    run_as: Option<(SandboxUser, libc::gid_t)>,
    report: std::os::fd::OwnedFd,
    pipe: Option<std::os::unix::net::UnixStream>,
) -> std::io::Result<Command> {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
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
    if let Some((user, group)) = run_as {
        cmd.args(["--user", &user.arg(), "--group", &group.to_string()]);
    }
    cmd.args(["--", "sh", "-c", &exec.command])
        .stderr(Stdio::piped());
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
    Ok(cmd)
}

/// Where `reap` writes how many background processes it killed.
const REPORT_FD: libc::c_int = 3;

/// Processes of this container the out-of-memory killer ended so far (the
/// memory cgroup's counter, v1 or v2), if the container shows it.
fn oom_kills() -> Option<u64> {
    [
        "/sys/fs/cgroup/memory/memory.oom_control",
        "/sys/fs/cgroup/memory.events",
    ]
    .iter()
    .find_map(|path| std::fs::read_to_string(path).ok())
    .and_then(|text| {
        text.lines()
            .find_map(|l| l.strip_prefix("oom_kill "))
            .and_then(|n| n.trim().parse().ok())
    })
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

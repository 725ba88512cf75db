//! One exec of `serve`: `sandbox-agent reap` with the call's environment,
//! its output relayed as frames, then its status.

use std::io::{Read, Write};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::JoinHandle;

use sandbox_agent::protocol::{Exec, Reply, AGENT_MOUNT, CHUNK, EXIT_CANNOT_RUN, EXIT_KILLED};

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
        let code = self.start_and_wait();
        calls.end(&marker);
        replies.say(Reply::Exit { id, code });
    }

    /// The call's status: its own, 137 when cancelled before it started,
    /// 126 when it could not start (or would start past its start-by time).
    fn start_and_wait(mut self) -> u8 {
        let mut child = match self.start() {
            Ok(child) => child,
            Err(code) => return code,
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
            return EXIT_CANNOT_RUN;
        };
        for relay in relays.into_iter().flatten() {
            let _ = relay.join();
        }
        status_of(child.wait())
    }

    /// Starts `reap` unless the call was cancelled or is past its start-by
    /// time; the status to report when it does not start.
    fn start(&self) -> Result<Child, u8> {
        let mut cmd = command(&self.exec, self.run_as);
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
        spawned.map_err(|e| {
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

/// `sandbox-agent reap --timeout-ms N [--user U:G --group G] -- sh -c
/// COMMAND` with the call's environment and pipes.
fn command(exec: &Exec, run_as: Option<(SandboxUser, libc::gid_t)>) -> Command {
    let exe = std::env::current_exe().unwrap_or_else(|_| AGENT_MOUNT.into());
    let mut cmd = Command::new(exe);
    cmd.args(["reap", "--timeout-ms", &exec.timeout_ms.to_string()]);
    if let Some((user, group)) = run_as {
        cmd.args(["--user", &user.arg(), "--group", &group.to_string()]);
    }
    cmd.args(["--", "sh", "-c", &exec.command])
        .stdin(if exec.stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for kv in &exec.env {
        if let Some((key, value)) = kv.split_once('=') {
            cmd.env(key, value);
        }
    }
    cmd
}

/// `reap`'s status as the shell-style status of the frame.
fn status_of(waited: std::io::Result<ExitStatus>) -> u8 {
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

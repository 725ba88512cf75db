//! `sandbox-agent init` and `sandbox-agent serve`: the container's main
//! process, and the host's data plane.
//!
//! `init` runs under the container's init (tini) as a child subreaper: it
//! starts `serve` with its own stdin and stdout (the container's attach
//! stream), reaps every orphan, and starts `serve` again when it dies. So a
//! workload that kills `serve` costs the calls in flight, not the container.
//!
//! `serve` reads request lines from stdin and writes reply lines to stdout
//! (see `sandbox_agent::protocol`). Each exec runs as `sandbox-agent reap
//! --timeout-ms N -- sh -c COMMAND`, so it has the same subreaper, deadline
//! and exit status as an exec through the engine. Everything here runs as
//! the sandbox user, like the workload: the agent holds no right the
//! workload lacks, and the host trusts nothing it says beyond that
//! sandbox's own results.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sandbox_agent::protocol::{Exec, Reply, Request, CHUNK, MAX_REQUEST_LINE};

/// Runs `serve` and keeps it running; never returns but on a setup error.
pub fn init() -> i32 {
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
        eprintln!("sandbox-agent init: PR_SET_CHILD_SUBREAPER failed");
        return crate::AGENT_FAILED;
    }
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => {
            eprintln!("sandbox-agent init: {e}");
            return crate::AGENT_FAILED;
        }
    };
    let mut pause = Duration::from_millis(20);
    loop {
        let started = Instant::now();
        match Command::new(&exe).arg("serve").spawn() {
            Ok(child) => reap_until(child.id() as libc::pid_t),
            Err(e) => eprintln!("sandbox-agent init: starting serve: {e}"),
        }
        // A serve that keeps dying at once is restarted ever more slowly.
        pause = if started.elapsed() < Duration::from_secs(1) {
            (pause * 2).min(Duration::from_secs(2))
        } else {
            Duration::from_millis(20)
        };
        std::thread::sleep(pause);
    }
}

/// Reaps every child (orphans included) until `child` has exited.
fn reap_until(child: libc::pid_t) {
    loop {
        let mut status = 0;
        // SAFETY: waitpid writes the status into a local.
        let pid = unsafe { libc::waitpid(-1, &mut status, 0) };
        if pid == child {
            return;
        }
        if pid < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return;
        }
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A fresh boot id: tells the host that a new serve process answers.
fn boot_id() -> String {
    let uuid = std::fs::read_to_string("/proc/sys/kernel/random/uuid").unwrap_or_default();
    let id: String = uuid.trim().chars().filter(|c| *c != '-').collect();
    if id.is_empty() {
        format!("p{}", std::process::id())
    } else {
        id
    }
}

/// Serves requests until stdin ends.
pub fn serve() -> i32 {
    let boot = boot_id();
    // One writer, so each reply line leaves whole.
    let (tx, rx) = sync_channel::<String>(256);
    std::thread::spawn(move || {
        let mut out = std::io::stdout().lock();
        for line in rx {
            if out
                .write_all(line.as_bytes())
                .and_then(|()| out.flush())
                .is_err()
            {
                return;
            }
        }
    });
    let say = |tx: &SyncSender<String>, reply: Reply| {
        let _ = tx.send(reply.encode());
    };
    say(&tx, Reply::Hello { boot: boot.clone() });
    let calls = Calls::default();
    let mut input = BufReader::with_capacity(64 * 1024, std::io::stdin().lock());
    let mut line = Vec::new();
    loop {
        line.clear();
        match read_line(&mut input, &mut line) {
            // The newline every frame starts with.
            Ok(Line::Whole) if line.is_empty() => continue,
            Ok(Line::Whole) => {}
            Ok(Line::TooLong) => {
                say(
                    &tx,
                    Reply::Bad {
                        reason: "too-long".into(),
                    },
                );
                continue;
            }
            Ok(Line::End) | Err(_) => break,
        }
        match Request::parse(&line) {
            Ok(Request::Ping { nonce }) => say(
                &tx,
                Reply::Pong {
                    nonce,
                    boot: boot.clone(),
                    now_ms: now_ms(),
                },
            ),
            Ok(Request::Exec(exec)) => {
                let id = exec.id.clone();
                if now_ms() > exec.start_by_ms {
                    // The host gave up waiting for this one and said so.
                    say(&tx, Reply::Stale { id });
                    continue;
                }
                let marker = marker_of(&exec.env);
                calls.register(&marker);
                say(&tx, Reply::Ack { id: id.clone() });
                let call = Call {
                    tx: tx.clone(),
                    exec,
                    marker: marker.clone(),
                    calls: calls.clone(),
                };
                // A workload that spent the container's pids limit leaves no
                // thread to spare: that call fails, serve goes on.
                if let Err(e) = std::thread::Builder::new().spawn(move || call.run()) {
                    calls.end(&marker);
                    cannot_start(&tx, id, &e);
                }
            }
            Ok(Request::Kill { id, marker }) => {
                say(&tx, Reply::Ack { id: id.clone() });
                // A call not started yet never starts; one that is starting
                // has exec'd (so carries its marker) before this returns.
                calls.cancel(&marker);
                let (kill_tx, kill_id) = (tx.clone(), id.clone());
                let spawned = std::thread::Builder::new().spawn(move || {
                    let all_gone = crate::kill_marked(&marker) == 0;
                    let _ = kill_tx.send(
                        Reply::Killed {
                            id: kill_id,
                            all_gone,
                        }
                        .encode(),
                    );
                });
                if spawned.is_err() {
                    say(
                        &tx,
                        Reply::Killed {
                            id,
                            all_gone: false,
                        },
                    );
                }
            }
            Err(e) => say(
                &tx,
                Reply::Bad {
                    reason: e.0.replace(' ', "-"),
                },
            ),
        }
    }
    // No one can ask anything more; calls in flight still finish.
    loop {
        std::thread::park();
    }
}

enum Line {
    Whole,
    TooLong,
    End,
}

/// Reads one line into `line` (without its newline), never holding more
/// than [`MAX_REQUEST_LINE`] bytes: a longer one is skipped to its end.
fn read_line(input: &mut impl BufRead, line: &mut Vec<u8>) -> std::io::Result<Line> {
    let mut too_long = false;
    loop {
        let buf = input.fill_buf()?;
        if buf.is_empty() {
            return Ok(Line::End);
        }
        let (chunk, found) = match buf.iter().position(|&b| b == b'\n') {
            Some(at) => (&buf[..at], Some(at)),
            None => (buf, None),
        };
        if !too_long && line.len() + chunk.len() <= MAX_REQUEST_LINE {
            line.extend_from_slice(chunk);
        } else {
            too_long = true;
            line.clear();
        }
        let used = found.map_or(buf.len(), |at| at + 1);
        input.consume(used);
        if found.is_some() {
            return Ok(if too_long { Line::TooLong } else { Line::Whole });
        }
    }
}

/// The calls of this serve by marker, so that a kill read while its exec is
/// starting is never outrun by it.
#[derive(Default, Clone)]
struct Calls(Arc<Mutex<HashMap<String, CallState>>>);

#[derive(Default)]
struct CallState {
    running: usize,
    cancelled: bool,
}

impl Calls {
    fn register(&self, marker: &str) {
        self.0
            .lock()
            .unwrap()
            .entry(marker.to_owned())
            .or_default()
            .running += 1;
    }

    fn cancel(&self, marker: &str) {
        if let Some(state) = self.0.lock().unwrap().get_mut(marker) {
            state.cancelled = true;
        }
    }

    fn end(&self, marker: &str) {
        let mut calls = self.0.lock().unwrap();
        if let Some(state) = calls.get_mut(marker) {
            state.running -= 1;
            if state.running == 0 {
                calls.remove(marker);
            }
        }
    }
}

fn marker_of(env: &[String]) -> String {
    env.iter()
        .find_map(|kv| kv.strip_prefix("SANDBOX_EXEC_ID="))
        .unwrap_or_default()
        .to_owned()
}

/// One exec: `reap` with the call's environment, its output relayed as
/// frames, then its status.
struct Call {
    tx: SyncSender<String>,
    exec: Exec,
    marker: String,
    calls: Calls,
}

impl Call {
    fn run(self) {
        let (tx, id) = (self.tx.clone(), self.exec.id.clone());
        let (calls, marker) = (self.calls.clone(), self.marker.clone());
        let code = self.start_and_wait();
        calls.end(&marker);
        let _ = tx.send(Reply::Exit { id, code }.encode());
    }

    /// The call's status: its own, 137 when cancelled before it started,
    /// 126 when it could not start (or would start past its start-by time).
    fn start_and_wait(self) -> u8 {
        let Call {
            tx,
            exec,
            marker,
            calls,
        } = self;
        let exe = std::env::current_exe().unwrap_or_else(|_| "/.sandbox/agent".into());
        let mut cmd = Command::new(exe);
        cmd.args(["reap", "--timeout-ms", &exec.timeout_ms.to_string(), "--"])
            .args(["sh", "-c", &exec.command])
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
        let mut child = {
            // Held through the spawn, which returns once `reap` has exec'd
            // (so carries the marker): a kill either sees it or stops it.
            let calls = calls.0.lock().unwrap();
            if calls.get(&marker).is_some_and(|c| c.cancelled) {
                return 137;
            }
            if now_ms() > exec.start_by_ms {
                return 126;
            }
            match cmd.spawn() {
                Ok(child) => child,
                Err(e) => {
                    drop(calls);
                    say_stderr(&tx, &exec.id, &format!("cannot start the command: {e}"));
                    return 126;
                }
            }
        };
        let mut helpers_ok = true;
        if let (Some(mut pipe), Some(bytes)) = (child.stdin.take(), exec.stdin) {
            // The command may exit without reading it all.
            helpers_ok &= std::thread::Builder::new()
                .spawn(move || {
                    let _ = pipe.write_all(&bytes);
                })
                .is_ok();
        }
        let relays = [
            relay(child.stdout.take(), tx.clone(), exec.id.clone(), true),
            relay(child.stderr.take(), tx.clone(), exec.id.clone(), false),
        ];
        if !helpers_ok || relays.iter().any(Result::is_err) {
            // No thread to spare (the pids limit): rather than run it half
            // connected, end it as one that could not start.
            let _ = child.kill();
            crate::kill_marked(&marker);
            let _ = child.wait();
            say_stderr(
                &tx,
                &exec.id,
                "cannot start the command: no thread to spare",
            );
            return 126;
        }
        for relay in relays.into_iter().flatten().flatten() {
            let _ = relay.join();
        }
        match child.wait() {
            Ok(status) => {
                use std::os::unix::process::ExitStatusExt;
                let code = status
                    .code()
                    .or_else(|| status.signal().map(|s| 128 + s))
                    .unwrap_or(crate::AGENT_FAILED);
                u8::try_from(code).unwrap_or(255)
            }
            Err(_) => crate::AGENT_FAILED as u8,
        }
    }
}

fn say_stderr(tx: &SyncSender<String>, id: &str, message: &str) {
    let _ = tx.send(
        Reply::Stderr {
            id: id.to_owned(),
            data: format!("sandbox-agent: {message}\n").into_bytes(),
        }
        .encode(),
    );
}

/// Reports a call that could not start (exit 126, as a shell would).
fn cannot_start(tx: &SyncSender<String>, id: String, e: &std::io::Error) {
    let data = format!("sandbox-agent: cannot start the command: {e}\n").into_bytes();
    let _ = tx.send(
        Reply::Stderr {
            id: id.clone(),
            data,
        }
        .encode(),
    );
    let _ = tx.send(Reply::Exit { id, code: 126 }.encode());
}

/// Relays one output pipe as frames.
fn relay(
    from: Option<impl Read + Send + 'static>,
    tx: SyncSender<String>,
    id: String,
    stdout: bool,
) -> std::io::Result<Option<std::thread::JoinHandle<()>>> {
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
                        if tx.send(reply.encode()).is_err() {
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

/// `sandbox-agent respawn`: kills the serve processes, which `init` then
/// starts again. The host's remedy for a serve that stopped answering.
pub fn respawn() -> i32 {
    let Ok(me) = std::env::current_exe() else {
        return crate::AGENT_FAILED;
    };
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return crate::AGENT_FAILED;
    };
    for pid in dir
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<libc::pid_t>().ok())
    {
        let exe = std::fs::read_link(format!("/proc/{pid}/exe"));
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let is_serve = cmdline.split(|&b| b == 0).nth(1) == Some(b"serve");
        if exe.is_ok_and(|e| e == me) && is_serve {
            // SAFETY: signalling a pid; a stale one fails harmlessly.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_past_the_bound_is_skipped_whole_and_the_next_one_read() {
        let mut text = vec![b'x'; MAX_REQUEST_LINE + 10];
        text.extend_from_slice(b"\nping n\n");
        let mut input = BufReader::with_capacity(4096, &text[..]);
        let mut line = Vec::new();
        assert!(matches!(
            read_line(&mut input, &mut line),
            Ok(Line::TooLong)
        ));
        line.clear();
        assert!(matches!(read_line(&mut input, &mut line), Ok(Line::Whole)));
        assert_eq!(line, b"ping n");
        line.clear();
        assert!(matches!(read_line(&mut input, &mut line), Ok(Line::End)));
    }
}

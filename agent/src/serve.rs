//! `sandbox-agent serve`: the host's data plane.
//!
//! `serve` reads request lines and writes reply lines (see
//! `sandbox_agent::protocol`; it says `hello BOOT VERSION` first) on each
//! of its sessions: stdin and stdout (the container's attach stream, through
//! the engine), and every socket a host process offers in the plane
//! directory (`plane.rs`, straight to the host). Each exec runs `sh -c
//! COMMAND` with the same deadline and exit status as an exec through the
//! engine (see `call.rs`). With `--user` (serve is root) every call runs as
//! that user in a group of its own, which a kill ends whole (see
//! `identity.rs`), supervised by serve itself (`supervise.rs`); the
//! workload can neither write into this process's stdout nor read its
//! memory. Without it serve runs as the sandbox user, like the workload,
//! as in containers of older hosts, and each call runs under
//! `sandbox-agent reap`.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::{Arc, Mutex};

use sandbox_agent::protocol::{Exec, Reply, Request, EXEC_MARKER_VAR, MAX_REQUEST_LINE};

use crate::identity::{options, CallGroups, SandboxUser};
use crate::kill::kill_marked;
use crate::{procs, AGENT_FAILED};

mod background;
mod call;
mod plane;
mod port;
mod supervise;
mod workers;

/// Reply lines queued for stdout before a sender waits.
const REPLY_QUEUE: usize = 256;
/// The buffer stdin is read through.
const READ_BUFFER: usize = 64 * 1024;

/// Serves requests until stdin ends, then lets the calls in flight finish.
pub fn serve(args: &[String]) -> i32 {
    let (user, egress_port) = match options(args) {
        Ok(options) => (options.user, options.egress_port),
        Err(e) => {
            eprintln!(
                "sandbox-agent serve: {e}\nusage: sandbox-agent serve [--user UID:GID] \
                 [--egress-port PORT]"
            );
            return AGENT_FAILED;
        }
    };
    if let Some(port) = egress_port {
        // Without it the sandbox has no way out: said, and serve goes on.
        if let Err(e) = crate::relay::start(port) {
            eprintln!("sandbox-agent serve: the egress relay on 127.0.0.1:{port}: {e}");
        }
    }
    let server = Arc::new(Server {
        boot: boot_id(),
        calls: Calls::default(),
        user,
        groups: CallGroups::new(),
        background: background::Background::new(user),
        workers: workers::Workers::default(),
    });
    plane::start(server.clone());
    let replies = match Replies::start(std::io::stdout()) {
        Ok(replies) => replies,
        Err(e) => {
            eprintln!("sandbox-agent serve: the reply writer: {e}");
            return AGENT_FAILED;
        }
    };
    server.hello(&replies);
    server.run(
        &mut BufReader::with_capacity(READ_BUFFER, std::io::stdin().lock()),
        &replies,
    );
    // No one can ask anything more; calls in flight still finish.
    loop {
        std::thread::park();
    }
}

/// The reply lines of one session, sent to its one writer, so each leaves
/// whole.
#[derive(Clone)]
pub(crate) struct Replies(SyncSender<String>);

impl Replies {
    /// Starts the writer of `out` (stdout, or a plane socket); an error
    /// when no thread can start (the workload spent the pids limit).
    fn start(mut out: impl Write + Send + 'static) -> std::io::Result<Self> {
        let (tx, rx) = sync_channel::<String>(REPLY_QUEUE);
        std::thread::Builder::new().spawn(move || {
            for line in rx {
                if out
                    .write_all(line.as_bytes())
                    .and_then(|()| out.flush())
                    .is_err()
                {
                    return;
                }
            }
        })?;
        Ok(Replies(tx))
    }

    /// Queues `reply`; false once the writer is gone (stdout closed).
    pub(crate) fn say(&self, reply: Reply) -> bool {
        self.0.send(reply.encode()).is_ok()
    }

    /// Queues `reply`, waiting for room until `deadline` at most: a session
    /// whose reader stalls must not hold a call past its deadline (the
    /// reply is dropped then). False once the writer is gone.
    pub(crate) fn say_by(&self, reply: Reply, deadline: std::time::Instant) -> bool {
        use std::sync::mpsc::TrySendError;
        let mut line = reply.encode();
        loop {
            match self.0.try_send(line) {
                Ok(()) => return true,
                Err(TrySendError::Disconnected(_)) => return false,
                Err(TrySendError::Full(back)) => {
                    if std::time::Instant::now() >= deadline {
                        return true;
                    }
                    line = back;
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
            }
        }
    }
}

/// One serve process: what answers every request, on every session.
struct Server {
    /// Tells the host that a new serve process answers.
    boot: String,
    calls: Calls,
    /// Whom calls run as (none: as this process).
    user: Option<SandboxUser>,
    groups: CallGroups,
    /// Background processes and terminals.
    background: background::Background,
    /// The threads calls run on.
    workers: workers::Workers,
}

impl Server {
    /// Says `hello` first on a session.
    fn hello(&self, replies: &Replies) {
        replies.say(Reply::Hello {
            boot: self.boot.clone(),
        });
    }

    /// Handles request lines until `input` ends, answering on `replies`.
    fn run(&self, input: &mut impl BufRead, replies: &Replies) {
        let mut line = Vec::new();
        loop {
            line.clear();
            match read_line(input, &mut line) {
                // The newline every frame starts with.
                Ok(Line::Whole) if line.is_empty() => {}
                Ok(Line::Whole) => self.handle(&line, replies),
                Ok(Line::TooLong) => {
                    replies.say(Reply::Bad {
                        reason: "too-long".into(),
                    });
                }
                Ok(Line::End) | Err(_) => return,
            }
        }
    }

    fn handle(&self, line: &[u8], replies: &Replies) {
        match Request::parse(line) {
            Ok(Request::Ping { nonce }) => self.pong(nonce, replies),
            Ok(Request::Exec(exec)) => self.exec(exec, replies),
            Ok(Request::Kill { id, marker }) => self.kill(id, marker, replies),
            Ok(Request::Spawn(spawn)) => {
                if now_ms() > spawn.start_by_ms {
                    replies.say(Reply::Stale { id: spawn.id });
                    return;
                }
                ack(replies, &spawn.id);
                self.background.spawn(spawn, &self.groups, replies);
            }
            Ok(Request::Procs { id }) => {
                ack(replies, &id);
                self.background.list(id, replies);
            }
            Ok(Request::Read {
                id,
                proc,
                out_at,
                err_at,
                wait_ms,
            }) => {
                ack(replies, &id);
                let wait = std::time::Duration::from_millis(wait_ms);
                self.background
                    .read(id, proc, (out_at, err_at), wait, replies);
            }
            Ok(Request::Write { id, proc, data }) => {
                ack(replies, &id);
                self.background.write(id, proc, data, replies);
            }
            Ok(Request::Signal { id, proc, signal }) => {
                ack(replies, &id);
                self.background.signal(id, proc, signal, replies);
            }
            Ok(Request::Resize {
                id,
                proc,
                rows,
                cols,
            }) => {
                ack(replies, &id);
                self.background.resize(id, proc, (rows, cols), replies);
            }
            Ok(Request::Forget { id, proc }) => {
                ack(replies, &id);
                self.background.forget(id, proc, replies);
            }
            Ok(Request::Port { id, pipe, port }) => {
                ack(replies, &id);
                port::start(
                    id,
                    pipe,
                    port,
                    self.user.map(|u| (u, &self.groups)),
                    replies,
                );
            }
            Err(e) => {
                replies.say(Reply::Bad {
                    reason: e.to_string().replace(' ', "-"),
                });
            }
        }
    }

    fn pong(&self, nonce: String, replies: &Replies) {
        replies.say(Reply::Pong {
            nonce,
            boot: self.boot.clone(),
            now_ms: now_ms(),
        });
    }

    /// Acknowledges `exec` and starts it on a thread of its own, unless it
    /// was read after its start-by time.
    fn exec(&self, exec: Exec, replies: &Replies) {
        let id = exec.id.clone();
        if now_ms() > exec.start_by_ms {
            // The host gave up waiting for this one and said so.
            replies.say(Reply::Stale { id });
            return;
        }
        let marker = marker_of(&exec.env);
        // The marker's own group: `kill MARKER` finds it without serve.
        let run_as = self.user.map(|user| {
            let group = crate::identity::marker_group(&marker);
            (user, group.unwrap_or_else(|| self.groups.next()))
        });
        self.calls.register(&marker, run_as.map(|(_, group)| group));
        replies.say(Reply::Ack { id: id.clone() });
        let call = call::Call {
            replies: replies.clone(),
            exec,
            marker: marker.clone(),
            calls: self.calls.clone(),
            run_as,
        };
        // A workload that spent the container's pids limit leaves no thread
        // to spare: that call fails, serve goes on.
        if let Err(e) = self.workers.run(move || call.run()) {
            self.calls.end(&marker);
            call::cannot_start(replies, id, &e);
        }
    }

    /// Acknowledges the kill, then ends the call's processes on a thread of
    /// its own and says whether any survived.
    fn kill(&self, id: String, marker: String, replies: &Replies) {
        replies.say(Reply::Ack { id: id.clone() });
        // A call not started yet never starts; one that is starting is
        // swept below while it runs, and sees the cancel once its spawn
        // returns (`reap`: has exec'd, so carries its marker, before this
        // returns).
        let group = self.calls.cancel(&marker);
        let (killed, kill_id, user) = (replies.clone(), id.clone(), self.user);
        let calls = self.calls.clone();
        let spawned = std::thread::Builder::new().spawn(move || {
            let all_gone = match group {
                Some(group) => {
                    let mut gone = procs::kill_group(group, user);
                    // A call that was starting has a child that joins its
                    // group only after `reap` exec'd: sweep again until the
                    // call has ended (its `reap` exits once its tree is
                    // gone), within a bound.
                    let until = std::time::Instant::now() + KILL_SETTLE;
                    while calls.is_running(&marker) && std::time::Instant::now() < until {
                        std::thread::sleep(procs::SWEEP_PAUSE * 4);
                        gone = procs::kill_group(group, user);
                    }
                    gone
                }
                None => kill_marked(&marker) == 0,
            };
            killed.say(Reply::Killed {
                id: kill_id,
                all_gone,
            });
        });
        if spawned.is_err() {
            replies.say(Reply::Killed {
                id,
                all_gone: false,
            });
        }
    }
}

fn ack(replies: &Replies, id: &str) {
    replies.say(Reply::Ack { id: id.to_owned() });
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

/// How long a kill keeps sweeping a call's group while the call is still
/// running (it was starting when the kill came).
const KILL_SETTLE: std::time::Duration = std::time::Duration::from_secs(2);

/// Groups of calls that ended, remembered so that a kill arriving after its
/// call's exit still ends what the call left running: at most this many.
const ENDED_GROUPS: usize = 4096;

/// The calls of this serve by marker, so that a kill read while its exec is
/// starting is never outrun by it, and finds the call's group.
#[derive(Default, Clone)]
pub(crate) struct Calls(Arc<Mutex<Registry>>);

#[derive(Default)]
struct Registry {
    running: HashMap<String, CallState>,
    /// Groups of ended calls by marker, oldest first.
    ended: std::collections::VecDeque<(String, libc::gid_t)>,
}

#[derive(Default)]
pub(crate) struct CallState {
    running: usize,
    cancelled: bool,
    group: Option<libc::gid_t>,
}

impl Calls {
    fn register(&self, marker: &str, group: Option<libc::gid_t>) {
        let mut calls = self.0.lock().unwrap();
        let state = calls.running.entry(marker.to_owned()).or_default();
        state.running += 1;
        state.group = group.or(state.group);
    }

    /// Marks the call cancelled (it never starts if it has not yet); its
    /// group, when it has one, running or ended.
    fn cancel(&self, marker: &str) -> Option<libc::gid_t> {
        let mut calls = self.0.lock().unwrap();
        if let Some(state) = calls.running.get_mut(marker) {
            state.cancelled = true;
            return state.group;
        }
        calls
            .ended
            .iter()
            .rev()
            .find(|(m, _)| m == marker)
            .map(|(_, group)| *group)
    }

    pub(crate) fn end(&self, marker: &str) {
        let mut calls = self.0.lock().unwrap();
        let Some(state) = calls.running.get_mut(marker) else {
            return;
        };
        state.running -= 1;
        if state.running > 0 {
            return;
        }
        let group = state.group;
        calls.running.remove(marker);
        if let Some(group) = group {
            if calls.ended.len() >= ENDED_GROUPS {
                calls.ended.pop_front();
            }
            calls.ended.push_back((marker.to_owned(), group));
        }
    }

    /// Whether the call `marker` still runs (its `reap` has not exited).
    fn is_running(&self, marker: &str) -> bool {
        self.0.lock().unwrap().running.contains_key(marker)
    }

    /// Holds the registry (a kill's `cancel` waits) while `f` runs with
    /// whether the call `marker` was cancelled.
    pub(crate) fn while_held<T>(&self, marker: &str, f: impl FnOnce(bool) -> T) -> T {
        let calls = self.0.lock().unwrap();
        let cancelled = calls.running.get(marker).is_some_and(|c| c.cancelled);
        let out = f(cancelled);
        drop(calls);
        out
    }
}

/// The call's marker: the value of its [`EXEC_MARKER_VAR`] entry.
fn marker_of(env: &[String]) -> String {
    env.iter()
        .find_map(|kv| kv.strip_prefix(EXEC_MARKER_VAR)?.strip_prefix('='))
        .unwrap_or_default()
        .to_owned()
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

    #[test]
    fn the_marker_is_the_whole_value_of_its_entry() {
        let env = |e: &[&str]| e.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            marker_of(&env(&["A=1", &format!("{EXEC_MARKER_VAR}=m-0001")])),
            "m-0001"
        );
        assert_eq!(marker_of(&env(&[&format!("{EXEC_MARKER_VAR}X=y")])), "");
        assert_eq!(marker_of(&env(&["A=1"])), "");
    }
}

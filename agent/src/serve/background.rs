//! Background processes and terminals of `serve` (protocol version 4).
//!
//! Each runs as `sandbox-agent reap [--tty] -- sh -c COMMAND` like an exec,
//! as the sandbox user in a group of its own, but nothing waits for it: the
//! agent keeps it under the host's id with the first [`PROC_HEAD`] and the
//! last [`PROC_TAIL`] bytes of each output stream, and answers `read`s of
//! them from any offset, `write`s to its stdin, `signal`s to its whole
//! tree, `resize`s of its terminal and `forget`. They live in this process,
//! so a host that exits (a CLI's `exec -d`, a restarted server) loses
//! nothing; they end with the container. A serve process that is killed
//! (the host's respawn of a stuck agent) takes their bookkeeping with it:
//! its successor kills nothing it does not know and starts with an empty
//! table.
//!
//! Memory is bounded: [`MAX_PROCESSES`] kept, each holding at most
//! `2 x (PROC_HEAD + PROC_TAIL)` bytes of output, [`MAX_READERS`] reads
//! waiting at once, [`STDIN_QUEUE`] writes queued per process.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use sandbox_agent::protocol::{
    DoneStatus, ProcInfo, Reply, Spawn, AGENT_MOUNT, CHUNK, EXIT_CANNOT_RUN, MAX_PROCESSES,
    MAX_READ, PROC_HEAD, PROC_TAIL, SIGNALS,
};

use super::{now_ms, Replies};
use crate::identity::{CallGroups, SandboxUser};
use crate::procs;

/// Reads waiting for output at once, over all processes.
const MAX_READERS: usize = 64;
/// Writes queued for one process's stdin (each up to 512 KiB).
const STDIN_QUEUE: usize = 8;
/// How long a kill keeps sweeping a process that is starting.
const KILL_SETTLE: Duration = Duration::from_secs(2);
/// How long after `reap` exited its output may stay open (a terminal held
/// by something outside its group): then its status is set all the same,
/// and the readers stop.
const OUTPUT_GRACE: Duration = Duration::from_secs(1);
/// How often a reader looks whether it should stop.
const READ_POLL_MS: libc::c_int = 200;

/// The processes of one serve process.
#[derive(Clone)]
pub(crate) struct Background {
    table: Arc<Mutex<Table>>,
    user: Option<SandboxUser>,
}

#[derive(Default)]
struct Table {
    /// Oldest first.
    procs: Vec<Arc<Proc>>,
    readers: usize,
}

struct Proc {
    id: String,
    command: String,
    started_ms: u64,
    tty: bool,
    /// The call group its tree runs in (none: serve is not root).
    group: Option<libc::gid_t>,
    /// `reap`'s pid, to find its tree when there is no group.
    pid: Option<libc::pid_t>,
    /// `reap` was waited for (its pid may be reused from then on).
    reaped: AtomicBool,
    state: Mutex<State>,
    changed: Condvar,
    stdin: Mutex<Option<SyncSender<Input>>>,
    /// A terminal's controlling end (resizes).
    master: Option<OwnedFd>,
}

#[derive(Default)]
struct State {
    out: Kept,
    err: Kept,
    status: Option<u8>,
}

/// One output stream: its head, its tail, and how much it wrote in all.
#[derive(Default)]
struct Kept {
    head: Vec<u8>,
    tail: VecDeque<u8>,
    total: u64,
}

impl Kept {
    fn push(&mut self, mut data: &[u8]) {
        self.total += data.len() as u64;
        if self.head.len() < PROC_HEAD {
            let take = data.len().min(PROC_HEAD - self.head.len());
            self.head.extend_from_slice(&data[..take]);
            data = &data[take..];
        }
        if data.len() >= PROC_TAIL {
            self.tail.clear();
            self.tail.extend(&data[data.len() - PROC_TAIL..]);
            return;
        }
        let over = (self.tail.len() + data.len()).saturating_sub(PROC_TAIL);
        self.tail.drain(..over);
        self.tail.extend(data);
    }

    /// Up to `max` bytes from offset `at` on, and where they start (past
    /// `at` when the bytes between were dropped).
    fn read(&self, at: u64, max: usize) -> (u64, Vec<u8>) {
        let head = self.head.len() as u64;
        if at < head {
            let from = at as usize;
            let to = self.head.len().min(from + max);
            return (at, self.head[from..to].to_vec());
        }
        let tail_start = self.total - self.tail.len() as u64;
        let from = at.max(tail_start).max(head);
        if from >= self.total {
            return (from.min(self.total), Vec::new());
        }
        let skip = (from - tail_start) as usize;
        let data: Vec<u8> = self.tail.iter().skip(skip).take(max).copied().collect();
        (from, data)
    }
}

enum Input {
    Data(Vec<u8>),
    Close,
}

impl Proc {
    fn info(&self) -> ProcInfo {
        self.info_of(&self.state.lock().unwrap())
    }

    fn info_of(&self, state: &State) -> ProcInfo {
        ProcInfo {
            proc: self.id.clone(),
            started_ms: self.started_ms,
            status: state.status,
            tty: self.tty,
            out_total: state.out.total,
            err_total: state.err.total,
            command: self.command.clone(),
        }
    }

    fn running(&self) -> bool {
        self.state.lock().unwrap().status.is_none()
    }

    /// Sends `signal` to every process of its tree; true when it has one.
    fn signal(&self, signal: libc::c_int) -> bool {
        match (self.group, self.pid) {
            (Some(group), _) => {
                let members = procs::in_group(group, std::process::id() as libc::pid_t);
                procs::signal_if(&members, &[signal], |pid| procs::has_group(pid, group)) > 0
            }
            // Only while `reap` has not been waited for (see `kill`).
            (None, Some(pid)) if !self.reaped.load(Ordering::SeqCst) => {
                let tree = procs::descendants(pid);
                // Waited for during the walk: the pid may since name
                // another process, and the tree that one's.
                if self.reaped.load(Ordering::SeqCst) {
                    return false;
                }
                let unreaped = |_| !self.reaped.load(Ordering::SeqCst);
                procs::signal_tree(&[pid], &tree, &[signal], unreaped) > 0
            }
            (None, _) => false,
        }
    }

    /// Ends its whole tree. A process that is starting has a child that
    /// joins the group only once `reap` exec'd: the group is swept again
    /// while `reap` runs, for [`KILL_SETTLE`] at most.
    fn kill(&self, user: Option<SandboxUser>) {
        let me = std::process::id() as libc::pid_t;
        let until = Instant::now() + KILL_SETTLE;
        loop {
            match (self.group, self.pid) {
                (Some(group), _) => {
                    // The workload is stopped to kill (see `kill_group`)
                    // only when there is something to kill.
                    if !procs::in_group(group, me).is_empty() {
                        procs::kill_group(group, user);
                    }
                }
                // Only while `reap` has not been waited for: its pid is
                // not reused before.
                (None, Some(pid)) if !self.reaped.load(Ordering::SeqCst) => {
                    let tree = procs::descendants(pid);
                    // Not when it was waited for during the walk (`signal`).
                    if self.reaped.load(Ordering::SeqCst) {
                        return;
                    }
                    let unreaped = |_| !self.reaped.load(Ordering::SeqCst);
                    procs::stop_then_kill_tree(&[pid], &tree, unreaped);
                }
                _ => return,
            }
            if !self.reap_running() || Instant::now() >= until {
                return;
            }
            std::thread::sleep(procs::SWEEP_PAUSE * 4);
        }
    }

    /// Whether its `reap` has not exited yet.
    fn reap_running(&self) -> bool {
        self.pid.is_some() && !self.reaped.load(Ordering::SeqCst)
    }
}

impl Background {
    pub(crate) fn new(user: Option<SandboxUser>) -> Self {
        Background {
            table: Arc::default(),
            user,
        }
    }

    fn find(&self, id: &str) -> Option<Arc<Proc>> {
        let table = self.table.lock().unwrap();
        table.procs.iter().find(|p| p.id == id).cloned()
    }

    /// Starts `spawn` (already acknowledged); a process that cannot start
    /// is kept, ended with 126 and the reason on its stderr.
    pub(crate) fn spawn(&self, spawn: Spawn, groups: &CallGroups, replies: &Replies) {
        let done = |status| {
            replies.say(Reply::Done {
                id: spawn.id.clone(),
                status,
            });
        };
        let mut table = self.table.lock().unwrap();
        if table.procs.iter().any(|p| p.id == spawn.proc) {
            return done(DoneStatus::Exists);
        }
        if table.procs.len() >= MAX_PROCESSES {
            match table.procs.iter().position(|p| !p.running()) {
                Some(oldest_ended) => {
                    table.procs.remove(oldest_ended);
                }
                None => return done(DoneStatus::Full),
            }
        }
        let group = self.user.map(|_| groups.next());
        let proc = match start(&spawn, self.user, group) {
            Ok((child, master, proc)) => {
                let proc = Arc::new(proc);
                if let Err(e) = watch(proc.clone(), child, master, self.user) {
                    cannot_start(&proc, &e);
                }
                proc
            }
            Err(e) => {
                let proc = Arc::new(unstarted(&spawn));
                cannot_start(&proc, &e);
                proc
            }
        };
        table.procs.push(proc);
        drop(table);
        done(DoneStatus::Ok);
    }

    /// Says a `proc` frame for every process kept.
    pub(crate) fn list(&self, id: String, replies: &Replies) {
        let procs = self.table.lock().unwrap().procs.clone();
        for proc in procs {
            replies.say(Reply::Proc {
                id: id.clone(),
                info: proc.info(),
            });
        }
        replies.say(Reply::Done {
            id,
            status: DoneStatus::Ok,
        });
    }

    /// Answers a read on a thread of its own: waits up to `wait` for output
    /// past the offsets (or the process's end), then says it.
    pub(crate) fn read(
        &self,
        id: String,
        proc: String,
        at: (u64, u64),
        wait: Duration,
        replies: &Replies,
    ) {
        let replies = replies.clone();
        let Some(proc) = self.find(&proc) else {
            replies.say(Reply::Done {
                id,
                status: DoneStatus::Unknown,
            });
            return;
        };
        {
            let mut table = self.table.lock().unwrap();
            if table.readers >= MAX_READERS {
                drop(table);
                replies.say(Reply::Done {
                    id,
                    status: DoneStatus::Busy,
                });
                return;
            }
            table.readers += 1;
        }
        let table = self.table.clone();
        let (reader_id, reader_replies) = (id.clone(), replies.clone());
        let reader = move || {
            answer_read(&proc, &reader_id, at, wait, &reader_replies);
            table.lock().unwrap().readers -= 1;
        };
        if std::thread::Builder::new().spawn(reader).is_err() {
            self.table.lock().unwrap().readers -= 1;
            replies.say(Reply::Done {
                id,
                status: DoneStatus::Busy,
            });
        }
    }

    /// Queues bytes for the process's stdin (`None`: closes it).
    pub(crate) fn write(&self, id: String, proc: String, data: Option<Vec<u8>>, replies: &Replies) {
        let status = match self.find(&proc) {
            None => DoneStatus::Unknown,
            // Closing the stdin of a process that ended is done already.
            Some(proc) if !proc.running() && data.is_none() => DoneStatus::Ok,
            Some(proc) if !proc.running() => DoneStatus::Ended,
            Some(proc) => {
                let mut stdin = proc.stdin.lock().unwrap();
                let input = match data {
                    Some(data) => Input::Data(data),
                    None => Input::Close,
                };
                match stdin.as_ref().map(|tx| tx.try_send(input)) {
                    Some(Ok(())) => DoneStatus::Ok,
                    Some(Err(TrySendError::Full(_))) => DoneStatus::Busy,
                    Some(Err(TrySendError::Disconnected(_))) | None => {
                        *stdin = None;
                        DoneStatus::Closed
                    }
                }
            }
        };
        replies.say(Reply::Done { id, status });
    }

    pub(crate) fn signal(&self, id: String, proc: String, signal: u8, replies: &Replies) {
        let status = match self.find(&proc) {
            None => DoneStatus::Unknown,
            Some(_) if !SIGNALS.contains(&signal) => DoneStatus::Invalid,
            Some(proc) if !proc.running() => DoneStatus::Ended,
            Some(proc) if i32::from(signal) == libc::SIGKILL => {
                let (user, replies, id) = (self.user, replies.clone(), id.clone());
                let killer = move || {
                    proc.kill(user);
                    replies.say(Reply::Done {
                        id,
                        status: DoneStatus::Ok,
                    });
                };
                match std::thread::Builder::new().spawn(killer) {
                    Ok(_) => return,
                    Err(_) => DoneStatus::Busy,
                }
            }
            Some(proc) => {
                proc.signal(i32::from(signal));
                DoneStatus::Ok
            }
        };
        replies.say(Reply::Done { id, status });
    }

    pub(crate) fn resize(&self, id: String, proc: String, size: (u16, u16), replies: &Replies) {
        let status = match self.find(&proc) {
            None => DoneStatus::Unknown,
            Some(proc) => match &proc.master {
                None => DoneStatus::Invalid,
                Some(_) if !proc.running() => DoneStatus::Ended,
                Some(master) => {
                    set_size(master, size);
                    DoneStatus::Ok
                }
            },
        };
        replies.say(Reply::Done { id, status });
    }

    /// Kills the process's tree if it runs (on a thread of its own), and
    /// forgets it.
    pub(crate) fn forget(&self, id: String, proc: String, replies: &Replies) {
        let found = {
            let mut table = self.table.lock().unwrap();
            let at = table.procs.iter().position(|p| p.id == proc);
            at.map(|at| table.procs.remove(at))
        };
        let Some(proc) = found else {
            replies.say(Reply::Done {
                id,
                status: DoneStatus::Unknown,
            });
            return;
        };
        let (user, replies) = (self.user, replies.clone());
        let forget = move || {
            if proc.running() {
                proc.kill(user);
            }
            replies.say(Reply::Done {
                id,
                status: DoneStatus::Ok,
            });
        };
        // No thread to spare (the pids limit): killed here, in line.
        let forget = std::sync::Arc::new(Mutex::new(Some(forget)));
        let spare = forget.clone();
        let spawned = std::thread::Builder::new().spawn(move || {
            if let Some(f) = spare.lock().unwrap().take() {
                f();
            }
        });
        if spawned.is_err() {
            if let Some(f) = forget.lock().unwrap().take() {
                f();
            }
        }
    }
}

/// Waits for output past `at` (or the end), then says the chunks and the
/// process's frame.
fn answer_read(proc: &Proc, id: &str, at: (u64, u64), wait: Duration, replies: &Replies) {
    let until = Instant::now() + wait;
    let mut state = proc.state.lock().unwrap();
    while state.out.total <= at.0 && state.err.total <= at.1 && state.status.is_none() {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        state = proc.changed.wait_timeout(state, left).unwrap().0;
    }
    let mut budget = MAX_READ;
    let mut chunks = Vec::new();
    for (stderr, kept, from) in [(false, &state.out, at.0), (true, &state.err, at.1)] {
        let mut from = from;
        while budget > 0 {
            let (start, data) = kept.read(from, budget.min(CHUNK));
            if data.is_empty() {
                break;
            }
            budget -= data.len();
            from = start + data.len() as u64;
            chunks.push(Reply::Chunk {
                id: id.to_owned(),
                stderr,
                at: start,
                data,
            });
        }
    }
    // Described from the same state as the chunks: an end seen here comes
    // after all of its output.
    let info = proc.info_of(&state);
    drop(state);
    for chunk in chunks {
        replies.say(chunk);
    }
    replies.say(Reply::Proc {
        id: id.to_owned(),
        info,
    });
    replies.say(Reply::Done {
        id: id.to_owned(),
        status: DoneStatus::Ok,
    });
}

fn unstarted(spawn: &Spawn) -> Proc {
    Proc {
        id: spawn.proc.clone(),
        command: spawn.command.clone(),
        started_ms: now_ms(),
        tty: spawn.tty.is_some(),
        group: None,
        pid: None,
        reaped: AtomicBool::new(false),
        state: Mutex::default(),
        changed: Condvar::new(),
        stdin: Mutex::new(None),
        master: None,
    }
}

fn cannot_start(proc: &Proc, e: &std::io::Error) {
    let mut state = proc.state.lock().unwrap();
    let message = format!("sandbox-agent: cannot start the command: {e}\n");
    if proc.tty {
        state.out.push(message.as_bytes());
    } else {
        state.err.push(message.as_bytes());
    }
    state.status = Some(EXIT_CANNOT_RUN);
    proc.changed.notify_all();
}

/// Starts `reap` for `spawn` (past its start-by time it does not start):
/// the child, a terminal's controlling end, and the process as kept.
fn start(
    spawn: &Spawn,
    user: Option<SandboxUser>,
    group: Option<libc::gid_t>,
) -> std::io::Result<(Child, Option<OwnedFd>, Proc)> {
    use std::os::unix::process::CommandExt;
    if now_ms() > spawn.start_by_ms {
        return Err(std::io::Error::other("its start-by time passed"));
    }
    let exe = std::env::current_exe().unwrap_or_else(|_| AGENT_MOUNT.into());
    let mut cmd = Command::new(exe);
    cmd.arg("reap");
    if spawn.timeout_ms > 0 {
        cmd.args(["--timeout-ms", &spawn.timeout_ms.to_string()]);
    }
    if let (Some(user), Some(group)) = (user, group) {
        cmd.args(["--user", &user.arg(), "--group", &group.to_string()]);
    }
    let master = match spawn.tty {
        Some(size) => {
            let (master, terminal) = open_terminal(size, user)?;
            cmd.arg("--tty");
            cmd.stdin(Stdio::from(terminal.try_clone()?))
                .stdout(Stdio::from(terminal.try_clone()?))
                .stderr(Stdio::from(terminal));
            // SAFETY: setsid and ioctl only, between fork and exec: `reap`
            // leads a session of its own, the terminal its controlling one.
            unsafe {
                cmd.pre_exec(|| {
                    if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                })
            };
            Some(master)
        }
        None => {
            cmd.stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            None
        }
    };
    cmd.args(["--", "sh", "-c", &spawn.command]);
    for kv in &spawn.env {
        if let Some((key, value)) = kv.split_once('=') {
            cmd.env(key, value);
        }
    }
    // Kept for resizes; its reader and writer get copies.
    let kept_master = master.as_ref().map(OwnedFd::try_clone).transpose()?;
    let child = cmd.spawn()?;
    let proc = Proc {
        group,
        pid: Some(child.id() as libc::pid_t),
        master: kept_master,
        ..unstarted(spawn)
    };
    Ok((child, master, proc))
}

/// A stream to read from that `poll` can watch.
trait Source: Read + AsRawFd + Send {}
impl<T: Read + AsRawFd + Send> Source for T {}

/// An output stream to keep: whether it is stderr, and its reading end.
type Output = (bool, Box<dyn Source>);

/// Starts the threads that feed a started process's stdin, keep its output
/// and its status: its writer, one reader per stream, its waiter. On an
/// error the process is killed and waited for.
fn watch(
    proc: Arc<Proc>,
    mut child: Child,
    master: Option<OwnedFd>,
    user: Option<SandboxUser>,
) -> std::io::Result<()> {
    let (stdin, outputs): (Box<dyn Write + Send>, Vec<Output>) = match master {
        Some(master) => {
            let reader = std::fs::File::from(master.try_clone()?);
            (
                Box::new(std::fs::File::from(master)),
                vec![(false, Box::new(reader))],
            )
        }
        None => {
            let (Some(stdin), Some(out), Some(err)) =
                (child.stdin.take(), child.stdout.take(), child.stderr.take())
            else {
                kill_started(&mut child, &proc, user);
                return Err(std::io::Error::other("no pipes"));
            };
            (
                Box::new(stdin),
                vec![(false, Box::new(out)), (true, Box::new(err))],
            )
        }
    };
    let (tx, rx) = sync_channel::<Input>(STDIN_QUEUE);
    *proc.stdin.lock().unwrap() = Some(tx);
    // Writes are answered when queued: one the process does not read yet
    // waits here, not the host.
    let spawned = std::thread::Builder::new().spawn(move || {
        let mut stdin = Some(stdin);
        for input in rx {
            match input {
                Input::Data(data) => {
                    let written = stdin.as_mut().is_some_and(|pipe| {
                        pipe.write_all(&data).and_then(|()| pipe.flush()).is_ok()
                    });
                    if !written {
                        stdin = None;
                    }
                }
                Input::Close => stdin = None,
            }
        }
    });
    if let Err(e) = spawned {
        kill_started(&mut child, &proc, user);
        return Err(e);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let (ended_tx, ended) = std::sync::mpsc::channel::<()>();
    let readers = outputs.len();
    for (stderr, from) in outputs {
        let (keeper, stopped, ended_tx) = (proc.clone(), stop.clone(), ended_tx.clone());
        let reader = move || {
            keep(&keeper, stderr, from, &stopped);
            let _ = ended_tx.send(());
        };
        if let Err(e) = std::thread::Builder::new().spawn(reader) {
            stop.store(true, Ordering::SeqCst);
            kill_started(&mut child, &proc, user);
            return Err(e);
        }
    }
    let waiter_proc = proc.clone();
    let waiter = move || {
        let code = super::call::status_of(child.wait());
        waiter_proc.reaped.store(true, Ordering::SeqCst);
        if waiter_proc.tty {
            // What it left holds the terminal open: ended with it.
            waiter_proc.kill(user);
        }
        // Output still open after `reap` (a terminal held from outside
        // its group) is read for a moment more, then left.
        let until = Instant::now() + OUTPUT_GRACE;
        for _ in 0..readers {
            let left = until.saturating_duration_since(Instant::now());
            if ended.recv_timeout(left).is_err() {
                break;
            }
        }
        stop.store(true, Ordering::SeqCst);
        *waiter_proc.stdin.lock().unwrap() = None;
        let mut state = waiter_proc.state.lock().unwrap();
        state.status = Some(code);
        waiter_proc.changed.notify_all();
    };
    // The waiter is moved into the thread only if it starts; else the
    // closure (and the child in it) is handed back through the error.
    match std::thread::Builder::new().spawn(waiter) {
        Ok(_) => Ok(()),
        Err(e) => {
            // The child went with the closure: kill its tree by group.
            proc.kill(user);
            Err(e)
        }
    }
}

fn kill_started(child: &mut Child, proc: &Proc, user: Option<SandboxUser>) {
    let _ = child.kill();
    proc.kill(user);
    let _ = child.wait();
    proc.reaped.store(true, Ordering::SeqCst);
}

/// Keeps what `from` says until it ends (a terminal's controlling end
/// reads EIO once nothing holds the terminal) or `stop` is set.
fn keep(proc: &Proc, stderr: bool, mut from: Box<dyn Source>, stop: &AtomicBool) {
    let mut buf = vec![0u8; CHUNK];
    loop {
        let mut ready = libc::pollfd {
            fd: from.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll on one pollfd that lives across the call.
        let polled = unsafe { libc::poll(&mut ready, 1, READ_POLL_MS) };
        if stop.load(Ordering::SeqCst) {
            return;
        }
        if polled == 0 {
            continue;
        }
        match from.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                let mut state = proc.state.lock().unwrap();
                if stderr {
                    state.err.push(&buf[..n]);
                } else {
                    state.out.push(&buf[..n]);
                }
                proc.changed.notify_all();
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// A new terminal of `size`: its controlling end and the end its process
/// gets, owned by the sandbox user (programs that open it by name work).
fn open_terminal(
    size: (u16, u16),
    user: Option<SandboxUser>,
) -> std::io::Result<(OwnedFd, OwnedFd)> {
    // SAFETY: plain libc calls on descriptors this function owns.
    unsafe {
        let master = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC);
        if master < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let master = OwnedFd::from_raw_fd(master);
        if libc::grantpt(master.as_raw_fd()) != 0 || libc::unlockpt(master.as_raw_fd()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut name = [0 as libc::c_char; 128];
        if libc::ptsname_r(master.as_raw_fd(), name.as_mut_ptr(), name.len()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let terminal = libc::open(
            name.as_ptr(),
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        );
        if terminal < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let terminal = OwnedFd::from_raw_fd(terminal);
        if let Some(user) = user {
            // Best effort: without CAP_CHOWN it stays root's, usable
            // through the descriptors it is given.
            libc::fchown(terminal.as_raw_fd(), user.uid, user.gid);
        }
        set_size(&master, size);
        Ok((master, terminal))
    }
}

fn set_size(master: &OwnedFd, (rows, cols): (u16, u16)) {
    let size = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ with a pointer to a local winsize.
    unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &size) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_keeps_its_head_and_tail_and_says_what_it_dropped() {
        let mut kept = Kept::default();
        kept.push(&vec![b'h'; PROC_HEAD - 1]);
        kept.push(b"xy");
        let middle = vec![b'm'; 3 * PROC_TAIL];
        kept.push(&middle);
        kept.push(b"end");
        let total = (PROC_HEAD + 1 + 3 * PROC_TAIL + 3) as u64;
        assert_eq!(kept.total, total);
        assert_eq!(kept.head.len(), PROC_HEAD);
        assert_eq!(kept.tail.len(), PROC_TAIL);
        // From the start: the head only.
        let (at, data) = kept.read(0, usize::MAX);
        assert_eq!((at, data.len()), (0, PROC_HEAD));
        assert_eq!(data.last(), Some(&b'x'));
        // Past the head: the tail, starting where it starts.
        let (at, data) = kept.read(PROC_HEAD as u64, 10);
        assert_eq!(at, total - PROC_TAIL as u64);
        assert_eq!(data, vec![b'm'; 10]);
        let (at, data) = kept.read(total - 2, 10);
        assert_eq!((at, data), (total - 2, b"nd".to_vec()));
        assert_eq!(kept.read(total, 10), (total, Vec::new()));
        assert_eq!(kept.read(total + 5, 10), (total, Vec::new()));
    }

    #[test]
    fn a_small_output_is_kept_whole() {
        let mut kept = Kept::default();
        kept.push(b"hello ");
        kept.push(b"world");
        assert_eq!(kept.read(0, 100), (0, b"hello world".to_vec()));
        assert_eq!(kept.read(6, 2), (6, b"wo".to_vec()));
    }
}

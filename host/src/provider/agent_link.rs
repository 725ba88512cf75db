//! The host's end of `sandbox-agent serve`: executes without a `docker exec`.
//!
//! One attach connection per container and host process carries the
//! [`sandbox_agent::protocol`] lines to the agent (the container's main
//! process) and back. The attach stream has no path a container could
//! redirect, and the container's log driver is `none`, so no output is
//! written to disk.
//!
//! Everything the agent says is untrusted (a workload that reaches the
//! agent's stdout, or a compromised agent, may say anything): replies are
//! bounded and parsed strictly, a garbled one closes this
//! container's link (its calls in flight fail; later ones reopen it), and
//! in-flight state and last use stay with the host's own usage store.
//!
//! Nothing on a link tells of other containers: each link draws its own
//! random frame-id prefix when it opens and counts its own frames from 0
//! ([`FrameIds`]). Nothing on it is trusted to tell the time either: an
//! exec's start-by time is the host's own clock plus [`START_WINDOW`] (the
//! container shares the host kernel's wall clock: no time namespace, and
//! gVisor's sentry follows the host's), and the agent's clock in a `pong` is
//! only logged. And what a container says costs the host a bounded share of
//! a core: replies that answer nothing the host awaits are read at most
//! [`FLOOD_RATE`] a second (after a burst of [`FLOOD_BURST`]); past that the
//! reader pauses ([`FloodBudget`]), the engine's buffers fill, and the
//! writer inside the container blocks, on the container's own CPU. Answers
//! to the host's own frames never count against it (though they wait behind
//! whatever the container wrote before them). A link whose agent went
//! silent stays attached until another opens in its place, so that a flood
//! stays paced, instead of being drained by the engine on the host's CPU.
//!
//! The host speaks one version of the wire,
//! [`sandbox_agent::protocol::PROTOCOL_VERSION`]. A container keeps the
//! agent it was created with, and its `sandbox.agent` label says which
//! version that is, so one of another version is normally never attached
//! to (see `dataplane::agent::AgentMode`). Should one answer all the same,
//! its `pong` (or `hello`) says so: that link closes at once, and the
//! container's executes go through `docker exec` for a while
//! ([`MAX_DOWN_FOR`]) without waiting for any acknowledgement.
//!
//! Several host processes may be attached to one container at once, and
//! the engine copies each connection's stdin into the agent's stdin as it
//! reads it, so two processes' frames could interleave. A writer therefore
//! holds an exclusive `flock` on the container's lock file in the host's
//! state directory from its write until the agent acknowledges the frame.
//! Each such link reads the others' replies as well: they answer nothing
//! it awaits, so they count against its flood budget, and as the engine
//! waits for its slowest attached reader, a long stream of output to one
//! process goes at the budget's pace while another is attached (at least
//! [`FLOOD_RATE`] frames of up to 16 KiB a second: the agent's frames fill
//! up as its writes wait).

use std::collections::HashMap;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bollard::container::LogOutput;
use bollard::query_parameters::AttachContainerOptionsBuilder;
use bollard::Docker;
use futures_util::{Stream, StreamExt};
use sandbox_agent::protocol::{
    DoneStatus, Exec, ParseError, ProcInfo, Reply, Request, Spawn, AGENT_MOUNT, EXIT_KILLED,
    EXIT_TIMED_OUT, MAX_REPLY_LINE, PROTOCOL_VERSION,
};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::ContainerRecord;
use crate::dataplane::exec::{
    EndReason, ExecOutput, ExecRequest, ExecResponse, StreamKind, AGENT_GRACE, OUT_OF_MEMORY_NOTE,
    TIMEOUT_EXIT_CODE,
};
use crate::dataplane::processes::{OutputChunk, ProcessAnswer, ProcessOp};

/// How long the agent has to acknowledge a frame (or answer a ping).
const ACK_TIMEOUT: Duration = Duration::from_secs(3);
/// How long after the host builds an exec frame the agent may still start
/// the command: its start-by time, by the host's clock.
const START_WINDOW: Duration = ACK_TIMEOUT;
/// How much longer than [`START_WINDOW`] the host waits for an exec's
/// acknowledgement: an agent that took the command by its start-by time
/// has acknowledged it (at once, before starting it) by the time the host
/// gives up, unless it stalled in between or its replies are held up.
const ACK_SLACK: Duration = Duration::from_millis(500);
/// How long the kill sent after an unacknowledged exec may wait for the
/// link's writer and for the agent to take it; whatever it waits for, the
/// frame, once written, sits right behind the exec in the agent's stdin.
const CANCEL_PATIENCE: Duration = Duration::from_millis(250);
/// How long that kill's sweep may take, when the agent took it.
const CANCEL_SWEEP: Duration = Duration::from_secs(1);
/// How long a kill through the agent may take (its sweep included).
const KILL_WAIT: Duration = Duration::from_secs(10);
/// How long a liveness ping may take before the engine is asked instead.
const PROBE_TIMEOUT: Duration = Duration::from_millis(300);
/// How long a container whose agent did not answer goes through `docker
/// exec`; doubled on each failure in a row, up to [`MAX_DOWN_FOR`].
const DOWN_FOR: Duration = Duration::from_secs(2);
const MAX_DOWN_FOR: Duration = Duration::from_secs(30);
/// Attached but unanswered pings in a row before the host restarts `serve`.
const RESPAWN_AFTER: u32 = 2;
/// How long restarting `serve` (a `docker exec` of `sandbox-agent
/// respawn`) may take.
const RESPAWN_TIMEOUT: Duration = Duration::from_secs(10);
/// Links held open at once per host process at the least: each is a file
/// descriptor and, when attached, a connection to the engine; past the
/// bound ([`max_links`]) the least recently used closes.
const MIN_LINKS: usize = 256;
/// How long links open on the attach stream after the agent did not take a
/// plane socket.
const PLANE_REST: Duration = Duration::from_secs(30);
/// Containers remembered (a record each) before those without a link go.
const MAX_SLOTS: usize = 4096;
/// Output frames buffered per call before the reader waits for the caller.
const CALL_BUFFER: usize = 16;
/// Replies a link reads per second, sustained, that answer nothing the host
/// awaits (see [`FloodBudget`]).
const FLOOD_RATE: u32 = 200;
/// Such replies read at once before the rate applies.
const FLOOD_BURST: u32 = 1000;
/// The longest single pause of a throttled reader.
const MAX_FLOOD_PAUSE: Duration = Duration::from_secs(1);
/// A throttled link is logged at most this often.
const FLOOD_LOG_EVERY: Duration = Duration::from_secs(10);
/// An agent clock this far from the host's is logged (and otherwise
/// ignored: start-by times are the host's).
const CLOCK_NOTE: Duration = Duration::from_secs(1);

/// An output callback, reborrowed for one call (`OutputSink` ties both
/// lifetimes together).
pub(super) type Sink<'s, 'd> = &'s mut (dyn FnMut(StreamKind, &[u8]) + Send + 'd);

/// The attach stream's output: what the container writes.
type Output = Pin<Box<dyn Stream<Item = Result<LogOutput, bollard::errors::Error>> + Send>>;

/// Why a call did not go through the agent, or did not finish there.
#[derive(Debug)]
pub enum LinkError {
    /// No link (no agent answers, it speaks another protocol version, or
    /// it is resting after a failure): the call never reached an agent; run
    /// it through the engine.
    Unavailable,
    /// The frame could not be written whole (no lock, a broken stream): the
    /// agent never read it as a request; run it through the engine.
    NotSent(String),
    /// The call may have started and its result was lost (no acknowledgement,
    /// the agent restarted, the stream broke or carried garbage): it is
    /// killed and reported, never run a second time.
    Lost(String),
}

/// How a call through the agent ended.
pub enum LinkOutcome {
    /// The agent reported its status.
    Done(ExecResponse),
    /// The host's own deadline passed first (the workload may have stopped
    /// the agent's `reap`): the output so far, timed out; the caller kills.
    Deadline(ExecResponse),
}

enum Event {
    Output(StreamKind, Vec<u8>),
    /// The call's status, the out-of-memory kills in the container while
    /// it ran, and the background processes killed to end it.
    Exit(u8, u32, u32),
    /// A process, in the answer to a process request.
    Proc(ProcInfo),
    /// Output of a process from an offset of a stream.
    Chunk(StreamKind, u64, Vec<u8>),
    /// The end of the answer to a process request.
    Done(DoneStatus),
}

/// What the reader task and the callers share.
#[derive(Default)]
struct Shared {
    alive: AtomicBool,
    /// A frame went unanswered.
    silent: AtomicBool,
    /// Answers to frames: true when taken, false when refused as stale.
    acks: Mutex<HashMap<String, oneshot::Sender<bool>>>,
    /// Pongs: the agent's boot id and clock (the clock only logged).
    pongs: Mutex<HashMap<String, oneshot::Sender<(String, u64)>>>,
    kills: Mutex<HashMap<String, oneshot::Sender<bool>>>,
    calls: Mutex<HashMap<String, mpsc::Sender<Event>>>,
    boot: Mutex<Option<String>>,
    /// Why the last calls were dropped: read by a call whose channel closed.
    lost: Mutex<String>,
    /// The protocol version the agent said it speaks, when not ours: the
    /// link is closed and the agent unusable.
    skew: Mutex<Option<u32>>,
}

impl Shared {
    /// Open, and its agent answered the last frame in time: new calls may
    /// use it. (A link whose agent went silent keeps delivering to the
    /// calls it carries; new calls open a fresh one or fall back.)
    fn usable(&self) -> bool {
        self.alive.load(Ordering::SeqCst) && !self.silent.load(Ordering::SeqCst)
    }

    /// Drops every call in flight (their channels close) for `why`.
    fn lose_calls(&self, why: &str) {
        *self.lost.lock().unwrap() = why.to_owned();
        self.calls.lock().unwrap().clear();
    }

    fn fail(&self, container: &str, why: &str) {
        if self.alive.swap(false, Ordering::SeqCst) {
            tracing::warn!(container, why, "agent link closed");
        }
        self.close(why);
    }

    /// Closes the link for an agent of another protocol version `theirs`:
    /// not a failure of the agent (it is the one the container was created
    /// with), so only a debug line names both versions.
    fn skewed(&self, container: &str, theirs: u32) {
        *self.skew.lock().unwrap() = Some(theirs);
        if self.alive.swap(false, Ordering::SeqCst) {
            tracing::debug!(
                container,
                agent_version = theirs,
                host_version = PROTOCOL_VERSION,
                "the sandbox agent speaks another protocol version: link closed"
            );
        }
        self.close(&format!(
            "the sandbox agent speaks protocol version {theirs}, the host {PROTOCOL_VERSION}"
        ));
    }

    /// Drops every call and every awaited answer (their channels close).
    fn close(&self, why: &str) {
        self.lose_calls(why);
        self.acks.lock().unwrap().clear();
        self.pongs.lock().unwrap().clear();
        self.kills.lock().unwrap().clear();
    }
}

/// The frame ids of one link: `PREFIX-N`, with a random prefix drawn when
/// the link opens and `N` counting this link's own frames (pings, execs,
/// kills) from 0. The ids a container sees say nothing of any other
/// container's traffic, nor of this container's earlier links; and the
/// frames of other host processes attached to the same container (whose
/// replies this link reads too) carry other prefixes, so they are never
/// taken for ours.
struct FrameIds {
    prefix: String,
    next: AtomicU64,
}

impl FrameIds {
    fn new() -> Self {
        FrameIds {
            prefix: crate::dataplane::exec::new_execution_id()[..16].to_owned(),
            next: AtomicU64::new(0),
        }
    }

    fn next(&self) -> String {
        format!(
            "{}-{}",
            self.prefix,
            self.next.fetch_add(1, Ordering::Relaxed)
        )
    }
}

/// One attach connection to a container's agent.
struct Link {
    container: String,
    shared: Arc<Shared>,
    input: tokio::sync::Mutex<Pin<Box<dyn AsyncWrite + Send>>>,
    reader: tokio::task::JoinHandle<()>,
    ids: FrameIds,
    /// Where the container's writer lock file is (none: this process is
    /// the only writer it knows of, as on the plane).
    lock_dir: Option<PathBuf>,
    transport: Transport,
    /// The plane directory, for a link on the plane: where a call's pipe
    /// is offered.
    plane: std::sync::OnceLock<PathBuf>,
    /// The plane socket (valid while the link lives: its halves hold it),
    /// to see at no cost whether the agent's end closed.
    socket: std::sync::OnceLock<std::os::fd::RawFd>,
}

/// What a link runs over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// A socket of the host's, straight to the agent (`provider::plane`).
    Plane,
    /// The container's attach stream, through the engine.
    Attach,
}

impl Drop for Link {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// This process's writer and the container's lock file, held from before a
/// frame is built until its answer.
struct Writing<'a> {
    input: tokio::sync::MutexGuard<'a, Pin<Box<dyn AsyncWrite + Send>>>,
    _lock: Option<nix::fcntl::Flock<std::fs::File>>,
}

/// `answer`, if it comes within `patience`.
async fn answered<T>(answer: oneshot::Receiver<T>, patience: Duration) -> Result<T, Unanswered> {
    match tokio::time::timeout(patience, answer).await {
        Ok(Ok(answer)) => Ok(answer),
        Ok(Err(_)) => Err(Unanswered::Silent(
            "the link closed before the agent answered".into(),
        )),
        Err(_) => Err(Unanswered::Silent(format!(
            "the agent did not answer within {} ms",
            patience.as_millis()
        ))),
    }
}

impl Link {
    /// A link writing to `input` and reading `output` (its reader task
    /// starts now), with fresh frame ids and its own flood budget.
    fn start(
        container: &str,
        input: Pin<Box<dyn AsyncWrite + Send>>,
        output: Output,
        lock_dir: Option<PathBuf>,
        budget: FloodBudget,
        transport: Transport,
    ) -> Arc<Link> {
        let shared = Arc::new(Shared::default());
        shared.alive.store(true, Ordering::SeqCst);
        let reader = tokio::spawn(read_replies(
            container.to_owned(),
            shared.clone(),
            output,
            budget,
        ));
        Arc::new(Link {
            container: container.to_owned(),
            shared,
            input: tokio::sync::Mutex::new(input),
            reader,
            ids: FrameIds::new(),
            lock_dir,
            transport,
            plane: std::sync::OnceLock::new(),
            socket: std::sync::OnceLock::new(),
        })
    }

    /// Whether the agent's end of a plane link is still open, by a poll of
    /// the socket that waits for nothing (attached links: never vouched
    /// for this way, they ping).
    fn peer_open(&self) -> bool {
        let Some(&fd) = self.socket.get() else {
            return false;
        };
        let mut poll = nix::libc::pollfd {
            fd,
            events: nix::libc::POLLRDHUP,
            revents: 0,
        };
        // SAFETY: one pollfd on a socket this link holds open; no wait.
        let ready = unsafe { nix::libc::poll(&mut poll, 1, 0) };
        ready == 0
    }

    /// Pings a freshly opened link: its agent answered, in this host's
    /// protocol version.
    async fn handshake(&self) -> Result<(), OpenError> {
        let sent = unix_ms();
        let (boot, agent_now) = self.ping(ACK_TIMEOUT).await.map_err(|e| {
            match *self.shared.skew.lock().unwrap() {
                // Its pong closed the link as soon as it was read.
                Some(theirs) => OpenError::Version(theirs),
                None if matches!(e, Unanswered::Silent(_)) => {
                    OpenError::Silent(format!("ping: {}", e.why()))
                }
                None => OpenError::Attach(format!("ping: {}", e.why())),
            }
        })?;
        // Whatever clock the pong states, the host's own sets start-by
        // times: it is only noted here.
        let midpoint = (sent + unix_ms()) / 2;
        let skew_ms = agent_now as i64 - midpoint as i64;
        if skew_ms.unsigned_abs() > CLOCK_NOTE.as_millis() as u64 {
            tracing::debug!(
                container = self.container,
                skew_ms,
                "the sandbox agent states a clock apart from the host's (ignored)"
            );
        }
        *self.shared.boot.lock().unwrap() = Some(boot);
        Ok(())
    }

    /// Pings the agent: its boot id and clock.
    async fn ping(&self, patience: Duration) -> Result<(String, u64), Unanswered> {
        let nonce = self.ids.next();
        let (tx, rx) = oneshot::channel();
        let _pending = Pending::new(&self.shared.pongs, &nonce, tx);
        let frame = || {
            Request::Ping {
                nonce: nonce.clone(),
            }
            .encode()
        };
        self.write_until(frame, rx, ACK_TIMEOUT, patience).await
    }

    /// Writes the frame `frame()` builds, holding this process's writer and
    /// the container's lock file (each waited for up to `busy`) from before
    /// the frame is built (its start-by time counts from there); the
    /// caller holds them until the answer, so no other writer's frame can
    /// interleave with it in the agent's stdin. A write that fails or times
    /// out may have left part of a frame behind: the link is closed (the
    /// next frame of any writer starts with a newline, so the rest is
    /// refused on its own).
    async fn write(
        &self,
        frame: impl FnOnce() -> String,
        busy: Duration,
    ) -> Result<Writing<'_>, Unanswered> {
        let input = tokio::time::timeout(busy, self.input.lock())
            .await
            .map_err(|_| Unanswered::NotSent("the link is busy".into()))?;
        let lock = self.lock(busy).await.map_err(Unanswered::NotSent)?;
        let mut writing = Writing { input, _lock: lock };
        self.put(&mut writing, &frame()).await?;
        Ok(writing)
    }

    /// Writes `frame` whole with the writer and lock in `writing`.
    async fn put(&self, writing: &mut Writing<'_>, frame: &str) -> Result<(), Unanswered> {
        let input = &mut writing.input;
        let write = async {
            input.write_all(frame.as_bytes()).await?;
            input.flush().await
        };
        let why = match tokio::time::timeout(ACK_TIMEOUT, write).await {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(e)) => format!("writing to the agent: {e}"),
            Err(_) => "writing to the agent timed out".to_owned(),
        };
        self.shared.fail(&self.container, &why);
        Err(Unanswered::NotSent(why))
    }

    /// Writes a frame (see [`Link::write`]) and waits up to `patience` for
    /// `answer`, holding the writer and the lock until then.
    async fn write_until<T>(
        &self,
        frame: impl FnOnce() -> String,
        answer: oneshot::Receiver<T>,
        busy: Duration,
        patience: Duration,
    ) -> Result<T, Unanswered> {
        let _writing = self.write(frame, busy).await?;
        answered(answer, patience).await
    }

    /// The container's writer lock, across host processes, waited for up to
    /// `patience`.
    async fn lock(
        &self,
        patience: Duration,
    ) -> Result<Option<nix::fcntl::Flock<std::fs::File>>, String> {
        let Some(dir) = &self.lock_dir else {
            return Ok(None);
        };
        let path = dir.join(&self.container);
        let give_up = Instant::now() + patience;
        let open = || {
            crate::state::create_dir(dir)
                .and_then(|()| crate::state::open(&path, crate::state::Create::OrOpen))
                .map_err(|e| format!("the link lock {}: {e}", path.display()))
        };
        let mut file = open()?;
        loop {
            match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
                // The lock file is removed with its container: a lock on a
                // file no longer at `path` excludes nobody, so take the new one.
                Ok(lock) if !still_at(&lock, &path) => {
                    drop(lock);
                    file = open()?;
                }
                Ok(lock) => return Ok(Some(lock)),
                Err((back, _)) if Instant::now() < give_up => {
                    file = back;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                Err((_, e)) => return Err(format!("the link lock {}: {e}", path.display())),
            }
        }
    }

    /// Kills every process of the call marked `marker`: true when none is
    /// left. The agent has `patience` to take the frame (the writer and the
    /// lock are waited for as long) and `sweep` more to finish the sweep.
    async fn kill(
        &self,
        marker: &str,
        patience: Duration,
        sweep: Duration,
    ) -> Result<bool, String> {
        let id = self.ids.next();
        let (ack_tx, ack_rx) = oneshot::channel();
        let _ack = Pending::new(&self.shared.acks, &id, ack_tx);
        let (tx, rx) = oneshot::channel();
        let _killed = Pending::new(&self.shared.kills, &id, tx);
        // The locks are held until the agent has read the frame, not for
        // the sweep itself.
        self.write_until(|| kill_frame(&id, marker), ack_rx, patience, patience)
            .await
            .map_err(|e| e.why().to_owned())?;
        swept(rx, sweep).await
    }

    /// After an exec went unacknowledged, with its writer and lock still
    /// held (`writing`): a kill of its marker, written right behind it.
    /// Whenever the agent reads the exec (it may be stopped, or its clock
    /// stepped back), it reads this next, so the command is refused as
    /// stale, or never starts, or is killed. The agent has
    /// [`CANCEL_PATIENCE`] to take it (and [`CANCEL_SWEEP`] more to sweep);
    /// the caller kills through the engine as well.
    async fn cancel_unacknowledged(&self, mut writing: Writing<'_>, marker: &str) {
        let id = self.ids.next();
        let (ack_tx, ack_rx) = oneshot::channel();
        let _ack = Pending::new(&self.shared.acks, &id, ack_tx);
        let (tx, rx) = oneshot::channel();
        let _killed = Pending::new(&self.shared.kills, &id, tx);
        let killed = match self.put(&mut writing, &kill_frame(&id, marker)).await {
            Err(e) => Err(e.why().to_owned()),
            Ok(()) => match answered(ack_rx, CANCEL_PATIENCE).await {
                Err(e) => Err(format!("written, not yet read: {}", e.why())),
                Ok(_) => {
                    drop(writing);
                    swept(rx, CANCEL_SWEEP).await
                }
            },
        };
        tracing::debug!(
            container = self.container,
            ?killed,
            "a kill follows an unacknowledged command on its link"
        );
    }

    /// Runs `request` through this link's agent.
    async fn exec<'d>(
        &self,
        request: &ExecRequest,
        mut sink: Option<Sink<'_, 'd>>,
    ) -> Result<LinkOutcome, LinkError> {
        let id = self.ids.next();
        let (tx, mut rx) = mpsc::channel(CALL_BUFFER);
        self.shared.calls.lock().unwrap().insert(id.clone(), tx);
        let _registered = Unregister(&self.shared, &id);
        let (ack_tx, ack_rx) = oneshot::channel();
        let _ack = Pending::new(&self.shared.acks, &id, ack_tx);
        let start = Instant::now();
        let writing = self
            .write(|| exec_frame(&id, request, unix_ms(), None), ACK_TIMEOUT)
            .await
            .map_err(|e| LinkError::NotSent(e.why().to_owned()))?;
        match answered(ack_rx, START_WINDOW + ACK_SLACK).await {
            Ok(true) => {}
            // Refused unread: the engine runs it.
            Ok(false) => return Err(LinkError::NotSent("the agent read it too late".into())),
            // It may have been read: never run twice, and kill it.
            Err(e) => {
                self.shared.silent.store(true, Ordering::SeqCst);
                self.cancel_unacknowledged(writing, &request.marker).await;
                return Err(LinkError::Lost(format!(
                    "the sandbox agent did not take the command ({}); whether it \
                     started is unknown, so it is not run again and its processes are killed",
                    e.why()
                )));
            }
        }
        drop(writing);
        let mut output = ExecOutput::new(request.output_limit);
        let deadline = start + request.timeout + AGENT_GRACE;
        loop {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(Event::Output(kind, data))) => {
                    if let Some(sink) = sink.as_mut() {
                        sink(kind, &data);
                    }
                    output.push(kind, &data);
                }
                Ok(Some(Event::Exit(code, oom_kills, background_killed))) => {
                    let exit = (code, oom_kills, background_killed);
                    let response = exit_response(output, exit, start, request, sink.as_mut());
                    return Ok(LinkOutcome::Done(response));
                }
                // Frames of a process request under an exec's id.
                Ok(Some(Event::Proc(_) | Event::Chunk(..) | Event::Done(_))) => {
                    return Err(LinkError::Lost(
                        "the sandbox agent answered the command with frames of another request"
                            .into(),
                    ));
                }
                Ok(None) => {
                    let why = self.shared.lost.lock().unwrap().clone();
                    return Err(LinkError::Lost(format!(
                        "the command's result was lost: {why}"
                    )));
                }
                Err(_) => {
                    let mut response = output.finish(TIMEOUT_EXIT_CODE, true);
                    response.via_agent = true;
                    return Ok(LinkOutcome::Deadline(response));
                }
            }
        }
    }
}

impl Link {
    /// Carries out `op` through this link's agent: every `proc` and `chunk`
    /// frame of its answer, and how it ended. The frame is taken (or
    /// refused as stale) within [`ACK_TIMEOUT`]; the answer then has
    /// [`PROCESS_PATIENCE`] more than the read's own wait.
    async fn process(&self, op: &ProcessOp) -> Result<(ProcessAnswer, DoneStatus), LinkError> {
        let id = self.ids.next();
        let (tx, mut rx) = mpsc::channel(CALL_BUFFER);
        self.shared.calls.lock().unwrap().insert(id.clone(), tx);
        let _registered = Unregister(&self.shared, &id);
        let (ack_tx, ack_rx) = oneshot::channel();
        let _ack = Pending::new(&self.shared.acks, &id, ack_tx);
        let writing = self
            .write(|| process_frame(&id, op, unix_ms()), ACK_TIMEOUT)
            .await
            .map_err(|e| LinkError::NotSent(e.why().to_owned()))?;
        match answered(ack_rx, START_WINDOW + ACK_SLACK).await {
            Ok(true) => {}
            Ok(false) => return Err(LinkError::NotSent("the agent read it too late".into())),
            Err(e) => {
                self.shared.silent.store(true, Ordering::SeqCst);
                return Err(LinkError::Lost(format!(
                    "the sandbox agent did not take the request ({})",
                    e.why()
                )));
            }
        }
        drop(writing);
        let wait = match op {
            ProcessOp::Read { wait, .. } => *wait,
            _ => Duration::ZERO,
        };
        let deadline = Instant::now() + wait + PROCESS_PATIENCE;
        let mut answer = ProcessAnswer::default();
        let mut bytes = 0usize;
        loop {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(Event::Proc(info))) if answer.procs.len() < MAX_PROCS_ANSWERED => {
                    answer.push_proc(info);
                }
                Ok(Some(Event::Chunk(stream, offset, data)))
                    if bytes + data.len() <= sandbox_agent::protocol::MAX_READ =>
                {
                    bytes += data.len();
                    answer.chunks.push(OutputChunk {
                        stream,
                        offset,
                        data,
                    });
                }
                Ok(Some(Event::Done(status))) => return Ok((answer, status)),
                Ok(Some(_)) => {
                    return Err(LinkError::Lost(
                        "the sandbox agent answered past its bounds".into(),
                    ))
                }
                Ok(None) => {
                    let why = self.shared.lost.lock().unwrap().clone();
                    return Err(LinkError::Lost(format!("the answer was lost: {why}")));
                }
                Err(_) => {
                    return Err(LinkError::Lost(
                        "the sandbox agent did not answer in time".into(),
                    ))
                }
            }
        }
    }
}

/// The response of a call whose `exit` frame said `(code, oom_kills,
/// background_killed)`, with its output so far: the agent's own deadline
/// (124 at or after the timeout) is a timeout, and the out-of-memory
/// killer's part is noted.
fn exit_response(
    mut output: ExecOutput,
    (code, oom_kills, background_killed): (u8, u32, u32),
    start: Instant,
    request: &ExecRequest,
    sink: Option<&mut Sink<'_, '_>>,
) -> ExecResponse {
    let timed_out = code == EXIT_TIMED_OUT && start.elapsed() >= request.timeout;
    let out_of_memory = oom_kills > 0 && code == EXIT_KILLED;
    let note = if out_of_memory {
        Some(OUT_OF_MEMORY_NOTE.to_owned())
    } else if oom_kills > 0 && !timed_out {
        Some(format!(
            "[sandbox: the out-of-memory killer ended {oom_kills} process(es) in \
             this sandbox while the command ran]\n"
        ))
    } else {
        None
    };
    if let Some(note) = note {
        if let Some(sink) = sink {
            sink(StreamKind::Stderr, note.as_bytes());
        }
        output.push(StreamKind::Stderr, note.as_bytes());
    }
    let mut response = output.finish(i64::from(code), timed_out);
    if out_of_memory && !timed_out {
        response.reason = Some(EndReason::OutOfMemory);
    }
    response.background_killed = background_killed;
    response.via_agent = true;
    response
}

/// The agent-side deadline of a call bounded by its progress (the host ends
/// it when it stalls): a backstop, should the host go away mid-transfer.
const NO_AGENT_DEADLINE: Duration = Duration::from_secs(24 * 3600);
/// What one read of a call's pipe takes at most.
const PIPE_CHUNK: usize = 64 * 1024;

impl Link {
    /// Runs `request` through this link's agent with its stdin and stdout
    /// on a pipe of their own (a plane socket offered for this call): bytes
    /// raw both ways, no frame and no engine between; its stderr and status
    /// come as frames on the link. Only on the plane.
    async fn exec_piped<'d>(
        &self,
        request: &ExecRequest,
        mut stdin: Option<&mut (dyn tokio::io::AsyncRead + Send + Unpin)>,
        mut stdout: Option<&mut (dyn AsyncWrite + Send + Unpin)>,
        mut sink: Option<Sink<'_, 'd>>,
    ) -> Result<LinkOutcome, LinkError> {
        use tokio::io::AsyncReadExt;
        let dir = self.plane.get().ok_or(LinkError::Unavailable)?;
        let offer = super::plane::offer(dir, super::plane::PLANE_PIPE_SUFFIX)
            .map_err(LinkError::NotSent)?;
        let mut sent = request.clone();
        if request.idle_timeout {
            // Bounded by its progress, on the host's side.
            sent.timeout = NO_AGENT_DEADLINE;
        }
        let id = self.ids.next();
        let (tx, mut rx) = mpsc::channel(CALL_BUFFER);
        self.shared.calls.lock().unwrap().insert(id.clone(), tx);
        let _registered = Unregister(&self.shared, &id);
        let (ack_tx, ack_rx) = oneshot::channel();
        let _ack = Pending::new(&self.shared.acks, &id, ack_tx);
        let start = Instant::now();
        let name = offer.name().to_owned();
        let writing = self
            .write(
                || exec_frame(&id, &sent, unix_ms(), Some(&name)),
                ACK_TIMEOUT,
            )
            .await
            .map_err(|e| LinkError::NotSent(e.why().to_owned()))?;
        match answered(ack_rx, START_WINDOW + ACK_SLACK).await {
            Ok(true) => {}
            Ok(false) => return Err(LinkError::NotSent("the agent read it too late".into())),
            Err(e) => {
                self.shared.silent.store(true, Ordering::SeqCst);
                self.cancel_unacknowledged(writing, &request.marker).await;
                return Err(LinkError::Lost(format!(
                    "the sandbox agent did not take the command ({}); whether it \
                     started is unknown, so it is not run again and its processes are killed",
                    e.why()
                )));
            }
        }
        drop(writing);
        let mut output = ExecOutput::new(request.output_limit);
        // The agent connects before it starts the command; one that cannot
        // says so and exits 126.
        let accepting = offer.accept(ACK_TIMEOUT);
        tokio::pin!(accepting);
        // Its status may come before the pipe is taken (a command that
        // answers and exits at once): its output is still in the pipe.
        let mut exit = None;
        let pipe = loop {
            tokio::select! {
                accepted = &mut accepting => match accepted {
                    Ok(pipe) => break pipe,
                    // It could not connect, and said so.
                    Err(_) if exit.is_some() => {
                        let exit = exit.expect("checked");
                        let response = exit_response(output, exit, start, request, sink.as_mut());
                        return Ok(LinkOutcome::Done(response));
                    }
                    Err(why) => return Err(LinkError::Lost(format!(
                        "the command's pipe: {why}"
                    ))),
                },
                event = rx.recv(), if exit.is_none() => match event {
                    Some(Event::Output(kind, data)) => output.push(kind, &data),
                    Some(Event::Exit(code, oom, bg)) => exit = Some((code, oom, bg)),
                    Some(_) => return Err(LinkError::Lost(
                        "the sandbox agent answered the command with frames of another request".into(),
                    )),
                    None => {
                        let why = self.shared.lost.lock().unwrap().clone();
                        return Err(LinkError::Lost(format!("the command's result was lost: {why}")));
                    }
                },
            }
        };
        let (mut from, mut into) = pipe.into_split();
        // Fed beside the output, so a command that prints before it reads
        // cannot deadlock against the host.
        let inline = request.stdin.clone();
        let moved = std::sync::atomic::AtomicU64::new(0);
        let mark = || moved.store(start.elapsed().as_millis() as u64, Ordering::Relaxed);
        let feed = async {
            if let Some(reader) = stdin.as_mut() {
                let mut buffer = vec![0u8; PIPE_CHUNK];
                loop {
                    let n = reader.read(&mut buffer).await.map_err(|e| {
                        LinkError::Lost(format!("reading the command's input: {e}"))
                    })?;
                    if n == 0 {
                        break;
                    }
                    // The command may exit without reading it all.
                    if into.write_all(&buffer[..n]).await.is_err() {
                        return Ok(());
                    }
                    mark();
                }
            } else if let Some(bytes) = inline {
                let _ = into.write_all(&bytes).await;
            }
            let _ = into.shutdown().await;
            Ok::<(), LinkError>(())
        };
        tokio::pin!(feed);
        let (mut feeding, mut draining) = (true, true);
        let mut unread = 0usize;
        let mut buffer = vec![0u8; PIPE_CHUNK];
        let deadline = || {
            if request.idle_timeout {
                start + Duration::from_millis(moved.load(Ordering::Relaxed)) + request.timeout
            } else {
                start + request.timeout + AGENT_GRACE
            }
        };
        loop {
            if !draining {
                if let Some(exit) = exit {
                    let response = exit_response(output, exit, start, request, sink.as_mut());
                    return Ok(LinkOutcome::Done(response));
                }
            }
            tokio::select! {
                fed = &mut feed, if feeding => {
                    feeding = false;
                    fed?;
                }
                read = from.read(&mut buffer), if draining => match read {
                    Ok(0) => draining = false,
                    Err(e) => {
                        tracing::debug!(container = self.container, error = %e, unread, "a pipe's output ended in an error");
                        draining = false;
                    }
                    Ok(n) => {
                        mark();
                        let bytes = &buffer[..n];
                        match stdout.as_mut() {
                            // A reader that takes nothing is a stall, as a
                            // command that prints nothing is.
                            Some(writer) => match tokio::time::timeout_at(
                                deadline(),
                                writer.write_all(bytes),
                            )
                            .await
                            {
                                Ok(written) => written.map_err(|e| {
                                    LinkError::Lost(format!(
                                        "the command's output was refused: {e}"
                                    ))
                                })?,
                                Err(_) => {
                                    let mut response = output.finish(TIMEOUT_EXIT_CODE, true);
                                    response.via_agent = true;
                                    return Ok(LinkOutcome::Deadline(response));
                                }
                            },
                            None => {
                                // Kept head and tail only; past the bound,
                                // more is no progress (an endless stream
                                // must not keep a transfer alive).
                                unread += n;
                                if unread > request.output_limit.saturating_mul(2) {
                                    return Err(LinkError::Lost(
                                        "the command's output passed its bound".into(),
                                    ));
                                }
                                if let Some(sink) = sink.as_mut() {
                                    sink(StreamKind::Stdout, bytes);
                                }
                                output.push(StreamKind::Stdout, bytes);
                            }
                        }
                    }
                },
                event = rx.recv(), if exit.is_none() => match event {
                    Some(Event::Output(kind, data)) => {
                        mark();
                        if let Some(sink) = sink.as_mut() {
                            sink(kind, &data);
                        }
                        output.push(kind, &data);
                    }
                    Some(Event::Exit(code, oom, bg)) => exit = Some((code, oom, bg)),
                    Some(_) => return Err(LinkError::Lost(
                        "the sandbox agent answered the command with frames of another request".into(),
                    )),
                    None => {
                        let why = self.shared.lost.lock().unwrap().clone();
                        return Err(LinkError::Lost(format!("the command's result was lost: {why}")));
                    }
                },
                () = tokio::time::sleep_until(deadline()) => {
                    // Idle: something may have moved meanwhile.
                    if Instant::now() < deadline() {
                        continue;
                    }
                    let mut response = output.finish(TIMEOUT_EXIT_CODE, true);
                    response.via_agent = true;
                    return Ok(LinkOutcome::Deadline(response));
                }
            }
        }
    }
}

/// Why a port could not be carried on the plane.
#[derive(Debug)]
pub enum PortError {
    /// Not through the plane (no plane link, or the request was lost): the
    /// engine's way is tried.
    Unavailable(String),
    /// Nothing accepts connections on the port: the agent's words.
    Refused(String),
}

impl Link {
    /// A connection to `port` on the sandbox's loopback, carried on a pipe
    /// of its own (a plane socket offered for it). Only on the plane.
    async fn port(&self, port: u16) -> Result<tokio::net::UnixStream, PortError> {
        let unavailable = |why: String| PortError::Unavailable(why);
        let dir = self
            .plane
            .get()
            .ok_or_else(|| unavailable("not a plane link".into()))?;
        let offer =
            super::plane::offer(dir, super::plane::PLANE_PIPE_SUFFIX).map_err(unavailable)?;
        let id = self.ids.next();
        let (tx, mut rx) = mpsc::channel(CALL_BUFFER);
        self.shared.calls.lock().unwrap().insert(id.clone(), tx);
        let _registered = Unregister(&self.shared, &id);
        let (ack_tx, ack_rx) = oneshot::channel();
        let _ack = Pending::new(&self.shared.acks, &id, ack_tx);
        let frame = || {
            Request::Port {
                id: id.clone(),
                pipe: offer.name().to_owned(),
                port,
            }
            .encode()
        };
        self.write_until(frame, ack_rx, ACK_TIMEOUT, START_WINDOW + ACK_SLACK)
            .await
            .map_err(|e| unavailable(e.why().to_owned()))?;
        let accepting = offer.accept(ACK_TIMEOUT);
        tokio::pin!(accepting);
        let (mut pipe, mut said) = (None, Vec::new());
        let deadline = Instant::now() + PORT_PATIENCE;
        loop {
            tokio::select! {
                accepted = &mut accepting, if pipe.is_none() => {
                    pipe = Some(accepted.map_err(unavailable)?);
                }
                event = tokio::time::timeout_at(deadline, rx.recv()) => match event {
                    Ok(Some(Event::Output(_, data))) if said.len() < 4096 => {
                        said.extend_from_slice(&data);
                    }
                    Ok(Some(Event::Done(DoneStatus::Ok))) => {
                        // Connected: the pipe is the agent's by now, or
                        // about to be taken.
                        return match pipe {
                            Some(pipe) => Ok(pipe),
                            None => tokio::time::timeout_at(deadline, &mut accepting)
                                .await
                                .map_err(|_| unavailable("connected, but no pipe".into()))?
                                .map_err(unavailable),
                        };
                    }
                    Ok(Some(Event::Done(_))) => {
                        let said = String::from_utf8_lossy(&said).trim().to_owned();
                        return Err(PortError::Refused(said));
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => return Err(unavailable("the link closed".into())),
                    Err(_) => {
                        return Err(unavailable("the sandbox agent did not connect in time".into()))
                    }
                },
            }
        }
    }
}

/// How long connecting to a port may take, through the plane or the
/// engine's exec (the agent's own connect tries IPv4 and IPv6 loopback, 5 s
/// each; the workload may stop it, as the same user).
pub(super) const PORT_PATIENCE: Duration = Duration::from_secs(12);

/// How long past a read's own wait the agent has to finish an answer about
/// processes (a kill's sweep takes up to a few seconds).
const PROCESS_PATIENCE: Duration = Duration::from_secs(15);
/// `proc` frames one answer may carry (a listing: every process kept).
const MAX_PROCS_ANSWERED: usize = sandbox_agent::protocol::MAX_PROCESSES;

/// The frame of `op` under `id`, built at `now_ms` by the host's clock (a
/// spawn's start-by time, as an exec's).
fn process_frame(id: &str, op: &ProcessOp, now_ms: u64) -> String {
    let id = id.to_owned();
    let request = match op {
        ProcessOp::Spawn(spawn) => Request::Spawn(Spawn {
            id,
            proc: spawn.id.to_string(),
            start_by_ms: now_ms.saturating_add(START_WINDOW.as_millis() as u64),
            timeout_ms: spawn
                .timeout
                .map_or(0, |t| t.as_millis().clamp(1, 999_999_999_999_999) as u64),
            tty: spawn.terminal.map(|t| (t.rows, t.cols)),
            env: spawn.env.clone(),
            command: spawn.command.clone(),
        }),
        ProcessOp::List => Request::Procs { id },
        ProcessOp::Read {
            id: proc,
            stdout_at,
            stderr_at,
            wait,
        } => Request::Read {
            id,
            proc: proc.to_string(),
            out_at: *stdout_at,
            err_at: *stderr_at,
            wait_ms: wait.as_millis().min(u128::from(u64::MAX)) as u64,
        },
        ProcessOp::Write { id: proc, data } => Request::Write {
            id,
            proc: proc.to_string(),
            data: data.clone(),
        },
        ProcessOp::Signal { id: proc, signal } => Request::Signal {
            id,
            proc: proc.to_string(),
            signal: signal.number(),
        },
        ProcessOp::Resize { id: proc, size } => Request::Resize {
            id,
            proc: proc.to_string(),
            rows: size.rows,
            cols: size.cols,
        },
        ProcessOp::Forget { id: proc } => Request::Forget {
            id,
            proc: proc.to_string(),
        },
    };
    request.encode()
}

fn kill_frame(id: &str, marker: &str) -> String {
    Request::Kill {
        id: id.to_owned(),
        marker: marker.to_owned(),
    }
    .encode()
}

/// The end of a kill's sweep, if it comes within `sweep`: true when none of
/// the call's processes is left.
async fn swept(killed: oneshot::Receiver<bool>, sweep: Duration) -> Result<bool, String> {
    match tokio::time::timeout(sweep, killed).await {
        Ok(Ok(all_gone)) => Ok(all_gone),
        _ => Err("the agent did not finish the kill".into()),
    }
}

/// The exec frame of `request` under `id`, built at `now_ms` by the host's
/// wall clock: the agent starts it only if it reads it by `now_ms` +
/// [`START_WINDOW`]. The agent shares that clock (the host kernel's), and
/// nothing the container says moves it.
fn exec_frame(id: &str, request: &ExecRequest, now_ms: u64, pipe: Option<&str>) -> String {
    Request::Exec(Exec {
        id: id.to_owned(),
        start_by_ms: now_ms.saturating_add(START_WINDOW.as_millis() as u64),
        timeout_ms: request.timeout.as_millis().try_into().unwrap_or(u64::MAX),
        env: request.env.clone(),
        command: request.command.clone(),
        stdin: request.stdin.clone().filter(|_| pipe.is_none()),
        pipe: pipe.map(str::to_owned),
    })
    .encode()
}

#[derive(Default)]
struct Slot {
    /// Serializes opening, so a burst of calls opens one connection.
    opening: tokio::sync::Mutex<()>,
    link: Mutex<Option<Arc<Link>>>,
    down_until: Mutex<Option<Instant>>,
    /// The container as last inspected, answered while the link lives.
    record: Mutex<Option<ContainerRecord>>,
    /// When a call last took the link (ms since the links were made).
    used: AtomicU64,
    /// Failed opens in a row.
    failures: std::sync::atomic::AtomicU32,
    /// Until when links open on the attach stream without offering a plane
    /// socket first (the agent did not take the last one).
    plane_down_until: Mutex<Option<Instant>>,
    /// The event stream's epoch + 1 when its agent last answered a ping
    /// and no event of it came since (0: not vouched).
    vouched: AtomicU64,
    /// Events of the container seen (each ends a vouch).
    events: AtomicU64,
}

/// The engine's event stream as this process follows it.
#[derive(Default)]
struct Events {
    started: AtomicBool,
    /// Subscribed, and no error since.
    healthy: AtomicBool,
    /// Counts subscriptions and losses: what was vouched for under an
    /// earlier epoch may have missed an event.
    epoch: AtomicU64,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// The engine's events that end a vouch: the container no longer runs
/// commands (`pause`), or no longer runs (`die`, `stop`, `destroy`).
const DISTRUSTING_EVENTS: [&str; 4] = ["pause", "die", "stop", "destroy"];
/// The pause before subscribing again after the event stream failed.
const EVENTS_RETRY: Duration = Duration::from_secs(1);

/// Follows the engine's events of containers whose agent serves, for as
/// long as `links` lives.
async fn follow_events(links: std::sync::Weak<AgentLinks>, docker: Docker) {
    use crate::dataplane::agent::{AGENT_LABEL, AGENT_SERVES};
    let filters: HashMap<&str, Vec<String>> = HashMap::from([
        ("type", vec!["container".to_owned()]),
        (
            "event",
            DISTRUSTING_EVENTS.iter().map(|e| (*e).to_owned()).collect(),
        ),
        ("label", vec![format!("{AGENT_LABEL}={AGENT_SERVES}")]),
    ]);
    loop {
        let Some(events) = links.upgrade().map(|l| l.events_handle()) else {
            return;
        };
        // From a second before subscribing: the engine replays what came
        // since, so nothing between this moment and the subscription's
        // taking effect is missed.
        let since = (unix_ms() / 1000).saturating_sub(1).to_string();
        let options = bollard::query_parameters::EventsOptionsBuilder::default()
            .since(&since)
            .filters(&filters)
            .build();
        let mut stream = docker.events(Some(options));
        events.epoch.fetch_add(1, Ordering::SeqCst);
        events.healthy.store(true, Ordering::SeqCst);
        let why = loop {
            match stream.next().await {
                Some(Ok(message)) => {
                    let Some(links) = links.upgrade() else {
                        return;
                    };
                    if let Some(actor) = message.actor {
                        let name = actor
                            .attributes
                            .as_ref()
                            .and_then(|a| a.get("name").cloned())
                            .unwrap_or_default();
                        let id = actor.id.unwrap_or_default();
                        links.distrust(&[&id, &name]);
                    }
                }
                Some(Err(e)) => break e.to_string(),
                None => break "the engine ended it".to_owned(),
            }
        };
        events.healthy.store(false, Ordering::SeqCst);
        events.epoch.fetch_add(1, Ordering::SeqCst);
        tracing::debug!(
            why,
            "the engine's event stream was lost: links ping until it is back"
        );
        tokio::time::sleep(EVENTS_RETRY).await;
    }
}

/// The links of one host process, by container id.
pub struct AgentLinks {
    slots: Mutex<HashMap<String, Arc<Slot>>>,
    /// Container names to the id they last named here (a lookup by name).
    names: Mutex<HashMap<String, String>>,
    events: Arc<Events>,
    lock_dir: Option<PathBuf>,
    /// The plane directories (none: every link is attached).
    planes: Option<super::plane::Planes>,
    epoch: Instant,
}

impl AgentLinks {
    /// Links whose attached writers lock files in `{state_dir}/links` and
    /// that offer plane sockets in `{state_dir}/plane` (none: every link is
    /// attached, and this process is the only writer it knows of).
    pub fn new(state_dir: Option<&std::path::Path>) -> Self {
        AgentLinks {
            slots: Mutex::default(),
            names: Mutex::default(),
            lock_dir: state_dir.map(|dir| dir.join("links")),
            planes: state_dir.map(super::plane::Planes::new),
            events: Arc::default(),
            epoch: Instant::now(),
        }
    }

    fn events_handle(&self) -> Arc<Events> {
        self.events.clone()
    }

    /// What the live link to `container` runs over, if one is open.
    pub fn transport(&self, container: &str) -> Option<Transport> {
        let slot = self.slots.lock().unwrap().get(container)?.clone();
        let link = slot.link.lock().unwrap().clone()?;
        link.shared.usable().then_some(link.transport)
    }

    fn slot(&self, container: &str) -> Arc<Slot> {
        let mut slots = self.slots.lock().unwrap();
        if slots.len() >= MAX_SLOTS && !slots.contains_key(container) {
            slots.retain(|_, s| s.link.lock().unwrap().is_some());
        }
        slots.entry(container.to_owned()).or_default().clone()
    }

    /// Closes the least recently used links past [`MAX_LINKS`].
    fn trim(&self) {
        let slots = self.slots.lock().unwrap();
        let mut open: Vec<&Arc<Slot>> = slots
            .values()
            .filter(|s| s.link.lock().unwrap().is_some())
            .collect();
        let most = max_links();
        if open.len() <= most {
            return;
        }
        open.sort_by_key(|s| s.used.load(Ordering::Relaxed));
        for slot in &open[..open.len() - most] {
            slot.link.lock().unwrap().take();
        }
    }

    /// Remembers an inspected container whose agent serves, so that while
    /// its link lives the per-exec check needs no engine call.
    pub fn remember(&self, record: &ContainerRecord) {
        *self.slot(&record.id).record.lock().unwrap() = Some(record.clone());
        let mut names = self.names.lock().unwrap();
        if names.len() >= MAX_SLOTS {
            names.clear();
        }
        names.insert(record.name.clone(), record.id.clone());
    }

    /// The container as last inspected, if it still runs by what this
    /// process knows without asking the engine: the per-exec check, moved
    /// off the engine. It runs while its link is open (a stopped or removed
    /// container ends its agent's connection) and the engine's event
    /// stream has said nothing of it (a pause, a stop, a death) since its
    /// agent last answered a ping on the link; otherwise a ping decides
    /// (and vouches again). `None`: ask the engine.
    ///
    /// An event arrives a moment after what it tells: a command sent in
    /// between is never run late (the agent refuses it past its start-by
    /// time) nor twice (an unacknowledged command is killed, and reported
    /// lost).
    pub async fn live(
        self: &Arc<Self>,
        docker: &Docker,
        container: &str,
    ) -> Option<ContainerRecord> {
        // By id, or by name (the container the name last named here).
        let slot = {
            let slots = self.slots.lock().unwrap();
            match slots.get(container) {
                Some(slot) => slot.clone(),
                None => {
                    let id = self.names.lock().unwrap().get(container).cloned()?;
                    slots.get(&id)?.clone()
                }
            }
        };
        let record = slot.record.lock().unwrap().clone()?;
        if record.id != container && record.name != container {
            return None;
        }
        let link = slot
            .link
            .lock()
            .unwrap()
            .clone()
            .filter(|l| l.shared.usable())?;
        self.watch_events(docker);
        let running = ContainerRecord {
            status: super::Status::Running,
            ..record
        };
        let epoch = self.events.epoch.load(Ordering::SeqCst);
        let healthy = self.events.healthy.load(Ordering::SeqCst);
        // A stopped container's agent closed its end of the plane: the
        // kernel says so at once, before the link's reader has run.
        if healthy && slot.vouched.load(Ordering::SeqCst) == epoch + 1 && link.peer_open() {
            return Some(running);
        }
        // The agent answering proves the container runs now (a paused one
        // cannot): from then on, the event stream vouches for it, unless
        // an event of it came in the meantime.
        let generation = slot.events.load(Ordering::SeqCst);
        link.ping(PROBE_TIMEOUT).await.ok()?;
        if healthy && slot.events.load(Ordering::SeqCst) == generation {
            slot.vouched.store(epoch + 1, Ordering::SeqCst);
        }
        Some(running)
    }

    /// Starts following the engine's events for containers whose agent
    /// serves, once per process (see [`AgentLinks::live`]).
    fn watch_events(self: &Arc<Self>, docker: &Docker) {
        if self.events.started.swap(true, Ordering::SeqCst) {
            return;
        }
        let task = tokio::spawn(follow_events(Arc::downgrade(self), docker.clone()));
        *self.events.task.lock().unwrap() = Some(task);
    }

    /// An event of the engine about `container` (id or name): whatever it
    /// says, the container is no longer vouched for.
    fn distrust(&self, keys: &[&str]) {
        let slots = self.slots.lock().unwrap();
        for key in keys {
            if let Some(slot) = slots.get(*key) {
                slot.events.fetch_add(1, Ordering::SeqCst);
                slot.vouched.store(0, Ordering::SeqCst);
            }
        }
    }

    /// Drops a removed container's link.
    pub fn forget(&self, container: &str) {
        self.slots.lock().unwrap().remove(container);
    }

    /// The live link to `container`, opening (and pinging) it if needed;
    /// `None` when no agent answers.
    async fn link(&self, docker: &Docker, container: &str) -> Option<Arc<Link>> {
        let slot = self.slot(container);
        let current = |slot: &Slot| {
            slot.link
                .lock()
                .unwrap()
                .clone()
                .filter(|l| l.shared.usable())
        };
        slot.used
            .store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
        if let Some(link) = current(&slot) {
            if link.transport == Transport::Attach {
                self.upgrade_later(&slot, container);
            }
            return Some(link);
        }
        let _opening = slot.opening.lock().await;
        if let Some(link) = current(&slot) {
            return Some(link);
        }
        if slot
            .down_until
            .lock()
            .unwrap()
            .is_some_and(|t| Instant::now() < t)
        {
            return None;
        }
        match self.open(docker, container, &slot).await {
            Ok(link) => {
                slot.failures.store(0, Ordering::Relaxed);
                *slot.link.lock().unwrap() = Some(link.clone());
                self.trim();
                Some(link)
            }
            Err(e) => {
                let down = opening_failed(docker, container, &slot, e);
                *slot.down_until.lock().unwrap() = Some(Instant::now() + down);
                // A link still attached (its agent went silent) stays until
                // one opens in its place: no call takes it, but its reader
                // goes on pacing what the container writes, so a flood stays
                // blocked in the container's own pipe instead of being
                // drained by the engine, which would do it on the host's CPU.
                let mut held = slot.link.lock().unwrap();
                if held
                    .as_ref()
                    .is_some_and(|l| !l.shared.alive.load(Ordering::SeqCst))
                {
                    *held = None;
                }
                None
            }
        }
    }

    /// A link whose agent answered a ping, in this host's protocol version:
    /// on the plane when the container has one (and its agent took the
    /// last socket offered), else on the attach stream.
    async fn open(
        &self,
        docker: &Docker,
        container: &str,
        slot: &Slot,
    ) -> Result<Arc<Link>, OpenError> {
        if let Some(dir) = self.plane_dir(docker, container, slot).await {
            match open_plane(container, &dir).await {
                Ok(link) => return Ok(link),
                Err(why) => {
                    tracing::warn!(
                        container,
                        why,
                        "no plane link: this process's link goes through the engine's attach \
                         stream for a while"
                    );
                    *slot.plane_down_until.lock().unwrap() = Some(Instant::now() + PLANE_REST);
                }
            }
        }
        self.open_attached(docker, container).await
    }

    /// The plane directory of `container` (in `slot`), when it has one and
    /// the plane is not resting. Its name and labels are the last
    /// inspection's, or the engine's now (once per link opened).
    async fn plane_dir(&self, docker: &Docker, container: &str, slot: &Slot) -> Option<PathBuf> {
        let planes = self.planes.as_ref()?;
        if slot
            .plane_down_until
            .lock()
            .unwrap()
            .is_some_and(|t| Instant::now() < t)
        {
            return None;
        }
        let known = slot
            .record
            .lock()
            .unwrap()
            .as_ref()
            .map(|r| (r.name.clone(), r.labels.clone()));
        let (name, labels) = match known {
            Some(known) => known,
            None => {
                let inspected =
                    tokio::time::timeout(ACK_TIMEOUT, docker.inspect_container(container, None))
                        .await
                        .ok()?
                        .ok()?;
                let name = inspected.name?.trim_start_matches('/').to_owned();
                (name, inspected.config?.labels?)
            }
        };
        planes.dir(&name, labels.get(super::plane::PLANE_LABEL)?)
    }

    /// Offers the agent of the container in `slot` a plane socket again, in
    /// the background, once the rest after a failed offer is over; its
    /// link moves there when it connects (calls in flight on the attached
    /// link finish on it).
    fn upgrade_later(&self, slot: &Arc<Slot>, container: &str) {
        let Some(planes) = &self.planes else {
            return;
        };
        let dir = {
            let mut down = slot.plane_down_until.lock().unwrap();
            // Only a container whose plane failed before has a rest set.
            if !down.is_some_and(|t| Instant::now() >= t) {
                return;
            }
            let record = slot.record.lock().unwrap();
            let Some(dir) = record
                .as_ref()
                .and_then(|r| planes.dir(&r.name, r.labels.get(super::plane::PLANE_LABEL)?))
            else {
                return;
            };
            *down = Some(Instant::now() + PLANE_REST);
            dir
        };
        let (slot, container) = (slot.clone(), container.to_owned());
        tokio::spawn(async move {
            match open_plane(&container, &dir).await {
                Ok(link) => {
                    *slot.link.lock().unwrap() = Some(link);
                    *slot.plane_down_until.lock().unwrap() = None;
                    tracing::debug!(container, "the agent link moved to the plane");
                }
                Err(why) => tracing::debug!(container, why, "the plane is still refused"),
            }
        });
    }
}

/// A link on a socket offered in `dir`, once the agent connected and
/// answered a ping.
async fn open_plane(container: &str, dir: &std::path::Path) -> Result<Arc<Link>, String> {
    let stream = super::plane::rendezvous(dir, ACK_TIMEOUT).await?;
    let fd = std::os::fd::AsRawFd::as_raw_fd(&stream);
    let (read, write) = stream.into_split();
    let link = Link::start(
        container,
        Box::pin(write),
        Box::pin(super::plane::output_of(read)),
        // Nobody else writes on this socket: no lock.
        None,
        FloodBudget::new(FLOOD_RATE, FLOOD_BURST, Instant::now()),
        Transport::Plane,
    );
    let _ = link.plane.set(dir.to_owned());
    let _ = link.socket.set(fd);
    link.handshake().await.map_err(|e| match e {
        OpenError::Version(theirs) => format!("the agent speaks protocol version {theirs}"),
        OpenError::Attach(why) | OpenError::Silent(why) => why,
    })?;
    Ok(link)
}

impl AgentLinks {
    /// A link on the container's attach stream.
    async fn open_attached(
        &self,
        docker: &Docker,
        container: &str,
    ) -> Result<Arc<Link>, OpenError> {
        let options = AttachContainerOptionsBuilder::default()
            .stdin(true)
            .stdout(true)
            .stderr(true)
            .stream(true)
            .logs(false)
            .build();
        let attached = tokio::time::timeout(
            ACK_TIMEOUT,
            docker.attach_container(container, Some(options)),
        )
        .await
        .map_err(|_| OpenError::Attach("attaching timed out".to_owned()))?
        .map_err(|e| OpenError::Attach(format!("attaching: {e}")))?;
        let link = Link::start(
            container,
            attached.input,
            attached.output,
            self.lock_dir.clone(),
            FloodBudget::new(FLOOD_RATE, FLOOD_BURST, Instant::now()),
            Transport::Attach,
        );
        link.handshake().await?;
        Ok(link)
    }

    /// Kills every process of the call marked `marker` through the live link
    /// to `container` (none is opened for it); true when none is left.
    pub async fn kill(&self, container: &str, marker: &str) -> Result<bool, String> {
        let link = self
            .slots
            .lock()
            .unwrap()
            .get(container)
            .and_then(|s| s.link.lock().unwrap().clone())
            .filter(|l| l.shared.usable())
            .ok_or("no live agent link")?;
        link.kill(marker, ACK_TIMEOUT, KILL_WAIT).await
    }

    /// Carries out `op` through the agent of `container`.
    pub async fn process(
        &self,
        docker: &Docker,
        container: &str,
        op: &ProcessOp,
    ) -> Result<(ProcessAnswer, DoneStatus), LinkError> {
        let link = self
            .link(docker, container)
            .await
            .ok_or(LinkError::Unavailable)?;
        link.process(op).await
    }

    /// The live plane link to `container`, opening one if needed; `None`
    /// when it would not be on the plane.
    async fn plane_link(&self, docker: &Docker, container: &str) -> Option<Arc<Link>> {
        self.link(docker, container)
            .await
            .filter(|l| l.transport == Transport::Plane)
    }

    /// Runs `request` through the agent of `container` with its stdin and
    /// stdout on a pipe of their own; `Unavailable` unless its link is on
    /// the plane.
    pub async fn exec_piped<'d>(
        &self,
        docker: &Docker,
        container: &str,
        request: &ExecRequest,
        stdin: Option<&mut (dyn tokio::io::AsyncRead + Send + Unpin)>,
        stdout: Option<&mut (dyn AsyncWrite + Send + Unpin)>,
        sink: Option<Sink<'_, 'd>>,
    ) -> Result<LinkOutcome, LinkError> {
        let link = self
            .plane_link(docker, container)
            .await
            .ok_or(LinkError::Unavailable)?;
        link.exec_piped(request, stdin, stdout, sink).await
    }

    /// A connection to `port` in `container`, on the plane.
    pub async fn port(
        &self,
        docker: &Docker,
        container: &str,
        port: u16,
    ) -> Result<tokio::net::UnixStream, PortError> {
        let link = self
            .plane_link(docker, container)
            .await
            .ok_or_else(|| PortError::Unavailable("no plane link".into()))?;
        link.port(port).await
    }

    /// Runs `request` through the agent of `container`.
    pub async fn exec<'d>(
        &self,
        docker: &Docker,
        container: &str,
        request: &ExecRequest,
        sink: Option<Sink<'_, 'd>>,
    ) -> Result<LinkOutcome, LinkError> {
        let link = self
            .link(docker, container)
            .await
            .ok_or(LinkError::Unavailable)?;
        link.exec(request, sink).await
    }
}

/// How many links this process holds open at once: half its file
/// descriptors (each link takes one, and a plane link's rendezvous one
/// more for a moment), at least [`MIN_LINKS`]. Raised to the hard limit
/// at start (`raise_file_limit`), so that a live user costs no reopening
/// until the machine's own bound.
fn max_links() -> usize {
    static MOST: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *MOST.get_or_init(|| {
        let soft = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
            .map_or(0, |(soft, _)| soft);
        (usize::try_from(soft).unwrap_or(usize::MAX) / 2).max(MIN_LINKS)
    })
}

/// Raises this process's soft limit on open files to its hard limit (one
/// per live link, one per connection served). Best effort.
pub fn raise_file_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
        }
    }
}

impl Drop for AgentLinks {
    fn drop(&mut self) {
        if let Some(task) = self.events.task.lock().unwrap().take() {
            task.abort();
        }
    }
}

/// Why no link opened.
enum OpenError {
    /// Attaching failed (or the ping could not be written): no agent was
    /// reached.
    Attach(String),
    /// Attached, but the agent did not answer the ping.
    Silent(String),
    /// The agent answered in this other protocol version.
    Version(u32),
}

/// Logs a failed open; how long the container's executes now go through
/// `docker exec`. An agent that is attached but silent [`RESPAWN_AFTER`]
/// times in a row is restarted; one of another protocol version is left as
/// it is (a restart runs the same binary) and tried again after the longest
/// rest.
fn opening_failed(docker: &Docker, container: &str, slot: &Slot, e: OpenError) -> Duration {
    let (attached, why) = match e {
        OpenError::Version(theirs) => {
            tracing::debug!(
                container,
                agent_version = theirs,
                host_version = PROTOCOL_VERSION,
                down_secs = MAX_DOWN_FOR.as_secs(),
                "the sandbox agent speaks another protocol version: executes go through docker exec"
            );
            return MAX_DOWN_FOR;
        }
        OpenError::Attach(why) => (false, why),
        OpenError::Silent(why) => (true, why),
    };
    let failures = slot.failures.fetch_add(1, Ordering::Relaxed) + 1;
    let down = DOWN_FOR
        .saturating_mul(1 << (failures - 1).min(5))
        .min(MAX_DOWN_FOR);
    tracing::warn!(
        container,
        why,
        failures,
        down_secs = down.as_secs(),
        "no agent link: executes go through docker exec"
    );
    if attached && failures == RESPAWN_AFTER {
        respawn(docker, container);
    }
    down
}

/// Restarts `serve` in `container` (`sandbox-agent respawn` through `docker
/// exec`, in the background): attached, yet it answers nothing, and `init`
/// starts a fresh one once this ends the stuck one.
fn respawn(docker: &Docker, container: &str) {
    tracing::warn!(container, "restarting the agent's serve process");
    let (docker, container) = (docker.clone(), container.to_owned());
    tokio::spawn(async move {
        let argv = vec![AGENT_MOUNT.to_owned(), "respawn".to_owned()];
        // As root: serve is, and the workload's user may not end it.
        let respawned = super::docker::exec_to_end(&docker, &container, Some("0:0"), argv);
        let _ = tokio::time::timeout(RESPAWN_TIMEOUT, respawned).await;
    });
}

/// Why a frame went unanswered.
#[derive(Debug)]
enum Unanswered {
    /// It never left whole.
    NotSent(String),
    /// It was written; the agent may have acted on it.
    Silent(String),
}

impl Unanswered {
    fn why(&self) -> &str {
        match self {
            Unanswered::NotSent(why) | Unanswered::Silent(why) => why,
        }
    }
}

/// An answer awaited under `id`, forgotten however the wait ends.
struct Pending<'a, T> {
    map: &'a Mutex<HashMap<String, T>>,
    id: String,
}

impl<'a, T> Pending<'a, T> {
    fn new(map: &'a Mutex<HashMap<String, T>>, id: &str, tx: T) -> Self {
        map.lock().unwrap().insert(id.to_owned(), tx);
        Pending {
            map,
            id: id.to_owned(),
        }
    }
}

impl<T> Drop for Pending<'_, T> {
    fn drop(&mut self) {
        self.map.lock().unwrap().remove(&self.id);
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Whether `request` fits one request line (else it goes through the engine).
pub fn fits(request: &ExecRequest) -> bool {
    let env: usize = request.env.iter().map(|e| e.len() + 1).sum();
    let payload = env + request.command.len() + request.stdin.as_ref().map_or(0, Vec::len);
    request
        .stdin
        .as_ref()
        .is_none_or(|s| s.len() <= sandbox_agent::protocol::MAX_INLINE_STDIN)
        && payload.div_ceil(3) * 4 + 256 <= sandbox_agent::protocol::MAX_REQUEST_LINE
        && request.timeout.as_millis() < 1_000_000_000_000_000
}

/// Removes a call's channel when the call ends or is dropped.
struct Unregister<'a>(&'a Shared, &'a str);

impl Drop for Unregister<'_> {
    fn drop(&mut self) {
        self.0.calls.lock().unwrap().remove(self.1);
    }
}

/// Whether the locked `file` is still the one at `path`.
fn still_at(file: &std::fs::File, path: &std::path::Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), std::fs::symlink_metadata(path)) {
        (Ok(held), Ok(named)) => held.ino() == named.ino() && held.dev() == named.dev(),
        _ => false,
    }
}

/// Reads reply lines until the stream ends or carries anything but frames.
/// Replies that answer nothing the host awaits are charged to `budget`, and
/// reading pauses while it is spent.
async fn read_replies(
    container: String,
    shared: Arc<Shared>,
    mut output: Output,
    mut budget: FloodBudget,
) {
    let mut pending: Vec<u8> = Vec::new();
    let why = loop {
        let chunk = match output.next().await {
            Some(Ok(LogOutput::StdOut { message })) => message,
            // The agent writes nothing to stderr; whatever else does is
            // not a reply, and is dropped (a chunk costs a token).
            Some(Ok(_)) => {
                throttle(&container, &mut budget).await;
                continue;
            }
            Some(Err(e)) => break format!("the link failed: {e}"),
            None => break "the link ended (the agent or its container stopped)".to_owned(),
        };
        pending.extend_from_slice(&chunk);
        let mut used = 0;
        let mut garbled = None;
        while let Some(at) = pending[used..].iter().position(|&b| b == b'\n') {
            let line = &pending[used..used + at];
            used += at + 1;
            match Reply::parse(line) {
                Ok(reply) => {
                    if !dispatch(&shared, reply).await {
                        throttle(&container, &mut budget).await;
                    }
                }
                // Another version's hello or pong: nothing more it says is
                // read, and nothing more is sent to it.
                Err(ParseError::Version(theirs)) => {
                    shared.skewed(&container, theirs);
                    return;
                }
                // Garbage ends the link at once: it costs no more than
                // one line, and needs no budget.
                Err(e @ ParseError::Bad(_)) => {
                    garbled = Some(format!("a garbled reply ({e})"));
                    break;
                }
            }
        }
        pending.drain(..used);
        if let Some(why) = garbled {
            break why;
        }
        if pending.len() > MAX_REPLY_LINE {
            break "a reply line past the bound".to_owned();
        }
    };
    shared.fail(&container, &why);
}

/// Charges one unsolicited reply (or stray chunk) to `budget`; when it is
/// spent, pauses the reader (so the container's writer blocks), logging
/// now and then.
async fn throttle(container: &str, budget: &mut FloodBudget) {
    let now = Instant::now();
    let Some(pause) = budget.charge(now) else {
        return;
    };
    if let Some(throttled) = budget.note(now) {
        tracing::debug!(
            container,
            throttled,
            pause_ms = pause.as_millis() as u64,
            "the sandbox agent's link carries replies nobody awaits: reading it is throttled"
        );
    }
    tokio::time::sleep(pause).await;
}

/// Hands `reply` to whoever awaits it: true when someone did (an awaited
/// pong, acknowledgement or kill, or output or exit of a call in flight),
/// false when it answers nothing (a hello, a `bad`, an unknown id, a
/// duplicate): only those are charged to the flood budget.
async fn dispatch(shared: &Shared, reply: Reply) -> bool {
    match reply {
        Reply::Hello { boot } => {
            let mut known = shared.boot.lock().unwrap();
            if known.as_ref().is_some_and(|b| *b != boot) {
                drop(known);
                shared.lose_calls("the sandbox agent restarted during the command");
                *shared.boot.lock().unwrap() = Some(boot);
            } else {
                *known = Some(boot);
            }
            false
        }
        Reply::Pong {
            nonce,
            boot,
            now_ms,
        } => answer(&shared.pongs, &nonce, (boot, now_ms)),
        Reply::Ack { id } => answer(&shared.acks, &id, true),
        Reply::Stale { id } => answer(&shared.acks, &id, false),
        Reply::Stdout { id, data } => {
            deliver(shared, &id, Event::Output(StreamKind::Stdout, data)).await
        }
        Reply::Stderr { id, data } => {
            deliver(shared, &id, Event::Output(StreamKind::Stderr, data)).await
        }
        Reply::Exit {
            id,
            code,
            oom_kills,
            background_killed,
        } => {
            let event = Event::Exit(code, oom_kills, background_killed);
            let awaited = deliver(shared, &id, event).await;
            shared.calls.lock().unwrap().remove(&id);
            awaited
        }
        Reply::Killed { id, all_gone } => answer(&shared.kills, &id, all_gone),
        Reply::Proc { id, info } => deliver(shared, &id, Event::Proc(info)).await,
        Reply::Chunk {
            id,
            stderr,
            at,
            data,
        } => {
            let stream = if stderr {
                StreamKind::Stderr
            } else {
                StreamKind::Stdout
            };
            deliver(shared, &id, Event::Chunk(stream, at, data)).await
        }
        Reply::Done { id, status } => {
            let awaited = deliver(shared, &id, Event::Done(status)).await;
            shared.calls.lock().unwrap().remove(&id);
            awaited
        }
        Reply::Bad { reason } => {
            tracing::debug!(reason, "the agent refused a frame");
            false
        }
    }
}

/// Sends `value` to whoever awaits `id` in `waiting`: whether anyone did.
fn answer<T>(waiting: &Mutex<HashMap<String, oneshot::Sender<T>>>, id: &str, value: T) -> bool {
    let Some(tx) = waiting.lock().unwrap().remove(id) else {
        return false;
    };
    let _ = tx.send(value);
    true
}

/// Hands an event to its call (frames of other host processes' calls, or
/// of calls gone, are dropped: false); waits while the call's buffer is
/// full.
async fn deliver(shared: &Shared, id: &str, event: Event) -> bool {
    let tx = shared.calls.lock().unwrap().get(id).cloned();
    let Some(tx) = tx else {
        return false;
    };
    let _ = tx.send(event).await;
    true
}

/// A token bucket for the replies of one link that answer nothing the host
/// awaits: `rate` a second, `burst` at once. Those are the container's
/// doing alone (a buggy agent, a workload writing into its stdout, or the
/// replies to another host process attached to the same container), and
/// reading them costs the host a share of a core outside the container's
/// CPU limit; past the budget, the reader pauses. The clock is the
/// caller's (`now`), so the bucket is a plain value.
struct FloodBudget {
    /// Tokens a second.
    rate: f64,
    burst: f64,
    /// May go below zero by the reply that found the bucket empty.
    tokens: f64,
    /// When `tokens` was last brought up to date.
    at: Instant,
    /// When a pause was last logged, and pauses since then.
    logged: Option<Instant>,
    throttled: u64,
}

impl FloodBudget {
    /// A full bucket at `now`.
    fn new(rate: u32, burst: u32, now: Instant) -> Self {
        let rate = f64::from(rate.max(1));
        let burst = f64::from(burst.max(1));
        FloodBudget {
            rate,
            burst,
            tokens: burst,
            at: now,
            logged: None,
            throttled: 0,
        }
    }

    /// Charges one reply read at `now`: `None` while tokens last, else how
    /// long the reader pauses before it reads on. The pause lasts until a
    /// batch of tokens (a twentieth of a second's worth) is back, so a
    /// flood wakes the reader about 20 times a second, not once a reply;
    /// it is at most [`MAX_FLOOD_PAUSE`].
    fn charge(&mut self, now: Instant) -> Option<Duration> {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.at = self.at.max(now);
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst) - 1.0;
        if self.tokens >= 0.0 {
            return None;
        }
        // Never more debt than one burst, however the pauses were cut.
        self.tokens = self.tokens.max(-self.burst);
        self.throttled += 1;
        let resume = (self.rate / 20.0).clamp(1.0, self.burst);
        let wait = (resume - self.tokens) / self.rate;
        Some(Duration::from_secs_f64(wait).min(MAX_FLOOD_PAUSE))
    }

    /// Whether to log a pause at `now` ([`FLOOD_LOG_EVERY`] at most): the
    /// pauses since the last line.
    fn note(&mut self, now: Instant) -> Option<u64> {
        if self
            .logged
            .is_some_and(|t| now.saturating_duration_since(t) < FLOOD_LOG_EVERY)
        {
            return None;
        }
        self.logged = Some(now);
        Some(std::mem::take(&mut self.throttled))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncBufReadExt;

    /// What a fake agent does with an exec.
    #[derive(Clone, Copy, PartialEq)]
    enum OnExec {
        /// Acknowledges it and exits 0 at once.
        Run,
        /// Says nothing (a stopped agent).
        Ignore,
    }

    /// A link to an in-memory agent that answers pings with a clock
    /// `offset_ms` away from the host's (a forged pong, say), and execs as
    /// `on_exec` says; every request it reads is sent to the receiver.
    fn fake_link(
        offset_ms: i64,
        on_exec: OnExec,
        budget: FloodBudget,
    ) -> (Arc<Link>, mpsc::UnboundedReceiver<Request>) {
        let (host_end, agent_end) = tokio::io::duplex(1 << 20);
        let (replies, rx) = mpsc::channel::<Result<LogOutput, bollard::errors::Error>>(64);
        let output = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        });
        let link = Link::start(
            "fake",
            Box::pin(host_end),
            Box::pin(output),
            None,
            budget,
            Transport::Attach,
        );
        let (seen_tx, seen) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut lines = tokio::io::BufReader::new(agent_end).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if line.is_empty() {
                    continue;
                }
                let request = Request::parse(line.as_bytes()).expect("a well-formed frame");
                let answers = match &request {
                    Request::Ping { nonce } => vec![Reply::Pong {
                        nonce: nonce.clone(),
                        boot: "boot".into(),
                        now_ms: (unix_ms() as i64 + offset_ms) as u64,
                    }],
                    Request::Exec(exec) if on_exec == OnExec::Run => vec![
                        Reply::Ack {
                            id: exec.id.clone(),
                        },
                        Reply::Exit {
                            id: exec.id.clone(),
                            code: 0,
                            oom_kills: 0,
                            background_killed: 0,
                        },
                    ],
                    Request::Exec(_) => vec![],
                    Request::Kill { id, .. } => vec![
                        Reply::Ack { id: id.clone() },
                        Reply::Killed {
                            id: id.clone(),
                            all_gone: true,
                        },
                    ],
                    other => vec![
                        Reply::Ack {
                            id: other.id().to_owned(),
                        },
                        Reply::Done {
                            id: other.id().to_owned(),
                            status: DoneStatus::Ok,
                        },
                    ],
                };
                let _ = seen_tx.send(request);
                for reply in answers {
                    let message = reply.encode().into_bytes().into();
                    if replies
                        .send(Ok(LogOutput::StdOut { message }))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            }
        });
        (link, seen)
    }

    fn budget() -> FloodBudget {
        FloodBudget::new(FLOOD_RATE, FLOOD_BURST, Instant::now())
    }

    fn request(marker: &str) -> ExecRequest {
        ExecRequest {
            command: "true".into(),
            output_limit: 1 << 16,
            timeout: Duration::from_secs(5),
            env: vec![format!(
                "{}={marker}",
                sandbox_agent::protocol::EXEC_MARKER_VAR
            )],
            workdir: "/workspace".into(),
            stdin: None,
            marker: marker.into(),
            user: None,
            idle_timeout: false,
            agent: true,
            agent_serves: true,
        }
    }

    fn frame_id(request: &Request) -> &str {
        request.id()
    }

    /// Each link counts its own frames under its own random prefix: what
    /// one container sees says nothing of another's traffic, and a link
    /// opened again starts afresh.
    #[test]
    fn frame_ids_are_per_link() {
        let (a, b) = (FrameIds::new(), FrameIds::new());
        assert_ne!(a.prefix, b.prefix);
        assert_eq!(a.prefix.len(), 16);
        for _ in 0..42 {
            b.next();
        }
        assert_eq!(a.next(), format!("{}-0", a.prefix));
        assert_eq!(a.next(), format!("{}-1", a.prefix));
        assert_eq!(b.next(), format!("{}-42", b.prefix));
        let reopened = FrameIds::new();
        assert_ne!(reopened.prefix, a.prefix);
        assert_eq!(reopened.next(), format!("{}-0", reopened.prefix));
    }

    /// The same through two links: pings, execs and kills of link A take
    /// their ids from A alone, however busy link B is.
    #[tokio::test]
    async fn two_links_have_independent_ids() {
        let (a, mut seen_a) = fake_link(0, OnExec::Run, budget());
        let (b, mut seen_b) = fake_link(0, OnExec::Run, budget());
        for n in 0..20 {
            b.ping(ACK_TIMEOUT).await.unwrap();
            let marker = format!("marker-b-{n}");
            assert!(matches!(
                b.exec(&request(&marker), None).await,
                Ok(LinkOutcome::Done(_))
            ));
        }
        a.handshake().await.unwrap_or_else(|_| panic!("a answers"));
        assert!(matches!(
            a.exec(&request("marker-a-0"), None).await,
            Ok(LinkOutcome::Done(_))
        ));
        assert_eq!(a.kill("marker-a-0", ACK_TIMEOUT, KILL_WAIT).await, Ok(true));
        let mut ids = Vec::new();
        while let Ok(r) = seen_a.try_recv() {
            ids.push(frame_id(&r).to_owned());
        }
        let p = &a.ids.prefix;
        assert_eq!(ids, [format!("{p}-0"), format!("{p}-1"), format!("{p}-2")]);
        let mut last_b = String::new();
        while let Ok(r) = seen_b.try_recv() {
            let id = frame_id(&r);
            assert!(!id.starts_with(p.as_str()), "{id}");
            last_b = id.to_owned();
        }
        assert_eq!(last_b, format!("{}-39", b.ids.prefix));
        assert_ne!(a.ids.prefix, b.ids.prefix);
    }

    /// A pong with a clock 10^8 ms ahead (a forged one) moves nothing: the
    /// start-by time is the host's clock now plus the window.
    #[tokio::test]
    async fn the_start_by_time_ignores_the_agents_clock() {
        for offset_ms in [100_000_000, -100_000_000] {
            let (link, mut seen) = fake_link(offset_ms, OnExec::Run, budget());
            link.handshake()
                .await
                .unwrap_or_else(|_| panic!("the agent answers"));
            let window = START_WINDOW.as_millis() as u64;
            let before = unix_ms();
            assert!(matches!(
                link.exec(&request("start-by-marker"), None).await,
                Ok(LinkOutcome::Done(_))
            ));
            let after = unix_ms();
            let exec = loop {
                match seen.recv().await.unwrap() {
                    Request::Exec(exec) => break exec,
                    _ => continue,
                }
            };
            assert!(
                before + window <= exec.start_by_ms && exec.start_by_ms <= after + window,
                "start-by {} not in [{before}, {after}] + {window}",
                exec.start_by_ms
            );
        }
        // And the frame alone: built at `now`, to be started by now + window.
        let frame = exec_frame("x-1", &request("frame-marker"), 1_000, None);
        let Ok(Request::Exec(exec)) = Request::parse(frame.trim().as_bytes()) else {
            panic!("{frame:?}");
        };
        assert_eq!(exec.start_by_ms, 1_000 + START_WINDOW.as_millis() as u64);
    }

    /// An exec the agent never acknowledges is reported lost (never run
    /// again), and a kill of its marker follows it on the link at once.
    #[tokio::test]
    async fn an_unacknowledged_exec_is_lost_and_killed() {
        let (link, mut seen) = fake_link(0, OnExec::Ignore, budget());
        link.handshake()
            .await
            .unwrap_or_else(|_| panic!("the agent answers"));
        let started = std::time::Instant::now();
        let outcome = link.exec(&request("silent-marker"), None).await;
        let Err(LinkError::Lost(why)) = outcome else {
            panic!("not lost");
        };
        assert!(why.contains("not run again"), "{why}");
        assert!(started.elapsed() < START_WINDOW + ACK_SLACK + Duration::from_secs(2));
        assert!(!link.shared.usable());
        let mut after_exec = Vec::new();
        while let Ok(r) = seen.try_recv() {
            if matches!(r, Request::Exec(_)) || !after_exec.is_empty() {
                after_exec.push(r);
            }
        }
        assert!(
            matches!(
                after_exec.as_slice(),
                [Request::Exec(_), Request::Kill { marker, .. }] if marker == "silent-marker"
            ),
            "{after_exec:?}"
        );
    }

    /// The bucket alone, on an injected clock: a burst, then the rate,
    /// whatever the flood; an idle link refills up to the burst only.
    #[test]
    fn the_flood_budget_allows_a_burst_then_the_rate() {
        let t0 = Instant::now();
        let mut b = FloodBudget::new(200, 1000, t0);
        for n in 0..1000 {
            assert_eq!(b.charge(t0), None, "reply {n} is within the burst");
        }
        let pause = b.charge(t0).expect("the bucket is spent");
        assert!(pause > Duration::ZERO && pause <= Duration::from_millis(100));
        // A reader that pauses as told reads at the rate, over 10 s.
        let mut now = t0 + pause;
        let mut read = 0u64;
        while now < t0 + pause + Duration::from_secs(10) {
            read += 1;
            if let Some(pause) = b.charge(now) {
                assert!(pause <= MAX_FLOOD_PAUSE);
                now += pause;
            }
        }
        assert!((1990..=2030).contains(&read), "{read} replies in 10 s");
        // An hour idle refills the burst, not more.
        let later = now + Duration::from_secs(3600);
        let mut free = 0;
        while b.charge(later).is_none() {
            free += 1;
        }
        assert_eq!(free, 1000);
        // A slow rate pauses at most MAX_FLOOD_PAUSE at a time.
        let mut slow = FloodBudget::new(1, 1, t0);
        assert_eq!(slow.charge(t0), None);
        assert_eq!(slow.charge(t0), Some(MAX_FLOOD_PAUSE));
    }

    #[test]
    fn a_throttled_link_is_logged_now_and_then() {
        let t0 = Instant::now();
        let mut b = FloodBudget::new(10, 1, t0);
        assert_eq!(b.charge(t0), None);
        assert!(b.charge(t0).is_some());
        assert_eq!(b.note(t0), Some(1));
        assert!(b.charge(t0).is_some());
        assert!(b.charge(t0 + Duration::from_millis(50)).is_some());
        assert_eq!(b.note(t0 + Duration::from_secs(5)), None);
        assert_eq!(b.note(t0 + FLOOD_LOG_EVERY), Some(2));
    }

    /// The reader itself: a flood of replies nobody awaits is read at the
    /// budget's pace (the writer blocks), while answers to the host's own
    /// requests in between cost nothing and still get through.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_reply_flood_is_throttled_but_answers_get_through() {
        let (rate, burst) = (100, 20);
        let (replies, rx) = mpsc::channel::<Result<LogOutput, bollard::errors::Error>>(1);
        let output = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        });
        let link = Link::start(
            "flood",
            Box::pin(tokio::io::sink()),
            Box::pin(output),
            None,
            FloodBudget::new(rate, burst, Instant::now()),
            Transport::Attach,
        );
        let (call_tx, mut call_rx) = mpsc::channel(100_000);
        link.shared
            .calls
            .lock()
            .unwrap()
            .insert("call-1".into(), call_tx);
        let send = |line: &str| {
            let replies = replies.clone();
            let message = format!("{line}\n").into_bytes().into();
            async move {
                replies
                    .send(Ok(LogOutput::StdOut { message }))
                    .await
                    .unwrap()
            }
        };
        let output_line = "out call-1 AAAA";

        // The burst of junk, then 1000 outputs of the call in flight: had
        // they been charged, 10 s at this rate.
        let t = std::time::Instant::now();
        for _ in 0..burst {
            send("ack zz").await;
        }
        for _ in 0..1000 {
            send(output_line).await;
        }
        for _ in 0..1000 {
            assert!(matches!(call_rx.recv().await, Some(Event::Output(..))));
        }
        assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());

        // 200 more junk replies with 20 outputs among them: the junk is
        // read at about 100 a second, so writing it takes about 2 s...
        let t = std::time::Instant::now();
        for n in 0..200 {
            send(if n % 3 == 0 {
                "exit zz 0 0 0"
            } else {
                "ack zz"
            })
            .await;
            if n % 10 == 0 {
                send(output_line).await;
            }
        }
        let flood = t.elapsed();
        assert!(flood >= Duration::from_millis(1500), "{flood:?}");
        // ...and every output in it arrived.
        for _ in 0..20 {
            assert!(matches!(call_rx.recv().await, Some(Event::Output(..))));
        }
        // An awaited acknowledgement right after the flood gets through.
        let (ack_tx, ack_rx) = oneshot::channel();
        let _ack = Pending::new(&link.shared.acks, "call-2", ack_tx);
        let t = std::time::Instant::now();
        send("ack call-2").await;
        assert_eq!(
            tokio::time::timeout(Duration::from_secs(2), ack_rx).await,
            Ok(Ok(true))
        );
        assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
        assert!(link.shared.usable(), "a flood does not close the link");
    }
}

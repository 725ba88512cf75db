//! The host's end of `sandbox-agent serve`: executes without a `docker exec`.
//!
//! One attach connection per container and host process carries the
//! [`sandbox_agent::protocol`] lines to the agent (the container's main
//! process) and back. The attach stream has no path a container could
//! redirect, and the container's log driver is `none`, so no output is
//! written to disk.
//!
//! The agent runs as the sandbox user, so everything it says is untrusted:
//! replies are bounded and parsed strictly, a garbled one closes this
//! container's link (its calls in flight fail; later ones reopen it), and
//! in-flight state and last use stay with the host's own usage store.
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

use std::collections::HashMap;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bollard::container::LogOutput;
use bollard::exec::StartExecResults;
use bollard::models::ExecConfig;
use bollard::query_parameters::AttachContainerOptionsBuilder;
use bollard::Docker;
use futures_util::{Stream, StreamExt};
use sandbox_agent::protocol::{
    Exec, ParseError, Reply, Request, AGENT_MOUNT, EXIT_TIMED_OUT, MAX_REPLY_LINE, PROTOCOL_VERSION,
};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::ContainerRecord;
use crate::dataplane::exec::{
    ExecOutput, ExecRequest, ExecResponse, StreamKind, AGENT_GRACE, TIMEOUT_EXIT_CODE,
};

/// How long the agent has to acknowledge a frame (or answer a ping).
const ACK_TIMEOUT: Duration = Duration::from_secs(3);
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
/// Links held open at once per host process (each is a connection to the
/// engine and a file descriptor); past it the least recently used closes.
const MAX_LINKS: usize = 256;
/// Containers remembered (a record each) before those without a link go.
const MAX_SLOTS: usize = 4096;
/// Output frames buffered per call before the reader waits for the caller.
const CALL_BUFFER: usize = 16;

/// An output callback, reborrowed for one call (`OutputSink` ties both
/// lifetimes together).
pub(super) type Sink<'s, 'd> = &'s mut (dyn FnMut(StreamKind, &[u8]) + Send + 'd);

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
    Exit(u8),
}

/// What the reader task and the callers share.
#[derive(Default)]
struct Shared {
    alive: AtomicBool,
    /// A frame went unanswered.
    silent: AtomicBool,
    /// Answers to frames: true when taken, false when refused as stale.
    acks: Mutex<HashMap<String, oneshot::Sender<bool>>>,
    /// Pongs: the agent's boot id and clock.
    pongs: Mutex<HashMap<String, oneshot::Sender<(String, u64)>>>,
    kills: Mutex<HashMap<String, oneshot::Sender<bool>>>,
    calls: Mutex<HashMap<String, mpsc::Sender<Event>>>,
    boot: Mutex<Option<String>>,
    /// The agent's clock minus ours, in ms (from the opening ping).
    offset_ms: std::sync::atomic::AtomicI64,
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

struct Link {
    shared: Arc<Shared>,
    input: tokio::sync::Mutex<Pin<Box<dyn AsyncWrite + Send>>>,
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for Link {
    fn drop(&mut self) {
        self.reader.abort();
    }
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
}

/// The links of one host process, by container id.
pub struct AgentLinks {
    slots: Mutex<HashMap<String, Arc<Slot>>>,
    lock_dir: Option<PathBuf>,
    /// Frame ids are `PREFIX-N`: other host processes' frames are not ours.
    prefix: String,
    counter: AtomicU64,
    epoch: Instant,
}

impl AgentLinks {
    /// Links whose writers lock files in `lock_dir` (the host's state
    /// directory; none: this process is the only writer it knows of).
    pub fn new(lock_dir: Option<PathBuf>) -> Self {
        AgentLinks {
            slots: Mutex::default(),
            lock_dir,
            prefix: crate::dataplane::exec::new_execution_id()[..16].to_owned(),
            counter: AtomicU64::new(0),
            epoch: Instant::now(),
        }
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
        if open.len() <= MAX_LINKS {
            return;
        }
        open.sort_by_key(|s| s.used.load(Ordering::Relaxed));
        for slot in &open[..open.len() - MAX_LINKS] {
            slot.link.lock().unwrap().take();
        }
    }

    fn next_id(&self) -> String {
        format!(
            "{}-{}",
            self.prefix,
            self.counter.fetch_add(1, Ordering::Relaxed)
        )
    }

    /// Remembers an inspected container whose agent serves, so that while
    /// its link lives the per-exec check needs no engine call.
    pub fn remember(&self, record: &ContainerRecord) {
        *self.slot(&record.id).record.lock().unwrap() = Some(record.clone());
    }

    /// The container as last inspected, if its agent answers a ping now:
    /// the per-exec check, moved off the engine. A stopped or removed
    /// container ends the attach stream, and a paused one cannot answer; in
    /// both cases (and when no link is open) the engine is asked instead.
    pub async fn live(&self, container: &str) -> Option<ContainerRecord> {
        let slot = self.slots.lock().unwrap().get(container)?.clone();
        let record = slot.record.lock().unwrap().clone()?;
        let link = slot
            .link
            .lock()
            .unwrap()
            .clone()
            .filter(|l| l.shared.usable())?;
        self.ping(&link, container, PROBE_TIMEOUT).await.ok()?;
        Some(ContainerRecord {
            status: super::Status::Running,
            ..record
        })
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
        match self.open(docker, container).await {
            Ok(link) => {
                slot.failures.store(0, Ordering::Relaxed);
                *slot.link.lock().unwrap() = Some(link.clone());
                self.trim();
                Some(link)
            }
            Err(e) => {
                let down = opening_failed(docker, container, &slot, e);
                *slot.down_until.lock().unwrap() = Some(Instant::now() + down);
                *slot.link.lock().unwrap() = None;
                None
            }
        }
    }

    /// A link whose agent answered a ping, in this host's protocol version.
    async fn open(&self, docker: &Docker, container: &str) -> Result<Arc<Link>, OpenError> {
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
        let shared = Arc::new(Shared::default());
        shared.alive.store(true, Ordering::SeqCst);
        let reader = tokio::spawn(read_replies(
            container.to_owned(),
            shared.clone(),
            attached.output,
        ));
        let link = Arc::new(Link {
            shared,
            input: tokio::sync::Mutex::new(attached.input),
            reader,
        });
        let sent = unix_ms();
        let (boot, agent_now) = self
            .ping(&link, container, ACK_TIMEOUT)
            .await
            .map_err(|e| match *link.shared.skew.lock().unwrap() {
                // Its pong closed the link as soon as it was read.
                Some(theirs) => OpenError::Version(theirs),
                None if matches!(e, Unanswered::Silent(_)) => {
                    OpenError::Silent(format!("ping: {}", e.why()))
                }
                None => OpenError::Attach(format!("ping: {}", e.why())),
            })?;
        let midpoint = (sent + unix_ms()) / 2;
        link.shared
            .offset_ms
            .store(agent_now as i64 - midpoint as i64, Ordering::Relaxed);
        *link.shared.boot.lock().unwrap() = Some(boot);
        Ok(link)
    }

    /// Pings the agent: its boot id and clock.
    async fn ping(
        &self,
        link: &Link,
        container: &str,
        patience: Duration,
    ) -> Result<(String, u64), Unanswered> {
        let nonce = self.next_id();
        let (tx, rx) = oneshot::channel();
        let _pending = Pending::new(&link.shared.pongs, &nonce, tx);
        let frame = || {
            Request::Ping {
                nonce: nonce.clone(),
            }
            .encode()
        };
        self.write_until(link, container, frame, rx, patience).await
    }

    /// Writes the frame `frame()` builds and waits for `answer`, holding
    /// this process's writer and the container's lock file from before the
    /// frame is built (its start-by time counts from there) until the
    /// answer, so no other writer's frame can interleave with it in the
    /// agent's stdin. A write that fails or times out may have left part of
    /// a frame behind: the link is closed (the next frame of any writer
    /// starts with a newline, so the rest is refused on its own).
    async fn write_until<T>(
        &self,
        link: &Link,
        container: &str,
        frame: impl FnOnce() -> String,
        answer: oneshot::Receiver<T>,
        patience: Duration,
    ) -> Result<T, Unanswered> {
        let mut input = tokio::time::timeout(ACK_TIMEOUT, link.input.lock())
            .await
            .map_err(|_| Unanswered::NotSent("the link is busy".into()))?;
        let _lock = self.lock(container).await.map_err(Unanswered::NotSent)?;
        let frame = frame();
        let write = async {
            input.write_all(frame.as_bytes()).await?;
            input.flush().await
        };
        let failed = match tokio::time::timeout(ACK_TIMEOUT, write).await {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(format!("writing to the agent: {e}")),
            Err(_) => Some("writing to the agent timed out".to_owned()),
        };
        if let Some(why) = failed {
            link.shared.fail(container, &why);
            return Err(Unanswered::NotSent(why));
        }
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

    /// The container's writer lock, across host processes.
    async fn lock(
        &self,
        container: &str,
    ) -> Result<Option<nix::fcntl::Flock<std::fs::File>>, String> {
        let Some(dir) = &self.lock_dir else {
            return Ok(None);
        };
        let path = dir.join(container);
        let give_up = Instant::now() + ACK_TIMEOUT;
        let file = std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .and_then(|()| {
                std::fs::OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .mode(0o600)
                    .custom_flags(libc_o_nofollow())
                    .open(&path)
            })
            .map_err(|e| format!("the link lock {}: {e}", path.display()))?;
        let mut file = file;
        loop {
            match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
                Ok(lock) => return Ok(Some(lock)),
                Err((back, _)) if Instant::now() < give_up => {
                    file = back;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                Err((_, e)) => return Err(format!("the link lock {}: {e}", path.display())),
            }
        }
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
        let id = self.next_id();
        let (ack_tx, ack_rx) = oneshot::channel();
        let _ack = Pending::new(&link.shared.acks, &id, ack_tx);
        let (tx, rx) = oneshot::channel();
        let _killed = Pending::new(&link.shared.kills, &id, tx);
        let frame = || {
            Request::Kill {
                id: id.clone(),
                marker: marker.to_owned(),
            }
            .encode()
        };
        // The locks are held until the agent has read the frame, not for
        // the sweep itself.
        self.write_until(&link, container, frame, ack_rx, ACK_TIMEOUT)
            .await
            .map_err(|e| e.why().to_owned())?;
        match tokio::time::timeout(KILL_WAIT, rx).await {
            Ok(Ok(all_gone)) => Ok(all_gone),
            _ => Err("the agent did not finish the kill".into()),
        }
    }

    /// Runs `request` through the agent of `container`.
    pub async fn exec<'d>(
        &self,
        docker: &Docker,
        container: &str,
        request: &ExecRequest,
        mut sink: Option<Sink<'_, 'd>>,
    ) -> Result<LinkOutcome, LinkError> {
        let link = self
            .link(docker, container)
            .await
            .ok_or(LinkError::Unavailable)?;
        let id = self.next_id();
        let (tx, mut rx) = mpsc::channel(CALL_BUFFER);
        link.shared.calls.lock().unwrap().insert(id.clone(), tx);
        let _registered = Unregister(&link.shared, &id);
        let (ack_tx, ack_rx) = oneshot::channel();
        let _ack = Pending::new(&link.shared.acks, &id, ack_tx);
        let offset = link.shared.offset_ms.load(Ordering::Relaxed);
        let frame = || {
            let now = unix_ms() as i64 + offset;
            Request::Exec(Exec {
                id: id.clone(),
                start_by_ms: (now + ACK_TIMEOUT.as_millis() as i64).max(0) as u64,
                timeout_ms: request.timeout.as_millis().try_into().unwrap_or(u64::MAX),
                env: request.env.clone(),
                command: request.command.clone(),
                stdin: request.stdin.clone(),
            })
            .encode()
        };
        let start = Instant::now();
        match self
            .write_until(&link, container, frame, ack_rx, ACK_TIMEOUT)
            .await
        {
            Ok(true) => {}
            // Refused unread: the engine runs it.
            Ok(false) => return Err(LinkError::NotSent("the agent read it too late".into())),
            Err(Unanswered::NotSent(why)) => return Err(LinkError::NotSent(why)),
            // It may have been read: never run twice.
            Err(Unanswered::Silent(why)) => {
                link.shared.silent.store(true, Ordering::SeqCst);
                return Err(LinkError::Lost(format!(
                    "the sandbox agent did not take the command: {why}"
                )));
            }
        }
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
                Ok(Some(Event::Exit(code))) => {
                    // The agent's own deadline: 124 at or after the timeout.
                    let timed_out = code == EXIT_TIMED_OUT && start.elapsed() >= request.timeout;
                    let mut response = output.finish(i64::from(code), timed_out);
                    response.via_agent = true;
                    return Ok(LinkOutcome::Done(response));
                }
                Ok(None) => {
                    let why = link.shared.lost.lock().unwrap().clone();
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
        let _ = tokio::time::timeout(RESPAWN_TIMEOUT, run_to_end(&docker, &container, argv)).await;
    });
}

/// Runs `argv` in `container` through the engine, until its output ends;
/// the exec's id.
pub(super) async fn run_to_end(
    docker: &Docker,
    container: &str,
    argv: Vec<String>,
) -> Result<String, bollard::errors::Error> {
    let config = ExecConfig {
        cmd: Some(argv),
        attach_stdout: Some(true),
        attach_stderr: Some(true),
        ..Default::default()
    };
    let exec = docker.create_exec(container, config).await?;
    if let StartExecResults::Attached { mut output, .. } = docker.start_exec(&exec.id, None).await?
    {
        while output.next().await.is_some() {}
    }
    Ok(exec.id)
}

/// Why a frame went unanswered.
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

fn libc_o_nofollow() -> i32 {
    nix::fcntl::OFlag::O_NOFOLLOW.bits()
}

/// Reads reply lines until the stream ends or carries anything but frames.
async fn read_replies(
    container: String,
    shared: Arc<Shared>,
    mut output: Pin<Box<dyn Stream<Item = Result<LogOutput, bollard::errors::Error>> + Send>>,
) {
    let mut pending: Vec<u8> = Vec::new();
    let why = loop {
        let chunk = match output.next().await {
            Some(Ok(LogOutput::StdOut { message })) => message,
            // The agent writes nothing to stderr; whatever else does is
            // not a reply, and is dropped.
            Some(Ok(_)) => continue,
            Some(Err(e)) => break format!("the attach stream failed: {e}"),
            None => break "the attach stream ended (the container stopped)".to_owned(),
        };
        pending.extend_from_slice(&chunk);
        let mut used = 0;
        let mut garbled = None;
        while let Some(at) = pending[used..].iter().position(|&b| b == b'\n') {
            let line = &pending[used..used + at];
            used += at + 1;
            match Reply::parse(line) {
                Ok(reply) => dispatch(&shared, reply).await,
                // Another version's hello or pong: nothing more it says is
                // read, and nothing more is sent to it.
                Err(ParseError::Version(theirs)) => {
                    shared.skewed(&container, theirs);
                    return;
                }
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

async fn dispatch(shared: &Shared, reply: Reply) {
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
        }
        Reply::Pong {
            nonce,
            boot,
            now_ms,
        } => {
            if let Some(tx) = shared.pongs.lock().unwrap().remove(&nonce) {
                let _ = tx.send((boot, now_ms));
            }
        }
        Reply::Ack { id } => {
            if let Some(tx) = shared.acks.lock().unwrap().remove(&id) {
                let _ = tx.send(true);
            }
        }
        Reply::Stale { id } => {
            if let Some(tx) = shared.acks.lock().unwrap().remove(&id) {
                let _ = tx.send(false);
            }
        }
        Reply::Stdout { id, data } => {
            deliver(shared, &id, Event::Output(StreamKind::Stdout, data)).await
        }
        Reply::Stderr { id, data } => {
            deliver(shared, &id, Event::Output(StreamKind::Stderr, data)).await
        }
        Reply::Exit { id, code } => {
            deliver(shared, &id, Event::Exit(code)).await;
            shared.calls.lock().unwrap().remove(&id);
        }
        Reply::Killed { id, all_gone } => {
            if let Some(tx) = shared.kills.lock().unwrap().remove(&id) {
                let _ = tx.send(all_gone);
            }
        }
        Reply::Bad { reason } => tracing::debug!(reason, "the agent refused a frame"),
    }
}

/// Hands an event to its call (frames of other host processes' calls, or
/// of calls gone, are dropped); waits while the call's buffer is full.
async fn deliver(shared: &Shared, id: &str, event: Event) {
    let tx = shared.calls.lock().unwrap().get(id).cloned();
    if let Some(tx) = tx {
        let _ = tx.send(event).await;
    }
}

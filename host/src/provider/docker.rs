//! The production provider: the Docker Engine API through bollard.
//!
//! One client per provider, connected lazily (so a host starts while the
//! engine is down and recovers once it answers), API version negotiated on
//! first use, and every request bounded by a timeout.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bollard::container::LogOutput;
use bollard::errors::Error as BollardError;
use bollard::exec::{StartExecOptions, StartExecResults};
use bollard::models::{ContainerCreateBody, ExecConfig, HostConfig};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, ListContainersOptionsBuilder, RemoveContainerOptionsBuilder,
};
use bollard::Docker;
use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::OnceCell;

use super::agent_link::{AgentLinks, LinkError, LinkOutcome, PortError, Sink, PORT_PATIENCE};
use super::plan::ContainerPlan;
use super::{
    ContainerProvider, ContainerRecord, DoneStatus, ExecIo, ProviderError, ProviderResult, Status,
};
use crate::dataplane::agent::AgentMode;
use crate::dataplane::exec::{
    ExecOutput, ExecRequest, ExecResponse, StreamKind, KILL_SCRIPT, TIMEOUT_EXIT_CODE,
};
use crate::dataplane::processes::{ProcessAnswer, ProcessOp};
use crate::dataplane::WORKSPACE_MOUNT;

/// Docker through bollard, honouring `DOCKER_HOST` like the docker CLI.
pub struct DockerProvider {
    client: OnceCell<Docker>,
    /// `None`: the docker CLI's defaults (`DOCKER_HOST`, else the local socket).
    endpoint: Option<String>,
    timeout: Duration,
    /// Kills of calls abandoned mid-way (a dropped request, Ctrl-C).
    cancels: Arc<std::sync::Mutex<tokio::task::JoinSet<()>>>,
    /// Links to the agents of containers whose main process it is.
    links: Arc<AgentLinks>,
    /// `UID:GID` every engine exec runs as unless a request says otherwise:
    /// the sandbox user, named explicitly because a container whose agent
    /// serves runs its main process as root.
    exec_user: String,
    /// The sandbox containers' cgroup parent, once decided.
    cgroup_parent: OnceCell<Option<String>>,
}

/// Kills a call's processes if its future is dropped before the call ended:
/// a client that disconnects, or Ctrl-C, never leaves its command running.
struct CancelOnDrop {
    docker: Docker,
    container: String,
    marker: String,
    /// The sandbox user, whom the engine-side kill also runs as (none:
    /// root alone, see [`DockerProvider::kill_user`]).
    user: Option<String>,
    cancels: Arc<std::sync::Mutex<tokio::task::JoinSet<()>>>,
    /// Tried first: a kill through the container's agent link.
    links: Option<Arc<AgentLinks>>,
    /// Logged with the kill: why the processes go.
    why: KillReason,
    /// While the engine may still be starting the exec: the kill is made
    /// again a moment later, for processes that were not there yet.
    starting: bool,
    armed: bool,
}

/// Why a [`CancelOnDrop`] kills: a call abandoned mid-way is news (info);
/// a port connection's end is routine (debug).
#[derive(Clone, Copy)]
enum KillReason {
    CallAbandoned,
    PortConnectionOver,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (docker, container, marker, user) = (
            self.docker.clone(),
            std::mem::take(&mut self.container),
            std::mem::take(&mut self.marker),
            std::mem::take(&mut self.user),
        );
        match self.why {
            KillReason::CallAbandoned => {
                tracing::info!(container, "call abandoned: killing its processes")
            }
            KillReason::PortConnectionOver => {
                tracing::debug!(container, "port connection over: ending its processes")
            }
        }
        let links = self.links.take();
        let why = match self.why {
            KillReason::CallAbandoned => "an abandoned call",
            KillReason::PortConnectionOver => "a port connection",
        };
        let rounds = if self.starting { 2 } else { 1 };
        let kill = async move {
            for round in 1..=rounds {
                if round > 1 {
                    tokio::time::sleep(STARTING_GRACE).await;
                }
                if let Some(links) = &links {
                    if links.kill(&container, &marker).await == Ok(true) {
                        continue;
                    }
                }
                let killed = tokio::time::timeout(
                    CANCEL_TIMEOUT,
                    run_kill(&docker, &container, &marker, user.as_deref()),
                )
                .await;
                if !matches!(killed, Ok(Ok(ref r)) if r.exit_code == Some(0)) {
                    tracing::warn!(container, "could not kill the processes of {why}");
                }
            }
        };
        // Finished kills are collected here, not only by `settle`: every
        // port connection through the engine adds one.
        let mut cancels = self.cancels.lock().unwrap();
        while cancels.try_join_next().is_some() {}
        cancels.spawn_on(kill, &runtime);
    }
}

/// Bound on killing an abandoned call.
const CANCEL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long after a kill that may have come before its exec started the
/// kill is made again.
const STARTING_GRACE: Duration = Duration::from_secs(1);

impl DockerProvider {
    /// A provider that connects on first use; each API call is bounded by
    /// `timeout`.
    pub fn new(timeout: Duration) -> Self {
        DockerProvider {
            client: OnceCell::new(),
            endpoint: None,
            timeout,
            cancels: Default::default(),
            links: Arc::new(AgentLinks::new(None)),
            exec_user: user_arg(crate::config::Config::default().sandbox_user()),
            cgroup_parent: OnceCell::new(),
        }
    }

    /// Engine execs run as `user` unless a request names another (the
    /// configured sandbox user; [`DockerProvider::new`] takes the default).
    pub fn with_exec_user(mut self, user: crate::config::UserIds) -> Self {
        self.exec_user = user_arg(user);
        self
    }

    /// Agent links under `state_dir` (the host's state directory): plane
    /// sockets offered in its `plane` directories, and, on the attach
    /// stream, writers locking files in `links` so that host processes
    /// sharing it never interleave frames.
    pub fn with_state_dir(mut self, state_dir: &std::path::Path) -> Self {
        self.links = Arc::new(AgentLinks::new(Some(state_dir)));
        self
    }

    /// What the live agent link to `container` runs over, if one is open
    /// in this process.
    pub fn link_transport(&self, container: &str) -> Option<super::agent_link::Transport> {
        self.links.transport(container)
    }

    /// A provider for an explicit endpoint: `unix:///path`, a socket path,
    /// or `tcp://host:port` / `http://host:port`.
    pub fn with_endpoint(endpoint: impl Into<String>, timeout: Duration) -> Self {
        DockerProvider {
            endpoint: Some(endpoint.into()),
            ..Self::new(timeout)
        }
    }

    /// The provider a configuration asks for.
    pub fn from_config(config: &crate::config::Config) -> Self {
        // A live link is a file descriptor: this process may hold as many
        // as the machine lets it.
        super::agent_link::raise_file_limit();
        let provider = match &config.docker_host {
            Some(endpoint) => Self::with_endpoint(endpoint.clone(), config.docker_timeout()),
            None => Self::new(config.docker_timeout()),
        };
        provider
            .with_state_dir(&crate::state::dir(&config.workspace_root))
            .with_exec_user(config.sandbox_user())
    }

    /// Where `path` of `container` comes from on the engine's host: the
    /// source of the mount that holds it, and the rest of the path below it;
    /// `None` when no mount holds it (it is the container's own).
    pub async fn host_path_of(
        &self,
        container: &str,
        path: &std::path::Path,
    ) -> ProviderResult<Option<std::path::PathBuf>> {
        let docker = self.client().await?;
        let inspected = self.call(docker.inspect_container(container, None)).await?;
        let best = inspected
            .mounts
            .unwrap_or_default()
            .into_iter()
            .filter_map(|m| Some((m.source?, m.destination?)))
            .filter(|(_, dest)| path.starts_with(dest))
            .max_by_key(|(_, dest)| dest.len());
        Ok(best.map(|(source, dest)| {
            // `join("")` would add a trailing `/` to the path users copy
            // into their `-v` flag.
            let source = std::path::PathBuf::from(source);
            match path.strip_prefix(&dest) {
                Ok(below) if !below.as_os_str().is_empty() => source.join(below),
                _ => source,
            }
        }))
    }

    /// The endpoint in use, for messages.
    pub fn endpoint(&self) -> String {
        self.endpoint.clone().unwrap_or_else(docker_host)
    }

    fn connect(&self) -> Result<Docker, BollardError> {
        let secs = self.timeout.as_secs().max(1);
        match self.endpoint.as_deref() {
            None => Docker::connect_with_defaults(),
            Some(e) if e.starts_with("tcp://") || e.starts_with("http://") => {
                Docker::connect_with_http(e, secs, bollard::API_DEFAULT_VERSION)
            }
            Some(e) if e.starts_with("unix://") || !e.contains("://") => {
                Docker::connect_with_unix(e, secs, bollard::API_DEFAULT_VERSION)
            }
            // Other schemes as the docker CLI takes them (or bollard's
            // "URI scheme is not supported", named with the endpoint).
            Some(e) => Docker::connect_with_host(e),
        }
    }

    /// The connected client (connecting and negotiating now if needed).
    pub async fn client(&self) -> ProviderResult<&Docker> {
        self.client
            .get_or_try_init(|| async {
                let docker = self.connect().map_err(|e| self.unavailable(&e))?;
                // The engine may be older than bollard's default API version
                // (Debian's 20.10 speaks 1.41).
                self.bounded(docker.negotiate_version()).await
            })
            .await
    }

    async fn call<T>(
        &self,
        fut: impl Future<Output = Result<T, BollardError>>,
    ) -> ProviderResult<T> {
        self.bounded(fut).await
    }

    /// Runs one engine request under the timeout, converting its errors.
    async fn bounded<T>(
        &self,
        fut: impl Future<Output = Result<T, BollardError>>,
    ) -> ProviderResult<T> {
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(result) => result.map_err(|e| match convert(&e) {
                ProviderError::Unavailable(_) => self.unavailable(&e),
                other => other,
            }),
            Err(_) => Err(ProviderError::Unavailable(format!(
                "the Docker engine at {} did not answer within {:.1}s",
                self.endpoint(),
                self.timeout.as_secs_f64()
            ))),
        }
    }

    /// Armed until the call ends; `through_link`: try the agent link first.
    fn cancel_on_drop(
        &self,
        docker: &Docker,
        container: &str,
        request: &ExecRequest,
        through_link: bool,
    ) -> CancelOnDrop {
        let user = self.kill_user(request);
        let (marker, why) = (&request.marker, KillReason::CallAbandoned);
        self.kill_on_drop(docker, container, marker, user, through_link, why)
    }

    /// Kills the processes marked `marker` in `container` when dropped
    /// armed (logged as `why`): through the agent link first when
    /// `through_link`, else (or when that fails) by an engine-side kill as
    /// root and `user`.
    fn kill_on_drop(
        &self,
        docker: &Docker,
        container: &str,
        marker: &str,
        user: Option<String>,
        through_link: bool,
        why: KillReason,
    ) -> CancelOnDrop {
        CancelOnDrop {
            docker: docker.clone(),
            container: container.to_owned(),
            marker: marker.to_owned(),
            user,
            cancels: self.cancels.clone(),
            links: through_link.then(|| self.links.clone()),
            why,
            starting: false,
            armed: true,
        }
    }

    /// Whom a kill of `request`'s processes runs as through the engine
    /// besides root: none where the agent serves and the call ran as the
    /// sandbox user, in a call group root's `sandbox-agent kill` finds.
    /// A `docker exec` as the sandbox user is the workload's to stop
    /// before it execs (its `runc init` runs as that user), and a stopped
    /// one holds the engine's lock on the container: inspect, exec and even
    /// `docker rm -f` of it then hang.
    fn kill_user(&self, request: &ExecRequest) -> Option<String> {
        (!given_away(request, &self.exec_user)).then(|| self.exec_user.clone())
    }

    /// Kills every process of a timed-out call (see [`KILL_SCRIPT`]).
    async fn kill_call(&self, container: &str, request: &ExecRequest) {
        let (marker, user) = (&request.marker, self.kill_user(request));
        let Ok(docker) = self.client().await else {
            return;
        };
        // The call may hold every pid of the container for a moment: retry.
        for attempt in 1..=3u64 {
            match self
                .bounded(run_kill(docker, container, marker, user.as_deref()))
                .await
            {
                Ok(r) if r.exit_code == Some(0) => {
                    tracing::debug!(container, "timed-out call killed");
                    return;
                }
                Ok(r) => {
                    tracing::warn!(container, attempt, exit = ?r.exit_code, "processes of a timed-out call survived")
                }
                Err(e) => {
                    tracing::warn!(container, attempt, error = %e, "could not kill a timed-out call")
                }
            }
            tokio::time::sleep(Duration::from_millis(100 * attempt)).await;
        }
    }

    fn unavailable(&self, e: &BollardError) -> ProviderError {
        let why = match e {
            BollardError::DockerResponseServerError {
                status_code,
                message,
            } => format!("status {status_code}: {}", engine_message(message)),
            other => causes(other),
        };
        ProviderError::Unavailable(format!(
            "cannot reach the Docker engine at {}: {why}",
            self.endpoint()
        ))
    }
}

/// An error and its sources, `a: b: c`: bollard's own message for a failed
/// connection ("Error in the hyper legacy client") says nothing of the cause.
fn causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let shown = cause.to_string();
        if !text.contains(&shown) {
            text = format!("{text}: {shown}");
        }
        source = cause.source();
    }
    text
}

/// Why an exec stopped before its output ended.
enum Abort {
    /// The stdin source failed.
    Source(std::io::Error),
    /// The stdout consumer refused a write.
    Consumer(std::io::Error),
    Engine(ProviderError),
}

fn docker_host() -> String {
    std::env::var("DOCKER_HOST").unwrap_or_else(|_| "unix:///var/run/docker.sock".to_owned())
}

/// What the engine said, as a message can show it: an HTML page (the
/// endpoint is a web server, not a Docker engine) is named, not printed,
/// and anything else is cut at 300 characters.
fn engine_message(message: &str) -> String {
    let start = message.trim_start().to_ascii_lowercase();
    if start.starts_with("<!doctype html")
        || start.starts_with("<html")
        || start.starts_with("<?xml")
    {
        return format!(
            "the endpoint answered with a web page, not the Docker engine's API: is {} a Docker \
             engine? (DOCKER_HOST, SANDBOX_DOCKER_HOST or docker_host)",
            docker_host()
        );
    }
    const SHOWN: usize = 300;
    match message.char_indices().nth(SHOWN) {
        Some((cut, _)) => format!("{}... ({} bytes)", &message[..cut], message.len()),
        None => message.to_owned(),
    }
}

fn convert(e: &BollardError) -> ProviderError {
    match e {
        BollardError::DockerResponseServerError {
            status_code,
            message,
        } => match status_code {
            _ if engine_message(message) != *message => {
                ProviderError::Unavailable(format!("{status_code}: {}", engine_message(message)))
            }
            // "No such image: NAME" (not a container's 404 whose name holds
            // the word: "No such container: sandbox.noimage.alice").
            404 if !message.starts_with("No such container")
                && message.to_ascii_lowercase().contains("image") =>
            {
                ProviderError::ImageMissing(message.clone())
            }
            404 => ProviderError::NotFound(message.clone()),
            409 => ProviderError::Conflict(message.clone()),
            _ => ProviderError::Failed(format!("{status_code}: {message}")),
        },
        BollardError::IOError { .. }
        | BollardError::HyperResponseError { .. }
        | BollardError::HyperLegacyError { .. }
        | BollardError::UnsupportedURISchemeError { .. }
        | BollardError::RequestTimeoutError
        | BollardError::SocketNotFoundError(_) => ProviderError::Unavailable(causes(e)),
        other => ProviderError::Failed(other.to_string()),
    }
}

/// `UID:GID` as the engine takes it.
fn user_arg(user: crate::config::UserIds) -> String {
    format!("{}:{}", user.uid, user.gid)
}

/// Root in the container: where the agent serves, the identity that ends a
/// call's group (its processes' environments are out of root's reach
/// without `CAP_SYS_PTRACE`, their group is not).
const ROOT: &str = "0:0";

/// One kill of a call's processes, as the engine runs it: `sandbox-agent
/// kill` as root (the groups of calls the agent ran), then as the sandbox
/// user `user` (the processes that carry the marker: calls run through the
/// engine), or [`KILL_SCRIPT`] where no agent is mounted. The last answer.
async fn run_kill(
    docker: &Docker,
    container: &str,
    marker: &str,
    user: Option<&str>,
) -> Result<bollard::models::ExecInspectResponse, BollardError> {
    let agent = vec![
        crate::dataplane::agent::AGENT_MOUNT.to_owned(),
        "kill".to_owned(),
        marker.to_owned(),
    ];
    let as_root = run_kill_with(docker, container, ROOT, agent.clone()).await;
    let Some(user) = user else {
        return as_root;
    };
    match run_kill_with(docker, container, user, agent).await {
        Ok(r) if r.exit_code == Some(0) => {
            return match as_root {
                Ok(root) if root.exit_code != Some(0) => Ok(root),
                _ => Ok(r),
            }
        }
        // No agent in this container (or it failed): the script.
        _ => {}
    }
    let script = vec![
        "sh".into(),
        "-c".into(),
        KILL_SCRIPT.into(),
        "kill".into(),
        marker.into(),
    ];
    run_kill_with(docker, container, user, script).await
}

async fn run_kill_with(
    docker: &Docker,
    container: &str,
    user: &str,
    cmd: Vec<String>,
) -> Result<bollard::models::ExecInspectResponse, BollardError> {
    let exec = exec_to_end(docker, container, Some(user), cmd).await?;
    docker.inspect_exec(&exec).await
}

/// Runs `argv` in `container` through the engine as `user` (the container's
/// own user when `None`), until its output ends; the exec's id.
pub(super) async fn exec_to_end(
    docker: &Docker,
    container: &str,
    user: Option<&str>,
    argv: Vec<String>,
) -> Result<String, BollardError> {
    let config = ExecConfig {
        cmd: Some(argv),
        attach_stdout: Some(true),
        attach_stderr: Some(true),
        user: user.map(str::to_owned),
        ..Default::default()
    };
    let exec = docker.create_exec(container, config).await?;
    if let StartExecResults::Attached { mut output, .. } = docker.start_exec(&exec.id, None).await?
    {
        while output.next().await.is_some() {}
    }
    Ok(exec.id)
}

/// The capabilities a container whose agent serves keeps, for the agent
/// alone: to run each command as the sandbox user in a group of its own
/// (setuid, setgid) and to end that group (kill). Every command drops them
/// all when it becomes the sandbox user, and `no-new-privileges` keeps it
/// from regaining any.
pub const AGENT_CAPABILITIES: [&str; 3] = ["SETUID", "SETGID", "KILL"];

/// The engine's create body for a plan: hardened by default.
///
/// Where the agent serves, it is the main process (pid 1, no tini) and runs
/// as root with [`AGENT_CAPABILITIES`] only, so that the workload, the
/// sandbox user with none, can neither signal, trace nor read it. Without
/// it the container runs as the sandbox user with no capability at all.
pub fn create_body(plan: &ContainerPlan) -> ContainerCreateBody {
    // The agent talks on the attach stream: stdin stays open for any number
    // of attaches, and nothing it says is logged to disk.
    let serves = plan.agent_serves();
    let user = if serves {
        ROOT.to_owned()
    } else {
        user_arg(plan.user)
    };
    ContainerCreateBody {
        image: Some(plan.image.clone()),
        cmd: Some(plan.command.clone()),
        open_stdin: Some(serves),
        stdin_once: Some(false),
        attach_stdin: Some(serves),
        attach_stdout: Some(serves),
        attach_stderr: Some(serves),
        tty: Some(false),
        labels: Some(plan.labels.clone()),
        user: Some(user),
        working_dir: Some(WORKSPACE_MOUNT.to_owned()),
        env: Some(plan.env()),
        // Disabled outright when there is no network: also ~30 ms faster
        // starts. Loopback stays (the egress relay listens on it).
        network_disabled: Some(plan.network_mode() == crate::config::NETWORK_NONE),
        host_config: Some(HostConfig {
            binds: Some(
                std::iter::once(format!(
                    "{}:{WORKSPACE_MOUNT}:rw",
                    plan.workspace_path.display()
                ))
                .chain(plan.agent.as_ref().map(|agent| {
                    format!(
                        "{}:{}:ro",
                        agent.display(),
                        crate::dataplane::agent::AGENT_MOUNT
                    )
                }))
                .chain(plan.artifact_binds())
                .chain(plan.egress_bind())
                .chain(plan.plane_bind())
                .collect(),
            ),
            cap_drop: Some(vec!["ALL".to_owned()]),
            cap_add: serves.then(|| AGENT_CAPABILITIES.map(str::to_owned).to_vec()),
            security_opt: Some(vec!["no-new-privileges".to_owned()]),
            memory: Some(plan.limits.memory_bytes),
            memory_swap: Some(plan.limits.memory_bytes),
            nano_cpus: Some((plan.limits.cpus * 1e9) as i64),
            pids_limit: Some(pids_limit(plan)),
            network_mode: Some(plan.network_mode().to_owned()),
            init: Some(!serves),
            readonly_rootfs: Some(plan.read_only_rootfs),
            tmpfs: plan.read_only_rootfs.then(|| {
                HashMap::from([(
                    "/tmp".to_owned(),
                    format!("rw,nosuid,nodev,size={},mode=1777", plan.tmp_bytes),
                )])
            }),
            runtime: plan.runtime.clone(),
            cgroup_parent: plan.cgroup_parent.clone(),
            log_config: serves.then(|| bollard::models::HostConfigLogConfig {
                typ: Some("none".to_owned()),
                config: None,
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Docker's state name as the contract's status. `stopping` counts as
/// exited; an empty or unknown state as created (never started).
fn status_named(state: Option<String>) -> Status {
    match state.as_deref() {
        Some("stopping") => Status::Exited,
        Some(name) => Status::parse(name).unwrap_or(Status::Created),
        None => Status::Created,
    }
}

/// Whether a call may go over the agent link: the container's agent serves
/// this host's wire, and the call needs nothing only `docker exec` offers
/// (stdin or stdout streamed, another user, an idle timeout, more than
/// one request line).
fn agent_may_run(request: &ExecRequest, io: &ExecIo<'_>) -> bool {
    request.agent_serves
        && io.stdin.is_none()
        && io.stdout.is_none()
        && request.user.is_none()
        && !request.idle_timeout
        && super::agent_link::fits(request)
}

/// Executes: over the agent link, or through the engine.
impl DockerProvider {
    /// Runs `request` through the container's agent: the call's result, or
    /// `None` when it never reached the agent (none answers, it speaks
    /// another protocol version, or the frame was not sent), for the engine
    /// to run it.
    async fn exec_via_agent<'d>(
        &self,
        docker: &Docker,
        id: &str,
        request: &ExecRequest,
        sink: Option<Sink<'_, 'd>>,
    ) -> Option<ProviderResult<ExecResponse>> {
        let mut cancel = self.cancel_on_drop(docker, id, request, true);
        let outcome = self.links.exec(docker, id, request, sink).await;
        cancel.armed = false;
        self.call_outcome(id, request, outcome).await
    }

    /// What a call through the agent came to: its response (killed first
    /// when the host's deadline passed or its result was lost), or `None`
    /// when it never reached the agent, for the engine to run it.
    async fn call_outcome(
        &self,
        id: &str,
        request: &ExecRequest,
        outcome: Result<LinkOutcome, LinkError>,
    ) -> Option<ProviderResult<ExecResponse>> {
        match outcome {
            Ok(LinkOutcome::Done(response)) => Some(Ok(response)),
            Ok(LinkOutcome::Deadline(response)) => {
                self.kill_call(id, request).await;
                Some(Ok(response))
            }
            // The link logged why (and restarts a stuck serve).
            Err(LinkError::Unavailable) => None,
            Err(LinkError::NotSent(why)) => {
                tracing::warn!(container = id, why, "falling back to docker exec");
                None
            }
            Err(LinkError::Lost(why)) => {
                self.kill_call(id, request).await;
                Some(Err(ProviderError::Failed(why)))
            }
        }
    }

    /// Whether a call that streams its stdin or stdout may go over a plane
    /// pipe: a file transfer (bounded by its progress) where the agent
    /// serves, as the sandbox user (as every call through the agent runs).
    /// An execute with streamed stdin keeps `docker exec` (its own `reap`
    /// as root, a call group: the engine path the agent-reach tests pin).
    fn pipe_may_run(&self, request: &ExecRequest) -> bool {
        given_away(request, &self.exec_user)
            && request.idle_timeout
            && super::agent_link::fits(request)
    }

    /// Runs `request` with its stdin and stdout on a plane pipe: the call's
    /// result, or `None` when it never reached the agent (no plane link),
    /// for the engine to run it. Nothing of `io` is read or written before
    /// the agent took the call.
    async fn exec_via_pipe(
        &self,
        docker: &Docker,
        id: &str,
        request: &ExecRequest,
        io: &mut ExecIo<'_>,
    ) -> Option<ProviderResult<ExecResponse>> {
        let mut cancel = self.cancel_on_drop(docker, id, request, true);
        let outcome = self
            .links
            .exec_piped(
                docker,
                id,
                request,
                io.stdin
                    .as_mut()
                    .map(|s| &mut **s as &mut (dyn tokio::io::AsyncRead + Send + Unpin)),
                io.stdout
                    .as_mut()
                    .map(|s| &mut **s as &mut (dyn tokio::io::AsyncWrite + Send + Unpin)),
                io.sink.as_deref_mut(),
            )
            .await;
        cancel.armed = false;
        self.call_outcome(id, request, outcome).await
    }

    /// Runs `request` with `docker exec` (under `reap` where the agent is
    /// mounted), feeding its stdin and draining its output through `io`.
    async fn exec_via_engine(
        &self,
        docker: &Docker,
        id: &str,
        request: &ExecRequest,
        io: ExecIo<'_>,
    ) -> ProviderResult<ExecResponse> {
        let ExecIo {
            stdin,
            stdout,
            sink,
        } = io;
        let feeds = stdin.is_some() || request.stdin.is_some();
        let config = engine_exec_config(request, feeds, &self.exec_user);
        let exec = self.call(docker.create_exec(id, config)).await?;
        let mut cancel = self.cancel_on_drop(docker, id, request, false);
        cancel.starting = true;
        let started = self
            .call(docker.start_exec(&exec.id, None::<StartExecOptions>))
            .await?;
        cancel.starting = false;
        let StartExecResults::Attached {
            output: mut stream,
            mut input,
        } = started
        else {
            return Err(ProviderError::Failed(
                "the engine did not attach to the exec".into(),
            ));
        };
        let mut output = ExecOutput::new(request.output_limit);
        let clock = Activity::new(request);
        let outcome = {
            let fed = feed(&mut input, stdin, request.stdin.as_deref(), &clock);
            let drained = drain(&mut stream, &clock, stdout, sink, &mut output);
            // A container that dies during the call (gVisor's sandbox can)
            // never ends the exec's stream: noticed here, not at the
            // call's timeout.
            tokio::select! {
                // The call's own end first, when both are ready.
                biased;
                outcome = pump(fed, drained, feeds) => outcome,
                () = container_stopped(docker, id) => {
                    cancel.armed = false;
                    return Err(ProviderError::Failed(
                        "the container stopped during the call".into(),
                    ));
                }
            }
        };
        // Close the whole attach connection (both halves): the engine holds
        // the exec's streams for as long as it stays open.
        drop(stream);
        drop(input);
        // From here on the call has ended or is killed below.
        cancel.armed = false;
        let timed_out = match outcome {
            Ok(timed_out) => timed_out,
            Err(abort) => return Err(self.aborted(id, request, abort).await),
        };
        if timed_out {
            self.kill_call(id, request).await;
            return Ok(output.finish(TIMEOUT_EXIT_CODE, true));
        }
        let inspected = self.call(docker.inspect_exec(&exec.id)).await?;
        let code = inspected.exit_code.unwrap_or(-1);
        // The agent's own deadline: 124 at or after the timeout.
        let agent_timed_out =
            request.agent && code == TIMEOUT_EXIT_CODE && clock.elapsed() >= request.timeout;
        Ok(output.finish(code, agent_timed_out))
    }

    /// The error of an engine exec that stopped before its output ended;
    /// its processes are killed unless the engine itself failed.
    async fn aborted(&self, id: &str, request: &ExecRequest, abort: Abort) -> ProviderError {
        let why = match abort {
            Abort::Engine(e) => return e,
            Abort::Source(e) => format!("reading the command's input: {e}"),
            Abort::Consumer(e) => format!("the command's output was refused: {e}"),
        };
        self.kill_call(id, request).await;
        ProviderError::Failed(why)
    }
}

/// The cgroup parent of sandbox containers, under each controller's root.
const CGROUP_PARENT: &str = "/sandbox";

/// Makes [`CGROUP_PARENT`] weigh `shares` against the engine's processes,
/// where the engine manages cgroups itself (cgroupfs) on cgroup v1: under
/// v1 every container of the engine's default parent together weighs as
/// much as one busy engine thread, so a storm of cold starts takes the CPU
/// from warm commands (measured: bench case 5). Returns the parent.
fn prepare_cgroup_parent(
    driver: Option<&str>,
    version: Option<&str>,
    shares: u64,
) -> Result<&'static str, String> {
    if driver != Some("cgroupfs") || version != Some("1") {
        return Err(format!(
            "the engine's cgroups are {} on cgroup v{} (applied on cgroupfs, v1)",
            driver.unwrap_or("unknown"),
            version.unwrap_or("?")
        ));
    }
    let dir =
        std::path::Path::new("/sys/fs/cgroup/cpu").join(CGROUP_PARENT.trim_start_matches('/'));
    std::fs::create_dir_all(&dir)
        .and_then(|()| std::fs::write(dir.join("cpu.shares"), shares.to_string()))
        .map_err(|e| format!("{}: {e}", dir.display()))?;
    Ok(CGROUP_PARENT)
}

/// Host tasks gVisor's sandbox itself takes beyond the workload's (its
/// sentry's threads and, on the ptrace platform, a helper process per
/// address space): about 100 idle, more with churn. Without them in the
/// limit, a busy workload's sandbox crashes (found in review: a `ln` loop
/// took it to 256 and gVisor panicked).
const RUNSC_PIDS_OVERHEAD: i64 = 1024;

/// The container's pids limit: the workload's, plus gVisor's own tasks
/// under runsc (which counts them on the host).
fn pids_limit(plan: &ContainerPlan) -> i64 {
    match plan.runtime.as_deref() {
        Some(runtime) if runtime.contains("runsc") => plan.limits.pids + RUNSC_PIDS_OVERHEAD,
        _ => plan.limits.pids,
    }
}

/// Resolves once the container `id` is not running (never, when the engine
/// cannot be asked: the call's own bounds apply then).
async fn container_stopped(docker: &Docker, id: &str) {
    let options = bollard::query_parameters::WaitContainerOptionsBuilder::default()
        .condition("not-running")
        .build();
    let mut waits = std::pin::pin!(docker.wait_container(id, Some(options)));
    match waits.next().await {
        Some(Ok(_)) | Some(Err(BollardError::DockerContainerWaitError { .. })) => {}
        _ => std::future::pending().await,
    }
}

/// The engine's exec of `request`: `sh -c`, under `reap` where the agent
/// is mounted, as the request's user or else `exec_user`.
///
/// Where the agent serves (a current container), a command of the sandbox
/// user runs as root under `reap --user --group`, which gives it away: the
/// workload cannot kill its `reap` to escape the deadline, and the call's
/// group is ended whole (no subreaper needed, so under gVisor too). Older
/// containers' agents know no `--user`: there `reap` runs as the user.
/// Whether the agent serves `request`'s container and the call runs as the
/// sandbox user: then the engine runs it as root under `reap`, which gives
/// it away to that user in a call group (and root's kill finds the group).
fn given_away(request: &ExecRequest, exec_user: &str) -> bool {
    // File transfers name the sandbox user themselves: the same user.
    request.agent_serves && request.user.as_deref().is_none_or(|u| u == exec_user)
}

fn engine_exec_config(request: &ExecRequest, feeds: bool, exec_user: &str) -> ExecConfig {
    let (cmd, user) = if given_away(request, exec_user) {
        let group = crate::dataplane::agent::engine_call_group();
        let argv = crate::dataplane::agent::reap_argv_as(
            &request.command,
            request.timeout,
            exec_user,
            group,
        );
        (argv, ROOT.to_owned())
    } else if request.agent {
        let argv = crate::dataplane::agent::reap_argv(&request.command, request.timeout);
        (
            argv,
            request.user.clone().unwrap_or_else(|| exec_user.to_owned()),
        )
    } else {
        let argv = vec!["sh".into(), "-c".into(), request.command.clone()];
        (
            argv,
            request.user.clone().unwrap_or_else(|| exec_user.to_owned()),
        )
    };
    ExecConfig {
        cmd: Some(cmd),
        attach_stdout: Some(true),
        attach_stderr: Some(true),
        attach_stdin: Some(feeds),
        env: Some(request.env.clone()),
        working_dir: Some(request.workdir.clone()),
        user: Some(user),
        ..Default::default()
    }
}

/// The host's deadline of an engine exec: from its start, or from the last
/// byte moved either way (an idle timeout).
struct Activity {
    start: tokio::time::Instant,
    /// Milliseconds from `start` to the last byte moved either way.
    moved: AtomicU64,
    limit: Duration,
    idle: bool,
}

impl Activity {
    fn new(request: &ExecRequest) -> Self {
        // With the agent, it ends the call's process tree at the deadline;
        // the host's deadline is the fallback should the workload kill it.
        let limit = if request.agent && !request.idle_timeout {
            request.timeout + crate::dataplane::exec::AGENT_GRACE
        } else {
            request.timeout
        };
        Activity {
            start: tokio::time::Instant::now(),
            moved: AtomicU64::new(0),
            limit,
            idle: request.idle_timeout,
        }
    }

    /// A byte moved now.
    fn mark(&self) {
        self.moved
            .store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn deadline(&self) -> tokio::time::Instant {
        if self.idle {
            self.start + Duration::from_millis(self.moved.load(Ordering::Relaxed)) + self.limit
        } else {
            self.start + self.limit
        }
    }

    fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }
}

/// Runs `fed` (when `feeding`) beside `drained` until the output ends or
/// the input fails: whether the deadline passed first.
async fn pump(
    fed: impl Future<Output = Result<(), Abort>>,
    drained: impl Future<Output = Result<bool, Abort>>,
    mut feeding: bool,
) -> Result<bool, Abort> {
    // Fed concurrently with the output, so a command that prints before
    // reading cannot deadlock against us.
    tokio::pin!(fed, drained);
    loop {
        tokio::select! {
            result = &mut fed, if feeding => {
                feeding = false;
                result?;
            }
            result = &mut drained => return result,
        }
    }
}

/// Writes `stdin` (else the request's `bytes`) into the exec's input, one
/// buffer at a time (so stdin of any size costs 64 KiB), then closes it.
/// The command may exit without reading it all: that ends the feed only.
async fn feed(
    input: &mut (impl tokio::io::AsyncWrite + Unpin),
    stdin: Option<&mut (dyn tokio::io::AsyncRead + Send + Unpin)>,
    bytes: Option<&[u8]>,
    clock: &Activity,
) -> Result<(), Abort> {
    if let Some(reader) = stdin {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = reader.read(&mut buf).await.map_err(Abort::Source)?;
            if n == 0 {
                break;
            }
            if input.write_all(&buf[..n]).await.is_err() {
                return Ok(());
            }
            clock.mark();
        }
    } else if let Some(bytes) = bytes {
        if input.write_all(bytes).await.is_err() {
            return Ok(());
        }
    }
    let _ = input.shutdown().await;
    Ok(())
}

/// Moves the exec's output until it ends: its stdout to `stdout` when
/// given, the rest into `output` (each chunk shown to `sink` first). Whether
/// the deadline passed first.
async fn drain(
    stream: &mut (impl futures_util::Stream<Item = Result<LogOutput, BollardError>> + Unpin),
    clock: &Activity,
    mut stdout: Option<&mut (dyn tokio::io::AsyncWrite + Send + Unpin)>,
    mut sink: Option<crate::dataplane::exec::OutputSink<'_>>,
    output: &mut ExecOutput,
) -> Result<bool, Abort> {
    loop {
        match tokio::time::timeout_at(clock.deadline(), stream.next()).await {
            Ok(Some(Ok(chunk))) => {
                clock.mark();
                let kind = match &chunk {
                    LogOutput::StdErr { .. } => StreamKind::Stderr,
                    LogOutput::StdIn { .. } => continue,
                    _ => StreamKind::Stdout,
                };
                let bytes = chunk.into_bytes();
                match (kind, stdout.as_mut()) {
                    (StreamKind::Stdout, Some(w)) => {
                        w.write_all(&bytes).await.map_err(Abort::Consumer)?
                    }
                    _ => {
                        if let Some(sink) = sink.as_mut() {
                            sink(kind, &bytes);
                        }
                        output.push(kind, &bytes);
                    }
                }
            }
            Ok(Some(Err(e))) => return Err(Abort::Engine(convert(&e))),
            Ok(None) => return Ok(false),
            // Idle: stdin may have moved meanwhile.
            Err(_) if tokio::time::Instant::now() < clock.deadline() => {}
            Err(_) => return Ok(true),
        }
    }
}

#[async_trait]
impl ContainerProvider for DockerProvider {
    async fn list(&self, labels: &[(&str, &str)]) -> ProviderResult<Vec<ContainerRecord>> {
        let docker = self.client().await?;
        let filters: HashMap<&str, Vec<String>> = HashMap::from([(
            "label",
            labels.iter().map(|(k, v)| format!("{k}={v}")).collect(),
        )]);
        let options = ListContainersOptionsBuilder::default()
            .all(true)
            .filters(&filters)
            .build();
        let found = self.call(docker.list_containers(Some(options))).await?;
        Ok(found
            .into_iter()
            .map(|c| ContainerRecord {
                id: c.id.unwrap_or_default(),
                name: c
                    .names
                    .and_then(|n| n.into_iter().next())
                    .map(|n| n.trim_start_matches('/').to_owned())
                    .unwrap_or_default(),
                image: c.image.unwrap_or_default(),
                labels: c.labels.unwrap_or_default(),
                status: status_named(c.state.map(|s| s.to_string())),
                created: c.created,
            })
            .collect())
    }

    async fn create(&self, plan: &ContainerPlan) -> ProviderResult<ContainerRecord> {
        let docker = self.client().await?;
        let options = CreateContainerOptionsBuilder::default()
            .name(&plan.name)
            .build();
        let created = self
            .call(docker.create_container(Some(options), create_body(plan)))
            .await
            .map_err(|e| match e {
                ProviderError::ImageMissing(m) | ProviderError::NotFound(m) => {
                    ProviderError::ImageMissing(format!(
                        "image {:?} is not available locally ({m}); build the local image with \
                     `sandbox image build` (it fetches Debian's busybox-static when needed), \
                     or `docker pull {}` where a registry is reachable",
                        plan.image, plan.image
                    ))
                }
                other => other,
            })?;
        Ok(ContainerRecord {
            id: created.id,
            name: plan.name.clone(),
            image: plan.image.clone(),
            labels: plan.labels.clone(),
            status: Status::Created,
            created: None,
        })
    }

    async fn start(&self, id: &str) -> ProviderResult<()> {
        let docker = self.client().await?;
        match self.call(docker.start_container(id, None)).await {
            // 304: already started.
            Err(ProviderError::Failed(m)) if m.starts_with("304") => Ok(()),
            other => other,
        }
    }

    async fn inspect(&self, id: &str) -> ProviderResult<Option<ContainerRecord>> {
        // The per-exec check, off the engine: a live agent link is a
        // running container (its attach stream ends when it stops).
        let docker = self.client().await?;
        if let Some(record) = self.links.live(docker, id).await {
            return Ok(Some(record));
        }
        match self.call(docker.inspect_container(id, None)).await {
            Ok(c) => {
                let config = c.config.unwrap_or_default();
                let record = ContainerRecord {
                    id: c.id.unwrap_or_default(),
                    name: c
                        .name
                        .unwrap_or_default()
                        .trim_start_matches('/')
                        .to_owned(),
                    image: config.image.unwrap_or_default(),
                    labels: config.labels.unwrap_or_default(),
                    status: status_named(c.state.and_then(|s| s.status.map(|s| s.to_string()))),
                    created: None,
                };
                if record.status == Status::Running
                    && AgentMode::of(&record.labels) == AgentMode::Serves
                {
                    self.links.remember(&record);
                }
                Ok(Some(record))
            }
            Err(ProviderError::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn remove(&self, id: &str) -> ProviderResult<bool> {
        let docker = self.client().await?;
        let options = RemoveContainerOptionsBuilder::default().force(true).build();
        self.links.forget(id);
        match self.call(docker.remove_container(id, Some(options))).await {
            Ok(()) => Ok(true),
            Err(ProviderError::NotFound(_)) => Ok(false),
            // "removal already in progress": it is going away.
            Err(ProviderError::Conflict(_)) => Ok(true),
            Err(e) => Err(e),
        }
    }

    async fn exec_io(
        &self,
        id: &str,
        request: &ExecRequest,
        mut io: ExecIo<'_>,
    ) -> ProviderResult<ExecResponse> {
        let docker = self.client().await?;
        if agent_may_run(request, &io) {
            if let Some(done) = self
                .exec_via_agent(docker, id, request, io.sink.as_deref_mut())
                .await
            {
                return done;
            }
        } else if self.pipe_may_run(request) {
            if let Some(done) = self.exec_via_pipe(docker, id, request, &mut io).await {
                return done;
            }
        }
        self.exec_via_engine(docker, id, request, io).await
    }

    async fn settle(&self) {
        let mut pending = std::mem::take(&mut *self.cancels.lock().unwrap());
        let _ = tokio::time::timeout(CANCEL_TIMEOUT, async {
            while pending.join_next().await.is_some() {}
        })
        .await;
    }

    async fn stats(&self, id: &str) -> ProviderResult<super::ContainerStats> {
        let docker = self.client().await?;
        let options = bollard::query_parameters::StatsOptionsBuilder::default()
            .stream(false)
            .one_shot(true)
            .build();
        let mut stream = docker.stats(id, Some(options));
        let stats = match self
            .bounded(async { stream.next().await.transpose() })
            .await?
        {
            Some(s) => s,
            None => return Err(ProviderError::NotFound(format!("no stats for {id}"))),
        };
        let memory = stats.memory_stats.unwrap_or_default();
        Ok(super::ContainerStats {
            memory_bytes: memory.usage.unwrap_or(0),
            memory_limit_bytes: memory.limit.unwrap_or(0),
            cpu_seconds: stats
                .cpu_stats
                .and_then(|c| c.cpu_usage)
                .and_then(|u| u.total_usage)
                .unwrap_or(0) as f64
                / 1e9,
            pids: stats.pids_stats.and_then(|p| p.current).unwrap_or(0),
        })
    }

    async fn cgroup_parent(&self, shares: u64) -> Option<String> {
        // This machine's cgroups are the engine's only when it is local.
        let endpoint = self.endpoint();
        if shares == 0 || !(endpoint.starts_with("unix://") || endpoint.starts_with('/')) {
            return None;
        }
        self.cgroup_parent
            .get_or_init(|| async {
                let docker = self.client().await.ok()?;
                let info = self.call(docker.info()).await.ok()?;
                let driver = info.cgroup_driver.map(|d| d.to_string());
                let version = info.cgroup_version.map(|v| v.to_string());
                match prepare_cgroup_parent(driver.as_deref(), version.as_deref(), shares) {
                    Ok(parent) => {
                        tracing::debug!(parent, shares, "sandbox containers weigh together");
                        Some(parent.to_owned())
                    }
                    Err(why) => {
                        tracing::info!(
                            why,
                            "sandbox_cpu_shares not applied: containers stay under the engine's \
                             default cgroup parent"
                        );
                        None
                    }
                }
            })
            .await
            .clone()
    }

    async fn ping(&self) -> ProviderResult<()> {
        let docker = self.client().await?;
        self.call(docker.ping()).await.map(drop)
    }

    async fn runtimes(&self) -> ProviderResult<Option<Vec<String>>> {
        let docker = self.client().await?;
        let info = self.call(docker.info()).await?;
        Ok(info.runtimes.map(|r| r.into_keys().collect()))
    }

    async fn process(
        &self,
        id: &str,
        op: &ProcessOp,
    ) -> ProviderResult<(ProcessAnswer, DoneStatus)> {
        // Only over the agent's link (the caller checked that the agent
        // serves): processes live in the agent, no `docker exec` keeps them.
        let docker = self.client().await?;
        match self.links.process(docker, id, op).await {
            Ok(answered) => Ok(answered),
            Err(LinkError::Unavailable) => Err(ProviderError::Failed(
                "the sandbox's agent does not answer: try again in a few seconds".into(),
            )),
            Err(LinkError::NotSent(why)) => Err(ProviderError::Failed(format!(
                "the request did not reach the sandbox's agent: {why}"
            ))),
            Err(LinkError::Lost(why)) => {
                if let ProcessOp::Spawn(spawn) = op {
                    // Whether it started is unknown: never left running
                    // unknown to the caller.
                    let forget = ProcessOp::Forget {
                        id: spawn.id.clone(),
                    };
                    let _ = self.links.process(docker, id, &forget).await;
                }
                Err(ProviderError::Failed(why))
            }
        }
    }

    async fn connect_port(
        &self,
        id: &str,
        port: u16,
        agent_serves: bool,
    ) -> ProviderResult<super::PortStream> {
        let docker = self.client().await?;
        match self.links.port(docker, id, port).await {
            Ok(pipe) => return Ok(bridge(pipe)),
            Err(PortError::Refused(said)) => {
                let why = if said.is_empty() {
                    format!("nothing answered on port {port}")
                } else {
                    crate::error::policy_text(&said)
                };
                return Err(ProviderError::NotFound(why));
            }
            // The engine's way, below.
            Err(PortError::Unavailable(why)) => {
                tracing::debug!(container = id, why, "a port through docker exec");
            }
        }
        // Where the agent serves, as root under a `reap` that gives the
        // connection away to the sandbox user (see `connect_argv`): an exec
        // that starts as that user is the workload's to stop.
        let (cmd, user) = if agent_serves {
            let group = crate::dataplane::agent::engine_call_group();
            let argv = crate::dataplane::agent::connect_argv(port, Some((&self.exec_user, group)));
            (argv, ROOT.to_owned())
        } else {
            let argv = crate::dataplane::agent::connect_argv(port, None);
            (argv, self.exec_user.clone())
        };
        // Marked, so that the connection's processes end with it (see
        // `end` below), whatever the workload does to them.
        let marker = crate::dataplane::exec::new_execution_id();
        let config = ExecConfig {
            cmd: Some(cmd),
            attach_stdin: Some(true),
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            env: Some(vec![format!(
                "{}={marker}",
                sandbox_agent::protocol::EXEC_MARKER_VAR
            )]),
            user: Some(user),
            ..Default::default()
        };
        let exec = self.call(docker.create_exec(id, config)).await?;
        // Once the host is done with it (refused, given up on, closed, or
        // the caller went away while it connected), the kill ends its root
        // `reap` and `connect` by the marker: the workload may have stopped
        // them, and nothing else would. Only an exec whose output ended
        // (its processes are gone) is spared it.
        let kill_as = (!agent_serves).then(|| self.exec_user.clone());
        let why = KillReason::PortConnectionOver;
        let mut end = self.kill_on_drop(docker, id, &marker, kill_as, agent_serves, why);
        end.starting = true;
        let started = self
            .call(docker.start_exec(&exec.id, None::<StartExecOptions>))
            .await?;
        end.starting = false;
        let StartExecResults::Attached {
            mut output,
            mut input,
        } = started
        else {
            return Err(ProviderError::Failed(
                "the engine did not attach to the exec".into(),
            ));
        };
        // The agent says it connected (or why not) on stderr first.
        // Within the port's patience: the workload may stop the process
        // (the same user) before it says anything.
        let mut said = Vec::new();
        let listening = async {
            while let Some(frame) = output.next().await {
                match frame? {
                    LogOutput::StdErr { message } => {
                        said.extend_from_slice(&message);
                        // Bounded: the workload (the same user) may
                        // write into this process's stderr.
                        if said.ends_with(b"\n") || said.len() > 4096 {
                            break;
                        }
                    }
                    LogOutput::StdOut { .. } => break,
                    _ => {}
                }
            }
            Ok(())
        };
        let connected = match tokio::time::timeout(PORT_PATIENCE, listening).await {
            Ok(heard) => heard.map_err(|e: BollardError| convert(&e)),
            Err(_) => Err(ProviderError::Failed(format!(
                "port {port}: the connection was not made within {} s",
                PORT_PATIENCE.as_secs()
            ))),
        };
        let said = String::from_utf8_lossy(&said).trim().to_owned();
        connected?;
        if said != PORT_CONNECTED {
            let why = if said.is_empty() {
                format!("nothing answered on port {port} (no sandbox agent in the container?)")
            } else {
                crate::error::policy_text(&said)
            };
            return Err(ProviderError::NotFound(why));
        }
        let (ours, theirs) = tokio::io::duplex(PORT_BUFFER);
        let (mut from_client, mut to_client) = tokio::io::split(theirs);
        tokio::spawn(async move {
            // The guard itself (not just its flag) goes with the relay.
            let mut end = end;
            let to_container = async {
                let _ = tokio::io::copy(&mut from_client, &mut input).await;
                let _ = input.shutdown().await;
                // The client is done: the server has a while to finish its
                // answer, then the exec goes (a silent server holds nothing).
                tokio::time::sleep(PORT_LINGER).await;
            };
            // True when the exec's output ended (its processes are gone).
            let from_container = async {
                let mut ended = true;
                while let Some(frame) = output.next().await {
                    match frame {
                        Ok(LogOutput::StdOut { message }) => {
                            if to_client.write_all(&message).await.is_err() {
                                ended = false;
                                break;
                            }
                        }
                        Ok(_) => {}
                        Err(_) => {
                            ended = false;
                            break;
                        }
                    }
                }
                let _ = to_client.shutdown().await;
                ended
            };
            // The server closing ends the connection; the client closing
            // ends only its half (the response may still come).
            let ended = tokio::select! {
                () = to_container => false,
                ended = from_container => ended,
            };
            // A kill of what may still run, only then (on `end`'s drop).
            end.armed = !ended;
        });
        Ok(ours)
    }
}

/// A plane pipe carrying a port's connection, as the stream callers get:
/// the server closing ends it; the client closing ends its half, and the
/// server has [`PORT_LINGER`] to finish its answer.
fn bridge(pipe: tokio::net::UnixStream) -> super::PortStream {
    let (ours, theirs) = tokio::io::duplex(PORT_BUFFER);
    let (mut from_client, mut to_client) = tokio::io::split(theirs);
    let (mut from_server, mut to_server) = pipe.into_split();
    tokio::spawn(async move {
        let to_container = async {
            let _ = tokio::io::copy(&mut from_client, &mut to_server).await;
            let _ = to_server.shutdown().await;
            tokio::time::sleep(PORT_LINGER).await;
        };
        let from_container = async {
            let _ = tokio::io::copy(&mut from_server, &mut to_client).await;
            let _ = to_client.shutdown().await;
        };
        tokio::select! {
            () = to_container => {}
            () = from_container => {}
        }
    });
    ours
}

/// What `sandbox-agent connect` says once connected (agent/src/connect.rs).
const PORT_CONNECTED: &str = "sandbox-agent: connected";
/// Bytes buffered each way of a port connection.
const PORT_BUFFER: usize = 64 * 1024;
/// How long a port connection stays after its client closed its side.
const PORT_LINGER: Duration = Duration::from_secs(60);

#[cfg(test)]
mod tests {
    #[test]
    fn a_web_page_from_the_endpoint_is_named_not_printed() {
        let page = "<!DOCTYPE HTML>\n<html><head><title>Error response</title></head></html>";
        let shown = super::engine_message(page);
        assert!(
            shown.contains("web page") && !shown.contains("<title>"),
            "{shown}"
        );
        let long = "x".repeat(1000);
        assert!(super::engine_message(&long).len() < 340);
        assert_eq!(
            super::engine_message("No such container: c1"),
            "No such container: c1"
        );
    }

    use super::*;
    use crate::config::{Config, UserIds};

    /// Bug: a TCP `DOCKER_HOST` that refused gave "Error in the hyper
    /// legacy client", naming neither the endpoint nor the cause.
    #[tokio::test]
    async fn an_endpoint_that_refuses_is_named_with_the_cause() {
        let endpoint = "tcp://127.0.0.1:1";
        let provider = DockerProvider::with_endpoint(endpoint, Duration::from_secs(10));
        let err = provider.list(&[]).await.unwrap_err();
        let ProviderError::Unavailable(message) = &err else {
            panic!("not unavailable: {err:?}");
        };
        assert!(message.contains(endpoint), "{message}");
        assert!(message.to_lowercase().contains("refused"), "{message}");
    }

    /// An engine that accepts the connection and never answers.
    #[tokio::test]
    async fn an_endpoint_that_does_not_answer_is_named() {
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("tcp://{}", silent.local_addr().unwrap());
        let provider = DockerProvider::with_endpoint(&endpoint, Duration::from_millis(300));
        let err = provider.list(&[]).await.unwrap_err();
        let ProviderError::Unavailable(message) = &err else {
            panic!("not unavailable: {err:?}");
        };
        assert!(message.contains(&endpoint), "{message}");
        assert!(message.contains("did not answer"), "{message}");
    }

    #[test]
    fn an_unsupported_scheme_is_named_with_the_endpoint() {
        let provider = DockerProvider::with_endpoint("gopher://x", Duration::from_secs(1));
        let err = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(provider.list(&[]))
            .unwrap_err();
        assert!(err.to_string().contains("gopher://x"), "{err}");
    }

    #[test]
    fn the_create_body_is_hardened() {
        let config = Config::default();
        let plan = ContainerPlan::new(
            &config,
            &config.default_profile(),
            &sandbox_contract::BackendId::parse("alice").unwrap(),
            "/ws/alice".into(),
            UserIds {
                uid: 1000,
                gid: 1000,
            },
            [("sandbox.backend".to_owned(), "alice".to_owned())].into(),
        );
        let body = create_body(&plan);
        let host = body.host_config.unwrap();
        assert_eq!(host.cap_drop.unwrap(), ["ALL"]);
        assert_eq!(host.security_opt.unwrap(), ["no-new-privileges"]);
        assert_eq!(host.network_mode.as_deref(), Some("none"));
        assert_eq!(host.binds.unwrap(), ["/ws/alice:/workspace:rw"]);
        assert_eq!(host.init, Some(true));
        assert!(
            host.pids_limit.unwrap() > 0 && host.memory.unwrap() > 0 && host.nano_cpus.unwrap() > 0
        );
        assert_eq!(body.user.as_deref(), Some("1000:1000"));
        assert_eq!(body.network_disabled, Some(true));
        assert_eq!(body.labels.unwrap()["sandbox.backend"], "alice");
        assert_eq!(host.readonly_rootfs, Some(false));
        assert!(host.runtime.is_none());
    }

    #[test]
    fn where_the_agent_serves_it_alone_is_root_with_three_capabilities() {
        let plan = ContainerPlan::new(
            &Config::default(),
            &Config::default().default_profile(),
            &sandbox_contract::BackendId::parse("alice").unwrap(),
            "/ws/alice".into(),
            UserIds {
                uid: 1000,
                gid: 1000,
            },
            Default::default(),
        )
        .with_agent("/state/agent".into());
        let body = create_body(&plan);
        let host = body.host_config.unwrap();
        // The main process is the agent as root, pid 1 (no tini)...
        assert_eq!(body.user.as_deref(), Some("0:0"));
        assert_eq!(host.init, Some(false));
        assert_eq!(host.cap_drop.unwrap(), ["ALL"]);
        assert_eq!(host.cap_add.unwrap(), ["SETUID", "SETGID", "KILL"]);
        assert_eq!(host.security_opt.unwrap(), ["no-new-privileges"]);
        // ...told whom every command runs as.
        let cmd = body.cmd.unwrap();
        assert_eq!(cmd[1..], ["init", "--user", "1000:1000"]);
    }

    #[test]
    fn read_only_root_gets_a_writable_tmp_and_the_runtime_is_passed() {
        let config = Config {
            read_only_rootfs: true,
            runtime: Some("runsc".into()),
            ..Config::default()
        };
        let plan = ContainerPlan::new(
            &config,
            &config.default_profile(),
            &sandbox_contract::BackendId::parse("a").unwrap(),
            "/ws/a".into(),
            UserIds { uid: 1, gid: 1 },
            Default::default(),
        );
        let host = create_body(&plan).host_config.unwrap();
        assert_eq!(host.readonly_rootfs, Some(true));
        assert_eq!(
            host.tmpfs.unwrap()["/tmp"],
            format!("rw,nosuid,nodev,size={},mode=1777", 64 << 20)
        );
        assert_eq!(host.runtime.as_deref(), Some("runsc"));
        // gVisor's own tasks count on the host: headroom above the workload's.
        assert_eq!(
            host.pids_limit,
            Some(config.limits.pids + RUNSC_PIDS_OVERHEAD)
        );
        let runc = ContainerPlan {
            runtime: None,
            ..plan
        };
        assert_eq!(
            create_body(&runc).host_config.unwrap().pids_limit,
            Some(config.limits.pids)
        );
    }
}

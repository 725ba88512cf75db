//! Container providers: the engine operations the host needs, as a small
//! trait with a real backend ([`docker::DockerProvider`], bollard) and an
//! in-memory one ([`memory::MemoryProvider`]) for tests and footprint runs.
//!
//! Providers do no ownership checks; the host's engine layer does, on top.

pub mod agent_link;
pub mod docker;
pub mod memory;
pub mod plan;
pub mod plane;

use std::collections::HashMap;

use async_trait::async_trait;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::dataplane::exec::{ExecRequest, ExecResponse, OutputSink};
use crate::dataplane::processes::{ProcessAnswer, ProcessOp};
use crate::error::SandboxError;
pub use plan::ContainerPlan;
pub use sandbox_agent::protocol::DoneStatus;

pub use sandbox_contract::Status;

/// A container as the engine reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct ContainerRecord {
    /// The engine's container id.
    pub id: String,
    /// Without Docker's leading `/`.
    pub name: String,
    /// The image it was created from, as named at creation.
    pub image: String,
    /// Every label on the container (ownership labels among them).
    pub labels: HashMap<String, String>,
    /// Lifecycle state (created, running, exited, ...).
    pub status: Status,
    /// Unix seconds, when the engine reported it (listing does, inspect does not).
    pub created: Option<i64>,
}

/// A container's resource usage, as the engine reports it.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
#[cfg_attr(feature = "serve", derive(schemars::JsonSchema))]
pub struct ContainerStats {
    /// Memory in use, in bytes (0 when the engine does not say).
    pub memory_bytes: u64,
    /// The container's memory limit, in bytes (0 when unknown).
    pub memory_limit_bytes: u64,
    /// CPU time consumed since start.
    pub cpu_seconds: f64,
    /// Processes and threads alive now.
    pub pids: u64,
}

/// Engine failures, before they are converted at the boundary.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProviderError {
    /// The engine could not be reached (or did not answer in time); with
    /// the endpoint and cause.
    #[error("docker unavailable: {0}")]
    Unavailable(String),
    /// No such container (or other object).
    #[error("not found: {0}")]
    NotFound(String),
    /// A container with that name exists already.
    #[error("conflict: {0}")]
    Conflict(String),
    /// The image to create a container from is not present.
    #[error("{0}")]
    ImageMissing(String),
    /// Any other engine error, with its status and message.
    #[error("docker error: {0}")]
    Failed(String),
}

impl From<ProviderError> for SandboxError {
    fn from(e: ProviderError) -> Self {
        match e {
            ProviderError::Unavailable(m) => SandboxError::DockerUnavailable(m),
            ProviderError::NotFound(m) => SandboxError::NotFound(m),
            ProviderError::Conflict(m) => SandboxError::Refused(format!("name conflict: {m}")),
            ProviderError::ImageMissing(m) => SandboxError::NotFound(m),
            ProviderError::Failed(m) => SandboxError::Other(m),
        }
    }
}

/// The result of a [`ContainerProvider`] operation.
pub type ProviderResult<T> = Result<T, ProviderError>;

/// Streams of one exec, beyond the capped combined output.
#[derive(Default)]
pub struct ExecIo<'a> {
    /// Copied to the command's stdin, closed at its end (instead of the
    /// request's `stdin` bytes). A read error aborts the call.
    pub stdin: Option<&'a mut (dyn AsyncRead + Send + Unpin)>,
    /// Receives the command's stdout as it arrives (not kept: the response's
    /// output then holds stderr only, and its stdout is empty). A write
    /// error aborts the call: its processes are killed and an error returned.
    pub stdout: Option<&'a mut (dyn AsyncWrite + Send + Unpin)>,
    /// Sees each chunk of the kept output as it arrives.
    pub sink: Option<OutputSink<'a>>,
}

/// One connection to a port inside a container: both directions, closed
/// by dropping it.
pub type PortStream = tokio::io::DuplexStream;

/// What the host asks of a container engine.
#[async_trait]
pub trait ContainerProvider: Send + Sync + 'static {
    /// All containers (running or not) carrying every `key=value` label.
    async fn list(&self, labels: &[(&str, &str)]) -> ProviderResult<Vec<ContainerRecord>>;
    /// Create (not start); [`ProviderError::Conflict`] when the name is taken.
    async fn create(&self, plan: &ContainerPlan) -> ProviderResult<ContainerRecord>;
    /// Start; starting a running container succeeds.
    async fn start(&self, id: &str) -> ProviderResult<()>;
    /// `None` when the container does not exist.
    async fn inspect(&self, id: &str) -> ProviderResult<Option<ContainerRecord>>;
    /// Force-remove; false when it did not exist.
    async fn remove(&self, id: &str) -> ProviderResult<bool>;
    /// Run a command in a running container; on timeout, kill every
    /// process of the call and return what it printed so far. `sink`, when
    /// given, sees each output chunk as it arrives.
    async fn exec(
        &self,
        id: &str,
        request: &ExecRequest,
        sink: Option<OutputSink<'_>>,
    ) -> ProviderResult<ExecResponse> {
        let io = ExecIo {
            sink,
            ..ExecIo::default()
        };
        self.exec_io(id, request, io).await
    }
    /// [`ContainerProvider::exec`] with streamed stdin and / or stdout (file
    /// transfers, `exec -i`), as `request.user` when set. Memory stays
    /// bounded whatever flows through.
    async fn exec_io(
        &self,
        id: &str,
        request: &ExecRequest,
        io: ExecIo<'_>,
    ) -> ProviderResult<ExecResponse>;
    /// Resource usage right now.
    async fn stats(&self, id: &str) -> ProviderResult<ContainerStats>;
    /// A TCP connection to `127.0.0.1:port` inside a running container,
    /// made there by the sandbox user (`sandbox-agent connect`) and carried
    /// by the engine: the container needs no network. An error names why
    /// nothing accepted it.
    /// `agent_serves`: the container's agent is current, and a connection
    /// through the engine starts as root and is given away to the user.
    async fn connect_port(
        &self,
        id: &str,
        port: u16,
        agent_serves: bool,
    ) -> ProviderResult<PortStream> {
        let _ = (id, port, agent_serves);
        Err(ProviderError::Failed(
            "this engine cannot reach a container's ports".into(),
        ))
    }
    /// Carries out `op` on the background processes and terminals of a
    /// running container, which its agent keeps: the frames it answered
    /// and how it ended (anything but `Ok`: it was not carried out).
    async fn process(
        &self,
        id: &str,
        op: &ProcessOp,
    ) -> ProviderResult<(ProcessAnswer, DoneStatus)> {
        let _ = (id, op);
        Err(ProviderError::Failed(
            "this engine cannot run background processes".into(),
        ))
    }
    /// The OCI runtimes the engine lists (`runc`, `runsc`...); `None` when
    /// this engine does not say.
    async fn runtimes(&self) -> ProviderResult<Option<Vec<String>>> {
        Ok(None)
    }
    /// Waits (bounded) for the kills of abandoned calls to finish: a process
    /// about to exit calls it so a cancelled command does not outlive it.
    async fn settle(&self) {}

    /// The cgroup parent under which sandbox containers together weigh
    /// `shares` against the engine's own processes, once made; `None` where
    /// the engine cannot have one (the engine's default parent then).
    async fn cgroup_parent(&self, _shares: u64) -> Option<String> {
        None
    }
    /// Whether the engine answers.
    async fn ping(&self) -> ProviderResult<()>;
}

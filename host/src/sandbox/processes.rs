//! Background processes and terminals of a thread's sandbox: started like
//! executes (as the sandbox user, in the container the policy ensures),
//! kept by the container's agent (see `dataplane::processes`), so they
//! outlive the request and the host process that started them. Only a
//! spawn creates a container; every other request needs a running one. A
//! process lives in its user's container: another user's requests never
//! reach it, whatever id they name. Each request counts as a use of the
//! sandbox, and running processes hold off its idle removal (see
//! `engine::keep_alive`).

use std::time::Duration;

use super::Backend;
use crate::dataplane::agent::AgentMode;
use crate::dataplane::processes::{
    refusal, ProcessAnswer, ProcessId, ProcessInfo, ProcessOp, ProcessOptions, ProcessOutput,
    ProcessRequest, Signal, TerminalSize,
};
use crate::error::{Result, SandboxError};
use crate::provider::{DoneStatus, Status};

/// What a container made by an older host says when asked for processes.
const OLDER_AGENT: &str = "this sandbox's container was made by an older host, whose agent \
                           keeps no background processes: it is replaced when next idle \
                           (or destroy it now)";

/// How long a write waits for room in a process's input queue.
const WRITE_PATIENCE: Duration = Duration::from_secs(5);

/// Whether a request counts as a use of the sandbox (for its idle time).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Use {
    Counts,
    Not,
}

impl Backend {
    /// Starts `command` in the background (or on a terminal, see
    /// [`ProcessOptions::terminal`]) in this backend's container, ensured
    /// first; the process as it is right after its start.
    pub async fn start_process(
        &self,
        command: &str,
        options: ProcessOptions,
    ) -> Result<ProcessInfo> {
        let request = ProcessRequest::new(command, options)?;
        let id = request.id.clone();
        let (container, _work) = self.ensure_for_work().await?;
        if container.agent != AgentMode::Serves {
            return Err(SandboxError::Refused(OLDER_AGENT.into()));
        }
        self.carry_out(&container.id, ProcessOp::Spawn(request))
            .await?;
        let output = self
            .read_in(&container.id, &id, (0, 0), Duration::ZERO)
            .await?;
        Ok(output.info)
    }

    /// The processes kept in this backend's container (none when it does
    /// not run), oldest first.
    pub async fn processes(&self) -> Result<Vec<ProcessInfo>> {
        let Some(container) = self.running_container(Use::Counts).await? else {
            return Ok(Vec::new());
        };
        Ok(self.carry_out(&container, ProcessOp::List).await?.procs)
    }

    /// Output of process `id` from `offsets` (stdout, stderr) on, waiting
    /// up to `wait` for some (or for its end).
    pub async fn process_output(
        &self,
        id: &ProcessId,
        offsets: (u64, u64),
        wait: Duration,
    ) -> Result<ProcessOutput> {
        // Not a use: a follower's reads would keep an idle sandbox forever.
        let container = self.container_of(id, Use::Not).await?;
        self.read_in(&container, id, offsets, wait).await
    }

    /// Writes `data` to the process's stdin (its terminal's input: `\x03`
    /// is Ctrl-C); `None` closes its stdin.
    /// While its input queue is full (a paste into a program busy
    /// elsewhere) the write is tried again, for 5 s at most.
    pub async fn write_process(&self, id: &ProcessId, data: Option<Vec<u8>>) -> Result<()> {
        let container = self.container_of(id, Use::Counts).await?;
        let op = ProcessOp::Write {
            id: id.clone(),
            data,
        };
        let give_up = tokio::time::Instant::now() + WRITE_PATIENCE;
        loop {
            let (_, status) = self.engine().provider().process(&container, &op).await?;
            match status {
                DoneStatus::Ok => return Ok(()),
                DoneStatus::Busy if tokio::time::Instant::now() < give_up => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                refused => return Err(refusal(refused, &op)),
            }
        }
    }

    /// Sends `signal` to every process of its tree.
    pub async fn signal_process(&self, id: &ProcessId, signal: Signal) -> Result<()> {
        let container = self.container_of(id, Use::Counts).await?;
        let op = ProcessOp::Signal {
            id: id.clone(),
            signal,
        };
        self.carry_out(&container, op).await.map(drop)
    }

    /// Sets the size of the process's terminal.
    pub async fn resize_process(&self, id: &ProcessId, size: TerminalSize) -> Result<()> {
        let container = self.container_of(id, Use::Counts).await?;
        let op = ProcessOp::Resize {
            id: id.clone(),
            size: size.check()?,
        };
        self.carry_out(&container, op).await.map(drop)
    }

    /// Kills the process's tree if it runs, and forgets it.
    pub async fn remove_process(&self, id: &ProcessId) -> Result<()> {
        let container = self.container_of(id, Use::Counts).await?;
        let op = ProcessOp::Forget { id: id.clone() };
        self.carry_out(&container, op).await.map(drop)
    }

    async fn read_in(
        &self,
        container: &str,
        id: &ProcessId,
        offsets: (u64, u64),
        wait: Duration,
    ) -> Result<ProcessOutput> {
        let op = ProcessOp::Read {
            id: id.clone(),
            stdout_at: offsets.0,
            stderr_at: offsets.1,
            wait,
        };
        self.carry_out(container, op).await?.into_output(id)
    }

    /// The running container's id, which processes need.
    async fn container_of(&self, id: &ProcessId, counts: Use) -> Result<String> {
        self.running_container(counts).await?.ok_or_else(|| {
            SandboxError::NotFound(format!(
                "no process {id}: thread {}'s sandbox is not running",
                self.thread_id()
            ))
        })
    }

    /// This backend's container if it runs and its agent keeps processes;
    /// a use of it unless `counts` says not.
    async fn running_container(&self, counts: Use) -> Result<Option<String>> {
        let engine = self.engine();
        let Some(container) = engine.find(self.backend_id()).await? else {
            return Ok(None);
        };
        if container.status != Status::Running {
            return Ok(None);
        }
        if container.agent != AgentMode::Serves {
            return Err(SandboxError::Refused(OLDER_AGENT.into()));
        }
        if counts == Use::Counts {
            engine.usage().touch(&container.name);
        }
        Ok(Some(container.id.clone()))
    }

    /// `op` through the container's agent; an error when it did not carry
    /// it out.
    async fn carry_out(&self, container: &str, op: ProcessOp) -> Result<ProcessAnswer> {
        let (answer, status) = self.engine().provider().process(container, &op).await?;
        match status {
            DoneStatus::Ok => Ok(answer),
            refused => Err(refusal(refused, &op)),
        }
    }
}

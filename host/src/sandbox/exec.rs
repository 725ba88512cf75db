//! Executes, the data plane's first half: one command in a backend's
//! container, under the rules every execute shares (see
//! [`Backend::supervise`]): an id to cancel it by (in the namespace of the
//! thread's user), work counted in flight on the container from before it
//! is ensured, and a reason when the host ended it.

use tokio::io::AsyncRead;

use super::Backend;
use crate::dataplane::agent::AgentMode;
use crate::dataplane::exec::{
    EndReason, ExecOptions, ExecRequest, ExecResponse, OutputSink, StreamKind,
};
use crate::engine::clock::now_ms;
use crate::error::{Result, SandboxError};
use crate::policy::client::VerifiedContainer;
use crate::provider::{ExecIo, ProviderError};

impl Backend {
    /// Runs `sh -c command` in the backend's container (created or
    /// recreated first if needed), outside the policy's store, with the
    /// configured timeout.
    pub async fn execute(&self, command: &str) -> Result<ExecResponse> {
        self.execute_with(command, ExecOptions::default()).await
    }

    /// [`Backend::execute`] with a timeout, environment, working directory
    /// or stdin. On timeout every process the call started is killed, the
    /// output so far is returned with `timed_out` and exit code 124, and the
    /// container stays usable.
    pub async fn execute_with(&self, command: &str, options: ExecOptions) -> Result<ExecResponse> {
        self.run(command, options, None).await
    }

    /// [`Backend::execute_with`], calling `on_output` with each chunk of
    /// stdout / stderr as it arrives (the response still carries the capped
    /// combined output, and each stream capped alone).
    pub async fn execute_streaming(
        &self,
        command: &str,
        options: ExecOptions,
        mut on_output: impl FnMut(StreamKind, &[u8]) + Send,
    ) -> Result<ExecResponse> {
        self.run(command, options, Some(&mut on_output)).await
    }

    /// `command` with `options`, checked, under the configured output cap
    /// and default timeout.
    fn exec_request(&self, command: &str, options: ExecOptions) -> Result<ExecRequest> {
        let config = self.sandbox.config();
        ExecRequest::new(
            command,
            options,
            config.output_limit_bytes,
            config.exec_timeout(),
        )
    }

    async fn run(
        &self,
        command: &str,
        options: ExecOptions,
        sink: Option<OutputSink<'_>>,
    ) -> Result<ExecResponse> {
        let mut request = self.exec_request(command, options)?;
        self.supervise(&mut request, async |request, container| {
            let provider = self.engine().provider();
            provider.exec(&container.id, request, sink).await
        })
        .await
    }

    /// Runs one command under the rules every execute shares: registered
    /// by its id for cancellation (a cancel drops the call, which kills its
    /// process tree), counted in flight on the container, and, when a
    /// destroy killed it, reported as such: never a silent break.
    async fn supervise(
        &self,
        request: &mut ExecRequest,
        exec: impl AsyncFnOnce(
            &ExecRequest,
            &VerifiedContainer,
        ) -> std::result::Result<ExecResponse, ProviderError>,
    ) -> Result<ExecResponse> {
        let running = self.sandbox.register(self.user(), &request.marker)?;
        let id = request.marker.clone();
        let started = now_ms();
        let (container, _work) = tokio::select! {
            ready = self.ensure_for_work() => ready?,
            () = running.token.cancelled() => {
                return Ok(ExecResponse::ended(&id, EndReason::Cancelled));
            }
        };
        request.agent = container.agent != AgentMode::Absent;
        request.agent_serves = container.agent == AgentMode::Serves;
        let request = &*request;
        let outcome = tokio::select! {
            r = exec(request, &container) => r,
            () = running.token.cancelled() => {
                return Ok(ExecResponse::ended(&id, EndReason::Cancelled));
            }
        };
        let killed = match &outcome {
            Err(_) => true,
            Ok(r) => r.exit_code == EndReason::Destroyed.exit_code() || r.exit_code < 0,
        };
        if killed
            && self
                .engine()
                .usage()
                .destroyed_since(&container.name, started)
        {
            return Ok(ExecResponse::ended(&id, EndReason::Destroyed));
        }
        let mut response = outcome?;
        response.execution_id = id;
        Ok(response)
    }

    /// [`Backend::execute_streaming`] with stdin streamed from `stdin`
    /// (closed at its end) instead of buffered: input of any size costs a
    /// 64 KiB buffer. `options.stdin` must be `None`.
    pub async fn execute_streaming_stdin(
        &self,
        command: &str,
        options: ExecOptions,
        stdin: &mut (dyn AsyncRead + Send + Unpin),
        mut on_output: impl FnMut(StreamKind, &[u8]) + Send,
    ) -> Result<ExecResponse> {
        if options.stdin.is_some() {
            return Err(SandboxError::Refused(
                "give stdin as bytes or as a reader, not both".into(),
            ));
        }
        let mut request = self.exec_request(command, options)?;
        self.supervise(&mut request, async |request, container| {
            let provider = self.engine().provider();
            let io = ExecIo {
                stdin: Some(stdin),
                stdout: None,
                sink: Some(&mut on_output),
            };
            provider.exec_io(&container.id, request, io).await
        })
        .await
    }
}

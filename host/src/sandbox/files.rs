//! File transfer, the data plane's second half: uploads and downloads in a
//! backend's container, as the sandbox user, through the container's own
//! shell (see [`super::files`] for the scripts and the byte-exact sinks).
//! Every transfer counts as work in flight, like an execute; a streaming
//! download whose reader went away (an HTTP client that left) is stopped
//! within a second, its work released, even while the container sends
//! nothing.

use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::Backend;
use crate::dataplane::agent::AgentMode;
use crate::dataplane::exec::{ExecOptions, ExecRequest};
use crate::dataplane::files::{
    self, DownloadResult, DownloadSink, FileError, FileInfo, FileLimits, HostFile, Upload,
    UploadResult,
};
use crate::error::{policy_text, Result, SandboxError};
use crate::policy::client::VerifiedContainer;
use crate::provider::ExecIo;

impl Backend {
    /// The size caps of this backend's file transfers (`max_file_bytes`,
    /// `max_batch_bytes`).
    pub fn file_limits(&self) -> FileLimits {
        FileLimits::from_config(self.sandbox.config())
    }

    /// deepagents' `upload_files`: writes each file (parents created) as the
    /// sandbox user and answers one result per file, in order. Binary-safe;
    /// modes kept but for setuid, setgid and sticky bits. A file over
    /// [`FileLimits::max_file_bytes`] fails with `file_too_large`.
    pub async fn upload_files(&self, uploads: Vec<Upload>) -> Result<Vec<UploadResult>> {
        self.upload_files_with(uploads, &self.file_limits()).await
    }

    /// [`Backend::upload_files`] with explicit caps.
    pub async fn upload_files_with(
        &self,
        uploads: Vec<Upload>,
        limits: &FileLimits,
    ) -> Result<Vec<UploadResult>> {
        // One ensure for the whole batch.
        let (container, _work) = self.ensure_for_work().await?;
        let mut results = Vec::with_capacity(uploads.len());
        for upload in uploads {
            let len = upload.content.len() as u64;
            let mut content = &upload.content[..];
            let error = self
                .upload_one(
                    &container,
                    &upload.path,
                    &mut content,
                    len,
                    upload.mode,
                    limits,
                )
                .await?;
            results.push(UploadResult {
                path: upload.path,
                error,
            });
        }
        Ok(results)
    }

    /// Uploads one file of `len` bytes streamed from `reader` (which must
    /// yield at least that many): memory stays bounded whatever its size.
    pub async fn upload_from(
        &self,
        path: &str,
        reader: &mut (dyn AsyncRead + Send + Unpin),
        len: u64,
        mode: Option<u32>,
        limits: &FileLimits,
    ) -> Result<UploadResult> {
        let (container, _work) = self.ensure_for_work().await?;
        let error = self
            .upload_one(&container, path, reader, len, mode, limits)
            .await?;
        Ok(UploadResult {
            path: path.to_owned(),
            error,
        })
    }

    /// deepagents' `download_files`: one result per path, in order, with
    /// the content or a typed error. The batch holds at most
    /// [`FileLimits::max_batch_bytes`] of content (and each file at most
    /// [`FileLimits::max_file_bytes`]); a file past either fails with
    /// `file_too_large` before its content is read. Use
    /// [`Backend::download_to`] for large files.
    pub async fn download_files(&self, paths: &[String]) -> Result<Vec<DownloadResult>> {
        self.download_files_with(paths, &self.file_limits()).await
    }

    /// [`Backend::download_files`] with explicit caps.
    pub async fn download_files_with(
        &self,
        paths: &[String],
        limits: &FileLimits,
    ) -> Result<Vec<DownloadResult>> {
        let (container, _work) = self.ensure_for_work().await?;
        let mut budget = limits.max_batch_bytes;
        let mut results = Vec::with_capacity(paths.len());
        for path in paths {
            let mut content = Vec::new();
            let cap = limits.max_file_bytes.min(budget);
            let sink = DownloadSink::in_memory(&mut content, cap);
            let got = self.download_one(&container, path, sink, cap).await?;
            results.push(match got {
                Ok(info) => {
                    budget -= info.size.min(budget);
                    DownloadResult {
                        path: path.clone(),
                        content: Some(content),
                        mode: Some(info.mode),
                        error: None,
                    }
                }
                Err(error) => DownloadResult {
                    path: path.clone(),
                    content: None,
                    mode: None,
                    error: Some(error),
                },
            });
        }
        Ok(results)
    }

    /// Streams one file into `writer` (flushed at the end): the per-file
    /// outcome, or `Err` when the transfer broke. Memory stays bounded
    /// whatever its size; a file over [`FileLimits::max_file_bytes`] fails
    /// with `file_too_large` before any byte is written.
    ///
    /// When `writer` is the writing half of a pipe whose reader went away
    /// (a [`tokio::io::DuplexStream`] whose other half dropped: a zero-byte
    /// write fails), the transfer is stopped within half a second, and its
    /// work in flight released, even while the container sends nothing.
    pub async fn download_to(
        &self,
        path: &str,
        writer: &mut (dyn AsyncWrite + Send + Unpin),
        limits: &FileLimits,
    ) -> Result<std::result::Result<FileInfo, FileError>> {
        let watched = Watched::new(writer);
        let mut shared = &watched;
        tokio::select! {
            done = self.download_stream(path, &mut shared, limits) => done,
            () = watched.gone() => Err(SandboxError::Other(format!(
                "the reader of {} went away: the transfer was stopped",
                policy_text(path)
            ))),
        }
    }

    /// [`Backend::download_to`] without the watch on its reader.
    async fn download_stream(
        &self,
        path: &str,
        writer: &mut (dyn AsyncWrite + Send + Unpin),
        limits: &FileLimits,
    ) -> Result<std::result::Result<FileInfo, FileError>> {
        let (container, _work) = self.ensure_for_work().await?;
        let cap = limits.max_file_bytes;
        let sink = DownloadSink::new(writer, cap);
        self.download_one(&container, path, sink, cap).await
    }

    /// Downloads one file to `local` on the host (a file, or an existing
    /// directory to create the file in), through a `HostFile`: written
    /// under a temporary name, never through a symlink, mode masked with
    /// `HOST_MODE_MASK` (0o775), renamed into place only when complete.
    /// Returns where it landed.
    pub async fn download_to_file(
        &self,
        path: &str,
        local: &std::path::Path,
        limits: &FileLimits,
    ) -> Result<std::result::Result<(std::path::PathBuf, FileInfo), FileError>> {
        let resolved = match files::resolve_file_path(path) {
            Ok(r) => r,
            Err(e) => return Ok(Err(e)),
        };
        let mut target = HostFile::create(local, files::file_name(&resolved))
            .map_err(|e| SandboxError::Other(format!("{}: {e}", local.display())))?;
        match self.download_stream(path, target.file(), limits).await? {
            Ok(info) => {
                let landed = target
                    .commit(info.mode)
                    .await
                    .map_err(|e| SandboxError::Other(format!("{}: {e}", local.display())))?;
                Ok(Ok((landed, info)))
            }
            Err(e) => Ok(Err(e)),
        }
    }

    /// One upload: lexical check, size cap, then the upload script as the
    /// sandbox user with the content on its stdin.
    async fn upload_one(
        &self,
        container: &VerifiedContainer,
        path: &str,
        reader: &mut (dyn AsyncRead + Send + Unpin),
        len: u64,
        mode: Option<u32>,
        limits: &FileLimits,
    ) -> Result<Option<FileError>> {
        let resolved = match files::resolve_file_path(path) {
            Ok(r) => r,
            Err(e) => return Ok(Some(e)),
        };
        if len > limits.max_file_bytes {
            return Ok(Some(FileError::FileTooLarge));
        }

        let request =
            self.transfer_request(&files::upload_command(&resolved, mode, len), container)?;
        let mut content = reader.take(len);
        let io = ExecIo {
            stdin: Some(&mut content),
            ..ExecIo::default()
        };
        let provider = self.engine().provider();
        let response = provider.exec_io(&container.id, &request, io).await?;
        if response.timed_out {
            return Err(stalled(path, &request));
        }
        files::parse_upload_answer(&response.output).map_err(|m| {
            // The script answers on stdout; anything else (it could not
            // start, it was killed) is in its exit code and stderr.
            SandboxError::Other(format!(
                "uploading {}: {m} (exit code {}{})",
                policy_text(path),
                response.exit_code,
                if response.stderr.is_empty() {
                    String::new()
                } else {
                    format!(": {}", policy_text(response.stderr.trim()))
                }
            ))
        })
    }

    /// One download into `sink`: lexical check, then the download script
    /// as the sandbox user, its stdout checked by the sink.
    async fn download_one(
        &self,
        container: &VerifiedContainer,
        path: &str,
        mut sink: DownloadSink<'_>,
        cap: u64,
    ) -> Result<std::result::Result<FileInfo, FileError>> {
        let resolved = match files::resolve_file_path(path) {
            Ok(r) => r,
            Err(e) => return Ok(Err(e)),
        };
        let request = self.transfer_request(&files::download_command(&resolved, cap), container)?;
        let io = ExecIo {
            stdout: Some(&mut sink),
            ..ExecIo::default()
        };
        let provider = self.engine().provider();
        let response = provider.exec_io(&container.id, &request, io).await;
        let shown = policy_text(path);
        match response {
            // The sink refused (over the cap): the transfer was aborted.
            Err(e) => match sink.refusal() {
                Some(refused) => Ok(Err(refused)),
                None => Err(e.into()),
            },
            Ok(r) if r.timed_out => Err(stalled(path, &request)),
            Ok(_) => {
                sink.flush()
                    .await
                    .map_err(|e| SandboxError::Other(format!("writing {shown}: {e}")))?;
                sink.finish()
                    .map_err(|m| SandboxError::Other(format!("downloading {shown}: {m}")))
            }
        }
    }

    /// A transfer exec: as the sandbox user, stalled after the exec timeout
    /// without progress, stderr dropped.
    fn transfer_request(
        &self,
        command: &str,
        container: &VerifiedContainer,
    ) -> Result<ExecRequest> {
        let config = self.sandbox.config();
        let mut request = ExecRequest::new(
            command,
            ExecOptions::default(),
            TRANSFER_ANSWER_BYTES,
            config.exec_timeout(),
        )?;
        let user = config.sandbox_user();
        request.user = Some(format!("{}:{}", user.uid, user.gid));
        request.idle_timeout = true;
        // Where the agent serves, its bytes take a plane pipe when there is
        // one (else `docker exec`, under `reap`).
        request.agent = container.agent != AgentMode::Absent;
        request.agent_serves = container.agent == AgentMode::Serves;
        Ok(request)
    }
}

/// Output kept from a transfer exec (its answer line).
const TRANSFER_ANSWER_BYTES: usize = 4096;

/// How often a streaming download checks that its reader is still there.
const READER_CHECK: Duration = Duration::from_millis(500);

/// A streaming download's writer, shared by its sink (which writes) and a
/// watch (which notices that the reader went away while nothing is
/// written). Both run in one task: the lock is never contended, and never
/// held across an await.
struct Watched<'a> {
    writer: Mutex<&'a mut (dyn AsyncWrite + Send + Unpin)>,
}

impl<'a> Watched<'a> {
    fn new(writer: &'a mut (dyn AsyncWrite + Send + Unpin)) -> Self {
        Watched {
            writer: Mutex::new(writer),
        }
    }

    fn using<T>(
        &self,
        f: impl FnOnce(Pin<&mut (dyn AsyncWrite + Send + Unpin)>) -> Poll<T>,
    ) -> Poll<T> {
        let mut writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        f(Pin::new(&mut **writer))
    }

    /// Resolves once a zero-byte write fails: the reader went away. A pipe
    /// tells at once; writers that accept empty writes never resolve it.
    async fn gone(&self) {
        let mut tick = tokio::time::interval(READER_CHECK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let closed = std::future::poll_fn(|cx| match self.using(|w| w.poll_write(cx, &[])) {
                Poll::Ready(written) => Poll::Ready(written.is_err()),
                // Full: the sink's write waits on it too; check later.
                Poll::Pending => Poll::Ready(false),
            })
            .await;
            if closed {
                return;
            }
        }
    }
}

impl AsyncWrite for &Watched<'_> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.using(|w| w.poll_write(cx, buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.using(|w| w.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.using(|w| w.poll_shutdown(cx))
    }
}

fn stalled(path: &str, request: &ExecRequest) -> SandboxError {
    SandboxError::Other(format!(
        "the transfer of {} made no progress for {:.0}s and was stopped",
        policy_text(path),
        request.timeout.as_secs_f64()
    ))
}

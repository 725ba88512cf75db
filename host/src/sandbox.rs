//! The library API, mirroring the seed's `DockerSandboxBackend` manager:
//! `get_thread_backend`, `Backend::execute`, `destroy_user_backend`,
//! `destroy_thread_backend`.

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::capabilities::{Capabilities, ManagedContainer};
use crate::config::Config;
use crate::error::policy_text;
use crate::error::{Result, SandboxError};
use crate::exec::{ExecOptions, ExecRequest, ExecResponse, StreamKind};
use crate::files::{
    self, DownloadResult, DownloadSink, FileError, FileInfo, FileLimits, HostFile, Upload,
    UploadResult,
};
use crate::inflight::Work;
use crate::policies;
use crate::provider::docker::DockerProvider;
use crate::provider::{ContainerProvider, ExecIo};
use crate::runtime::lanes::Lanes;
use crate::runtime::{CompiledPolicy, PolicyEngine};

/// The lane of `maintain`: not a valid id, so no backend can share it.
const MAINTENANCE_KEY: &str = "#maintenance";

/// Where a policy component comes from.
#[derive(Debug, Clone)]
pub enum PolicySource {
    /// A component shipped in the binary: `per-user` or `per-thread`.
    Builtin(String),
    /// A `.wasm` component on disk.
    File(std::path::PathBuf),
    /// Component bytes, with a label for messages.
    Bytes { label: String, bytes: Vec<u8> },
}

impl PolicySource {
    /// The configured policy file, or the embedded per-user policy.
    pub fn from_config(config: &Config) -> Self {
        match &config.policy {
            Some(path) => PolicySource::File(path.clone()),
            None => PolicySource::Builtin("per-user".into()),
        }
    }

    fn read(&self) -> Result<(String, Vec<u8>)> {
        match self {
            PolicySource::Builtin(name) => policies::builtin(name)
                .map(|b| (format!("embedded {name}"), b.to_vec()))
                .ok_or_else(|| {
                    SandboxError::PolicyLoad(format!("no built-in policy named {name:?}"))
                }),
            PolicySource::File(path) => read_component(path)
                .map(|b| (path.display().to_string(), b))
                .map_err(|e| SandboxError::PolicyLoad(format!("{}: {e}", path.display()))),
            PolicySource::Bytes { label, bytes } => {
                check_component_size(bytes.len() as u64)
                    .map_err(|e| SandboxError::PolicyLoad(format!("{label}: {e}")))?;
                Ok((label.clone(), bytes.clone()))
            }
        }
    }
}

/// The largest policy component loaded (a componentize-py policy is ~20 MB).
pub const MAX_COMPONENT_BYTES: u64 = 64 * 1024 * 1024;

fn check_component_size(len: u64) -> std::io::Result<()> {
    if len > MAX_COMPONENT_BYTES {
        return Err(std::io::Error::other(format!(
            "{len} bytes is over the {MAX_COMPONENT_BYTES}-byte limit for policy components"
        )));
    }
    Ok(())
}

/// Reads a component file: a regular file of bounded size only. A device
/// (`/dev/zero`) or a FIFO would otherwise be read without end, or block.
fn read_component(path: &std::path::Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    // Non-blocking open: opening a FIFO must not wait for a writer.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits())
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(std::io::Error::other(
            "not a regular file (a device, FIFO or directory cannot be a policy component)",
        ));
    }
    check_component_size(meta.len())?;
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    // Bounded even if the file grows while it is read.
    file.take(MAX_COMPONENT_BYTES + 1).read_to_end(&mut bytes)?;
    check_component_size(bytes.len() as u64)?;
    Ok(bytes)
}

#[cfg(test)]
mod component_file_tests {
    use super::*;

    #[test]
    fn devices_and_fifos_are_refused_without_reading_or_blocking() {
        // The bug: `policy check /dev/zero` read 4.6 GB in 5 s.
        let err = read_component(std::path::Path::new("/dev/zero")).unwrap_err();
        assert!(err.to_string().contains("not a regular file"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let err = read_component(&fifo).unwrap_err();
        assert!(err.to_string().contains("not a regular file"), "{err}");
    }

    #[test]
    fn an_oversized_component_is_refused_by_its_size() {
        let dir = tempfile::tempdir().unwrap();
        let big = dir.path().join("big.wasm");
        let f = std::fs::File::create(&big).unwrap();
        f.set_len(MAX_COMPONENT_BYTES + 1).unwrap(); // sparse: costs nothing
        let err = read_component(&big).unwrap_err();
        assert!(
            err.to_string().contains("limit for policy components"),
            "{err}"
        );
    }
}

/// A per-conversation sandbox manager: cheap to clone, safe to share.
///
/// ```no_run
/// # async fn demo() -> anyhow::Result<()> {
/// use sandbox_host::{Config, Sandbox};
/// let sandbox = Sandbox::new(Config::load(None)?).await?;
/// let backend = sandbox.get_thread_backend("alice-7f3a").await?;
/// assert_eq!(backend.id(), "alice");
/// let out = backend.execute("echo hello > note.txt && cat note.txt").await?;
/// assert_eq!(out.output, "hello\n");
/// sandbox.destroy_user_backend("alice").await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Sandbox {
    inner: Arc<Inner>,
}

struct Inner {
    caps: Arc<Capabilities>,
    lanes: Lanes,
    engine: PolicyEngine,
}

impl Sandbox {
    /// A sandbox on the Docker engine (`DOCKER_HOST` honoured) with the
    /// configured policy.
    pub async fn new(config: Config) -> Result<Self> {
        let provider = Arc::new(DockerProvider::from_config(&config));
        let source = PolicySource::from_config(&config);
        Self::with_provider(config, provider, source).await
    }

    /// A sandbox on any provider with any policy (tests, other engines).
    pub async fn with_provider(
        config: Config,
        provider: Arc<dyn ContainerProvider>,
        policy: PolicySource,
    ) -> Result<Self> {
        config
            .validate()
            .map_err(|e| SandboxError::Other(format!("{e:#}")))?;
        let cache = config
            .component_cache_dir
            .clone()
            .map(crate::runtime::cache::ComponentCache::new);
        let engine = PolicyEngine::with_cache(cache)
            .map_err(|e| SandboxError::Other(format!("wasmtime: {e:#}")))?;
        let caps = Arc::new(Capabilities::new(config, provider));
        let (label, bytes) = policy.read()?;
        let compiled = CompiledPolicy::load(&engine, &bytes, &label, &caps).await?;
        tracing::debug!(
            policy = compiled.name(),
            source = compiled.source(),
            "policy loaded"
        );
        let lanes = Lanes::new(caps.clone(), Arc::new(compiled));
        let sandbox = Sandbox {
            inner: Arc::new(Inner {
                caps,
                lanes,
                engine,
            }),
        };
        sandbox.start_maintenance();
        Ok(sandbox)
    }

    /// The configuration this sandbox runs with.
    pub fn config(&self) -> &Config {
        self.inner.caps.config()
    }

    /// The running policy's name (`per-user`, `per-thread`, ...).
    pub fn policy_name(&self) -> String {
        self.inner.lanes.policy().name().to_owned()
    }

    /// Loads, self-checks and switches to another policy. On any error the
    /// running policy stays.
    pub async fn swap_policy(&self, policy: PolicySource) -> Result<()> {
        let (label, bytes) = policy.read()?;
        let compiled =
            CompiledPolicy::load(&self.inner.engine, &bytes, &label, &self.inner.caps).await?;
        self.inner.lanes.swap_policy(Arc::new(compiled));
        Ok(())
    }

    /// The backend id the policy maps a thread to (no Docker call).
    pub async fn backend_id(&self, thread_id: &str) -> Result<String> {
        let user = policy_core::ids::parse_thread(thread_id)?.user;
        let id = self
            .inner
            .lanes
            .route(thread_id, async |p| p.backend_id(thread_id).await)
            .await?;
        policy_core::ids::validate_backend(&id).map_err(|e| {
            SandboxError::Refused(format!(
                "the policy mapped a thread to an invalid backend id: {e}"
            ))
        })?;
        // Never one user's commands in another user's sandbox.
        if policy_core::ids::user_of_backend(&id) != user {
            return Err(SandboxError::Refused(format!(
                "the policy mapped a thread of user {user} to backend {id}, which belongs to another user"
            )));
        }
        Ok(id)
    }

    /// What serves a thread, without side effects: its backend id, user and
    /// workspace by the policy's pure mapping, and the backend's container
    /// if one exists. Creates no workspace and no container (for HTTP GET).
    pub async fn describe_thread(&self, thread_id: &str) -> Result<ThreadInfo> {
        let backend_id = self.backend_id(thread_id).await?;
        let user_id = policy_core::ids::user_of_backend(&backend_id).to_owned();
        let container = self.inner.caps.find(&backend_id).await?;
        Ok(ThreadInfo {
            workspace: user_id.clone(),
            user_id,
            backend_id,
            container,
        })
    }

    /// The seed's `get_thread_backend`: the (lazily created) backend of a
    /// thread. Prepares the workspace; creates no container.
    pub async fn get_thread_backend(&self, thread_id: &str) -> Result<Backend> {
        let key = self.backend_id(thread_id).await?;
        let backend = self
            .inner
            .lanes
            .call(&key, async |p| p.get_thread_backend(&key, thread_id).await)
            .await?;
        if backend.id != key {
            return Err(SandboxError::Refused(format!(
                "the policy's get-thread-backend answered backend {:?} but backend-id said {key:?}",
                backend.id
            )));
        }
        let user = policy_core::ids::user_of_backend(&key);
        if backend.user_id != user || backend.workspace != user {
            return Err(SandboxError::Refused(format!(
                "the policy's backend for a thread of user {user} names user {:?} and workspace {:?}",
                backend.user_id, backend.workspace
            )));
        }
        Ok(Backend {
            id: backend.id,
            user_id: backend.user_id,
            workspace: backend.workspace,
            thread_id: thread_id.to_owned(),
            sandbox: self.clone(),
        })
    }

    /// The seed's `destroy_user_backend`: removes the user's container(s).
    /// False when the user had none. Commands in flight on them (from any
    /// host process) get `destroy_grace_secs` to finish first.
    pub async fn destroy_user_backend(&self, user_id: &str) -> Result<bool> {
        let grace = self.destroy_grace();
        self.destroy_user_backend_within(user_id, grace).await
    }

    /// [`Sandbox::destroy_user_backend`] with its own grace period (zero:
    /// kill what runs now, as `--force`).
    pub async fn destroy_user_backend_within(
        &self,
        user_id: &str,
        grace: std::time::Duration,
    ) -> Result<bool> {
        policy_core::ids::validate_user(user_id)?;
        self.drain(grace, |backend| {
            policy_core::ids::user_of_backend(backend) == user_id
        })
        .await?;
        self.inner
            .lanes
            .call(user_id, async |p| p.destroy_user_backend(user_id).await)
            .await
    }

    /// The seed's `destroy_thread_backend`: destroys the backend serving the
    /// thread (the whole user's under the per-user policy), after the grace
    /// period for commands in flight.
    pub async fn destroy_thread_backend(&self, thread_id: &str) -> Result<bool> {
        let grace = self.destroy_grace();
        self.destroy_thread_backend_within(thread_id, grace).await
    }

    /// [`Sandbox::destroy_thread_backend`] with its own grace period.
    pub async fn destroy_thread_backend_within(
        &self,
        thread_id: &str,
        grace: std::time::Duration,
    ) -> Result<bool> {
        let key = self.backend_id(thread_id).await?;
        self.drain(grace, |backend| backend == key).await?;
        self.inner
            .lanes
            .call(&key, async |p| {
                p.destroy_thread_backend(&key, thread_id).await
            })
            .await
    }

    fn destroy_grace(&self) -> std::time::Duration {
        std::time::Duration::from_secs_f64(self.config().destroy_grace_secs)
    }

    /// Waits up to `grace` for the work in flight on the containers of the
    /// backends `which` selects to end.
    async fn drain(&self, grace: std::time::Duration, which: impl Fn(&str) -> bool) -> Result<()> {
        let busy: Vec<ManagedContainer> = self
            .list()
            .await?
            .into_iter()
            .filter(|c| which(&c.backend_id) && c.in_flight > 0)
            .collect();
        for c in busy {
            let left = self.inner.caps.in_flight().drain(&c.name, grace).await;
            if left > 0 {
                tracing::warn!(
                    container = c.name,
                    left,
                    "destroy: grace period over, killing work in flight"
                );
            }
        }
        Ok(())
    }

    /// Every container this host's namespace manages.
    pub async fn list(&self) -> Result<Vec<ManagedContainer>> {
        self.inner.caps.list_managed().await
    }

    /// Finds (and unless `dry_run`, removes) managed containers that no
    /// backend owns any more: stopped or dead ones, ones labelled by another
    /// policy than the running one (left by a swap), and,
    /// with `max_age`, ones created longer ago. Only containers labelled for
    /// this namespace are ever considered.
    pub async fn gc(
        &self,
        max_age: Option<std::time::Duration>,
        dry_run: bool,
    ) -> Result<Vec<GcEntry>> {
        let now = (crate::capabilities::now_ms() / 1000) as i64;
        // First the policy's own housekeeping (idle TTL, capacity).
        if !dry_run {
            let removed = self.maintain().await?;
            tracing::info!(removed, "policy maintenance");
        }
        let mut entries = Vec::new();
        let policy = self.policy_name();
        for container in self.list().await? {
            // Ownership comes from the host's own labels, never from asking
            // the policy again: a policy whose backend ids do not map to
            // themselves must not get live containers collected.
            let reason = if container.policy != policy {
                Some(format!(
                    "created by policy {:?}, not the running policy {policy}",
                    container.policy
                ))
            } else if policy_core::ids::validate_backend(&container.backend_id).is_err() {
                Some("its backend label is not a valid backend id".to_owned())
            } else if matches!(
                container.status,
                crate::provider::Status::Exited | crate::provider::Status::Dead
            ) {
                Some(format!("{:?}", container.status).to_lowercase())
            } else {
                match (max_age, container.created) {
                    (Some(max), Some(created)) if now - created >= max.as_secs() as i64 => {
                        Some(format!("older than {}s", max.as_secs()))
                    }
                    _ => None,
                }
            };
            let Some(mut reason) = reason else { continue };
            if container.in_flight > 0 {
                reason = format!(
                    "{reason}; deferred while {} command(s) run on it",
                    container.in_flight
                );
            }
            let removed = if dry_run {
                false
            } else {
                // Through the backend's lane: never under a running ensure.
                let caps = self.inner.caps.clone();
                let id = container.id.clone();
                self.inner
                    .lanes
                    .call(&container.backend_id, async move |_| {
                        caps.remove_unless_busy(&id, true).await
                    })
                    .await?
            };
            tracing::info!(container = container.name, reason, removed, "gc");
            entries.push(GcEntry {
                container,
                reason,
                removed,
            });
        }
        Ok(entries)
    }

    /// Runs the policy's `maintain` (idle TTL, capacity) now, on an
    /// instance of its own. Returns how many containers it removed.
    pub async fn maintain(&self) -> Result<u32> {
        self.inner
            .lanes
            .call(MAINTENANCE_KEY, async |p| p.maintain().await)
            .await
    }

    /// Calls `maintain` every `maintenance_interval_secs` while this sandbox
    /// (any clone) is alive, when running inside a tokio runtime.
    fn start_maintenance(&self) {
        let interval = self.config().maintenance_interval_secs;
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if !(interval > 0.0 && interval.is_finite()) {
            return;
        }
        let weak = Arc::downgrade(&self.inner);
        runtime.spawn(async move {
            let period = std::time::Duration::from_secs_f64(interval);
            loop {
                tokio::time::sleep(period).await;
                let Some(inner) = weak.upgrade() else { break };
                let sandbox = Sandbox { inner };
                match sandbox.maintain().await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(removed = n, "maintenance removed containers"),
                    Err(e) => tracing::warn!(error = %e, "maintenance failed"),
                }
            }
        });
    }

    /// Resource usage of a managed container.
    pub async fn stats(&self, container_id: &str) -> Result<crate::provider::ContainerStats> {
        let owned = self
            .inner
            .caps
            .inspect(container_id)
            .await?
            .ok_or_else(|| SandboxError::NotFound(format!("container {container_id}")))?;
        Ok(self.inner.caps.provider().stats(&owned.id).await?)
    }

    /// Waits (at most ~10 s) until calls abandoned mid-way (dropped
    /// futures) have had their processes killed. Call it before exiting.
    pub async fn settle(&self) {
        self.inner.caps.provider().settle().await;
    }

    /// Whether the engine answers.
    pub async fn ping(&self) -> Result<()> {
        Ok(self.inner.caps.provider().ping().await?)
    }

    /// Counters for monitoring.
    pub fn counters(&self) -> Counters {
        use std::sync::atomic::Ordering::Relaxed;
        Counters {
            containers_created: self.inner.caps.created.load(Relaxed),
            policy_traps: self.inner.lanes.traps.load(Relaxed),
        }
    }

    /// Policy instances currently kept (one per recently used key).
    pub fn policy_instances(&self) -> usize {
        self.inner.lanes.lane_count()
    }

    async fn ensure_container(&self, backend_id: &str) -> Result<ManagedContainer> {
        let c = self
            .inner
            .lanes
            .call(backend_id, async |p| p.ensure_container(backend_id).await)
            .await?;
        // The policy may only hand back the container the host gave it for
        // this backend: never a forged id or another backend's container.
        self.inner.caps.check_serves(&c.id, backend_id)?;
        self.inner.caps.touch(&c.id);
        Ok(ManagedContainer {
            id: c.id,
            name: c.name,
            backend_id: c.backend_id,
            workspace: c.workspace,
            policy: self.policy_name(),
            status: crate::provider::Status::Running,
            created: None,
            last_used_ms: crate::capabilities::now_ms(),
            in_flight: 0,
        })
    }
}

/// What [`Sandbox::describe_thread`] tells.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ThreadInfo {
    #[serde(rename = "id")]
    pub backend_id: String,
    pub user_id: String,
    pub workspace: String,
    /// The backend's container, when it has one now.
    pub container: Option<ManagedContainer>,
}

/// Monotonic counters of one sandbox.
#[derive(Debug, Clone, Copy, Default)]
pub struct Counters {
    pub containers_created: u64,
    pub policy_traps: u64,
}

/// One container `gc` found.
#[derive(Debug, Clone, serde::Serialize)]
pub struct GcEntry {
    pub container: ManagedContainer,
    pub reason: String,
    /// False on a dry run.
    pub removed: bool,
}

/// The backend of a thread: a lazily created container and a workspace.
#[derive(Clone)]
pub struct Backend {
    id: String,
    user_id: String,
    workspace: String,
    thread_id: String,
    sandbox: Sandbox,
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backend")
            .field("id", &self.id)
            .field("user_id", &self.user_id)
            .field("workspace", &self.workspace)
            .field("thread_id", &self.thread_id)
            .finish()
    }
}

impl Backend {
    /// The backend id: the user id under the per-user policy.
    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn user_id(&self) -> &str {
        &self.user_id
    }

    /// The workspace name; the host directory is `{root}/{workspace}`.
    pub fn workspace(&self) -> &str {
        &self.workspace
    }

    pub fn thread_id(&self) -> &str {
        &self.thread_id
    }

    /// The seed's `_ensure_container`: a running container for this backend.
    pub async fn ensure_container(&self) -> Result<ManagedContainer> {
        self.sandbox.ensure_container(&self.id).await
    }

    /// The container, with work marked in flight on it (from before it is
    /// ensured, so maintenance never removes it between the two) until the
    /// guard drops.
    async fn ensure_for_work(&self) -> Result<(ManagedContainer, Option<Work>)> {
        let name = crate::naming::container_name(&self.sandbox.config().namespace, &self.id);
        let work = self.sandbox.inner.caps.begin_work(&name);
        let container = self.ensure_container().await?;
        Ok((container, work))
    }

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
    /// combined output).
    pub async fn execute_streaming(
        &self,
        command: &str,
        options: ExecOptions,
        mut on_output: impl FnMut(StreamKind, &[u8]) + Send,
    ) -> Result<ExecResponse> {
        self.run(command, options, Some(&mut on_output)).await
    }

    async fn run(
        &self,
        command: &str,
        options: ExecOptions,
        sink: Option<crate::exec::OutputSink<'_>>,
    ) -> Result<ExecResponse> {
        let config = self.sandbox.config();
        let mut request = ExecRequest::new(
            command,
            options,
            config.output_limit_bytes,
            config.exec_timeout(),
        )?;
        let (container, _work) = self.ensure_for_work().await?;
        request.agent = self.sandbox.inner.caps.has_agent(&container.id);
        let provider = self.sandbox.inner.caps.provider();
        let response = provider.exec(&container.id, &request, sink).await;
        // A long command is a use until it ends, not only when it starts.
        self.sandbox.inner.caps.touch(&container.id);
        Ok(response?)
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
        let config = self.sandbox.config();
        let mut request = ExecRequest::new(
            command,
            options,
            config.output_limit_bytes,
            config.exec_timeout(),
        )?;
        let (container, _work) = self.ensure_for_work().await?;
        request.agent = self.sandbox.inner.caps.has_agent(&container.id);
        let provider = self.sandbox.inner.caps.provider();
        let io = ExecIo {
            stdin: Some(stdin),
            stdout: None,
            sink: Some(&mut on_output),
        };
        let response = provider.exec_io(&container.id, &request, io).await;
        self.sandbox.inner.caps.touch(&container.id);
        Ok(response?)
    }

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
                    &container.id,
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
            .upload_one(&container.id, path, reader, len, mode, limits)
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
            let got = self.download_one(&container.id, path, sink, cap).await?;
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
    pub async fn download_to(
        &self,
        path: &str,
        writer: &mut (dyn AsyncWrite + Send + Unpin),
        limits: &FileLimits,
    ) -> Result<std::result::Result<FileInfo, FileError>> {
        let (container, _work) = self.ensure_for_work().await?;
        let cap = limits.max_file_bytes;
        let sink = DownloadSink::new(writer, cap);
        self.download_one(&container.id, path, sink, cap).await
    }

    /// Downloads one file to `local` on the host (a file, or an existing
    /// directory to create the file in), through a [`HostFile`]: written
    /// under a temporary name, never through a symlink, mode masked with
    /// [`files::HOST_MODE_MASK`], renamed into place only when complete.
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
        match self.download_to(path, target.file(), limits).await? {
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
        container_id: &str,
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
        let mode = mode.unwrap_or(0o644);
        let request = self.transfer_request(&files::upload_command(&resolved, mode, len))?;
        let mut content = reader.take(len);
        let io = ExecIo {
            stdin: Some(&mut content),
            ..ExecIo::default()
        };
        let provider = self.sandbox.inner.caps.provider();
        let response = provider.exec_io(container_id, &request, io).await?;
        self.sandbox.inner.caps.touch(container_id);
        if response.timed_out {
            return Err(stalled(path, &request));
        }
        files::parse_upload_answer(&response.output)
            .map_err(|m| SandboxError::Other(format!("uploading {}: {m}", policy_text(path))))
    }

    /// One download into `sink`: lexical check, then the download script
    /// as the sandbox user, its stdout checked by the sink.
    async fn download_one(
        &self,
        container_id: &str,
        path: &str,
        mut sink: DownloadSink<'_>,
        cap: u64,
    ) -> Result<std::result::Result<FileInfo, FileError>> {
        let resolved = match files::resolve_file_path(path) {
            Ok(r) => r,
            Err(e) => return Ok(Err(e)),
        };
        let request = self.transfer_request(&files::download_command(&resolved, cap))?;
        let io = ExecIo {
            stdout: Some(&mut sink),
            ..ExecIo::default()
        };
        let provider = self.sandbox.inner.caps.provider();
        let response = provider.exec_io(container_id, &request, io).await;
        self.sandbox.inner.caps.touch(container_id);
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
    fn transfer_request(&self, command: &str) -> Result<ExecRequest> {
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
        Ok(request)
    }
}

/// Output kept from a transfer exec (its answer line).
const TRANSFER_ANSWER_BYTES: usize = 4096;

fn stalled(path: &str, request: &ExecRequest) -> SandboxError {
    SandboxError::Other(format!(
        "the transfer of {} made no progress for {:.0}s and was stopped",
        policy_text(path),
        request.timeout.as_secs_f64()
    ))
}

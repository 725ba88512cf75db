//! The library's front door: [`Sandbox`] (threads, backends, destroys) and
//! [`Backend`] (executes and files in one backend's container). It routes
//! through the policy layer, which returns verified answers, and hands the
//! work to the engine and the data plane.
//!
//! - this file: [`Sandbox`], threads to backends, destroys, counters;
//! - [`backend`]: [`Backend`], and the container it ensures for work;
//! - [`exec`]: its executes; [`files`]: its file transfers;
//! - [`lifecycle`]: gc and the periodic maintenance.

mod backend;
mod exec;
mod files;
mod lifecycle;
#[cfg(test)]
mod policy_tests;
mod ports;
mod processes;

pub use backend::Backend;
pub use lifecycle::{GcEntry, GcOptions, GcReport};
pub use ports::PortConnection;

use std::sync::Arc;
use std::time::Duration;

use sandbox_contract::{ThreadId, UserId};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::engine::ownership::policy_digest;
use crate::engine::{Engine, ManagedContainer};
use crate::error::{Result, SandboxError};
use crate::policy::client::PolicyClient;
use crate::policy::source::PolicySource;
use crate::policy::PolicyEngine;
use crate::provider::docker::DockerProvider;
use crate::provider::{ContainerProvider, ContainerStats};

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
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) engine: Arc<Engine>,
    pub(crate) policy: PolicyClient,
    /// Executions running through this sandbox, by their thread's user and
    /// id, to cancel them: one user's ids tell nothing about another's.
    executions: std::sync::Mutex<std::collections::HashMap<ExecutionKey, CancellationToken>>,
    /// Connections to ports inside sandboxes open now (see `ports.rs`).
    pub(crate) ports: ports::PortSlots,
}

/// An execution's key: its thread's user, and its id.
type ExecutionKey = (UserId, String);

/// An execution registered for cancellation until it drops.
pub(crate) struct Running<'a> {
    inner: &'a Inner,
    key: ExecutionKey,
    pub(crate) token: CancellationToken,
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.inner.executions.lock().unwrap().remove(&self.key);
    }
}

/// Refuses a configured runtime (top level or a profile's) the engine does
/// not list, saying how to register it. An engine that cannot be asked now
/// is not held against the start: its first call says why.
async fn check_runtimes(config: &Config, provider: &dyn ContainerProvider) -> Result<()> {
    let wanted: std::collections::BTreeSet<String> = config
        .profiles()
        .into_iter()
        .filter_map(|p| p.runtime)
        .collect();
    if wanted.is_empty() {
        return Ok(());
    }
    let Ok(Some(listed)) = provider.runtimes().await else {
        return Ok(());
    };
    match wanted.iter().find(|r| !listed.contains(r)) {
        None => Ok(()),
        Some(missing) => {
            let mut listed = listed;
            listed.sort();
            Err(SandboxError::Refused(runtime_missing(missing, &listed)))
        }
    }
}

/// How to register `runtime` with the engine (gVisor's `runsc` spelled out).
fn runtime_missing(runtime: &str, listed: &[String]) -> String {
    let how = if runtime == "runsc" {
        "install gVisor (Debian: `apt-get install runsc`), add it to the engine's \
         /etc/docker/daemon.json as \
         \"runtimes\": {\"runsc\": {\"path\": \"/usr/bin/runsc\", \"runtimeArgs\": \
         [\"--network=none\"]}}, and reload the engine: `kill -HUP $(pidof dockerd)` \
         (no restart needed)"
            .to_owned()
    } else {
        "add it to the engine's /etc/docker/daemon.json under \"runtimes\" and reload the \
         engine: `kill -HUP $(pidof dockerd)`"
            .to_owned()
    };
    format!(
        "the OCI runtime {runtime:?} is configured (runtime, or a profile's) but the Docker \
         engine lists only {}: {how}",
        listed.join(", ")
    )
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
        // The allow-list is the egress layer's to parse: refused here, at
        // start, rather than at the first container.
        crate::egress::Rules::new(&config.egress)
            .map_err(|e| SandboxError::Other(e.to_string()))?;
        crate::egress::profile_rules(&config).map_err(|e| SandboxError::Other(e.to_string()))?;
        crate::state::prepare(&config.workspace_root)?;
        check_runtimes(&config, provider.as_ref()).await?;
        let cache = config
            .component_cache_dir
            .clone()
            .map(crate::policy::cache::ComponentCache::new);
        let wasm = PolicyEngine::new(cache, config.policy_memory_total_bytes)
            .map_err(|e| SandboxError::Other(format!("wasmtime: {e:#}")))?;
        let engine = Arc::new(Engine::new(config, provider));
        let (label, bytes) = policy.read()?;
        warn_unread_keys(engine.config(), &label, &bytes);
        let policy = PolicyClient::load(wasm, engine.clone(), &bytes, &label).await?;
        engine.record_policy(&policy.name(), &policy_digest(&bytes));
        let sandbox = Sandbox {
            inner: Arc::new(Inner {
                engine,
                policy,
                executions: Default::default(),
                ports: Default::default(),
            }),
        };
        sandbox.start_maintenance();
        Ok(sandbox)
    }

    /// The configuration this sandbox runs with.
    pub fn config(&self) -> &Config {
        self.inner.engine.config()
    }

    /// The running policy's name (`per-user`, `per-thread`, ...).
    pub fn policy_name(&self) -> String {
        self.inner.policy.name()
    }

    /// Loads, self-checks and switches to another policy. On any error the
    /// running policy stays.
    pub async fn swap_policy(&self, policy: PolicySource) -> Result<()> {
        let (label, bytes) = policy.read()?;
        warn_unread_keys(self.config(), &label, &bytes);
        self.inner.policy.swap(&bytes, &label).await?;
        // No await between the swap and this: the new policy's containers
        // carry its digest from its first create.
        let name = self.inner.policy.name();
        self.inner
            .engine
            .record_policy(&name, &policy_digest(&bytes));
        Ok(())
    }

    /// The running policy's digest, as its containers carry it in their
    /// `sandbox.policy-digest` label: `sha256:` and the first 16 hex digits
    /// of the component's SHA-256.
    pub fn policy_digest(&self) -> String {
        self.inner.engine.running_policy().digest
    }

    /// The backend id the policy maps a thread to (no Docker call).
    pub async fn backend_id(&self, thread_id: &str) -> Result<String> {
        let thread = ThreadId::parse(thread_id)?;
        Ok(self
            .inner
            .policy
            .backend_of(&thread)
            .await?
            .as_str()
            .to_owned())
    }

    /// The operator's profile the policy chooses for a thread's backend
    /// (checked against the profiles defined; `default` for a policy of
    /// the 0.3 world). Pure: creates nothing.
    pub async fn profile_of(&self, thread_id: &str) -> Result<String> {
        let thread = ThreadId::parse(thread_id)?;
        let backend = self.inner.policy.backend_of(&thread).await?;
        Ok(self
            .inner
            .policy
            .profile_of(&backend)
            .await?
            .as_str()
            .to_owned())
    }

    /// What serves a thread, without side effects: its backend id, user and
    /// workspace by the policy's pure mapping, and the backend's container
    /// if one exists. Creates no workspace and no container (for HTTP GET).
    pub async fn describe_thread(&self, thread_id: &str) -> Result<ThreadInfo> {
        let thread = ThreadId::parse(thread_id)?;
        let backend = self.inner.policy.backend_of(&thread).await?;
        let container = self.inner.engine.find(&backend).await?;
        let user = thread.user();
        Ok(ThreadInfo {
            workspace: user.workspace().as_str().to_owned(),
            user_id: user.as_str().to_owned(),
            backend_id: backend.as_str().to_owned(),
            container,
        })
    }

    /// The backend of a thread: its container is created on first use.
    /// Prepares the user's workspace; creates no container.
    pub async fn get_thread_backend(&self, thread_id: &str) -> Result<Backend> {
        let thread = ThreadId::parse(thread_id)?;
        let id = self.inner.policy.backend_of(&thread).await?;
        let user = thread.user();
        self.inner.engine.workspaces().prepare(&user.workspace())?;
        Ok(Backend::new(id, user, thread, self.clone()))
    }

    /// Removes the user's container(s). False when the user had none.
    /// Commands in flight on them (from any host process) get
    /// `destroy_grace_secs` to finish, then are killed.
    pub async fn destroy_user_backend(&self, user_id: &str) -> Result<bool> {
        self.destroy_user_backend_within(user_id, self.destroy_grace())
            .await
    }

    /// [`Sandbox::destroy_user_backend`] with its own grace period (zero:
    /// kill what runs now, as `--force`).
    pub async fn destroy_user_backend_within(
        &self,
        user_id: &str,
        grace: Duration,
    ) -> Result<bool> {
        let user = UserId::parse(user_id)?;
        let deadline = tokio::time::Instant::now() + grace;
        self.inner.policy.destroy_user(&user, deadline).await
    }

    /// Destroys a thread: it no longer holds its backend, and the policy
    /// decides whether the backend's container goes (by default it does:
    /// under the per-user policy, the whole user's container), with the
    /// grace period for commands in flight.
    pub async fn destroy_thread_backend(&self, thread_id: &str) -> Result<bool> {
        self.destroy_thread_backend_within(thread_id, self.destroy_grace())
            .await
    }

    /// [`Sandbox::destroy_thread_backend`] with its own grace period.
    pub async fn destroy_thread_backend_within(
        &self,
        thread_id: &str,
        grace: Duration,
    ) -> Result<bool> {
        let thread = ThreadId::parse(thread_id)?;
        let backend = self.inner.policy.backend_of(&thread).await?;
        let name = self.inner.engine.container_name(&backend);
        self.inner
            .engine
            .usage()
            .release_thread(&name, thread.as_str());
        let deadline = tokio::time::Instant::now() + grace;
        self.inner
            .policy
            .release_thread(&thread, &backend, deadline)
            .await
    }

    fn destroy_grace(&self) -> Duration {
        Duration::from_secs_f64(self.config().destroy_grace_secs)
    }

    /// Every container this host's namespace manages.
    pub async fn list(&self) -> Result<Vec<ManagedContainer>> {
        self.inner.engine.list().await
    }

    /// Resource usage of a managed container.
    pub async fn stats(&self, container_id: &str) -> Result<ContainerStats> {
        let owned = self
            .inner
            .engine
            .inspect(container_id)
            .await?
            .ok_or_else(|| SandboxError::NotFound(format!("container {container_id}")))?;
        Ok(self.inner.engine.provider().stats(&owned.id).await?)
    }

    /// Waits (at most ~10 s) until calls abandoned mid-way (dropped
    /// futures) have had their processes killed. Call it before exiting.
    pub async fn settle(&self) {
        self.inner.engine.provider().settle().await;
    }

    /// Whether the engine answers.
    pub async fn ping(&self) -> Result<()> {
        Ok(self.inner.engine.provider().ping().await?)
    }

    /// Cancels a running execution (of this process) by the id it was
    /// given under `thread_id`'s user (from any thread of that user): its
    /// whole process tree is killed and it answers exit 130, reason
    /// `cancelled`. False when that user runs no such execution here: ids
    /// are scoped per user, so another user's execution of the same id is
    /// neither cancelled nor told about. An invalid thread id is an error.
    pub fn cancel(&self, thread_id: &str, execution_id: &str) -> Result<bool> {
        let user = ThreadId::parse(thread_id)?.user();
        let key = (user, execution_id.to_owned());
        Ok(match self.inner.executions.lock().unwrap().get(&key) {
            Some(token) => {
                token.cancel();
                true
            }
            None => false,
        })
    }

    /// Registers a starting execution of `user`; an id that user already
    /// runs is refused (another user's of the same id is no concern).
    pub(crate) fn register(&self, user: &UserId, id: &str) -> Result<Running<'_>> {
        let key = (user.clone(), id.to_owned());
        let mut executions = self.inner.executions.lock().unwrap();
        if executions.contains_key(&key) {
            return Err(SandboxError::Refused(format!(
                "execution id {id} is already running"
            )));
        }
        let token = CancellationToken::new();
        executions.insert(key.clone(), token.clone());
        Ok(Running {
            inner: &self.inner,
            key,
            token,
        })
    }

    /// Counters for monitoring.
    pub fn counters(&self) -> Counters {
        Counters {
            containers_created: self.inner.engine.created(),
            policy_traps: self.inner.policy.traps(),
        }
    }

    /// What each user's sandbox moved through this process's egress proxy
    /// (`network = "egress"`), by user id; empty otherwise.
    pub fn egress_counts(&self) -> Vec<(String, crate::EgressCounts)> {
        self.inner
            .engine
            .egress()
            .map(|egress| egress.meters().snapshot())
            .unwrap_or_default()
    }

    /// Policy instances alive now (idle in the pool, or lent to a call).
    pub fn policy_instances(&self) -> usize {
        self.inner.policy.instances()
    }

    /// Most policy instances the running policy's pool keeps alive
    /// (`policy_pool_bytes` over one instance's memory, within
    /// `max_policy_instances`).
    pub fn policy_pool_capacity(&self) -> usize {
        self.inner.policy.pool_capacity()
    }

    /// What loading the running policy measured: compile and instantiate
    /// times, declared needs, peak memory, the limits it runs under.
    pub fn policy_report(&self) -> crate::LoadReport {
        self.inner.policy.report()
    }

    /// What `n` more instances of the running policy cost: instantiate
    /// time, a warm call, resident memory each.
    pub async fn policy_instance_cost(&self, n: usize) -> Result<crate::InstanceCost> {
        self.inner.policy.instance_cost(n).await
    }
}

/// What [`Sandbox::describe_thread`] tells.
#[derive(Debug, Clone, serde::Serialize)]
#[cfg_attr(feature = "serve", derive(schemars::JsonSchema))]
pub struct ThreadInfo {
    /// The backend serving the thread.
    #[serde(rename = "id")]
    pub backend_id: String,
    /// The thread's user.
    pub user_id: String,
    /// The user's workspace name.
    pub workspace: String,
    /// The backend's container, when it has one now.
    pub container: Option<ManagedContainer>,
}

/// Monotonic counters of one sandbox.
#[derive(Debug, Clone, Copy, Default)]
pub struct Counters {
    /// Containers this host created (adoptions excluded).
    pub containers_created: u64,
    /// Policy calls that trapped (each instance then replaced).
    pub policy_traps: u64,
}

/// Warns about `[policy_config]` keys a shipped policy does not read (a
/// typo passes silently otherwise).
fn warn_unread_keys(config: &Config, label: &str, component: &[u8]) {
    for key in crate::policy::embedded::unread_keys(component, config.policy_config.keys()) {
        tracing::warn!(
            key,
            "[policy_config] sets {key:?}, which the {label} policy does not read (it reads {})",
            crate::policy::embedded::SHIPPED_KEYS.join(", ")
        );
    }
}

//! The host side of the WIT `containers` and `workspaces` imports: the
//! provider's operations behind the host's rules.
//!
//! - Every id a policy passes is validated here again (defence in depth).
//! - A container is only started, inspected or removed when it carries this
//!   host's labels for its namespace; anything else is refused untouched.
//! - Image, mounts, limits, network, user and name come from the config.
//! - Containers handed to a policy are remembered with their backend, so a
//!   policy cannot make the host exec into a container of another backend.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde::Serialize;

use crate::config::Config;
use crate::error::{Result, SandboxError};
use crate::inflight::{InFlight, Work};
use crate::naming::{self, label};
use crate::plan::ContainerPlan;
use crate::provider::{ContainerProvider, ContainerRecord, ProviderError, Status};
use crate::runtime::containment::{excused_wait, MemoryPool};
use crate::workspace::Workspaces;

/// A container this host labelled, as policies and `sandbox ls` see it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ManagedContainer {
    pub id: String,
    pub name: String,
    pub backend_id: String,
    pub workspace: String,
    pub policy: String,
    #[serde(serialize_with = "status_name")]
    pub status: Status,
    pub created: Option<i64>,
    /// Unix ms of the end of the last command on it, from any host process
    /// on this machine (now while one runs), else the creation time (else
    /// now, when the engine did not say).
    pub last_used_ms: u64,
    /// Executes and file transfers running on it, from any host process on
    /// this machine.
    pub in_flight: usize,
}

fn status_name<S: serde::Serializer>(
    status: &Status,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(&format!("{status:?}").to_lowercase())
}

/// The host's capabilities, shared by every policy instance.
pub struct Capabilities {
    config: Config,
    provider: Arc<dyn ContainerProvider>,
    workspaces: Workspaces,
    /// container id -> backend id, for every container handed to a policy.
    vetted: Mutex<HashMap<String, String>>,
    /// container id -> Unix ms of its last use through this host.
    last_used: Mutex<HashMap<String, u64>>,
    /// Bounds concurrent create / start / remove: a storm of cold starts
    /// must not starve every other user's executes in the engine.
    lifecycle_slots: tokio::sync::Semaphore,
    /// Containers this host created (adoptions excluded).
    pub created: std::sync::atomic::AtomicU64,
    /// backend id -> creation times within the last minute (rate cap).
    recent_creates: Mutex<HashMap<String, Vec<std::time::Instant>>>,
    /// The budget every policy instance's memories and tables draw from.
    policy_memory: Arc<MemoryPool>,
    /// `sandbox-agent` on the host, installed on the first create (`None`
    /// when that failed: containers then run without it).
    agent: std::sync::OnceLock<Option<std::path::PathBuf>>,
    /// Containers handed out that have the agent mounted.
    with_agent: Mutex<std::collections::HashSet<String>>,
    /// Work in flight and last use, shared by every host process.
    in_flight: InFlight,
}

impl Capabilities {
    pub fn new(config: Config, provider: Arc<dyn ContainerProvider>) -> Self {
        let workspaces = Workspaces::new(config.workspace_root.clone(), config.sandbox_user());
        let config_slots = config.max_concurrent_lifecycle_ops.max(1);
        Capabilities {
            provider,
            workspaces,
            vetted: Mutex::new(HashMap::new()),
            last_used: Mutex::new(HashMap::new()),
            lifecycle_slots: tokio::sync::Semaphore::new(config_slots),
            created: Default::default(),
            recent_creates: Mutex::new(HashMap::new()),
            policy_memory: MemoryPool::new(config.policy_memory_total_bytes),
            agent: std::sync::OnceLock::new(),
            with_agent: Mutex::new(std::collections::HashSet::new()),
            in_flight: InFlight::new(&crate::agent::state_dir(&config.workspace_root)),
            config,
        }
    }

    /// A slot for a create / start / remove. The wait is the host's queue,
    /// not the policy's doing: it is not charged to a policy call's budget.
    async fn lifecycle_slot(&self) -> tokio::sync::SemaphorePermit<'_> {
        excused_wait(self.lifecycle_slots.acquire())
            .await
            .expect("the semaphore is never closed")
    }

    /// The installed agent, installing it on first use.
    fn agent(&self) -> Option<std::path::PathBuf> {
        self.agent
            .get_or_init(
                || match crate::agent::install(&self.config.workspace_root) {
                    Ok(path) => Some(path),
                    Err(e) => {
                        tracing::warn!(error = %e, "containers run without sandbox-agent: a timeout then kills only the processes that kept its marker");
                        None
                    }
                },
            )
            .clone()
    }

    /// Whether a container handed out has `sandbox-agent` mounted.
    pub fn has_agent(&self, container_id: &str) -> bool {
        self.with_agent.lock().unwrap().contains(container_id)
    }

    /// The host-wide budget of policy instance memory.
    pub fn policy_memory(&self) -> &Arc<MemoryPool> {
        &self.policy_memory
    }

    /// Counts a creation for `backend_id`, refusing beyond
    /// `max_creates_per_backend_per_minute` (a create/remove loop).
    fn admit_create(&self, backend_id: &str) -> Result<()> {
        let window = std::time::Duration::from_secs(60);
        let now = std::time::Instant::now();
        let mut recent = self.recent_creates.lock().unwrap();
        // Forget backends with no creation in the window: the map stays small.
        if recent.len() > 1024 {
            recent.retain(|_, times| times.iter().any(|t| now - *t < window));
        }
        let times = recent.entry(backend_id.to_owned()).or_default();
        times.retain(|t| now - *t < window);
        let max = self.config.max_creates_per_backend_per_minute as usize;
        if times.len() >= max {
            return Err(SandboxError::Refused(format!(
                "backend {backend_id} had {max} containers created in the last minute; \
                 refusing more (max_creates_per_backend_per_minute)"
            )));
        }
        times.push(now);
        Ok(())
    }

    /// Records a use of a container (for idle and LRU decisions).
    pub fn touch(&self, container_id: &str) {
        self.last_used
            .lock()
            .unwrap()
            .insert(container_id.to_owned(), now_ms());
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn provider(&self) -> &Arc<dyn ContainerProvider> {
        &self.provider
    }

    pub fn workspaces(&self) -> &Workspaces {
        &self.workspaces
    }

    fn namespace(&self) -> &str {
        &self.config.namespace
    }

    /// The container this host labelled for `backend_id`, if any.
    pub async fn find(&self, backend_id: &str) -> Result<Option<ManagedContainer>> {
        policy_core::ids::validate_backend(backend_id)?;
        let found = self
            .provider
            .list(&[
                (label::MANAGED, "true"),
                (label::NAMESPACE, self.namespace()),
                (label::BACKEND, backend_id),
            ])
            .await?;
        // Names are unique per backend, so there is at most one; prefer a
        // running one should an older engine have let two through.
        let best = found
            .into_iter()
            .max_by_key(|c| c.status == Status::Running)
            .map(|c| self.managed(c))
            .transpose()?;
        Ok(best)
    }

    /// Every container this host labelled in its namespace.
    pub async fn list_managed(&self) -> Result<Vec<ManagedContainer>> {
        let found = self
            .provider
            .list(&[
                (label::MANAGED, "true"),
                (label::NAMESPACE, self.namespace()),
            ])
            .await?;
        found.into_iter().map(|c| self.managed(c)).collect()
    }

    /// Creates the container of a backend; adopts it when another host won
    /// the race for the name.
    pub async fn create(
        &self,
        backend_id: &str,
        workspace: &str,
        policy: &str,
    ) -> Result<ManagedContainer> {
        policy_core::ids::validate_backend(backend_id)?;
        policy_core::ids::validate_workspace(workspace)?;
        // A user's workspace is only ever mounted into that user's backends.
        let owner = policy_core::ids::user_of_backend(backend_id);
        if workspace != owner {
            return Err(SandboxError::Refused(format!(
                "backend {backend_id} belongs to user {owner} and cannot mount workspace {workspace}"
            )));
        }
        self.admit_create(backend_id)?;
        let path = self.workspaces.prepare(workspace)?;
        let plan = ContainerPlan::new(
            &self.config,
            backend_id,
            workspace,
            path,
            self.workspaces.owner(),
            policy,
        );
        let plan = match self.agent() {
            Some(agent) => plan.with_agent(agent),
            None => plan,
        };
        let created = {
            let _slot = self.lifecycle_slot().await;
            self.provider.create(&plan).await
        };
        match created {
            Ok(record) => {
                self.created
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                self.managed(record)
            }
            Err(ProviderError::Conflict(_)) => {
                let existing = self.inspect_racing(&plan.name).await?;
                let existing = self.managed(existing)?;
                if existing.backend_id != backend_id {
                    return Err(SandboxError::Refused(format!(
                        "container name {} is taken by backend {}",
                        plan.name, existing.backend_id
                    )));
                }
                tracing::debug!(
                    backend = backend_id,
                    "create raced another host; adopting its container"
                );
                Ok(existing)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// The container that won a create race for `name`. Docker reserves a
    /// name before the winner's container can be inspected, so a 404 right
    /// after a 409 means "not registered yet", not "gone".
    async fn inspect_racing(&self, name: &str) -> Result<ContainerRecord> {
        const ATTEMPTS: u32 = 40;
        for _ in 0..ATTEMPTS {
            if let Some(record) = self.provider.inspect(name).await? {
                return Ok(record);
            }
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        }
        Err(SandboxError::Other(format!(
            "container name {name} is taken but no container answers to it; retry"
        )))
    }

    /// Starts a container this host labelled.
    pub async fn start(&self, container_id: &str) -> Result<()> {
        self.start_if(container_id, |_| true).await
    }

    /// Starts a container this host labelled for `backend_id` (a lane
    /// never starts another backend's container).
    pub async fn start_for(&self, container_id: &str, backend_id: &str) -> Result<()> {
        self.start_if(container_id, |b| b == backend_id).await
    }

    async fn start_if(&self, container_id: &str, backend_ok: impl Fn(&str) -> bool) -> Result<()> {
        let owned = self
            .inspect(container_id)
            .await?
            .ok_or_else(|| SandboxError::NotFound(format!("container {container_id}")))?;
        if !backend_ok(&owned.backend_id) {
            return Err(SandboxError::Refused(format!(
                "container {} belongs to backend {}, not to the calling lane's",
                owned.name, owned.backend_id
            )));
        }
        let _slot = self.lifecycle_slot().await;
        Ok(self.provider.start(&owned.id).await?)
    }

    /// The state of a container this host labelled; `None` when gone.
    pub async fn inspect(&self, container_id: &str) -> Result<Option<ManagedContainer>> {
        validate_container_ref(container_id)?;
        match self.provider.inspect(container_id).await? {
            Some(record) => self.managed(record).map(Some),
            None => Ok(None),
        }
    }

    /// Marks work (an execute, a transfer) on the container named
    /// `container_name` as in flight until the guard drops. Keyed by name,
    /// which is known before the container is ensured.
    pub fn begin_work(&self, container_name: &str) -> Option<Work> {
        self.in_flight.begin(container_name)
    }

    /// The shared store of work in flight.
    pub fn in_flight(&self) -> &InFlight {
        &self.in_flight
    }

    /// Force-removes a container this host labelled; false when gone.
    pub async fn remove(&self, container_id: &str) -> Result<bool> {
        self.remove_unless_busy(container_id, false).await
    }

    /// [`Capabilities::remove`], except that with `defer_if_busy` a running
    /// container with work in flight (from any host process) is left alone
    /// and `false` returned: idle and capacity decisions never kill a
    /// command another thread is running.
    pub async fn remove_unless_busy(
        &self,
        container_id: &str,
        defer_if_busy: bool,
    ) -> Result<bool> {
        let Some(owned) = self.inspect(container_id).await? else {
            return Ok(false);
        };
        if defer_if_busy && owned.status == Status::Running && owned.in_flight > 0 {
            tracing::info!(
                container = owned.name,
                in_flight = owned.in_flight,
                "removal deferred: work in flight"
            );
            return Ok(false);
        }
        let removed = {
            let _slot = self.lifecycle_slot().await;
            self.provider.remove(&owned.id).await?
        };
        self.vetted.lock().unwrap().remove(&owned.id);
        self.last_used.lock().unwrap().remove(&owned.id);
        Ok(removed)
    }

    /// Creates or checks the workspace directory.
    pub fn prepare_workspace(&self, name: &str) -> Result<()> {
        self.workspaces.prepare(name).map(drop)
    }

    /// Checks that a container a policy returned for `backend_id` is one
    /// this host handed out for that backend.
    pub fn check_serves(&self, container_id: &str, backend_id: &str) -> Result<()> {
        match self.vetted.lock().unwrap().get(container_id) {
            Some(owner) if owner == backend_id => Ok(()),
            Some(owner) => Err(SandboxError::Refused(format!(
                "the policy returned the container of backend {owner} for backend {backend_id}"
            ))),
            None => Err(SandboxError::Refused(format!(
                "the policy returned container {} which the host never handed out",
                policy_core::ids::shown(container_id)
            ))),
        }
    }

    /// Converts a record, refusing containers this host did not label.
    fn managed(&self, record: ContainerRecord) -> Result<ManagedContainer> {
        if !naming::is_owned(&record.labels, self.namespace()) {
            return Err(SandboxError::Refused(format!(
                "container {} is not managed by sandbox namespace {:?}; it was left untouched",
                record.name,
                self.namespace()
            )));
        }
        let get = |key: &str| record.labels.get(key).cloned().unwrap_or_default();
        let in_flight = if record.status == Status::Running {
            self.in_flight.count(&record.name)
        } else {
            0
        };
        let recorded = [
            self.last_used.lock().unwrap().get(&record.id).copied(),
            self.in_flight.last_used_ms(&record.name),
        ]
        .into_iter()
        .flatten()
        .max();
        let last_used_ms = if in_flight > 0 {
            now_ms()
        } else {
            // A re-created container is as fresh as its creation, whatever
            // its predecessor's record says.
            let created = record.created.map(|s| s.max(0) as u64 * 1000);
            recorded.max(created).unwrap_or_else(now_ms)
        };
        let container = ManagedContainer {
            last_used_ms,
            in_flight,
            backend_id: get(label::BACKEND),
            workspace: get(label::WORKSPACE),
            policy: get(label::POLICY),
            id: record.id,
            name: record.name,
            status: record.status,
            created: record.created,
        };
        self.vetted
            .lock()
            .unwrap()
            .insert(container.id.clone(), container.backend_id.clone());
        if record.labels.contains_key(crate::agent::AGENT_LABEL) {
            self.with_agent.lock().unwrap().insert(container.id.clone());
        }
        Ok(container)
    }
}

/// The wall clock in Unix ms.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Container ids and names only: they are spliced into API paths.
fn validate_container_ref(reference: &str) -> Result<()> {
    let ok = !reference.is_empty()
        && reference.len() <= 128
        && reference
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
        && reference
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        Err(SandboxError::InvalidId(format!(
            "container reference {}",
            policy_core::ids::shown(reference)
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::UserIds;
    use crate::provider::memory::MemoryProvider;

    fn caps(root: &std::path::Path) -> (Capabilities, Arc<MemoryProvider>) {
        let provider = Arc::new(MemoryProvider::new());
        let config = Config {
            workspace_root: root.to_owned(),
            namespace: "unit".into(),
            sandbox_user: Some(UserIds {
                uid: nix::unistd::geteuid().as_raw(),
                gid: nix::unistd::getegid().as_raw(),
            }),
            ..Config::default()
        };
        (Capabilities::new(config, provider.clone()), provider)
    }

    fn foreign(id: &str, labels: &[(&str, &str)]) -> ContainerRecord {
        ContainerRecord {
            id: id.into(),
            name: id.into(),
            image: "x".into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            status: Status::Running,
            created: None,
        }
    }

    #[tokio::test]
    async fn unlabelled_and_foreign_namespace_containers_are_refused_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let (caps, provider) = caps(dir.path());
        provider.insert(foreign("victim", &[]));
        provider.insert(foreign(
            "other",
            &[(label::MANAGED, "true"), (label::NAMESPACE, "prod")],
        ));
        for id in ["victim", "other"] {
            assert!(matches!(
                caps.remove(id).await,
                Err(SandboxError::Refused(_))
            ));
            assert!(matches!(
                caps.start(id).await,
                Err(SandboxError::Refused(_))
            ));
            assert!(matches!(
                caps.inspect(id).await,
                Err(SandboxError::Refused(_))
            ));
        }
        assert_eq!(provider.len(), 2);
    }

    #[tokio::test]
    async fn create_twice_adopts_instead_of_duplicating() {
        let dir = tempfile::tempdir().unwrap();
        let (caps, provider) = caps(dir.path());
        let a = caps.create("alice", "alice", "per-user").await.unwrap();
        let b = caps.create("alice", "alice", "per-user").await.unwrap();
        assert_eq!(a.id, b.id);
        assert_eq!(provider.len(), 1);
    }

    #[tokio::test]
    async fn a_container_is_only_served_to_its_backend() {
        let dir = tempfile::tempdir().unwrap();
        let (caps, _) = caps(dir.path());
        let alice = caps.create("alice", "alice", "per-user").await.unwrap();
        assert!(caps.check_serves(&alice.id, "alice").is_ok());
        assert!(matches!(
            caps.check_serves(&alice.id, "bob"),
            Err(SandboxError::Refused(_))
        ));
        assert!(matches!(
            caps.check_serves("forged", "bob"),
            Err(SandboxError::Refused(_))
        ));
    }

    #[tokio::test]
    async fn container_references_cannot_traverse_api_paths() {
        let dir = tempfile::tempdir().unwrap();
        let (caps, _) = caps(dir.path());
        for bad in ["../images/x", "a/b", "", "x?y", "-rf"] {
            assert!(
                matches!(caps.inspect(bad).await, Err(SandboxError::InvalidId(_))),
                "{bad}"
            );
        }
    }
}

//! The engine layer: what the host knows and enforces about the containers
//! it manages, whoever asks (a policy through its imports, gc, the CLI).
//!
//! - [`ownership`]: labels, and the containers handed to a policy;
//! - [`usage`]: work in flight, last use and threads, shared by every host
//!   process on the machine;
//! - [`slots`]: bounds on concurrent lifecycle operations and create rates;
//! - [`workspace`]: where a backend's workspace lives; [`clock`]: the one
//!   wall clock, and the host's own queue time a policy call is not charged.
//!
//! [`Engine`] turns a provider's [`ContainerRecord`] into the contract's
//! [`Container`] (the only place one is built), refusing every container
//! not labelled for this host's namespace.

pub mod clock;
mod keep_alive;
pub mod ownership;
pub mod quota;
pub mod slots;
pub mod usage;
pub mod workspace;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use sandbox_contract::{BackendId, Container, Status};
use serde::Serialize;

use crate::config::{Config, Profile, ProfileName};
use crate::error::{Result, SandboxError};
use crate::provider::plan::ContainerPlan;
use crate::provider::{ContainerProvider, ContainerRecord, ProviderError};
use clock::excused_wait;
use ownership::{label, Handouts, PolicyMark};
use slots::Slots;
use usage::{Closure, Usage, Work};

/// The profile a container was made under: its label, `default` on
/// containers of hosts before profiles.
fn profile_label(labels: &HashMap<String, String>) -> &str {
    labels
        .get(label::PROFILE)
        .map(String::as_str)
        .unwrap_or(crate::config::DEFAULT_PROFILE)
}

/// Backends whose chosen profile the engine remembers; past it, the memory
/// starts over (the policy client asks again).
const MAX_REMEMBERED_CHOICES: usize = 100_000;

/// How long new work waits for an idle removal of its container to decide.
const EVICTION_WAIT: std::time::Duration = std::time::Duration::from_secs(5);
use workspace::Workspaces;

pub use clock::now_ms;

/// A container this host labelled: the contract's [`Container`] (what a
/// policy sees) plus what only the host shows (workspace, policy label,
/// creation time). Derefs to the [`Container`].
#[derive(Debug, Clone, PartialEq, Serialize)]
#[cfg_attr(feature = "serve", derive(schemars::JsonSchema))]
pub struct ManagedContainer {
    /// What a policy sees of it.
    #[serde(flatten)]
    pub container: Container,
    /// The workspace name mounted at `/workspace` (from the host's label).
    pub workspace: String,
    /// The policy that created it (from the host's label).
    pub policy: String,
    /// The digest of that policy's component (`sha256:` and 16 hex digits,
    /// from the host's label); none on containers of older hosts.
    #[serde(skip)]
    pub policy_digest: Option<String>,
    /// Unix seconds, when the engine reported it.
    pub created: Option<i64>,
    /// What it has of `sandbox-agent`.
    #[serde(skip)]
    pub agent: crate::dataplane::agent::AgentMode,
    /// The operator's profile it was made under (from the host's label).
    pub profile: String,
    /// Why it is replaced when next idle (settings changed since it was
    /// made, or an older host made it); absent when it is current.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outdated: Option<String>,
    /// The workspace root of the host processes that manage it, when that
    /// is not this process's: their in-flight records are not this
    /// process's, so this process never acts on it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub managed_elsewhere: Option<String>,
    /// Its plane directory's nonce (`provider::plane::PLANE_LABEL`).
    #[serde(skip)]
    pub plane: Option<String>,
}

impl std::ops::Deref for ManagedContainer {
    type Target = Container;
    fn deref(&self) -> &Container {
        &self.container
    }
}

/// How a removal treats work in flight on the container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RemoveMode {
    /// Refuse while work is in flight: idle and capacity decisions never
    /// kill another thread's command.
    UnlessBusy,
    /// Stop new work, let running work finish until `deadline`, then kill
    /// it (a destroy).
    Drain(tokio::time::Instant),
}

/// The host's state over its containers, shared by every policy instance.
pub struct Engine {
    config: Config,
    provider: Arc<dyn ContainerProvider>,
    workspaces: Workspaces,
    handouts: Handouts,
    usage: Usage,
    slots: Slots,
    /// `sandbox-agent` on the host, installed on the first create (`None`
    /// when that failed: containers then run without it).
    agent: OnceLock<Option<std::path::PathBuf>>,
    /// The digest of the plan this host gives a new container of each
    /// profile (see [`ContainerPlan::digest`]), known once the agent is.
    plan_digests: Mutex<HashMap<ProfileName, String>>,
    /// The profile the running policy chose for each backend (by backend
    /// id), as far as this process asked; cleared on a swap.
    chosen: Mutex<HashMap<String, ProfileName>>,
    /// The workspace root, resolved: the `sandbox.workspace-root` label.
    root_label: String,
    /// The state store's id (`sandbox.store`), read at start.
    store_id: Option<String>,
    /// Containers this host created (adoptions excluded).
    created: AtomicU64,
    /// The policy running now, and the digest of each policy name that ran.
    policies: Mutex<Policies>,
    /// gc runs under way that show `maintain` only the running policy's
    /// containers.
    own_only: AtomicUsize,
    /// The egress proxy's side in this process (`network = "egress"`).
    egress: Option<Arc<crate::egress::Egress>>,
    /// Containers whose background processes hold off their removal.
    holds: keep_alive::Holds,
    /// Bounded workspaces, with `workspace_quota`.
    quotas: Option<quota::Quotas>,
    /// The plane directories of containers (`agent_plane`).
    planes: Option<crate::provider::plane::Planes>,
}

/// The policies this engine's host ran, as their labels name them.
#[derive(Default)]
struct Policies {
    running: PolicyMark,
    /// The digest of the component last loaded under each name: a create
    /// by an instance of a policy swapped out mid-call keeps its own.
    digests: HashMap<String, String>,
    /// Every policy this host ran (swapped out ones too).
    ran: Vec<PolicyMark>,
}

/// While held, `maintain` sees and removes only the running policy's
/// containers (see [`Engine::maintain_own_only`]).
pub struct OwnOnly<'a>(&'a AtomicUsize);

impl Drop for OwnOnly<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Engine {
    /// The engine of `config` over `provider`.
    pub fn new(config: Config, provider: Arc<dyn ContainerProvider>) -> Self {
        Engine {
            provider,
            workspaces: Workspaces::new(config.workspace_root.clone(), config.sandbox_user()),
            handouts: Handouts::default(),
            usage: Usage::new(&crate::state::dir(&config.workspace_root)),
            slots: Slots::new(
                config.max_concurrent_lifecycle_ops,
                config.max_creates_per_backend_per_minute as usize,
            ),
            agent: OnceLock::new(),
            plan_digests: Mutex::default(),
            chosen: Mutex::default(),
            store_id: crate::state::read_store_id(&config.workspace_root),
            root_label: config
                .workspace_root
                .canonicalize()
                .unwrap_or_else(|_| config.workspace_root.clone())
                .display()
                .to_string(),
            created: AtomicU64::new(0),
            policies: Mutex::default(),
            own_only: AtomicUsize::new(0),
            holds: keep_alive::Holds::default(),
            quotas: (config.workspace_quota > 0).then(|| {
                quota::Quotas::new(
                    config.workspace_quota,
                    &crate::state::dir(&config.workspace_root),
                    config.sandbox_user(),
                )
            }),
            planes: config.agent_plane.then(|| {
                crate::provider::plane::Planes::new(&crate::state::dir(&config.workspace_root))
            }),
            egress: config
                .profiles()
                .iter()
                .any(Profile::has_egress)
                .then(|| {
                    let state = crate::state::dir(&config.workspace_root);
                    crate::egress::Egress::new(&state, &config)
                        .map_err(|e| tracing::error!(error = %e, "egress unusable"))
                        .ok()
                })
                .flatten(),
            config,
        }
    }

    /// The egress proxy of this process, with `network = "egress"`.
    pub fn egress(&self) -> Option<&Arc<crate::egress::Egress>> {
        self.egress.as_ref()
    }

    /// Makes sure some host process serves the proxy socket of
    /// `backend`'s container, made under `profile`, with that profile's
    /// allow-list, before its work runs (nothing when the profile has no
    /// egress). A failure costs that work its egress (the relay says so),
    /// not the work: it is logged.
    pub async fn serve_egress(&self, backend: &BackendId, profile: &str) {
        let Some(egress) = &self.egress else {
            return;
        };
        let (Ok(user), Ok(profile)) = (backend.user(), ProfileName::parse(profile)) else {
            return;
        };
        if !egress.has_profile(&profile) {
            return;
        }
        if let Err(e) = egress.ensure(backend.as_str(), &user, &profile).await {
            tracing::warn!(backend = backend.as_str(), error = %e, "egress proxy not served");
        }
    }

    /// Records the profile the policy chose for `backend` (checked against
    /// the operator's list by the policy client).
    pub fn choose_profile(&self, backend: &BackendId, profile: &ProfileName) {
        let mut chosen = self.chosen.lock().unwrap();
        if chosen.len() >= MAX_REMEMBERED_CHOICES {
            chosen.clear();
        }
        chosen.insert(backend.as_str().to_owned(), profile.clone());
    }

    /// Forgets every choice (the policy was swapped).
    pub fn forget_profiles(&self) {
        self.chosen.lock().unwrap().clear();
    }

    /// The profile the running policy chose for `backend`, if this process
    /// asked it.
    fn chosen_profile(&self, backend: &BackendId) -> Option<ProfileName> {
        self.chosen.lock().unwrap().get(backend.as_str()).cloned()
    }

    /// Records that the policy `name` (sanitised) runs now, its component
    /// of digest `digest` ([`ownership::policy_digest`]): the containers
    /// it creates carry both.
    pub fn record_policy(&self, name: &str, digest: &str) {
        let mut policies = self.policies.lock().unwrap();
        policies.running = PolicyMark {
            name: name.to_owned(),
            digest: digest.to_owned(),
        };
        policies.digests.insert(name.to_owned(), digest.to_owned());
        let mark = policies.running.clone();
        if !policies.ran.contains(&mark) {
            policies.ran.push(mark);
        }
    }

    /// The policy running now, as its containers' labels name it.
    pub fn running_policy(&self) -> PolicyMark {
        self.policies.lock().unwrap().running.clone()
    }

    /// Whether a policy this host ran made `container`: the running one, or
    /// one it swapped out (its containers are this host's leftovers, not
    /// another host's).
    pub fn made_here(&self, container: &ManagedContainer) -> bool {
        let digest = container.policy_digest.as_deref();
        let policies = self.policies.lock().unwrap();
        policies.running.made(&container.policy, digest)
            || policies
                .ran
                .iter()
                .any(|p| p.made(&container.policy, digest))
    }

    /// Until the guard drops, `maintain` is shown only the containers the
    /// policies this host ran made, and may remove no other (a gc that
    /// leaves other policies' containers alone: its own policy's idle and
    /// capacity rules are not theirs).
    pub fn maintain_own_only(&self) -> OwnOnly<'_> {
        self.own_only.fetch_add(1, Ordering::SeqCst);
        OwnOnly(&self.own_only)
    }

    /// Whether `maintain` may see and remove `container` now.
    pub fn maintain_sees(&self, container: &ManagedContainer) -> bool {
        self.own_only.load(Ordering::SeqCst) == 0 || self.made_here(container)
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The container engine.
    pub fn provider(&self) -> &Arc<dyn ContainerProvider> {
        &self.provider
    }

    /// The workspace directories.
    pub fn workspaces(&self) -> &Workspaces {
        &self.workspaces
    }

    /// Work in flight, last use and threads.
    pub fn usage(&self) -> &Usage {
        &self.usage
    }

    /// The containers handed to policies.
    pub fn handouts(&self) -> &Handouts {
        &self.handouts
    }

    /// Containers this host created so far.
    pub fn created(&self) -> u64 {
        self.created.load(Ordering::Relaxed)
    }

    /// The name of `backend`'s container in this namespace.
    pub fn container_name(&self, backend: &BackendId) -> String {
        backend.container_name(&self.config.namespace)
    }

    /// Marks work on `backend`'s container as in flight until the guard
    /// drops; keyed by name, known before the container is ensured, so
    /// maintenance never removes it between the ensure and the command.
    ///
    /// While an idle removal decides, the work waits for its outcome (the
    /// removal is refused because of this work, or the container goes and
    /// the ensure makes a new one); during a destroy it is refused.
    pub async fn begin_work(&self, backend: &BackendId) -> Result<Option<Work>> {
        let name = self.container_name(backend);
        let patience = tokio::time::Instant::now() + EVICTION_WAIT;
        loop {
            match self.usage.begin(&name) {
                Ok(work) => return Ok(work),
                Err(usage::Refusal::Closing(Closure::Evict))
                    if tokio::time::Instant::now() < patience =>
                {
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
                Err(usage::Refusal::Closing(_)) => {
                    return Err(SandboxError::Refused(format!(
                        "backend {backend} is being removed; retry when that is done"
                    )))
                }
            }
        }
    }

    /// The installed agent, installing it on first use.
    fn agent(&self) -> Option<std::path::PathBuf> {
        self.agent
            .get_or_init(
                || match crate::dataplane::agent::install(&self.config.workspace_root) {
                    Ok(path) => Some(path),
                    Err(e) => {
                        tracing::warn!(error = %e, "containers run without sandbox-agent: a timeout then kills only the processes that kept its marker");
                        None
                    }
                },
            )
            .clone()
    }

    fn namespace(&self) -> &str {
        &self.config.namespace
    }

    /// Why a container labelled so is no longer what this host would make
    /// now, if it is not: it is replaced when idle (gc and maintenance).
    /// An older host's whose agent does not serve this host's wire (it runs
    /// every command through `docker exec`), one without a plan digest (an
    /// older host's), or one whose plan digest is not this host's (the
    /// image, network, limits, user, runtime or agent changed since).
    ///
    /// Or one whose profile is no longer defined, or not the one the policy
    /// chose for its backend since.
    fn outdated_because(&self, labels: &HashMap<String, String>) -> Option<String> {
        let agent = crate::dataplane::agent::AgentMode::of(labels);
        if agent == crate::dataplane::agent::AgentMode::Mounted && self.agent().is_some() {
            return Some("made by an older host: its agent is outdated".to_owned());
        }
        let made_under = profile_label(labels);
        let Some(profile) = ProfileName::parse(made_under)
            .ok()
            .and_then(|name| self.config.profile(&name))
        else {
            return Some(format!(
                "its profile {} is no longer defined",
                sandbox_contract::shown(made_under)
            ));
        };
        let chosen = labels
            .get(label::BACKEND)
            .and_then(|b| BackendId::parse(b).ok())
            .and_then(|b| self.chosen_profile(&b));
        if let Some(chosen) = chosen.filter(|c| c.as_str() != made_under) {
            return Some(format!(
                "the policy now chooses profile {chosen} for its backend (made under {made_under})"
            ));
        }
        let current = self.plan_digest(&profile);
        match labels.get(label::PLAN) {
            None => Some("made by an older host: it has no plan digest".to_owned()),
            Some(made) if *made != current => Some(format!(
                "its plan changed (image, network, limits, user, runtime or agent): \
                 made as {made}, now {current}"
            )),
            Some(_) => None,
        }
    }

    /// Why `container` is replaced when idle, if it is (see
    /// [`ManagedContainer::outdated`]).
    pub fn outdated(&self, container: &ManagedContainer) -> Option<String> {
        container.outdated.clone()
    }

    /// The digest of the plan this host gives a new container of `profile`.
    fn plan_digest(&self, profile: &Profile) -> String {
        if let Some(digest) = self.plan_digests.lock().unwrap().get(&profile.name) {
            return digest.clone();
        }
        let sample = BackendId::parse("plan-digest").expect("a valid backend id");
        let plan = ContainerPlan::new(
            &self.config,
            profile,
            &sample,
            std::path::PathBuf::new(),
            self.workspaces.owner(),
            HashMap::new(),
        )
        .with_artifacts(std::path::PathBuf::new());
        let plan = match self.agent() {
            Some(agent) => plan.with_agent(agent),
            None => plan,
        };
        let plan = if profile.has_egress() {
            plan.with_egress(std::path::PathBuf::new())
        } else {
            plan
        };
        let digest = match &self.planes {
            Some(_) => plan.with_plane(std::path::PathBuf::new(), ""),
            None => plan,
        }
        .digest();
        self.plan_digests
            .lock()
            .unwrap()
            .insert(profile.name.clone(), digest.clone());
        digest
    }

    /// The workspace root (as its host saw it) of a container whose work
    /// in flight is recorded in another state store than this process's:
    /// by the store's id when both know one, else by the resolved root.
    fn elsewhere(&self, labels: &HashMap<String, String>) -> Option<String> {
        let root = labels.get(label::WORKSPACE_ROOT)?;
        let other = match (labels.get(label::STORE), &self.store_id) {
            (Some(theirs), Some(ours)) => theirs != ours,
            _ => *root != self.root_label,
        };
        other.then(|| root.clone())
    }

    /// `container`, unless host processes of another workspace root manage
    /// it (their in-flight records are elsewhere: acting on it could kill
    /// their commands).
    fn here(&self, container: ManagedContainer) -> Result<ManagedContainer> {
        match &container.managed_elsewhere {
            None => Ok(container),
            Some(root) => Err(SandboxError::Refused(format!(
                "container {} is managed by sandbox processes whose workspace root is {root}, \
                 and this one's is {}: their work in flight is recorded there, so this process \
                 leaves it alone. Run with --workspace-root {root} (SANDBOX_WORKSPACE_ROOT), \
                 or use another --namespace",
                container.name, self.root_label
            ))),
        }
    }

    /// The container this host labelled for `backend`, if any.
    pub async fn find(&self, backend: &BackendId) -> Result<Option<ManagedContainer>> {
        // By its name, which the host derives from the backend and the
        // engine keeps unique: one inspect (answered without the engine
        // while the container's agent link vouches for it), not a labelled
        // list that costs the engine a scan of every container (a policy
        // re-adopting its users' containers, one per call, at 1000 users).
        let name = backend.container_name(self.namespace());
        let Some(record) = self.provider.inspect(&name).await? else {
            return Ok(None);
        };
        // A container of that name this host did not label for the backend
        // is not the backend's (a create then conflicts, and says so).
        if !ownership::is_owned(&record.labels, self.namespace())
            || record.labels.get(label::BACKEND).map(String::as_str) != Some(backend.as_str())
        {
            return Ok(None);
        }
        self.managed(record).and_then(|c| self.here(c)).map(Some)
    }

    /// Every container this host labelled in its namespace.
    pub async fn list(&self) -> Result<Vec<ManagedContainer>> {
        let found = self
            .provider
            .list(&[
                (label::MANAGED, "true"),
                (label::NAMESPACE, self.namespace()),
            ])
            .await?;
        found.into_iter().map(|c| self.managed(c)).collect()
    }

    /// Creates the container of `backend`, with its user's workspace
    /// (prepared first); adopts it when another host won the race for the
    /// name.
    pub async fn create(
        &self,
        backend: &BackendId,
        policy: &str,
        profile: &ProfileName,
    ) -> Result<ManagedContainer> {
        let workspace = backend.user()?.workspace();
        let profile = self.config.profile(profile).ok_or_else(|| {
            SandboxError::Refused(format!("profile {profile} is not defined on this host"))
        })?;
        self.slots.admit_create(backend.as_str())?;
        let (path, artifacts) = self.bounded_workspace(&workspace).await?;
        let mut labels = ownership::ownership_labels(
            self.namespace(),
            backend.as_str(),
            workspace.as_str(),
            policy,
        );
        let digest = self.policies.lock().unwrap().digests.get(policy).cloned();
        if let Some(digest) = digest {
            labels.insert(label::POLICY_DIGEST.to_owned(), digest);
        }
        labels.insert(label::WORKSPACE_ROOT.to_owned(), self.root_label.clone());
        if let Some(id) = &self.store_id {
            labels.insert(label::STORE.to_owned(), id.clone());
        }
        labels.insert(label::PLAN.to_owned(), self.plan_digest(&profile));
        labels.insert(label::PROFILE.to_owned(), profile.name.to_string());
        let plan = ContainerPlan::new(
            &self.config,
            &profile,
            backend,
            path,
            self.workspaces.owner(),
            labels,
        )
        .with_artifacts(artifacts);
        let plan = match self.agent() {
            Some(agent) => plan.with_agent(agent),
            None => plan,
        };
        let plan = if profile.has_egress() {
            let (Some(egress), true) = (&self.egress, plan.agent.is_some()) else {
                return Err(SandboxError::Refused(
                    "network \"egress\" needs the host's egress proxy and the sandbox agent \
                     (its relay), and one of them is unusable here: see the log"
                        .to_owned(),
                ));
            };
            plan.with_egress(egress.socket_dir(backend.as_str(), &profile.name)?)
        } else {
            plan
        };
        let parent = self.provider.cgroup_parent(plan.cpu_shares).await;
        let plan = ContainerPlan {
            cgroup_parent: parent,
            ..plan
        };
        let plan = match &self.planes {
            Some(planes) if plan.plane_possible() => {
                let (dir, nonce) = planes.prepare(&plan.name)?;
                plan.with_plane(dir, &nonce)
            }
            _ => plan,
        };
        let created = {
            let _slot = self.slots.lifecycle().await;
            self.provider.create(&plan).await
        };
        match created {
            Ok(record) => {
                self.created.fetch_add(1, Ordering::Relaxed);
                self.managed(record)
            }
            Err(ProviderError::Conflict(_)) => {
                let existing = self.inspect_racing(&plan.name).await?;
                let existing = self.here(self.managed(existing)?)?;
                if existing.backend_id != backend.as_str() {
                    return Err(SandboxError::Refused(format!(
                        "container name {} is taken by backend {}",
                        plan.name, existing.backend_id
                    )));
                }
                tracing::debug!(
                    backend = backend.as_str(),
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

    /// Starts a container this host labelled; with `backend`, only one of
    /// that backend (a policy call never starts another backend's).
    pub async fn start(&self, container_id: &str, backend: Option<&BackendId>) -> Result<()> {
        let owned = self
            .inspect(container_id)
            .await?
            .ok_or_else(|| SandboxError::NotFound(format!("container {container_id}")))?;
        if let Some(backend) = backend {
            if owned.backend_id != backend.as_str() {
                return Err(SandboxError::Refused(format!(
                    "container {} belongs to backend {}, not to backend {backend}",
                    owned.name, owned.backend_id
                )));
            }
        }
        if self.quotas.is_some() {
            // A container made before a reboot (its workspace's mount
            // gone) must not start on the bare directory.
            let workspace = sandbox_contract::WorkspaceName::parse(&owned.workspace)
                .map_err(|e| SandboxError::Refused(e.to_string()))?;
            self.bounded_workspace(&workspace).await?;
        }
        let started = {
            let _slot = self.slots.lifecycle().await;
            self.provider.start(&owned.id).await
        };
        let Err(e) = started else {
            return Ok(());
        };
        // A container that can never start (a network or runtime it names
        // is gone, a setting was wrong: the engine refuses with a 4xx) would
        // fail every call until a destroy: it goes, its workspace stays, and
        // the next call makes a new one. An engine that is slow or failing
        // (a timeout, a 5xx) says nothing about the container: it stays.
        let permanent = match &e {
            ProviderError::NotFound(_) => true,
            ProviderError::Failed(m) => m.starts_with('4'),
            _ => false,
        };
        if !permanent || !matches!(owned.status, Status::Created | Status::Exited) {
            return Err(e.into());
        }
        let removed = self.remove(&owned.id, RemoveMode::UnlessBusy).await;
        tracing::warn!(
            container = owned.name,
            error = %e,
            removed = removed.is_ok(),
            "a container failed to start; removed so that the next call creates it anew"
        );
        Err(e.into())
    }

    /// The state of a container this host labelled; `None` when gone.
    pub async fn inspect(&self, container_id: &str) -> Result<Option<ManagedContainer>> {
        ownership::validate_container_ref(container_id)?;
        match self.provider.inspect(container_id).await? {
            Some(record) => self.here(self.managed(record)?).map(Some),
            None => Ok(None),
        }
    }

    /// Removes a container this host labelled; false when already gone.
    /// What happens to work in flight is `how`'s to say.
    pub async fn remove(&self, container_id: &str, how: RemoveMode) -> Result<bool> {
        let Some(owned) = self.inspect(container_id).await? else {
            return Ok(false);
        };
        let _closing = match how {
            RemoveMode::UnlessBusy => {
                // Marked before counting (see `Usage::begin`).
                let closing = self.usage.close(&owned.name, Closure::Evict);
                let in_flight = self.usage.count(&owned.name);
                if owned.status == Status::Running && in_flight > 0 {
                    return Err(SandboxError::Refused(format!(
                        "container {} has {} command(s) in flight; it is not removed while they run",
                        owned.name, in_flight
                    )));
                }
                if let Some(why) = self.held_by_processes(&owned).await {
                    return Err(SandboxError::Refused(why));
                }
                closing
            }
            RemoveMode::Drain(deadline) => {
                let closing = self.usage.close(&owned.name, Closure::Destroy);
                // The grace period is the host's, not the policy's doing: not
                // charged to the call's wall-clock budget (bounded by the
                // destroy's one deadline).
                // Background processes get the same grace (SIGTERM first).
                let (left, ()) = excused_wait(async {
                    tokio::join!(
                        self.usage.drain(&owned.name, deadline),
                        self.stop_processes(&owned, deadline)
                    )
                })
                .await;
                if left > 0 {
                    tracing::warn!(
                        container = owned.name,
                        left,
                        "destroy: grace period over, killing work in flight"
                    );
                }
                self.usage.mark_destroyed(&owned.name);
                closing
            }
        };
        let removed = {
            let _slot = self.slots.lifecycle().await;
            self.provider.remove(&owned.id).await?
        };
        self.handouts.forget(&owned.id);
        if let Some(egress) = &self.egress {
            egress.withdraw(&owned.backend_id, &owned.profile);
        }
        if let (Some(planes), Some(nonce)) = (&self.planes, &owned.plane) {
            planes.remove(&owned.name, nonce);
        }
        self.usage.forget(&owned.name);
        self.usage.forget_link(&owned.id);
        if matches!(how, RemoveMode::Drain(_)) {
            self.usage.forget_threads(&owned.name);
        }
        Ok(removed)
    }

    /// Converts a record, refusing containers this host did not label.
    /// Pure: handing the container to a policy is [`Engine::hand_out`].
    fn managed(&self, record: ContainerRecord) -> Result<ManagedContainer> {
        if !ownership::is_owned(&record.labels, self.namespace()) {
            return Err(SandboxError::Refused(format!(
                "container {} is not managed by sandbox namespace {:?}; it was left untouched",
                record.name,
                self.namespace()
            )));
        }
        let get = |key: &str| record.labels.get(key).cloned().unwrap_or_default();
        let in_flight = if record.status == Status::Running {
            self.usage.count(&record.name)
        } else {
            0
        };
        let last_used_ms = if in_flight > 0 {
            now_ms()
        } else {
            // A re-created container is as fresh as its creation, whatever
            // its predecessor's record says.
            let created = record.created.map(|s| s.max(0) as u64 * 1000);
            self.usage
                .last_used_ms(&record.name)
                .max(created)
                .unwrap_or_else(now_ms)
        };
        let threads = self.usage.threads(&record.name);
        let profile = profile_label(&record.labels).to_owned();
        Ok(ManagedContainer {
            container: Container {
                backend_id: get(label::BACKEND),
                status: record.status,
                last_used_ms,
                in_flight: u32::try_from(in_flight).unwrap_or(u32::MAX),
                threads: u32::try_from(threads).unwrap_or(u32::MAX),
                id: record.id.clone(),
                name: record.name.clone(),
            },
            workspace: get(label::WORKSPACE),
            policy: get(label::POLICY),
            policy_digest: record.labels.get(label::POLICY_DIGEST).cloned(),
            created: record.created,
            agent: crate::dataplane::agent::AgentMode::of(&record.labels),
            profile,
            outdated: self.outdated_because(&record.labels),
            managed_elsewhere: self.elsewhere(&record.labels),
            plane: record
                .labels
                .get(crate::provider::plane::PLANE_LABEL)
                .cloned(),
        })
    }

    /// Records that `container` is given to a policy, which may then return
    /// it from `ensure-container` for its backend.
    pub fn hand_out(&self, container: &ManagedContainer) {
        self.handouts.record(
            &container.id,
            &container.backend_id,
            container.agent,
            &container.profile,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::UserIds;
    use crate::provider::memory::MemoryProvider;

    fn engine(root: &std::path::Path) -> (Engine, Arc<MemoryProvider>) {
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
        (Engine::new(config, provider.clone()), provider)
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
        let (engine, provider) = engine(dir.path());
        provider.insert(foreign("victim", &[]));
        provider.insert(foreign(
            "other",
            &[(label::MANAGED, "true"), (label::NAMESPACE, "prod")],
        ));
        for id in ["victim", "other"] {
            assert!(matches!(
                engine.remove(id, RemoveMode::UnlessBusy).await,
                Err(SandboxError::Refused(_))
            ));
            assert!(matches!(
                engine.start(id, None).await,
                Err(SandboxError::Refused(_))
            ));
            assert!(matches!(
                engine.inspect(id).await,
                Err(SandboxError::Refused(_))
            ));
        }
        assert_eq!(provider.len(), 2);
    }

    #[tokio::test]
    async fn containers_carry_the_digest_of_the_policy_that_made_them() {
        let dir = tempfile::tempdir().unwrap();
        let (engine, _) = engine(dir.path());
        let alice = BackendId::parse("alice").unwrap();
        let by_running = |c: &ManagedContainer| {
            engine
                .running_policy()
                .made(&c.policy, c.policy_digest.as_deref())
        };
        let old = engine
            .create(&alice, "per-user", &ProfileName::default_profile())
            .await
            .unwrap();
        assert_eq!(old.policy_digest, None, "no policy recorded: no digest");
        assert!(!by_running(&old), "no policy recorded yet");
        let digest = ownership::policy_digest(b"v1");
        engine.record_policy("per-user", &digest);
        let bob = BackendId::parse("bob").unwrap();
        let made = engine
            .create(&bob, "per-user", &ProfileName::default_profile())
            .await
            .unwrap();
        assert_eq!(made.policy_digest.as_deref(), Some(digest.as_str()));
        assert!(by_running(&made));
        assert!(by_running(&old), "by name, when unlabelled");
        // Another build under the same name: bob's is no longer the running
        // one's, but still one this host made.
        engine.record_policy("per-user", &ownership::policy_digest(b"v2"));
        let made = engine.inspect(&made.id).await.unwrap().unwrap();
        assert!(!by_running(&made));
        assert!(engine.made_here(&made));
        // Made by a policy this host never ran.
        let mut foreign = made.clone();
        foreign.policy_digest = Some(ownership::policy_digest(b"elsewhere"));
        assert!(!engine.made_here(&foreign));
        assert!(engine.maintain_sees(&foreign));
        let own_only = engine.maintain_own_only();
        assert!(!engine.maintain_sees(&foreign));
        assert!(engine.maintain_sees(&made));
        assert!(engine.maintain_sees(&old));
        drop(own_only);
        assert!(engine.maintain_sees(&foreign));
    }

    #[tokio::test]
    async fn create_twice_adopts_instead_of_duplicating() {
        let dir = tempfile::tempdir().unwrap();
        let (engine, provider) = engine(dir.path());
        let alice = BackendId::parse("alice").unwrap();
        let a = engine
            .create(&alice, "per-user", &ProfileName::default_profile())
            .await
            .unwrap();
        let b = engine
            .create(&alice, "per-user", &ProfileName::default_profile())
            .await
            .unwrap();
        assert_eq!(a.id, b.id);
        assert_eq!(provider.len(), 1);
    }

    #[tokio::test]
    async fn a_busy_container_is_not_removed_unless_forced() {
        let dir = tempfile::tempdir().unwrap();
        let (engine, provider) = engine(dir.path());
        let alice = BackendId::parse("alice").unwrap();
        let c = engine
            .create(&alice, "per-user", &ProfileName::default_profile())
            .await
            .unwrap();
        provider.start(&c.id).await.unwrap();
        let work = engine.begin_work(&alice).await.unwrap();
        assert!(matches!(
            engine.remove(&c.id, RemoveMode::UnlessBusy).await,
            Err(SandboxError::Refused(_))
        ));
        assert_eq!(provider.len(), 1);
        drop(work);
        assert!(engine.remove(&c.id, RemoveMode::UnlessBusy).await.unwrap());
    }

    #[tokio::test]
    async fn a_drained_container_admits_no_work_and_waits_for_the_running() {
        let dir = tempfile::tempdir().unwrap();
        let (engine, provider) = engine(dir.path());
        let engine = Arc::new(engine);
        let alice = BackendId::parse("alice").unwrap();
        let c = engine
            .create(&alice, "per-user", &ProfileName::default_profile())
            .await
            .unwrap();
        provider.start(&c.id).await.unwrap();
        let work = engine.begin_work(&alice).await.unwrap();
        let started = tokio::time::Instant::now();
        let deadline = started + std::time::Duration::from_secs(5);
        let remover = {
            let engine = engine.clone();
            let id = c.id.clone();
            tokio::spawn(async move { engine.remove(&id, RemoveMode::Drain(deadline)).await })
        };
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        assert!(matches!(
            engine.begin_work(&alice).await,
            Err(SandboxError::Refused(_))
        ));
        assert_eq!(provider.len(), 1, "not removed while the work runs");
        drop(work);
        assert!(remover.await.unwrap().unwrap());
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
        assert!(engine.begin_work(&alice).await.unwrap().is_some());
    }

    #[tokio::test]
    async fn container_references_cannot_traverse_api_paths() {
        let dir = tempfile::tempdir().unwrap();
        let (engine, _) = engine(dir.path());
        for bad in ["../images/x", "a/b", "", "x?y", "-rf"] {
            assert!(
                matches!(engine.inspect(bad).await, Err(SandboxError::InvalidId(_))),
                "{bad}"
            );
        }
    }
}

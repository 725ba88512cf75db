//! The one door to the policy: every call goes through the lanes, and every
//! answer is verified ([`super::answers`]) before the host acts on it. The
//! rest of the host gets verified types only.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use sandbox_contract::{BackendId, Removal, ThreadId, UserId};

use super::lanes::Lanes;
use super::{answers, CompiledPolicy, PolicyEngine};
use crate::config::ProfileName;
use crate::dataplane::agent::AgentMode;
use crate::engine::Engine;
use crate::error::Result;

/// The key of `maintain`'s lane: not a valid id, so no backend shares it.
const MAINTENANCE_KEY: &str = "#maintenance";

/// The most entries of a `maintain` plan the host shows.
pub const MAX_PLAN_ENTRIES: usize = 1000;

/// A container id the policy returned from `ensure-container`, checked to
/// be the one the host handed out for that backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedContainer {
    /// The engine's container id.
    pub id: String,
    /// The container's name (derived by the host from the backend id).
    pub name: String,
    /// What it has of `sandbox-agent` (from the host's label when it was
    /// handed out): how executes reach it.
    pub(crate) agent: AgentMode,
    /// The profile it was made under (from the host's label when it was
    /// handed out).
    pub profile: String,
}

/// Backends whose profile the client remembers; past it, the memory
/// starts over (an answer is cheap to ask again).
const MAX_REMEMBERED_PROFILES: usize = 100_000;

/// The running policy, behind its checks.
pub struct PolicyClient {
    engine: PolicyEngine,
    host: Arc<Engine>,
    lanes: Lanes,
    /// The running policy's (pure) `profile` answers, checked, by backend;
    /// forgotten on a swap.
    profiles: Mutex<ProfileAnswers>,
}

/// Answers of one policy: a swap starts a new generation, and an answer
/// asked before it is not kept (it may come from the policy swapped out).
#[derive(Default)]
struct ProfileAnswers {
    generation: u64,
    by_backend: HashMap<String, ProfileName>,
}

impl PolicyClient {
    /// Compiles, self-checks and runs `bytes` (from `source`, for messages).
    pub async fn load(
        engine: PolicyEngine,
        host: Arc<Engine>,
        bytes: &[u8],
        source: &str,
    ) -> Result<Self> {
        let compiled = CompiledPolicy::load(&engine, bytes, source, &host).await?;
        tracing::debug!(
            policy = compiled.name(),
            source = compiled.source(),
            "policy loaded"
        );
        let lanes = Lanes::new(host.clone(), Arc::new(compiled));
        Ok(PolicyClient {
            engine,
            host,
            lanes,
            profiles: Mutex::default(),
        })
    }

    /// Loads, self-checks and switches to another policy; on any error the
    /// running policy stays.
    pub async fn swap(&self, bytes: &[u8], source: &str) -> Result<()> {
        let compiled = CompiledPolicy::load(&self.engine, bytes, source, &self.host).await?;
        {
            let mut answers = self.profiles.lock().unwrap();
            self.lanes.swap_policy(Arc::new(compiled));
            answers.generation += 1;
            answers.by_backend.clear();
            self.host.forget_profiles();
        }
        Ok(())
    }

    /// The running policy's name (sanitised).
    pub fn name(&self) -> String {
        self.lanes.policy().name().to_owned()
    }

    /// Policy instances alive now (idle in the pool, or lent to a call).
    pub fn instances(&self) -> usize {
        self.lanes.pool().live()
    }

    /// Most policy instances the running policy's pool keeps alive.
    pub fn pool_capacity(&self) -> usize {
        self.lanes.pool().capacity()
    }

    /// What loading the running policy measured.
    pub fn report(&self) -> super::LoadReport {
        *self.lanes.policy().report()
    }

    /// What `n` more instances of the running policy cost, measured.
    pub async fn instance_cost(&self, n: usize) -> Result<super::measure::InstanceCost> {
        super::measure::instance_cost(&self.lanes.policy(), &self.host, n).await
    }

    /// Policy calls that trapped so far.
    pub fn traps(&self) -> u64 {
        self.lanes.traps.load(Ordering::Relaxed)
    }

    /// The backend serving `thread`: the policy's pure mapping, checked to
    /// be a valid backend of the thread's own user.
    pub async fn backend_of(&self, thread: &ThreadId) -> Result<BackendId> {
        let answered = self
            .lanes
            .route(thread.as_str(), async |p| {
                p.backend_id(thread.as_str()).await
            })
            .await?;
        answers::backend_of_thread(thread, &answered)
    }

    /// The operator's profile the policy chooses for `backend`, checked to
    /// be one the operator defined (`default` for a policy of the 0.3
    /// world), and recorded with the engine. Asked once per backend while
    /// the policy runs: the answer is pure.
    pub async fn profile_of(&self, backend: &BackendId) -> Result<ProfileName> {
        let (known, generation) = {
            let answers = self.profiles.lock().unwrap();
            let known = answers.by_backend.get(backend.as_str()).cloned();
            (known, answers.generation)
        };
        if let Some(profile) = known {
            return Ok(profile);
        }
        let answered = self
            .lanes
            .route(backend.as_str(), async |p| p.profile(backend).await)
            .await?;
        let profile = answers::profile(self.host.config(), backend, answered)?;
        let mut answers = self.profiles.lock().unwrap();
        if answers.generation == generation {
            if answers.by_backend.len() >= MAX_REMEMBERED_PROFILES {
                answers.by_backend.clear();
            }
            answers
                .by_backend
                .insert(backend.as_str().to_owned(), profile.clone());
            self.host.choose_profile(backend, &profile);
        }
        Ok(profile)
    }

    /// A running container for `backend`, in its lane, under the profile
    /// the policy chooses for it; the answer must be the container the
    /// host handed out for that backend.
    pub async fn ensure(&self, backend: &BackendId) -> Result<VerifiedContainer> {
        let profile = self.profile_of(backend).await?;
        let c = self
            .lanes
            .call(backend.as_str(), async |p| {
                p.ensure_container(backend, &profile).await
            })
            .await?;
        let agent = self.host.handouts().check_serves(&c.id, backend.as_str())?;
        let made_under = self.host.handouts().profile(&c.id).unwrap_or_default();
        Ok(VerifiedContainer {
            id: c.id,
            name: c.name,
            agent,
            profile: made_under,
        })
    }

    /// Runs `release-thread` in the lane of the thread's backend; removals
    /// drain until `deadline`.
    pub async fn release_thread(
        &self,
        thread: &ThreadId,
        backend: &BackendId,
        deadline: tokio::time::Instant,
    ) -> Result<bool> {
        self.lanes
            .call(backend.as_str(), async |p| {
                p.release_thread(thread, deadline).await
            })
            .await
    }

    /// Runs `destroy-user` in the user's lane; removals drain until
    /// `deadline`.
    pub async fn destroy_user(
        &self,
        user: &UserId,
        deadline: tokio::time::Instant,
    ) -> Result<bool> {
        self.lanes
            .call(user.as_str(), async |p| {
                p.destroy_user(user, deadline).await
            })
            .await
    }

    /// Runs `maintain` on its own lane: the removals done, or with
    /// `dry_run` the plan (bounded and escaped: it is the policy's text).
    pub async fn maintain(&self, dry_run: bool) -> Result<Vec<Removal>> {
        let plan = self
            .lanes
            .call(MAINTENANCE_KEY, async |p| p.maintain(dry_run).await)
            .await?;
        Ok(answers::removals(plan, MAX_PLAN_ENTRIES))
    }

    /// Runs `f` holding `backend`'s lane: never beside a running ensure of
    /// the same backend.
    pub async fn in_lane<T>(&self, backend: &str, f: impl AsyncFnOnce() -> Result<T>) -> Result<T> {
        let _lane = self.lanes.lock(backend).await;
        f().await
    }
}

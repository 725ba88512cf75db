//! The world's imports, implemented for a policy instance's store state.
//!
//! Each import is a thin conversion to [`Capabilities`], admitted first by
//! the call's [`Scope`] and host-call budget; the time spent in them is
//! added to the call clock so the guest-CPU deadline counts only the
//! policy's own work (the wall-clock budget counts everything).

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use wasmtime::component::ResourceTable;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::containment::PolicyLimiter;

use sandbox_contract::{BackendId, Container, UserId};
use wasmtime_wasi_config::{WasiConfig, WasiConfigVariables};

use super::bindings::contract_types as types;
use super::bindings::sandbox::policy::containers;
use super::bindings::wasi::logging::logging;
use crate::engine::{Engine, ManagedContainer, RemoveMode};
use crate::error::SandboxError;

/// Per-call accounting for the guest CPU deadline.
#[derive(Debug, Clone, Copy)]
pub struct CallClock {
    pub started: Instant,
    pub in_host: Duration,
    pub budget: Duration,
}

impl CallClock {
    pub fn guest_time(&self) -> Duration {
        self.started.elapsed().saturating_sub(self.in_host)
    }
}

/// What the running export may ask of the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// `name`, `backend-id`: pure, no container operation.
    Pure,
    /// `ensure-container` of this backend: look up, create and start this
    /// backend's container only; remove (an eviction) only what is idle.
    Ensure(BackendId),
    /// `release-thread` and `destroy-user` for this user: look up, and
    /// remove this user's containers only, draining each until `deadline`.
    Destroy {
        user: UserId,
        deadline: tokio::time::Instant,
    },
    /// `maintain`: look up, and remove only what has no work in flight;
    /// nothing at all in a dry run.
    Maintain { dry_run: bool },
}

/// Containers one call may try to create (a create that loses a name race
/// adopts the winner; a failed create may be retried once).
pub const CREATES_PER_CALL: u32 = 2;

/// The accounting of the running export call.
#[derive(Debug, Clone)]
pub struct CallState {
    pub scope: Scope,
    pub host_calls: u32,
    pub creates: u32,
    /// Why the call must trap at the next epoch tick (a budget ran out).
    pub exhausted: Option<String>,
}

impl CallState {
    pub fn new(scope: Scope) -> Self {
        CallState {
            scope,
            host_calls: 0,
            creates: 0,
            exhausted: None,
        }
    }
}

/// The data of one policy instance's store.
pub struct InstanceState {
    pub engine: Arc<Engine>,
    /// Label value stamped on containers this policy creates.
    pub policy_name: String,
    pub clock: CallClock,
    pub call: CallState,
    max_host_calls: u32,
    pub limiter: PolicyLimiter,
    wasi: WasiCtx,
    table: ResourceTable,
    /// `[policy_config]`, served by `wasi:config/store`.
    config: WasiConfigVariables,
}

impl InstanceState {
    pub fn new(
        engine: Arc<Engine>,
        policy_name: String,
        limiter: PolicyLimiter,
        budget: Duration,
        max_host_calls: u32,
        max_resources: usize,
    ) -> Self {
        let mut table = ResourceTable::new();
        // Leaked pollables and streams are host memory: bounded per instance.
        table.set_max_capacity(max_resources);
        let config = WasiConfigVariables::from_iter(engine.config().policy_config.clone());
        InstanceState {
            engine,
            config,
            policy_name,
            clock: CallClock {
                started: Instant::now(),
                in_host: Duration::ZERO,
                budget,
            },
            call: CallState::new(Scope::Pure),
            max_host_calls,
            limiter,
            // No preopens, no env, no args, no network: std's needs only.
            // Random bytes are allocated host-side, outside the pool: small.
            wasi: WasiCtx::builder().max_random_size(64 * 1024).build(),
            table,
        }
    }

    /// Counts one host call against the call's budget, and checks that the
    /// running export may make it. A spent budget also makes the call trap at
    /// the next epoch tick, so a loop over cheap imports cannot run on.
    fn admit(
        &mut self,
        op: &str,
        allowed: impl FnOnce(&Scope) -> bool,
    ) -> Result<(), SandboxError> {
        self.call.host_calls += 1;
        if self.call.host_calls > self.max_host_calls {
            let why = format!(
                "the policy made more than {} host calls in one call",
                self.max_host_calls
            );
            self.call.exhausted.get_or_insert(why.clone());
            // A trap, not an answer: the policy cannot loop on refusals.
            return Err(SandboxError::PolicyTrap(why));
        }
        if !allowed(&self.call.scope) {
            return Err(SandboxError::Refused(format!(
                "{op} is not allowed in {}",
                describe(&self.call.scope)
            )));
        }
        Ok(())
    }

    /// Hands containers to the policy: from now on it may return them from
    /// `ensure-container` for their backend.
    fn hand_out(&self, containers: &[&ManagedContainer]) {
        for c in containers {
            self.engine.hand_out(c);
        }
    }

    /// Runs a host operation, excluding its time from the guest's budget.
    async fn host<T>(&mut self, op: impl Future<Output = T>) -> T {
        let start = Instant::now();
        let out = op.await;
        self.clock.in_host += start.elapsed();
        out
    }
}

fn describe(scope: &Scope) -> String {
    match scope {
        Scope::Pure => "a pure export (name, backend-id)".into(),
        Scope::Ensure(backend) => format!("ensure-container of backend {backend}"),
        Scope::Destroy { user, .. } => {
            format!("release-thread or destroy-user of user {user} (which may only look up and remove that user's containers)")
        }
        Scope::Maintain { dry_run: false } => "maintain (which may only look up and remove)".into(),
        Scope::Maintain { dry_run: true } => "a dry run of maintain (which removes nothing)".into(),
    }
}

fn any_container_op(scope: &Scope) -> bool {
    !matches!(scope, Scope::Pure)
}

impl WasiView for InstanceState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl types::Host for InstanceState {
    /// The one conversion of host errors into the policy's: refusals are
    /// logged (a policy probing the host's rules shows up), a spent budget
    /// traps, everything else is the contract's error.
    fn convert_error(&mut self, e: SandboxError) -> wasmtime::Result<types::Error> {
        match e {
            SandboxError::PolicyTrap(why) => Err(wasmtime::Error::msg(why)),
            e => {
                if matches!(e, SandboxError::Refused(_) | SandboxError::InvalidId(_)) {
                    tracing::warn!(policy = %self.policy_name, error = %e, "policy request refused");
                }
                Ok(e.into())
            }
        }
    }
}

fn contract(c: ManagedContainer) -> Container {
    c.container
}

impl containers::Host for InstanceState {
    async fn find(&mut self, backend_id: String) -> Result<Option<Container>, SandboxError> {
        self.admit("find", any_container_op)?;
        let backend = BackendId::parse(&backend_id)?;
        let engine = self.engine.clone();
        let found = self.host(engine.find(&backend)).await?;
        self.hand_out(&found.iter().collect::<Vec<_>>());
        Ok(found.map(contract))
    }

    async fn list(&mut self) -> Result<Vec<Container>, SandboxError> {
        self.admit("list", any_container_op)?;
        let engine = self.engine.clone();
        let all = self.host(engine.list()).await?;
        self.hand_out(&all.iter().collect::<Vec<_>>());
        Ok(all.into_iter().map(contract).collect())
    }

    async fn create(&mut self, backend_id: String) -> Result<Container, SandboxError> {
        // Only ensure-container creates, only for its own backend, and only
        // a bounded number of times per call.
        self.admit(
            "create",
            |scope| matches!(scope, Scope::Ensure(b) if b.as_str() == backend_id),
        )?;
        self.call.creates += 1;
        if self.call.creates > CREATES_PER_CALL {
            return Err(SandboxError::Refused(format!(
                "a policy call may create at most {CREATES_PER_CALL} containers"
            )));
        }
        let backend = BackendId::parse(&backend_id)?;
        let engine = self.engine.clone();
        let policy = self.policy_name.clone();
        let created = self.host(engine.create(&backend, &policy)).await?;
        self.hand_out(&[&created]);
        Ok(created.container)
    }

    async fn start(&mut self, container_id: String) -> Result<(), SandboxError> {
        let backend = match &self.call.scope {
            Scope::Ensure(b) => Some(b.clone()),
            _ => None,
        };
        self.admit("start", |_| backend.is_some())?;
        let engine = self.engine.clone();
        self.host(engine.start(&container_id, backend.as_ref()))
            .await
    }

    async fn inspect(&mut self, container_id: String) -> Result<Option<Container>, SandboxError> {
        self.admit("inspect", any_container_op)?;
        let engine = self.engine.clone();
        let found = self.host(engine.inspect(&container_id)).await?;
        self.hand_out(&found.iter().collect::<Vec<_>>());
        Ok(found.map(contract))
    }

    async fn remove(&mut self, container_id: String) -> Result<bool, SandboxError> {
        self.admit("remove", |scope| {
            !matches!(scope, Scope::Pure | Scope::Maintain { dry_run: true })
        })?;
        let how = match &self.call.scope {
            // Idle and capacity decisions never kill running work.
            Scope::Ensure(_) | Scope::Maintain { .. } => RemoveMode::UnlessBusy,
            Scope::Destroy { deadline, .. } => RemoveMode::Drain(*deadline),
            Scope::Pure => unreachable!("refused by admit"),
        };
        if let Scope::Destroy { user, .. } = &self.call.scope {
            // A destroy of one user never reaches another user's container.
            let user = user.clone();
            let engine = self.engine.clone();
            let target = self.host(engine.inspect(&container_id)).await?;
            let owner = target
                .as_ref()
                .map(|c| BackendId::parse(&c.backend_id).and_then(|b| b.user()));
            if let Some(owner) = owner {
                if owner.as_ref().ok() != Some(&user) {
                    return Err(SandboxError::Refused(format!(
                        "a destroy of user {user} may not remove another user's container"
                    )));
                }
            }
        }
        let engine = self.engine.clone();
        self.host(engine.remove(&container_id, how)).await
    }
}

impl logging::Host for InstanceState {
    async fn log(
        &mut self,
        level: logging::Level,
        context: String,
        message: String,
    ) -> wasmtime::Result<()> {
        if let Err(e) = self.admit("log", |_| true) {
            return match e {
                SandboxError::PolicyTrap(why) => Err(wasmtime::Error::msg(why)),
                _ => Ok(()),
            };
        }
        // Bounded and escaped: the policy must not flood or forge log lines.
        let message = crate::error::policy_text(&message);
        let context = crate::error::policy_text(&context);
        let policy = self.policy_name.as_str();
        match level {
            logging::Level::Trace => tracing::trace!(policy, context, "{message}"),
            logging::Level::Debug => tracing::debug!(policy, context, "{message}"),
            logging::Level::Info => tracing::info!(policy, context, "{message}"),
            logging::Level::Warn => tracing::warn!(policy, context, "{message}"),
            logging::Level::Error | logging::Level::Critical => {
                tracing::error!(policy, context, "{message}")
            }
        }
        Ok(())
    }
}

/// `wasi:config/store` over `[policy_config]`.
pub fn config_view(state: &mut InstanceState) -> WasiConfig<'_> {
    WasiConfig::from(&state.config)
}

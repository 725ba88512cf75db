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

use super::bindings::sandbox::policy::{containers, context, logging, types, workspaces};
use crate::capabilities::{Capabilities, ManagedContainer};
use crate::error::SandboxError;
use crate::provider::Status;

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
    /// `name`, `backend-id`: pure, no container or workspace operation.
    Pure,
    /// `get-thread-backend`, `destroy-*` in the lane of this key: look up,
    /// remove, and prepare the key's own user's workspace; never create or start.
    Lane(String),
    /// `ensure-container` of this backend: additionally create and start
    /// containers of this backend only.
    Ensure(String),
    /// `maintain`: look up and remove only.
    Maintain,
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
    pub caps: Arc<Capabilities>,
    /// Label value stamped on containers this policy creates.
    pub policy_name: String,
    pub clock: CallClock,
    pub call: CallState,
    max_host_calls: u32,
    pub limiter: PolicyLimiter,
    wasi: WasiCtx,
    table: ResourceTable,
}

impl InstanceState {
    pub fn new(
        caps: Arc<Capabilities>,
        policy_name: String,
        limiter: PolicyLimiter,
        budget: Duration,
        max_host_calls: u32,
        max_resources: usize,
    ) -> Self {
        let mut table = ResourceTable::new();
        // Leaked pollables and streams are host memory: bounded per instance.
        table.set_max_capacity(max_resources);
        InstanceState {
            caps,
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
    ) -> Result<(), types::Error> {
        self.call.host_calls += 1;
        if self.call.host_calls > self.max_host_calls {
            let why = format!(
                "the policy made more than {} host calls in one call",
                self.max_host_calls
            );
            self.call.exhausted.get_or_insert(why.clone());
            return Err(types::Error::Refused(why));
        }
        if !allowed(&self.call.scope) {
            let why = format!("{op} is not allowed in {}", describe(&self.call.scope));
            tracing::warn!(policy = %self.policy_name, op, "policy request refused: {why}");
            return Err(types::Error::Refused(why));
        }
        Ok(())
    }

    /// The user whose containers the running lane may act on, if any.
    fn lane_user(&self) -> Option<&str> {
        match &self.call.scope {
            Scope::Lane(key) | Scope::Ensure(key) => Some(policy_core::ids::user_of_backend(key)),
            Scope::Pure | Scope::Maintain => None,
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
        Scope::Lane(key) => format!("the lane of {key} outside ensure-container"),
        Scope::Ensure(backend) => format!("ensure-container of backend {backend}"),
        Scope::Maintain => "maintain (which may only look up and remove)".into(),
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

fn to_wit(c: ManagedContainer) -> types::Container {
    types::Container {
        id: c.id,
        name: c.name,
        backend_id: c.backend_id,
        workspace: c.workspace,
        status: match c.status {
            Status::Created => types::ContainerStatus::Created,
            Status::Running => types::ContainerStatus::Running,
            Status::Paused => types::ContainerStatus::Paused,
            Status::Restarting => types::ContainerStatus::Restarting,
            Status::Removing => types::ContainerStatus::Removing,
            Status::Exited => types::ContainerStatus::Exited,
            Status::Dead => types::ContainerStatus::Dead,
        },
        last_used_ms: c.last_used_ms,
    }
}

fn log_refusal<T>(r: Result<T, SandboxError>, op: &str, policy: &str) -> Result<T, types::Error> {
    r.map_err(|e| {
        if matches!(e, SandboxError::Refused(_) | SandboxError::InvalidId(_)) {
            tracing::warn!(policy, op, error = %e, "policy request refused");
        }
        e.into()
    })
}

impl types::Host for InstanceState {}

impl containers::Host for InstanceState {
    async fn find(&mut self, backend_id: String) -> Result<Option<types::Container>, types::Error> {
        self.admit("find", any_container_op)?;
        let caps = self.caps.clone();
        let r = self.host(caps.find(&backend_id)).await;
        log_refusal(r, "find", &self.policy_name).map(|c| c.map(to_wit))
    }

    async fn list_managed(&mut self) -> Result<Vec<types::Container>, types::Error> {
        self.admit("list-managed", any_container_op)?;
        let caps = self.caps.clone();
        let r = self.host(caps.list_managed()).await;
        log_refusal(r, "list-managed", &self.policy_name)
            .map(|v| v.into_iter().map(to_wit).collect())
    }

    async fn create(
        &mut self,
        backend_id: String,
        workspace: String,
    ) -> Result<types::Container, types::Error> {
        // Only ensure-container creates, only for its own backend, and only
        // a bounded number of times per call.
        self.admit(
            "create",
            |scope| matches!(scope, Scope::Ensure(b) if *b == backend_id),
        )?;
        self.call.creates += 1;
        if self.call.creates > CREATES_PER_CALL {
            return Err(types::Error::Refused(format!(
                "a policy call may create at most {CREATES_PER_CALL} containers"
            )));
        }
        let caps = self.caps.clone();
        let policy = self.policy_name.clone();
        let r = self
            .host(caps.create(&backend_id, &workspace, &policy))
            .await;
        log_refusal(r, "create", &self.policy_name).map(to_wit)
    }

    async fn start(&mut self, container_id: String) -> Result<(), types::Error> {
        let backend = match &self.call.scope {
            Scope::Ensure(b) => Some(b.clone()),
            _ => None,
        };
        self.admit("start", |_| backend.is_some())?;
        let backend = backend.unwrap_or_default();
        let caps = self.caps.clone();
        let r = self.host(caps.start_for(&container_id, &backend)).await;
        log_refusal(r, "start", &self.policy_name)
    }

    async fn inspect(
        &mut self,
        container_id: String,
    ) -> Result<Option<types::Container>, types::Error> {
        self.admit("inspect", any_container_op)?;
        let caps = self.caps.clone();
        let r = self.host(caps.inspect(&container_id)).await;
        log_refusal(r, "inspect", &self.policy_name).map(|c| c.map(to_wit))
    }

    async fn remove(&mut self, container_id: String) -> Result<bool, types::Error> {
        self.admit("remove", any_container_op)?;
        // Idle and capacity decisions (maintain, an eviction in ensure) never
        // kill running work: a busy container is left, and `false` answered.
        // A destroy has already waited for the grace period.
        let defer_if_busy = matches!(self.call.scope, Scope::Maintain | Scope::Ensure(_));
        let caps = self.caps.clone();
        let r = self
            .host(caps.remove_unless_busy(&container_id, defer_if_busy))
            .await;
        log_refusal(r, "remove", &self.policy_name)
    }
}

impl workspaces::Host for InstanceState {
    async fn prepare(&mut self, name: String) -> Result<(), types::Error> {
        // Only the lane's own user's workspace: a lane must not litter the
        // workspace root with directories of other (or made-up) users.
        let user = self.lane_user().map(str::to_owned);
        self.admit("workspaces.prepare", |_| {
            user.as_deref() == Some(name.as_str())
        })?;
        let caps = self.caps.clone();
        let r = self.host(async { caps.prepare_workspace(&name) }).await;
        log_refusal(r, "prepare", &self.policy_name)
    }
}

impl context::Host for InstanceState {
    async fn now_ms(&mut self) -> u64 {
        let _ = self.admit("now-ms", |_| true);
        crate::capabilities::now_ms()
    }

    async fn policy_config(&mut self) -> Vec<(String, String)> {
        let _ = self.admit("policy-config", |_| true);
        let config = &self.caps.config().policy_config;
        config.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }
}

impl logging::Host for InstanceState {
    async fn log(&mut self, level: logging::Level, message: String) {
        if self.admit("log", |_| true).is_err() {
            return;
        }
        // Bounded and escaped: the policy must not flood or forge log lines.
        let message = crate::error::policy_text(&message);
        let policy = self.policy_name.as_str();
        match level {
            logging::Level::Trace => tracing::trace!(policy, "{message}"),
            logging::Level::Debug => tracing::debug!(policy, "{message}"),
            logging::Level::Info => tracing::info!(policy, "{message}"),
            logging::Level::Warn => tracing::warn!(policy, "{message}"),
            logging::Level::Error => tracing::error!(policy, "{message}"),
        }
    }
}

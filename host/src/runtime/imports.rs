//! The world's imports, implemented for a policy instance's store state.
//!
//! Each import is a thin conversion to [`Capabilities`]; the time spent in
//! them is added to the call clock so the policy's deadline counts only its
//! own CPU time (Docker operations have their own timeout).

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use wasmtime::component::ResourceTable;
use wasmtime::StoreLimits;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

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

/// The data of one policy instance's store.
pub struct InstanceState {
    pub caps: Arc<Capabilities>,
    /// Label value stamped on containers this policy creates.
    pub policy_name: String,
    pub clock: CallClock,
    pub limits: StoreLimits,
    wasi: WasiCtx,
    table: ResourceTable,
}

impl InstanceState {
    pub fn new(
        caps: Arc<Capabilities>,
        policy_name: String,
        limits: StoreLimits,
        budget: Duration,
    ) -> Self {
        InstanceState {
            caps,
            policy_name,
            clock: CallClock {
                started: Instant::now(),
                in_host: Duration::ZERO,
                budget,
            },
            limits,
            // No preopens, no env, no args, no network: std's needs only.
            wasi: WasiCtx::builder().build(),
            table: ResourceTable::new(),
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
        let caps = self.caps.clone();
        let r = self.host(caps.find(&backend_id)).await;
        log_refusal(r, "find", &self.policy_name).map(|c| c.map(to_wit))
    }

    async fn list_managed(&mut self) -> Result<Vec<types::Container>, types::Error> {
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
        let caps = self.caps.clone();
        let policy = self.policy_name.clone();
        let r = self
            .host(caps.create(&backend_id, &workspace, &policy))
            .await;
        log_refusal(r, "create", &self.policy_name).map(to_wit)
    }

    async fn start(&mut self, container_id: String) -> Result<(), types::Error> {
        let caps = self.caps.clone();
        let r = self.host(caps.start(&container_id)).await;
        log_refusal(r, "start", &self.policy_name)
    }

    async fn inspect(
        &mut self,
        container_id: String,
    ) -> Result<Option<types::Container>, types::Error> {
        let caps = self.caps.clone();
        let r = self.host(caps.inspect(&container_id)).await;
        log_refusal(r, "inspect", &self.policy_name).map(|c| c.map(to_wit))
    }

    async fn remove(&mut self, container_id: String) -> Result<bool, types::Error> {
        let caps = self.caps.clone();
        let r = self.host(caps.remove(&container_id)).await;
        log_refusal(r, "remove", &self.policy_name)
    }
}

impl workspaces::Host for InstanceState {
    async fn prepare(&mut self, name: String) -> Result<(), types::Error> {
        let caps = self.caps.clone();
        let r = self.host(async { caps.prepare_workspace(&name) }).await;
        log_refusal(r, "prepare", &self.policy_name)
    }
}

impl context::Host for InstanceState {
    async fn now_ms(&mut self) -> u64 {
        crate::capabilities::now_ms()
    }

    async fn policy_config(&mut self) -> Vec<(String, String)> {
        let config = &self.caps.config().policy_config;
        config.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }
}

impl logging::Host for InstanceState {
    async fn log(&mut self, level: logging::Level, message: String) {
        // Bounded and escaped: the policy must not flood or forge log lines.
        let message: String = message
            .chars()
            .take(1024)
            .flat_map(char::escape_default)
            .collect();
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

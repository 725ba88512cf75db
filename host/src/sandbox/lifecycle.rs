//! Housekeeping over a sandbox's containers: the policy's `maintain` (idle
//! time, capacity), run periodically and by `gc`, and `gc`'s own rules for
//! containers no backend owns any more. Nothing here removes a container
//! with work in flight: the engine refuses it ([`RemoveMode::UnlessBusy`]).

use std::time::Duration;

use sandbox_contract::{BackendId, Status};

use super::Sandbox;
use crate::engine::clock::now_ms;
use crate::engine::{ManagedContainer, RemoveMode};
use crate::error::{Result, SandboxError};

/// One container `gc` found (or, in a dry run, would remove).
#[derive(Debug, Clone, serde::Serialize)]
#[cfg_attr(feature = "serve", derive(schemars::JsonSchema))]
pub struct GcEntry {
    /// The container, as it was found.
    pub container: ManagedContainer,
    /// Why it goes (the policy's reasons start with `policy:`).
    pub reason: String,
    /// False on a dry run, and when the removal was deferred.
    pub removed: bool,
}

impl Sandbox {
    /// Runs the policy's `maintain` now: the removals it made (idle time,
    /// capacity), or with `dry_run` the ones it would make.
    pub async fn maintain(&self, dry_run: bool) -> Result<Vec<sandbox_contract::Removal>> {
        self.inner.policy.maintain(dry_run).await
    }

    /// Finds (and unless `dry_run`, removes) what should go: first the
    /// policy's idle and capacity decisions, then managed containers no
    /// backend owns any more: stopped or dead ones, ones labelled by
    /// another policy than the running one (left by a swap), and, with
    /// `max_age`, ones created longer ago; and ones made by an older host
    /// whose agent is outdated (the next use creates a current one). Only
    /// containers labelled for this namespace are considered; busy ones are
    /// deferred.
    pub async fn gc(&self, max_age: Option<Duration>, dry_run: bool) -> Result<Vec<GcEntry>> {
        let before = self.list().await?;
        let mut entries = Vec::new();
        for planned in self.maintain(dry_run).await? {
            let Some(container) = before.iter().find(|c| c.id == planned.container_id) else {
                continue;
            };
            entries.push(GcEntry {
                container: container.clone(),
                reason: format!("policy: {}", planned.reason),
                removed: !dry_run,
            });
        }
        let now = (now_ms() / 1000) as i64;
        let policy = self.policy_name();
        for container in self.list().await? {
            if entries.iter().any(|e| e.container.id == container.id) {
                continue;
            }
            let outdated = self.inner.engine.outdated(&container);
            let Some(reason) = orphaned(&container, &policy, max_age, now)
                .or_else(|| outdated.then(|| OUTDATED.to_owned()))
            else {
                continue;
            };
            let (reason, removed) = if dry_run {
                (reason, false)
            } else {
                self.collect(&container, reason).await?
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

    /// Removes one orphan through its backend's lane (never beside a
    /// running ensure), unless work is in flight on it.
    async fn collect(
        &self,
        container: &ManagedContainer,
        reason: String,
    ) -> Result<(String, bool)> {
        let engine = self.inner.engine.clone();
        let id = container.id.clone();
        let removed = self
            .inner
            .policy
            .in_lane(&container.backend_id, async || {
                engine.remove(&id, RemoveMode::UnlessBusy).await
            })
            .await;
        match removed {
            Ok(removed) => Ok((reason, removed)),
            Err(SandboxError::Refused(_)) => Ok((
                format!(
                    "{reason}; deferred while {} command(s) run on it",
                    container.in_flight
                ),
                false,
            )),
            Err(e) => Err(e),
        }
    }
}

/// Why gc removes a container an older host made (see [`Engine::outdated`]).
///
/// [`Engine::outdated`]: crate::engine::Engine::outdated
const OUTDATED: &str = "made by an older host: its agent is outdated";

impl Sandbox {
    /// Removes the containers made by an older host (their agent is
    /// outdated) that have no work in flight, each through its backend's
    /// lane: their next use creates a current one. The number removed.
    pub async fn retire_outdated(&self) -> Result<usize> {
        let mut removed = 0;
        for container in self.list().await? {
            if self.inner.engine.outdated(&container)
                && self.collect(&container, OUTDATED.to_owned()).await?.1
            {
                tracing::info!(container = container.name, "{OUTDATED}: removed while idle");
                removed += 1;
            }
        }
        Ok(removed)
    }
}

/// Why no backend owns `container` any more, if none does. Ownership comes
/// from the host's own labels, never from asking the policy again: a policy
/// whose backend ids do not map to themselves must not get live containers
/// collected.
fn orphaned(
    container: &ManagedContainer,
    policy: &str,
    max_age: Option<Duration>,
    now_secs: i64,
) -> Option<String> {
    if container.policy != policy {
        return Some(format!(
            "created by policy {:?}, not the running policy {policy}",
            container.policy
        ));
    }
    if BackendId::parse(&container.backend_id).is_err() {
        return Some("its backend label is not a valid backend id".to_owned());
    }
    if matches!(container.status, Status::Exited | Status::Dead) {
        return Some(container.status.as_str().to_owned());
    }
    match (max_age, container.created) {
        (Some(max), Some(created)) if now_secs - created >= max.as_secs() as i64 => {
            Some(format!("older than {}s", max.as_secs()))
        }
        _ => None,
    }
}

impl Sandbox {
    /// Calls `maintain` every `maintenance_interval_secs` while this sandbox
    /// (any clone) is alive, when running inside a tokio runtime.
    pub(super) fn start_maintenance(&self) {
        let interval = self.config().maintenance_interval_secs;
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if !(interval > 0.0 && interval.is_finite()) {
            return;
        }
        let weak = std::sync::Arc::downgrade(&self.inner);
        runtime.spawn(async move {
            let period = Duration::from_secs_f64(interval);
            loop {
                tokio::time::sleep(period).await;
                let Some(inner) = weak.upgrade() else { break };
                let sandbox = Sandbox { inner };
                match sandbox.maintain(false).await {
                    Ok(removed) if removed.is_empty() => {}
                    Ok(removed) => {
                        tracing::info!(removed = removed.len(), "maintenance removed containers")
                    }
                    Err(e) => tracing::warn!(error = %e, "maintenance failed"),
                }
                if let Err(e) = sandbox.retire_outdated().await {
                    tracing::warn!(error = %e, "retiring outdated containers failed");
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sandbox_contract::Container;

    fn container(policy: &str, backend: &str, status: Status, created: i64) -> ManagedContainer {
        ManagedContainer {
            container: Container {
                id: "c".into(),
                name: "n".into(),
                backend_id: backend.into(),
                status,
                last_used_ms: 0,
                in_flight: 0,
                threads: 0,
            },
            workspace: "alice".into(),
            policy: policy.into(),
            created: Some(created),
            agent: Default::default(),
        }
    }

    #[test]
    fn orphans_are_told_by_the_host_labels() {
        let live = container("per-user", "alice", Status::Running, 100);
        assert_eq!(orphaned(&live, "per-user", None, 200), None);
        assert!(orphaned(&live, "per-thread", None, 200)
            .unwrap()
            .contains("not the running policy"));
        let stopped = container("per-user", "alice", Status::Exited, 100);
        assert_eq!(
            orphaned(&stopped, "per-user", None, 200).as_deref(),
            Some("exited")
        );
        let bad = container("per-user", "../x", Status::Running, 100);
        assert!(orphaned(&bad, "per-user", None, 200).is_some());
        assert!(orphaned(&live, "per-user", Some(Duration::from_secs(50)), 200).is_some());
        assert_eq!(
            orphaned(&live, "per-user", Some(Duration::from_secs(500)), 200),
            None
        );
    }
}

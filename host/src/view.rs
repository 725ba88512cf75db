//! The JSON view of one managed container, shared by `sandbox ls --json` and `GET /v1/backends`.

use serde::Serialize;

use crate::engine::ManagedContainer;
use crate::provider::ContainerStats;

/// A managed container as both outputs show it: the container's own fields
/// at the top level (flattened, so the shape is the container's plus
/// `idle_secs`), and its resource usage when asked for.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[cfg_attr(feature = "serve", derive(schemars::JsonSchema))]
pub struct BackendView {
    /// The container, its fields serialized at the top level.
    #[serde(flatten)]
    pub container: ManagedContainer,
    /// Whole seconds since the container's last use (0 when a clock put
    /// that use in the future).
    pub idle_secs: u64,
    /// Memory and CPU from the engine (`ls --stats`); absent, not `null`,
    /// when not asked for or not running, as before this type existed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stats: Option<ContainerStats>,
}

impl BackendView {
    /// The view at `now_ms` (Unix ms, as [`crate::now_ms`]).
    pub fn new(container: ManagedContainer, now_ms: u64) -> Self {
        let idle_secs = now_ms.saturating_sub(container.last_used_ms) / 1000;
        BackendView {
            container,
            idle_secs,
            stats: None,
        }
    }

    /// The view with `stats` (from [`crate::provider::ContainerProvider::stats`]).
    pub fn with_stats(mut self, stats: Option<ContainerStats>) -> Self {
        self.stats = stats;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::Status;

    fn container(last_used_ms: u64) -> ManagedContainer {
        ManagedContainer {
            container: sandbox_contract::Container {
                id: "0123456789abcdef".into(),
                name: "sandbox.alice".into(),
                backend_id: "alice".into(),
                status: Status::Running,
                last_used_ms,
                in_flight: 2,
                threads: 1,
            },
            workspace: "/srv/ws/alice".into(),
            policy: "per-user".into(),
            policy_digest: None,
            created: Some(1_700_000_000),
            agent: Default::default(),
            profile: "default".into(),
            outdated: None,
            managed_elsewhere: None,
            plane: None,
        }
    }

    #[test]
    fn idle_time_counts_whole_seconds_since_the_last_use() {
        let now = 1_700_000_100_000;
        assert_eq!(BackendView::new(container(now), now).idle_secs, 0);
        assert_eq!(
            BackendView::new(container(now - 10_999), now).idle_secs,
            10,
            "rounded down"
        );
        assert_eq!(
            BackendView::new(container(now + 5_000), now).idle_secs,
            0,
            "a last use after now (another process's clock) is not negative"
        );
    }

    #[test]
    fn the_json_is_the_container_flat_plus_idle_secs_and_stats_when_present() {
        let now = 1_700_000_100_000;
        let view = BackendView::new(container(now - 42_000), now);
        let v = serde_json::to_value(&view).unwrap();
        let mut keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        keys.sort_unstable();
        // Read by API clients and `ls --json` users: renaming one breaks them.
        assert_eq!(
            keys,
            [
                "backend_id",
                "created",
                "id",
                "idle_secs",
                "in_flight",
                "last_used_ms",
                "name",
                "policy",
                "profile",
                "status",
                "threads",
                "workspace"
            ]
        );
        assert_eq!(v["idle_secs"], 42);
        assert_eq!(v["status"], "running");
        assert_eq!(v["in_flight"], 2);
        // The shape the two call sites built by hand before: the container's
        // own JSON with `idle_secs` patched in.
        let mut by_hand = serde_json::to_value(&view.container).unwrap();
        by_hand["idle_secs"] = 42.into();
        assert_eq!(v, by_hand);

        let stats = ContainerStats {
            memory_bytes: 1 << 20,
            memory_limit_bytes: 1 << 30,
            cpu_seconds: 1.5,
            pids: 3,
        };
        let v = serde_json::to_value(view.with_stats(Some(stats))).unwrap();
        assert_eq!(
            v["stats"],
            serde_json::json!({
                "memory_bytes": 1048576,
                "memory_limit_bytes": 1073741824,
                "cpu_seconds": 1.5,
                "pids": 3
            })
        );
    }
}

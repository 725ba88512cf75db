//! The typed plan of a sandbox container: everything the host decides, in
//! one value that tests can inspect without an engine.

use std::collections::HashMap;
use std::path::PathBuf;

use sandbox_contract::BackendId;

use crate::config::{Config, Limits, Profile, UserIds};
use crate::dataplane::agent::{self, AgentMode};

/// The idle command that keeps a sandbox alive between executes. `init`
/// (tini) is PID 1, so a stop is clean and zombies are reaped.
pub const IDLE_COMMAND: [&str; 2] = ["sleep", "infinity"];

/// Directories agent frameworks write their artifacts to at the root of the
/// file system (deepagents: large tool results, offloaded conversation
/// history, binary blobs), where the sandbox user cannot create anything.
/// Each is a per-user host directory bind-mounted read-write: outside the
/// workspace (no collision with the user's files), kept across container
/// recreation, writable under a read-only root.
pub const ARTIFACT_DIRS: [&str; 3] = ["/large_tool_results", "/conversation_history", "/blobs"];

/// A container the host is about to create for a backend.
#[derive(Debug, Clone, PartialEq)]
pub struct ContainerPlan {
    /// Container name, derived from the namespace and backend id: unique
    /// per backend, so a second create conflicts.
    pub name: String,
    /// The configured image.
    pub image: String,
    /// Ownership labels (namespace, backend, workspace, policy), plus the
    /// agent's when mounted.
    pub labels: HashMap<String, String>,
    /// Host directory bind-mounted read-write at `/workspace`.
    pub workspace_path: PathBuf,
    /// uid:gid of the sandbox user: every command and file transfer runs
    /// as it (the agent, where it serves, as root; see `create_body`).
    pub user: UserIds,
    /// Memory, CPU and process limits.
    pub limits: Limits,
    /// The container's main command: `sandbox-agent init` with the agent,
    /// else `sleep infinity`.
    pub command: Vec<String>,
    /// Root filesystem read-only, with a writable tmpfs `/tmp` of
    /// `tmp_bytes`.
    pub read_only_rootfs: bool,
    /// Size of that `/tmp`.
    pub tmp_bytes: u64,
    /// The workspace's bound (its own filesystem, mounted by the engine
    /// layer before the create); 0: none.
    pub workspace_quota: u64,
    /// `none`, `egress`, or the Docker network the operator configured
    /// (the profile's).
    pub network: String,
    /// Host path of `sandbox-agent`, bind-mounted read-only at
    /// `/.sandbox/agent` (see [`ContainerPlan::with_agent`]).
    pub agent: Option<PathBuf>,
    /// OCI runtime (`runsc`, ...); the engine's default when `None`.
    pub runtime: Option<String>,
    /// Host directory holding the user's `ARTIFACT_DIRS` (one
    /// subdirectory each, named without the `/`); none: not mounted.
    pub artifacts: Option<PathBuf>,
    /// Host directory of the user's egress proxy socket, mounted read-only
    /// at `egress::SOCKET_MOUNT` (`network = "egress"`); the container's
    /// own network is then `none`.
    pub egress: Option<PathBuf>,
    /// Host directory where host processes offer the agent their sockets,
    /// mounted read-only at `plane::PLANE_MOUNT` (see `provider::plane`).
    pub plane: Option<PathBuf>,
    /// The configured weight of sandbox containers together
    /// (`sandbox_cpu_shares`; 0: none).
    pub cpu_shares: u64,
    /// The cgroup parent that carries that weight, where the engine can
    /// have one (the provider says: `ContainerProvider::cgroup_parent`).
    pub cgroup_parent: Option<String>,
}

impl ContainerPlan {
    /// The plan with the agent mounted and as the main process (its stdin
    /// and stdout are the attach stream), and labelled so.
    pub fn with_agent(mut self, agent_path: PathBuf) -> Self {
        self.labels.insert(
            agent::AGENT_LABEL.to_owned(),
            agent::AGENT_SERVES.to_owned(),
        );
        self.agent = Some(agent_path);
        self.command = agent::init_argv(self.user.uid, self.user.gid);
        self
    }

    /// The digest of what a container made from this plan runs as: image,
    /// user, limits, command, root filesystem mode, network, runtime, and
    /// the agent (its build, by the installed file's name, and how it
    /// runs). Not the name, workspace or ownership: those are the
    /// backend's, not the settings'. `sha256:` and 16 hex digits; a
    /// container whose label differs from the host's is replaced when idle.
    pub fn digest(&self) -> String {
        use sha2::{Digest, Sha256};
        let agent = self
            .agent
            .as_ref()
            .and_then(|path| path.file_name())
            .map(|name| name.to_string_lossy().into_owned());
        let settings = serde_json::json!({
            "image": self.image,
            "user": [self.user.uid, self.user.gid],
            "limits": self.limits,
            "command": self.command,
            "read_only_rootfs": self.read_only_rootfs,
            "network": self.network,
            "runtime": self.runtime,
            "agent": agent,
            "agent_mode": self.labels.get(agent::AGENT_LABEL),
            "artifacts": self.artifacts.is_some().then_some(ARTIFACT_DIRS),
            // Only when set: containers of hosts without them stay current.
            "tmp_bytes": (self.read_only_rootfs && self.tmp_bytes != 64 << 20).then_some(self.tmp_bytes),
            "workspace_quota": (self.workspace_quota > 0).then_some(self.workspace_quota),
            // 1: gVisor's own tasks get pids headroom (see create_body).
            "runsc_pids": self.runtime.as_deref().is_some_and(|r| r.contains("runsc")).then_some(1),
            // 2: one socket per backend and profile (1 was one per user).
            "egress": self.egress.is_some().then_some(2),
            // 1: the agent takes the host's sockets at /.sandbox/plane.
            "plane": self.plane.is_some().then_some(1),
            "cpu_shares": (self.cpu_shares > 0).then_some(self.cpu_shares),
        });
        let hex = hex::encode(Sha256::digest(settings.to_string().as_bytes()));
        format!("sha256:{}", &hex[..16])
    }

    /// Whether the agent is the main process, talking on the attach stream.
    pub fn agent_serves(&self) -> bool {
        AgentMode::of(&self.labels) == AgentMode::Serves
    }

    /// The plan for `backend_id` under `profile`, whose workspace was prepared at
    /// `workspace_path`, carrying the owner's `labels` (the engine's
    /// ownership labels: the provider never decides who owns a container).
    pub fn new(
        config: &Config,
        profile: &Profile,
        backend_id: &BackendId,
        workspace_path: PathBuf,
        user: UserIds,
        labels: HashMap<String, String>,
    ) -> Self {
        ContainerPlan {
            name: backend_id.container_name(&config.namespace),
            image: config.image.clone(),
            labels,
            workspace_path,
            user,
            limits: config.limits.clone(),
            command: IDLE_COMMAND.iter().map(|s| s.to_string()).collect(),
            // A bounded workspace needs a bounded writable layer too.
            read_only_rootfs: config.read_only_rootfs || config.workspace_quota > 0,
            tmp_bytes: config.tmp_quota,
            workspace_quota: config.workspace_quota,
            network: profile.network.clone(),
            agent: None,
            runtime: profile.runtime.clone(),
            artifacts: None,
            egress: None,
            plane: None,
            cpu_shares: config.sandbox_cpu_shares,
            cgroup_parent: None,
        }
    }

    /// Whether the container may have a plane: its agent serves, and its
    /// runtime connects to host sockets (gVisor does not: see
    /// `provider::plane`).
    pub fn plane_possible(&self) -> bool {
        self.agent_serves() && !self.runtime.as_deref().is_some_and(|r| r.contains("runsc"))
    }

    /// The plan with the plane directory `host_dir` mounted (where
    /// [`ContainerPlan::plane_possible`]), labelled with its `nonce`.
    pub fn with_plane(mut self, host_dir: PathBuf, nonce: &str) -> Self {
        if self.plane_possible() {
            self.labels
                .insert(super::plane::PLANE_LABEL.to_owned(), nonce.to_owned());
            self.plane = Some(host_dir);
        }
        self
    }

    /// `HOST:CONTAINER:ro` bind of the plane directory, if any.
    pub fn plane_bind(&self) -> Option<String> {
        self.plane
            .as_ref()
            .map(|dir| format!("{}:{}:ro", dir.display(), super::plane::PLANE_MOUNT))
    }

    /// The plan with the user's artifact directories (prepared under
    /// `host_dir`) mounted at `ARTIFACT_DIRS`.
    pub fn with_artifacts(mut self, host_dir: PathBuf) -> Self {
        self.artifacts = Some(host_dir);
        self
    }

    /// The plan with the user's egress socket directory (`host_dir`)
    /// mounted, the proxy variables set, and the agent's relay listening.
    /// Only with the agent: it is the relay.
    pub fn with_egress(mut self, host_dir: PathBuf) -> Self {
        if self.agent.is_some() {
            self.command.extend([
                "--egress-port".to_owned(),
                crate::egress::RELAY_PORT.to_string(),
            ]);
        }
        self.egress = Some(host_dir);
        self
    }

    /// The container's network mode: `none` for egress (the relay is its
    /// way out), else the configured one.
    pub fn network_mode(&self) -> &str {
        if self.network == crate::config::NETWORK_EGRESS {
            crate::config::NETWORK_NONE
        } else {
            &self.network
        }
    }

    /// The container's environment.
    pub fn env(&self) -> Vec<String> {
        let mut env = vec![format!("HOME={}", crate::dataplane::WORKSPACE_MOUNT)];
        if self.egress.is_some() {
            env.extend(crate::egress::proxy_env());
        }
        env
    }

    /// `HOST:CONTAINER:ro` bind of the egress socket directory, if any.
    pub fn egress_bind(&self) -> Option<String> {
        self.egress
            .as_ref()
            .map(|dir| format!("{}:{}:ro", dir.display(), crate::egress::SOCKET_MOUNT))
    }

    /// `HOST:CONTAINER:rw` binds of the artifact directories.
    pub fn artifact_binds(&self) -> Vec<String> {
        let Some(dir) = &self.artifacts else {
            return Vec::new();
        };
        ARTIFACT_DIRS
            .iter()
            .map(|mount| {
                format!(
                    "{}:{mount}:rw",
                    dir.join(mount.trim_start_matches('/')).display()
                )
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(config: &Config, user: &str) -> ContainerPlan {
        let backend = BackendId::parse(user).unwrap();
        let labels = HashMap::from([("sandbox.backend".to_owned(), user.to_owned())]);
        let ids = UserIds {
            uid: 1000,
            gid: 1000,
        };
        ContainerPlan::new(
            config,
            &config.default_profile(),
            &backend,
            PathBuf::from(format!("/ws/{user}")),
            ids,
            labels,
        )
    }

    #[test]
    fn the_plan_digest_follows_the_settings_not_the_backend() {
        let config = Config::default();
        let base = plan(&config, "alice").digest();
        assert!(
            base.starts_with("sha256:") && base.len() == 7 + 16,
            "{base}"
        );
        assert_eq!(
            plan(&config, "bob").digest(),
            base,
            "one digest for every backend"
        );
        let changed = [
            Config {
                image: "other:1".into(),
                ..config.clone()
            },
            Config {
                network: "agents".into(),
                ..config.clone()
            },
            Config {
                runtime: Some("runsc".into()),
                ..config.clone()
            },
            Config {
                read_only_rootfs: !config.read_only_rootfs,
                ..config.clone()
            },
            Config {
                limits: Limits {
                    pids: config.limits.pids + 1,
                    ..config.limits.clone()
                },
                ..config.clone()
            },
        ];
        for other in changed {
            assert_ne!(plan(&other, "alice").digest(), base, "{other:?}");
        }
        let with_agent = plan(&config, "alice").with_agent(PathBuf::from("/s/sandbox-agent-aa"));
        let newer_agent = plan(&config, "alice").with_agent(PathBuf::from("/s/sandbox-agent-bb"));
        assert_ne!(with_agent.digest(), base);
        assert_ne!(with_agent.digest(), newer_agent.digest());
    }
}

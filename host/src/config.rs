//! Host configuration: defaults, then an optional TOML file, then
//! environment variables, then CLI flags (applied by the binary).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

/// The image `sandbox image build` produces; used when none is configured.
pub const DEFAULT_IMAGE: &str = "sandbox-busybox:latest";

/// The `network` value that gives sandboxes no network at all.
pub const NETWORK_NONE: &str = "none";

/// Everything the host decides on behalf of policies.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Workspaces live at `{workspace_root}/{name}` (the seed's WORKSPACE_ROOT).
    pub workspace_root: PathBuf,
    /// The image every sandbox container runs (the seed's DOCKER_IMAGE).
    pub image: String,
    /// A policy component to load instead of the embedded per-user policy.
    pub policy: Option<PathBuf>,
    /// Label namespace: containers of other namespaces are never touched.
    pub namespace: String,
    /// uid:gid the containers run as and the workspaces belong to. Default:
    /// the host's own ids, or 1000:1000 when the host runs as root.
    pub sandbox_user: Option<UserIds>,
    pub limits: Limits,
    /// Byte cap on the combined output of one `execute`.
    pub output_limit_bytes: usize,
    /// Docker endpoint (`unix:///path`, `tcp://host:port`); default: the
    /// docker CLI's (`DOCKER_HOST`, else the local socket).
    pub docker_host: Option<String>,
    /// Default wall-clock limit of one `execute`, in seconds.
    pub exec_timeout_secs: f64,
    /// Bound on every single Docker API call, in seconds.
    pub docker_timeout_secs: f64,
    /// Guest CPU time one policy call may use (host calls excluded), in ms.
    pub policy_deadline_ms: u64,
    /// Linear memory one policy instance may grow to, in bytes.
    pub policy_memory_bytes: usize,
    /// Mount the container's root filesystem read-only (with a writable
    /// tmpfs `/tmp`); `/workspace` stays writable.
    pub read_only_rootfs: bool,
    /// Network of every sandbox container: `none` (no network at all), or
    /// the name of a Docker network the operator created. The host decides
    /// it; a policy cannot.
    pub network: String,
    /// OCI runtime for sandbox containers (for example `runsc`); the
    /// engine's default when unset.
    pub runtime: Option<String>,
    /// When not empty, the only images this deployment may run.
    pub allowed_images: Vec<String>,
    /// Where compiled policy components are cached (`off` in
    /// `SANDBOX_COMPONENT_CACHE` disables it). Default: the user's cache dir.
    pub component_cache_dir: Option<PathBuf>,
    /// Settings handed to the policy (WIT `context.policy-config`); the
    /// shipped policies read `idle_ttl_secs` and `max_containers`.
    pub policy_config: std::collections::BTreeMap<String, String>,
    /// How often the host calls the policy's `maintain`, in seconds (0: never).
    pub maintenance_interval_secs: f64,
    /// Container creations, starts and removals in flight at once; the
    /// rest queue (executes never do). Default: the number of CPUs (min 2).
    pub max_concurrent_lifecycle_ops: usize,
    /// Idle policy instances kept (one per routing key) before the least
    /// recently used are dropped; they rebuild their cache by adoption.
    pub max_policy_instances: usize,
}

/// Resource limits of every sandbox container.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    pub memory_bytes: i64,
    /// CPUs, possibly fractional (`1.5`).
    pub cpus: f64,
    pub pids: i64,
}

/// A numeric `uid:gid` pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserIds {
    pub uid: u32,
    pub gid: u32,
}

impl std::str::FromStr for UserIds {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        let (uid, gid) = s.split_once(':').unwrap_or((s, s));
        Ok(UserIds {
            uid: uid.parse().with_context(|| format!("bad uid in {s:?}"))?,
            gid: gid.parse().with_context(|| format!("bad gid in {s:?}"))?,
        })
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            memory_bytes: 512 * 1024 * 1024,
            cpus: 1.0,
            pids: 256,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            workspace_root: default_workspace_root(),
            image: DEFAULT_IMAGE.to_owned(),
            policy: None,
            namespace: "default".to_owned(),
            sandbox_user: None,
            limits: Limits::default(),
            output_limit_bytes: 1024 * 1024,
            docker_host: None,
            docker_timeout_secs: 30.0,
            exec_timeout_secs: 300.0,
            policy_deadline_ms: 500,
            policy_memory_bytes: 64 * 1024 * 1024,
            max_policy_instances: 4096,
            component_cache_dir: crate::runtime::cache::ComponentCache::default_dir(),
            policy_config: Default::default(),
            maintenance_interval_secs: 30.0,
            max_concurrent_lifecycle_ops: std::thread::available_parallelism()
                .map(|n| n.get().max(2))
                .unwrap_or(2),
            read_only_rootfs: false,
            network: NETWORK_NONE.to_owned(),
            runtime: None,
            allowed_images: Vec::new(),
        }
    }
}

fn default_workspace_root() -> PathBuf {
    match std::env::var_os("XDG_DATA_HOME").or_else(|| std::env::var_os("HOME")) {
        Some(base) if std::env::var_os("XDG_DATA_HOME").is_some() => {
            PathBuf::from(base).join("sandbox/workspaces")
        }
        Some(home) => PathBuf::from(home).join(".local/share/sandbox/workspaces"),
        None => PathBuf::from("/var/lib/sandbox/workspaces"),
    }
}

impl Config {
    /// Defaults, overlaid by `file` (TOML) when given, then by the
    /// `SANDBOX_*` environment variables.
    pub fn load(file: Option<&Path>) -> anyhow::Result<Config> {
        let mut config = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading config file {}", path.display()))?;
                toml::from_str(&text)
                    .with_context(|| format!("parsing config file {}", path.display()))?
            }
            None => Config::default(),
        };
        config.apply_env(|name| std::env::var(name).ok())?;
        config.validate()?;
        Ok(config)
    }

    /// Applies `SANDBOX_WORKSPACE_ROOT`, `SANDBOX_IMAGE`, `SANDBOX_POLICY`,
    /// `SANDBOX_NAMESPACE`, `SANDBOX_USER`, `SANDBOX_OUTPUT_LIMIT_BYTES`,
    /// `SANDBOX_DOCKER_TIMEOUT_SECS`.
    pub fn apply_env(&mut self, var: impl Fn(&str) -> Option<String>) -> anyhow::Result<()> {
        if let Some(v) = var("SANDBOX_WORKSPACE_ROOT") {
            self.workspace_root = v.into();
        }
        if let Some(v) = var("SANDBOX_IMAGE") {
            self.image = v;
        }
        if let Some(v) = var("SANDBOX_POLICY") {
            self.policy = Some(v.into());
        }
        if let Some(v) = var("SANDBOX_NAMESPACE") {
            self.namespace = v;
        }
        if let Some(v) = var("SANDBOX_USER") {
            self.sandbox_user = Some(v.parse()?);
        }
        match var("SANDBOX_COMPONENT_CACHE").as_deref() {
            Some("off") | Some("") => self.component_cache_dir = None,
            Some(dir) => self.component_cache_dir = Some(dir.into()),
            None => {}
        }
        if let Some(v) = var("SANDBOX_OUTPUT_LIMIT_BYTES") {
            self.output_limit_bytes = v.parse().context("SANDBOX_OUTPUT_LIMIT_BYTES")?;
        }
        if let Some(v) = var("SANDBOX_DOCKER_TIMEOUT_SECS") {
            self.docker_timeout_secs = v.parse().context("SANDBOX_DOCKER_TIMEOUT_SECS")?;
        }
        Ok(())
    }

    /// Rejects values the host cannot run with.
    pub fn validate(&self) -> anyhow::Result<()> {
        crate::naming::validate_namespace(&self.namespace)?;
        if self.image.trim().is_empty() {
            bail!("image must not be empty");
        }
        if !(self.docker_timeout_secs > 0.0 && self.docker_timeout_secs.is_finite()) {
            bail!("docker_timeout_secs must be a positive number");
        }
        if !(self.exec_timeout_secs > 0.0 && self.exec_timeout_secs.is_finite()) {
            bail!("exec_timeout_secs must be a positive number");
        }
        if self.policy_deadline_ms == 0 {
            bail!("policy_deadline_ms must be positive");
        }
        if self.limits.cpus <= 0.0 || self.limits.memory_bytes <= 0 || self.limits.pids <= 0 {
            bail!("limits must be positive");
        }
        if !self.allowed_images.is_empty() && !self.allowed_images.contains(&self.image) {
            bail!(
                "image {:?} is not in this deployment's allowed_images {:?}",
                self.image,
                self.allowed_images
            );
        }
        if self.max_policy_instances == 0 {
            bail!("max_policy_instances must be positive");
        }
        Ok(())
    }

    pub fn docker_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.docker_timeout_secs)
    }

    pub fn exec_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.exec_timeout_secs)
    }

    pub fn policy_deadline(&self) -> Duration {
        Duration::from_millis(self.policy_deadline_ms)
    }

    /// The configured sandbox user, or the default described on the field.
    pub fn sandbox_user(&self) -> UserIds {
        self.sandbox_user.unwrap_or_else(|| {
            let uid = nix::unistd::geteuid().as_raw();
            if uid == 0 {
                UserIds {
                    uid: 1000,
                    gid: 1000,
                }
            } else {
                UserIds {
                    uid,
                    gid: nix::unistd::getegid().as_raw(),
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_overrides_the_seed_variables() {
        let mut config = Config::default();
        config
            .apply_env(|name| match name {
                "SANDBOX_WORKSPACE_ROOT" => Some("/srv/ws".into()),
                "SANDBOX_IMAGE" => Some("img:1".into()),
                "SANDBOX_POLICY" => Some("/p.wasm".into()),
                "SANDBOX_USER" => Some("1234:55".into()),
                _ => None,
            })
            .unwrap();
        assert_eq!(config.workspace_root, PathBuf::from("/srv/ws"));
        assert_eq!(config.image, "img:1");
        assert_eq!(config.policy, Some(PathBuf::from("/p.wasm")));
        assert_eq!(config.sandbox_user, Some(UserIds { uid: 1234, gid: 55 }));
    }

    #[test]
    fn toml_file_is_partial_and_strict() {
        let config: Config = toml::from_str("image = \"x\"\n[limits]\npids = 10\n").unwrap();
        assert_eq!(config.image, "x");
        assert_eq!(config.limits.pids, 10);
        assert_eq!(config.limits.cpus, 1.0);
        assert!(
            toml::from_str::<Config>("imag = \"x\"").is_err(),
            "typos are errors"
        );
    }

    #[test]
    fn an_image_outside_the_allow_list_is_refused() {
        let config = Config {
            image: "evil:latest".into(),
            allowed_images: vec![DEFAULT_IMAGE.into()],
            ..Config::default()
        };
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("evil:latest"), "{err}");
        assert!(Config {
            image: DEFAULT_IMAGE.into(),
            ..config
        }
        .validate()
        .is_ok());
    }

    #[test]
    fn bad_namespace_is_refused() {
        let config = Config {
            namespace: "a.b".into(),
            ..Config::default()
        };
        assert!(config.validate().is_err());
    }
}

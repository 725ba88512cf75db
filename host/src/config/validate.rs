//! What the host refuses to run with: each section's rules, checked in one
//! pass that names the first bad key and why.

use super::{Config, ConfigError, Origin, MAX_DURATION};

/// The longest namespace: it prefixes every container name and label.
pub const MAX_NAMESPACE_LEN: usize = 32;

/// Namespaces are 1..=32 of `[a-z0-9_-]`, starting with a letter or digit.
pub fn validate_namespace(ns: &str) -> std::result::Result<(), String> {
    let ok_chars = ns
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-');
    let ok_first = ns.chars().next().is_some_and(|c| c.is_ascii_alphanumeric());
    if ns.is_empty() || ns.len() > MAX_NAMESPACE_LEN || !ok_chars || !ok_first {
        return Err(format!(
            "namespace {ns:?} must be 1..={MAX_NAMESPACE_LEN} of [a-z0-9_-], starting with a letter or digit"
        ));
    }
    Ok(())
}

impl Config {
    /// Rejects values the host cannot run with
    /// ([`ConfigError::Invalid`], its origin [`Origin::Default`]: this
    /// configuration does not know where its values came from).
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.check().map_err(|(key, message)| ConfigError::Invalid {
            key,
            origin: Origin::Default,
            message,
        })
    }

    /// The first value the host cannot run with: its key and why.
    pub(super) fn check(&self) -> Checked {
        self.check_identity()?;
        self.check_durations()?;
        self.check_container_limits()?;
        self.check_policy_limits()?;
        self.check_lifecycle()?;
        self.check_profiles()
    }

    /// Every profile: a valid name other than `default`, a valid network,
    /// and a runtime that can reach the host's proxy socket when it has
    /// egress. (Allow-lists are parsed by the egress layer, above this
    /// one, when the host starts.)
    fn check_profiles(&self) -> Checked {
        for name in self.profiles.keys() {
            super::ProfileName::parse(name).map_err(|e| ("profiles", e))?;
            if name == super::DEFAULT_PROFILE {
                return fail(
                    "profiles",
                    "[profiles.default] is not allowed: the top-level settings (network, \
                     [egress], runtime) are the default profile",
                );
            }
        }
        for profile in self.profiles() {
            let key = if profile.name.as_str() == super::DEFAULT_PROFILE {
                "network"
            } else {
                "profiles"
            };
            let of = |message: String| {
                if key == "network" {
                    message
                } else {
                    format!("[profiles.{}]: {message}", profile.name)
                }
            };
            check_network(&profile.network).map_err(|m| (key, of(m)))?;
            let gvisor = profile
                .runtime
                .as_deref()
                .is_some_and(|runtime| runtime.contains("runsc"));
            if profile.has_egress() && gvisor {
                return Err((
                    key,
                    of(
                        "network \"egress\" relays through a Unix socket of the host, which \
                        gVisor (runtime runsc) refuses to connect to: use network \"none\" or \
                        a Docker network under runsc"
                            .to_owned(),
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The namespace, the image and the user the containers are named, made
    /// from and run as, and where their workspaces live.
    fn check_identity(&self) -> Checked {
        validate_namespace(&self.namespace).map_err(|e| ("namespace", e))?;
        if let Some(user) = self.sandbox_user {
            if user.uid == 0 || user.gid == 0 {
                return fail(
                    "sandbox_user",
                    "sandbox_user must not be root (uid or gid 0): the workload would hold the \
                     container's root and plant root-owned (setuid) files in the host's \
                     workspace; choose an unprivileged uid:gid",
                );
            }
        }
        if !self.workspace_root.is_absolute() {
            return Err((
                "workspace_root",
                format!(
                    "workspace_root {:?} must be an absolute path (`~` is not expanded): the \
                     engine resolves bind mounts on the host, not from here",
                    self.workspace_root
                ),
            ));
        }
        if self.image.trim().is_empty() {
            return fail("image", "image must not be empty");
        }
        if !self.allowed_images.is_empty() && !self.allowed_images.contains(&self.image) {
            return Err((
                "image",
                format!(
                    "image {:?} is not in this deployment's allowed_images {:?}",
                    self.image, self.allowed_images
                ),
            ));
        }
        Ok(())
    }

    /// Timeouts and intervals: finite, positive (or zero where zero means
    /// "none"), at most [`MAX_DURATION`].
    fn check_durations(&self) -> Checked {
        seconds("docker_timeout_secs", self.docker_timeout_secs, false)?;
        seconds("exec_timeout_secs", self.exec_timeout_secs, false)?;
        seconds("destroy_grace_secs", self.destroy_grace_secs, true)?;
        if self.workspace_quota != 0 && self.workspace_quota < super::MIN_WORKSPACE_QUOTA {
            return fail(
                "workspace_quota",
                "workspace_quota must be 0 (unbounded) or at least 16MiB",
            );
        }
        if self.tmp_quota < 1 << 20 {
            return fail("tmp_quota", "tmp_quota must be at least 1MiB");
        }
        seconds(
            "process_keep_alive_secs",
            self.process_keep_alive_secs,
            true,
        )?;
        seconds(
            "maintenance_interval_secs",
            self.maintenance_interval_secs,
            true,
        )?;
        if self.policy_deadline_ms == 0 {
            return fail("policy_deadline_ms", "policy_deadline_ms must be positive");
        }
        Ok(())
    }

    /// What each sandbox container may use.
    fn check_container_limits(&self) -> Checked {
        if !(self.limits.cpus > 0.0 && self.limits.cpus.is_finite()) {
            return fail("limits.cpus", "limits.cpus must be a positive number");
        }
        if self.limits.memory_bytes <= 0 {
            return fail(
                "limits.memory_bytes",
                "limits.memory_bytes must be positive",
            );
        }
        if self.limits.pids <= 0 {
            return fail("limits.pids", "limits.pids must be positive");
        }
        Ok(())
    }

    /// What one policy call and instance, and all instances together, may use.
    fn check_policy_limits(&self) -> Checked {
        if self.max_policy_instances == 0 {
            return fail(
                "max_policy_instances",
                "max_policy_instances must be positive",
            );
        }
        for (key, value) in [
            ("policy_call_timeout_ms", self.policy_call_timeout_ms),
            ("policy_host_calls", u64::from(self.policy_host_calls)),
            ("policy_memory_bytes", self.policy_memory_bytes as u64),
            ("policy_table_elements", self.policy_table_elements as u64),
            ("policy_core_instances", self.policy_core_instances as u64),
            ("policy_memories", self.policy_memories as u64),
            ("policy_resources", self.policy_resources as u64),
        ] {
            if value == 0 {
                return Err((key, format!("{key} must be positive")));
            }
        }
        if self.policy_pool_bytes == 0 || self.policy_pool_bytes > self.policy_memory_total_bytes {
            return fail(
                "policy_pool_bytes",
                "policy_pool_bytes must be positive and at most policy_memory_total_bytes",
            );
        }
        if self.policy_memory_total_bytes < self.policy_memory_bytes {
            return fail(
                "policy_memory_total_bytes",
                "policy_memory_total_bytes must be at least policy_memory_bytes",
            );
        }
        Ok(())
    }

    /// Bounds on creates, starts and removes.
    fn check_lifecycle(&self) -> Checked {
        if self.max_creates_per_backend_per_minute == 0 {
            return fail(
                "max_creates_per_backend_per_minute",
                "max_creates_per_backend_per_minute must be positive",
            );
        }
        if self.max_concurrent_lifecycle_ops > 1024 {
            return fail(
                "max_concurrent_lifecycle_ops",
                "max_concurrent_lifecycle_ops must be at most 1024",
            );
        }
        if self.max_concurrent_lifecycle_ops == 0 {
            return fail(
                "max_concurrent_lifecycle_ops",
                "max_concurrent_lifecycle_ops must be positive",
            );
        }
        Ok(())
    }
}

/// The first bad key and why, or nothing.
pub(super) type Checked = Result<(), (&'static str, String)>;

fn fail(key: &'static str, message: &str) -> Checked {
    Err((key, message.to_owned()))
}

/// A duration in seconds: finite, more than 0 (or 0 when `zero_ok`), at
/// most [`MAX_DURATION`].
fn seconds(key: &'static str, value: f64, zero_ok: bool) -> Checked {
    let max = MAX_DURATION.as_secs_f64();
    if value.is_finite() && (value > 0.0 || zero_ok && value == 0.0) && value <= max {
        Ok(())
    } else {
        let low = if zero_ok { "at least 0" } else { "more than 0" };
        Err((
            key,
            format!("{key} must be {low} and at most {max} seconds, not {value}"),
        ))
    }
}

/// `none`, `egress`, or a plausible Docker network name; never `host` (it would give
/// every sandbox the host's own network stack).
fn check_network(network: &str) -> Result<(), String> {
    let plausible = network.len() <= 128
        && network.starts_with(|c: char| c.is_ascii_alphanumeric())
        && network
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if !plausible {
        return Err(format!(
            "network {network:?} must be \"none\", \"egress\" or a Docker network name: 1-128 of \
             [A-Za-z0-9_.-], starting with a letter or digit"
        ));
    }
    if network == "host" {
        return Err(
            "network \"host\" would share the host's network stack with every sandbox: \
             create a Docker network for them instead"
                .into(),
        );
    }
    if matches!(network, "bridge" | "default") {
        return Err(format!(
            "network {network:?} is Docker's default bridge, shared with every container on \
             this machine: create a network for the sandboxes (`docker network create \
             --internal sandboxes`) and name it, or keep \"none\""
        ));
    }
    Ok(())
}

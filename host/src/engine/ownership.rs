//! Which containers are this host's, and which were handed to a policy.
//!
//! Ownership is the host's labels: a container is managed by a namespace
//! when it carries `sandbox.managed=true` and that namespace. Its name is
//! derived from the backend id (`sandbox_contract::BackendId::container_name`,
//! injective), and Docker refuses a second container with the same name, so
//! "one container per backend" is a property of the engine, not of locking.
//!
//! Hand-outs: a policy may only answer `ensure-container` with a container
//! the host handed it for that backend; [`Handouts`] remembers them.
//!
//! Which policy made a container: its name (`sandbox.policy`, what the
//! policy calls itself) and the digest of its component
//! (`sandbox.policy-digest`, [`policy_digest`]), which tells two builds of
//! one name apart. gc leaves the containers of a policy its process never
//! ran alone unless told otherwise.

use std::collections::HashMap;
use std::sync::Mutex;

use sandbox_contract::shown;

use crate::dataplane::agent::AgentMode;
use crate::error::{Result, SandboxError};

/// Label keys every managed container carries.
pub mod label {
    pub const MANAGED: &str = "sandbox.managed";
    pub const NAMESPACE: &str = "sandbox.namespace";
    pub const BACKEND: &str = "sandbox.backend";
    pub const WORKSPACE: &str = "sandbox.workspace";
    pub const POLICY: &str = "sandbox.policy";
    /// The digest of the policy component that made the container (see
    /// [`super::policy_digest`]); absent on containers of older hosts.
    pub const POLICY_DIGEST: &str = "sandbox.policy-digest";
    /// The resolved workspace root of the host that made the container:
    /// its in-flight records live in that root's state directory.
    pub const WORKSPACE_ROOT: &str = "sandbox.workspace-root";
    /// The id of the state store of the host that made the container
    /// (`state::store_id`): the same store, whatever path reached it.
    pub const STORE: &str = "sandbox.store";
    /// The digest of the container's plan (`ContainerPlan::digest`).
    pub const PLAN: &str = "sandbox.plan";
    /// The operator's profile the container was made under (absent on
    /// containers of older hosts: `default`).
    pub const PROFILE: &str = "sandbox.profile";
}

/// Hex digits of the component's SHA-256 kept in the digest label.
const DIGEST_HEX_DIGITS: usize = 16;

/// The digest label value of a policy component: `sha256:` and the first
/// 16 hex digits of the SHA-256 of its bytes.
pub fn policy_digest(component: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    let hex = hex::encode(Sha256::digest(component));
    format!("sha256:{}", &hex[..DIGEST_HEX_DIGITS])
}

/// A policy as its containers' labels name it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PolicyMark {
    /// Its name (sanitised), the `sandbox.policy` label.
    pub name: String,
    /// Its component's digest, the `sandbox.policy-digest` label.
    pub digest: String,
}

impl PolicyMark {
    /// Whether this policy made a container labelled `name` and `digest`:
    /// by the digest when the container has one, else (a container of an
    /// older host) by the name.
    pub fn made(&self, name: &str, digest: Option<&str>) -> bool {
        match digest {
            Some(digest) => digest == self.digest,
            None => name == self.name,
        }
    }
}

/// The labels stamped on a backend's container.
pub fn ownership_labels(
    namespace: &str,
    backend_id: &str,
    workspace: &str,
    policy: &str,
) -> HashMap<String, String> {
    HashMap::from([
        (label::MANAGED.to_owned(), "true".to_owned()),
        (label::NAMESPACE.to_owned(), namespace.to_owned()),
        (label::BACKEND.to_owned(), backend_id.to_owned()),
        (label::WORKSPACE.to_owned(), workspace.to_owned()),
        (label::POLICY.to_owned(), policy.to_owned()),
    ])
}

/// True when the labels say "managed by this namespace".
pub fn is_owned(labels: &HashMap<String, String>, namespace: &str) -> bool {
    labels.get(label::MANAGED).map(String::as_str) == Some("true")
        && labels.get(label::NAMESPACE).map(String::as_str) == Some(namespace)
}

/// A policy's self-reported name, made safe for a label value.
pub fn sanitize_policy_name(name: &str) -> String {
    let clean: String = name
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        .take(64)
        .collect();
    if clean.is_empty() {
        "unnamed".to_owned()
    } else {
        clean
    }
}

/// The containers handed to a policy (container id -> backend id), and
/// which of them have `sandbox-agent` mounted.
#[derive(Default)]
pub struct Handouts {
    backends: Mutex<HashMap<String, String>>,
    with_agent: Mutex<HashMap<String, AgentMode>>,
    /// The profile each container was made under (its label).
    profiles: Mutex<HashMap<String, String>>,
}

impl Handouts {
    /// Records that the container `id` of `backend` was given to a policy.
    pub fn record(&self, id: &str, backend: &str, agent: AgentMode, profile: &str) {
        self.backends
            .lock()
            .unwrap()
            .insert(id.to_owned(), backend.to_owned());
        self.profiles
            .lock()
            .unwrap()
            .insert(id.to_owned(), profile.to_owned());
        if agent != AgentMode::Absent {
            self.with_agent.lock().unwrap().insert(id.to_owned(), agent);
        }
    }

    /// Forgets a removed container.
    pub fn forget(&self, id: &str) {
        self.backends.lock().unwrap().remove(id);
        self.profiles.lock().unwrap().remove(id);
        self.with_agent.lock().unwrap().remove(id);
    }

    /// What a container handed out has of `sandbox-agent`.
    pub fn agent(&self, id: &str) -> AgentMode {
        self.with_agent
            .lock()
            .unwrap()
            .get(id)
            .copied()
            .unwrap_or_default()
    }

    /// Checks that a container a policy returned for `backend` is one this
    /// host handed out for that backend (never a forged id or another
    /// backend's container), and tells what it has of `sandbox-agent`.
    /// The profile the handed-out container `id` was made under.
    pub fn profile(&self, id: &str) -> Option<String> {
        self.profiles.lock().unwrap().get(id).cloned()
    }

    pub fn check_serves(&self, id: &str, backend: &str) -> Result<AgentMode> {
        match self.backends.lock().unwrap().get(id) {
            Some(owner) if owner == backend => Ok(self.agent(id)),
            Some(owner) => Err(SandboxError::Refused(format!(
                "the policy returned the container of backend {owner} for backend {backend}"
            ))),
            None => Err(SandboxError::Refused(format!(
                "the policy returned container {} which the host never handed out",
                shown(id)
            ))),
        }
    }
}

/// Container ids and names only: they are spliced into API paths.
pub fn validate_container_ref(reference: &str) -> Result<()> {
    let ok = !reference.is_empty()
        && reference.len() <= 128
        && reference
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
        && reference
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        Err(SandboxError::InvalidId(format!(
            "container reference {}",
            shown(reference)
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_container_is_only_served_to_the_backend_it_was_handed_to() {
        let handouts = Handouts::default();
        handouts.record("c1", "alice", AgentMode::Absent, "default");
        assert!(handouts.check_serves("c1", "alice").is_ok());
        assert!(handouts.check_serves("c1", "bob").is_err());
        assert!(handouts.check_serves("forged", "alice").is_err());
        handouts.forget("c1");
        assert!(handouts.check_serves("c1", "alice").is_err());
    }

    #[test]
    fn container_references_cannot_traverse_api_paths() {
        for bad in ["", "../x", "a/b", "a?b", ".x", &"a".repeat(129)] {
            assert!(validate_container_ref(bad).is_err(), "{bad}");
        }
        assert!(validate_container_ref("sandbox.default.alice").is_ok());
    }

    #[test]
    fn labels_of_another_namespace_are_not_ours() {
        let labels = ownership_labels("prod", "alice", "alice", "per-user");
        assert!(is_owned(&labels, "prod"));
        assert!(!is_owned(&labels, "test"));
        assert!(!is_owned(&HashMap::new(), "prod"));
    }

    #[test]
    fn a_policy_is_told_by_its_digest_and_by_its_name_on_older_containers() {
        let digest = policy_digest(b"component");
        assert!(digest.starts_with("sha256:") && digest.len() == 7 + DIGEST_HEX_DIGITS);
        assert_ne!(digest, policy_digest(b"component2"));
        let mark = PolicyMark {
            name: "per-user".into(),
            digest: digest.clone(),
        };
        assert!(mark.made("per-user", Some(&digest)));
        assert!(!mark.made("per-user", Some("sha256:0000000000000000")));
        assert!(mark.made("renamed", Some(&digest)), "the digest decides");
        assert!(mark.made("per-user", None));
        assert!(!mark.made("per-thread", None));
    }

    #[test]
    fn policy_names_are_sanitized() {
        assert_eq!(sanitize_policy_name("per-user"), "per-user");
        assert_eq!(sanitize_policy_name("a\nb=c"), "abc");
        assert_eq!(sanitize_policy_name(""), "unnamed");
    }
}

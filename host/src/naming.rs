//! Container names and ownership labels.
//!
//! A container name is `sandbox.{namespace}.{backend-id}`. Neither part may
//! contain `.`, so the name is injective: two distinct (namespace, backend)
//! pairs can never share a name (`a-b` + `c` vs `a` + `b-c` would collide
//! with `-` as the separator). Docker refuses a second container with the
//! same name, which makes "one container per backend" a property of the
//! engine, not of our locking.

use std::collections::HashMap;

use anyhow::bail;

/// Label keys every managed container carries.
pub mod label {
    pub const MANAGED: &str = "sandbox.managed";
    pub const NAMESPACE: &str = "sandbox.namespace";
    pub const BACKEND: &str = "sandbox.backend";
    pub const WORKSPACE: &str = "sandbox.workspace";
    pub const POLICY: &str = "sandbox.policy";
}

pub const MAX_NAMESPACE_LEN: usize = 32;

/// Namespaces are 1..=32 of `[a-z0-9_-]`, starting with a letter or digit.
pub fn validate_namespace(ns: &str) -> anyhow::Result<()> {
    let ok_chars = ns
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-');
    let ok_first = ns.chars().next().is_some_and(|c| c.is_ascii_alphanumeric());
    if ns.is_empty() || ns.len() > MAX_NAMESPACE_LEN || !ok_chars || !ok_first {
        bail!("namespace {ns:?} must be 1..={MAX_NAMESPACE_LEN} of [a-z0-9_-], starting with a letter or digit");
    }
    Ok(())
}

/// The container name of a backend (both parts already validated).
pub fn container_name(namespace: &str, backend_id: &str) -> String {
    format!("sandbox.{namespace}.{backend_id}")
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dash_in_namespace_and_backend_cannot_collide() {
        // The bug this prevents: with "-" as separator, (a-b, c) and (a, b-c)
        // both named "sandbox-a-b-c" and would share one container.
        assert_ne!(container_name("a-b", "c"), container_name("a", "b-c"));
    }

    #[test]
    fn labels_of_another_namespace_are_not_ours() {
        let labels = ownership_labels("prod", "alice", "alice", "per-user");
        assert!(is_owned(&labels, "prod"));
        assert!(!is_owned(&labels, "test"));
        assert!(!is_owned(&HashMap::new(), "prod"));
    }

    #[test]
    fn policy_names_are_sanitized() {
        assert_eq!(sanitize_policy_name("per-user"), "per-user");
        assert_eq!(sanitize_policy_name("a\nb=c"), "abc");
        assert_eq!(sanitize_policy_name(""), "unnamed");
    }
}

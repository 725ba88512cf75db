//! The policy layer without an engine: loading and its refusals, the
//! self-check, and the answer checks of every call, on the in-memory
//! provider. (What needs a real engine is in `tests/trust.rs`.)

use std::sync::Arc;

use sandbox_artifacts::fixtures;

use crate::config::{Config, UserIds};
use crate::provider::memory::MemoryProvider;
use crate::{PolicySource, Sandbox, SandboxError};

fn config(root: &std::path::Path) -> Config {
    Config {
        workspace_root: root.to_owned(),
        namespace: "unit".into(),
        sandbox_user: Some(UserIds {
            uid: nix::unistd::geteuid().as_raw(),
            gid: nix::unistd::getegid().as_raw(),
        }),
        component_cache_dir: None,
        maintenance_interval_secs: 0.0,
        ..Config::default()
    }
}

async fn sandbox(root: &std::path::Path, source: PolicySource) -> Result<Sandbox, SandboxError> {
    Sandbox::with_provider(config(root), Arc::new(MemoryProvider::new()), source).await
}

fn bytes(b: &[u8]) -> PolicySource {
    PolicySource::Bytes {
        label: "test".into(),
        bytes: b.to_vec(),
    }
}

fn file(path: &str) -> PolicySource {
    PolicySource::File(path.into())
}

#[tokio::test]
async fn a_file_that_is_not_a_policy_component_is_refused_with_the_reason() {
    let root = tempfile::tempdir().unwrap();
    let cases = [
        (bytes(b"hello"), "not a WebAssembly file"),
        (bytes(b"\0asm\x01\0\0\0"), "core WebAssembly module"),
        (bytes(b"\0asm\x0d\0\x01\0\xff\xff"), "not a valid component"),
        (bytes(b"\0asm\x0d\0\x01\0"), "does not export"),
        (
            file(fixtures::OTHER_WORLD_PATH),
            "does not fit the `sandbox` world",
        ),
        (file(fixtures::BROKEN_POLICY_PATH), "self-check failed"),
        (file("/dev/zero"), "not a regular file"),
    ];
    for (source, expected) in cases {
        let what = format!("{source:?}");
        let err = sandbox(root.path(), source).await.err().expect("refused");
        assert!(
            matches!(err, SandboxError::PolicyLoad(_)),
            "{what}: {err:?}"
        );
        assert!(err.to_string().contains(expected), "{what}: {err}");
    }
}

#[tokio::test]
async fn a_refused_swap_keeps_the_running_policy() {
    let root = tempfile::tempdir().unwrap();
    let sandbox = sandbox(root.path(), PolicySource::Builtin("per-user".into()))
        .await
        .unwrap();
    let err = sandbox
        .swap_policy(file(fixtures::BROKEN_POLICY_PATH))
        .await
        .unwrap_err();
    assert!(matches!(err, SandboxError::PolicyLoad(_)), "{err:?}");
    assert_eq!(sandbox.policy_name(), "per-user");
    sandbox
        .swap_policy(PolicySource::Builtin("per-thread".into()))
        .await
        .unwrap();
    assert_eq!(sandbox.backend_id("alice-1").await.unwrap(), "alice-1");
}

#[tokio::test]
async fn the_shipped_policies_map_threads_and_pass_their_self_check() {
    let root = tempfile::tempdir().unwrap();
    for (name, thread, backend) in [
        ("per-user", "alice-7", "alice"),
        ("per-thread", "alice-7", "alice-7"),
    ] {
        let sandbox = sandbox(root.path(), PolicySource::Builtin(name.into()))
            .await
            .unwrap();
        assert_eq!(sandbox.policy_name(), name);
        assert_eq!(sandbox.backend_id(thread).await.unwrap(), backend);
        let b = sandbox.get_thread_backend(thread).await.unwrap();
        let c = b.ensure_container().await.unwrap();
        assert_eq!(c.name, format!("sandbox.unit.{backend}"));
        assert_eq!(
            b.ensure_container().await.unwrap(),
            c,
            "adopted, not duplicated"
        );
    }
}

#[tokio::test]
async fn every_answer_is_checked_before_the_host_acts_on_it() {
    let root = tempfile::tempdir().unwrap();
    let sandbox = sandbox(root.path(), file(fixtures::HOSTILE_POLICY_PATH))
        .await
        .unwrap();
    // backend-id: garbage, another user's backend, or a lie about the user.
    for thread in ["garbage-1", "hijack-1", "lie-1"] {
        let err = sandbox.get_thread_backend(thread).await.unwrap_err();
        assert!(matches!(err, SandboxError::Refused(_)), "{thread}: {err:?}");
    }
    // ensure-container: a forged container id, or another backend's.
    let alice = sandbox.get_thread_backend("alice-1").await.unwrap();
    let victim = alice.ensure_container().await.unwrap();
    let forger = sandbox
        .get_thread_backend(&format!("forge-{}", victim.id))
        .await
        .unwrap();
    let err = forger.ensure_container().await.unwrap_err();
    assert!(matches!(err, SandboxError::Refused(_)), "{err:?}");
    assert!(err.to_string().contains("the policy returned"), "{err}");
}

#[tokio::test]
async fn a_dry_run_of_maintain_removes_nothing_even_when_the_policy_tries() {
    let root = tempfile::tempdir().unwrap();
    let config = Config {
        policy_config: [("maintain".to_owned(), "dry-run-remove".to_owned())]
            .into_iter()
            .collect(),
        ..config(root.path())
    };
    let provider = Arc::new(MemoryProvider::new());
    let sandbox = Sandbox::with_provider(
        config,
        provider.clone(),
        file(fixtures::HOSTILE_POLICY_PATH),
    )
    .await
    .unwrap();
    let alice = sandbox.get_thread_backend("alice-1").await.unwrap();
    alice.ensure_container().await.unwrap();
    let err = sandbox.maintain(true).await.unwrap_err();
    assert!(err.to_string().contains("refused"), "{err}");
    assert_eq!(provider.len(), 1, "nothing removed");
}

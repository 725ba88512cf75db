//! The policy layer through the facade, without an engine: loading and its
//! refusals, the self-check, and the answer checks of every call, on the
//! in-memory provider. (What needs a real engine is in `tests/trust.rs`.)

use std::sync::Arc;

use sandbox_artifacts::fixtures;

use crate::config::Config;
use crate::provider::memory::MemoryProvider;
use crate::{PolicySource, Sandbox, SandboxError};

fn config(root: &std::path::Path) -> Config {
    Config {
        workspace_root: root.to_owned(),
        namespace: "unit".into(),
        // The host's ids, or 1000:1000 when the tests run as root (a root
        // sandbox user is refused).
        sandbox_user: Some(Config::default().sandbox_user()),
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

/// Bug: a backend resolved by per-thread just before a live swap to
/// per-user failed its execute with "backend id u3-0 is not one the
/// per-user policy answers" (the Python live-swap test caught it).
#[tokio::test]
async fn a_backend_resolved_before_a_swap_runs_on_the_new_policys_backend() {
    let root = tempfile::tempdir().unwrap();
    let sandbox = sandbox(root.path(), PolicySource::Builtin("per-thread".into()))
        .await
        .unwrap();
    let b = sandbox.get_thread_backend("u3-0").await.unwrap();
    assert_eq!(b.id(), "u3-0");
    sandbox
        .swap_policy(PolicySource::Builtin("per-user".into()))
        .await
        .unwrap();
    let r = b.execute("true").await.unwrap();
    assert_eq!(r.exit_code, 0);
    let names: Vec<String> = sandbox
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|c| c.backend_id.clone())
        .collect();
    assert_eq!(
        names,
        ["u3"],
        "the thread's backend under the running policy"
    );
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

async fn sandbox_with(
    root: &std::path::Path,
    tweak: impl FnOnce(&mut Config),
) -> Result<Sandbox, SandboxError> {
    let mut config = config(root);
    tweak(&mut config);
    Sandbox::with_provider(
        config,
        Arc::new(MemoryProvider::new()),
        PolicySource::Builtin("per-user".into()),
    )
    .await
}

/// Bug: a component that needed more core instances than the store allowed
/// failed its self-check with wasmtime's bare "instance count too high",
/// which named neither the setting nor the amount.
#[tokio::test]
async fn a_component_past_a_ceiling_is_refused_naming_the_limit_the_amount_and_the_setting() {
    let root = tempfile::tempdir().unwrap();
    let err = sandbox_with(root.path(), |c| c.policy_core_instances = 2)
        .await
        .err()
        .expect("refused");
    let text = err.to_string();
    assert!(matches!(err, SandboxError::PolicyLoad(_)), "{err:?}");
    for part in [
        "needs 3 core wasm instances",
        "ceiling is 2",
        "policy_core_instances",
        "SANDBOX_POLICY_CORE_INSTANCES",
    ] {
        assert!(text.contains(part), "{part:?} missing from: {text}");
    }
}

#[tokio::test]
async fn limits_are_sized_from_the_component_and_its_self_check_within_the_ceilings() {
    let root = tempfile::tempdir().unwrap();
    let sandbox = sandbox_with(root.path(), |_| {}).await.unwrap();
    let report = sandbox.policy_report();
    let ceilings = crate::InstanceLimits::from_config(&config(root.path()));
    assert_eq!(report.limits.core_instances, report.needs.core_instances);
    assert_eq!(report.limits.memories, report.needs.memories);
    assert_eq!(report.limits.tables, report.needs.tables);
    assert!(report.peak.memory_bytes > 0);
    assert!(report.limits.memory_bytes >= 2 * report.peak.memory_bytes);
    assert!(
        report.limits.memory_bytes < ceilings.memory_bytes,
        "{report:?}"
    );
    // A tight ceiling wins over the sizing.
    let tight = sandbox_with(root.path(), |c| {
        c.policy_memory_bytes = report.peak.memory_bytes + (1 << 20)
    })
    .await
    .unwrap();
    assert_eq!(
        tight.policy_report().limits.memory_bytes,
        report.peak.memory_bytes + (1 << 20)
    );
}

/// Bug: every routing key owned an instance, so memory grew with the
/// number of users (4.4 MB each for a Python policy), not with the load.
#[tokio::test]
async fn instances_are_bounded_by_the_pool_budget_while_keys_still_run_in_parallel() {
    let root = tempfile::tempdir().unwrap();
    let probe = sandbox_with(root.path(), |_| {}).await.unwrap();
    let per_instance = probe.policy_report().peak.charged_bytes;
    let sandbox = Arc::new(
        sandbox_with(root.path(), |c| c.policy_pool_bytes = 3 * per_instance)
            .await
            .unwrap(),
    );
    assert_eq!(sandbox.policy_pool_capacity(), 3);
    let calls = (0..40).map(|i| {
        let sandbox = sandbox.clone();
        tokio::spawn(async move {
            let backend = sandbox.get_thread_backend(&format!("u{i}-1")).await?;
            backend.ensure_container().await.map(|c| c.id)
        })
    });
    let ids: Vec<String> = futures_util::future::join_all(calls)
        .await
        .into_iter()
        .map(|r| r.expect("no panic").expect("every call is served"))
        .collect();
    // One container per user, and never more instances than fit.
    assert_eq!(
        ids.iter().collect::<std::collections::HashSet<_>>().len(),
        40
    );
    assert!(
        sandbox.policy_instances() <= 3,
        "{}",
        sandbox.policy_instances()
    );
    // A key's later call is served by a pooled instance (a cache miss
    // re-adopts its container: the same one).
    let again = sandbox.get_thread_backend("u7-2").await.unwrap();
    assert_eq!(again.ensure_container().await.unwrap().id, ids[7]);
}

#[tokio::test]
async fn a_pool_of_one_serves_every_key_in_turn() {
    let root = tempfile::tempdir().unwrap();
    let sandbox = Arc::new(
        sandbox_with(root.path(), |c| c.max_policy_instances = 1)
            .await
            .unwrap(),
    );
    assert_eq!(sandbox.policy_pool_capacity(), 1);
    let calls = (0..10).map(|i| {
        let sandbox = sandbox.clone();
        tokio::spawn(async move {
            let backend = sandbox.get_thread_backend(&format!("p{i}-1")).await?;
            backend.ensure_container().await
        })
    });
    for r in futures_util::future::join_all(calls).await {
        r.unwrap().unwrap();
    }
    assert_eq!(sandbox.policy_instances(), 1);
}

fn profiled(c: &mut Config) {
    use crate::config::ProfileConfig;
    c.profiles.insert(
        "trusted".into(),
        ProfileConfig {
            network: Some("agents".into()),
            ..ProfileConfig::default()
        },
    );
    c.policy_config
        .insert("profile.trusted".into(), "alice,carol".into());
}

async fn profiles_of(sandbox: &Sandbox) -> Vec<(String, String)> {
    let mut found: Vec<_> = sandbox
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|c| (c.backend_id.clone(), c.profile.clone()))
        .collect();
    found.sort();
    found
}

#[tokio::test]
async fn the_policy_chooses_each_users_profile_among_the_operators() {
    let root = tempfile::tempdir().unwrap();
    let sandbox = sandbox_with(root.path(), profiled).await.unwrap();
    assert_eq!(sandbox.policy_report().world, "0.4");
    for thread in ["alice-1", "bob-1", "carol-1"] {
        let backend = sandbox.get_thread_backend(thread).await.unwrap();
        assert_eq!(backend.execute("true").await.unwrap().exit_code, 0);
    }
    assert_eq!(
        profiles_of(&sandbox).await,
        [
            ("alice".to_owned(), "trusted".to_owned()),
            ("bob".to_owned(), "default".to_owned()),
            ("carol".to_owned(), "trusted".to_owned())
        ]
    );
}

#[tokio::test]
async fn a_profile_the_operator_did_not_define_fails_the_call_and_creates_nothing() {
    let root = tempfile::tempdir().unwrap();
    let sandbox = sandbox_with(root.path(), |c| {
        profiled(c);
        c.policy_config
            .insert("profile.admin".into(), "mallory".into());
    })
    .await
    .unwrap();
    let backend = sandbox.get_thread_backend("mallory-1").await.unwrap();
    let err = backend.execute("true").await.unwrap_err();
    assert!(matches!(err, SandboxError::Refused(_)), "{err:?}");
    let shown = err.to_string();
    assert!(shown.contains("profile admin"), "{shown}");
    assert!(shown.contains("default, trusted"), "{shown}");
    assert!(sandbox.list().await.unwrap().is_empty());
}

#[tokio::test]
async fn a_policy_of_the_0_3_world_loads_and_gets_the_default_profile() {
    let root = tempfile::tempdir().unwrap();
    let sandbox = Sandbox::with_provider(
        {
            let mut c = config(root.path());
            profiled(&mut c);
            c
        },
        Arc::new(MemoryProvider::new()),
        file(fixtures::POLICY_V03_PATH),
    )
    .await
    .unwrap();
    assert_eq!(sandbox.policy_report().world, "0.3");
    assert_eq!(sandbox.policy_name(), "v03-per-user");
    let backend = sandbox.get_thread_backend("alice-1").await.unwrap();
    assert_eq!(backend.execute("true").await.unwrap().exit_code, 0);
    assert_eq!(
        profiles_of(&sandbox).await,
        [("alice".to_owned(), "default".to_owned())]
    );
}

#[tokio::test]
async fn when_the_policy_changes_a_users_profile_the_idle_container_is_replaced() {
    let root = tempfile::tempdir().unwrap();
    let sandbox = sandbox_with(root.path(), profiled).await.unwrap();
    let backend = sandbox.get_thread_backend("alice-1").await.unwrap();
    backend.execute("true").await.unwrap();
    let first = sandbox.list().await.unwrap();
    assert_eq!(first[0].profile, "trusted");
    // A 0.3 policy cannot choose: alice's backend gets `default` now.
    sandbox
        .swap_policy(file(fixtures::POLICY_V03_PATH))
        .await
        .unwrap();
    let listed = sandbox.list().await.unwrap();
    assert_eq!(listed[0].id, first[0].id, "left alone until used");
    backend.execute("true").await.unwrap();
    let second = sandbox.list().await.unwrap();
    assert_eq!(second.len(), 1);
    assert_ne!(second[0].id, first[0].id, "replaced");
    assert_eq!(second[0].profile, "default");
    assert_eq!(second[0].outdated, None);
}

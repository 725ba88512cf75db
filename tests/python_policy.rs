//! The Python per-user policy (guest/python-per-user, built with
//! componentize-py) against the real Docker engine, next to the Rust one:
//! every behaviour test runs one body for both components, so the two
//! cannot drift apart unnoticed.
//!
//! The Python components are built by `cargo test-all` (or `cargo xtask
//! python-policies`) into `target/policies/`; `SANDBOX_PYTHON_POLICY` and
//! `SANDBOX_PYTHON_FAILING_POLICY` override their paths. A missing
//! component fails these tests: they never skip.

mod support;

use std::collections::BTreeMap;
use std::path::PathBuf;

use sandbox_host::{Config, PolicySource, SandboxError};
use support::{docker, Harness};

/// A component built from Python outside cargo: its path from `var`, else
/// `target/policies/{file}`; panics with how to build it when missing.
fn python_component(var: &str, file: &str) -> PathBuf {
    let path = std::env::var_os(var).map_or_else(
        || {
            let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .parent()
                .expect("host/ has a parent");
            root.join("target/policies").join(file)
        },
        PathBuf::from,
    );
    assert!(
        path.is_file(),
        "the Python policy component {} is missing ({var}): build it with \
         `cargo xtask python-policies` (cargo test-all does)",
        path.display()
    );
    path
}

fn rust_policy() -> PolicySource {
    PolicySource::Builtin("per-user".into())
}

/// The README's minimal Python policy (guest/python-minimal).
fn python_minimal_policy() -> PolicySource {
    PolicySource::File(python_component(
        "SANDBOX_PYTHON_MINIMAL_POLICY",
        "python-minimal.wasm",
    ))
}

/// The README's minimal policy keeps its promise: threads of a user share
/// one container, created lazily, re-created, destroyed, adopted; a burst
/// makes one.
mod python_minimal {
    macro_rules! minimal {
        ($($name:ident),* $(,)?) => {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::$name(super::python_minimal_policy(), "python-minimal").await
                }
            )*
        };
    }
    minimal!(
        lazy_creation_and_recreation_when_stopped_or_vanished,
        two_threads_of_one_user_share_one_container_and_workspace,
        destroy_user_removes_the_container_and_keeps_the_workspace,
        a_restarted_host_adopts_the_labelled_container,
        a_burst_of_twenty_first_calls_leaves_exactly_one_container,
    );
}

fn python_policy() -> PolicySource {
    PolicySource::File(python_component(
        "SANDBOX_PYTHON_POLICY",
        "python-per-user.wasm",
    ))
}

/// The same test body, once for each component.
macro_rules! for_both_policies {
    ($($name:ident),* $(,)?) => {
        mod rust {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::$name(super::rust_policy(), "per-user").await
                }
            )*
        }
        mod python {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::$name(super::python_policy(), "python-per-user").await
                }
            )*
        }
    };
}

for_both_policies!(
    lazy_creation_and_recreation_when_stopped_or_vanished,
    two_threads_of_one_user_share_one_container_and_workspace,
    destroy_user_removes_the_container_and_keeps_the_workspace,
    a_restarted_host_adopts_the_labelled_container,
    a_burst_of_twenty_first_calls_leaves_exactly_one_container,
    maintain_applies_idle_ttl_and_max_containers_from_the_policy_config,
);

async fn lazy_creation_and_recreation_when_stopped_or_vanished(policy: PolicySource, name: &str) {
    let h = Harness::new("py-life");
    let sandbox = h.sandbox_with(h.config(), policy).await;
    assert_eq!(sandbox.policy_name(), name);

    let backend = sandbox.get_thread_backend("alice-1").await.unwrap();
    assert_eq!(backend.id(), "alice");
    assert!(h.containers().is_empty(), "lazy: no container yet");
    assert!(h.root.path().join("alice").is_dir(), "but the workspace");

    let r = backend.execute("echo keep > kept.txt").await.unwrap();
    assert_eq!(r.exit_code, 0, "{r:?}");
    let first = backend.ensure_container().await.unwrap();
    let containers = h.containers();
    assert_eq!(containers.len(), 1, "{containers:?}");
    assert_eq!(containers[0].0, format!("sandbox.{}.alice", h.namespace));
    let labels = docker(&[
        "inspect",
        "--format",
        "{{index .Config.Labels \"sandbox.policy\"}}",
        &first.id,
    ]);
    assert_eq!(labels.trim(), name, "stamped with the policy's name");

    docker(&["stop", "-t", "0", &first.id]);
    let r = backend.execute("cat kept.txt").await.unwrap();
    assert_eq!(r.output, "keep\n");
    let second = backend.ensure_container().await.unwrap();
    assert_ne!(first.id, second.id, "the stopped container was replaced");
    assert_eq!(h.state(&first.id), "gone", "and removed");

    docker(&["rm", "-f", &second.id]);
    let r = backend.execute("cat kept.txt").await.unwrap();
    assert_eq!(r.output, "keep\n");
    let third = backend.ensure_container().await.unwrap();
    assert_ne!(second.id, third.id, "the vanished container was re-created");

    let containers = h.containers();
    assert_eq!(containers.len(), 1, "{containers:?}");
    assert_eq!(containers[0].2, "running");
}

async fn two_threads_of_one_user_share_one_container_and_workspace(
    policy: PolicySource,
    _name: &str,
) {
    let h = Harness::new("py-share");
    let sandbox = h.sandbox_with(h.config(), policy).await;
    let t1 = sandbox.get_thread_backend("alice-1").await.unwrap();
    let t2 = sandbox.get_thread_backend("alice-2").await.unwrap();
    assert_eq!((t1.id(), t2.id()), ("alice", "alice"));

    t1.execute("echo from-thread-1 > shared.txt").await.unwrap();
    let r = t2.execute("cat /workspace/shared.txt").await.unwrap();
    assert_eq!(r.output, "from-thread-1\n");
    assert_eq!(
        std::fs::read_to_string(h.root.path().join("alice/shared.txt")).unwrap(),
        "from-thread-1\n"
    );
    assert_eq!(
        t1.ensure_container().await.unwrap().id,
        t2.ensure_container().await.unwrap().id
    );
    assert_eq!(h.containers().len(), 1);

    let bob = sandbox.get_thread_backend("bob-1").await.unwrap();
    assert_eq!(bob.execute("ls /workspace").await.unwrap().output, "");
    assert_eq!(h.containers().len(), 2, "bob has his own");
}

async fn destroy_user_removes_the_container_and_keeps_the_workspace(
    policy: PolicySource,
    _name: &str,
) {
    let h = Harness::new("py-destroy");
    let sandbox = h.sandbox_with(h.config(), policy).await;
    for thread in ["alice-1", "alice-2", "bob-1"] {
        let backend = sandbox.get_thread_backend(thread).await.unwrap();
        backend.execute("true").await.unwrap();
    }
    assert_eq!(h.containers().len(), 2);

    assert!(sandbox.destroy_user_backend("alice").await.unwrap());
    assert!(!sandbox.destroy_user_backend("alice").await.unwrap());
    let left: Vec<String> = h.containers().into_iter().map(|c| c.0).collect();
    assert_eq!(left, [format!("sandbox.{}.bob", h.namespace)]);
    assert!(h.root.path().join("alice").is_dir(), "the workspace stays");

    // release-thread: the default thread_destroy = "backend" takes the
    // user's container.
    assert!(sandbox.destroy_thread_backend("bob-9").await.unwrap());
    assert!(!sandbox.destroy_thread_backend("bob-1").await.unwrap());
    assert!(h.containers().is_empty());
    assert!(!sandbox.destroy_user_backend("carol").await.unwrap());

    // And the user comes back on use.
    let alice = sandbox.get_thread_backend("alice-3").await.unwrap();
    assert_eq!(alice.execute("echo back").await.unwrap().output, "back\n");
    assert_eq!(h.containers().len(), 1);
}

async fn a_restarted_host_adopts_the_labelled_container(policy: PolicySource, _name: &str) {
    let h = Harness::new("py-adopt");
    let first = h.sandbox_with(h.config(), policy.clone()).await;
    let a = first.get_thread_backend("alice-1").await.unwrap();
    a.execute("echo before > f").await.unwrap();
    let original = a.ensure_container().await.unwrap();
    drop(a);
    drop(first);

    // A new host on the same namespace: empty cache, fresh instances.
    let second = h.sandbox_with(h.config(), policy).await;
    let b = second.get_thread_backend("alice-2").await.unwrap();
    assert_eq!(b.execute("cat f").await.unwrap().output, "before\n");
    assert_eq!(
        b.ensure_container().await.unwrap().id,
        original.id,
        "adopted, not re-created"
    );
    assert_eq!(h.containers().len(), 1);
    assert!(second.destroy_user_backend("alice").await.unwrap());
    assert!(h.containers().is_empty());
}

async fn a_burst_of_twenty_first_calls_leaves_exactly_one_container(
    policy: PolicySource,
    _name: &str,
) {
    let h = Harness::new("py-burst");
    let sandbox = h.sandbox_with(h.config(), policy).await;
    let calls = (0..20).map(|i| {
        let sandbox = sandbox.clone();
        tokio::spawn(async move {
            let backend = sandbox.get_thread_backend(&format!("alice-{i}")).await?;
            backend.execute("echo ok").await
        })
    });
    for result in futures_util::future::join_all(calls).await {
        assert_eq!(result.unwrap().unwrap().output, "ok\n");
    }
    let containers = h.containers();
    assert_eq!(containers.len(), 1, "{containers:?}");
    assert_eq!(sandbox.counters().containers_created, 1);
}

async fn maintain_applies_idle_ttl_and_max_containers_from_the_policy_config(
    policy: PolicySource,
    _name: &str,
) {
    let h = Harness::new("py-maint");
    let config = Config {
        policy_config: BTreeMap::from([
            ("idle_ttl_secs".to_owned(), "1.5".to_owned()),
            ("max_containers".to_owned(), "2".to_owned()),
        ]),
        // Only this test's own `maintain` calls.
        maintenance_interval_secs: 3600.0,
        ..h.config()
    };
    let sandbox = h.sandbox_with(config, policy).await;
    let name = |user: &str| format!("sandbox.{}.{user}", h.namespace);
    let names = || -> Vec<String> { h.containers().into_iter().map(|c| c.0).collect() };

    for user in ["alice", "bob", "carol"] {
        let backend = sandbox
            .get_thread_backend(&format!("{user}-1"))
            .await
            .unwrap();
        backend.execute("true").await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // carol's container made room: alice was the least recently used.
    assert_eq!(names(), [name("bob"), name("carol")]);

    tokio::time::sleep(std::time::Duration::from_millis(1700)).await;
    let carol = sandbox.get_thread_backend("carol-2").await.unwrap();
    carol.execute("true").await.unwrap();

    let plan = sandbox.maintain(true).await.unwrap();
    let shown: Vec<(&str, &str)> = plan
        .iter()
        .map(|r| (r.backend_id.as_str(), r.reason.as_str()))
        .collect();
    assert!(
        matches!(shown[..], [("bob", reason)]
            if reason.strip_prefix("idle ").and_then(|s| s.strip_suffix('s'))
                .and_then(|s| s.parse::<u64>().ok()).is_some_and(|secs| secs >= 1)),
        "bob is idle (whole seconds), carol was just used: {shown:?}"
    );
    assert_eq!(names().len(), 2, "a dry run removes nothing");

    let done = sandbox.maintain(false).await.unwrap();
    // The same removals; the idle seconds in the reason may have ticked.
    let what = |removals: &[sandbox_host::Removal]| -> Vec<(String, String)> {
        removals
            .iter()
            .map(|r| (r.container_id.clone(), r.backend_id.clone()))
            .collect()
    };
    assert_eq!(what(&done), what(&plan));
    assert_eq!(names(), [name("carol")]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_exception_in_a_python_policy_is_named_in_the_error() {
    let h = Harness::new("py-fail");
    let failing = python_component("SANDBOX_PYTHON_FAILING_POLICY", "python-failing.wasm");
    let sandbox = h
        .sandbox_with(h.config(), PolicySource::File(failing))
        .await;
    let backend = sandbox.get_thread_backend("alice-1").await.unwrap();
    let err = backend.execute("true").await.unwrap_err();
    let message = err.to_string();
    assert!(matches!(err, SandboxError::PolicyTrap(_)), "{err:?}");
    assert!(
        message.contains("ZeroDivisionError: division by zero"),
        "the error names the Python exception: {message}"
    );
    assert!(!message.contains('\n'), "one line: {message}");
    assert!(h.containers().is_empty());

    // The trapped instance was replaced: the next call fails the same way,
    // with its own traceback, not an accumulation.
    let again = backend.execute("true").await.unwrap_err().to_string();
    assert_eq!(again.matches("ZeroDivisionError").count(), 1, "{again}");
}

/// Bug: a call dropped while its instance was being made (a client gone, a
/// timeout) kept its room in the pool for good; once the dropped calls
/// reached the pool's size every later call waited forever. A Python
/// instance takes milliseconds to make, so a short timeout drops calls
/// right there.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn calls_dropped_while_their_instance_is_made_free_their_room() {
    let h = Harness::new("py-room");
    let config = Config {
        max_policy_instances: 2,
        ..h.config()
    };
    let sandbox = h.sandbox_with(config, python_policy()).await;
    assert_eq!(sandbox.policy_pool_capacity(), 2);
    let backend = sandbox.get_thread_backend("alice-1").await.unwrap();
    for _ in 0..10 {
        let cut = tokio::time::timeout(
            std::time::Duration::from_millis(2),
            backend.ensure_container(),
        )
        .await;
        assert!(
            cut.is_err(),
            "the call finished in 2 ms: nothing was tested"
        );
    }
    let served = tokio::time::timeout(
        std::time::Duration::from_secs(60),
        backend.ensure_container(),
    )
    .await
    .expect("the pool still lends an instance");
    served.unwrap();
    assert!(sandbox.policy_instances() <= 2);
}

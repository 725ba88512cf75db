//! Running as a service, against the real engine: every host process on a
//! machine shares one view of a container or leaves it alone, changed
//! settings reach containers when they are next idle, and the state store
//! trusts nothing it did not make.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use sandbox_host::{Config, ExecOptions, PolicySource, SandboxError};
use support::Harness;

fn exec_opts() -> ExecOptions {
    ExecOptions {
        timeout: Some(Duration::from_secs(30)),
        ..ExecOptions::default()
    }
}

/// Bug: a CLI with another workspace root than the server shared the
/// server's containers but not its in-flight records: `ls` showed nothing
/// running, and `destroy` killed the running command without its grace.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_process_with_another_workspace_root_leaves_the_container_alone() {
    let h = Harness::new("elsewhere");
    let server = h.sandbox().await;
    let alice = server.get_thread_backend("alice-1").await.unwrap();
    let running = tokio::spawn(async move {
        alice
            .execute_with("sleep 3; echo done", exec_opts())
            .await
            .unwrap()
    });
    tokio::time::sleep(Duration::from_millis(800)).await;

    let other_root = tempfile::tempdir().unwrap();
    let cli = h
        .sandbox_with(
            Config {
                workspace_root: other_root.path().to_owned(),
                ..h.config()
            },
            PolicySource::Builtin("per-user".into()),
        )
        .await;
    let seen = cli.list().await.unwrap();
    assert_eq!(seen.len(), 1);
    let elsewhere = seen[0].managed_elsewhere.clone().expect("marked elsewhere");
    assert!(
        elsewhere.contains(h.root.path().file_name().unwrap().to_str().unwrap()),
        "{elsewhere}"
    );
    let refused = cli.destroy_user_backend("alice").await;
    assert!(
        matches!(&refused, Err(SandboxError::Refused(m)) if m.contains("--workspace-root")),
        "{refused:?}"
    );
    let exec = cli
        .get_thread_backend("alice-2")
        .await
        .unwrap()
        .execute("echo hi")
        .await;
    assert!(
        matches!(&exec, Err(SandboxError::Refused(m)) if m.contains("workspace root")),
        "{exec:?}"
    );
    let report = cli
        .gc_with(sandbox_host::GcOptions {
            max_age: Some(Duration::ZERO),
            dry_run: false,
            other_policies: true,
            replace_outdated: false,
        })
        .await
        .unwrap();
    assert!(report.entries.is_empty(), "{:?}", report.entries);
    assert_eq!(report.elsewhere.len(), 1);

    // The same store reached by another path (a symlink, a bind mount) is
    // the same view: its store id says so.
    let link_dir = tempfile::tempdir().unwrap();
    let link = link_dir.path().join("ws");
    std::os::unix::fs::symlink(h.root.path(), &link).unwrap();
    let same = h
        .sandbox_with(
            Config {
                workspace_root: link.clone(),
                ..h.config()
            },
            PolicySource::Builtin("per-user".into()),
        )
        .await;
    let seen = same.list().await.unwrap();
    assert_eq!(seen[0].managed_elsewhere, None, "{seen:?}");
    assert_eq!(seen[0].in_flight, 1, "it sees the server's command");

    let done = running.await.unwrap();
    assert_eq!(
        (done.exit_code, done.output.trim()),
        (0, "done"),
        "the server's command ran to its end"
    );
    assert_eq!(h.containers().len(), 1, "the container is still there");
}

/// Bug: containers kept the limits and image they were created with; a
/// changed setting never reached them and nothing said so.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_changed_setting_reaches_the_container_when_it_is_next_idle() {
    let h = Harness::new("replan");
    let before = h.sandbox().await;
    let alice = before.get_thread_backend("alice-1").await.unwrap();
    let out = alice
        .execute("cat /sys/fs/cgroup/pids.max 2>/dev/null || cat /sys/fs/cgroup/pids/pids.max")
        .await
        .unwrap();
    assert_eq!(out.output.trim(), "256", "{out:?}");
    let first = h.container_of("alice");
    let listed = before.list().await.unwrap();
    assert_eq!(listed[0].outdated, None, "current when made");

    // The operator lowers the process limit; a command runs across it.
    let mut changed = h.config();
    changed.limits.pids = 64;
    let after = h
        .sandbox_with(changed, PolicySource::Builtin("per-user".into()))
        .await;
    let listed = after.list().await.unwrap();
    let why = listed[0].outdated.clone().expect("ls says it is outdated");
    assert!(why.contains("plan changed"), "{why}");
    // A gc with other settings (a root shell beside the service) lists it
    // and leaves it: the service's maintenance replaces it.
    let report = after
        .gc_with(sandbox_host::GcOptions::default())
        .await
        .unwrap();
    assert!(report.entries.is_empty(), "{:?}", report.entries);
    assert_eq!(report.outdated.len(), 1);
    assert_eq!(h.container_of("alice"), first);
    let busy = after.get_thread_backend("alice-2").await.unwrap();
    let running = tokio::spawn(async move { busy.execute("sleep 2; echo survived").await });
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(after.retire_outdated().await.unwrap(), 0, "not while busy");
    let done = running.await.unwrap().unwrap();
    assert_eq!(done.output.trim(), "survived");
    assert_eq!(h.container_of("alice"), first);

    assert_eq!(
        after.retire_outdated().await.unwrap(),
        1,
        "idle now: replaced"
    );
    let out = after
        .get_thread_backend("alice-1")
        .await
        .unwrap()
        .execute("cat /sys/fs/cgroup/pids.max 2>/dev/null || cat /sys/fs/cgroup/pids/pids.max")
        .await
        .unwrap();
    assert_eq!(out.output.trim(), "64", "the new limit holds: {out:?}");
    assert_ne!(h.container_of("alice"), first);
    assert_eq!(after.list().await.unwrap()[0].outdated, None);
}

/// Bug: a typo in `network` left a container that failed every execute
/// until `destroy --user`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_create_leaves_nothing_stuck() {
    let h = Harness::new("typo");
    let typo = h
        .sandbox_with(
            Config {
                network: "no-such-network-here".into(),
                ..h.config()
            },
            PolicySource::Builtin("per-user".into()),
        )
        .await;
    let failed = typo
        .get_thread_backend("alice-1")
        .await
        .unwrap()
        .execute("echo hi")
        .await;
    let message = format!("{failed:?}");
    assert!(
        failed.is_err() && message.contains("no-such-network-here"),
        "{message}"
    );
    let fixed = h.sandbox().await;
    let out = fixed
        .get_thread_backend("alice-1")
        .await
        .unwrap()
        .execute("echo hi")
        .await
        .expect("the corrected setting works without a destroy");
    assert_eq!(out.output.trim(), "hi");
}

/// Bug: an existing state store writable by others was used as found: a
/// planted lock kept a container busy forever, a symlink made root write
/// where the attacker chose, and lock files were never removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_state_store_is_checked_before_it_is_trusted() {
    let h = Harness::new("store");
    let store = h.root.path().join(".sandbox");
    std::fs::create_dir_all(store.join("running")).unwrap();
    std::fs::set_permissions(&store, std::fs::Permissions::from_mode(0o777)).unwrap();
    let provider = std::sync::Arc::new(sandbox_host::DockerProvider::from_config(&h.config()));
    let refused = sandbox_host::Sandbox::with_provider(
        h.config(),
        provider,
        PolicySource::Builtin("per-user".into()),
    )
    .await;
    let message = refused.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(
        message.contains(".sandbox") && message.contains("can write"),
        "{message}"
    );

    std::fs::set_permissions(&store, std::fs::Permissions::from_mode(0o700)).unwrap();
    // A link planted where last use is recorded is never followed.
    let target = h.root.path().join("planted");
    std::fs::create_dir_all(store.join("last-used")).unwrap();
    let sandbox = h.sandbox().await;
    let alice = sandbox.get_thread_backend("alice-1").await.unwrap();
    alice.execute("true").await.unwrap();
    let container = h
        .containers()
        .into_iter()
        .next()
        .map(|(name, _, _)| name)
        .unwrap();
    let last_used = store.join("last-used").join(&container);
    std::fs::remove_file(&last_used).unwrap();
    std::os::unix::fs::symlink(&target, &last_used).unwrap();
    alice.execute("true").await.unwrap();
    assert!(!target.exists(), "nothing created through the link");

    // The link's state in the store goes with its container: its plane
    // directory, or (on the attach stream: gVisor) its writer lock.
    let count = |sub: &str| std::fs::read_dir(store.join(sub)).map_or(0, |d| d.count());
    let links = || count("links") + count("plane");
    assert_eq!(links(), 1, "the agent link's plane directory or lock");
    assert!(sandbox.destroy_user_backend("alice").await.unwrap());
    assert_eq!(links(), 0, "removed with the container");
    let mode = std::fs::metadata(&store).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700);
}

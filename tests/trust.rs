//! The trust boundary against the real engine: hostile policies, hostile
//! ids, a misbehaving engine. Every attack must end in a typed error or a
//! contained trap, leave victims untouched, and never stop other users.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use sandbox_host::DockerProvider;
use sandbox_host::{policies, Config, PolicySource, Sandbox, SandboxError};
use support::{docker, fixture, Harness};

fn hostile() -> PolicySource {
    PolicySource::File(fixture("hostile-policy"))
}

/// The error of ensuring `thread`'s container: the hostile fixture's
/// container attacks run in `ensure-container`.
async fn ensure_err(sandbox: &sandbox_host::Sandbox, thread: impl AsRef<str>) -> SandboxError {
    let backend = sandbox.get_thread_backend(thread.as_ref()).await.unwrap();
    backend.ensure_container().await.unwrap_err()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_policy_cannot_remove_inspect_or_start_a_container_it_does_not_own() {
    let h = Harness::new("attack");
    let victim = h.victim();
    let sandbox = h.sandbox_with(h.config(), hostile()).await;

    let err = ensure_err(&sandbox, &format!("attack-{victim}")).await;
    let text = err.to_string();
    // remove, inspect and start each got the host's typed refusal.
    assert!(
        text.contains("remove: refused; inspect: refused; start: refused"),
        "{text}"
    );
    assert_eq!(h.state(&victim), "running", "the victim is untouched");

    // A container labelled by another namespace is just as foreign.
    let other = Harness::new("attack2");
    let neighbour = other.sandbox().await;
    let b = neighbour.get_thread_backend("carol-1").await.unwrap();
    b.execute("true").await.unwrap();
    let theirs = b.ensure_container().await.unwrap().id;
    let err = ensure_err(&sandbox, &format!("attack-{theirs}")).await;
    assert!(
        err.to_string()
            .contains("remove: refused; inspect: refused; start: refused"),
        "{err}"
    );
    assert_eq!(h.state(&theirs), "running");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_policy_cannot_escape_the_workspace_root() {
    let h = Harness::new("escape");
    let outside = tempfile::tempdir().unwrap();
    let config = Config {
        workspace_root: outside.path().join("a/root"),
        ..h.config()
    };
    let sandbox = h.sandbox_with(config, hostile()).await;
    let err = ensure_err(&sandbox, "escape-1").await;
    let text = err.to_string();
    // A path where a backend id belongs: invalid to look up, and refused to
    // create (not the backend of this ensure-container).
    assert!(text.contains("find: invalid-id"), "{text}");
    assert!(text.contains("create: refused"), "{text}");
    // "{root}/../../etc" would be outside/etc.
    let beside: Vec<_> = std::fs::read_dir(outside.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(
        beside.iter().all(|e| e == "a"),
        "nothing created outside the root: {beside:?}"
    );
    assert!(h.containers().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_endless_loop_is_stopped_at_the_deadline_while_other_users_are_served() {
    let h = Harness::new("loop");
    let config = Config {
        policy_deadline_ms: 300,
        ..h.config()
    };
    let sandbox = h.sandbox_with(config, hostile()).await;
    let bob = sandbox.get_thread_backend("bob-1").await.unwrap();
    bob.execute("true").await.unwrap();

    let attacker = {
        let sandbox = sandbox.clone();
        tokio::spawn(async move {
            let start = Instant::now();
            let r = sandbox.get_thread_backend("loop-1").await;
            (r, start.elapsed())
        })
    };
    // Bob keeps working while the loop spins.
    for _ in 0..3 {
        assert_eq!(bob.execute("echo alive").await.unwrap().output, "alive\n");
    }
    let (r, took) = attacker.await.unwrap();
    assert!(matches!(r, Err(SandboxError::PolicyTrap(_))), "{r:?}");
    // Deadline + one tick, with slack for a loaded 2-core CI machine.
    assert!(took < Duration::from_millis(300 + 5 + 700), "took {took:?}");
    assert!(
        took >= Duration::from_millis(300),
        "stopped before its deadline: {took:?}"
    );
    assert_eq!(bob.execute("echo still").await.unwrap().output, "still\n");
}

/// The CPU deadline counts the time a policy's guest runs, not the time it
/// waits for a CPU: 32 users' calls of a fixed amount of computing, side by
/// side on two threads, keep a deadline of 3 times what one takes alone,
/// though they take longer than that on the wall clock (which interrupted
/// Python instances starting side by side on a loaded host).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_computing_side_by_side_are_charged_their_own_time_only() {
    let h = Harness::new("busy");
    let alone = {
        let sandbox = h.sandbox_with(h.config(), hostile()).await;
        let mut fastest = Duration::MAX;
        for i in 0..3 {
            let start = Instant::now();
            let name = format!("busysolo{i}-1");
            sandbox.get_thread_backend(&name).await.unwrap();
            fastest = fastest.min(start.elapsed());
        }
        fastest
    };
    let deadline = (alone * 3).max(Duration::from_millis(30));
    let config = Config {
        policy_deadline_ms: deadline.as_millis() as u64,
        ..h.config()
    };
    let sandbox = h.sandbox_with(config, hostile()).await;
    let calls: Vec<_> = (0..32)
        .map(|i| {
            let sandbox = sandbox.clone();
            tokio::spawn(async move {
                let start = Instant::now();
                let r = sandbox.get_thread_backend(&format!("busy{i}-1")).await;
                (r.map(|_| ()), start.elapsed())
            })
        })
        .collect();
    let mut slowest = Duration::ZERO;
    for call in calls {
        let (r, took) = call.await.unwrap();
        assert!(r.is_ok(), "{r:?} after {took:?} (alone: {alone:?})");
        slowest = slowest.max(took);
    }
    // The point of the test: the wall clock did pass the deadline.
    assert!(slowest > deadline, "{slowest:?} (deadline {deadline:?})");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unbounded_allocation_and_panics_trap_only_their_instance() {
    let h = Harness::new("alloc");
    let config = Config {
        policy_memory_bytes: 32 * 1024 * 1024,
        ..h.config()
    };
    let sandbox = h.sandbox_with(config, hostile()).await;
    let alice = sandbox.get_thread_backend("alice-1").await.unwrap();
    alice.execute("true").await.unwrap();

    let r = sandbox.get_thread_backend("alloc-1").await;
    assert!(matches!(r, Err(SandboxError::PolicyTrap(_))), "{r:?}");
    let r = sandbox.get_thread_backend("panic-1").await;
    match r {
        Err(SandboxError::PolicyTrap(why)) => assert!(why.contains("backend-id"), "{why}"),
        other => panic!("expected a trap, got {other:?}"),
    }
    assert_eq!(alice.execute("echo ok").await.unwrap().output, "ok\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_trapped_instance_is_replaced_and_readopts_its_container() {
    let h = Harness::new("boom");
    let sandbox = h.sandbox_with(h.config(), hostile()).await;
    let boom = sandbox.get_thread_backend("boom-1").await.unwrap();
    boom.execute("echo x > f").await.unwrap();
    let before = boom.ensure_container().await.unwrap().id;

    let r = sandbox.destroy_thread_backend("boom-1").await;
    assert!(matches!(r, Err(SandboxError::PolicyTrap(_))), "{r:?}");
    // The next call runs on a fresh instance, which adopts the container.
    assert_eq!(boom.execute("cat f").await.unwrap().output, "x\n");
    assert_eq!(boom.ensure_container().await.unwrap().id, before);
    assert_eq!(h.containers().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn garbage_backend_ids_and_forged_or_stolen_containers_are_refused() {
    let h = Harness::new("forge");
    let victim = h.victim();
    let sandbox = h.sandbox_with(h.config(), hostile()).await;

    let r = sandbox.get_thread_backend("garbage-1").await;
    assert!(matches!(r, Err(SandboxError::Refused(_))), "{r:?}");
    // Never another user's sandbox or workspace.
    for thread in ["hijack-1", "lie-1"] {
        let r = sandbox.get_thread_backend(thread).await;
        assert!(
            matches!(r, Err(SandboxError::Refused(_))),
            "{thread}: {r:?}"
        );
    }
    let err = ensure_err(&sandbox, "mount-1").await.to_string();
    assert!(err.contains("create: refused"), "{err}");
    assert!(
        !h.containers().iter().any(|c| c.0.ends_with(".mount-1")),
        "no container mounting alice's files"
    );

    let forger = sandbox
        .get_thread_backend(&format!("forge-{victim}"))
        .await
        .unwrap();
    let r = forger.execute("touch /tmp/pwned").await;
    assert!(matches!(r, Err(SandboxError::Refused(_))), "{r:?}");
    assert_eq!(h.state(&victim), "running");
    let probe = docker(&["exec", &victim, "sh", "-c", "ls /tmp/pwned 2>&1 || true"]);
    assert!(
        probe.contains("No such file"),
        "nothing ran in the victim: {probe}"
    );

    let alice = sandbox.get_thread_backend("alice-1").await.unwrap();
    alice.execute("echo secret > s").await.unwrap();
    let thief = sandbox.get_thread_backend("steal-alice-1").await.unwrap();
    let r = thief.execute("cat s").await;
    assert!(matches!(r, Err(SandboxError::Refused(_))), "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_components_are_refused_at_load_and_the_running_policy_stays() {
    let h = Harness::new("load");
    let sandbox = h.sandbox().await;
    let cases: Vec<(&str, PolicySource, &str)> = vec![
        ("text", bytes(b"not wasm at all"), "not a WebAssembly file"),
        (
            "core module",
            bytes(b"\0asm\x01\0\0\0"),
            "core WebAssembly module",
        ),
        (
            "truncated",
            bytes(b"\0asm\x0d\0\x01\0\x07\xff"),
            "not a valid component",
        ),
        (
            "missing export",
            bytes(b"\0asm\x0d\0\x01\0"),
            "does not export",
        ),
        (
            "other world",
            PolicySource::File(fixture("other-world")),
            "does not fit the `sandbox` world",
        ),
        (
            "self-check",
            PolicySource::File(fixture("broken-policy")),
            "self-check failed",
        ),
    ];
    for (what, source, expected) in cases {
        let err = sandbox.swap_policy(source).await.unwrap_err();
        assert!(
            matches!(err, SandboxError::PolicyLoad(_)),
            "{what}: {err:?}"
        );
        assert!(err.to_string().contains(expected), "{what}: {err}");
        assert_eq!(
            sandbox.policy_name(),
            "per-user",
            "{what}: the running policy stays"
        );
    }
    let b = sandbox.get_thread_backend("alice-1").await.unwrap();
    assert_eq!(b.execute("echo served").await.unwrap().output, "served\n");

    // The CLI exits non-zero and names the problem.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sandbox"))
        .args(["policy", "check"])
        .arg(fixture("other-world"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("does not fit the `sandbox` world"),
        "{stderr}"
    );
}

fn bytes(b: &[u8]) -> PolicySource {
    PolicySource::Bytes {
        label: "test bytes".into(),
        bytes: b.to_vec(),
    }
}

/// At least 40 hostile thread ids: never a panic, never a directory outside
/// the root, never a container.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hostile_ids_create_nothing_anywhere() {
    let h = Harness::new("ids");
    let outside = tempfile::tempdir().unwrap();
    let config = Config {
        workspace_root: outside.path().join("root"),
        ..h.config()
    };
    let sandbox = h
        .sandbox_with(config.clone(), PolicySource::Builtin("per-user".into()))
        .await;
    let per_thread = h
        .sandbox_with(config, PolicySource::Builtin("per-thread".into()))
        .await;
    let long = "a".repeat(10_000);
    let long_rest = format!("alice-{}", "b".repeat(200));
    let ids: Vec<&str> = vec![
        "",
        "-",
        "--",
        "-x",
        "x-",
        "x--",
        "..-1",
        ".",
        "..",
        "./a-1",
        "a/b-1",
        "a\\b-1",
        "/etc-1",
        "a\0-1",
        "a\n-1",
        "a\r-1",
        "a\t-1",
        "a b-1",
        " alice-1",
        "alice -1",
        "Alice-1",
        "ALICE-1",
        "аlice-1",
        "alicе-1",
        "ａlice-1",
        "%2e%2e-1",
        "%2F-1",
        "a;rm-1",
        "a$(id)-1",
        "a`id`-1",
        "a|b-1",
        "a&b-1",
        "a>b-1",
        "a*-1",
        "a?-1",
        "~-1",
        "a'b-1",
        "a\"b-1",
        "a{b}-1",
        "alice-1/..",
        "alice-../..",
        "alice-x;y",
        "alice-\u{202e}",
        "alice-é",
        "_alice-1",
        "alice.-1",
        "a.b-1",
        long.as_str(),
        long_rest.as_str(),
        "\u{feff}alice-1",
        "alice-\0",
    ];
    assert!(ids.len() >= 40);
    for id in &ids {
        for s in [&sandbox, &per_thread] {
            let r = s.get_thread_backend(id).await;
            assert!(
                matches!(r, Err(SandboxError::InvalidId(_))),
                "{id:?}: {r:?}"
            );
            let r = s.destroy_thread_backend(id).await;
            assert!(
                matches!(r, Err(SandboxError::InvalidId(_))),
                "{id:?}: {r:?}"
            );
            let r = s.destroy_user_backend(id).await;
            assert!(
                matches!(r, Err(SandboxError::InvalidId(_))),
                "{id:?}: {r:?}"
            );
        }
    }
    let entries: Vec<_> = std::fs::read_dir(outside.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(
        entries.iter().all(|e| e == "root"),
        "nothing beside the root: {entries:?}"
    );
    let in_root = std::fs::read_dir(outside.path().join("root"))
        .map(|d| d.flatten().filter(|e| e.file_name() != ".sandbox").count())
        .unwrap_or(0);
    assert_eq!(in_root, 0, "no workspace for an invalid id");
    assert!(h.containers().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unreachable_engine_fails_fast_and_the_host_recovers_when_it_answers() {
    let h = Harness::new("down");
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("docker.sock");
    let proxy = support::proxy::SocketProxy::start(&socket, "/var/run/docker.sock");
    let config = Config {
        docker_host: Some(format!("unix://{}", socket.display())),
        docker_timeout_secs: 1.0,
        ..h.config()
    };
    let provider = Arc::new(DockerProvider::from_config(&config));
    let sandbox =
        Sandbox::with_provider(config, provider, PolicySource::Builtin("per-user".into()))
            .await
            .expect("the host starts while the engine is down");
    let backend = sandbox.get_thread_backend("alice-1").await.unwrap();

    let start = Instant::now();
    let r = backend.execute("true").await;
    let took = start.elapsed();
    match &r {
        Err(SandboxError::DockerUnavailable(why)) => {
            assert!(
                why.contains(&socket.display().to_string()),
                "names the endpoint: {why}"
            )
        }
        other => panic!("expected docker-unavailable, got {other:?}"),
    }
    assert!(
        took < Duration::from_secs(4),
        "bounded by the 1 s timeout: {took:?}"
    );

    proxy.set_forwarding(true);
    assert_eq!(backend.execute("echo back").await.unwrap().output, "back\n");
    assert_eq!(h.containers().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killed_and_paused_containers_are_recovered_with_the_workspace() {
    let h = Harness::new("kill");
    let sandbox = h.sandbox().await;
    let b = sandbox.get_thread_backend("alice-1").await.unwrap();
    b.execute("echo kept > k").await.unwrap();
    let first = b.ensure_container().await.unwrap().id;
    docker(&["kill", &first]);
    assert_eq!(b.execute("cat k").await.unwrap().output, "kept\n");
    let second = b.ensure_container().await.unwrap().id;
    support::pause(&second);
    assert_eq!(b.execute("cat k").await.unwrap().output, "kept\n");
    let containers = h.containers();
    assert_eq!(containers.len(), 1, "{containers:?}");
    assert_eq!(containers[0].2, "running");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_missing_image_is_named_with_the_way_to_get_it() {
    let h = Harness::new("noimage");
    let config = Config {
        image: "sandbox-no-such-image:never".into(),
        ..h.config()
    };
    let sandbox = h
        .sandbox_with(config, PolicySource::Builtin("per-user".into()))
        .await;
    let b = sandbox.get_thread_backend("alice-1").await.unwrap();
    let err = b.execute("true").await.unwrap_err().to_string();
    assert!(err.contains("sandbox-no-such-image:never"), "{err}");
    assert!(err.contains("sandbox image build"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_read_only_root_keeps_workspace_and_tmp_writable() {
    let h = Harness::new("rofs");
    let config = Config {
        read_only_rootfs: true,
        ..h.config()
    };
    let sandbox = h
        .sandbox_with(config, PolicySource::Builtin("per-user".into()))
        .await;
    let b = sandbox.get_thread_backend("alice-1").await.unwrap();
    let r = b
        .execute("touch /workspace/w && echo ws-ok; touch /tmp/t && echo tmp-ok; touch /etc/x 2>&1 || echo root-ro")
        .await
        .unwrap();
    assert!(
        r.output.contains("ws-ok") && r.output.contains("tmp-ok"),
        "{r:?}"
    );
    assert!(r.output.contains("root-ro"), "{r:?}");
    let id = b.ensure_container().await.unwrap().id;
    let ro = docker(&["inspect", "--format", "{{.HostConfig.ReadonlyRootfs}}", &id]);
    assert_eq!(ro.trim(), "true");
}

/// `bytes` with a custom section appended: the same component (the same
/// name, the same behaviour), another digest.
fn rebuilt(bytes: &[u8]) -> Vec<u8> {
    let mut out = bytes.to_vec();
    let payload = b"\x05build-2";
    out.push(0); // a custom section
    out.push(payload.len() as u8);
    out.extend_from_slice(payload);
    out
}

fn label(id: &str, key: &str) -> String {
    let format = format!("{{{{index .Config.Labels \"{key}\"}}}}");
    docker(&["inspect", "--format", &format, id])
        .trim()
        .to_owned()
}

/// Bug (issue 21): `sandbox gc` run without the server's `--policy` removed
/// every container of the server: their policy's name was not the running
/// one's. Containers now carry their policy's digest, and a gc leaves the
/// containers of another policy (another name, or the same name built
/// from other bytes) alone unless told (`--other-policies`); never an
/// unlabelled container.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn gc_leaves_another_policys_containers_alone_unless_told_and_never_unlabelled_ones() {
    use sandbox_host::GcOptions;
    use sha2::Digest;
    let h = Harness::new("gc");
    let victim = h.victim();
    let config = Config {
        maintenance_interval_secs: 0.0,
        ..h.config()
    };
    let per_thread = h
        .sandbox_with(config.clone(), PolicySource::Builtin("per-thread".into()))
        .await;
    per_thread
        .get_thread_backend("alice-1")
        .await
        .unwrap()
        .execute("true")
        .await
        .unwrap();
    let per_user = h
        .sandbox_with(config.clone(), PolicySource::Builtin("per-user".into()))
        .await;
    per_user
        .get_thread_backend("bob-1")
        .await
        .unwrap()
        .execute("true")
        .await
        .unwrap();
    assert_eq!(h.containers().len(), 2);
    let (alice, bob) = (h.container_of("alice-1"), h.container_of("bob"));
    let digest =
        |bytes: &[u8]| format!("sha256:{}", &hex::encode(sha2::Sha256::digest(bytes))[..16]);
    assert_eq!(label(&alice, "sandbox.policy"), "per-thread");
    assert_eq!(
        label(&alice, "sandbox.policy-digest"),
        digest(policies::PER_THREAD)
    );
    assert_eq!(
        label(&bob, "sandbox.policy-digest"),
        digest(policies::PER_USER)
    );
    assert_eq!(per_user.policy_digest(), digest(policies::PER_USER));

    // As `sandbox gc` without the server's --policy: nothing of the other
    // policy goes, even past a max age.
    let dry = per_user.gc(None, true).await.unwrap();
    assert!(dry.is_empty(), "{dry:?}");
    let report = per_user
        .gc_with(GcOptions {
            max_age: Some(Duration::from_secs(3600)),
            ..GcOptions::default()
        })
        .await
        .unwrap();
    assert!(report.entries.is_empty(), "{:?}", report.entries);
    let left_alone: Vec<&str> = report
        .other_policies
        .iter()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(left_alone, [format!("sandbox.{}.alice-1", h.namespace)]);
    assert_eq!(h.containers().len(), 2);

    // The same name built from other bytes is another policy too; and its
    // `maintain` does not apply its own idle rule (1 s here) to them.
    let other_build = h
        .sandbox_with(
            Config {
                policy_config: [("idle_ttl_secs".to_owned(), "1".to_owned())].into(),
                ..config.clone()
            },
            PolicySource::Bytes {
                label: "per-user, rebuilt".into(),
                bytes: rebuilt(policies::PER_USER),
            },
        )
        .await;
    assert_eq!(other_build.policy_name(), "per-user");
    assert_ne!(other_build.policy_digest(), per_user.policy_digest());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let zero = GcOptions {
        max_age: Some(Duration::ZERO),
        ..GcOptions::default()
    };
    let report = other_build.gc_with(zero).await.unwrap();
    assert!(report.entries.is_empty(), "{:?}", report.entries);
    assert_eq!(report.other_policies.len(), 2);
    assert_eq!(h.containers().len(), 2);
    let would = other_build
        .gc_with(GcOptions {
            dry_run: true,
            other_policies: true,
            ..GcOptions::default()
        })
        .await
        .unwrap();
    assert_eq!(
        would.entries.len(),
        2,
        "told, it would: {:?}",
        would.entries
    );
    assert!(
        would
            .entries
            .iter()
            .all(|e| e.reason.starts_with("policy: idle")),
        "{:?}",
        would.entries
    );

    // Told: the other policy's container goes, with the reason.
    let told = GcOptions {
        other_policies: true,
        ..GcOptions::default()
    };
    let dry = per_user
        .gc_with(GcOptions {
            dry_run: true,
            ..told
        })
        .await
        .unwrap();
    assert_eq!(dry.entries.len(), 1, "{:?}", dry.entries);
    assert!(dry.entries[0].container.id.starts_with(&alice));
    assert!(dry.entries[0].reason.contains("not the running policy"));
    assert!(!dry.entries[0].removed);
    assert_eq!(h.containers().len(), 2, "a dry run removes nothing");
    let done = per_user.gc_with(told).await.unwrap();
    assert_eq!(done.entries.len(), 1, "{:?}", done.entries);
    assert!(done.entries[0].removed);
    let left: Vec<String> = h.containers().into_iter().map(|c| c.0).collect();
    assert_eq!(left, [format!("sandbox.{}.bob", h.namespace)]);

    // Its own containers: max age 0 takes bob.
    let aged = per_user.gc_with(zero).await.unwrap();
    assert_eq!(
        aged.entries.len(),
        1,
        "max age 0 takes bob: {:?}",
        aged.entries
    );
    assert!(h.containers().is_empty());
    assert_eq!(h.state(&victim), "running", "never an unlabelled container");
}

/// Bug (issue 21): gc reported whatever `maintain` said it removed. A
/// policy claiming to have removed every container (removing none) got its
/// claims reported as removals, and its claimed containers skipped the
/// host's own orphan check: stopped ones stayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn gc_reports_only_the_removals_that_happened_and_orphans_stay_the_hosts() {
    let h = Harness::new("liar");
    let mut config = h.config();
    config.maintenance_interval_secs = 0.0;
    config
        .policy_config
        .insert("maintain".into(), "liar".into());
    let sandbox = h.sandbox_with(config, hostile()).await;
    let mut ids = Vec::new();
    for thread in ["carol-1", "carol-2", "carol-3"] {
        let backend = sandbox.get_thread_backend(thread).await.unwrap();
        ids.push(backend.ensure_container().await.unwrap().id);
    }
    // Two orphans: stopped behind the host's back.
    docker(&["stop", "-t", "0", &ids[0], &ids[1]]);

    let claimed = sandbox.maintain(false).await.unwrap();
    assert!(claimed.is_empty(), "claims are not removals: {claimed:?}");
    assert_eq!(h.containers().len(), 3);

    let entries = sandbox.gc(None, false).await.unwrap();
    let mut removed: Vec<(&str, &str)> = entries
        .iter()
        .filter(|e| e.removed)
        .map(|e| (e.container.id.as_str(), e.reason.as_str()))
        .collect();
    removed.sort();
    let mut stopped = [ids[0].as_str(), ids[1].as_str()];
    stopped.sort();
    assert!(
        entries.iter().all(|e| !e.reason.starts_with("policy:")),
        "a claimed removal that did not happen was reported: {entries:?}"
    );
    assert_eq!(
        removed,
        [(stopped[0], "exited"), (stopped[1], "exited")],
        "{entries:?}"
    );
    assert_eq!(h.state(&ids[0]), "gone");
    assert_eq!(h.state(&ids[1]), "gone");
    assert_eq!(h.state(&ids[2]), "running", "the live one stays");
}

#[test]
fn the_shipped_policies_are_components_of_the_world() {
    assert_eq!(&policies::PER_USER[..4], b"\0asm");
    assert_eq!(&policies::PER_THREAD[4..8], &[0x0d, 0, 1, 0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_policy_sleeping_through_wasi_is_cut_off_at_its_wall_clock_budget() {
    // The bug: a 3600 s sleep (wasi clocks + poll, outside the CPU deadline)
    // hung `sandbox exec`, and the user's later requests queued behind it.
    let h = Harness::new("sleep");
    let config = Config {
        policy_call_timeout_ms: 800,
        ..h.config()
    };
    let sandbox = h.sandbox_with(config, hostile()).await;
    for _ in 0..2 {
        let start = Instant::now();
        let r = sandbox.get_thread_backend("sleep-1").await;
        let took = start.elapsed();
        let err = r.unwrap_err();
        assert!(matches!(err, SandboxError::PolicyTrap(_)), "{err}");
        assert!(err.to_string().contains("wall-clock budget"), "{err}");
        assert!(took < Duration::from_millis(800 + 1200), "took {took:?}");
    }
    let bob = sandbox.get_thread_backend("bob-1").await.unwrap();
    assert_eq!(bob.execute("echo ok").await.unwrap().output, "ok\n");
}

/// One user whose `backend-id` is slow, with 40 requests at once, held
/// five other users' calls for 39-60 s: the router instances are shared and
/// each queued behind the sleeper's calls. Now one user has one router turn
/// at a time, and the other routers stay free for everyone else.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_users_slow_backend_id_never_stalls_other_users() {
    let h = Harness::new("fair");
    let config = Config {
        policy_call_timeout_ms: 1000,
        ..h.config()
    };
    let sandbox = h.sandbox_with(config, hostile()).await;
    let mut flood = Vec::new();
    for n in 0..40 {
        let sandbox = sandbox.clone();
        flood.push(tokio::spawn(async move {
            sandbox.backend_id(&format!("sleep-{n}")).await
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut slowest = Duration::ZERO;
    for user in ["alice", "bob", "carol", "dave", "erin"] {
        let start = Instant::now();
        let id = sandbox.backend_id(&format!("{user}-1")).await.unwrap();
        assert_eq!(id, format!("{user}-1"));
        slowest = slowest.max(start.elapsed());
    }
    // One call's budget is the bound; it is far under it.
    assert!(
        slowest < Duration::from_millis(500),
        "another user waited {slowest:?} behind one user's slow backend-id"
    );
    for call in flood {
        call.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_loop_over_cheap_imports_is_stopped_by_the_host_call_budget() {
    // The bug: time in host calls was not counted, so one call made 4,000 to
    // 9,000 Docker API calls or logged 9,900 lines over 8 to 12 s.
    let h = Harness::new("chatty");
    let config = Config {
        policy_host_calls: 50,
        ..h.config()
    };
    let sandbox = h.sandbox_with(config, hostile()).await;
    let start = Instant::now();
    let err = ensure_err(&sandbox, "chatty-1").await;
    assert!(matches!(err, SandboxError::PolicyTrap(_)), "{err}");
    assert!(err.to_string().contains("more than 50 host calls"), "{err}");
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_policy_call_creates_at_most_its_own_backends_container() {
    // The bugs: one call created 60 containers in 1.3 s; a lane created and
    // started containers for other users.
    let h = Harness::new("spree");
    let sandbox = h.sandbox_with(h.config(), hostile()).await;
    let spree = sandbox.get_thread_backend("spree-1").await.unwrap();
    let err = spree.ensure_container().await.unwrap_err().to_string();
    assert!(err.contains("create x60: refused"), "{err}");
    assert!(h.containers().is_empty(), "{:?}", h.containers());

    let poach = sandbox.get_thread_backend("poach-alice").await.unwrap();
    let err = poach.ensure_container().await.unwrap_err().to_string();
    assert!(err.contains("create: refused"), "{err}");
    assert!(h.containers().is_empty(), "{:?}", h.containers());
    assert!(
        !h.root.path().join("alice").exists(),
        "no workspace for alice either"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_profile_the_operator_did_not_define_is_refused_bounded_and_creates_nothing() {
    let h = Harness::new("profiled");
    let sandbox = h.sandbox_with(h.config(), hostile()).await;
    for (thread, says) in [
        (
            "ghostprofile-1",
            "profile admin, which this host does not define",
        ),
        ("badprofile-1", "must be 1..=32 of [a-z0-9_-]"),
        ("hugeprofile-1", "must be 1..=32 of [a-z0-9_-]"),
    ] {
        let backend = sandbox.get_thread_backend(thread).await.unwrap();
        let err = backend.execute("true").await.unwrap_err();
        assert!(matches!(err, SandboxError::Refused(_)), "{thread}: {err:?}");
        let text = err.to_string();
        assert!(text.contains(says), "{thread}: {text:.300}");
        assert!(text.len() < 2000, "{thread}: bounded, {} bytes", text.len());
        assert!(!text.contains('\n'), "{thread}: escaped");
    }
    assert!(h.containers().is_empty(), "{:?}", h.containers());
    // Other users are served meanwhile, under the default profile.
    let alice = sandbox.get_thread_backend("alice-1").await.unwrap();
    assert_eq!(alice.execute("true").await.unwrap().exit_code, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn maintain_may_only_look_up_and_remove_and_its_error_is_bounded_and_escaped() {
    // The bug: maintain's 5 MB error was logged verbatim, with a forged line.
    let h = Harness::new("gremlin");
    let sandbox = h.sandbox_with(h.config(), hostile()).await;
    let err = sandbox.maintain(false).await.unwrap_err().to_string();
    assert!(err.contains("create: refused"), "{err:.300}");
    assert!(err.contains("start: refused"), "{err:.300}");
    assert!(!err.contains('\n') && !err.contains('\x1b'), "{err:.300}");
    assert!(err.len() < 4096, "{} bytes", err.len());
    assert!(h.containers().is_empty());
    assert!(!h.root.path().join("gremlin").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_dropped_mid_call_leaves_the_lane_usable() {
    // The bug: a client that disconnected during a cold start left the
    // instance mid-call; the user's next request failed with
    // "cannot enter component instance".
    let h = Harness::new("nap");
    let sandbox = h.sandbox_with(h.config(), hostile()).await;
    for _ in 0..3 {
        let dropped = tokio::time::timeout(
            Duration::from_millis(100),
            sandbox.get_thread_backend("nap-1"),
        )
        .await;
        assert!(dropped.is_err(), "the call was still running");
        let b = sandbox.get_thread_backend("nap-1").await.unwrap();
        assert_eq!(b.id(), "nap-1");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leaked_wasi_resources_are_capped_per_instance() {
    // The bug: leaked pollables cost ~15 MB of host memory per instance.
    let h = Harness::new("leak");
    let config = Config {
        policy_resources: 64,
        ..h.config()
    };
    let sandbox = h.sandbox_with(config, hostile()).await;
    let start = Instant::now();
    let err = sandbox.get_thread_backend("leak-1").await.unwrap_err();
    assert!(matches!(err, SandboxError::PolicyTrap(_)), "{err}");
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
    let bob = sandbox.get_thread_backend("bob-1").await.unwrap();
    assert_eq!(bob.execute("echo ok").await.unwrap().output, "ok\n");
}

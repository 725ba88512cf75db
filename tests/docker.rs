//! Host-side integration tests against the real Docker engine.

mod support;

use sandbox_host::{policies, PolicySource, SandboxError};
use support::{docker, Harness};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_threads_of_one_user_share_one_container_and_workspace() {
    let h = Harness::new("share");
    let sandbox = h.sandbox().await;

    let t1 = sandbox.get_thread_backend("alice-1").await.unwrap();
    let t2 = sandbox.get_thread_backend("alice-2").await.unwrap();
    assert_eq!(t1.id(), "alice");
    assert_eq!(t2.id(), "alice");
    assert!(
        h.containers().is_empty(),
        "get_thread_backend is lazy: no container yet"
    );
    assert!(
        h.root.path().join("alice").is_dir(),
        "but the workspace exists"
    );

    let w = t1.execute("echo from-thread-1 > shared.txt").await.unwrap();
    assert_eq!(w.exit_code, 0, "{w:?}");
    let r = t2.execute("cat /workspace/shared.txt; pwd").await.unwrap();
    assert_eq!(r.output, "from-thread-1\n/workspace\n");
    assert_eq!(
        std::fs::read_to_string(h.root.path().join("alice/shared.txt")).unwrap(),
        "from-thread-1\n"
    );
    assert_eq!(h.containers().len(), 1);

    let bob = sandbox.get_thread_backend("bob-1").await.unwrap();
    let b = bob.execute("ls /workspace").await.unwrap();
    assert_eq!(b.output, "", "bob does not see alice's files");
    let containers = h.containers();
    assert_eq!(containers.len(), 2);
    assert_eq!(containers[0].0, format!("sandbox.{}.alice", h.namespace));
    assert_eq!(containers[1].0, format!("sandbox.{}.bob", h.namespace));
    assert!(h.root.path().join("bob").is_dir());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn per_thread_policy_loaded_from_a_file_gives_one_container_per_thread() {
    let h = Harness::new("perthread");
    let file = h.root.path().join("per-thread.wasm");
    std::fs::write(&file, policies::PER_THREAD).unwrap();
    let sandbox = h.sandbox_with(h.config(), PolicySource::File(file)).await;
    assert_eq!(sandbox.policy_name(), "per-thread");

    let t1 = sandbox.get_thread_backend("alice-1").await.unwrap();
    let t2 = sandbox.get_thread_backend("alice-2").await.unwrap();
    assert_eq!(t1.id(), "alice-1");
    assert_eq!(t2.id(), "alice-2");
    t1.execute("echo one > f").await.unwrap();
    let r = t2.execute("cat f").await.unwrap();
    assert_eq!(r.output, "one\n", "the workspace is still per user");
    let names: Vec<String> = h.containers().into_iter().map(|c| c.0).collect();
    assert_eq!(
        names,
        [
            format!("sandbox.{}.alice-1", h.namespace),
            format!("sandbox.{}.alice-2", h.namespace)
        ]
    );

    assert!(sandbox.destroy_thread_backend("alice-1").await.unwrap());
    assert_eq!(h.containers().len(), 1);
    assert!(sandbox.destroy_user_backend("alice").await.unwrap());
    assert!(h.containers().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_container_removed_or_stopped_behind_our_back_is_recreated_with_its_files() {
    let h = Harness::new("recreate");
    let sandbox = h.sandbox().await;
    let backend = sandbox.get_thread_backend("alice-1").await.unwrap();
    backend.execute("echo keep > kept.txt").await.unwrap();
    let first = backend.ensure_container().await.unwrap();

    docker(&["rm", "-f", &first.id]);
    let r = backend.execute("cat kept.txt").await.unwrap();
    assert_eq!(r.output, "keep\n");
    let second = backend.ensure_container().await.unwrap();
    assert_ne!(first.id, second.id, "a new container");

    docker(&["stop", "-t", "0", &second.id]);
    let r = backend.execute("cat kept.txt").await.unwrap();
    assert_eq!(r.output, "keep\n");
    let third = backend.ensure_container().await.unwrap();
    assert_ne!(second.id, third.id, "the stopped one was replaced");
    let containers = h.containers();
    assert_eq!(
        containers.len(),
        1,
        "the stopped container was removed: {containers:?}"
    );
    assert_eq!(containers[0].2, "running");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn destroy_returns_true_then_false_and_the_container_is_gone() {
    let h = Harness::new("destroy");
    let sandbox = h.sandbox().await;
    sandbox
        .get_thread_backend("alice-1")
        .await
        .unwrap()
        .execute("true")
        .await
        .unwrap();
    sandbox
        .get_thread_backend("bob-1")
        .await
        .unwrap()
        .execute("true")
        .await
        .unwrap();
    assert_eq!(h.containers().len(), 2);

    assert!(sandbox.destroy_user_backend("alice").await.unwrap());
    assert!(!sandbox.destroy_user_backend("alice").await.unwrap());
    assert_eq!(h.containers().len(), 1);

    assert!(
        sandbox.destroy_thread_backend("bob-7").await.unwrap(),
        "destroys bob's user backend"
    );
    assert!(!sandbox.destroy_thread_backend("bob-1").await.unwrap());
    assert!(h.containers().is_empty());
    assert!(
        !sandbox.destroy_user_backend("carol").await.unwrap(),
        "unknown user"
    );
    assert!(
        h.root.path().join("alice").is_dir(),
        "destroying keeps the workspace"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_second_host_with_an_empty_cache_adopts_the_existing_container() {
    let h = Harness::new("adopt");
    let first = h.sandbox().await;
    let a = first.get_thread_backend("alice-1").await.unwrap();
    a.execute("true").await.unwrap();
    let original = a.ensure_container().await.unwrap();

    let second = h.sandbox().await;
    let b = second.get_thread_backend("alice-2").await.unwrap();
    b.execute("true").await.unwrap();
    assert_eq!(b.ensure_container().await.unwrap().id, original.id);
    assert_eq!(h.containers().len(), 1);
    assert!(
        second.destroy_user_backend("alice").await.unwrap(),
        "and can destroy it"
    );
    assert!(h.containers().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_burst_of_twenty_first_calls_for_one_user_creates_exactly_one_container() {
    let h = Harness::new("burst");
    let sandbox = h.sandbox().await;
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
    assert_eq!(h.containers().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hosts_racing_for_one_user_leave_one_container() {
    let h = Harness::new("race");
    let (a, b) = (h.sandbox().await, h.sandbox().await);
    let calls = (0..10).map(|i| {
        let sandbox = if i % 2 == 0 { a.clone() } else { b.clone() };
        tokio::spawn(async move {
            sandbox
                .get_thread_backend(&format!("alice-{i}"))
                .await?
                .execute("true")
                .await
        })
    });
    for result in futures_util::future::join_all(calls).await {
        assert_eq!(result.unwrap().unwrap().exit_code, 0);
    }
    assert_eq!(h.containers().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exit_codes_stderr_and_the_output_cap() {
    let h = Harness::new("exec");
    let config = sandbox_host::Config {
        output_limit_bytes: 100,
        ..h.config()
    };
    let sandbox = h
        .sandbox_with(config, PolicySource::Builtin("per-user".into()))
        .await;
    let backend = sandbox.get_thread_backend("alice-1").await.unwrap();

    let r = backend.execute("exit 3").await.unwrap();
    assert_eq!(r.exit_code, 3);
    let r = backend
        .execute("echo out; echo err >&2; false")
        .await
        .unwrap();
    assert_eq!(r.exit_code, 1);
    assert!(
        r.output.contains("out\n") && r.output.contains("err\n"),
        "{r:?}"
    );
    assert!(!r.truncated);
    let r = backend.execute("nosuchcommand").await.unwrap();
    assert_eq!(r.exit_code, 127);
    assert!(r.output.contains("not found"), "{r:?}");

    let r = backend.execute("yes x | head -c 100000").await.unwrap();
    // 50 bytes of head, 50 of tail, the marker between them.
    let marker = "\n[... 99900 bytes truncated ...]\n";
    assert_eq!(
        r.output,
        format!("{}{marker}{}", "x\n".repeat(25), "x\n".repeat(25))
    );
    assert!(r.truncated);
    assert_eq!(r.exit_code, 0);
    let r = backend.execute("printf '%100s' ''").await.unwrap();
    assert_eq!(
        (r.output.len(), r.truncated),
        (100, false),
        "exactly at the cap is not truncated"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_container_is_hardened_and_runs_as_the_workspace_owner() {
    let h = Harness::new("harden");
    let sandbox = h.sandbox().await;
    let backend = sandbox.get_thread_backend("alice-1").await.unwrap();
    let r = backend
        .execute("id -u; touch w && echo writable")
        .await
        .unwrap();
    let uid = sandbox.config().sandbox_user().uid;
    assert_eq!(r.output, format!("{uid}\nwritable\n"));
    assert_ne!(uid, 0, "never root in the container when the host is root");

    let c = backend.ensure_container().await.unwrap();
    let inspect = docker(&["inspect", &c.id]);
    let json: serde_json::Value = serde_json::from_str(&inspect).unwrap();
    let hc = &json[0]["HostConfig"];
    assert_eq!(hc["CapDrop"], serde_json::json!(["ALL"]));
    // The agent alone keeps these, as pid 1 (no tini); the command above
    // ran with none (tests/agent_reach.rs).
    assert_eq!(
        hc["CapAdd"],
        serde_json::json!(["SETUID", "SETGID", "KILL"])
    );
    assert_eq!(hc["SecurityOpt"], serde_json::json!(["no-new-privileges"]));
    assert_eq!(hc["NetworkMode"], "none");
    assert_eq!(hc["Init"], false);
    assert!(hc["PidsLimit"].as_i64().unwrap() > 0);
    assert!(hc["Memory"].as_i64().unwrap() > 0);
    assert!(hc["NanoCpus"].as_i64().unwrap() > 0);
    let binds: Vec<&str> = hc["Binds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b.as_str().unwrap())
        .collect();
    // The workspace, read-write, the host's agent, read-only, the user's
    // own artifact directories (deepagents offloads large results there),
    // and the container's plane directory, read-only (not under gVisor):
    // nothing else.
    let mut binds = binds;
    if support::test_runtime().is_none_or(|r| !r.contains("runsc")) {
        let plane = binds.pop().unwrap();
        assert!(plane.ends_with(":/.sandbox/plane:ro"), "{plane}");
        assert!(plane.starts_with(&format!("{}/.sandbox/plane/", h.root.path().display())));
    }
    assert_eq!(binds.len(), 5, "{binds:?}");
    assert!(binds[0].ends_with("/alice:/workspace:rw"), "{binds:?}");
    let agent = binds[1];
    assert!(agent.ends_with(":/.sandbox/agent:ro"), "{agent}");
    assert!(agent.starts_with(&format!("{}/.sandbox/", h.root.path().display())));
    let artifacts = h.root.path().join(".artifacts").join("alice");
    for dir in ["large_tool_results", "conversation_history", "blobs"] {
        let bind = format!("{}:/{dir}:rw", artifacts.join(dir).display());
        assert!(binds[2..].contains(&bind.as_str()), "{bind} in {binds:?}");
    }
    assert!(!inspect.contains("docker.sock"));
    // Root is the agent's; every command is given away to the sandbox user.
    assert_eq!(json[0]["Config"]["User"], "0:0");
    let cmd = json[0]["Config"]["Cmd"].to_string();
    let user = format!("{uid}:{}", sandbox.config().sandbox_user().gid);
    assert!(cmd.contains(&format!("\"--user\",\"{user}\"")), "{cmd}");
    assert_eq!(
        json[0]["Config"]["Labels"]["sandbox.namespace"],
        h.namespace.as_str()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn invalid_thread_ids_get_a_typed_error_and_create_nothing() {
    let h = Harness::new("ids");
    let sandbox = h.sandbox().await;
    for bad in [
        "", "-", "-x", "x-", "..-1", "a/b-1", "Alice-1", "a b-1", "a\0-1", "%2e%2e-1",
    ] {
        let err = sandbox.get_thread_backend(bad).await.unwrap_err();
        assert!(
            matches!(err, SandboxError::InvalidId(_)),
            "{bad:?}: {err:?}"
        );
        let err = sandbox.destroy_thread_backend(bad).await.unwrap_err();
        assert!(
            matches!(err, SandboxError::InvalidId(_)),
            "{bad:?}: {err:?}"
        );
    }
    assert!(h.containers().is_empty());
    assert_eq!(
        std::fs::read_dir(h.root.path())
            .unwrap()
            .flatten()
            .filter(|e| e.file_name() != ".sandbox")
            .count(),
        0,
        "no workspace created"
    );
    // The host still serves valid ids afterwards.
    let ok = sandbox.get_thread_backend("alice-1").await.unwrap();
    assert_eq!(ok.execute("echo fine").await.unwrap().output, "fine\n");
}

//! The in-container exec agent against the real engine: executes skip
//! `docker exec` with unchanged semantics, a killed agent falls back and
//! comes back, forged or garbled replies only touch their own sandbox, two
//! host processes attached at once never interleave their requests, and
//! containers of an older host or an agent of another protocol version run
//! through `docker exec` at once.

mod support;

use std::time::{Duration, Instant};

use sandbox_agent::protocol::PROTOCOL_VERSION;
use sandbox_host::exec::{ExecOptions, StreamKind};
use sandbox_host::{Backend, PolicySource};
use sha2::Digest;
use support::{docker, Harness};

fn container_of(h: &Harness, user: &str) -> String {
    h.container_of(user)
}

/// `user`'s container replaced as an older host made it (see
/// [`Harness::replace_as_older_host`]), but for its main command `cmd`.
fn recreate(h: &Harness, user: &str, agent_label: &str, cmd: &[&str]) -> String {
    h.replace_as_older_host(user, agent_label, cmd)
}

/// Runs `command` until it goes through the agent again (a fallback or a
/// restart is brief), within `patience`.
async fn until_via_agent(b: &Backend, patience: Duration) {
    let give_up = Instant::now() + patience;
    loop {
        let r = b.execute("true").await.unwrap();
        if r.via_agent {
            return;
        }
        assert!(
            Instant::now() < give_up,
            "executes still go through docker exec"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn executes_go_through_the_agent_with_unchanged_semantics() {
    let h = Harness::new("xagent");
    let sandbox = h.sandbox().await;
    let b = sandbox.get_thread_backend("alice-1").await.unwrap();

    let r = b
        .execute("echo out; echo err >&2; id -u; exit 3")
        .await
        .unwrap();
    assert!(r.via_agent, "{r:?}");
    assert_eq!(r.exit_code, 3);
    assert_eq!(r.stdout, "out\n1000\n");
    assert_eq!(r.stderr, "err\n");

    // The container: the agent is the main process, nothing is logged, and
    // no path of the host is mounted but the workspace, the agent (ro), the
    // plane directory (ro; not under gVisor) and the user's artifact
    // directories (deepagents' offloads).
    let id = container_of(&h, "alice");
    let inspected = docker(&[
        "inspect",
        "--format",
        "{{.HostConfig.LogConfig.Type}}|{{json .Config.Cmd}}|{{.Config.OpenStdin}}|{{range .Mounts}}{{.Destination}}:{{.RW}} {{end}}",
        &id,
    ]);
    let fields: Vec<&str> = inspected.trim().split('|').collect();
    assert_eq!(fields[0], "none");
    assert_eq!(
        fields[1],
        r#"["/.sandbox/agent","init","--user","1000:1000"]"#
    );
    assert_eq!(fields[2], "true");
    let mut mounts: Vec<&str> = fields[3].split_whitespace().collect();
    mounts.sort();
    let plane = support::test_runtime().is_none_or(|r| !r.contains("runsc"));
    if plane {
        let at = mounts.iter().position(|m| *m == "/.sandbox/plane:false");
        assert!(at.is_some(), "{mounts:?}");
        mounts.remove(at.unwrap());
    }
    assert_eq!(
        mounts,
        [
            "/.sandbox/agent:false",
            "/blobs:true",
            "/conversation_history:true",
            "/large_tool_results:true",
            "/workspace:true"
        ]
    );

    // `serve` forks the command itself: it inherits nothing of serve's (the
    // link, plane sockets, its files) but its own stdio, with or without
    // stdin, on a fresh thread of serve's or a kept one.
    for stdin in [None, Some(b"in".to_vec()), None] {
        let r = b
            .execute_with(
                // The shell's fds, seen by a child (`; true`: the shell
                // cannot exec it in its place; no pipeline, whose pipes
                // the shell would hold).
                "ls /proc/$$/fd; true",
                ExecOptions {
                    stdin,
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        assert!(r.via_agent);
        let mut fds: Vec<u32> = r
            .stdout
            .split_whitespace()
            .map(|fd| fd.parse().unwrap())
            .collect();
        fds.sort();
        assert_eq!(fds, [0, 1, 2], "the command's fds: {r:?}");
    }

    // env, workdir, stdin (binary), the cap, streaming.
    let options = ExecOptions {
        env: vec![("GREETING".into(), "a b".into())],
        workdir: Some("sub/dir".into()),
        stdin: Some(b"\x00\xffpiped".to_vec()),
        ..Default::default()
    };
    let r = b
        .execute_with("echo \"$GREETING\" >&2; pwd >&2; cat", options)
        .await
        .unwrap();
    assert!(r.via_agent);
    assert_eq!(r.stdout_bytes, b"\x00\xffpiped");
    assert_eq!(r.stderr, "a b\n/workspace/sub/dir\n");
    let r = b.execute("head -c 3000000 /dev/zero").await.unwrap();
    assert!(r.via_agent && r.truncated, "{:?}", r.exit_code);
    let mut chunks = Vec::new();
    let r = b
        .execute_streaming(
            "for i in 1 2 3; do echo $i; sleep 0.2; done",
            ExecOptions::default(),
            |kind, bytes| chunks.push((kind, bytes.to_vec(), Instant::now())),
        )
        .await
        .unwrap();
    assert!(r.via_agent);
    assert_eq!(r.stdout, "1\n2\n3\n");
    assert!(chunks.len() >= 3, "{chunks:?}");
    assert!(chunks.iter().all(|(k, _, _)| *k == StreamKind::Stdout));
    assert!(
        chunks.last().unwrap().2 - chunks[0].2 >= Duration::from_millis(300),
        "output arrived live"
    );

    // The timeout ends the whole tree, escaped processes included.
    let start = Instant::now();
    let r = b
        .execute_with(
            "echo up; (env -i sh -c 'sleep 771' &); (setsid sleep 772 &); sleep 773",
            ExecOptions {
                timeout: Some(Duration::from_secs(1)),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert!(r.via_agent && r.timed_out, "{r:?}");
    assert_eq!((r.exit_code, r.output.as_str()), (124, "up\n"));
    assert!(start.elapsed() < Duration::from_secs(4));
    let ps = b.execute("ps -o args").await.unwrap().output;
    assert!(!ps.contains("sleep 77"), "leftovers: {ps}");

    // A cancel by id kills it too.
    let runner = b.clone();
    let running = tokio::spawn(async move {
        runner
            .execute_with(
                "sleep 30",
                ExecOptions {
                    execution_id: Some("agent-cancel-1".into()),
                    ..Default::default()
                },
            )
            .await
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(sandbox.cancel("alice-1", "agent-cancel-1").unwrap());
    let r = running.await.unwrap().unwrap();
    assert_eq!(r.exit_code, 130);
    // The kill runs as the call is dropped, through the agent: at once.
    let give_up = Instant::now() + Duration::from_secs(2);
    loop {
        let ps = b.execute("ps -o args").await.unwrap().output;
        if !ps.contains("sleep 30") {
            break;
        }
        assert!(Instant::now() < give_up, "leftovers: {ps}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_the_agent_mid_command_falls_back_and_the_agent_comes_back() {
    let h = Harness::new("xkill");
    let sandbox = h.sandbox().await;
    let b = sandbox.get_thread_backend("alice-1").await.unwrap();
    assert!(b.execute("true").await.unwrap().via_agent);
    let id = container_of(&h, "alice");

    let runner = b.clone();
    let running =
        tokio::spawn(async move { runner.execute("echo started; sleep 3; echo done").await });
    tokio::time::sleep(Duration::from_millis(700)).await;
    // The workload's own user cannot end the agent's serve process...
    // (had it, the call carrying the attempt would be lost with it).
    let refused = b
        .execute("/.sandbox/agent respawn; kill -9 1; echo tried")
        .await
        .unwrap();
    assert!(
        refused.via_agent && refused.stdout == "tried\n",
        "{refused:?}"
    );
    // ...but serve may still die (a bug, the OOM killer): as root here.
    docker(&["exec", "-u", "0:0", &id, "/.sandbox/agent", "respawn"]);
    let err = running.await.unwrap().unwrap_err().to_string();
    assert!(
        err.contains("agent restarted") || err.contains("result was lost"),
        "{err}"
    );
    // The container lives on; the next command runs at once, by either path.
    assert_eq!(h.state(&id), "running");
    let r = b.execute("echo next").await.unwrap();
    assert_eq!((r.exit_code, r.output.as_str()), (0, "next\n"));
    // The lost call's processes are gone.
    let ps = b.execute("ps -o args").await.unwrap().output;
    assert!(!ps.contains("sleep 3"), "leftovers: {ps}");
    // And the agent answers again.
    until_via_agent(&b, Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stalled_agent_means_docker_exec_until_the_host_restarts_it() {
    let h = Harness::new("xstall");
    let sandbox = h.sandbox().await;
    let b = sandbox.get_thread_backend("alice-1").await.unwrap();
    assert!(b.execute("true").await.unwrap().via_agent);
    let id = container_of(&h, "alice");
    // Stop serve (SIGSTOP; the workload cannot, a fault of the agent's own
    // could leave it as stuck): it reads nothing more.
    let serve = support::root_sh(
        &id,
        "for p in /proc/[0-9]*; do tr '\\0' ' ' < $p/cmdline 2>/dev/null | grep -q '^/.sandbox/agent serve' && echo ${p#/proc/}; done; true",
    );
    let serve = serve.trim().to_owned();
    assert!(!serve.is_empty());
    let refused = b
        .execute(&format!("kill -STOP {serve}; echo rc=$?"))
        .await
        .unwrap();
    assert!(
        refused.output.contains("rc=1"),
        "the workload stopped its agent: {refused:?}"
    );
    docker(&["exec", "-u", "0:0", &id, "kill", "-STOP", &serve]);
    // The call in the stalled agent's way is lost (it may have been read),
    // reported and never run twice; the calls after it go through docker exec.
    let first = b.execute("echo one").await;
    assert!(first.is_err(), "{first:?}");
    let r = b.execute("echo two").await.unwrap();
    assert_eq!(r.output, "two\n");
    assert!(!r.via_agent);
    // Left stopped: after two unanswered pings the host restarts serve
    // itself (init starts a fresh one), and executes go through it again.
    until_via_agent(&b, Duration::from_secs(40)).await;
    let ps = b.execute("ps -o pid,args").await.unwrap().output;
    assert!(
        !ps.lines()
            .any(|l| l.trim_start().starts_with(&format!("{serve} "))),
        "the stalled serve is gone: {ps}"
    );
    // The lost call was read late by the new serve, past its start-by
    // time: refused, so it never ran after being reported lost.
    let r = b.execute("ls /tmp; ps -o args").await.unwrap();
    assert!(!r.output.contains("echo one"), "{}", r.output);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn forged_or_garbled_replies_only_touch_their_own_sandbox() {
    let h = Harness::new("xforge");
    let sandbox = h.sandbox().await;
    let mallory = sandbox.get_thread_backend("mallory-1").await.unwrap();
    let bob = sandbox.get_thread_backend("bob-1").await.unwrap();
    assert!(mallory.execute("true").await.unwrap().via_agent);
    assert!(bob.execute("true").await.unwrap().via_agent);

    // Bob works all along.
    let bobs = bob.clone();
    let steady = tokio::spawn(async move {
        let mut n = 0;
        let until = Instant::now() + Duration::from_secs(3);
        while Instant::now() < until {
            let r = bobs.execute("echo bob").await.unwrap();
            assert_eq!((r.exit_code, r.output.as_str()), (0, "bob\n"));
            assert!(r.via_agent);
            n += 1;
        }
        n
    });

    let find_serve = "for p in /proc/[0-9]*; do tr '\\0' ' ' < $p/cmdline 2>/dev/null \
                      | grep -q '^/.sandbox/agent serve' && s=${p#/proc/}; done; ";
    // The workload cannot write into its agent's stdout at all.
    let r = mallory
        .execute(&format!(
            "{find_serve} printf 'exit zzzzzzzz-1 0\\n' > /proc/$s/fd/1; echo rc=$?"
        ))
        .await
        .unwrap();
    assert!(
        r.output.contains("rc=1") && r.stderr.contains("denied"),
        "{r:?}"
    );
    // A faulty agent still could: root writes what a broken one might.
    let mallory_id = container_of(&h, "mallory");
    let as_agent = |text: &str| {
        support::root_sh(
            &mallory_id,
            &format!("{find_serve} printf '{text}' > /proc/$s/fd/1"),
        );
    };
    // Well-formed replies for calls that are not in flight change nothing.
    as_agent(&format!(
        "exit zzzzzzzz-1 0\\nout zzzzzzzz-1 AAAA\\nhello forged {PROTOCOL_VERSION}\\n"
    ));
    let r = mallory.execute("echo fine").await;
    match &r {
        // A forged hello reads as a restart.
        Err(e) => assert!(e.to_string().contains("agent restarted"), "{e}"),
        Ok(r) => assert_eq!(r.output, "fine\n"),
    }
    // A hello of another version closes the link as a skewed agent's would;
    // the next link pings afresh.
    as_agent("hello forged\\n");
    let _ = mallory.execute("echo fine").await;
    until_via_agent(&mallory, Duration::from_secs(10)).await;
    // Garbage closes mallory's link; the next calls reopen it.
    as_agent("\\033[2J garbage\\n");
    let _ = mallory.execute("echo fine").await;
    // Mallory's next commands run, and soon through the agent again.
    let r = mallory.execute("echo fine").await.unwrap();
    assert_eq!(r.output, "fine\n");
    until_via_agent(&mallory, Duration::from_secs(10)).await;

    let n = steady.await.unwrap();
    assert!(n >= 10, "bob ran {n} commands in 3 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_host_processes_attached_at_once_never_interleave_their_requests() {
    // Two Sandbox objects, each with its own engine client and attach
    // connection, as two host processes on one machine have; they share the
    // state directory (the lock files), as such processes do.
    let h = Harness::new("xmux");
    let one = h.sandbox().await;
    let two = h
        .sandbox_with(h.config(), PolicySource::Builtin("per-user".into()))
        .await;
    let a = one.get_thread_backend("alice-1").await.unwrap();
    let b = two.get_thread_backend("alice-2").await.unwrap();
    assert!(a.execute("true").await.unwrap().via_agent);
    assert!(b.execute("true").await.unwrap().via_agent);

    // Frames of ~600 KiB: the engine copies stdin in 32 KiB reads, so
    // unlocked writers would interleave inside them.
    let mut calls = Vec::new();
    for n in 0..16u32 {
        let backend = if n % 2 == 0 { a.clone() } else { b.clone() };
        calls.push(tokio::spawn(async move {
            let data: Vec<u8> = (0..450_000u32)
                .map(|i| (i.wrapping_mul(2654435761).wrapping_add(n) >> 13) as u8)
                .collect();
            let want = format!("{:x}", sha2::Sha256::digest(&data));
            let r = backend
                .execute_with(
                    "sha256sum",
                    ExecOptions {
                        stdin: Some(data),
                        ..Default::default()
                    },
                )
                .await
                .unwrap();
            (
                r.via_agent,
                r.output.split_whitespace().next() == Some(want.as_str()),
            )
        }));
    }
    for call in calls {
        let (via_agent, intact) = call.await.unwrap();
        assert!(intact, "a request arrived garbled");
        assert!(
            via_agent,
            "a request was refused by the agent and fell back"
        );
    }
}

/// A container labelled with this host's version whose agent answers in
/// another one (the old pong without a version, or a newer version's):
/// refused at its first pong, so executes go through `docker exec` at once,
/// never after an acknowledgement timeout, and keep doing so without
/// attaching again for each (nor counting it as a failure: the longest rest).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_agent_of_another_protocol_version_means_docker_exec_at_once() {
    let h = Harness::new("xskew");
    let users = [
        // The pong of the agents before versions.
        ("alice", "pong $n oldboot 1800000000000"),
        // A newer version's, with a field this host does not know.
        ("bob", "pong $n newboot 1800000000000 999 more"),
    ];
    {
        let sandbox = h.sandbox().await;
        for (user, _) in users {
            let b = sandbox
                .get_thread_backend(&format!("{user}-1"))
                .await
                .unwrap();
            assert!(b.execute("true").await.unwrap().via_agent);
        }
    }
    let mut ids = Vec::new();
    for (user, pong) in users {
        // Answers each ping, and counts them.
        let answer = format!(
            "while read -r verb n rest; do [ \"$verb\" = ping ] && echo . >> /tmp/pings && echo \"{pong}\"; done; sleep 1000"
        );
        let label = format!("serve-v{PROTOCOL_VERSION}");
        ids.push(recreate(&h, user, &label, &["sh", "-c", &answer]));
    }
    let sandbox = h.sandbox().await;
    let mut backends = Vec::new();
    for (user, _) in users {
        let b = sandbox
            .get_thread_backend(&format!("{user}-1"))
            .await
            .unwrap();
        backends.push((user, b));
    }
    let run = |b: Backend, user: &'static str| async move {
        let start = Instant::now();
        let r = b.execute("echo hi").await.unwrap();
        assert!(!r.via_agent, "{user}: {r:?}");
        assert_eq!((r.exit_code, r.output.as_str()), (0, "hi\n"), "{user}");
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "{user}: fell back after {:?}",
            start.elapsed()
        );
    };
    for (user, b) in &backends {
        for _ in 0..3 {
            run(b.clone(), user).await;
        }
    }
    // Past the rest of a first failure (2 s): still no new attach.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    for (user, b) in &backends {
        run(b.clone(), user).await;
    }
    for id in &ids {
        let pings = docker(&["exec", id, "cat", "/tmp/pings"]);
        assert_eq!(pings.lines().count(), 1, "one ping told the version");
    }
}

//! The agent-facing surface against the real engine: timeouts that kill,
//! bounded output under a flood, options, live streaming, idle and capacity.
//! (File transfer is in `files.rs`: its 50 MB buffers would blur the RSS
//! measurement of the flood test if they shared a process.)

mod support;

use std::time::{Duration, Instant};

use sandbox_host::exec::{ExecOptions, StreamKind};
use sandbox_host::SandboxError;
use support::Harness;

fn timeout(secs: f64) -> ExecOptions {
    ExecOptions {
        timeout: Some(Duration::from_secs_f64(secs)),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_timeout_kills_the_whole_process_tree_and_keeps_the_output() {
    let h = Harness::new("timeout");
    let sandbox = h.sandbox().await;
    let b = sandbox.get_thread_backend("alice-1").await.unwrap();

    let start = Instant::now();
    let r = b
        .execute_with("echo before; sleep 1000 & sleep 1000", timeout(1.0))
        .await
        .unwrap();
    let took = start.elapsed();
    assert!(r.timed_out, "{r:?}");
    assert_eq!(r.exit_code, 124);
    assert_eq!(r.output, "before\n");
    assert!(took < Duration::from_secs(4), "took {took:?}");

    let ps = b.execute("ps -o args").await.unwrap().output;
    assert!(!ps.contains("sleep 1000"), "leftovers: {ps}");

    // A fork loop dies too (stopped before killed, so it cannot outrun us):
    // at its timeout, or when its shell, out of pids, exits and the jobs
    // still holding its output are killed.
    let r = b
        .execute_with("while true; do sleep 100 & done", timeout(1.0))
        .await
        .unwrap();
    assert!(
        r.timed_out || r.background_killed > 0,
        "{} {:?} {}",
        r.exit_code,
        r.reason,
        r.background_killed
    );
    let ps = b.execute("ps -o args").await.unwrap().output;
    assert!(!ps.contains("sleep 100"), "leftovers: {ps}");
    assert_eq!(b.execute("echo usable").await.unwrap().output, "usable\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_timeout_kills_processes_that_cleared_the_marker_double_forked_or_setsid() {
    // The bug: `(env -i sh -c "sleep 777" &)` survived the timeout kill,
    // which found a call's processes by an environment marker.
    let h = Harness::new("escape");
    let sandbox = h.sandbox().await;
    let b = sandbox.get_thread_backend("alice-1").await.unwrap();
    let bystander = sandbox.get_thread_backend("alice-2").await.unwrap();
    let other = tokio::spawn(async move {
        bystander
            .execute_with("sleep 4; echo survived", timeout(30.0))
            .await
    });
    let start = Instant::now();
    let r = b
        .execute_with(
            "echo up; (env -i sh -c 'sleep 777' &); (setsid sleep 778 &); \
             sh -c '(sleep 779 &) ; true'; exec env -i sleep 780",
            timeout(1.0),
        )
        .await
        .unwrap();
    assert!(r.timed_out, "{r:?}");
    assert_eq!((r.exit_code, r.output.as_str()), (124, "up\n"));
    assert!(
        start.elapsed() < Duration::from_secs(4),
        "{:?}",
        start.elapsed()
    );
    let ps = b.execute("ps -o args").await.unwrap().output;
    for n in 777..=780 {
        assert!(
            !ps.contains(&format!("sleep {n}")),
            "sleep {n} escaped: {ps}"
        );
    }
    assert_eq!(other.await.unwrap().unwrap().output, "survived\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_timeout_only_kills_its_own_call() {
    let h = Harness::new("ownkill");
    let sandbox = h.sandbox().await;
    let t1 = sandbox.get_thread_backend("alice-1").await.unwrap();
    let t2 = sandbox.get_thread_backend("alice-2").await.unwrap();
    let long = tokio::spawn(async move {
        t2.execute_with("sleep 3; echo survived", timeout(30.0))
            .await
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let r = t1.execute_with("sleep 1000", timeout(1.0)).await.unwrap();
    assert!(r.timed_out);
    let other = long.await.unwrap().unwrap();
    assert_eq!(
        other.output, "survived\n",
        "the other thread's command in the same container lives"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn environment_working_directory_and_stdin() {
    let h = Harness::new("options");
    let sandbox = h.sandbox().await;
    let b = sandbox.get_thread_backend("alice-1").await.unwrap();
    b.execute("mkdir -p sub/dir").await.unwrap();
    let r = b
        .execute_with(
            "echo \"$GREETING\"; pwd; cat",
            ExecOptions {
                env: vec![("GREETING".into(), "hello world".into())],
                workdir: Some("sub/dir".into()),
                stdin: Some(b"from stdin".to_vec()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(r.output, "hello world\n/workspace/sub/dir\nfrom stdin");
    for bad in ["../etc", "/etc", "/workspace/../root"] {
        let r = b
            .execute_with(
                "pwd",
                ExecOptions {
                    workdir: Some(bad.into()),
                    ..Default::default()
                },
            )
            .await;
        assert!(matches!(r, Err(SandboxError::Refused(_))), "{bad}: {r:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_200_mb_flood_keeps_head_and_tail_and_host_memory_bounded() {
    let h = Harness::new("flood");
    let sandbox = h.sandbox().await;
    let b = sandbox.get_thread_backend("alice-1").await.unwrap();
    let before = rss_kib();
    let r = b
        .execute("echo FIRST; head -c 200000000 /dev/zero | tr '\\0' x; echo; echo LAST")
        .await
        .unwrap();
    let grown = rss_kib().saturating_sub(before);
    assert!(r.truncated);
    assert_eq!(r.exit_code, 0);
    assert!(r.output.starts_with("FIRST\nxxx"), "{}", &r.output[..20]);
    assert!(r.output.ends_with("xxx\nLAST\n"));
    assert!(r.output.contains("bytes truncated ...]"));
    assert!(r.output.len() < sandbox.config().output_limit_bytes + 100);
    // stdout alone is cut the same way; stderr, kept apart, is whole.
    assert!(r.stdout.starts_with("FIRST\nxxx") && r.stdout.ends_with("xxx\nLAST\n"));
    assert!(r.stdout_bytes.len() < sandbox.config().output_limit_bytes + 100);
    assert_eq!(r.stderr, "");
    assert!(
        grown < 64 * 1024,
        "host RSS grew {grown} KiB for a 200 MB flood"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn output_is_streamed_as_it_arrives() {
    let h = Harness::new("stream");
    let sandbox = h.sandbox().await;
    let b = sandbox.get_thread_backend("alice-1").await.unwrap();
    let start = Instant::now();
    let mut arrivals = Vec::new();
    let r = b
        .execute_streaming(
            "for i in 1 2 3; do echo $i; sleep 0.4; done; echo err >&2",
            ExecOptions::default(),
            |kind, bytes| arrivals.push((start.elapsed(), kind, bytes.to_vec())),
        )
        .await
        .unwrap();
    assert_eq!(r.output, "1\n2\n3\nerr\n");
    // Bug: the streams were only available mixed; now each is kept apart.
    assert_eq!(
        (r.stdout.as_str(), r.stderr.as_str()),
        ("1\n2\n3\n", "err\n")
    );
    let lines: Vec<_> = arrivals
        .iter()
        .filter(|a| a.1 == StreamKind::Stdout)
        .collect();
    assert_eq!(lines.len(), 3, "{arrivals:?}");
    let gap = lines[2].0 - lines[0].0;
    assert!(
        gap >= Duration::from_millis(600),
        "chunks arrived together: {arrivals:?}"
    );
    assert!(arrivals
        .iter()
        .any(|a| a.1 == StreamKind::Stderr && a.2 == b"err\n"));
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap()
}

fn lifecycle_config(h: &Harness, pairs: &[(&str, &str)], interval: f64) -> sandbox_host::Config {
    sandbox_host::Config {
        policy_config: pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        maintenance_interval_secs: interval,
        ..h.config()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_idle_backend_is_removed_and_comes_back_with_its_files() {
    let h = Harness::new("idle");
    let config = lifecycle_config(&h, &[("idle_ttl_secs", "2")], 0.5);
    let sandbox = h
        .sandbox_with(
            config,
            sandbox_host::PolicySource::Builtin("per-user".into()),
        )
        .await;
    let b = sandbox.get_thread_backend("alice-1").await.unwrap();
    b.execute("echo kept > k").await.unwrap();
    assert_eq!(h.containers().len(), 1);
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert!(
        h.containers().is_empty(),
        "removed after 3 s idle: {:?}",
        h.containers()
    );
    assert_eq!(b.execute("cat k").await.unwrap().output, "kept\n");
    assert_eq!(h.containers().len(), 1, "transparently back");
    assert!(
        h.root.path().join("alice/k").exists(),
        "the workspace was never deleted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fourth_user_evicts_the_least_recently_used_at_capacity_three() {
    let h = Harness::new("lru");
    let config = lifecycle_config(&h, &[("max_containers", "3")], 0.0);
    let sandbox = h
        .sandbox_with(
            config,
            sandbox_host::PolicySource::Builtin("per-user".into()),
        )
        .await;
    for user in ["u1", "u2", "u3"] {
        let b = sandbox
            .get_thread_backend(&format!("{user}-1"))
            .await
            .unwrap();
        b.execute("true").await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // u1 used again: u2 becomes the least recently used.
    let u1 = sandbox.get_thread_backend("u1-1").await.unwrap();
    u1.execute("true").await.unwrap();
    let u4 = sandbox.get_thread_backend("u4-1").await.unwrap();
    u4.execute("true").await.unwrap();
    let names: Vec<String> = h.containers().into_iter().map(|c| c.0).collect();
    let ns = &h.namespace;
    assert_eq!(
        names,
        [
            format!("sandbox.{ns}.u1"),
            format!("sandbox.{ns}.u3"),
            format!("sandbox.{ns}.u4")
        ]
    );
    // The evicted user comes back on demand (evicting the next LRU).
    let u2 = sandbox.get_thread_backend("u2-1").await.unwrap();
    assert_eq!(u2.execute("echo back").await.unwrap().output, "back\n");
    assert_eq!(h.containers().len(), 3);
}

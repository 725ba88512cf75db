//! The agent-facing surface against the real engine: timeouts that kill,
//! bounded output under a flood, options, live streaming.

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

    // A fork loop dies too (stopped before killed, so it cannot outrun us).
    let r = b
        .execute_with("while true; do sleep 100 & done", timeout(1.0))
        .await
        .unwrap();
    assert!(r.timed_out);
    let ps = b.execute("ps -o args").await.unwrap().output;
    assert!(!ps.contains("sleep 100"), "leftovers: {ps}");
    assert_eq!(b.execute("echo usable").await.unwrap().output, "usable\n");
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

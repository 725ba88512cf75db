//! How a command ends, against the real engine, as an agent meets it: a
//! background job never holds the call, and a command the out-of-memory
//! killer ended says so (the agent is never the one it picks).

mod support;

use std::time::{Duration, Instant};

use sandbox_host::config::Limits;
use sandbox_host::exec::EndReason;
use sandbox_host::{Config, ExecOptions, PolicySource};
use support::Harness;

fn within(secs: u64) -> ExecOptions {
    ExecOptions {
        timeout: Some(Duration::from_secs(secs)),
        ..ExecOptions::default()
    }
}

/// Bug: `(echo hello | nc -l -p 7000 &)` held the execute until its
/// timeout (300 s by default): the job kept the output open. The call now
/// returns when the command exits; a job still holding the output is
/// killed and said so, one that detached its output runs on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_background_job_never_holds_an_execute() {
    let h = Harness::new("bg");
    let sandbox = h.sandbox().await;
    let b = sandbox.get_thread_backend("alice-1").await.unwrap();
    b.execute("true").await.unwrap();

    let start = Instant::now();
    let r = b
        .execute_with("sleep 301 & echo started", within(60))
        .await
        .unwrap();
    let took = start.elapsed();
    assert!(r.via_agent, "through the agent");
    assert_eq!((r.exit_code, r.stdout.as_str()), (0, "started\n"), "{r:?}");
    assert_eq!(r.background_killed, 1, "{r:?}");
    assert!(
        r.stderr.contains("background process") && r.stderr.contains(">/tmp/cmd.log 2>&1 &"),
        "the note says what happened and what to do: {:?}",
        r.stderr
    );
    assert!(took < Duration::from_secs(5), "returned in {took:?}");

    let r = b
        .execute_with("sleep 302 >/dev/null 2>&1 & echo detached", within(60))
        .await
        .unwrap();
    assert_eq!((r.stdout.as_str(), r.background_killed), ("detached\n", 0));
    let r = b
        .execute("ps -o args | grep -c '^sleep 30[12]'")
        .await
        .unwrap();
    assert_eq!(
        r.stdout.trim(),
        "1",
        "the detached job runs on, the holder is gone: {r:?}"
    );
}

/// Bug: 700 MB in a 512 MiB sandbox ended as a bare 137, nothing said.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn out_of_memory_is_said_and_the_agent_survives_it() {
    let h = Harness::new("oom");
    let config = Config {
        image: support::python_image(),
        limits: Limits {
            memory_bytes: 128 << 20,
            ..Config::default().limits
        },
        ..h.config()
    };
    let sandbox = h
        .sandbox_with(config, PolicySource::Builtin("per-user".into()))
        .await;
    let b = sandbox.get_thread_backend("alice-1").await.unwrap();
    b.execute("true").await.unwrap();
    let r = b
        .execute_with(
            "python3 -c 'b = bytearray(400 << 20); print(len(b))'",
            within(60),
        )
        .await
        .unwrap();
    assert_eq!(r.exit_code, 137, "{r:?}");
    assert_eq!(r.reason, Some(EndReason::OutOfMemory), "{r:?}");
    assert!(r.stderr.contains("out of memory"), "{:?}", r.stderr);
    let json = serde_json::to_value(&r).unwrap();
    assert_eq!(json["reason"], "oom");

    let after = b.execute("cat /proc/self/oom_score_adj").await.unwrap();
    assert!(after.via_agent, "the agent still serves: {after:?}");
    assert_eq!(
        after.stdout.trim(),
        "1000",
        "the workload is the OOM killer's first pick"
    );
}

/// Bug (deepagents 0.7): large tool results go to `/large_tool_results`,
/// offloaded history to `/conversation_history`; the sandbox user cannot
/// create directories at `/`, so a 1 MiB result stayed in the conversation.
/// Each is a per-user directory of the host: writable under a read-only
/// root, outside the workspace, kept when the container is recreated.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn agent_artifact_directories_are_writable_and_outlive_the_container() {
    let h = Harness::new("artifacts");
    let config = Config {
        read_only_rootfs: true,
        ..h.config()
    };
    let sandbox = h
        .sandbox_with(config, PolicySource::Builtin("per-user".into()))
        .await;
    let b = sandbox.get_thread_backend("alice-1").await.unwrap();
    let r = b
        .execute(
            "echo result > /large_tool_results/call-1 && echo history > /conversation_history/s.md \
             && mkdir -p /blobs/x && ls /workspace | wc -l",
        )
        .await
        .unwrap();
    assert_eq!((r.exit_code, r.stdout.trim()), (0, "0"), "{r:?}");
    let host = h
        .root
        .path()
        .join(".artifacts/alice/large_tool_results/call-1");
    assert_eq!(std::fs::read_to_string(&host).unwrap(), "result\n");
    assert!(sandbox.destroy_user_backend("alice").await.unwrap());
    let r = b
        .execute("cat /large_tool_results/call-1 /conversation_history/s.md")
        .await
        .unwrap();
    assert_eq!(
        r.stdout, "result\nhistory\n",
        "kept across the new container: {r:?}"
    );
    // Another user's are apart.
    let bob = sandbox.get_thread_backend("bob-1").await.unwrap();
    let r = bob.execute("ls /large_tool_results | wc -l").await.unwrap();
    assert_eq!(r.stdout.trim(), "0");
}

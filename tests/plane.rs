//! The plane (issue 28), against the real engine: warm calls reach each
//! sandbox's agent on a socket of the host's, with no engine in between;
//! the workload can neither reach nor replace that socket; and when the
//! plane breaks mid-command, that command is lost (never run twice), its
//! processes are killed, and the next one goes through the engine's attach
//! stream until the plane is back.
//!
//! Not under gVisor (`SANDBOX_TEST_RUNTIME=runsc`): it refuses host
//! sockets, so its sandboxes get no plane and every link is attached (the
//! exec-agent suite covers that).

mod support;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sandbox_host::files::Upload;
use sandbox_host::processes::ProcessOptions;
use sandbox_host::Backend;
use support::{docker, Harness};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn gvisor() -> bool {
    support::test_runtime().is_some_and(|r| r.contains("runsc"))
}

/// Now, as the engine's `--since` / `--until` take it.
fn engine_now() -> String {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    format!("{}.{:09}", now.as_secs(), now.subsec_nanos())
}

/// The engine's events for `container` between two [`engine_now`]s.
fn events_between(container: &str, since: &str, until: &str) -> Vec<String> {
    docker(&[
        "events",
        "--since",
        since,
        "--until",
        until,
        "--filter",
        &format!("container={container}"),
        "--format",
        "{{.Action}}",
    ])
    .lines()
    .map(str::to_owned)
    .collect()
}

/// The host pid of the agent's `serve` in `container`.
fn serve_pid(container: &str) -> String {
    docker(&["top", container, "-eo", "pid,args"])
        .lines()
        .find(|l| l.contains("/.sandbox/agent serve"))
        .and_then(|l| l.split_whitespace().next())
        .expect("the agent's serve process")
        .to_owned()
}

async fn warm(b: &Backend) {
    let r = b.execute("true").await.unwrap();
    assert!(r.via_agent, "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn warm_calls_reach_the_agent_without_the_engine() {
    if gvisor() {
        return;
    }
    let h = Harness::new("plane");
    let sandbox = h.sandbox().await;
    let b = sandbox.get_thread_backend("alice-1").await.unwrap();
    warm(&b).await;
    let id = h.container_of("alice");
    // The first call may have inspected the container and opened the link:
    // from here on nothing of a warm call is the engine's.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let since = engine_now();
    for i in 0..20 {
        let r = b.execute(&format!("echo {i}")).await.unwrap();
        assert_eq!((r.exit_code, r.output.clone()), (0, format!("{i}\n")));
        assert!(r.via_agent);
    }
    // A file up and back down (its bytes on a pipe of their own).
    let content: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let up = b
        .upload_files(vec![Upload {
            path: "www/big.bin".into(),
            content: content.clone(),
            mode: None,
        }])
        .await
        .unwrap();
    assert_eq!(up[0].error, None);
    let down = b.download_files(&["www/big.bin".to_owned()]).await.unwrap();
    assert_eq!(down[0].content.as_deref(), Some(&content[..]));
    // A background server, and a connection to it.
    let httpd = b
        .start_process(
            "busybox httpd -f -p 127.0.0.1:8080 -h www",
            ProcessOptions::default(),
        )
        .await
        .unwrap();
    let listed = b.processes().await.unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    let mut reply = String::new();
    for _ in 0..50 {
        match b.connect_port(8080).await {
            Ok(mut conn) => {
                conn.write_all(b"GET /big.bin HTTP/1.0\r\n\r\n")
                    .await
                    .unwrap();
                let mut bytes = Vec::new();
                conn.read_to_end(&mut bytes).await.unwrap();
                reply = String::from_utf8_lossy(&bytes[..12.min(bytes.len())]).into_owned();
                assert!(bytes.ends_with(&content[content.len() - 1000..]));
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    let err = b.connect_port(9).await.err().expect("nothing on port 9");
    assert!(
        err.to_string()
            .contains("nothing accepts connections on port 9"),
        "{err}"
    );
    b.remove_process(&httpd.id.parse().unwrap()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let events = events_between(&id, &since, &engine_now());
    assert!(
        events.is_empty(),
        "warm calls went through the engine: {events:?}"
    );

    // What the workload sees of the plane: a read-only directory it cannot
    // look into, write, or replace.
    let r = b
        .execute(
            "ls /.sandbox/plane; echo ls=$?; touch /.sandbox/plane/x.sock; echo touch=$?; \
             mv /.sandbox/plane /tmp/p; echo mv=$?; grep ' /.sandbox/plane ' /proc/mounts",
        )
        .await
        .unwrap();
    assert!(r.stdout.contains("ls=1"), "{}", r.output);
    assert!(r.stdout.contains("touch=1"), "{}", r.output);
    assert!(r.stdout.contains("mv=1"), "{}", r.output);
    assert!(r.stdout.contains(" ro,"), "{}", r.output);
    assert!(r.stderr.contains("Permission denied"), "{}", r.output);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_plane_broken_mid_command_loses_that_command_once_and_the_attach_stream_takes_over() {
    if gvisor() {
        return;
    }
    let h = Harness::new("planebrk");
    let sandbox = h.sandbox().await;
    let b = sandbox.get_thread_backend("alice-1").await.unwrap();
    warm(&b).await;
    let id = h.container_of("alice");
    let dir = h.plane_dir(&id);
    assert!(dir.is_dir(), "{}", dir.display());
    let away = dir.with_extension("away");

    let runner = b.clone();
    let running = tokio::spawn(async move {
        runner
            .execute(
                // The escapee clears its environment (no marker), leaves
                // the tree (an orphan of init), the session and its
                // output: only the call's group,
                // which `kill` derives from the marker once serve is gone,
                // still finds it.
                "echo run >> /workspace/runs; \
                 (env -i setsid sh -c 'sleep 3; echo escaped >> /workspace/runs' \
                     </dev/null >/dev/null 2>&1 &); \
                 sleep 3; echo late >> /workspace/runs",
            )
            .await
    });
    tokio::time::sleep(Duration::from_millis(700)).await;
    // The plane breaks mid-command: its directory is gone from the host's
    // view (no new socket can be offered), and the agent's end of the
    // connection dies with its serve process.
    std::fs::rename(&dir, &away).unwrap();
    let broken = Instant::now();
    let killed = std::process::Command::new("kill")
        .args(["-9", &serve_pid(&id)])
        .status()
        .unwrap();
    assert!(killed.success());
    let err = running.await.unwrap().unwrap_err().to_string();
    assert!(
        err.contains("result was lost") || err.contains("agent restarted"),
        "{err}"
    );
    assert!(broken.elapsed() < Duration::from_secs(2), "noticed late");

    // The next command goes through the attach stream, at once.
    let since = engine_now();
    let started = Instant::now();
    let r = b.execute("cat /workspace/runs; ps -o args").await.unwrap();
    assert!(r.via_agent, "{r:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    // The lost command ran once, and was killed: no second run, no `late`.
    assert!(r.stdout.starts_with("run\n"), "{}", r.output);
    assert!(!r.stdout.contains("late"), "{}", r.output);
    assert!(!r.stdout.contains("escaped"), "{}", r.output);
    assert!(!r.stdout.contains("sleep 3"), "leftovers: {}", r.output);
    let events = events_between(&id, &since, &engine_now());
    assert!(events.iter().any(|e| e == "attach"), "{events:?}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let r = b.execute("cat /workspace/runs").await.unwrap();
    assert_eq!(r.stdout, "run\n", "{}", r.output);

    // The plane back: a host process opens its link there again.
    std::fs::rename(&away, &dir).unwrap();
    let again = h.sandbox().await;
    let b2 = again.get_thread_backend("alice-2").await.unwrap();
    warm(&b2).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let since = engine_now();
    for _ in 0..5 {
        assert!(b2.execute("true").await.unwrap().via_agent);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let events = events_between(&id, &since, &engine_now());
    assert!(events.is_empty(), "{events:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_paused_sandbox_is_noticed_through_the_engines_events() {
    if gvisor() {
        return;
    }
    let h = Harness::new("planepause");
    let sandbox = h.sandbox().await;
    let b = sandbox.get_thread_backend("alice-1").await.unwrap();
    warm(&b).await;
    for round in 0..3 {
        b.execute("true").await.unwrap();
        // Recovering may have made a new container.
        support::pause(&h.container_of("alice"));
        // The engine's event reaches the host within moments; the next call
        // finds the container paused and recovers it, and runs once.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let r = b
            .execute(&format!(
                "echo {round} >> /workspace/paused; cat /workspace/paused"
            ))
            .await
            .unwrap();
        let expected: String = (0..=round).map(|i| format!("{i}\n")).collect();
        assert_eq!(r.stdout, expected, "{}", r.output);
    }
}

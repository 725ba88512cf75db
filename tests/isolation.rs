//! Isolation tiers against the real engine: gVisor (`runsc`) as a runtime
//! the operator sets or a policy chooses per backend. Needs `runsc`
//! registered with the engine (`cargo test-all` does it; see the README).

mod support;

use std::time::Duration;

use sandbox_host::processes::ProcessOptions;
use support::{docker, Harness};

fn runtime_of(container: &str) -> String {
    docker(&["inspect", "--format", "{{.HostConfig.Runtime}}", container])
        .trim()
        .to_owned()
}

/// The agent, executes, timeouts, cancels, files and background processes
/// all work under gVisor, whose kernel the sandbox sees.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sandbox_under_runsc_runs_on_gvisor_and_everything_works() {
    let h = Harness::new("gvisor");
    let config = sandbox_host::Config {
        runtime: Some("runsc".into()),
        ..h.config()
    };
    let sandbox = h.sandbox_of(config).await;
    let alice = sandbox.get_thread_backend("alice-1").await.unwrap();
    let r = alice.execute("dmesg | head -1; id -u").await.unwrap();
    assert!(r.output.contains("gVisor"), "{r:?}");
    assert!(r.via_agent, "through the agent: {r:?}");
    assert_eq!(runtime_of(&h.container_of("alice")), "runsc");

    // A timeout ends the whole tree.
    let options = sandbox_host::ExecOptions {
        timeout: Some(Duration::from_millis(800)),
        ..Default::default()
    };
    let r = alice
        .execute_with("sleep 1000 & sleep 1001", options)
        .await
        .unwrap();
    assert_eq!(r.exit_code, 124, "{r:?}");
    let r = alice
        .execute("ps -o args | grep -c '^sleep 100'")
        .await
        .unwrap();
    assert_eq!(r.output.trim(), "0", "{r:?}");

    // Files both ways.
    let content: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    alice
        .upload_files(vec![sandbox_host::files::Upload {
            path: "blob.bin".into(),
            content: content.clone(),
            mode: None,
        }])
        .await
        .unwrap();
    let down = alice
        .download_files(&["blob.bin".to_owned()])
        .await
        .unwrap();
    assert_eq!(down[0].content.as_deref(), Some(&content[..]));

    // A background process and a terminal.
    let p = alice
        .start_process(
            "stty size",
            ProcessOptions {
                terminal: Some(sandbox_host::processes::TerminalSize { rows: 21, cols: 77 }),
                ..ProcessOptions::default()
            },
        )
        .await
        .unwrap();
    let id: sandbox_host::processes::ProcessId = p.id.parse().unwrap();
    let mut text = String::new();
    for _ in 0..50 {
        let out = alice
            .process_output(&id, (0, 0), Duration::from_millis(200))
            .await
            .unwrap();
        text = out
            .chunks
            .iter()
            .map(|c| String::from_utf8_lossy(&c.data).into_owned())
            .collect();
        if !out.info.running {
            assert_eq!(out.info.exit_code, Some(0), "{text}");
            break;
        }
    }
    assert!(text.contains("21 77"), "{text:?}");
}

/// The policy chooses the tier per backend: alice's profile runs on gVisor,
/// bob stays on the engine's default.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_policy_puts_alice_under_gvisor_and_bob_under_runc() {
    use sandbox_host::config::ProfileConfig;
    let h = Harness::new("tiers");
    let mut config = h.config();
    config.runtime = None;
    config.profiles.insert(
        "gvisor".into(),
        ProfileConfig {
            runtime: Some("runsc".into()),
            ..ProfileConfig::default()
        },
    );
    config
        .policy_config
        .insert("profile.gvisor".into(), "alice".into());
    let sandbox = h.sandbox_of(config).await;
    let alice = sandbox.get_thread_backend("alice-1").await.unwrap();
    let bob = sandbox.get_thread_backend("bob-1").await.unwrap();
    let a = alice.execute("dmesg 2>&1 | head -1").await.unwrap();
    let b = bob.execute("dmesg 2>&1 | head -1").await.unwrap();
    assert!(a.output.contains("gVisor"), "{a:?}");
    assert!(!b.output.contains("gVisor"), "{b:?}");
    assert_eq!(runtime_of(&h.container_of("alice")), "runsc");
    assert_eq!(runtime_of(&h.container_of("bob")), "runc");
}

/// A runtime the engine does not list is refused at start, with how to
/// register it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unregistered_runtime_is_refused_at_start() {
    let h = Harness::new("noruntime");
    let config = sandbox_host::Config {
        runtime: Some("no-such-runtime".into()),
        ..h.config()
    };
    let provider = std::sync::Arc::new(sandbox_host::DockerProvider::from_config(&config));
    let err = sandbox_host::Sandbox::with_provider(
        config,
        provider,
        sandbox_host::PolicySource::Builtin("per-user".into()),
    )
    .await
    .err()
    .expect("refused");
    let text = err.to_string();
    assert!(text.contains("\"no-such-runtime\""), "{text}");
    assert!(text.contains("kill -HUP"), "{text}");
}

/// Lazily unmounts every filesystem mounted under `root` when dropped (the
/// quota tests' workspaces), so the temporary root can go.
struct Unmount(std::path::PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let table = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let root = self.0.to_string_lossy().into_owned();
        for point in table.lines().filter_map(|l| l.split(' ').nth(4)) {
            if point.starts_with(&root) {
                let _ = std::process::Command::new("umount")
                    .args(["-l", point])
                    .status();
            }
        }
    }
}

fn free_bytes(path: &std::path::Path) -> u64 {
    let s = nix::sys::statvfs::statvfs(path).unwrap();
    s.blocks_available() as u64 * s.fragment_size() as u64
}

/// `dd` past the quota stops at it, in /workspace and in /tmp; what was
/// written before stays; the host's disk loses no more than the quota;
/// another user is unaffected; the root filesystem is read-only.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_workspace_quota_stops_writes_at_the_quota_and_spares_the_host() {
    let h = Harness::new("quota");
    let _unmount = Unmount(h.root.path().canonicalize().unwrap());
    let quota: u64 = 32 << 20;
    let config = sandbox_host::Config {
        workspace_quota: quota,
        tmp_quota: 8 << 20,
        ..h.config()
    };
    let sandbox = h.sandbox_of(config).await;
    let alice = sandbox.get_thread_backend("alice-1").await.unwrap();
    let r = alice
        .execute("echo keep-me > note.txt; ls -A")
        .await
        .unwrap();
    assert_eq!(r.output, "note.txt\n", "no lost+found, no image: {r:?}");
    let before = free_bytes(h.root.path());
    let r = alice
        .execute("dd if=/dev/zero of=big bs=1M count=100 2>&1; echo rc=$?; cat note.txt")
        .await
        .unwrap();
    assert!(r.output.contains("No space left on device"), "{r:?}");
    assert!(!r.output.contains("rc=0"), "{r:?}");
    assert!(r.output.ends_with("keep-me\n"), "{r:?}");
    let written = std::fs::metadata(h.root.path().join("alice/big"))
        .unwrap()
        .len();
    assert!(written <= quota && written > quota / 2, "{written}");
    let after = free_bytes(h.root.path());
    let dropped = before.saturating_sub(after);
    assert!(
        dropped <= quota + (2 << 20),
        "the host's disk lost {dropped} bytes for a {quota}-byte quota"
    );
    let r = alice
        .execute("dd if=/dev/zero of=/tmp/big bs=1M count=100 2>&1; echo rc=$?")
        .await
        .unwrap();
    assert!(r.output.contains("No space left on device"), "{r:?}");
    let r = alice.execute("du -k /tmp/big | cut -f1").await.unwrap();
    let tmp_kib: u64 = r.output.trim().parse().unwrap();
    assert!(tmp_kib <= 8 * 1024, "{r:?}");
    let r = alice
        .execute("touch /etc/x /home/x /var/x 2>&1; echo rc=$?")
        .await
        .unwrap();
    assert!(r.output.contains("Read-only file system"), "{r:?}");
    // Making room works again.
    let r = alice
        .execute("rm big && echo again > more.txt && cat more.txt")
        .await
        .unwrap();
    assert_eq!(r.output, "again\n", "{r:?}");
    // Bob has his own bound, untouched by alice's.
    let bob = sandbox.get_thread_backend("bob-1").await.unwrap();
    let r = bob
        .execute("dd if=/dev/zero of=f bs=1M count=4 2>&1 >/dev/null; echo rc=$?")
        .await
        .unwrap();
    assert!(r.output.contains("rc=0"), "{r:?}");
    // The images live in the state directory, not in any workspace.
    let images: Vec<String> = std::fs::read_dir(h.root.path().join(".sandbox/quota"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".img"))
                .collect()
        })
        .unwrap_or_default();
    // Each workspace and its artifact directories: four images.
    assert_eq!(images.len(), 4, "{images:?}");
    // The artifact directories (outside /workspace) are bounded too.
    let r = alice
        .execute("dd if=/dev/zero of=/blobs/big bs=1M count=100 2>&1; echo rc=$?")
        .await
        .unwrap();
    assert!(r.output.contains("No space left on device"), "{r:?}");
}

/// A workspace that held files before the quota was turned on keeps them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn turning_the_quota_on_keeps_an_existing_workspace() {
    let h = Harness::new("quotaon");
    let _unmount = Unmount(h.root.path().canonicalize().unwrap());
    {
        let sandbox = h.sandbox().await;
        let alice = sandbox.get_thread_backend("alice-1").await.unwrap();
        let r = alice
            .execute("mkdir -p src && echo fn main > src/main.rs && ln -s src link && ls -A")
            .await
            .unwrap();
        assert_eq!(r.exit_code, 0, "{r:?}");
        assert!(sandbox.destroy_user_backend("alice").await.unwrap());
    }
    let config = sandbox_host::Config {
        workspace_quota: 32 << 20,
        ..h.config()
    };
    let sandbox = h.sandbox_of(config).await;
    let alice = sandbox.get_thread_backend("alice-1").await.unwrap();
    let r = alice
        .execute("cat link/main.rs; ls -A; df -k /workspace | tail -1")
        .await
        .unwrap();
    assert!(r.output.starts_with("fn main\nlink\nsrc\n"), "{r:?}");
    let size_kib: u64 = r
        .output
        .lines()
        .last()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
        .unwrap();
    assert!(size_kib <= 32 * 1024, "{r:?}");
}

/// A container that dies during an engine exec (gVisor's sandbox can crash
/// under load) ends the call at once with the reason, not at its timeout:
/// the engine never closes such an exec's stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_call_whose_container_dies_ends_at_once() {
    let h = Harness::new("diesmid");
    // Under gVisor the engine does not close the exec's stream of a dead
    // sandbox (under runc it does).
    let config = sandbox_host::Config {
        runtime: Some("runsc".into()),
        ..h.config()
    };
    let sandbox = h.sandbox_of(config).await;
    let alice = sandbox.get_thread_backend("alice-1").await.unwrap();
    alice.execute("true").await.unwrap();
    let id = h.container_of("alice");
    let runner = alice.clone();
    let call = tokio::spawn(async move {
        // Streamed stdin: through `docker exec`, not the agent.
        let mut stdin = tokio::io::empty();
        let options = sandbox_host::ExecOptions {
            timeout: Some(Duration::from_secs(120)),
            ..Default::default()
        };
        runner
            .execute_streaming_stdin("sleep 100", options, &mut stdin, |_, _| {})
            .await
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let started = std::time::Instant::now();
    // gVisor's sandbox process dies (as when it panics): the engine then
    // never ends the exec (a plain `docker kill` would).
    let sandbox_pid = docker(&["inspect", "--format", "{{.State.Pid}}", &id]);
    let killed = std::process::Command::new("kill")
        .args(["-9", sandbox_pid.trim()])
        .status()
        .unwrap();
    assert!(killed.success());
    let result = tokio::time::timeout(Duration::from_secs(20), call)
        .await
        .expect("the call ended soon after its container died")
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(20));
    match result {
        Err(e) => assert!(e.to_string().contains("stopped"), "{e}"),
        Ok(r) => assert_ne!(r.exit_code, 0, "{r:?}"),
    }
}

//! Safe sharing of one container by many threads, against the real engine:
//! idle maintenance and destroys never kill work in flight, whichever host
//! process on the machine runs it, and idle time is the host's own record.

mod support;

use std::process::Stdio;
use std::time::{Duration, Instant};

use sandbox_host::exec::EndReason;
use sandbox_host::{Config, ExecOptions, PolicySource, Sandbox};
use support::Harness;

fn with_ttl(h: &Harness, ttl_secs: &str) -> Config {
    Config {
        policy_config: [("idle_ttl_secs".to_owned(), ttl_secs.to_owned())].into(),
        maintenance_interval_secs: 0.3,
        ..h.config()
    }
}

async fn per_user(h: &Harness, config: Config) -> Sandbox {
    h.sandbox_with(config, PolicySource::Builtin("per-user".into()))
        .await
}

/// `sandbox exec` as another host process on the same machine, with the
/// harness's namespace, workspace root and image.
fn cli_exec(h: &Harness, thread: &str, script: &str) -> tokio::process::Child {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_sandbox"))
        .env("SANDBOX_NAMESPACE", &h.namespace)
        .env("SANDBOX_WORKSPACE_ROOT", h.root.path())
        .env("SANDBOX_IMAGE", support::test_image())
        .env("SANDBOX_MAINTENANCE_INTERVAL_SECS", "0")
        .args(["exec", thread, "--", script])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start the sandbox CLI")
}

async fn wait_in_flight(sandbox: &Sandbox, n: u32) {
    let start = Instant::now();
    loop {
        let busy: u32 = sandbox
            .list()
            .await
            .unwrap()
            .iter()
            .map(|c| c.in_flight)
            .sum();
        if busy >= n {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "never saw {n} in flight"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn under_a_1s_ttl_a_long_command_finishes_then_idles_out() {
    // The bug: with idle_ttl_secs = 2, maintenance removed the container
    // while a command ran; it died after tick 3 with exit 137.
    let h = Harness::new("ttl");
    let sandbox = per_user(&h, with_ttl(&h, "1")).await;
    let b = sandbox.get_thread_backend("ttl-1").await.unwrap();
    let r = b
        .execute("for i in 1 2 3 4 5 6 7 8 9 10; do echo tick $i; sleep 1; done")
        .await
        .unwrap();
    assert_eq!(r.exit_code, 0, "{r:?}");
    assert!(r.output.ends_with("tick 10\n"), "{}", r.output);
    // Idle time counts from the end of the command: removed soon after.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(h.containers().is_empty(), "{:?}", h.containers());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_workload_that_stays_busy_in_the_background_still_idles_out() {
    // Nothing inside the container counts as use: a detached toucher of the
    // workspace must not keep its container forever.
    let h = Harness::new("toucher");
    let sandbox = per_user(&h, with_ttl(&h, "2")).await;
    let b = sandbox.get_thread_backend("bob-1").await.unwrap();
    b.execute("(while true; do touch /workspace/x; sleep 0.2; done) >/dev/null 2>&1 &")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(3800)).await;
    assert!(h.containers().is_empty(), "{:?}", h.containers());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_destroy_in_one_process_waits_for_a_command_running_in_another() {
    let h = Harness::new("drain");
    let sandbox = per_user(&h, h.config()).await;
    // Make the container, then run a command from another host process.
    sandbox
        .get_thread_backend("u-1")
        .await
        .unwrap()
        .execute("true")
        .await
        .unwrap();
    let child = cli_exec(&h, "u-1", "sleep 3; echo done");
    wait_in_flight(&sandbox, 1).await;
    let start = Instant::now();
    assert!(sandbox.destroy_thread_backend("u-2").await.unwrap());
    let waited = start.elapsed();
    let out = child.wait_with_output().await.unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "done\n");
    assert!(out.status.success(), "{out:?}");
    assert!(
        waited >= Duration::from_secs(1),
        "the destroy waited: {waited:?}"
    );
    assert!(h.containers().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn past_the_grace_period_a_destroy_goes_ahead() {
    let h = Harness::new("grace");
    let sandbox = per_user(&h, h.config()).await;
    let b = sandbox.get_thread_backend("v-1").await.unwrap();
    b.execute("true").await.unwrap();
    let running = tokio::spawn(async move { b.execute("sleep 30; echo never").await });
    wait_in_flight(&sandbox, 1).await;
    let start = Instant::now();
    sandbox
        .destroy_user_backend_within("v", Duration::from_millis(800))
        .await
        .unwrap();
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    // Never a silent break: the command says it was destroyed.
    let r = running.await.unwrap().unwrap();
    assert_eq!(r.exit_code, 137, "{r:?}");
    assert_eq!(r.reason, Some(EndReason::Destroyed), "{r:?}");
    assert!(!r.output.contains("never"), "{r:?}");
    assert!(h.containers().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cancel_by_id_kills_the_whole_tree_and_reports_cancelled() {
    let h = Harness::new("cancelid");
    let sandbox = per_user(&h, h.config()).await;
    let b = sandbox.get_thread_backend("y-1").await.unwrap();
    b.execute("true").await.unwrap();
    let options = ExecOptions {
        execution_id: Some("cancel-me-0001".into()),
        ..ExecOptions::default()
    };
    let running = {
        let b = b.clone();
        tokio::spawn(async move {
            b.execute_with("(env -i sleep 303 &); sleep 304", options)
                .await
        })
    };
    wait_in_flight(&sandbox, 1).await;
    assert!(!sandbox.cancel("y-1", "no-such-execution").unwrap());
    assert!(sandbox.cancel("y-1", "cancel-me-0001").unwrap());
    let r = running.await.unwrap().unwrap();
    assert_eq!(r.exit_code, 130, "{r:?}");
    assert_eq!(r.reason, Some(EndReason::Cancelled));
    assert_eq!(r.execution_id, "cancel-me-0001");
    sandbox.settle().await;
    let ps = b.execute("ps -o args").await.unwrap().output;
    assert!(!ps.contains("sleep 30"), "left behind: {ps}");
    assert!(
        !sandbox.cancel("y-1", "cancel-me-0001").unwrap(),
        "gone once it ended"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn in_release_mode_a_thread_destroy_keeps_the_container_for_the_others() {
    let h = Harness::new("release");
    let config = Config {
        policy_config: [("thread_destroy".to_owned(), "release".to_owned())].into(),
        ..h.config()
    };
    let sandbox = per_user(&h, config).await;
    for thread in ["r-1", "r-2"] {
        let b = sandbox.get_thread_backend(thread).await.unwrap();
        b.execute("true").await.unwrap();
    }
    assert_eq!(sandbox.list().await.unwrap()[0].threads, 2);
    assert!(!sandbox.destroy_thread_backend("r-1").await.unwrap());
    let left = sandbox.list().await.unwrap();
    assert_eq!(left.len(), 1, "kept for r-2");
    assert_eq!(left[0].threads, 1);
    assert!(sandbox.destroy_thread_backend("r-2").await.unwrap());
    assert!(h.containers().is_empty(), "the last thread took it");

    // The default mode: a thread destroy takes the user's container.
    let h = Harness::new("backendmode");
    let sandbox = per_user(&h, h.config()).await;
    for thread in ["s-1", "s-2"] {
        let b = sandbox.get_thread_backend(thread).await.unwrap();
        b.execute("true").await.unwrap();
    }
    assert!(sandbox.destroy_thread_backend("s-1").await.unwrap());
    assert!(h.containers().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn gc_dry_run_previews_the_policys_idle_removals_and_removes_nothing() {
    let h = Harness::new("preview");
    let config = Config {
        maintenance_interval_secs: 0.0,
        ..with_ttl(&h, "1")
    };
    let sandbox = per_user(&h, config).await;
    let b = sandbox.get_thread_backend("z-1").await.unwrap();
    b.execute("true").await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let plan = sandbox.gc(None, true).await.unwrap();
    assert_eq!(plan.len(), 1, "{plan:?}");
    assert!(plan[0].reason.starts_with("policy: idle"), "{plan:?}");
    assert!(!plan[0].removed);
    assert_eq!(h.containers().len(), 1, "a dry run removes nothing");
    let done = sandbox.gc(None, false).await.unwrap();
    assert!(done[0].removed, "{done:?}");
    assert!(h.containers().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_cli_and_the_library_agree_on_idle_time() {
    // The bug: `sandbox ls` and gc counted idle time from the container's
    // creation, and called a container used seconds earlier "idle 80s".
    let h = Harness::new("agree");
    let sandbox = per_user(&h, h.config()).await;
    let b = sandbox.get_thread_backend("w-1").await.unwrap();
    b.execute("true").await.unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    // A use from another process...
    let out = cli_exec(&h, "w-2", "true")
        .wait_with_output()
        .await
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    // ...is what this process sees.
    let c = &sandbox.list().await.unwrap()[0];
    let idle = sandbox_host::now_ms().saturating_sub(c.last_used_ms);
    assert!(idle < 1500, "idle {idle} ms right after a use from the CLI");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dropped_call_and_ctrl_c_on_the_cli_kill_the_remote_command() {
    // The bug: a client that disconnected left its command running, and so
    // does Ctrl-C on `docker exec`.
    let h = Harness::new("cancel");
    let sandbox = per_user(&h, h.config()).await;
    let b = sandbox.get_thread_backend("x-1").await.unwrap();
    let dropped = tokio::time::timeout(
        Duration::from_millis(1500),
        b.execute("(env -i sleep 301 &); sleep 300"),
    )
    .await;
    assert!(dropped.is_err(), "still running when dropped");
    sandbox.settle().await;
    let ps = b.execute("ps -o args").await.unwrap().output;
    assert!(!ps.contains("sleep 30"), "left behind: {ps}");

    let child = cli_exec(&h, "x-2", "sleep 302");
    wait_in_flight(&sandbox, 1).await;
    let pid = nix::unistd::Pid::from_raw(child.id().unwrap() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
    let out = child.wait_with_output().await.unwrap();
    assert_eq!(out.status.code(), Some(130), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("interrupted"));
    let ps = b.execute("ps -o args").await.unwrap().output;
    assert!(!ps.contains("sleep 302"), "left behind: {ps}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_execute_starting_while_maintenance_evicts_never_fails() {
    // The bug: maintenance counted no work, then an execute began and found
    // the container, then maintenance removed it: 16 of 80 executes failed
    // at a 0.3 s TTL. Now the two hand off through the shared store.
    let h = Harness::new("evictrace");
    let config = Config {
        maintenance_interval_secs: 0.05,
        ..with_ttl(&h, "0.3")
    };
    let sandbox = per_user(&h, config).await;
    let b = sandbox.get_thread_backend("e-1").await.unwrap();
    for i in 0..25 {
        let r = b.execute("echo ok").await;
        assert!(
            matches!(&r, Ok(r) if r.exit_code == 0 && r.output == "ok\n"),
            "execute {i}: {r:?}"
        );
        // Around the TTL, so evictions and starts meet.
        tokio::time::sleep(Duration::from_millis(280 + (i % 5) * 10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_grace_period_longer_than_a_policy_call_budget_is_waited_out() {
    // The bug: the destroy's wait for running work happened inside the
    // policy call, whose wall-clock budget (5 s by default, the grace 10 s)
    // cut it off: the destroy failed as a policy trap and removed nothing.
    let h = Harness::new("longgrace");
    let config = Config {
        policy_call_timeout_ms: 1000,
        destroy_grace_secs: 10.0,
        ..h.config()
    };
    let sandbox = per_user(&h, config).await;
    let b = sandbox.get_thread_backend("g-1").await.unwrap();
    b.execute("true").await.unwrap();
    let running = tokio::spawn(async move { b.execute("sleep 3; echo done").await });
    wait_in_flight(&sandbox, 1).await;
    assert!(sandbox.destroy_user_backend("g").await.unwrap());
    let r = running.await.unwrap().unwrap();
    assert_eq!((r.exit_code, r.output.as_str()), (0, "done\n"), "{r:?}");
    assert!(h.containers().is_empty());
}

fn python_image() -> String {
    support::python_image()
}

/// Debian's `sh` (the Python image) is dash, whose `read` has no `-d`: the
/// kill script matched no process there at first. A cancelled call's
/// processes must die there too, a fork loop and an orphan that cleared
/// its environment included (the agent's `kill` does it without a fork;
/// the script fallback forks `tr | grep` under dash).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cancelled_fork_loop_dies_under_dash_too() {
    let h = Harness::new("dashkill");
    let config = Config {
        image: python_image(),
        ..h.config()
    };
    let sandbox = per_user(&h, config).await;
    let b = sandbox.get_thread_backend("z-1").await.unwrap();
    b.execute("true").await.unwrap();
    let options = ExecOptions {
        execution_id: Some("dash-kill-0001".into()),
        ..ExecOptions::default()
    };
    let running = {
        let b = b.clone();
        tokio::spawn(async move {
            b.execute_with(
                "(env -i sleep 306 &); while true; do sleep 305 & done",
                options,
            )
            .await
        })
    };
    wait_in_flight(&sandbox, 1).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // At the pids limit dash may give up ("Cannot fork") and exit first:
    // the call then ends with the jobs still holding its output killed.
    let cancelled = sandbox.cancel("z-1", "dash-kill-0001").unwrap();
    let r = running.await.unwrap().unwrap();
    if cancelled {
        assert_eq!(r.reason, Some(EndReason::Cancelled), "{r:?}");
    } else {
        assert!(r.background_killed > 0, "{r:?}");
    }
    sandbox.settle().await;
    let left = b
        .execute("cat /proc/[0-9]*/cmdline | tr '\\0' ' '")
        .await
        .unwrap()
        .output;
    assert!(!left.contains("sleep 30"), "left behind: {left}");
}

/// Bug (issue 21): execution ids were one namespace across users: bob
/// reusing alice's running id was told it was running (learning it), and a
/// cancel by id killed alice's command. Ids are now the thread's user's.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn execution_ids_are_scoped_per_user() {
    let h = Harness::new("execids");
    let sandbox = per_user(&h, h.config()).await;
    let alice = sandbox.get_thread_backend("alice-1").await.unwrap();
    let bob = sandbox.get_thread_backend("bob-1").await.unwrap();
    alice.execute("true").await.unwrap();
    bob.execute("true").await.unwrap();
    let id = "shared-id-0001";
    let with_id = || ExecOptions {
        execution_id: Some(id.into()),
        ..ExecOptions::default()
    };
    let running = {
        let alice = alice.clone();
        let options = with_id();
        tokio::spawn(async move { alice.execute_with("sleep 305", options).await })
    };
    wait_in_flight(&sandbox, 1).await;

    // Bob's id is his own: nothing tells him alice uses it.
    let r = bob.execute_with("echo bob", with_id()).await.unwrap();
    assert_eq!((r.output.as_str(), r.exit_code), ("bob\n", 0), "{r:?}");
    assert_eq!(r.execution_id, id);
    // Nor can he cancel hers.
    assert!(!sandbox.cancel("bob-1", id).unwrap());
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !running.is_finished(),
        "bob's cancel reached alice's command"
    );
    // Alice's own reuse of a running id is refused, as before.
    let again = alice.execute_with("true", with_id()).await.unwrap_err();
    assert!(again.to_string().contains("already running"), "{again}");

    // Alice cancels it, from any of her threads.
    assert!(sandbox.cancel("alice-2", id).unwrap());
    let r = running.await.unwrap().unwrap();
    assert_eq!(r.exit_code, 130, "{r:?}");
    assert_eq!(r.reason, Some(EndReason::Cancelled));
    assert!(
        !sandbox.cancel("alice-1", id).unwrap(),
        "gone once it ended"
    );
    assert!(sandbox.cancel("not a thread", id).is_err());
}

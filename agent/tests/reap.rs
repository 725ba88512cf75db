//! The agent as a process: statuses pass through, and the deadline ends
//! every process the call started, escaped ones included.

use std::process::Command;
use std::time::Duration;

use sandbox_agent::protocol::{EXIT_AGENT_FAILED, EXIT_KILLED, EXIT_TIMED_OUT};

const TIMED_OUT: i32 = EXIT_TIMED_OUT as i32;

#[test]
fn escaped_processes_are_killed_at_the_deadline() {
    // The bug: `(env -i sh -c "sleep 777" &)` and setsid survived the
    // timeout kill, which found processes by an environment marker.
    let agent = env!("CARGO_BIN_EXE_sandbox-agent");
    let start = std::time::Instant::now();
    let status = Command::new(agent)
        .args(["reap", "--timeout-ms", "300", "--", "sh", "-c"])
        .arg("(env -i sh -c 'sleep 777' &); (setsid sleep 778 &); sh -c 'sleep 779 & sleep 780 &'; sleep 781")
        .status()
        .unwrap();
    assert_eq!(status.code(), Some(TIMED_OUT));
    assert!(start.elapsed() < Duration::from_secs(5));
    std::thread::sleep(Duration::from_millis(100));
    let ps = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path().join("cmdline")).ok())
        .filter(|c| c.starts_with("sleep\0") && (777..=781).any(|n| c.contains(&n.to_string())))
        .count();
    assert_eq!(ps, 0, "every escaped sleep is gone");
}

#[test]
fn the_program_status_passes_through() {
    let agent = env!("CARGO_BIN_EXE_sandbox-agent");
    let code = |script: &str| {
        Command::new(agent)
            .args(["reap", "--", "sh", "-c", script])
            .status()
            .unwrap()
            .code()
    };
    assert_eq!(code("exit 3"), Some(3));
    assert_eq!(code("kill -9 $$"), Some(i32::from(EXIT_KILLED)));
}

/// Anything but a known verb with its arguments is the agent's own usage
/// error, never run as a command.
#[test]
fn unknown_verbs_and_bad_arguments_are_usage_errors() {
    let agent = env!("CARGO_BIN_EXE_sandbox-agent");
    for args in [
        &["help"][..],
        &[],
        &["serve", "extra"],
        &["kill"],
        &["kill", "short"],
        &["reap", "true"],
        &["reap", "--timeout-ms", "x", "--", "true"],
    ] {
        let out = Command::new(agent).args(args).output().unwrap();
        assert_eq!(
            out.status.code(),
            Some(i32::from(EXIT_AGENT_FAILED)),
            "{args:?}"
        );
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("usage"),
            "{args:?}"
        );
    }
}

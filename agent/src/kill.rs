//! `sandbox-agent kill MARKER`: ends a call the host gave up on (cancelled,
//! timed out, its client gone): every process carrying the call's marker in
//! its environment, and their descendants, without forking.

use sandbox_agent::protocol::{valid_marker, EXEC_MARKER_VAR};

use crate::{procs, AGENT_FAILED};

/// The verb: `args` are those after `kill`.
pub fn main(args: &[String]) -> i32 {
    match args {
        [marker] if valid_marker(marker) => kill_marked(marker),
        _ => {
            eprintln!("usage: sandbox-agent kill MARKER");
            AGENT_FAILED
        }
    }
}

/// Stops, then kills, every process whose environment holds
/// `SANDBOX_EXEC_ID=MARKER` ([`EXEC_MARKER_VAR`]) and all their descendants
/// (children that cleared their environment, orphans adopted by a `reap`
/// agent of the call), until none is left. One process, no fork, so it
/// works when the call spent the container's pids limit, and under any
/// shell (the script fallback needs `read -d`, which dash lacks). 0 when
/// none is left, 1 when some survived.
pub fn kill_marked(marker: &str) -> i32 {
    let entry = format!("{EXEC_MARKER_VAR}={marker}");
    let me = std::process::id() as libc::pid_t;
    for _ in 0..procs::SWEEPS {
        let roots = marked(entry.as_bytes(), me);
        let mut tree: Vec<libc::pid_t> =
            roots.iter().flat_map(|&r| procs::descendants(r)).collect();
        tree.extend(&roots);
        tree.retain(|&p| p != me);
        tree.sort_unstable();
        tree.dedup();
        if tree.is_empty() {
            return 0;
        }
        procs::stop_then_kill(&tree);
        std::thread::sleep(procs::SWEEP_PAUSE);
    }
    1
}

/// Live processes (not `me`) whose environment has exactly `entry` as one
/// of its NUL-separated entries.
fn marked(entry: &[u8], me: libc::pid_t) -> Vec<libc::pid_t> {
    procs::pids()
        .unwrap_or_default()
        .into_iter()
        .filter(|&pid| pid != me)
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/environ"))
                .is_ok_and(|env| env.split(|&b| b == 0).any(|kv| kv == entry))
        })
        .filter(|&pid| procs::is_live(pid))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kill_marker_is_a_plain_token() {
        // It is matched against whole environment entries; anything but the
        // host's own id format is refused rather than half-matched.
        let args = |s: &str| vec![s.to_owned()];
        assert_eq!(main(&args("short")), AGENT_FAILED);
        assert_eq!(
            main(&args(&format!("a=b\0{EXEC_MARKER_VAR}=x"))),
            AGENT_FAILED
        );
        assert_eq!(main(&args(&"x".repeat(65))), AGENT_FAILED);
        assert_eq!(main(&[]), AGENT_FAILED);
        // Nothing carries this marker: nothing is left to kill.
        assert_eq!(main(&args("no-such-call-0001")), 0);
    }
}

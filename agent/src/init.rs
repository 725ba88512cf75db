//! `sandbox-agent init`: the container's main process.
//!
//! It runs under the container's init (tini) as a child subreaper: it
//! starts `serve` with its own stdin and stdout (the container's attach
//! stream), reaps every orphan, and starts `serve` again when it dies. So a
//! workload that kills `serve` (or the host, with `respawn`) costs the calls
//! in flight, not the container.

use std::process::Command;
use std::time::{Duration, Instant};

use crate::{procs, AGENT_FAILED};

/// The pause before restarting a `serve` that lived long enough.
const RESTART_PAUSE: Duration = Duration::from_millis(20);
/// The longest pause, for a `serve` that keeps dying at once.
const MAX_RESTART_PAUSE: Duration = Duration::from_secs(2);

/// Runs `serve` and keeps it running; never returns but on a setup error.
pub fn init() -> i32 {
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
        eprintln!("sandbox-agent init: PR_SET_CHILD_SUBREAPER failed");
        return AGENT_FAILED;
    }
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => {
            eprintln!("sandbox-agent init: {e}");
            return AGENT_FAILED;
        }
    };
    let mut pause = RESTART_PAUSE;
    loop {
        let started = Instant::now();
        match Command::new(&exe).arg("serve").spawn() {
            Ok(child) => {
                procs::reap_until(child.id() as libc::pid_t);
            }
            Err(e) => eprintln!("sandbox-agent init: starting serve: {e}"),
        }
        // A serve that keeps dying at once is restarted ever more slowly.
        pause = if started.elapsed() < Duration::from_secs(1) {
            (pause * 2).min(MAX_RESTART_PAUSE)
        } else {
            RESTART_PAUSE
        };
        std::thread::sleep(pause);
    }
}

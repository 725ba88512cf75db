//! `sandbox-agent init [--user UID:GID]`: the container's main process.
//!
//! It keeps `serve` running with its own stdin and stdout (the container's
//! attach stream), reaps every orphan, and starts `serve` again when it
//! dies, so that a `serve` the host had to end (`respawn`) costs the calls
//! in flight, not the container.
//!
//! With `--user` it is pid 1 and root (with only the capabilities
//! `identity.rs` needs), and `serve` runs every command as that user: the
//! workload cannot signal, trace or read it. As pid 1 it reaps orphans
//! without being a subreaper (gVisor refuses `PR_SET_CHILD_SUBREAPER` to
//! any other process), and ends the container on SIGTERM or SIGINT (pid 1
//! gets no default action for them). Without `--user` (a container of an
//! older host, under tini) it is a child subreaper, as before.

use std::process::Command;
use std::time::{Duration, Instant};

use crate::identity::options;
use crate::{procs, AGENT_FAILED};

/// The pause before restarting a `serve` that lived long enough.
const RESTART_PAUSE: Duration = Duration::from_millis(20);
/// The longest pause, for a `serve` that keeps dying at once.
const MAX_RESTART_PAUSE: Duration = Duration::from_secs(2);

/// Runs `serve` and keeps it running; never returns but on a setup error.
pub fn init(args: &[String]) -> i32 {
    let options = match options(args) {
        Ok(options) => options,
        Err(e) => {
            eprintln!(
                "sandbox-agent init: {e}\nusage: sandbox-agent init [--user UID:GID] \
                 [--egress-port PORT]"
            );
            return AGENT_FAILED;
        }
    };
    if std::process::id() == 1 {
        end_on_termination();
    } else if !become_subreaper() {
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
    let mut serve = Command::new(&exe);
    serve.arg("serve").args(options.args());
    let mut pause = RESTART_PAUSE;
    loop {
        let started = Instant::now();
        match serve.spawn() {
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

/// Orphans of this process's tree are re-parented to it.
fn become_subreaper() -> bool {
    // SAFETY: prctl with integer arguments only.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0 }
}

/// SIGTERM and SIGINT end pid 1, and so the container, at once (a stop
/// then takes no grace period it would not use).
fn end_on_termination() {
    extern "C" fn end(_: libc::c_int) {
        // SAFETY: _exit is async-signal-safe.
        unsafe { libc::_exit(0) };
    }
    // SAFETY: installs a handler that only calls _exit.
    unsafe {
        let handler = end as extern "C" fn(libc::c_int) as libc::sighandler_t;
        libc::signal(libc::SIGTERM, handler);
        libc::signal(libc::SIGINT, handler);
    }
}

//! `sandbox-agent respawn`: kills the `serve` processes, which `init` then
//! starts again. The host's remedy for a `serve` that stopped answering.

use crate::{procs, AGENT_FAILED};

/// Kills every process running this binary as `serve`.
pub fn respawn() -> i32 {
    let Ok(me) = std::env::current_exe() else {
        return AGENT_FAILED;
    };
    let Ok(pids) = procs::pids() else {
        return AGENT_FAILED;
    };
    for pid in pids {
        let exe = std::fs::read_link(format!("/proc/{pid}/exe"));
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let is_serve = cmdline.split(|&b| b == 0).nth(1) == Some(b"serve");
        if exe.is_ok_and(|e| e == me) && is_serve {
            // SAFETY: signalling a pid; a stale one fails harmlessly.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
    0
}

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
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let mut args = cmdline.split(|&b| b == 0);
        let program = args.next().unwrap_or_default();
        let is_serve = args.next() == Some(b"serve");
        let runs_me = match std::fs::read_link(format!("/proc/{pid}/exe")) {
            Ok(exe) => exe == me,
            // gVisor lets no one but a tracer read another process's exe:
            // then a root process that names this binary (the workload is
            // never root, so it cannot pose as one).
            Err(_) => program == me.as_os_str().as_encoded_bytes() && owner_is_root(pid),
        };
        if runs_me && is_serve {
            // SAFETY: signalling a pid; a stale one fails harmlessly.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
    0
}

/// Whether `pid` runs as root (its real uid, from /proc).
fn owner_is_root(pid: libc::pid_t) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status")).is_ok_and(|status| {
        status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().next())
            == Some("0")
    })
}

//! The `/proc` walk and the signals `reap`, `kill` and `respawn` share:
//! which processes exist, who their parents are, and ending a set of them.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use crate::identity::SandboxUser;

/// Rounds of a sweep before it gives up on processes that keep appearing.
pub const SWEEPS: usize = 200;
/// Pause between two rounds of a sweep.
pub const SWEEP_PAUSE: Duration = Duration::from_millis(5);

/// The pids listed in `/proc` now.
pub fn pids() -> std::io::Result<Vec<libc::pid_t>> {
    Ok(std::fs::read_dir("/proc")?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect())
}

/// Stops every process of `pids`, then kills them: stopping first means a
/// fork loop cannot outrun the sweep.
pub fn stop_then_kill(pids: &[libc::pid_t]) {
    for &pid in pids {
        // SAFETY: signalling a pid; a stale one fails harmlessly.
        unsafe { libc::kill(pid, libc::SIGSTOP) };
    }
    for &pid in pids {
        // SAFETY: as above.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

/// Reaps every child (adopted orphans included) until `child` exits: its
/// raw wait status, `None` when waiting failed.
pub fn reap_until(child: libc::pid_t) -> Option<libc::c_int> {
    loop {
        let mut status = 0;
        // SAFETY: waitpid writes the status into a local.
        let pid = unsafe { libc::waitpid(-1, &mut status, 0) };
        if pid == child {
            return Some(status);
        }
        if pid < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return None;
        }
    }
}

/// Reaps the children that have exited, without waiting.
pub fn reap_zombies() {
    loop {
        let mut status = 0;
        // SAFETY: non-blocking waitpid into a local.
        if unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) } <= 0 {
            return;
        }
    }
}

/// Whether `pid` exists and is not a zombie.
///
/// A leader that exited while its other threads run shows `Z` in its own
/// stat yet lives on in them (a thread group escapes a sweep that skips it:
/// found in review), so every task is looked at; a signal to the leader's
/// pid reaches the whole group.
pub fn is_live(pid: libc::pid_t) -> bool {
    let leader_live = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| parse_stat(&s))
        .is_some_and(|(state, _)| state != 'Z');
    leader_live || any_task_live(pid)
}

/// Whether a thread of `pid` other than a zombie is listed.
fn any_task_live(pid: libc::pid_t) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().any(|task| {
        std::fs::read_to_string(task.path().join("stat"))
            .ok()
            .and_then(|s| parse_stat(&s))
            .is_some_and(|(state, _)| state != 'Z')
    })
}

/// Live (not zombie) processes whose parent chain reaches `root`.
pub fn descendants(root: libc::pid_t) -> Vec<libc::pid_t> {
    let mut children: HashMap<libc::pid_t, Vec<libc::pid_t>> = HashMap::new();
    let mut zombies = HashSet::new();
    for pid in pids().unwrap_or_default() {
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        if let Some((state, ppid)) = parse_stat(&stat) {
            if state == 'Z' && !any_task_live(pid) {
                zombies.insert(pid);
            }
            children.entry(ppid).or_default().push(pid);
        }
    }
    let mut out = Vec::new();
    let mut queue = vec![root];
    // /proc is not read atomically: with pid reuse a snapshot may hold a
    // cycle, which must not loop forever.
    let mut seen = HashSet::from([root]);
    while let Some(p) = queue.pop() {
        for &c in children.get(&p).into_iter().flatten() {
            if !seen.insert(c) {
                continue;
            }
            queue.push(c);
            if !zombies.contains(&c) {
                out.push(c);
            }
        }
    }
    out
}

/// Live processes (not `me`) that carry the supplementary group `gid`: one
/// call's processes, wherever they went.
pub fn in_group(gid: libc::gid_t, me: libc::pid_t) -> Vec<libc::pid_t> {
    pids()
        .unwrap_or_default()
        .into_iter()
        .filter(|&pid| pid != me)
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/status"))
                .is_ok_and(|status| groups_of(&status).any(|g| g == gid))
        })
        .filter(|&pid| is_live(pid))
        .collect()
}

/// Stops, then kills, every process of the group `gid` until none is left.
/// True when none is left.
///
/// With the sandbox `user` known, the whole workload is stopped first, in
/// one `kill(-1, SIGSTOP)` as that user (the kernel signals every process
/// at once, and a fork under way restarts after the stop): a member that
/// forks and exits in a loop (a pid hopper) cannot outrun the `/proc`
/// walk. The workload's other processes (other calls of the same user) go
/// on after a `SIGCONT`, a few milliseconds later; the agent, root, is
/// never stopped. Without a user, members are stopped before any is killed.
pub fn kill_group(gid: libc::gid_t, user: Option<SandboxUser>) -> bool {
    let me = std::process::id() as libc::pid_t;
    let frozen = user.filter(|&user| signal_workload(user, libc::SIGSTOP));
    let mut gone = false;
    for _ in 0..SWEEPS {
        let members = in_group(gid, me);
        if members.is_empty() {
            gone = true;
            break;
        }
        stop_then_kill(&members);
        reap_zombies();
        std::thread::sleep(SWEEP_PAUSE);
    }
    if let Some(user) = frozen {
        signal_workload(user, libc::SIGCONT);
    }
    gone
}

/// Sends `signal` to every process the sandbox `user` may signal (the
/// workload: never root's agent, nor init), from a forked child that
/// becomes that user. True when it was sent.
pub fn signal_workload(user: SandboxUser, signal: libc::c_int) -> bool {
    let groups = [user.gid];
    // SAFETY: the child makes raw syscalls only (it is a copy of a
    // multithreaded process), then _exits; the parent waits for it.
    unsafe {
        let pid = libc::fork();
        if pid == 0 {
            let sent = libc::syscall(libc::SYS_setgroups, 1, groups.as_ptr()) == 0
                && libc::syscall(libc::SYS_setgid, user.gid) == 0
                && libc::syscall(libc::SYS_setuid, user.uid) == 0
                && libc::syscall(libc::SYS_getuid) == user.uid as libc::c_long
                && (libc::syscall(libc::SYS_kill, -1, signal) == 0
                    || *libc::__errno_location() == libc::ESRCH);
            libc::_exit(if sent { 0 } else { 1 });
        }
        if pid < 0 {
            return false;
        }
        let mut status = 0;
        loop {
            if libc::waitpid(pid, &mut status, 0) == pid {
                return libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0;
            }
            match *libc::__errno_location() {
                libc::EINTR => continue,
                // Reaped by another thread's wait for any child (`reap`
                // waits for its orphans): it has exited, its signal sent.
                _ => return true,
            }
        }
    }
}

/// The supplementary groups of a `/proc/PID/status` text (its `Groups:`
/// line; the workload names its processes, never this line).
fn groups_of(status: &str) -> impl Iterator<Item = libc::gid_t> + '_ {
    status
        .lines()
        .find_map(|line| line.strip_prefix("Groups:"))
        .into_iter()
        .flat_map(str::split_whitespace)
        .filter_map(|g| g.parse().ok())
}

/// State and parent pid from `/proc/PID/stat`; the command name may hold
/// spaces and parentheses, so fields are read after its last `)`.
pub fn parse_stat(stat: &str) -> Option<(char, libc::pid_t)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((state, ppid))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_read_after_a_hostile_command_name() {
        // A process may name itself ") Z 1" to pose as a zombie of init.
        assert_eq!(parse_stat("42 (a) Z 1 (b) S 7 1 1"), Some(('S', 7)));
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn groups_are_read_from_their_own_line_only() {
        let status = "Name:\tGroups: 5\nUid:\t1000\nGroups:\t1000 1073741999 \nNgid:\t0\n";
        assert_eq!(groups_of(status).collect::<Vec<_>>(), [1000, 1073741999]);
        assert_eq!(groups_of("Groups:\n").count(), 0);
    }

    #[test]
    fn this_process_is_listed_and_live() {
        let me = std::process::id() as libc::pid_t;
        assert!(pids().unwrap().contains(&me));
        assert!(is_live(me));
    }
}

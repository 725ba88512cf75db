//! `sandbox-agent kill MARKER`: ends a call the host gave up on (cancelled,
//! timed out, its client gone): every process carrying the call's marker in
//! its environment, and their descendants, without forking. Run as root it
//! also ends the group of each `reap --group` carrying the marker (a call
//! serve ran as the sandbox user): the workload's own environments are then
//! out of its reach, but its group is not: the group named by its `reap
//! --group`, or, for a call `serve` ran without `reap`, the group derived
//! from the marker itself (`identity::marker_group`).

use sandbox_agent::protocol::{valid_marker, EXEC_MARKER_VAR};

use crate::identity::SandboxUser;
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
    let mut all_gone = true;
    let mut groups = call_groups(&marked(entry.as_bytes(), me));
    // A call `serve` ran itself has no `reap`: its group is the marker's.
    if let Some(group) = crate::identity::marker_group(marker) {
        let user = procs::in_group(group, me)
            .first()
            .and_then(|&pid| procs::user_of(pid));
        groups.push((group, user));
    }
    for (group, user) in groups {
        all_gone &= procs::kill_group(group, user);
    }
    for _ in 0..procs::SWEEPS {
        let roots = marked(entry.as_bytes(), me);
        let mut tree: Vec<libc::pid_t> =
            roots.iter().flat_map(|&r| procs::descendants(r)).collect();
        tree.retain(|&p| p != me);
        if tree.is_empty() && roots.is_empty() {
            return if all_gone { 0 } else { 1 };
        }
        // A root still carries the marker once held; a descendant still
        // hangs from the tree.
        procs::stop_then_kill_tree(&roots, &tree, |pid| carries(pid, entry.as_bytes()));
        std::thread::sleep(procs::SWEEP_PAUSE);
    }
    1
}

/// The call groups named by `reap --group GID` among `pids`, each with the
/// sandbox user of its `--user` (to stop the workload while the group is
/// swept).
///
/// Only a `reap` the agent started counts: a root process running this very
/// binary, naming a group of the call-group range. A workload process can
/// name itself `reap --group 0 --` (and under gVisor root may read its
/// environment): that must never turn a kill into `kill_group(0)` or into
/// the sandbox user's own group.
fn call_groups(pids: &[libc::pid_t]) -> Vec<(libc::gid_t, Option<SandboxUser>)> {
    let me = std::env::current_exe().ok();
    let mut groups: Vec<(libc::gid_t, Option<SandboxUser>)> = pids
        .iter()
        .filter(|&&pid| is_root_agent(pid, me.as_deref()))
        .filter_map(|pid| std::fs::read(format!("/proc/{pid}/cmdline")).ok())
        .filter_map(|cmdline| {
            let group = option(&cmdline, b"--group")?.parse().ok()?;
            let user = option(&cmdline, b"--user").and_then(|u| SandboxUser::parse(&u).ok());
            Some((group, user))
        })
        .filter(|&(group, _)| crate::identity::is_call_group(group))
        .collect();
    groups.sort_unstable_by_key(|&(group, _)| group);
    groups.dedup_by_key(|&mut (group, _)| group);
    groups
}

/// Whether `pid` runs as root (all four uids) and executes `agent`.
fn is_root_agent(pid: libc::pid_t, agent: Option<&std::path::Path>) -> bool {
    let root = std::fs::read_to_string(format!("/proc/{pid}/status")).is_ok_and(|status| {
        status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .is_some_and(|uids| uids.split_whitespace().all(|u| u == "0"))
    });
    let ours = match agent {
        Some(agent) => std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|e| e == agent),
        None => false,
    };
    root && ours
}

/// The value of `name` among the options of a `reap ... --` command line
/// (NUL-separated): before `--`, never the workload's own arguments.
fn option(cmdline: &[u8], name: &[u8]) -> Option<String> {
    let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
    if args.get(1) != Some(&&b"reap"[..]) {
        return None;
    }
    let options = &args[..args.iter().position(|a| *a == b"--")?];
    let at = options.iter().position(|a| *a == name)?;
    Some(std::str::from_utf8(options.get(at + 1)?).ok()?.to_owned())
}

/// `GID` of a `reap ... --group GID ... --` command line.
#[cfg(test)]
fn group_argument(cmdline: &[u8]) -> Option<libc::gid_t> {
    option(cmdline, b"--group")?.parse().ok()
}

/// Live processes (not `me`) whose environment has exactly `entry` as one
/// of its NUL-separated entries.
fn marked(entry: &[u8], me: libc::pid_t) -> Vec<libc::pid_t> {
    procs::pids()
        .unwrap_or_default()
        .into_iter()
        .filter(|&pid| pid != me)
        .filter(|&pid| carries(pid, entry))
        .filter(|&pid| procs::is_live(pid))
        .collect()
}

/// Whether the environment of `pid` has exactly `entry` as one of its
/// NUL-separated entries.
fn carries(pid: libc::pid_t, entry: &[u8]) -> bool {
    std::fs::read(format!("/proc/{pid}/environ"))
        .is_ok_and(|env| env.split(|&b| b == 0).any(|kv| kv == entry))
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

    #[test]
    fn the_group_is_read_from_reaps_own_options_only() {
        let line = |args: &[&str]| args.join("\0").into_bytes();
        assert_eq!(
            group_argument(&line(&["/a", "reap", "--group", "1073741900", "--", "sh"])),
            Some(1073741900)
        );
        // After `--` it is the workload's argument, not reap's option.
        assert_eq!(
            group_argument(&line(&["/a", "reap", "--", "sh", "--group", "5"])),
            None
        );
        assert_eq!(
            group_argument(&line(&["/a", "serve", "--group", "5", "--"])),
            None
        );
        let reap = line(&["/a", "reap", "--user", "7:8", "--group", "9", "--", "x"]);
        assert_eq!(option(&reap, b"--user").as_deref(), Some("7:8"));
        let workload = line(&["/a", "reap", "--group", "9", "--", "--user", "1:1"]);
        assert_eq!(option(&workload, b"--user"), None);
    }
}

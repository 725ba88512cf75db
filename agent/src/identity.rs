//! Who runs what inside the container: the agent as root with only the
//! capabilities it needs (setuid, setgid, kill), every command as the
//! sandbox user, with no capability and a supplementary group of its own.
//!
//! The call's group is what the agent ends at a timeout or a cancel: a
//! process cannot leave a supplementary group without `CAP_SETGID` (and
//! `no-new-privileges` keeps it from regaining one), so it carries it
//! through `setsid`, double forks, `env -i` and the death of its `reap`,
//! under runc and gVisor alike; and the workload, another uid with no
//! capability, can neither signal, trace nor read the agent.

use std::sync::atomic::{AtomicU32, Ordering};

/// `UID:GID` of the sandbox user, as `--user` gives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SandboxUser {
    pub uid: libc::uid_t,
    pub gid: libc::gid_t,
}

impl SandboxUser {
    /// `UID:GID`, both numeric and neither 0: the workload is never root.
    pub fn parse(text: &str) -> Result<Self, String> {
        let (uid, gid) = text
            .split_once(':')
            .ok_or_else(|| format!("--user {text:?}: expected UID:GID"))?;
        let number = |s: &str| {
            s.parse::<u32>()
                .ok()
                .filter(|n| *n != 0 && *n != u32::MAX)
                .ok_or_else(|| format!("--user {text:?}: not a non-root numeric id"))
        };
        Ok(SandboxUser {
            uid: number(uid)?,
            gid: number(gid)?,
        })
    }

    /// As given on a command line.
    pub fn arg(&self) -> String {
        format!("{}:{}", self.uid, self.gid)
    }
}

/// The options `init` and `serve` take: `--user UID:GID` (whom commands
/// run as) and `--egress-port PORT` (the egress relay's port on loopback).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Options {
    pub user: Option<SandboxUser>,
    pub egress_port: Option<u16>,
}

impl Options {
    /// As given on a command line (what `init` hands `serve`).
    pub fn args(&self) -> Vec<String> {
        let mut args = Vec::new();
        if let Some(user) = self.user {
            args.extend(["--user".to_owned(), user.arg()]);
        }
        if let Some(port) = self.egress_port {
            args.extend(["--egress-port".to_owned(), port.to_string()]);
        }
        args
    }
}

/// The options among `args`; an error for anything else.
pub fn options(args: &[String]) -> Result<Options, String> {
    let mut options = Options::default();
    let mut rest = args;
    loop {
        match rest {
            [] => return Ok(options),
            [flag, value, more @ ..] if flag == "--user" && options.user.is_none() => {
                options.user = Some(SandboxUser::parse(value)?);
                rest = more;
            }
            [flag, value, more @ ..]
                if flag == "--egress-port" && options.egress_port.is_none() =>
            {
                let port = value
                    .parse::<u16>()
                    .ok()
                    .filter(|p| *p != 0)
                    .ok_or_else(|| format!("--egress-port {value:?}: not a port"))?;
                options.egress_port = Some(port);
                rest = more;
            }
            other => return Err(format!("unexpected arguments {other:?}")),
        }
    }
}

/// The value of `--user` among `args`, which hold no other option.
#[cfg(test)]
pub fn user_option(args: &[String]) -> Result<Option<SandboxUser>, String> {
    match options(args)? {
        Options {
            egress_port: Some(_),
            ..
        } => Err("unexpected --egress-port".into()),
        options => Ok(options.user),
    }
}

/// Where call groups start: above every id an image or a user namespace
/// plausibly uses.
const GROUP_BASE: u32 = 1 << 30;
/// How many ids call groups are drawn from.
const GROUP_SPAN: u32 = 1 << 29;

/// Whether `gid` is a call group ([`CallGroups`] or [`marker_group`]).
pub fn is_call_group(gid: libc::gid_t) -> bool {
    (GROUP_BASE..GROUP_BASE + GROUP_SPAN).contains(&gid)
}

/// The lower half of the span: [`CallGroups`]; the upper: [`marker_group`].
const HALF_SPAN: u32 = GROUP_SPAN / 2;

/// The group of the calls marked `marker`, derived from the marker alone:
/// `sandbox-agent kill MARKER` finds the processes of a call `serve` ran
/// itself without asking `serve` (which may be gone), wherever they went
/// and whatever they did to their environment. `None` for a call without
/// a valid marker (nothing can kill it by marker). Calls that share a
/// marker share a group, as a kill by that marker ends them all.
pub fn marker_group(marker: &str) -> Option<libc::gid_t> {
    if !sandbox_agent::protocol::valid_marker(marker) {
        return None;
    }
    // FNV-1a: stable across builds (the `kill` that derives it again may
    // be another process of this binary, never another binary).
    let hash = marker.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    Some(GROUP_BASE + HALF_SPAN + (hash % u64::from(HALF_SPAN)) as u32)
}

/// Hands out call groups for calls without a marker group (background
/// processes, ports): a random start per serve process (a restarted serve
/// never reuses the groups of calls its predecessor left running), then
/// one after the other.
pub struct CallGroups(AtomicU32);

impl CallGroups {
    pub fn new() -> Self {
        CallGroups(AtomicU32::new(random_u32() % HALF_SPAN))
    }

    /// A group no call of this serve had.
    pub fn next(&self) -> libc::gid_t {
        GROUP_BASE + self.0.fetch_add(1, Ordering::Relaxed) % HALF_SPAN
    }
}

fn random_u32() -> u32 {
    let uuid = std::fs::read_to_string("/proc/sys/kernel/random/uuid").unwrap_or_default();
    let hex: String = uuid
        .chars()
        .filter(char::is_ascii_hexdigit)
        .take(8)
        .collect();
    u32::from_str_radix(&hex, 16).unwrap_or_else(|_| std::process::id().wrapping_mul(2654435761))
}

/// The workload's `oom_score_adj`: the most, so that under the container's
/// memory limit the kernel ends a workload process, never the agent.
const WORKLOAD_OOM_SCORE_ADJ: &[u8] = b"1000";

/// In a forked child about to exec the command: become the sandbox user in
/// `group` for good, under `filter` (`seccomp.rs`). Only async-signal-safe
/// calls (it runs between fork and exec). From root to another uid the
/// kernel clears every capability.
pub fn drop_to(
    user: SandboxUser,
    group: libc::gid_t,
    filter: &crate::seccomp::Filter,
) -> std::io::Result<()> {
    let groups = [user.gid, group];
    // SAFETY: plain syscalls with a local array; no allocation.
    unsafe {
        // The out-of-memory killer takes the workload before the agent (an
        // unprivileged process may raise its score, never lower it below
        // what it inherited). Best effort: gVisor may not have the file.
        let adj = libc::open(
            c"/proc/self/oom_score_adj".as_ptr(),
            libc::O_WRONLY | libc::O_CLOEXEC,
        );
        if adj >= 0 {
            libc::write(
                adj,
                WORKLOAD_OOM_SCORE_ADJ.as_ptr().cast(),
                WORKLOAD_OOM_SCORE_ADJ.len(),
            );
            libc::close(adj);
        }
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
            || libc::setgroups(groups.len(), groups.as_ptr()) != 0
            || libc::setgid(user.gid) != 0
            || libc::setuid(user.uid) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
        // There is no way back (setuid from root drops the saved uid too).
        if libc::setuid(0) == 0 {
            return Err(std::io::Error::from_raw_os_error(libc::EPERM));
        }
        // Until its exec this process is a copy of the agent: the workload
        // must not trace it or read its memory, whatever the host's
        // `fs.suid_dumpable` made of the uid change (the exec resets it).
        if libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    // Last: nor can it shed the group through a user namespace of its own.
    filter.install()
}

/// Whether this process may give commands away to the sandbox user (it is
/// root): otherwise commands run as this process, as before privilege
/// separation (an agent started through `docker exec` as the sandbox user).
pub fn can_drop() -> bool {
    // SAFETY: no arguments.
    unsafe { libc::geteuid() == 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sandbox_user_is_numeric_and_never_root() {
        assert_eq!(
            SandboxUser::parse("1000:1001"),
            Ok(SandboxUser {
                uid: 1000,
                gid: 1001
            })
        );
        for bad in [
            "0:1000",
            "1000:0",
            "1000",
            "a:b",
            "1000:",
            ":1",
            "4294967295:1",
        ] {
            assert!(SandboxUser::parse(bad).is_err(), "{bad}");
        }
        let args = |s: &[&str]| s.iter().map(|a| a.to_string()).collect::<Vec<_>>();
        assert_eq!(user_option(&args(&[])), Ok(None));
        assert!(user_option(&args(&["--user", "7:7"])).unwrap().is_some());
        assert!(user_option(&args(&["--user"])).is_err());
        assert!(user_option(&args(&["--uid", "7:7"])).is_err());
        let both = options(&args(&["--user", "7:7", "--egress-port", "3128"])).unwrap();
        assert_eq!(both.egress_port, Some(3128));
        assert_eq!(options(&both.args()), Ok(both));
        assert!(options(&args(&["--egress-port", "0"])).is_err());
        assert!(options(&args(&["--user", "7:7", "--user", "8:8"])).is_err());
    }

    #[test]
    fn call_groups_are_above_every_ordinary_id_and_distinct() {
        let groups = CallGroups::new();
        let a = groups.next();
        let b = groups.next();
        assert_ne!(a, b);
        assert!(is_call_group(a) && is_call_group(b));
        let marked = marker_group("marker-0001").unwrap();
        assert!(is_call_group(marked));
        assert_eq!(marker_group("marker-0001"), Some(marked));
        assert_ne!(marker_group("marker-0002"), Some(marked));
        assert!(a < GROUP_BASE + HALF_SPAN && marked >= GROUP_BASE + HALF_SPAN);
        assert_eq!(marker_group(""), None);
        assert_eq!(marker_group("bad marker"), None);
        assert!(!is_call_group(0) && !is_call_group(1000) && !is_call_group(GROUP_BASE - 1));
    }
}

//! The `/proc` walk and the signals `reap`, `kill` and `respawn` share:
//! which processes exist, who their parents are, and ending a set of them.

use std::collections::{HashMap, HashSet};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
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

/// Stops, then kills, the processes of `pids` (stopping first means a fork
/// loop cannot outrun the sweep) that still pass `check` once held: a pid
/// found by a `/proc` walk may have been freed and given to another
/// process since. Each is held by a pidfd first and checked
/// after (so the check reads the process the pidfd holds, while it lives),
/// and signalled through it: a process that has since gone takes no
/// signal, and no other process in its stead. Where the kernel (or gVisor)
/// has no pidfds, by pid, checked first, as before.
pub fn stop_then_kill_if(pids: &[libc::pid_t], check: impl Fn(libc::pid_t) -> bool) {
    signal_if(pids, &[libc::SIGSTOP, libc::SIGKILL], check);
}

/// Sends `signals`, in turn, to a tree a `/proc` walk found: `roots` and
/// `members` (their descendants, see [`descendants`]), each held as in
/// [`stop_then_kill_if`]. A member is signalled only while its parent is a
/// root or a member, so a pid freed and given to a process outside the
/// tree since (another call's `reap`, say) is spared; a root only while it
/// passes `root_check` (or hangs from the tree too). How many it held.
pub fn signal_tree(
    roots: &[libc::pid_t],
    members: &[libc::pid_t],
    signals: &[libc::c_int],
    root_check: impl Fn(libc::pid_t) -> bool,
) -> usize {
    let within: HashSet<libc::pid_t> = roots.iter().chain(members).copied().collect();
    let all: Vec<libc::pid_t> = within.iter().copied().collect();
    signal_if(&all, signals, |pid| {
        let hangs = || parent_of(pid).is_some_and(|parent| within.contains(&parent));
        // A root that is also a member (a marked child of a marked `reap`)
        // passes either way: a failed root check alone must not spare it.
        if roots.contains(&pid) {
            root_check(pid) || hangs()
        } else {
            hangs()
        }
    })
}

/// [`signal_tree`] with SIGSTOP, then SIGKILL.
pub fn stop_then_kill_tree(
    roots: &[libc::pid_t],
    members: &[libc::pid_t],
    root_check: impl Fn(libc::pid_t) -> bool,
) {
    signal_tree(roots, members, &[libc::SIGSTOP, libc::SIGKILL], root_check);
}

/// The parent of `pid` now, from its `/proc` stat.
fn parent_of(pid: libc::pid_t) -> Option<libc::pid_t> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&stat).map(|(_, parent)| parent)
}

/// Sends `signals`, in turn, to each process of `pids` that still passes
/// `check` once held (see [`stop_then_kill_if`]): how many it held.
pub fn signal_if(
    pids: &[libc::pid_t],
    signals: &[libc::c_int],
    check: impl Fn(libc::pid_t) -> bool,
) -> usize {
    let held: Vec<(libc::pid_t, Option<OwnedFd>)> = pids
        .iter()
        .filter_map(|&pid| {
            let fd = match pidfd_open(pid) {
                Ok(fd) => Some(fd),
                Err(e) => match e.raw_os_error() {
                    Some(libc::ESRCH) => return None,
                    // Out of descriptors (the check needs one too): by pid,
                    // unchecked, as before pidfds.
                    Some(libc::EMFILE) | Some(libc::ENFILE) => return Some((pid, None)),
                    _ => None,
                },
            };
            check(pid).then_some((pid, fd))
        })
        .collect();
    for &signal in signals {
        for (pid, fd) in &held {
            // SAFETY: a raw syscall on a descriptor we own.
            let sent = fd.as_ref().map(|fd| unsafe {
                libc::syscall(
                    libc::SYS_pidfd_send_signal,
                    fd.as_raw_fd(),
                    signal,
                    std::ptr::null::<libc::siginfo_t>(),
                    0,
                )
            });
            let gone = || std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
            if sent.is_none() || sent.is_some_and(|r| r != 0 && !gone()) {
                // No pidfd, or a kernel that opens them and sends through
                // none: by pid (checked above).
                // SAFETY: signalling a pid; a stale one fails harmlessly.
                unsafe { libc::kill(*pid, signal) };
            }
        }
    }
    held.len()
}

/// A descriptor that holds `pid` (and becomes readable when it exits). An
/// error where the kernel (or gVisor) has no `pidfd_open`, or no such
/// process is left (ESRCH).
pub fn pidfd_open(pid: libc::pid_t) -> std::io::Result<OwnedFd> {
    // SAFETY: a raw syscall with integer arguments; a new descriptor.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just gave us this descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
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
        .filter(|&pid| has_group(pid, gid))
        .filter(|&pid| is_live(pid))
        .collect()
}

/// Whether `pid` carries the supplementary group `gid` now.
pub fn has_group(pid: libc::pid_t, gid: libc::gid_t) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .is_ok_and(|status| groups_of(&status).any(|g| g == gid))
}

/// The user `pid` runs as (its real ids), when not root: the sandbox user
/// of a call's group, whose members all run as it.
pub fn user_of(pid: libc::pid_t) -> Option<SandboxUser> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let real = |key: &str| -> Option<u32> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    };
    let (uid, gid) = (real("Uid:")?, real("Gid:")?);
    (uid != 0).then_some(SandboxUser { uid, gid })
}

/// Live processes (not `me`) with a descriptor on one of the pipes whose
/// inodes are `pipes`. With `user`, the calling thread looks as that user
/// (its filesystem ids): the agent, root without `CAP_SYS_PTRACE`, may not
/// read the descriptors of another uid's processes, their owner may.
pub fn holding_pipes(
    pipes: &[u64],
    me: libc::pid_t,
    user: Option<SandboxUser>,
) -> Vec<libc::pid_t> {
    if user.is_some() {
        return as_user(user, || holding_pipes(pipes, me, None));
    }
    pids()
        .unwrap_or_default()
        .into_iter()
        .filter(|&pid| pid != me)
        .filter(|&pid| holds_pipe(pid, pipes))
        .filter(|&pid| is_live(pid))
        .collect()
}

/// Whether `pid` has a descriptor on one of the pipes whose inodes are
/// `pipes` now (as the calling thread's filesystem ids may look).
fn holds_pipe(pid: libc::pid_t, pipes: &[u64]) -> bool {
    std::fs::read_dir(format!("/proc/{pid}/fd")).is_ok_and(|fds| {
        fds.flatten().any(|fd| {
            std::fs::read_link(fd.path()).is_ok_and(|to| {
                pipes
                    .iter()
                    .any(|ino| to.as_os_str() == format!("pipe:[{ino}]").as_str())
            })
        })
    })
}

/// Runs `f` with the calling thread looking as `user` (its filesystem
/// ids), when given: the agent, root without `CAP_SYS_PTRACE`, may not read
/// the descriptors of another uid's processes, their owner may.
fn as_user<T>(user: Option<SandboxUser>, f: impl FnOnce() -> T) -> T {
    let Some(user) = user else { return f() };
    // SAFETY: raw syscalls: they change this thread's ids only.
    unsafe {
        libc::syscall(libc::SYS_setfsgid, user.gid);
        libc::syscall(libc::SYS_setfsuid, user.uid);
    }
    let out = f();
    // SAFETY: as above, back to root's.
    unsafe {
        libc::syscall(libc::SYS_setfsuid, 0);
        libc::syscall(libc::SYS_setfsgid, 0);
    }
    out
}

/// How long a call's output may stay open after its command exited: what
/// its last children still write in that time is kept.
pub const OUTPUT_GRACE: Duration = Duration::from_millis(200);

/// Ends the processes (not `me`) that still hold one of a call's output
/// `pipes` after its command exited and [`OUTPUT_GRACE`] passed: jobs left
/// in the background (`npm run dev &`) that would keep the call open until
/// its deadline. With the workload stopped first when its `user` is known
/// (see [`Freeze`]). Their names, as the call's stderr tells them.
pub fn end_pipe_holders(pipes: &[u64], me: libc::pid_t, user: Option<SandboxUser>) -> Vec<String> {
    let _frozen = user.and_then(Freeze::start);
    let mut killed = Vec::new();
    for _ in 0..SWEEPS {
        let holders = holding_pipes(pipes, me, user);
        if holders.is_empty() {
            break;
        }
        for &pid in &holders {
            let name = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            let name = format!("{} (pid {pid})", name.trim());
            if !killed.contains(&name) {
                killed.push(name);
            }
        }
        // It reaps nothing (see `kill_group`): a killed holder is a zombie,
        // which holds no descriptor.
        as_user(user, || {
            stop_then_kill_if(&holders, |pid| holds_pipe(pid, pipes))
        });
        std::thread::sleep(SWEEP_PAUSE);
    }
    killed
}

/// What a call's stderr says after [`end_pipe_holders`] killed `names`.
pub fn background_notice(names: &[String]) -> String {
    const NAMED: usize = 5;
    let mut named = names[..names.len().min(NAMED)].join(", ");
    if names.len() > NAMED {
        named.push_str(&format!(" and {} more", names.len() - NAMED));
    }
    format!(
        "[sandbox: the command exited, but {} background process(es) still held its output \
         and were killed so that it could end ({named}). To keep a job running after the \
         command, detach its output: `cmd >/tmp/cmd.log 2>&1 &`]\n",
        names.len(),
    )
}

/// The inode of a pipe end, to find the processes holding its other end.
pub fn pipe_inode(fd: std::os::fd::BorrowedFd<'_>) -> Option<u64> {
    use std::os::fd::AsRawFd;
    // SAFETY: fstat into a zeroed local.
    let mut stat: libc::stat = unsafe { std::mem::zeroed() };
    (unsafe { libc::fstat(fd.as_raw_fd(), &mut stat) } == 0).then_some(stat.st_ino)
}

/// Stops, then kills, every process of the group `gid` until none is left.
/// True when none is left.
///
/// With the sandbox `user` known, the whole workload is stopped first (see
/// [`Freeze`]): a member that forks and exits in a loop (a pid hopper)
/// cannot outrun the `/proc` walk. Without a user, or when the freeze
/// fails, members are stopped before any is killed, round after round.
///
/// It reaps nothing: in `serve`, a `waitpid(-1)` would take the exit status
/// of another call's `reap` from the thread waiting for it (members that
/// died are zombies of their own subreaper, and the sweep skips zombies).
pub fn kill_group(gid: libc::gid_t, user: Option<SandboxUser>) -> bool {
    let me = std::process::id() as libc::pid_t;
    let _frozen = user.and_then(Freeze::start);
    for _ in 0..SWEEPS {
        let members = in_group(gid, me);
        if members.is_empty() {
            return true;
        }
        stop_then_kill_if(&members, |pid| has_group(pid, gid));
        std::thread::sleep(SWEEP_PAUSE);
    }
    false
}

/// The whole workload stopped, until this drops.
///
/// A helper process becomes the sandbox user and sends `kill(-1, SIGSTOP)`:
/// the kernel signals every process that user may signal at once (never
/// root's agent, nor init, nor the helper), and a fork under way restarts
/// after the stop. It then waits for its release pipe to close and sends
/// `SIGCONT` the same way. The pipe closes when this guard drops *or when
/// the agent process dies*, so no path leaves the workload stopped. The
/// workload may stop the helper too (it is the same user): the agent,
/// which may signal it, continues it, and stops waiting after a bound.
/// Other calls of the same user pause for those milliseconds; a process of
/// theirs stopped on purpose is continued.
pub struct Freeze {
    helper: libc::pid_t,
    release: Option<std::os::fd::OwnedFd>,
}

/// How long the agent waits for the freeze helper to say the workload is
/// stopped, or to end after its release.
const FREEZE_PATIENCE: Duration = Duration::from_secs(1);

impl Freeze {
    /// Stops the workload of `user`; `None` (nothing stopped) when the
    /// helper could not do it in time.
    pub fn start(user: SandboxUser) -> Option<Freeze> {
        use std::os::fd::AsRawFd;
        let (stopped_read, stopped_write) = pipe()?;
        let (release_read, release_write) = pipe()?;
        let keep = [stopped_write.as_raw_fd(), release_read.as_raw_fd()];
        let groups = [user.gid];
        // SAFETY: the child makes raw syscalls only (it is a copy of a
        // multithreaded process), on memory prepared before the fork.
        let helper = unsafe { libc::fork() };
        if helper == 0 {
            // SAFETY: as above; the child never returns.
            unsafe { freeze_helper(user, &groups, keep) };
        }
        drop(stopped_write);
        drop(release_read);
        if helper < 0 {
            return None;
        }
        let freeze = Freeze {
            helper,
            release: Some(release_write),
        };
        // One byte once the SIGSTOP went out; EOF when the helper failed.
        if wait_readable(stopped_read.as_raw_fd(), FREEZE_PATIENCE) && read_byte(&stopped_read) {
            Some(freeze)
        } else {
            None // dropped: released, waited for (or killed)
        }
    }
}

impl Drop for Freeze {
    fn drop(&mut self) {
        drop(self.release.take());
        let give_up = std::time::Instant::now() + FREEZE_PATIENCE;
        loop {
            let mut status = 0;
            // SAFETY: waitpid on our own child, into a local.
            let got =
                unsafe { libc::waitpid(self.helper, &mut status, libc::WNOHANG | libc::WUNTRACED) };
            // Gone, or reaped by another thread's wait for any child.
            if got < 0 || (got == self.helper && !libc::WIFSTOPPED(status)) {
                return;
            }
            if got == self.helper || std::time::Instant::now() >= give_up {
                // The workload stopped the helper, or it hangs: go on.
                // SAFETY: signalling our own child.
                unsafe { libc::kill(self.helper, libc::SIGCONT) };
            }
            if std::time::Instant::now() >= give_up + FREEZE_PATIENCE {
                // SAFETY: as above; the workload is continued by hand.
                unsafe { libc::kill(self.helper, libc::SIGKILL) };
                continue_all(self.helper);
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// The helper, in the forked child: become `user`, stop the workload, say
/// so on `keep[0]`, wait for `keep[1]` to close, continue the workload.
///
/// # Safety
/// Only in a child just forked: raw syscalls, no allocation; never returns.
unsafe fn freeze_helper(user: SandboxUser, groups: &[libc::gid_t; 1], keep: [libc::c_int; 2]) -> ! {
    let [stopped, release] = keep;
    // Hold nothing of the agent's (its pipes above all: a holder of a
    // call's output pipe would be taken for the workload's).
    for fd in 3..4096 {
        if fd != stopped && fd != release {
            libc::close(fd);
        }
    }
    let became = libc::syscall(libc::SYS_setgroups, 1, groups.as_ptr()) == 0
        && libc::syscall(libc::SYS_setgid, user.gid) == 0
        && libc::syscall(libc::SYS_setuid, user.uid) == 0
        && libc::syscall(libc::SYS_getuid) == user.uid as libc::c_long
        // A copy of the agent's memory that never execs: not the
        // workload's to trace, whatever `fs.suid_dumpable` says.
        && libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) == 0;
    if !became {
        libc::_exit(1);
    }
    libc::syscall(libc::SYS_kill, -1, libc::SIGSTOP);
    let byte = [1u8];
    libc::write(stopped, byte.as_ptr().cast(), 1);
    let mut buf = [0u8; 1];
    // Until EOF: the agent released us, or died.
    loop {
        let n = libc::read(release, buf.as_mut_ptr().cast(), 1);
        if n == 0 || (n < 0 && *libc::__errno_location() != libc::EINTR) {
            break;
        }
    }
    libc::syscall(libc::SYS_kill, -1, libc::SIGCONT);
    libc::_exit(0);
}

/// Continues every stopped process but `except`, as root (the last resort
/// when the helper could not).
fn continue_all(except: libc::pid_t) {
    let me = std::process::id() as libc::pid_t;
    for pid in pids().unwrap_or_default() {
        if pid != me && pid != except && pid != 1 {
            // SAFETY: signalling a pid; a stale one fails harmlessly.
            unsafe { libc::kill(pid, libc::SIGCONT) };
        }
    }
}

/// A close-on-exec pipe: (read end, write end).
pub fn pipe() -> Option<(std::os::fd::OwnedFd, std::os::fd::OwnedFd)> {
    use std::os::fd::FromRawFd;
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills the local array with two new descriptors.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return None;
    }
    // SAFETY: both are new and owned by nobody else.
    Some(unsafe {
        (
            std::os::fd::OwnedFd::from_raw_fd(fds[0]),
            std::os::fd::OwnedFd::from_raw_fd(fds[1]),
        )
    })
}

/// Whether `fd` becomes readable (data or EOF) within `patience`.
fn wait_readable(fd: libc::c_int, patience: Duration) -> bool {
    let mut poll = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = patience.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: poll on one local pollfd.
    unsafe { libc::poll(&mut poll, 1, ms) > 0 }
}

/// Whether a byte could be read (not EOF).
fn read_byte(fd: &std::os::fd::OwnedFd) -> bool {
    use std::os::fd::AsRawFd;
    let mut buf = [0u8; 1];
    // SAFETY: reading one byte into a local.
    unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), 1) == 1 }
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

    #[test]
    fn a_signal_reaches_only_a_process_that_still_passes_its_check() {
        use std::os::unix::process::ExitStatusExt;
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id() as libc::pid_t;
        // Failing its check (say, its pid now names another process): spared.
        assert_eq!(signal_if(&[pid], &[libc::SIGKILL], |_| false), 0);
        assert!(child.try_wait().unwrap().is_none(), "killed though spared");
        assert_eq!(signal_if(&[pid], &[libc::SIGKILL], |p| p == pid), 1);
        let status = child.wait().unwrap();
        assert_eq!(status.signal(), Some(libc::SIGKILL));
        // Gone and reaped: nothing left to hold.
        let gone = pidfd_open(pid).err().and_then(|e| e.raw_os_error());
        assert!(
            matches!(gone, Some(libc::ESRCH) | Some(libc::ENOSYS)),
            "{gone:?}"
        );
    }

    #[test]
    fn a_tree_signal_spares_a_member_no_longer_hanging_from_the_tree() {
        use std::os::unix::process::ExitStatusExt;
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id() as libc::pid_t;
        let me = std::process::id() as libc::pid_t;
        // Listed under another root (its pid reused since, say): spared.
        let other_root = 1;
        assert_eq!(
            signal_tree(&[other_root], &[pid], &[libc::SIGKILL], |_| false),
            0
        );
        assert!(child.try_wait().unwrap().is_none(), "killed though spared");
        // A root that fails its check is spared; its child, a root failing
        // its check too but hanging from the tree (a marked child of a
        // marked `reap`), is not.
        assert_eq!(
            signal_tree(&[me, pid], &[pid], &[libc::SIGKILL], |_| false),
            1
        );
        let status = child.wait().unwrap();
        assert_eq!(status.signal(), Some(libc::SIGKILL));
    }
}

//! `sandbox-agent reap [--timeout-ms N] [--user UID:GID --group GID] [--tty]
//! [--report-fd FD] -- PROGRAM [ARGS...]`: one call.
//!
//! With `--user` and `--group` (serve's calls: this runs as root) PROGRAM
//! runs as the sandbox user in the call's own supplementary group, with no
//! capability (see `identity.rs`); at the deadline every process of that
//! group is stopped and killed, wherever it went, and the workload cannot
//! kill this process to escape it.
//!
//! Without them (a `docker exec` as the sandbox user, the host's fallback)
//! it runs PROGRAM as its child with `PR_SET_CHILD_SUBREAPER` set, so every
//! process the call starts stays in its tree even when it double-forks,
//! calls `setsid`, or clears its environment (`env -i`): orphans are
//! re-parented to the agent, not to the container's init. At the deadline
//! the agent stops and kills that whole tree, and exits 124
//! ([`EXIT_TIMED_OUT`], as `timeout(1)`). Otherwise it exits with PROGRAM's
//! status (128+signal when killed) when PROGRAM exits: its output is
//! relayed until every holder closes it, or for 200 ms more at most; a
//! background job still holding the output then (`npm run dev &`) is
//! killed, named on stderr, and counted on `--report-fd` (for `serve`'s
//! `exit` frame). A background job that detached its output
//! (`cmd >log 2>&1 &`) outlives the call.

use std::io::{Read, Write};
use std::process::{exit, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sandbox_agent::protocol::{EXIT_CANNOT_RUN, EXIT_NOT_FOUND, EXIT_TIMED_OUT};

use crate::identity::{self, SandboxUser};
use crate::{procs, AGENT_FAILED};

/// Set by the watchdog once the deadline passed.
static EXPIRED: AtomicBool = AtomicBool::new(false);

/// The verb: `args` are those after `reap`; the call's exit status.
pub fn main(args: &[String]) -> i32 {
    let Reap {
        timeout,
        drop_to,
        report_fd,
        tty,
        program,
    } = match parse(args) {
        Ok(parsed) => parsed,
        Err(e) => {
            eprintln!(
                "sandbox-agent: {e}\nusage: sandbox-agent reap [--timeout-ms N] \
                 [--user UID:GID --group GID] [--report-fd FD] [--tty] -- PROGRAM [ARGS...]"
            );
            return AGENT_FAILED;
        }
    };
    if let Some(fd) = report_fd {
        // SAFETY: fcntl on an integer fd; the workload must not inherit it.
        if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } != 0 {
            eprintln!("sandbox-agent: --report-fd {fd}: not an open descriptor");
            return AGENT_FAILED;
        }
    }
    let mut command = Command::new(&program[0]);
    command.args(&program[1..]);
    if tty {
        use std::os::unix::process::CommandExt;
        // The workload may make this process's group the terminal's
        // foreground group (same session): the keys' signals are ignored
        // here, and set back to their defaults in PROGRAM.
        for signal in TERMINAL_SIGNALS {
            // SAFETY: setting a disposition, before any thread.
            unsafe { libc::signal(signal, libc::SIG_IGN) };
        }
        // SAFETY: setpgid, signal and tcsetpgrp only, between fork and exec.
        unsafe { command.pre_exec(foreground) };
    } else {
        command.stdout(Stdio::piped()).stderr(Stdio::piped());
    }
    match drop_to {
        Some((user, group)) if identity::can_drop() => {
            use std::os::unix::process::CommandExt;
            let filter = crate::seccomp::Filter::new();
            // SAFETY: drop_to makes async-signal-safe syscalls only.
            unsafe { command.pre_exec(move || identity::drop_to(user, group, &filter)) };
        }
        Some(_) => {
            eprintln!("sandbox-agent: --user needs root");
            return AGENT_FAILED;
        }
        None => {
            // SAFETY: prctl with integer arguments only.
            if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
                eprintln!(
                    "sandbox-agent: PR_SET_CHILD_SUBREAPER: {}",
                    std::io::Error::last_os_error()
                );
                return AGENT_FAILED;
            }
        }
    }
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(e) => {
            eprintln!("sandbox-agent: {}: {e}", program[0]);
            return i32::from(if e.kind() == std::io::ErrorKind::NotFound {
                EXIT_NOT_FOUND
            } else {
                EXIT_CANNOT_RUN
            });
        }
    };
    let pipes: Vec<u64> = [
        pipe_inode(child.stdout.as_ref()),
        pipe_inode(child.stderr.as_ref()),
    ]
    .into_iter()
    .flatten()
    .collect();
    // Relayed until every holder of the pipes closes them; each relay says
    // on `ended` when its pipe is done.
    let (ended_tx, ended) = std::sync::mpsc::channel();
    let relays = [
        relay(child.stdout.take(), std::io::stdout(), ended_tx.clone()),
        relay(child.stderr.take(), std::io::stderr(), ended_tx),
    ];
    if let Some(timeout) = timeout {
        watch(timeout, drop_to);
    }
    let status = wait_for(child.id() as libc::pid_t);
    let relays: Vec<_> = relays.into_iter().flatten().collect();
    let background = end_background(&relays, &ended, &pipes, drop_to.map(|(user, _)| user));
    for relay in relays {
        let _ = relay.join();
    }
    if !background.is_empty() && !EXPIRED.load(Ordering::SeqCst) {
        eprint!("{}", procs::background_notice(&background));
    }
    if let Some(fd) = report_fd {
        let report = format!("{}\n", background.len());
        // SAFETY: writing a local buffer to the report fd.
        unsafe { libc::write(fd, report.as_ptr().cast(), report.len()) };
    }
    if EXPIRED.load(Ordering::SeqCst) {
        // The watchdog is ending the tree; it exits for us.
        loop {
            std::thread::park();
        }
    }
    status
}

/// The signals a terminal's keys send (and its background-group checks).
const TERMINAL_SIGNALS: [libc::c_int; 5] = [
    libc::SIGINT,
    libc::SIGQUIT,
    libc::SIGTSTP,
    libc::SIGTTIN,
    libc::SIGTTOU,
];

/// In the child about to exec PROGRAM on a terminal: a process group of
/// its own, made the terminal's foreground group (SIGTTOU, which a
/// background group's `tcsetpgrp` raises, is ignored for the call only).
fn foreground() -> std::io::Result<()> {
    // SAFETY: async-signal-safe calls with integer arguments.
    unsafe {
        for signal in TERMINAL_SIGNALS {
            libc::signal(signal, libc::SIG_DFL);
        }
        if libc::setpgid(0, 0) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let before = libc::signal(libc::SIGTTOU, libc::SIG_IGN);
        let set = libc::tcsetpgrp(0, libc::getpid());
        libc::signal(libc::SIGTTOU, before);
        if set != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// One call, as its command line gives it.
#[derive(Debug)]
struct Reap {
    /// None: no deadline.
    timeout: Option<Duration>,
    /// Whom the program runs as, and the call's group.
    drop_to: Option<(SandboxUser, libc::gid_t)>,
    /// Where `serve` reads how many background processes were killed.
    report_fd: Option<libc::c_int>,
    /// PROGRAM runs on this process's terminal (see the module doc).
    tty: bool,
    program: Vec<String>,
}

fn parse(args: &[String]) -> Result<Reap, String> {
    let mut it = args.iter();
    let (mut timeout, mut user, mut group, mut report_fd) = (None, None, None, None);
    let mut tty = false;
    loop {
        match it.next().map(String::as_str) {
            Some("--tty") => tty = true,
            Some("--timeout-ms") => {
                let ms: u64 = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .ok_or("--timeout-ms needs a number of milliseconds")?;
                timeout = Some(Duration::from_millis(ms));
            }
            Some("--user") => {
                user = Some(SandboxUser::parse(
                    it.next().ok_or("--user needs UID:GID")?,
                )?);
            }
            Some("--group") => {
                let gid: libc::gid_t = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .filter(|g| *g != 0)
                    .ok_or("--group needs a non-root numeric group")?;
                group = Some(gid);
            }
            Some("--report-fd") => {
                let fd: libc::c_int = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .filter(|fd| *fd > 2)
                    .ok_or("--report-fd needs a descriptor above 2")?;
                report_fd = Some(fd);
            }
            Some("--") => break,
            other => return Err(format!("unexpected argument {other:?}")),
        }
    }
    let drop_to = match (user, group) {
        (Some(user), Some(group)) => Some((user, group)),
        (None, None) => None,
        _ => return Err("--user and --group go together".into()),
    };
    let program: Vec<String> = it.cloned().collect();
    if program.is_empty() {
        return Err("no program to run".into());
    }
    Ok(Reap {
        timeout,
        drop_to,
        report_fd,
        tty,
        program,
    })
}

/// At the deadline, ends the call (its group when it has one, else this
/// process's whole tree) and exits 124.
fn watch(timeout: Duration, call: Option<(SandboxUser, libc::gid_t)>) {
    let me = std::process::id() as libc::pid_t;
    std::thread::spawn(move || {
        std::thread::sleep(timeout);
        EXPIRED.store(true, Ordering::SeqCst);
        match call {
            Some((user, group)) => {
                procs::kill_group(group, Some(user));
            }
            None => kill_tree(me),
        }
        exit(i32::from(EXIT_TIMED_OUT));
    });
}

fn relay(
    from: Option<impl Read + Send + 'static>,
    mut to: impl Write + Send + 'static,
    ended: std::sync::mpsc::Sender<()>,
) -> Option<std::thread::JoinHandle<()>> {
    let mut from = from?;
    Some(std::thread::spawn(move || {
        // Said however the loop ends (the guard drops with the thread).
        struct Ended(std::sync::mpsc::Sender<()>);
        impl Drop for Ended {
            fn drop(&mut self) {
                let _ = self.0.send(());
            }
        }
        let _ended = Ended(ended);
        let mut buf = [0u8; 16 * 1024];
        loop {
            match from.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => {
                    if to.write_all(&buf[..n]).and_then(|()| to.flush()).is_err() {
                        return;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    }))
}

/// Reaps children (the call's and adopted orphans) until `child` exits;
/// its shell-style status.
fn wait_for(child: libc::pid_t) -> i32 {
    match procs::reap_until(child) {
        Some(status) if libc::WIFEXITED(status) => libc::WEXITSTATUS(status),
        Some(status) if libc::WIFSIGNALED(status) => 128 + libc::WTERMSIG(status),
        _ => AGENT_FAILED,
    }
}

/// The call ends when its command exits. Processes it left in the
/// background that still hold its output (`npm run dev &`) would keep it
/// open until the timeout: after [`procs::OUTPUT_GRACE`] they are killed,
/// and their names returned. Processes that detached their output
/// (`cmd >log 2>&1 &`) hold no pipe and live on.
fn end_background(
    relays: &[std::thread::JoinHandle<()>],
    ended: &std::sync::mpsc::Receiver<()>,
    pipes: &[u64],
    user: Option<SandboxUser>,
) -> Vec<String> {
    let settled = std::time::Instant::now() + procs::OUTPUT_GRACE;
    let mut open = relays.len();
    while open > 0 {
        let left = settled.saturating_duration_since(std::time::Instant::now());
        match ended.recv_timeout(left) {
            Ok(()) => open -= 1,
            Err(_) => break,
        }
    }
    if open == 0 || pipes.is_empty() {
        return Vec::new();
    }
    let killed = procs::end_pipe_holders(pipes, std::process::id() as libc::pid_t, user);
    procs::reap_zombies();
    killed
}

/// The inode of a pipe end, to find the processes holding its other end.
fn pipe_inode(pipe: Option<&impl std::os::fd::AsFd>) -> Option<u64> {
    procs::pipe_inode(pipe?.as_fd())
}

/// Stops, then kills, every live descendant of `root`, until none is left.
fn kill_tree(root: libc::pid_t) {
    for _ in 0..procs::SWEEPS {
        let tree = procs::descendants(root);
        if tree.is_empty() {
            return;
        }
        procs::stop_then_kill_tree(&[root], &tree, |_| false);
        procs::reap_zombies();
        std::thread::sleep(procs::SWEEP_PAUSE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_are_strict() {
        let args = |s: &[&str]| s.iter().map(|a| a.to_string()).collect::<Vec<_>>();
        let r = parse(&args(&["--timeout-ms", "5", "--", "sh", "-c", "x"])).unwrap();
        assert_eq!(
            (r.timeout, r.program.len()),
            (Some(Duration::from_millis(5)), 3)
        );
        let r = parse(&args(&["--", "true"])).unwrap();
        assert_eq!((r.timeout, r.program.len(), r.drop_to), (None, 1, None));
        let r = parse(&args(&[
            "--user",
            "7:8",
            "--group",
            "1073741824",
            "--",
            "id",
        ]))
        .unwrap();
        assert_eq!(
            r.drop_to.map(|(u, g)| (u.uid, u.gid, g)),
            Some((7, 8, 1 << 30))
        );
        assert!(parse(&args(&["--user", "7:8", "--", "id"])).is_err());
        assert!(parse(&args(&["--group", "9", "--", "id"])).is_err());
        assert!(parse(&args(&["--user", "0:0", "--group", "9", "--", "id"])).is_err());
        assert!(parse(&args(&["--user", "7:8", "--group", "0", "--", "id"])).is_err());
        assert!(parse(&args(&["--"])).is_err());
        assert!(parse(&args(&["--timeout-ms", "x", "--", "sh"])).is_err());
        assert!(parse(&args(&["sh"])).is_err());
    }
}

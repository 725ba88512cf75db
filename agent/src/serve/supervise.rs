//! A call `serve` supervises itself: `sh -c COMMAND` as its own child, as
//! the sandbox user in the call's group, with no `reap` between them.
//!
//! Why: a warm execute is mostly process creation, and `reap` doubled it
//! (an exec of the agent, then its fork and exec of the shell, and five
//! threads between the two processes). Here one loop on the call's thread
//! does what `reap` did: it relays the output as frames, feeds stdin,
//! notices the command's exit (through a pidfd; a short tick where the
//! kernel has none), ends what still holds the output
//! [`procs::OUTPUT_GRACE`] after it, and ends the call's group at its
//! deadline (exit 124, as `reap` and `timeout(1)`).
//!
//! What `reap`'s separate process gave, kept: the call's processes carry
//! its group wherever they go; the group is derived from the call's
//! marker ([`crate::identity::marker_group`]), so when `serve` itself is
//! gone the host's `sandbox-agent kill MARKER` still finds and ends them
//! (and the host keeps its own deadline, which sends that kill).

use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

use sandbox_agent::protocol::{Reply, CHUNK, EXIT_TIMED_OUT};

use super::Replies;
use crate::identity::SandboxUser;
use crate::procs;

/// How often the exit is looked for where there is no pidfd (gVisor may
/// lack `pidfd_open`), while the output stays open.
const TICK: Duration = Duration::from_millis(20);
/// How long, past the deadline's kill, the output may stay open before
/// the call ends anyway (a descriptor passed to a process outside the
/// group keeps it open).
const AFTER_KILL: Duration = Duration::from_secs(1);

/// What ended the call.
pub(super) struct Ended {
    /// Its shell-style status (124 at the deadline).
    pub code: u8,
    /// Background processes killed because they held its output.
    pub background_killed: u32,
}

/// One output pipe of the command.
struct Output {
    pipe: OwnedFd,
    stdout: bool,
}

/// Stdin bytes still to write, and the pipe they go to.
struct Feed {
    pipe: OwnedFd,
    bytes: Vec<u8>,
    written: usize,
}

/// Supervises `child` (already in `group` as `user`) until it exited and
/// its output closed, or its deadline `timeout` after now; relays its
/// output to `replies` as frames of call `id`.
pub(super) fn supervise(
    mut child: Child,
    stdin: Option<Vec<u8>>,
    timeout: Duration,
    (user, group): (SandboxUser, libc::gid_t),
    replies: &Replies,
    id: &str,
) -> Ended {
    let deadline = Instant::now() + timeout;
    let me = std::process::id() as libc::pid_t;
    let mut outputs: Vec<Output> = [
        child.stdout.take().map(|p| (OwnedFd::from(p), true)),
        child.stderr.take().map(|p| (OwnedFd::from(p), false)),
    ]
    .into_iter()
    .flatten()
    .map(|(pipe, stdout)| Output { pipe, stdout })
    .collect();
    let pipes: Vec<u64> = outputs
        .iter()
        .filter_map(|o| procs::pipe_inode(o.pipe.as_fd()))
        .collect();
    let mut feed = match (child.stdin.take(), stdin) {
        (Some(pipe), Some(bytes)) => {
            let pipe = OwnedFd::from(pipe);
            set_nonblocking(pipe.as_raw_fd());
            Some(Feed {
                pipe,
                bytes,
                written: 0,
            })
        }
        // No bytes: the pipe (if any) closes here, the command reads EOF.
        _ => None,
    };
    let pidfd = crate::procs::pidfd_open(child.id() as libc::pid_t).ok();
    let mut status: Option<ExitStatus> = None;
    let mut exited_at: Option<Instant> = None;
    let mut expired_at: Option<Instant> = None;
    let mut swept = false;
    let mut background = Vec::new();
    let mut buf = vec![0u8; CHUNK];
    loop {
        if status.is_none() {
            if let Ok(Some(s)) = child.try_wait() {
                status = Some(s);
                exited_at = Some(Instant::now());
            }
        }
        if status.is_some() && outputs.is_empty() {
            break;
        }
        let now = Instant::now();
        if expired_at.is_none() && now >= deadline {
            expired_at = Some(now);
            feed = None;
            procs::kill_group(group, Some(user));
            continue;
        }
        if let Some(at) = expired_at {
            if now >= at + AFTER_KILL {
                // Whatever still holds the output is outside the call.
                outputs.clear();
                if status.is_none() {
                    let _ = child.kill();
                    status = child.wait().ok();
                }
                break;
            }
        }
        if let (Some(at), false, None) = (exited_at, outputs.is_empty(), expired_at) {
            if !swept && now >= at + procs::OUTPUT_GRACE {
                swept = true;
                background = procs::end_pipe_holders(&pipes, me, Some(user));
                continue;
            }
            if swept && now >= at + procs::OUTPUT_GRACE * 2 {
                // Held by no process of the workload's that could be
                // found: the call ends without the rest.
                outputs.clear();
                continue;
            }
        }
        // What the poll waits for, and how long.
        let mut wake = if expired_at.is_none() {
            deadline
        } else {
            now + TICK
        };
        if let Some(at) = exited_at {
            let grace = if swept {
                procs::OUTPUT_GRACE * 2
            } else {
                procs::OUTPUT_GRACE
            };
            wake = wake.min(at + grace);
        }
        let mut fds: Vec<libc::pollfd> = outputs
            .iter()
            .map(|o| pollfd(o.pipe.as_raw_fd(), libc::POLLIN))
            .collect();
        let feed_at = feed.as_ref().map(|f| {
            fds.push(pollfd(f.pipe.as_raw_fd(), libc::POLLOUT));
            fds.len() - 1
        });
        // The pidfd only wakes the poll: the exit is taken at the top.
        match (&pidfd, status) {
            (Some(fd), None) => fds.push(pollfd(fd.as_raw_fd(), libc::POLLIN)),
            (None, None) => wake = wake.min(now + TICK),
            _ => {}
        }
        let ms = wake
            .saturating_duration_since(now)
            .as_millis()
            .clamp(1, i32::MAX as u128) as i32;
        // SAFETY: poll on a local array of pollfds.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
        if ready <= 0 {
            continue;
        }
        if let (Some(at), Some(f)) = (feed_at, feed.as_mut()) {
            if fds[at].revents != 0 && !f.write_some() {
                feed = None;
            }
        }
        // Outputs are the first entries, in order: read the ready ones,
        // drop those at their end.
        let mut index = 0;
        outputs.retain(|output| {
            let revents = fds[index].revents;
            index += 1;
            if revents == 0 {
                return true;
            }
            relay_once(output, &mut buf, (replies, deadline), id)
        });
    }
    let code = if expired_at.is_some() {
        EXIT_TIMED_OUT
    } else {
        super::call::status_of(status.ok_or_else(|| std::io::Error::other("not waited")))
    };
    if !background.is_empty() && expired_at.is_none() {
        replies.say(Reply::Stderr {
            id: id.to_owned(),
            data: procs::background_notice(&background).into_bytes(),
        });
    }
    Ended {
        code,
        background_killed: u32::try_from(background.len()).unwrap_or(u32::MAX),
    }
}

impl Feed {
    /// Writes what the pipe takes now; false once done or refused (the
    /// command closed its stdin): the pipe then closes.
    fn write_some(&mut self) -> bool {
        let rest = &self.bytes[self.written..];
        // SAFETY: writing from a live slice to an owned descriptor.
        let n = unsafe { libc::write(self.pipe.as_raw_fd(), rest.as_ptr().cast(), rest.len()) };
        if n < 0 {
            return std::io::Error::last_os_error().kind() == std::io::ErrorKind::WouldBlock;
        }
        self.written += n as usize;
        self.written < self.bytes.len()
    }
}

/// Reads what `output` holds now and says it; false at its end.
fn relay_once(
    output: &Output,
    buf: &mut [u8],
    (replies, deadline): (&Replies, Instant),
    id: &str,
) -> bool {
    // SAFETY: reading into a live buffer from an owned descriptor.
    let n = unsafe { libc::read(output.pipe.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted;
    }
    if n == 0 {
        return false;
    }
    let (id, data) = (id.to_owned(), buf[..n as usize].to_vec());
    let reply = if output.stdout {
        Reply::Stdout { id, data }
    } else {
        Reply::Stderr { id, data }
    };
    replies.say_by(reply, deadline)
}

fn pollfd(fd: RawFd, events: libc::c_short) -> libc::pollfd {
    libc::pollfd {
        fd,
        events,
        revents: 0,
    }
}

fn set_nonblocking(fd: RawFd) {
    // SAFETY: fcntl on an owned descriptor.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags >= 0 {
            libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK);
        }
    }
}

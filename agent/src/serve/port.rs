//! `port ID PIPE PORT`: a connection to a server of the workload's, carried
//! on a plane pipe the host offered.
//!
//! It runs `sandbox-agent connect PORT` under `reap`, as the sandbox user in
//! a group of its own (the connection comes from the sandbox's own
//! loopback, as a browser inside it would make it), with the pipe as its
//! stdin and stdout: the bytes go straight between the host and the
//! server, not through `serve`. `connect` says on stderr whether it
//! connected; `serve` answers `done ID ok` then, or the reason as a
//! `stderr` frame and `done ID invalid`, and waits for it to end.

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};

use sandbox_agent::protocol::{DoneStatus, Reply, AGENT_MOUNT};

use super::call::connect_pipe;
use super::Replies;
use crate::identity::{CallGroups, SandboxUser};

/// The line `connect` says once connected.
const CONNECTED: &str = "sandbox-agent: connected";

/// Carries `port` on the pipe `pipe`, on a thread of its own.
pub(super) fn start(
    id: String,
    pipe: String,
    port: u16,
    run_as: Option<(SandboxUser, &CallGroups)>,
    replies: &Replies,
) {
    let run_as = run_as.map(|(user, groups)| (user, groups.next()));
    let replies = replies.clone();
    let spawned = std::thread::Builder::new().spawn({
        let (id, replies) = (id.clone(), replies.clone());
        move || carry(id, &pipe, port, run_as, &replies)
    });
    if spawned.is_err() {
        refuse(&replies, id, "no thread to spare");
    }
}

fn refuse(replies: &Replies, id: String, why: &str) {
    replies.say(Reply::Stderr {
        id: id.clone(),
        data: format!("sandbox-agent: {why}\n").into_bytes(),
    });
    replies.say(Reply::Done {
        id,
        status: DoneStatus::Invalid,
    });
}

fn carry(
    id: String,
    pipe: &str,
    port: u16,
    run_as: Option<(SandboxUser, libc::gid_t)>,
    replies: &Replies,
) {
    let stream = match connect_pipe(pipe) {
        Ok(stream) => stream,
        Err(e) => return refuse(replies, id, &format!("the host's pipe: {e}")),
    };
    let exe = std::env::current_exe().unwrap_or_else(|_| AGENT_MOUNT.into());
    let mut cmd = Command::new(exe);
    cmd.arg("reap");
    if let Some((user, group)) = run_as {
        cmd.args(["--user", &user.arg(), "--group", &group.to_string()]);
    }
    cmd.args(["--", AGENT_MOUNT, "connect", &port.to_string()]);
    let output = match stream.try_clone() {
        Ok(output) => output,
        Err(e) => return refuse(replies, id, &format!("the host's pipe: {e}")),
    };
    cmd.stdin(Stdio::from(std::os::fd::OwnedFd::from(stream)))
        .stdout(Stdio::from(std::os::fd::OwnedFd::from(output)))
        .stderr(Stdio::piped());
    let mut child = match cmd.spawn() {
        Ok(child) => child,
        Err(e) => return refuse(replies, id, &format!("cannot connect: {e}")),
    };
    // The pipe is the child's alone now (`cmd` held the parent's copies).
    drop(cmd);
    let mut said = BufReader::new(child.stderr.take().expect("piped"));
    let mut line = String::new();
    let _ = said.by_ref().take(4096).read_line(&mut line);
    if line.trim_end() == CONNECTED {
        replies.say(Reply::Done {
            id,
            status: DoneStatus::Ok,
        });
    } else {
        let why = if line.trim().is_empty() {
            "the connection could not be made".to_owned()
        } else {
            line.trim().trim_start_matches("sandbox-agent: ").to_owned()
        };
        refuse(replies, id, &why);
    }
    // It ends with its connection; its stderr stays open until then.
    let _ = child.wait();
    drop(said);
}

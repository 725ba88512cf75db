//! `sandbox-agent`: the host's helper inside every sandbox container,
//! bind-mounted read-only at `/.sandbox/agent` (statically linked: any image
//! works).
//!
//! ```text
//! sandbox-agent init
//! sandbox-agent serve
//! sandbox-agent respawn
//! sandbox-agent reap --timeout-ms N -- PROGRAM [ARGS...]
//! sandbox-agent kill MARKER
//! ```
//!
//! `init` is the container's main process (under tini): it keeps `serve`
//! running, which takes the host's requests on the container's attach
//! stream and runs each exec under `reap` (see `serve.rs`). `respawn` kills
//! a `serve` that stopped answering, for `init` to start anew.
//!
//! Runs PROGRAM as its child with `PR_SET_CHILD_SUBREAPER` set, so every
//! process the call starts stays in its tree even when it double-forks,
//! calls `setsid`, or clears its environment (`env -i`): orphans are
//! re-parented to the agent, not to the container's init. At the deadline
//! the agent stops and kills that whole tree, and exits 124 (as
//! `timeout(1)`). Otherwise it exits with PROGRAM's status (128+signal when
//! killed) once the call's output ends, that is when every process holding
//! its stdout or stderr has closed them: the semantics of a plain exec. A
//! background job that detached its output (`cmd >log 2>&1 &`) outlives the
//! call; one still writing to the call's output keeps the call open.
//!
//! `kill MARKER` ends a call the host gave up on (cancelled, timed out, its
//! client gone): every process carrying the call's marker in its
//! environment, and their descendants, without forking.
//!
//! Untrusted surroundings: the workload runs as the same user and may kill
//! the agent; the host keeps its own deadline and kill as a fallback, and
//! never takes anything but this exit status from the agent.

use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::process::{exit, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Exit status of a call stopped at its deadline.
const TIMED_OUT: i32 = 124;
/// Exit status when the agent itself cannot run the call.
const AGENT_FAILED: i32 = 125;

static EXPIRED: AtomicBool = AtomicBool::new(false);

mod serve;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match (args.first().map(String::as_str), args.len()) {
        (Some("init"), 1) => exit(serve::init()),
        (Some("serve"), 1) => exit(serve::serve()),
        (Some("respawn"), 1) => exit(serve::respawn()),
        _ => {}
    }
    if args.first().map(String::as_str) == Some("kill") {
        exit(match args.get(1) {
            Some(marker) if args.len() == 2 && valid_marker(marker) => kill_marked(marker),
            _ => {
                eprintln!("usage: sandbox-agent kill MARKER");
                AGENT_FAILED
            }
        });
    }
    let (timeout, program) = match parse(&args) {
        Ok(parsed) => parsed,
        Err(e) => {
            eprintln!(
                "sandbox-agent: {e}\nusage: sandbox-agent reap --timeout-ms N -- PROGRAM [ARGS...]"
            );
            exit(AGENT_FAILED);
        }
    };
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
        eprintln!(
            "sandbox-agent: PR_SET_CHILD_SUBREAPER: {}",
            std::io::Error::last_os_error()
        );
        exit(AGENT_FAILED);
    }
    let mut child = match Command::new(&program[0])
        .args(&program[1..])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(child) => child,
        Err(e) => {
            eprintln!("sandbox-agent: {}: {e}", program[0]);
            exit(if e.kind() == std::io::ErrorKind::NotFound {
                127
            } else {
                126
            });
        }
    };
    // Relayed until every holder of the pipes closes them.
    let relays = [
        relay(child.stdout.take(), std::io::stdout()),
        relay(child.stderr.take(), std::io::stderr()),
    ];
    let child = child.id() as libc::pid_t;
    let me = std::process::id() as libc::pid_t;
    if let Some(timeout) = timeout {
        std::thread::spawn(move || {
            std::thread::sleep(timeout);
            EXPIRED.store(true, Ordering::SeqCst);
            kill_tree(me);
            exit(TIMED_OUT);
        });
    }
    let status = wait_for(child);
    for relay in relays.into_iter().flatten() {
        let _ = relay.join();
    }
    if EXPIRED.load(Ordering::SeqCst) {
        // The watchdog is ending the tree; it exits for us.
        loop {
            std::thread::park();
        }
    }
    exit(status);
}

fn relay(
    from: Option<impl Read + Send + 'static>,
    mut to: impl Write + Send + 'static,
) -> Option<std::thread::JoinHandle<()>> {
    let mut from = from?;
    Some(std::thread::spawn(move || {
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

fn parse(args: &[String]) -> Result<(Option<Duration>, Vec<String>), String> {
    let mut it = args.iter();
    if it.next().map(String::as_str) != Some("reap") {
        return Err("the only command is `reap`".into());
    }
    let mut timeout = None;
    loop {
        match it.next().map(String::as_str) {
            Some("--timeout-ms") => {
                let ms: u64 = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .ok_or("--timeout-ms needs a number of milliseconds")?;
                timeout = Some(Duration::from_millis(ms));
            }
            Some("--") => break,
            other => return Err(format!("unexpected argument {other:?}")),
        }
    }
    let program: Vec<String> = it.cloned().collect();
    if program.is_empty() {
        return Err("no program to run".into());
    }
    Ok((timeout, program))
}

/// Reaps children (the call's and adopted orphans) until `child` exits;
/// its shell-style status.
fn wait_for(child: libc::pid_t) -> i32 {
    loop {
        let mut status = 0;
        // SAFETY: waitpid writes the status into a local.
        let pid = unsafe { libc::waitpid(-1, &mut status, 0) };
        if pid == child {
            if libc::WIFEXITED(status) {
                return libc::WEXITSTATUS(status);
            }
            if libc::WIFSIGNALED(status) {
                return 128 + libc::WTERMSIG(status);
            }
        } else if pid < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return AGENT_FAILED;
        }
    }
}

/// Stops, then kills, every live descendant of `root`, until none is left.
/// Stopping first means a fork loop cannot outrun the sweep.
fn kill_tree(root: libc::pid_t) {
    for _ in 0..200 {
        let tree = descendants(root);
        if tree.is_empty() {
            return;
        }
        for &pid in &tree {
            // SAFETY: signalling a pid; a stale one fails harmlessly.
            unsafe { libc::kill(pid, libc::SIGSTOP) };
        }
        for &pid in &tree {
            // SAFETY: as above.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        reap_zombies();
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The environment entry that marks a call's processes.
const MARKER_VAR: &str = "SANDBOX_EXEC_ID";

/// A call's marker: the host's execution id, a plain token.
fn valid_marker(marker: &str) -> bool {
    (8..=64).contains(&marker.len())
        && marker
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// `sandbox-agent kill MARKER`: stops, then kills, every process whose
/// environment holds `SANDBOX_EXEC_ID=MARKER` and all their descendants
/// (children that cleared their environment, orphans adopted by a `reap`
/// agent of the call), until none is left. One process, no fork, so it
/// works when the call spent the container's pids limit, and under any
/// shell (the script fallback needs `read -d`, which dash lacks). Exit 0
/// when none is left, 1 when some survived.
fn kill_marked(marker: &str) -> i32 {
    let entry = format!("{MARKER_VAR}={marker}");
    let me = std::process::id() as libc::pid_t;
    for _ in 0..200 {
        let roots = marked(entry.as_bytes(), me);
        let mut tree: Vec<libc::pid_t> = roots.iter().flat_map(|&r| descendants(r)).collect();
        tree.extend(&roots);
        tree.retain(|&p| p != me);
        tree.sort_unstable();
        tree.dedup();
        if tree.is_empty() {
            return 0;
        }
        for &pid in &tree {
            // SAFETY: signalling a pid; a stale one fails harmlessly.
            unsafe { libc::kill(pid, libc::SIGSTOP) };
        }
        for &pid in &tree {
            // SAFETY: as above.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    1
}

/// Live processes (not `me`) whose environment has exactly `entry` as one
/// of its NUL-separated entries.
fn marked(entry: &[u8], me: libc::pid_t) -> Vec<libc::pid_t> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<libc::pid_t>().ok())
        .filter(|&pid| pid != me)
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/environ"))
                .is_ok_and(|env| env.split(|&b| b == 0).any(|kv| kv == entry))
        })
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| parse_stat(&s))
                .is_some_and(|(state, _)| state != 'Z')
        })
        .collect()
}

fn reap_zombies() {
    loop {
        let mut status = 0;
        // SAFETY: non-blocking waitpid into a local.
        if unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) } <= 0 {
            return;
        }
    }
}

/// Live (not zombie) processes whose parent chain reaches `root`.
fn descendants(root: libc::pid_t) -> Vec<libc::pid_t> {
    let mut children: HashMap<libc::pid_t, Vec<libc::pid_t>> = HashMap::new();
    let mut zombies = HashSet::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    for entry in dir.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        if let Some((state, ppid)) = parse_stat(&stat) {
            if state == 'Z' {
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

/// State and parent pid from `/proc/PID/stat`; the command name may hold
/// spaces and parentheses, so fields are read after its last `)`.
fn parse_stat(stat: &str) -> Option<(char, libc::pid_t)> {
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
    fn a_kill_marker_is_a_plain_token() {
        // It is matched against whole environment entries; anything but the
        // host's own id format is refused rather than half-matched.
        assert!(valid_marker("py-cancel-0001"));
        assert!(!valid_marker("short"));
        assert!(!valid_marker("a=b\0SANDBOX_EXEC_ID=x"));
        assert!(!valid_marker(&"x".repeat(65)));
    }

    #[test]
    fn arguments_are_strict() {
        let args = |s: &[&str]| s.iter().map(|a| a.to_string()).collect::<Vec<_>>();
        let (t, p) = parse(&args(&["reap", "--timeout-ms", "5", "--", "sh", "-c", "x"])).unwrap();
        assert_eq!((t, p.len()), (Some(Duration::from_millis(5)), 3));
        assert!(parse(&args(&["reap", "--",])).is_err());
        assert!(parse(&args(&["reap", "--timeout-ms", "x", "--", "sh"])).is_err());
        assert!(parse(&args(&["run", "--", "sh"])).is_err());
    }
}

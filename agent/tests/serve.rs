//! `sandbox-agent serve` as a process, over pipes as the host sees it on the
//! attach stream: the version it states, execs with env, stdin and exit
//! codes, their deadline, garbage that is refused without losing the next
//! request, and kills.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use sandbox_agent::protocol::{
    Exec, Reply, Request, EXEC_MARKER_VAR, EXIT_KILLED, EXIT_NOT_FOUND, EXIT_TIMED_OUT,
    PROTOCOL_VERSION,
};

struct Serve {
    child: Child,
    input: ChildStdin,
    output: BufReader<ChildStdout>,
}

impl Serve {
    fn start() -> Self {
        let (serve, hello) = Self::start_raw();
        assert!(
            matches!(Reply::parse(hello.as_bytes()), Ok(Reply::Hello { .. })),
            "{hello}"
        );
        serve
    }

    /// Started, its first line returned unparsed.
    fn start_raw() -> (Self, String) {
        let mut child = Command::new(env!("CARGO_BIN_EXE_sandbox-agent"))
            .arg("serve")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let input = child.stdin.take().unwrap();
        let output = BufReader::new(child.stdout.take().unwrap());
        let mut serve = Serve {
            child,
            input,
            output,
        };
        let hello = serve.next_line();
        (serve, hello)
    }

    fn send(&mut self, line: &str) {
        self.input.write_all(line.as_bytes()).unwrap();
        self.input.flush().unwrap();
    }

    /// The next reply line, as written (without its newline).
    fn next_line(&mut self) -> String {
        let mut line = Vec::new();
        self.output.read_until(b'\n', &mut line).unwrap();
        assert_eq!(line.pop(), Some(b'\n'), "serve ended");
        String::from_utf8(line).unwrap()
    }

    fn next(&mut self) -> Reply {
        let line = self.next_line();
        Reply::parse(line.as_bytes()).unwrap_or_else(|e| panic!("{e}: {line:?}"))
    }

    /// Collects replies until every id in `ids` has exited: id -> (stdout,
    /// stderr, code).
    fn collect(&mut self, ids: &[&str]) -> HashMap<String, (Vec<u8>, Vec<u8>, u8)> {
        let mut got: HashMap<String, (Vec<u8>, Vec<u8>, u8)> = HashMap::new();
        let mut open = ids.len();
        while open > 0 {
            match self.next() {
                Reply::Stdout { id, data } => got.entry(id).or_default().0.extend(data),
                Reply::Stderr { id, data } => got.entry(id).or_default().1.extend(data),
                Reply::Exit { id, code, .. } => {
                    got.entry(id).or_default().2 = code;
                    open -= 1;
                }
                Reply::Ack { .. } | Reply::Killed { .. } => {}
                other => panic!("unexpected {other:?}"),
            }
        }
        got
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn exec(id: &str, command: &str, env: &[&str], stdin: Option<&[u8]>, timeout_ms: u64) -> String {
    Request::Exec(Exec {
        id: id.into(),
        start_by_ms: now_ms() + 60_000,
        timeout_ms,
        env: env.iter().map(|s| s.to_string()).collect(),
        command: command.into(),
        stdin: stdin.map(<[u8]>::to_vec),
        pipe: None,
    })
    .encode()
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// The hello and every pong state the protocol version, as the last field,
/// where every host looks for it.
#[test]
fn serve_states_its_protocol_version() {
    let (mut serve, hello) = Serve::start_raw();
    let fields: Vec<&str> = hello.split(' ').collect();
    assert_eq!(fields.len(), 3, "{hello:?}");
    assert_eq!(fields[0], "hello");
    assert_eq!(fields[2], PROTOCOL_VERSION.to_string());
    let boot = fields[1].to_owned();
    serve.send(&Request::Ping { nonce: "n1".into() }.encode());
    let pong = serve.next_line();
    let fields: Vec<&str> = pong.split(' ').collect();
    assert_eq!(fields.len(), 5, "{pong:?}");
    assert_eq!(
        (fields[0], fields[1], fields[2]),
        ("pong", "n1", boot.as_str())
    );
    assert_eq!(fields[4], PROTOCOL_VERSION.to_string());
    assert!(matches!(
        Reply::parse(pong.as_bytes()),
        Ok(Reply::Pong { nonce, .. }) if nonce == "n1"
    ));
}

#[test]
fn a_request_read_after_its_start_by_time_never_runs() {
    let mut serve = Serve::start();
    let stale = Request::Exec(Exec {
        id: "late".into(),
        start_by_ms: now_ms() - 1,
        timeout_ms: 1000,
        env: vec![],
        command: "echo ran".into(),
        stdin: None,
        pipe: None,
    });
    serve.send(&stale.encode());
    assert!(matches!(serve.next(), Reply::Stale { id } if id == "late"));
}

/// Bug (found in review): a kill read right behind its exec could scan
/// /proc before the call had started, find nothing, answer "all gone", and
/// let the command run after the host reported it cancelled.
#[test]
fn a_kill_right_behind_its_exec_never_lets_the_command_run() {
    let mut serve = Serve::start();
    for n in 0..20 {
        let marker = format!("race-marker-{n:04}");
        let mut frames = exec(
            &format!("c{n}"),
            "sleep 100",
            &[&format!("{EXEC_MARKER_VAR}={marker}")],
            None,
            60_000,
        );
        frames.push_str(
            &Request::Kill {
                id: format!("k{n}"),
                marker: marker.clone(),
            }
            .encode(),
        );
        serve.send(&frames);
        let (mut killed, mut exit) = (None, None);
        while killed.is_none() || exit.is_none() {
            match serve.next() {
                Reply::Killed { all_gone, .. } => killed = Some(all_gone),
                Reply::Exit { code, .. } => exit = Some(code),
                _ => {}
            }
        }
        assert_eq!(killed, Some(true), "round {n}");
        assert_eq!(exit, Some(EXIT_KILLED), "round {n}");
    }
    let left = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("environ")).ok())
        .filter(|env| env.windows(12).any(|w| w == b"race-marker-"))
        .count();
    assert_eq!(left, 0, "a cancelled command is running");
}

#[test]
fn concurrent_execs_keep_their_own_output_env_stdin_and_status() {
    let mut serve = Serve::start();
    serve.send(&exec(
        "slow",
        "sleep 0.3; echo slow; exit 3",
        &[],
        None,
        10_000,
    ));
    serve.send(&exec(
        "env",
        "echo \"$FOO\" >&2; cat",
        &["FOO=a b", &format!("{EXEC_MARKER_VAR}=abcdefgh1")],
        Some(b"\x00\xffin"),
        10_000,
    ));
    serve.send(&exec("missing", "exec /nonexistent", &[], None, 10_000));
    let got = serve.collect(&["slow", "env", "missing"]);
    assert_eq!(got["slow"], (b"slow\n".to_vec(), vec![], 3));
    assert_eq!(got["env"], (b"\x00\xffin".to_vec(), b"a b\n".to_vec(), 0));
    assert_eq!(got["missing"].2, EXIT_NOT_FOUND);
}

#[test]
fn garbage_is_refused_and_the_next_request_still_runs() {
    let mut serve = Serve::start();
    serve.send("exec x\n");
    assert!(matches!(serve.next(), Reply::Bad { .. }));
    serve.send("\u{1b}[2J\n");
    assert!(matches!(serve.next(), Reply::Bad { .. }));
    // A line far past the bound is skipped whole.
    let mut long = "ping ".to_owned();
    long.push_str(&"A".repeat(sandbox_agent::protocol::MAX_REQUEST_LINE + 1));
    long.push('\n');
    serve.send(&long);
    assert!(matches!(serve.next(), Reply::Bad { .. }));
    serve.send("ping n1\n");
    assert!(matches!(serve.next(), Reply::Pong { nonce, .. } if nonce == "n1"));
    serve.send(&exec("ok", "echo fine", &[], None, 10_000));
    assert_eq!(serve.collect(&["ok"])["ok"].0, b"fine\n");
}

#[test]
fn the_deadline_and_a_kill_end_the_whole_call() {
    let mut serve = Serve::start();
    serve.send(&exec("late", "echo up; sleep 100", &[], None, 300));
    let got = serve.collect(&["late"]);
    assert_eq!(got["late"], (b"up\n".to_vec(), vec![], EXIT_TIMED_OUT));

    let marker = "killme-0001";
    serve.send(&exec(
        "victim",
        "echo started; sleep 100 & sleep 100",
        &[&format!("{EXEC_MARKER_VAR}={marker}")],
        None,
        60_000,
    ));
    assert!(matches!(serve.next(), Reply::Ack { id } if id == "victim"));
    assert!(matches!(serve.next(), Reply::Stdout { id, .. } if id == "victim"));
    serve.send(
        &Request::Kill {
            id: "k1".into(),
            marker: marker.into(),
        }
        .encode(),
    );
    let mut killed = None;
    let mut exit = None;
    while killed.is_none() || exit.is_none() {
        match serve.next() {
            Reply::Killed { all_gone, .. } => killed = Some(all_gone),
            Reply::Exit { code, .. } => exit = Some(code),
            _ => {}
        }
    }
    assert_eq!(killed, Some(true));
    assert_eq!(exit, Some(EXIT_KILLED), "the call's reap was killed");
}

/// The exit frame of `id`, the output before it: (stdout, stderr, frame).
fn run_to_exit(serve: &mut Serve, id: &str) -> (String, String, Reply) {
    let (mut out, mut err) = (Vec::new(), Vec::new());
    loop {
        match serve.next() {
            Reply::Stdout { data, .. } => out.extend(data),
            Reply::Stderr { data, .. } => err.extend(data),
            exit @ Reply::Exit { .. } => {
                let text = |b: Vec<u8>| String::from_utf8_lossy(&b).into_owned();
                return (text(out), text(err), exit);
            }
            Reply::Ack { id: acked } => assert_eq!(acked, id),
            other => panic!("unexpected {other:?}"),
        }
    }
}

/// Bug: `(sleep 100 &)` in a command held the call until its timeout (300 s
/// by default), because the job kept the output open. The call now ends
/// when its command exits: a job still holding the output is killed and
/// named, and counted in the exit frame; a job that detached its output
/// lives on.
#[test]
fn a_background_job_holding_the_output_never_holds_the_call() {
    let mut serve = Serve::start();
    let started = std::time::Instant::now();
    serve.send(&exec(
        "bg1",
        "sleep 31.25 & echo started",
        &[],
        None,
        20_000,
    ));
    let (out, err, exit) = run_to_exit(&mut serve, "bg1");
    let took = started.elapsed();
    assert_eq!(out, "started\n");
    assert!(
        err.contains("1 background process") && err.contains("sleep"),
        "{err}"
    );
    assert!(
        matches!(
            exit,
            Reply::Exit {
                code: 0,
                background_killed: 1,
                ..
            }
        ),
        "{exit:?}"
    );
    assert!(took < std::time::Duration::from_secs(3), "took {took:?}");
    assert!(sleeping("31.25").is_empty(), "the holder was killed");

    serve.send(&exec(
        "bg2",
        "sleep 31.5 >/dev/null 2>&1 & echo detached",
        &[],
        None,
        20_000,
    ));
    let (out, err, exit) = run_to_exit(&mut serve, "bg2");
    assert_eq!((out.as_str(), err.as_str()), ("detached\n", ""));
    assert!(
        matches!(
            exit,
            Reply::Exit {
                code: 0,
                background_killed: 0,
                ..
            }
        ),
        "{exit:?}"
    );
    let alive = sleeping("31.5");
    assert_eq!(alive.len(), 1, "the detached job lives on");
    for pid in alive {
        // SAFETY: ending the test's own leftover.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

/// Pids of `sleep SECS` processes.
fn sleeping(secs: &str) -> Vec<libc::pid_t> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .filter(|pid: &libc::pid_t| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c == format!("sleep\0{secs}\0").as_bytes())
        })
        .collect()
}

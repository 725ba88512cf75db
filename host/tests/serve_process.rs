//! `sandbox serve` as the process an operator runs (the binary, started as
//! the Python client's tests and the systemd unit start it), over real
//! loopback sockets: what only a process and its connections can show.
//!
//! - SIGHUP reloads the policy and never stops the server, with and
//!   without `--policy` (it used to kill a server started without one,
//!   exit 129: `systemctl reload` stopped the service);
//! - idle sockets past the connection limit, at a 1024-descriptor limit,
//!   do not keep a real client out (1100 of them made it time out);
//! - a client that sends its head 1 byte every 2 s is closed by the header
//!   timeout (10 s), and one that sends its body that way is answered 408.
//!
//! The server needs the Docker engine to start (it checks its image); it
//! runs in a namespace and a workspace root of its own, removed at the end.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Where compiled policies are cached between runs (the library's tests
/// use the same directory: only this user may write it).
fn component_cache() -> std::path::PathBuf {
    std::env::temp_dir().join(format!(
        "sandbox-serve-tests-{}",
        nix::unistd::geteuid().as_raw()
    ))
}

/// A running `sandbox serve` on a loopback port, without a token.
struct Server {
    child: Child,
    addr: SocketAddr,
    namespace: String,
    log: Arc<Mutex<String>>,
    root: tempfile::TempDir,
}

impl Server {
    /// Starts the binary with `args` after `serve --listen`; with
    /// `descriptors`, under that `ulimit -n`.
    fn start(args: &[&str], descriptors: Option<u32>) -> Server {
        let root = tempfile::tempdir().expect("a workspace root");
        let addr = free_addr();
        let namespace = format!("it-serve-{}-{}", std::process::id(), addr.port());
        // SANDBOX_BIN runs another build (an older one, to see a test fail).
        let bin = std::env::var("SANDBOX_BIN")
            .unwrap_or_else(|_| env!("CARGO_BIN_EXE_sandbox").to_owned());
        let bin = bin.as_str();
        let listen = addr.to_string();
        let mut command = match descriptors {
            Some(n) => {
                let mut c = Command::new("sh");
                c.args(["-c", &format!("ulimit -n {n} && exec \"$0\" \"$@\""), bin]);
                c
            }
            None => Command::new(bin),
        };
        command
            .args(["serve", "--listen", &listen])
            .args(args)
            .env_remove("SANDBOX_TOKEN")
            .env_remove("SANDBOX_POLICY")
            .env_remove("SANDBOX_CONFIG")
            .env("SANDBOX_WORKSPACE_ROOT", root.path())
            .env("SANDBOX_NAMESPACE", &namespace)
            .env("SANDBOX_COMPONENT_CACHE", component_cache())
            .env(
                "RUST_LOG",
                "warn,sandbox_host=info,sandbox_host::serve::access=off",
            )
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = command.spawn().expect("the sandbox binary starts");
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().expect("piped stderr");
        {
            let log = log.clone();
            std::thread::spawn(move || {
                let mut stderr = std::io::BufReader::new(stderr);
                let mut line = String::new();
                while std::io::BufRead::read_line(&mut stderr, &mut line).is_ok_and(|n| n > 0) {
                    log.lock().unwrap().push_str(&line);
                    line.clear();
                }
            });
        }
        let mut server = Server {
            child,
            addr,
            namespace,
            log,
            root,
        };
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Some(status) = server.child.try_wait().unwrap() {
                panic!("sandbox serve exited with {status}:\n{}", server.log());
            }
            if server.request("GET", "/healthz", "").is_ok() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "sandbox serve did not come up (is the Docker engine reachable?):\n{}",
                server.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        server
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Sends `signal` to the server.
    fn signal(&self, signal: Signal) {
        kill(Pid::from_raw(self.child.id() as i32), signal).expect("kill");
    }

    /// Fails when the process has exited.
    fn assert_running(&mut self) {
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!("sandbox serve exited with {status}:\n{}", self.log());
        }
    }

    /// Waits up to 60 s for `needle` to appear in the log `n` times.
    fn wait_for_log(&mut self, needle: &str, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.log().matches(needle).count() < n {
            self.assert_running();
            assert!(
                Instant::now() < deadline,
                "{needle:?} not logged {n} times:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// One request on a connection of its own (`Connection: close`): the
    /// status and the body.
    fn request(&self, method: &str, path: &str, body: &str) -> std::io::Result<(u16, String)> {
        request_within(self.addr, method, path, body, Duration::from_secs(30))
    }

    /// `GET /v1/policy`'s policy name.
    fn policy(&self) -> String {
        let (status, body) = self
            .request("GET", "/v1/policy", "")
            .expect("GET /v1/policy");
        assert_eq!(status, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).expect("JSON");
        v["policy"].as_str().expect("a name").to_owned()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let ids = Command::new("docker")
            .args(["ps", "-aq", "--filter"])
            .arg(format!("label=sandbox.namespace={}", self.namespace))
            .output();
        if let Ok(out) = ids {
            let ids = String::from_utf8_lossy(&out.stdout);
            let ids: Vec<&str> = ids.split_whitespace().collect();
            if !ids.is_empty() {
                let _ = Command::new("docker")
                    .args(["rm", "-f"])
                    .args(&ids)
                    .output();
            }
        }
        let _ = &self.root;
    }
}

fn free_addr() -> SocketAddr {
    let socket = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    socket.local_addr().unwrap()
}

/// One HTTP/1.1 request with `Connection: close`, all of it (connect,
/// write, read to the end) within `limit`.
fn request_within(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
    limit: Duration,
) -> std::io::Result<(u16, String)> {
    let deadline = Instant::now() + limit;
    let left = || {
        deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::TimedOut, "out of time"))
    };
    let mut stream = TcpStream::connect_timeout(&addr, left()?)?;
    stream.set_write_timeout(Some(left()?))?;
    let content_type = if body.is_empty() {
        String::new()
    } else {
        "Content-Type: application/json\r\n".to_owned()
    };
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{content_type}\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut answer = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        stream.set_read_timeout(Some(left()?))?;
        match stream.read(&mut chunk)? {
            0 => break,
            n => answer.extend_from_slice(&chunk[..n]),
        }
    }
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP answer: {text:?}")))?;
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    Ok((status, body))
}

/// Issue 21: SIGHUP killed a server started without `--policy` (exit
/// 129), the systemd unit's default, so `systemctl reload` stopped it.
#[test]
fn sighup_reloads_the_embedded_policy_and_never_stops_the_server() {
    let mut server = Server::start(&[], None);
    assert_eq!(server.policy(), "per-user");
    for n in 1..=2 {
        server.signal(Signal::SIGHUP);
        server.wait_for_log("SIGHUP: policy reloaded", n);
    }
    server.assert_running();
    assert_eq!(server.policy(), "per-user");
    let (status, body) = server.request("GET", "/healthz", "").unwrap();
    assert_eq!(status, 200, "{body}");
}

#[test]
fn sighup_reloads_the_policy_file_and_keeps_the_running_one_when_the_new_one_fails() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("policy.wasm");
    std::fs::write(&file, sandbox_host::policies::PER_THREAD).unwrap();
    let mut server = Server::start(&["--policy", file.to_str().unwrap()], None);
    assert_eq!(server.policy(), "per-thread");

    std::fs::write(&file, sandbox_host::policies::PER_USER).unwrap();
    server.signal(Signal::SIGHUP);
    server.wait_for_log("SIGHUP: policy reloaded", 1);
    assert_eq!(server.policy(), "per-user");

    std::fs::write(&file, b"not a component").unwrap();
    server.signal(Signal::SIGHUP);
    server.wait_for_log("SIGHUP: reload refused; the running policy stays", 1);
    server.assert_running();
    assert_eq!(server.policy(), "per-user");
}

/// Issue 21: at a 1024-descriptor limit, 1100 idle sockets made a real
/// request time out. The server keeps at most 512 connections and closes
/// the one idle the longest to take a new one.
#[test]
fn idle_sockets_past_the_connection_limit_do_not_keep_a_real_client_out() {
    let server = Server::start(&[], Some(1024));
    let mut idle = Vec::new();
    for _ in 0..1100 {
        if let Ok(s) = TcpStream::connect_timeout(&server.addr, Duration::from_secs(2)) {
            idle.push(s);
        }
    }
    assert!(idle.len() >= 1024, "only {} sockets connected", idle.len());
    for attempt in 0..3 {
        let start = Instant::now();
        let answered = request_within(server.addr, "GET", "/v1/policy", "", Duration::from_secs(1));
        let (status, body) = answered.unwrap_or_else(|e| {
            panic!(
                "attempt {attempt}: no answer within 1 s beside {} idle sockets: {e}\n{}",
                idle.len(),
                server.log()
            )
        });
        assert_eq!(status, 200, "{body}");
        assert!(start.elapsed() < Duration::from_secs(1));
    }
    let (_, metrics) = server.request("GET", "/metrics", "").unwrap();
    let evicted = metrics
        .lines()
        .find_map(|l| l.strip_prefix("sandbox_connections_evicted_total "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no eviction counter: {metrics}"));
    assert!(evicted >= 588.0, "{evicted} connections evicted");
    drop(idle);
}

/// Sends `head` to the server one byte every 2 s (then keeps sending
/// `filler` that way), and answers how long the server took to close the
/// connection, with what it answered (at most `limit`).
fn drip(addr: SocketAddr, head: &str, filler: u8, limit: Duration) -> (Duration, String) {
    let stream = TcpStream::connect(addr).expect("connect");
    let start = Instant::now();
    let mut writer = stream.try_clone().unwrap();
    let head = head.as_bytes().to_vec();
    std::thread::spawn(move || {
        for byte in head.into_iter().chain(std::iter::repeat(filler)) {
            if writer.write_all(&[byte]).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_secs(2));
        }
    });
    let mut reader = stream;
    reader.set_read_timeout(Some(limit)).unwrap();
    let mut answer = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match reader.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => answer.extend_from_slice(&chunk[..n]),
        }
    }
    (
        start.elapsed(),
        String::from_utf8_lossy(&answer).into_owned(),
    )
}

/// Issue 21: a request sent 1 byte every 2 s was still open after 45 s.
#[test]
fn a_head_sent_one_byte_every_two_seconds_is_closed_by_the_header_timeout() {
    let server = Server::start(&[], None);
    let head = format!(
        "GET /v1/policy HTTP/1.1\r\nHost: {}\r\nX-Slow: ",
        server.addr
    );
    let (after, answer) = drip(server.addr, &head, b'a', Duration::from_secs(30));
    assert!(
        after >= Duration::from_secs(9) && after < Duration::from_secs(13),
        "closed after {after:?}: {answer:?}"
    );
    assert!(!answer.starts_with("HTTP/1.1 200"), "{answer:?}");
}

#[test]
fn a_body_sent_one_byte_every_two_seconds_is_answered_408() {
    let server = Server::start(&[], None);
    let head = format!(
        "PUT /v1/threads/alice-1/files HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
         Content-Length: 100000\r\n\r\n{{\"files\": [",
        server.addr
    );
    // The head goes at once; the body drips.
    let mut stream = TcpStream::connect(server.addr).unwrap();
    let start = Instant::now();
    stream.write_all(head.as_bytes()).unwrap();
    let mut writer = stream.try_clone().unwrap();
    std::thread::spawn(move || loop {
        std::thread::sleep(Duration::from_secs(2));
        if writer.write_all(b" ").is_err() {
            return;
        }
    });
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut answer = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => answer.extend_from_slice(&chunk[..n]),
        }
    }
    let after = start.elapsed();
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.starts_with("HTTP/1.1 408"),
        "after {after:?}: {answer:?}"
    );
    assert!(answer.contains("request-timeout"), "{answer:?}");
    assert!(after < Duration::from_secs(14), "answered after {after:?}");
}

//! Ports against the real engine: a server the workload starts in a
//! sandbox whose network is `none` is reached through the engine, from the
//! library and through `sandbox port-forward`; a port nothing listens on
//! fails with the reason.

mod support;

use std::io::{BufRead, BufReader, Read, Write};

use support::Harness;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const PAGE: &str = "hello-from-the-sandbox";

/// Starts busybox httpd on `port` in the background of alice's sandbox,
/// serving a page from her workspace.
async fn serve_page(backend: &sandbox_host::Backend, port: u16) {
    let r = backend
        .execute(&format!(
            "mkdir -p www && echo {PAGE} > www/index.html && \
             (httpd -f -p 127.0.0.1:{port} -h www >/dev/null 2>&1 &)"
        ))
        .await
        .unwrap();
    assert_eq!(r.exit_code, 0, "{r:?}");
    wait_listening(backend, port).await;
}

/// Waits (20 s at most) until a server listens on `port` of the sandbox's
/// loopback: a server started in the background may take a while (Python
/// under gVisor on a loaded host), and a connection tried before it
/// listens is refused.
async fn wait_listening(backend: &sandbox_host::Backend, port: u16) {
    let r = backend
        .execute(&format!(
            "for _ in $(seq 200); do \
               grep -q ':{port:04X} 00000000:0000 0A' /proc/net/tcp && exit 0; sleep 0.1; \
             done; cat /proc/net/tcp; exit 1"
        ))
        .await
        .unwrap();
    assert_eq!(r.exit_code, 0, "nothing listens on port {port}: {r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_server_in_a_sandbox_without_network_is_reached_through_the_engine() {
    let h = Harness::new("ports");
    let sandbox = h.sandbox().await;
    let alice = sandbox.get_thread_backend("alice-1").await.unwrap();
    serve_page(&alice, 8080).await;
    let r = alice
        .execute("grep : /proc/net/dev | cut -d: -f1 | tr -d ' '")
        .await
        .unwrap();
    assert_eq!(r.output, "lo\n", "network none: {r:?}");

    for _ in 0..3 {
        let mut conn = alice.connect_port(8080).await.unwrap();
        conn.write_all(b"GET /index.html HTTP/1.0\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut reply = String::new();
        conn.read_to_string(&mut reply).await.unwrap();
        assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
        assert!(reply.ends_with(&format!("{PAGE}\n")), "{reply}");
    }

    let err = alice
        .connect_port(9)
        .await
        .err()
        .expect("nothing on port 9");
    let text = err.to_string();
    assert!(
        text.contains("nothing accepts connections on port 9"),
        "{text}"
    );
    assert!(
        matches!(err, sandbox_host::SandboxError::NotFound(_)),
        "{err:?}"
    );
    let err = alice.connect_port(0).await.err().expect("port 0");
    assert!(err.to_string().contains("1..=65535"), "{err}");

    // Another user's sandbox has no such server: ports are per sandbox.
    let bob = sandbox.get_thread_backend("bob-1").await.unwrap();
    assert!(bob.connect_port(8080).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sandbox_port_forward_serves_a_local_port() {
    let h = Harness::new("portfwd");
    let sandbox = h.sandbox().await;
    let alice = sandbox.get_thread_backend("alice-1").await.unwrap();
    serve_page(&alice, 8081).await;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_sandbox"))
        .arg("--workspace-root")
        .arg(h.root.path())
        .args([
            "--namespace",
            &h.namespace,
            "--image",
            &support::test_image(),
        ])
        .env_remove("SANDBOX_CONFIG")
        .args(["port-forward", "alice-1", "8081", "0"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let address = line
        .strip_prefix("Forwarding http://")
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("unexpected first line: {line:?}"))
        .to_owned();
    for _ in 0..2 {
        let mut local = std::net::TcpStream::connect(&address).unwrap();
        local
            .write_all(b"GET /index.html HTTP/1.0\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut reply = String::new();
        local.read_to_string(&mut reply).unwrap();
        assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
        assert!(reply.contains(PAGE), "{reply}");
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// An upgrade (a WebSocket's handshake) through `sandbox serve`'s preview
/// route: the server's 101 comes back and the two connections are joined,
/// both ways. The server is a few lines of Python that switch to echoing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_upgrade_through_the_preview_route_is_joined_both_ways() {
    let h = Harness::new("upgrade");
    let config = sandbox_host::Config {
        image: support::python_image(),
        ..h.config()
    };
    let sandbox = h
        .sandbox_with(
            config,
            sandbox_host::PolicySource::Builtin("per-user".into()),
        )
        .await;
    let alice = sandbox.get_thread_backend("alice-1").await.unwrap();
    let server = r#"
import socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 8090))
s.listen(4)
while True:
    c, _ = s.accept()
    head = b""
    while b"\r\n\r\n" not in head:
        head += c.recv(1024)
    ok = b"upgrade: echo" in head.lower() and b"authorization" not in head.lower()
    c.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: echo\r\nConnection: Upgrade\r\n\r\n" if ok
              else b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
    while ok:
        data = c.recv(1024)
        if not data:
            break
        c.sendall(data)
    c.close()
"#;
    alice
        .upload_files(vec![sandbox_host::files::Upload {
            path: "echo.py".into(),
            content: server.as_bytes().to_vec(),
            mode: None,
        }])
        .await
        .unwrap();
    let r = alice
        .execute("(python3 echo.py >/dev/null 2>&1 &)")
        .await
        .unwrap();
    assert_eq!(r.exit_code, 0, "{r:?}");
    wait_listening(&alice, 8090).await;

    let state = std::sync::Arc::new(sandbox_host::serve::AppState::new(
        sandbox.clone(),
        Some("t0ken".into()),
    ));
    let app = sandbox_host::serve::router(state, 1 << 20);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let served = tokio::spawn(async move { axum::serve(listener, app).await });
    let mut client = tokio::net::TcpStream::connect(address).await.unwrap();
    client
        .write_all(
            b"GET /v1/threads/alice-1/ports/8090/ws HTTP/1.1\r\nHost: localhost\r\n\
              Authorization: Bearer t0ken\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n",
        )
        .await
        .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        assert_eq!(client.read(&mut byte).await.unwrap(), 1, "{head:?}");
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: echo"), "{head}");
    for message in [&b"ping"[..], b"second message"] {
        client.write_all(message).await.unwrap();
        let mut echoed = vec![0u8; message.len()];
        client.read_exact(&mut echoed).await.unwrap();
        assert_eq!(echoed, message);
    }
    served.abort();
}

fn gvisor() -> bool {
    support::test_runtime().is_some_and(|r| r.contains("runsc"))
}

/// A port through the engine's exec (under gVisor always; under runc once
/// the plane cannot offer a pipe) starts as root and is given away to the
/// sandbox user: a workload stopping every process of its uid cannot stop
/// the exec before it starts, which would leave the engine holding its
/// lock on the container for good (inspect, calls, destroy all hang).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_port_through_the_engine_beside_a_stopper_cannot_wedge_the_engine() {
    use sandbox_host::processes::ProcessOptions;
    use std::time::Duration;
    let h = Harness::new("portwedge");
    let sandbox = h.sandbox().await;
    let alice = sandbox.get_thread_backend("alice-1").await.unwrap();
    serve_page(&alice, 8082).await;
    let id = h.container_of("alice");
    let (dir, away) = if gvisor() {
        (None, None)
    } else {
        let dir = h.plane_dir(&id);
        assert!(dir.is_dir(), "{}", dir.display());
        let away = dir.with_extension("away");
        (Some(dir), Some(away))
    };
    let plane_away = |on: bool| {
        if let (Some(dir), Some(away)) = (&dir, &away) {
            let (from, to) = if on { (dir, away) } else { (away, dir) };
            std::fs::rename(from, to).unwrap();
        }
    };

    // Through the engine, the connection works (as the sandbox user: the
    // server sees it from the sandbox's own loopback).
    plane_away(true);
    let mut conn = alice.connect_port(8082).await.unwrap();
    conn.write_all(b"GET /index.html HTTP/1.0\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut reply = String::new();
    conn.read_to_string(&mut reply).await.unwrap();
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    plane_away(false);

    alice
        .start_process(
            "while :; do kill -STOP -1 2>/dev/null; done",
            ProcessOptions::default(),
        )
        .await
        .unwrap();
    plane_away(true);
    // Three at once, each an exec the loop may stop on its way in. Connected
    // or not (the loop stops the server and the connection's own process
    // too), each answers within the port's patience (12 s). A fourth caller
    // goes away while its connection is still being made.
    let attempt = || tokio::time::timeout(Duration::from_secs(20), alice.connect_port(8082));
    let dropped = tokio::time::timeout(Duration::from_secs(2), alice.connect_port(8082));
    let (a, b, c, d) = tokio::join!(attempt(), attempt(), attempt(), dropped);
    let connected = [&a, &b, &c, &d]
        .iter()
        .any(|tried| matches!(tried, Ok(Ok(_))));
    for tried in [a.map(drop), b.map(drop), c.map(drop)] {
        tried.expect("a port's connect hangs on the wedged engine");
    }
    drop(d);
    // Given up on, by the host or by its caller, each connection's
    // processes are ended, stopped or not. One that connected before the
    // loop stopped it, then closed by its client, leaves its server the
    // port's linger (60 s) to answer before it is ended.
    let polls = if connected { 320 } else { 60 };
    let mut left = String::new();
    for _ in 0..polls {
        left = support::root_sh(&id, "ps -o args | grep '[a]gent connect' || true");
        if left.trim().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(left.trim().is_empty(), "left running: {left}");
    // The engine still answers for the container, and it goes.
    support::assert_engine_answers_for(&id);
    plane_away(false);
    let destroyed = tokio::time::timeout(
        Duration::from_secs(30),
        sandbox.destroy_user_backend("alice"),
    )
    .await
    .expect("the destroy hangs on the wedged engine");
    assert!(destroyed.unwrap());
}

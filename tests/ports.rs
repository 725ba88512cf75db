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
             (httpd -f -p 127.0.0.1:{port} -h www >/dev/null 2>&1 &) && sleep 0.3"
        ))
        .await
        .unwrap();
    assert_eq!(r.exit_code, 0, "{r:?}");
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

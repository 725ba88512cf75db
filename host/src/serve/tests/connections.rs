//! The server's connections, served for real on loopback (the accept loop,
//! hyper's HTTP/1, the timeouts), over the in-memory provider, with limits
//! small enough to reach in a test: room made by closing the connection
//! idle the longest, never one with a request in flight; the keep-alive
//! idle timeout; the minimum body rate. The shipped defaults are checked
//! against the binary in `host/tests/serve_process.rs`.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use super::{tokenless, App};
use crate::serve::{ConnectionLimits, Server};

/// A server on a loopback port, stopped (gracefully) on drop.
struct Served {
    addr: SocketAddr,
    app: App,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Served {
    async fn start(limits: ConnectionLimits) -> Served {
        let app = App::memory_with(tokenless(), |_| {}).await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = Server {
            state: app.state.clone(),
            limits,
            grace: Duration::from_secs(1),
            ended: tokio::sync::watch::channel(false).0,
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(server.run(listener, app.router.clone(), stopped));
        Served {
            addr,
            app,
            stop: Some(stop),
        }
    }

    async fn connect(&self) -> TcpStream {
        TcpStream::connect(self.addr).await.expect("connect")
    }

    /// The `sandbox_connections_evicted_total` counter.
    async fn evicted(&self) -> f64 {
        let metrics = self.app.metrics().await;
        super::series(&metrics, "sandbox_connections_evicted_total").expect("the counter")
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

fn limits() -> ConnectionLimits {
    ConnectionLimits {
        max_connections: 2,
        ..ConnectionLimits::default()
    }
}

const GET_POLICY: &str = "GET /v1/policy HTTP/1.1\r\nHost: localhost\r\n\r\n";

/// The head of a JSON upload of `len` bytes of body.
fn upload_head(len: usize) -> String {
    format!(
        "PUT /v1/threads/alice-1/files HTTP/1.1\r\nHost: localhost\r\n\
         Content-Type: application/json\r\nContent-Length: {len}\r\n\r\n"
    )
}

/// Reads one answer (head and Content-Length body) within `limit`: its
/// status line and body, or None when the connection closed or nothing
/// came in time.
async fn answer(stream: &mut TcpStream, limit: Duration) -> Option<(String, String)> {
    let read = async {
        let mut data = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(end) = data.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&data[..end]).into_owned();
                let len: usize = head
                    .lines()
                    .find_map(|l| {
                        let (name, value) = l.split_once(':')?;
                        name.eq_ignore_ascii_case("content-length")
                            .then(|| value.trim().parse().ok())?
                    })
                    .unwrap_or(0);
                if data.len() >= end + 4 + len {
                    let body = String::from_utf8_lossy(&data[end + 4..end + 4 + len]);
                    let status = head.lines().next().unwrap_or("").to_owned();
                    return Some((status, body.into_owned()));
                }
            }
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => data.extend_from_slice(&chunk[..n]),
            }
        }
    };
    tokio::time::timeout(limit, read).await.ok().flatten()
}

/// Whether the server closed the connection within `limit`.
async fn closed_within(stream: &mut TcpStream, limit: Duration) -> bool {
    let mut byte = [0u8; 1];
    matches!(
        tokio::time::timeout(limit, stream.read(&mut byte)).await,
        Ok(Ok(0) | Err(_))
    )
}

#[tokio::test]
async fn the_connection_idle_the_longest_makes_room_for_a_new_one() {
    let served = Served::start(limits()).await;
    let mut oldest = served.connect().await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut other = served.connect().await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    // Both slots taken by idle sockets: a third is taken all the same.
    let mut third = served.connect().await;
    let start = Instant::now();
    third.write_all(GET_POLICY.as_bytes()).await.unwrap();
    let (status, body) = answer(&mut third, Duration::from_secs(1))
        .await
        .expect("answered within 1 s beside two idle sockets");
    assert_eq!(status, "HTTP/1.1 200 OK", "{body}");
    assert!(start.elapsed() < Duration::from_secs(1));
    // The oldest was closed for it; the other still serves.
    assert!(closed_within(&mut oldest, Duration::from_secs(1)).await);
    other.write_all(GET_POLICY.as_bytes()).await.unwrap();
    let (status, _) = answer(&mut other, Duration::from_secs(1))
        .await
        .expect("the other idle connection still serves");
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(served.evicted().await >= 1.0);
}

#[tokio::test]
async fn a_connection_with_a_request_in_flight_is_never_closed_for_room() {
    let served = Served::start(limits()).await;
    // Two uploads whose bodies are still arriving: both slots busy.
    let body = r#"{"files": []}"#;
    let mut busy = Vec::new();
    for _ in 0..2 {
        let mut stream = served.connect().await;
        stream
            .write_all(upload_head(body.len()).as_bytes())
            .await
            .unwrap();
        stream.write_all(&body.as_bytes()[..5]).await.unwrap();
        busy.push(stream);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    // A third waits in the backlog: no answer while both are in flight.
    let mut waiting = served.connect().await;
    waiting.write_all(GET_POLICY.as_bytes()).await.unwrap();
    assert!(
        answer(&mut waiting, Duration::from_millis(500))
            .await
            .is_none(),
        "answered while every slot had a request in flight"
    );
    // The uploads finish whole, and the waiting client is then served.
    for stream in &mut busy {
        stream.write_all(&body.as_bytes()[5..]).await.unwrap();
        let (status, text) = answer(stream, Duration::from_secs(5))
            .await
            .expect("the upload in flight was answered");
        assert_eq!(status, "HTTP/1.1 200 OK", "{text}");
        assert_eq!(text, r#"{"results":[]}"#);
    }
    let (status, _) = answer(&mut waiting, Duration::from_secs(2))
        .await
        .expect("served once a slot was free");
    assert_eq!(status, "HTTP/1.1 200 OK");
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_after_the_header_timeout() {
    let served = Served::start(ConnectionLimits {
        header_read_timeout: Duration::from_secs(1),
        ..ConnectionLimits::default()
    })
    .await;
    let mut stream = served.connect().await;
    stream.write_all(GET_POLICY.as_bytes()).await.unwrap();
    let (status, _) = answer(&mut stream, Duration::from_secs(2)).await.unwrap();
    assert_eq!(status, "HTTP/1.1 200 OK");
    let idle = Instant::now();
    assert!(closed_within(&mut stream, Duration::from_secs(3)).await);
    let after = idle.elapsed();
    assert!(
        after >= Duration::from_millis(800) && after < Duration::from_millis(2500),
        "closed after {after:?}"
    );
}

#[tokio::test]
async fn a_body_slower_than_the_minimum_rate_is_answered_408() {
    let served = Served::start(ConnectionLimits {
        body_grace: Duration::from_secs(1),
        body_min_rate: 1000,
        ..ConnectionLimits::default()
    })
    .await;
    let mut stream = served.connect().await;
    let start = Instant::now();
    stream
        .write_all(upload_head(5000).as_bytes())
        .await
        .unwrap();
    // 100 bytes buy 0.1 s more than the grace; then nothing comes.
    stream.write_all(&[b' '; 100]).await.unwrap();
    let (status, body) = answer(&mut stream, Duration::from_secs(5))
        .await
        .expect("an answer");
    let after = start.elapsed();
    assert_eq!(status, "HTTP/1.1 408 Request Timeout", "{body}");
    assert!(body.contains("request-timeout"), "{body}");
    assert!(
        after >= Duration::from_millis(1000) && after < Duration::from_secs(3),
        "answered after {after:?}"
    );
    // A body that keeps the rate is read whole, however long it takes.
    let mut stream = served.connect().await;
    let body = format!(r#"{{"files": []{}}}"#, " ".repeat(1500));
    stream
        .write_all(upload_head(body.len()).as_bytes())
        .await
        .unwrap();
    for chunk in body.as_bytes().chunks(300) {
        stream.write_all(chunk).await.unwrap();
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let (status, text) = answer(&mut stream, Duration::from_secs(5))
        .await
        .expect("an answer");
    assert_eq!(status, "HTTP/1.1 200 OK", "{text}");
}

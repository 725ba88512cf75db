//! The egress relay (`serve --egress-port PORT`): the sandbox's way out
//! when it has no network of its own.
//!
//! It listens on `127.0.0.1:PORT` (the container's loopback, the only
//! interface it has) and copies each connection, byte for byte, to the
//! host's proxy socket mounted read-only at `/.sandbox/egress/proxy.sock`.
//! It reads nothing of what passes: the host's proxy decides every request.
//! Serve runs it as root, so the workload can neither stop it nor take its
//! port while it lives; the workload can connect to the socket itself as
//! well, which gives it nothing more.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// The host's proxy socket, as mounted.
const SOCKET: &str = "/.sandbox/egress/proxy.sock";
/// Connections relayed at once (two threads each, counted against the
/// container's pids limit); more are answered with a 503.
const MAX_CONNECTIONS: usize = 32;
/// Each copying thread's stack: it holds one buffer.
const STACK: usize = 64 * 1024;
const BUFFER: usize = 32 * 1024;
/// Refusals answered at once (each on its own short-lived thread).
const MAX_REFUSING: usize = 8;
/// How long, and how much of, a refused request is read before closing.
const REFUSE_DRAIN: std::time::Duration = std::time::Duration::from_secs(1);
const REFUSE_DRAIN_BYTES: usize = 64 * 1024;

/// Binds the port and relays on a thread of its own.
pub fn start(port: u16) -> std::io::Result<()> {
    let listener = TcpListener::bind(("127.0.0.1", port))?;
    let open = Arc::new(AtomicUsize::new(0));
    std::thread::Builder::new()
        .name("relay".into())
        .stack_size(STACK)
        .spawn(move || {
            for client in listener.incoming().flatten() {
                if open.load(Ordering::SeqCst) >= MAX_CONNECTIONS {
                    refuse(
                        client,
                        "503 Service Unavailable",
                        "too many connections to the egress proxy at once",
                    );
                    continue;
                }
                let upstream = match UnixStream::connect(SOCKET) {
                    Ok(upstream) => upstream,
                    Err(_) => {
                        refuse(
                            client,
                            "502 Bad Gateway",
                            "no host process serves this sandbox's egress proxy right now \
                             (it is served while `sandbox serve` runs, or a `sandbox exec`)",
                        );
                        continue;
                    }
                };
                open.fetch_add(1, Ordering::SeqCst);
                if !relay(client, upstream, open.clone()) {
                    open.fetch_sub(1, Ordering::SeqCst);
                }
            }
        })?;
    Ok(())
}

/// Copies both ways on two threads; false when they could not start.
fn relay(client: TcpStream, upstream: UnixStream, open: Arc<AtomicUsize>) -> bool {
    let (Ok(client_back), Ok(upstream_back)) = (client.try_clone(), upstream.try_clone()) else {
        return false;
    };
    let outbound = std::thread::Builder::new()
        .stack_size(STACK)
        .spawn(move || {
            copy(&client, &upstream);
            let _ = upstream.shutdown(Shutdown::Write);
        });
    if outbound.is_err() {
        return false;
    }
    let inbound = std::thread::Builder::new()
        .stack_size(STACK)
        .spawn(move || {
            copy(&upstream_back, &client_back);
            let _ = client_back.shutdown(Shutdown::Write);
            open.fetch_sub(1, Ordering::SeqCst);
        });
    inbound.is_ok()
}

fn copy(mut from: impl Read, mut to: impl Write) {
    let mut buffer = vec![0u8; BUFFER];
    loop {
        match from.read(&mut buffer) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if to.write_all(&buffer[..n]).is_err() {
                    return;
                }
            }
        }
    }
}

/// Answers a connection the relay cannot carry with an HTTP error the
/// workload's tools print (every client of the port speaks HTTP to a
/// proxy), on a thread of its own: a client that trickles its request must
/// not hold up the accept loop. At most [`MAX_REFUSING`] at once; past
/// that the connection just closes.
fn refuse(client: TcpStream, status: &'static str, why: &'static str) {
    static REFUSING: AtomicUsize = AtomicUsize::new(0);
    if REFUSING.fetch_add(1, Ordering::SeqCst) >= MAX_REFUSING {
        REFUSING.fetch_sub(1, Ordering::SeqCst);
        return;
    }
    let spawned = std::thread::Builder::new()
        .stack_size(STACK)
        .spawn(move || {
            answer(client, status, why);
            REFUSING.fetch_sub(1, Ordering::SeqCst);
        });
    if spawned.is_err() {
        REFUSING.fetch_sub(1, Ordering::SeqCst);
    }
}

fn answer(mut client: TcpStream, status: &str, why: &str) {
    let body = format!("sandbox egress: {why}\n");
    let _ = write!(
        client,
        "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    );
    // Closing with the request unread would reset the connection and lose
    // the answer: read it first, briefly (bounded in time and bytes).
    let _ = client.shutdown(Shutdown::Write);
    let _ = client.set_read_timeout(Some(std::time::Duration::from_millis(200)));
    let until = std::time::Instant::now() + REFUSE_DRAIN;
    let mut buffer = [0u8; 4096];
    let mut drained = 0;
    while std::time::Instant::now() < until && drained < REFUSE_DRAIN_BYTES {
        match client.read(&mut buffer) {
            Ok(0) | Err(_) => break,
            Ok(n) => drained += n,
        }
    }
}

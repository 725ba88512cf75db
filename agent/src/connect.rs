//! `sandbox-agent connect PORT`: one TCP connection to `127.0.0.1:PORT`
//! inside the sandbox, carried over stdin and stdout. The host runs it
//! through `docker exec` as the sandbox user to reach a server the
//! workload runs (a dev server's preview, `sandbox port-forward`) while the
//! sandbox's network stays `none`: nothing listens anywhere new, and the
//! connection comes from the sandbox's own loopback, as a browser inside
//! it would make.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::Duration;

use crate::AGENT_FAILED;

/// Exit status when nothing accepts the connection (`EX_UNAVAILABLE`).
const EXIT_UNREACHABLE: i32 = 69;
/// Said on stderr once connected.
const CONNECTED: &str = "sandbox-agent: connected";
/// How long connecting to the local port may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const BUFFER: usize = 64 * 1024;

pub fn main(args: &[String]) -> i32 {
    let port = match args {
        [port] => port.parse::<u16>().ok().filter(|p| *p > 0),
        _ => None,
    };
    let Some(port) = port else {
        eprintln!("usage: sandbox-agent connect PORT (1..=65535)");
        return AGENT_FAILED;
    };
    let addresses = [
        SocketAddr::from(([127, 0, 0, 1], port)),
        SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port)),
    ];
    let mut refused = Vec::new();
    let stream = addresses.iter().find_map(|address| {
        TcpStream::connect_timeout(address, CONNECT_TIMEOUT)
            .map_err(|e| refused.push(format!("{address}: {e}")))
            .ok()
    });
    let Some(stream) = stream else {
        eprintln!(
            "nothing accepts connections on port {port} in the sandbox ({})",
            refused.join("; ")
        );
        return EXIT_UNREACHABLE;
    };
    let _ = stream.set_nodelay(true);
    // The host waits for this line (or the refusal above) before it hands
    // the connection on: a refused port is an error, not an empty stream.
    eprintln!("{CONNECTED}");
    let Ok(mut upstream) = stream.try_clone() else {
        eprintln!("sandbox-agent connect: cannot share the connection");
        return AGENT_FAILED;
    };
    // stdin -> the server; the server's end closes its write side.
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        let mut buffer = vec![0u8; BUFFER];
        loop {
            match stdin.read(&mut buffer) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if upstream.write_all(&buffer[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = upstream.shutdown(Shutdown::Write);
    });
    // The server -> stdout, until the server closes: then the process
    // ends, whatever the host still has to send.
    let mut downstream = stream;
    let mut stdout = std::io::stdout().lock();
    let mut buffer = vec![0u8; BUFFER];
    loop {
        match downstream.read(&mut buffer) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if stdout
                    .write_all(&buffer[..n])
                    .and_then(|()| stdout.flush())
                    .is_err()
                {
                    break;
                }
            }
        }
    }
    0
}

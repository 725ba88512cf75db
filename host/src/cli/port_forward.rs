//! `sandbox port-forward`: a local port that reaches a port inside a
//! thread's sandbox (a dev server to open in a browser), like `kubectl
//! port-forward`, while the sandbox's network stays `none`.

use std::process::ExitCode;

use anyhow::Context;
use sandbox_host::Config;

use super::open;

#[derive(clap::Args)]
pub struct PortForwardArgs {
    /// The thread whose sandbox runs the server.
    pub thread: String,
    /// The port the server listens on inside the sandbox (on 127.0.0.1).
    pub port: u16,
    /// The local port (on 127.0.0.1); default: the same as PORT, 0 for any.
    pub local_port: Option<u16>,
}

pub async fn run(config: Config, args: PortForwardArgs) -> anyhow::Result<ExitCode> {
    let sandbox = open(config, false).await?;
    let backend = sandbox.get_thread_backend(&args.thread).await?;
    let local = args.local_port.unwrap_or(args.port);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", local))
        .await
        .with_context(|| format!("listening on 127.0.0.1:{local}"))?;
    let bound = listener.local_addr()?;
    println!(
        "Forwarding http://{bound} -> {}:{} (Ctrl-C to stop)",
        args.thread, args.port
    );
    // A first connection says at once whether the server is up (it may
    // start later: each local connection tries again).
    if let Err(e) = backend.connect_port(args.port).await {
        eprintln!("note: {e}");
    }
    let mut shutdown = std::pin::pin!(tokio::signal::ctrl_c());
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = &mut shutdown => return Ok(ExitCode::SUCCESS),
        };
        let (mut client, from) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of descriptors, say: the forward goes on.
                eprintln!("port-forward: accepting a connection: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                continue;
            }
        };
        let backend = backend.clone();
        let port = args.port;
        tokio::spawn(async move {
            match backend.connect_port(port).await {
                Ok(mut remote) => {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut remote).await;
                }
                Err(e) => {
                    tracing::warn!(%from, error = %e, "port-forward: connection not made")
                }
            }
        });
    }
}

//! Ports: a connection to a server the workload runs in its sandbox (a dev
//! server to preview, `sandbox port-forward`), made inside the sandbox by
//! the sandbox user and carried by the engine, so the sandbox's network
//! stays what its profile says (`none` included). An open connection is
//! work in flight on the container: it counts as use, holds off idle
//! removal, and a destroy gives it the grace of a command.

use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::Backend;
use crate::engine::usage::Work;
use crate::error::{Result, SandboxError};
use crate::provider::PortStream;

/// One connection to a port inside a backend's container; closed when
/// dropped.
pub struct PortConnection {
    stream: PortStream,
    _work: Option<Work>,
}

impl Backend {
    /// Connects to `127.0.0.1:port` inside this backend's container
    /// (ensured first). Fails with [`SandboxError::NotFound`] naming why
    /// when nothing accepts the connection there.
    pub async fn connect_port(&self, port: u16) -> Result<PortConnection> {
        if port == 0 {
            return Err(SandboxError::Refused("port must be 1..=65535".into()));
        }
        let (container, work) = self.ensure_for_work().await?;
        let stream = self
            .engine()
            .provider()
            .connect_port(&container.id, port)
            .await?;
        Ok(PortConnection {
            stream,
            _work: work,
        })
    }
}

impl AsyncRead for PortConnection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for PortConnection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

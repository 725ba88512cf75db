//! Ports: a connection to a server the workload runs in its sandbox (a dev
//! server to preview, `sandbox port-forward`), made inside the sandbox by
//! the sandbox user and carried by the engine, so the sandbox's network
//! stays what its profile says (`none` included). An open connection is
//! work in flight on the container: it counts as use, holds off idle
//! removal, and a destroy gives it the grace of a command.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::Backend;
use crate::dataplane::agent::AgentMode;
use crate::engine::usage::Work;
use crate::error::{Result, SandboxError};
use crate::provider::PortStream;

/// Connections to ports one user's sandboxes hold open at once (each is
/// an engine exec and a process in the sandbox).
pub const MAX_PORT_CONNECTIONS_PER_USER: usize = 32;
/// Connections to ports this process holds open at once, every user's.
pub const MAX_PORT_CONNECTIONS: usize = 256;

/// The bounds on open port connections.
pub(crate) struct PortSlots {
    by_user: Mutex<HashMap<String, Arc<Semaphore>>>,
    all: Arc<Semaphore>,
}

impl Default for PortSlots {
    fn default() -> Self {
        PortSlots {
            by_user: Mutex::default(),
            all: Arc::new(Semaphore::new(MAX_PORT_CONNECTIONS)),
        }
    }
}

impl PortSlots {
    fn take(&self, user: &str) -> Result<[OwnedSemaphorePermit; 2]> {
        let mine = self
            .by_user
            .lock()
            .unwrap()
            .entry(user.to_owned())
            .or_insert_with(|| Arc::new(Semaphore::new(MAX_PORT_CONNECTIONS_PER_USER)))
            .clone();
        match (
            mine.try_acquire_owned(),
            self.all.clone().try_acquire_owned(),
        ) {
            (Ok(a), Ok(b)) => Ok([a, b]),
            _ => Err(SandboxError::Refused(format!(
                "{MAX_PORT_CONNECTIONS_PER_USER} connections to the ports of user {user}'s \
                 sandboxes (or {MAX_PORT_CONNECTIONS} in all) are open: close some first"
            ))),
        }
    }
}

/// One connection to a port inside a backend's container; closed when
/// dropped.
pub struct PortConnection {
    stream: PortStream,
    _work: Option<Work>,
    _slots: [OwnedSemaphorePermit; 2],
}

impl Backend {
    /// Connects to `127.0.0.1:port` inside this backend's container
    /// (ensured first). Fails with [`SandboxError::NotFound`] naming why
    /// when nothing accepts the connection there.
    pub async fn connect_port(&self, port: u16) -> Result<PortConnection> {
        if port == 0 {
            return Err(SandboxError::Refused("port must be 1..=65535".into()));
        }
        let slots = self.sandbox.inner.ports.take(self.user_id())?;
        let (container, work) = self.ensure_for_work().await?;
        let stream = self
            .engine()
            .provider()
            .connect_port(&container.id, port, container.agent == AgentMode::Serves)
            .await?;
        Ok(PortConnection {
            stream,
            _work: work,
            _slots: slots,
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

//! What each user's sandbox moved through the proxy: bytes in (from
//! upstream to the sandbox) and out, connections, and refusals.

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// One user's counters (monotonic, for this host process).
#[derive(Debug, Default)]
pub struct UserMeter {
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    connections: AtomicU64,
    refused: AtomicU64,
}

impl UserMeter {
    pub(super) fn refused(&self) {
        self.refused.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn connected(&self) {
        self.connections.fetch_add(1, Ordering::Relaxed);
    }

    /// The counters now.
    pub fn snapshot(&self) -> EgressCounts {
        EgressCounts {
            bytes_in: self.bytes_in.load(Ordering::Relaxed),
            bytes_out: self.bytes_out.load(Ordering::Relaxed),
            connections: self.connections.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
        }
    }
}

/// Egress counters of one user, or of all.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EgressCounts {
    /// Bytes upstream sent to the sandbox.
    pub bytes_in: u64,
    /// Bytes the sandbox sent upstream.
    pub bytes_out: u64,
    /// Connections the sandbox opened to the proxy.
    pub connections: u64,
    /// Requests refused by the allow-list.
    pub refused: u64,
}

impl std::ops::AddAssign for EgressCounts {
    fn add_assign(&mut self, other: Self) {
        self.bytes_in += other.bytes_in;
        self.bytes_out += other.bytes_out;
        self.connections += other.connections;
        self.refused += other.refused;
    }
}

/// Every user's meter, by user id.
#[derive(Debug, Default)]
pub struct Meters(Mutex<HashMap<String, Arc<UserMeter>>>);

impl Meters {
    pub(super) fn of(&self, user: &str) -> Arc<UserMeter> {
        self.0
            .lock()
            .unwrap()
            .entry(user.to_owned())
            .or_default()
            .clone()
    }

    /// Every user's counters, by user id.
    pub fn snapshot(&self) -> Vec<(String, EgressCounts)> {
        let mut all: Vec<_> = self
            .0
            .lock()
            .unwrap()
            .iter()
            .map(|(user, meter)| (user.clone(), meter.snapshot()))
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }
}

/// The bytes one upstream connection moved, read after it ended.
#[derive(Debug, Clone, Default)]
pub(super) struct Counted(pub(super) Arc<(AtomicU64, AtomicU64)>);

impl Counted {
    /// (in, out).
    pub fn get(&self) -> (u64, u64) {
        (
            self.0 .0.load(Ordering::Relaxed),
            self.0 .1.load(Ordering::Relaxed),
        )
    }
}

/// An upstream connection that counts what it reads (in) and writes (out)
/// into its user's meter.
pub(super) struct Metered<S> {
    inner: S,
    meter: Arc<UserMeter>,
    counted: Counted,
}

impl<S> Metered<S> {
    pub fn new(inner: S, meter: Arc<UserMeter>) -> Self {
        Metered {
            inner,
            meter,
            counted: Counted::default(),
        }
    }

    /// A handle to this connection's own counts.
    pub fn counter(&self) -> Counted {
        self.counted.clone()
    }

    /// This connection's (in, out) so far.
    pub fn counted(&self) -> (u64, u64) {
        self.counted.get()
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Metered<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = (buf.filled().len() - before) as u64;
        if n > 0 {
            self.meter.bytes_in.fetch_add(n, Ordering::Relaxed);
            self.counted.0 .0.fetch_add(n, Ordering::Relaxed);
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Metered<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = polled {
            self.meter.bytes_out.fetch_add(n as u64, Ordering::Relaxed);
            self.counted.0 .1.fetch_add(n as u64, Ordering::Relaxed);
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

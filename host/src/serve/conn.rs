//! The server's connections: hyper's HTTP/1 under an accept loop of its
//! own, with the limits `axum::serve` does not expose.
//!
//! - **Head and idle time**: hyper's header read timeout (with tokio's
//!   timer: hyper sets none without one) closes a connection that has not
//!   sent a whole request head within [`HEADER_READ_TIMEOUT`] of opening or
//!   of its previous answer, so it is also the keep-alive idle timeout.
//! - **Bodies**: a request body must arrive at [`BODY_MIN_RATE`] once
//!   [`BODY_GRACE`] has passed, counted on the time the server waits for
//!   it (not the time it takes to use it): a slower one fails the request
//!   with 408 `request-timeout` ([`BodyTooSlow`]).
//! - **How many**: at most [`MAX_CONNECTIONS`] connections at once. When
//!   they are all open, the server closes the one idle the longest (no
//!   request in flight) to take the next one, so idle or slow sockets
//!   cannot keep a real client out; a connection with a request in flight
//!   is never closed for room. When every connection has a request in
//!   flight, new ones wait in the kernel's backlog until one ends.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future as _;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::Router;
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};

use super::budget::Holding;
use super::Shared;

/// Connections open at once, by default.
pub const MAX_CONNECTIONS: usize = 512;
/// Time to send a whole request head, from the connection's start or its
/// previous answer (so also the keep-alive idle timeout), by default.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Time a request body may take before [`BODY_MIN_RATE`] applies.
pub const BODY_GRACE: Duration = Duration::from_secs(10);
/// Slowest request body accepted past [`BODY_GRACE`], in bytes per second
/// of the server's waiting: a body of N bytes has `BODY_GRACE + N /
/// BODY_MIN_RATE` in all.
pub const BODY_MIN_RATE: u64 = 32 * 1024;
/// How long a connection closed to make room, or at shutdown while idle,
/// may take to finish writing before it is dropped.
pub const CLOSING_LINGER: Duration = Duration::from_millis(250);
/// Connections closed for room that may be lingering at once (beyond
/// [`MAX_CONNECTIONS`]).
const LINGER_SLOTS: usize = 64;

/// The limits of a server's connections; [`Default`] gives the constants
/// above.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// Connections open at once.
    pub max_connections: usize,
    /// [`HEADER_READ_TIMEOUT`].
    pub header_read_timeout: Duration,
    /// [`BODY_GRACE`].
    pub body_grace: Duration,
    /// [`BODY_MIN_RATE`] (at least 1).
    pub body_min_rate: u64,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            max_connections: MAX_CONNECTIONS,
            header_read_timeout: HEADER_READ_TIMEOUT,
            body_grace: BODY_GRACE,
            body_min_rate: BODY_MIN_RATE,
        }
    }
}

/// Serves `app` on `listener` until `stop` turns true (or its sender goes);
/// then asks every connection to close (an idle one closes at once, one
/// with a request in flight after its answer) and returns when all have.
pub(super) async fn serve_connections(
    listener: TcpListener,
    app: Router,
    limits: ConnectionLimits,
    state: Shared,
    mut stop: watch::Receiver<bool>,
) {
    let max = limits.max_connections.clamp(1, u32::MAX as usize);
    let slots = Arc::new(Semaphore::new(max));
    let lingering = Arc::new(Semaphore::new(LINGER_SLOTS));
    let tracker = Arc::new(Tracker::default());
    loop {
        let Some(room) = wait_for_room(&slots, &tracker, &mut stop).await else {
            break;
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => stream,
                Err(e) => {
                    accept_failed(e).await;
                    continue;
                }
            },
            () = stopped(&mut stop) => break,
        };
        let slot = match room {
            Room::Free(slot) => slot,
            Room::Idle => {
                let Some(slot) = make_room(&slots, &lingering, &tracker, &state, &mut stop).await
                else {
                    break;
                };
                slot
            }
        };
        let connection = Connection {
            app: app.clone(),
            limits,
            tracker: tracker.clone(),
            state: state.clone(),
            stop: stop.clone(),
        };
        tokio::spawn(connection.serve(stream, slot));
    }
    drop(listener);
    // Each connection gives its slot back when it ends, one closed for
    // room its linger slot.
    let _all = slots.acquire_many(max as u32).await;
    let _lingering = lingering.acquire_many(LINGER_SLOTS as u32).await;
}

/// Resolves once `stop` is true, or its sender is gone.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}

/// What the next connection will get: a free slot, or the slot of an idle
/// connection, closed once the new one is there.
enum Room {
    Free(OwnedSemaphorePermit),
    Idle,
}

/// Waits until there is room for a connection: a free slot, or an idle
/// connection to close for it. While every connection has a request in
/// flight, new ones wait in the kernel's backlog. None once the server
/// stops.
async fn wait_for_room(
    slots: &Arc<Semaphore>,
    tracker: &Tracker,
    stop: &mut watch::Receiver<bool>,
) -> Option<Room> {
    loop {
        if let Ok(slot) = slots.clone().try_acquire_owned() {
            return Some(Room::Free(slot));
        }
        // Listen before looking, so a connection going idle in between is
        // not missed.
        let idle = tracker.became_idle.notified();
        tokio::pin!(idle);
        idle.as_mut().enable();
        if tracker.has_idle() {
            return Some(Room::Idle);
        }
        tokio::select! {
            slot = slots.clone().acquire_owned() => return slot.ok().map(Room::Free),
            () = idle => {}
            () = stopped(stop) => return None,
        }
    }
}

/// A slot for a connection just accepted: the one of the connection idle
/// the longest, told to close; or, should every connection have become
/// busy meanwhile, the first to free up. None once the server stops.
async fn make_room(
    slots: &Arc<Semaphore>,
    lingering: &Arc<Semaphore>,
    tracker: &Tracker,
    state: &Shared,
    stop: &mut watch::Receiver<bool>,
) -> Option<OwnedSemaphorePermit> {
    // A connection may have ended while this one was awaited.
    if let Ok(slot) = slots.clone().try_acquire_owned() {
        return Some(slot);
    }
    let linger = tokio::select! {
        linger = lingering.clone().acquire_owned() => linger.ok()?,
        () = stopped(stop) => return None,
    };
    if tracker.evict_longest_idle(linger).is_ok() {
        state.metrics.connections_evicted.inc();
    }
    // An evicted connection gives its slot back as soon as its task sees
    // the eviction.
    tokio::select! {
        slot = slots.clone().acquire_owned() => slot.ok(),
        () = stopped(stop) => None,
    }
}

/// An accept that failed: a connection reset before it was taken is
/// nothing; anything else (out of descriptors) is logged and retried after
/// a pause, as `axum::serve` does.
async fn accept_failed(e: std::io::Error) {
    use std::io::ErrorKind::*;
    if matches!(
        e.kind(),
        ConnectionRefused | ConnectionAborted | ConnectionReset
    ) {
        return;
    }
    tracing::error!(error = %e, "accepting a connection failed; retrying in 1 s");
    tokio::time::sleep(Duration::from_secs(1)).await;
}

/// One accepted connection and what serving it needs.
struct Connection {
    app: Router,
    limits: ConnectionLimits,
    tracker: Arc<Tracker>,
    state: Shared,
    stop: watch::Receiver<bool>,
}

impl Connection {
    /// Serves HTTP/1 on `stream` until the client or the server closes it,
    /// holding `slot` until then (or until it is closed for room).
    async fn serve(mut self, stream: TcpStream, slot: OwnedSemaphorePermit) {
        let _ = stream.set_nodelay(true);
        let _open = Open::count(&self.state);
        let (mark, mut evicted) = self.tracker.register();
        let mark = Arc::new(mark);
        let router = TowerToHyperService::new(self.app.clone());
        let limits = self.limits;
        let service = {
            let mark = mark.clone();
            hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
                let busy = mark.busy();
                let request = request.map(|body| MinRate::body(body, limits));
                let call = hyper::service::Service::call(&router, request);
                async move {
                    let response = call.await?;
                    Ok::<_, Infallible>(response.map(|body| Holding::body(body, busy)))
                }
            })
        };
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_read_timeout);
        let connection = builder
            .serve_connection(TokioIo::new(stream), service)
            .with_upgrades();
        tokio::pin!(connection);
        let mut slot = Some(slot);
        let mut _linger_slot = None;
        let mut closing: Option<Pin<Box<Sleep>>> = None;
        let (mut evict_seen, mut stop_seen) = (false, false);
        loop {
            tokio::select! {
                served = connection.as_mut() => {
                    if let Err(e) = served {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                    break;
                }
                evict = &mut evicted, if !evict_seen => {
                    evict_seen = true;
                    if let Ok(linger) = evict {
                        // Room for the next connection now; a moment to
                        // finish what is being written.
                        drop(slot.take());
                        _linger_slot = Some(linger);
                        connection.as_mut().graceful_shutdown();
                        closing = Some(Box::pin(tokio::time::sleep(CLOSING_LINGER)));
                    }
                }
                () = stopped(&mut self.stop), if !stop_seen => {
                    stop_seen = true;
                    connection.as_mut().graceful_shutdown();
                    closing = Some(Box::pin(tokio::time::sleep(CLOSING_LINGER)));
                }
                () = async { closing.as_mut().expect("guarded").await }, if closing.is_some() => {
                    // Keep-alive is off: one with a request in flight closes
                    // after its answer. One that is quiet, or sent part of a
                    // head (hyper waits for the rest), goes now.
                    if !mark.is_busy() {
                        break;
                    }
                    closing = None;
                }
            }
        }
    }
}

/// The `connections` gauge, counted while a connection is open.
struct Open(Shared);

impl Open {
    fn count(state: &Shared) -> Self {
        state.metrics.connections.inc();
        Open(state.clone())
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.metrics.connections.dec();
    }
}

/// The open connections: whether each has a request in flight, since when
/// it has been idle, and how to close it for room.
#[derive(Default)]
struct Tracker {
    connections: Mutex<HashMap<u64, Entry>>,
    next_id: AtomicU64,
    /// Signalled when a connection's last request in flight ends.
    became_idle: Notify,
}

struct Entry {
    /// Requests in flight (from the head read to the answer sent).
    busy: usize,
    /// Since when none has been (the accept, for a new connection).
    idle_since: Instant,
    /// Closes the connection, handing it a linger slot; taken once.
    evict: Option<oneshot::Sender<OwnedSemaphorePermit>>,
}

impl Tracker {
    /// A new connection, idle from now, and the receiver of its eviction.
    fn register(self: &Arc<Self>) -> (Mark, oneshot::Receiver<OwnedSemaphorePermit>) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.connections.lock().unwrap().insert(
            id,
            Entry {
                busy: 0,
                idle_since: Instant::now(),
                evict: Some(tx),
            },
        );
        let mark = Mark {
            id,
            tracker: self.clone(),
        };
        (mark, rx)
    }

    /// Whether a connection has no request in flight (it could be closed
    /// for room).
    fn has_idle(&self) -> bool {
        self.connections
            .lock()
            .unwrap()
            .values()
            .any(|e| e.busy == 0 && e.evict.is_some())
    }

    /// Tells the connection idle the longest to close, handing it
    /// `linger`; gives `linger` back when every connection is busy.
    fn evict_longest_idle(&self, linger: OwnedSemaphorePermit) -> Result<(), OwnedSemaphorePermit> {
        let mut connections = self.connections.lock().unwrap();
        let longest = connections
            .values_mut()
            .filter(|e| e.busy == 0 && e.evict.is_some())
            .min_by_key(|e| e.idle_since);
        match longest.and_then(|e| e.evict.take()) {
            // A connection already ending drops `linger` with the message:
            // its slot comes back all the same.
            Some(evict) => {
                let _ = evict.send(linger);
                Ok(())
            }
            None => Err(linger),
        }
    }
}

/// A connection's entry in the tracker, removed when dropped.
struct Mark {
    id: u64,
    tracker: Arc<Tracker>,
}

impl Mark {
    /// Marks a request in flight until the returned guard drops.
    fn busy(&self) -> Busy {
        if let Some(e) = self.tracker.connections.lock().unwrap().get_mut(&self.id) {
            e.busy += 1;
        }
        Busy {
            id: self.id,
            tracker: self.tracker.clone(),
        }
    }

    fn is_busy(&self) -> bool {
        self.tracker
            .connections
            .lock()
            .unwrap()
            .get(&self.id)
            .is_some_and(|e| e.busy > 0)
    }
}

impl Drop for Mark {
    fn drop(&mut self) {
        self.tracker.connections.lock().unwrap().remove(&self.id);
    }
}

/// A request in flight on a connection, from its head to the end of its
/// answer's body.
struct Busy {
    id: u64,
    tracker: Arc<Tracker>,
}

impl Drop for Busy {
    fn drop(&mut self) {
        let idle = match self.tracker.connections.lock().unwrap().get_mut(&self.id) {
            Some(e) => {
                e.busy = e.busy.saturating_sub(1);
                if e.busy == 0 {
                    e.idle_since = Instant::now();
                }
                e.busy == 0
            }
            None => false,
        };
        if idle {
            self.tracker.became_idle.notify_waiters();
        }
    }
}

/// Why a request failed: its body came too slowly (408 `request-timeout`).
#[derive(Debug, thiserror::Error)]
#[error(
    "the request body arrived slower than {rate} bytes/s after the first {grace_secs} s: the \
     request was dropped"
)]
pub(super) struct BodyTooSlow {
    rate: u64,
    grace_secs: u64,
}

/// A request body held to a minimum rate: by the time the server has
/// waited `grace + received / rate` for it in all, the next bytes must be
/// there, or the body fails with [`BodyTooSlow`].
struct MinRate {
    inner: Incoming,
    grace: Duration,
    rate: u64,
    received: u64,
    /// Time spent waiting for the client, not counting the current wait.
    waited: Duration,
    /// When the current wait began.
    pending_since: Option<Instant>,
    timer: Option<Pin<Box<Sleep>>>,
    failed: bool,
}

impl MinRate {
    fn body(inner: Incoming, limits: ConnectionLimits) -> Body {
        Body::new(MinRate {
            inner,
            grace: limits.body_grace,
            rate: limits.body_min_rate.max(1),
            received: 0,
            waited: Duration::ZERO,
            pending_since: None,
            timer: None,
            failed: false,
        })
    }

    /// The waiting this body may have cost by now.
    fn allowance(&self) -> Duration {
        self.grace + Duration::from_secs_f64(self.received as f64 / self.rate as f64)
    }

    fn too_slow(&mut self) -> Poll<Option<Result<Frame<Bytes>, axum::BoxError>>> {
        self.failed = true;
        Poll::Ready(Some(Err(BodyTooSlow {
            rate: self.rate,
            grace_secs: self.grace.as_secs(),
        }
        .into())))
    }
}

impl http_body::Body for MinRate {
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        if this.failed {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                if let Some(since) = this.pending_since.take() {
                    this.waited += since.elapsed();
                }
                if let Some(data) = frame.as_ref().and_then(|f| f.as_ref().ok()?.data_ref()) {
                    this.received += data.len() as u64;
                }
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending => {
                let since = *this.pending_since.get_or_insert_with(Instant::now);
                let Some(left) = this.allowance().checked_sub(this.waited) else {
                    return this.too_slow();
                };
                let deadline = since + left;
                let timer = this
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                if timer.deadline() != deadline {
                    timer.as_mut().reset(deadline);
                }
                if timer.as_mut().poll(cx).is_ready() {
                    return this.too_slow();
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.failed || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

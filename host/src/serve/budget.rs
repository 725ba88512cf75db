//! The memory budget of the JSON file transfers in flight, across requests.
//!
//! A JSON batch holds its files' whole content in memory (the raw routes
//! stream through a 64 KiB pipe and need no budget), so the server counts
//! that content, for every such request at once, against one budget
//! ([`DEFAULT_TRANSFER_BUDGET`]): an upload charges its body as it arrives,
//! then exactly its decoded content until the files are written; a
//! download charges its batch's cap before it starts, then exactly its
//! content until its answer has been sent. A request that does not fit is
//! answered 503 `overloaded` with `Retry-After`, before it holds anything.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use axum::body::{Body, Bytes};
use http_body::{Frame, SizeHint};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::error::{ApiError, ApiResult};

/// The default budget: 256 MiB of file content in JSON transfers at once.
/// The server holds about three times that at the peak (base64 and JSON
/// copies of the same content).
pub const DEFAULT_TRANSFER_BUDGET: usize = 256 * 1024 * 1024;

/// What a refused transfer's `Retry-After` says, in seconds.
pub(super) const RETRY_AFTER_SECS: &str = "1";

/// The budget, shared by every request of a server.
pub struct TransferBudget {
    bytes: Arc<Semaphore>,
    total: usize,
}

/// Content charged to the budget, given back when dropped.
pub(super) struct Reservation {
    permit: Option<OwnedSemaphorePermit>,
}

/// Why a JSON transfer was refused: the budget is spent.
#[derive(Debug, thiserror::Error)]
#[error(
    "the server holds {total} bytes of JSON file transfers, its limit: retry later, or use \
     /files/raw (streamed)"
)]
pub(super) struct OverBudget {
    total: usize,
}

impl TransferBudget {
    /// A budget of `total` bytes (at most [`Semaphore::MAX_PERMITS`]).
    pub fn new(total: usize) -> Self {
        let total = total.min(Semaphore::MAX_PERMITS);
        TransferBudget {
            bytes: Arc::new(Semaphore::new(total)),
            total,
        }
    }

    /// The budget's size in bytes.
    pub fn total(&self) -> usize {
        self.total
    }

    /// Bytes charged now.
    pub fn in_use(&self) -> usize {
        self.total - self.bytes.available_permits()
    }

    /// Charges `bytes` now, or refuses (503 `overloaded`) without waiting.
    pub(super) fn reserve(&self, bytes: u64) -> ApiResult<Reservation> {
        let mut reservation = Reservation { permit: None };
        self.grow(&mut reservation, bytes)
            .map_err(|over| ApiError::overloaded(over.to_string()))?;
        Ok(reservation)
    }

    /// Adds `bytes` to a reservation, or refuses without waiting.
    fn grow(&self, reservation: &mut Reservation, bytes: u64) -> Result<(), OverBudget> {
        if bytes == 0 {
            return Ok(());
        }
        let over = || OverBudget { total: self.total };
        let n = u32::try_from(bytes).map_err(|_| over())?;
        let more = self
            .bytes
            .clone()
            .try_acquire_many_owned(n)
            .map_err(|_| over())?;
        match &mut reservation.permit {
            Some(permit) => permit.merge(more),
            None => reservation.permit = Some(more),
        }
        Ok(())
    }

    /// `body`, charged as its data arrives: a chunk past the budget fails
    /// the body with [`OverBudget`] (a 503 once the extractor reports it).
    /// The charge stays in the returned reservation after the body is read.
    pub(super) fn charge_body(self: &Arc<Self>, body: Body) -> (Body, Arc<Mutex<Reservation>>) {
        let reservation = Arc::new(Mutex::new(Reservation { permit: None }));
        let charged = Charged {
            inner: body,
            budget: self.clone(),
            reservation: reservation.clone(),
        };
        (Body::new(charged), reservation)
    }
}

impl Reservation {
    /// Gives back all but `bytes` of the charge (nothing when it holds
    /// less).
    pub(super) fn shrink_to(&mut self, bytes: u64) {
        let Some(permit) = &mut self.permit else {
            return;
        };
        let keep = usize::try_from(bytes).unwrap_or(usize::MAX);
        if let Some(excess) = permit.num_permits().checked_sub(keep) {
            drop(permit.split(excess));
        }
    }
}

/// A request body charged to the budget as it arrives.
struct Charged {
    inner: Body,
    budget: Arc<TransferBudget>,
    reservation: Arc<Mutex<Reservation>>,
}

impl http_body::Body for Charged {
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let frame = match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => frame,
            Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => return Poll::Ready(None),
            Poll::Pending => return Poll::Pending,
        };
        if let Some(data) = frame.data_ref() {
            let mut reservation = self.reservation.lock().unwrap();
            if let Err(over) = self.budget.grow(&mut reservation, data.len() as u64) {
                return Poll::Ready(Some(Err(over.into())));
            }
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A response body that keeps `T` (a reservation, a connection's busy
/// mark) alive until the body has been sent or dropped.
pub(super) struct Holding<T> {
    inner: Body,
    _held: T,
}

impl<T: Send + Unpin + 'static> Holding<T> {
    /// `inner`, holding `held` along.
    pub(super) fn body(inner: Body, held: T) -> Body {
        Body::new(Holding { inner, _held: held })
    }
}

impl<T: Send + Unpin + 'static> http_body::Body for Holding<T> {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

//! Streamed response bodies: the NDJSON lines of a streamed exec, and the
//! bytes of a transfer whose first chunk decides the status.

use std::convert::Infallible;

use axum::body::{Body, Bytes};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt as _;
use tokio::io::{AsyncRead, AsyncReadExt as _};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;

use super::error::{ApiError, ApiResult};
use super::replies::StreamLine;

/// The media type of a streamed exec.
const NDJSON: &str = "application/x-ndjson";

/// The sending end of an NDJSON response: each [`StreamLine`] is one line.
/// The queue is bounded, so a client that reads slowly costs no host
/// memory: live lines that do not fit are refused ([`Self::try_send`]).
pub(super) struct NdjsonSender(mpsc::Sender<Bytes>);

/// An NDJSON response and the sender of its lines; the body ends when the
/// sender is dropped. `capacity` lines are queued at most.
pub(super) fn ndjson(capacity: usize) -> (NdjsonSender, Response) {
    let (tx, rx) = mpsc::channel::<Bytes>(capacity);
    let body = Body::from_stream(ReceiverStream::new(rx).map(Ok::<_, Infallible>));
    let response = ([(header::CONTENT_TYPE, NDJSON)], body).into_response();
    (NdjsonSender(tx), response)
}

impl NdjsonSender {
    /// Queues the line unless the queue is full or the client gone: false
    /// when it was dropped.
    pub(super) fn try_send(&self, line: &StreamLine) -> bool {
        self.0.try_send(encode(line)).is_ok()
    }

    /// Queues the line, waiting for room (a line that must arrive).
    pub(super) async fn send(&self, line: &StreamLine) {
        // An error means the client is gone: nobody to tell.
        let _ = self.0.send(encode(line)).await;
    }

    /// Queues any serializable line, waiting for room.
    pub(super) async fn send_json<T: serde::Serialize>(&self, line: &T) {
        let mut v = serde_json::to_vec(line).unwrap_or_default();
        v.push(b'\n');
        let _ = self.0.send(Bytes::from(v)).await;
    }

    /// Resolves when the client has gone away (the body was dropped).
    pub(super) async fn closed(&self) {
        self.0.closed().await
    }
}

fn encode(line: &StreamLine) -> Bytes {
    let mut v = serde_json::to_vec(line).unwrap_or_default();
    v.push(b'\n');
    Bytes::from(v)
}

/// Size of the pipe between a transfer and its response body: what the
/// server holds of a streamed file, whatever its size.
pub(super) const PIPE_BYTES: usize = 64 * 1024;

/// The body of a transfer that writes into the other end of `reader`,
/// status decided by its first chunk: when the transfer fails before its
/// first byte (a missing file, one too large...), the answer is that
/// error with its status; once bytes flowed the status is 200, and a
/// failure midway (the file shrank, the engine failed) ends the body with
/// an error, so the client sees a broken transfer, never a short file.
pub(super) async fn first_chunk_decides(
    mut reader: impl AsyncRead + Unpin + Send + 'static,
    transfer: JoinHandle<ApiResult<()>>,
) -> ApiResult<Body> {
    let mut transfer = Transfer::new(transfer);
    let mut first = vec![0u8; PIPE_BYTES];
    let mut n = tokio::select! {
        n = reader.read(&mut first) => n.unwrap_or(0),
        () = transfer.end() => 0,
    };
    if n == 0 {
        // EOF, or the transfer ended before a byte was read: its verdict
        // decides the status (a tiny file may still be in the pipe).
        transfer.verdict().await?;
        n = reader.read(&mut first).await.unwrap_or(0);
    }
    first.truncate(n);
    let head = futures_util::stream::once(async move { Ok(Bytes::from(first)) });
    let rest = tokio_util::io::ReaderStream::new(reader);
    // The pipe's end is not success: the transfer's verdict is.
    let tail = futures_util::stream::once(async move { transfer.verdict().await }).filter_map(
        |verdict| async move {
            let e = verdict.err()?;
            Some(Err(std::io::Error::other(format!(
                "transfer failed: {}",
                e.message()
            ))))
        },
    );
    Ok(Body::from_stream(head.chain(rest).chain(tail)))
}

/// A transfer task, awaited once: its verdict is kept once it has ended.
struct Transfer {
    task: JoinHandle<ApiResult<()>>,
    ended: Option<ApiResult<()>>,
}

impl Transfer {
    fn new(task: JoinHandle<ApiResult<()>>) -> Self {
        Transfer { task, ended: None }
    }

    /// Resolves when the task has ended, keeping its verdict.
    async fn end(&mut self) {
        if self.ended.is_none() {
            let joined = (&mut self.task).await;
            self.ended = Some(joined.unwrap_or_else(|e| Err(ApiError::internal(e.to_string()))));
        }
    }

    /// The task's verdict, once it has ended; `Ok` once taken.
    async fn verdict(&mut self) -> ApiResult<()> {
        self.end().await;
        self.ended.replace(Ok(())).unwrap_or(Ok(()))
    }
}

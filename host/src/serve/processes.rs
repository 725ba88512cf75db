//! Background processes and terminals over HTTP: start, list, read or
//! follow (NDJSON), stdin, signals, resize, remove; and a terminal over a
//! WebSocket (`GET /v1/threads/{thread_id}/pty`). The processes live in the
//! sandbox's agent: a client that goes away, or a server restart, loses
//! nothing but a terminal, which ends with its WebSocket.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine as _;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::error::{ApiError, ApiResult, ErrorDetail};
use super::requests::Encoding;
use super::{stream, Shared};
use crate::exec::StreamKind;
use crate::processes::{
    ProcessId, ProcessInfo, ProcessOptions, ProcessOutput, Signal, TerminalSize, LOGIN_SHELL,
    MAX_READ_WAIT_MS,
};
use crate::Backend;

/// The body of `POST /v1/threads/{thread_id}/processes`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "ProcessRequest")]
pub(super) struct ProcessBody {
    /// Run with `sh -c` in `/workspace`, in the background.
    command: String,
    /// Environment variables of the command.
    #[serde(default)]
    env: BTreeMap<String, String>,
    /// The working directory: relative to `/workspace` or absolute under
    /// it; created when missing.
    workdir: Option<String>,
    /// Killed (its whole tree, exit 124) after this many seconds, in (0,
    /// 604800); none: it runs until it ends, is killed, or its sandbox goes.
    timeout_secs: Option<f64>,
    /// Run on a terminal of this size (its output is then all stdout).
    terminal: Option<TerminalSize>,
}

/// The answer of `GET /v1/threads/{thread_id}/processes`.
#[derive(Serialize, JsonSchema)]
#[schemars(rename = "Processes")]
pub(super) struct ProcessList {
    /// Oldest first: running ones, and ended ones not yet removed (the
    /// oldest ended ones are forgotten past 32).
    processes: Vec<ProcessInfo>,
}

/// Output of a process from some offset of a stream.
#[derive(Serialize, JsonSchema)]
#[schemars(rename = "ProcessChunk")]
pub(super) struct ChunkReply {
    /// The stream it came from.
    stream: StreamKind,
    /// Where it starts in its stream: past the offset asked for when the
    /// bytes between were dropped (a process keeps the first 16 KiB and the
    /// last 256 KiB of each stream).
    offset: u64,
    /// The bytes as text (encoding `text`).
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<String>,
    /// The exact bytes (encoding `base64`).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(extend("format" = "byte"))]
    data_b64: Option<String>,
}

/// The answer of `GET /v1/threads/{thread_id}/processes/{process_id}`.
#[derive(Serialize, JsonSchema)]
#[schemars(rename = "ProcessOutput")]
pub(super) struct OutputReply {
    /// The process after this output.
    process: ProcessInfo,
    /// Output past the offsets asked for (stdout's first), at most 256 KiB.
    chunks: Vec<ChunkReply>,
    /// Where the next read of stdout starts.
    stdout_offset: u64,
    /// Where the next read of stderr starts.
    stderr_offset: u64,
}

/// One NDJSON line of a followed process: `output` lines, and last `exit`
/// (or `error`).
#[derive(Serialize, JsonSchema)]
#[serde(tag = "type", rename_all = "lowercase")]
#[schemars(rename = "ProcessLine")]
pub(super) enum ProcessLine {
    /// Output, as it comes.
    Output(ChunkReply),
    /// Last, once the process ended and its output was all sent.
    Exit {
        /// The process, ended.
        process: ProcessInfo,
    },
    /// Last, when following failed.
    Error(ErrorDetail),
}

/// The query of `GET /v1/threads/{thread_id}/processes/{process_id}`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct OutputQuery {
    /// Read stdout from here (0 when absent).
    stdout_offset: Option<u64>,
    /// Read stderr from here (0 when absent).
    stderr_offset: Option<u64>,
    /// Wait up to this many seconds (at most 30) for output past the
    /// offsets, or for the process's end.
    wait_secs: Option<f64>,
    /// Answer NDJSON lines until the process ends.
    follow: Option<bool>,
    encoding: Option<Encoding>,
}

/// The body of `POST .../processes/{process_id}/stdin`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "ProcessStdin")]
pub(super) struct StdinBody {
    /// Text to write (for a terminal, what is typed: `\u0003` is Ctrl-C).
    data: Option<String>,
    /// Bytes to write, in base64; not with `data`.
    #[schemars(extend("format" = "byte"))]
    data_b64: Option<String>,
    /// Close the process's stdin after writing (not a terminal's).
    #[serde(default)]
    close: bool,
}

/// The body of `POST .../processes/{process_id}/signal`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "ProcessSignal")]
pub(super) struct SignalBody {
    /// `TERM`, `INT`, `HUP`, `QUIT`, `KILL`, `USR1`, `USR2`, `CONT`,
    /// `STOP` or `WINCH` (with or without `SIG`, or its number); sent to
    /// every process of the tree.
    signal: String,
}

/// The query of `GET /v1/threads/{thread_id}/pty`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PtyQuery {
    rows: Option<u16>,
    cols: Option<u16>,
    /// The command on the terminal; a login shell (bash, else sh) when
    /// absent.
    command: Option<String>,
}

fn chunk_reply(stream: StreamKind, offset: u64, bytes: &[u8], encoding: Encoding) -> ChunkReply {
    let (data, data_b64) = match encoding {
        Encoding::Text => (Some(String::from_utf8_lossy(bytes).into_owned()), None),
        Encoding::Base64 => (
            None,
            Some(base64::engine::general_purpose::STANDARD.encode(bytes)),
        ),
    };
    ChunkReply {
        stream,
        offset,
        data,
        data_b64,
    }
}

fn process_id(id: &str) -> ApiResult<ProcessId> {
    Ok(id.parse::<ProcessId>()?)
}

pub(super) async fn start(
    State(state): State<Shared>,
    Path(thread_id): Path<String>,
    body: Result<Json<ProcessBody>, JsonRejection>,
) -> ApiResult<Response> {
    let Json(body) = body?;
    let timeout = match body.timeout_secs {
        Some(t) if t > 0.0 && t.is_finite() && t < 604_800.0 => Some(Duration::from_secs_f64(t)),
        Some(_) => return Err(ApiError::bad_request("timeout_secs must be in (0, 604800)")),
        None => None,
    };
    let options = ProcessOptions {
        env: body.env.into_iter().collect(),
        workdir: body.workdir,
        timeout,
        terminal: body.terminal,
    };
    let backend = state.sandbox.get_thread_backend(&thread_id).await?;
    let info = backend.start_process(&body.command, options).await?;
    Ok((StatusCode::CREATED, Json(info)).into_response())
}

pub(super) async fn list(
    State(state): State<Shared>,
    Path(thread_id): Path<String>,
) -> ApiResult<Json<ProcessList>> {
    let backend = state.sandbox.get_thread_backend(&thread_id).await?;
    Ok(Json(ProcessList {
        processes: backend.processes().await?,
    }))
}

pub(super) async fn output(
    State(state): State<Shared>,
    Path((thread_id, id)): Path<(String, String)>,
    query: Result<Query<OutputQuery>, QueryRejection>,
) -> ApiResult<Response> {
    let Query(query) = query?;
    let id = process_id(&id)?;
    let wait = match query.wait_secs {
        Some(w) if (0.0..=MAX_READ_WAIT_MS as f64 / 1000.0).contains(&w) => {
            Duration::from_secs_f64(w)
        }
        Some(_) => return Err(ApiError::bad_request("wait_secs must be in [0, 30]")),
        None => Duration::ZERO,
    };
    let offsets = (
        query.stdout_offset.unwrap_or(0),
        query.stderr_offset.unwrap_or(0),
    );
    let encoding = query.encoding.unwrap_or_default();
    let backend = state.sandbox.get_thread_backend(&thread_id).await?;
    if query.follow == Some(true) {
        // Checked before the stream starts: an unknown process is a 404.
        let first = backend.process_output(&id, offsets, Duration::ZERO).await?;
        let (lines, response) = stream::ndjson(FOLLOW_LINES);
        tokio::spawn(follow(backend, id, first, offsets, encoding, lines));
        return Ok(response);
    }
    let output = backend.process_output(&id, offsets, wait).await?;
    Ok(Json(output_reply(output, offsets, encoding)).into_response())
}

/// Lines a followed process queues for its client at most (each up to
/// 16 KiB of output): a slow client slows the reads, never loses output.
const FOLLOW_LINES: usize = 64;
/// How long each read of a followed process waits for output.
const FOLLOW_WAIT: Duration = Duration::from_secs(25);

fn output_reply(output: ProcessOutput, asked: (u64, u64), encoding: Encoding) -> OutputReply {
    let (stdout_offset, stderr_offset) = output.next_offsets(asked);
    OutputReply {
        chunks: output
            .chunks
            .iter()
            .map(|c| chunk_reply(c.stream, c.offset, &c.data, encoding))
            .collect(),
        process: output.info,
        stdout_offset,
        stderr_offset,
    }
}

/// Sends the output of `id` as it comes, from `offsets`, until it ended
/// and all of it was sent, or the client went away.
async fn follow(
    backend: Backend,
    id: ProcessId,
    first: ProcessOutput,
    mut offsets: (u64, u64),
    encoding: Encoding,
    lines: stream::NdjsonSender,
) {
    let mut output = first;
    loop {
        let next = output.next_offsets(offsets);
        let drained = output.chunks.is_empty();
        for c in &output.chunks {
            let line = ProcessLine::Output(chunk_reply(c.stream, c.offset, &c.data, encoding));
            lines.send_json(&line).await;
        }
        if drained && !output.info.running {
            lines
                .send_json(&ProcessLine::Exit {
                    process: output.info,
                })
                .await;
            return;
        }
        offsets = next;
        let read = backend.process_output(&id, offsets, FOLLOW_WAIT);
        output = tokio::select! {
            r = read => match r {
                Ok(output) => output,
                Err(e) => {
                    let e = ApiError::from(e);
                    lines.send_json(&ProcessLine::Error(e.into_detail())).await;
                    return;
                }
            },
            () = lines.closed() => return,
        };
    }
}

pub(super) async fn write_stdin(
    State(state): State<Shared>,
    Path((thread_id, id)): Path<(String, String)>,
    body: Result<Json<StdinBody>, JsonRejection>,
) -> ApiResult<StatusCode> {
    let Json(body) = body?;
    let id = process_id(&id)?;
    let data = match (body.data, body.data_b64) {
        (Some(_), Some(_)) => return Err(ApiError::bad_request("give data or data_b64, not both")),
        (Some(text), None) => Some(text.into_bytes()),
        (None, Some(encoded)) => Some(
            base64::engine::general_purpose::STANDARD
                .decode(encoded.as_bytes())
                .map_err(|e| ApiError::bad_request(format!("data_b64: base64: {e}")))?,
        ),
        (None, None) => None,
    };
    let backend = state.sandbox.get_thread_backend(&thread_id).await?;
    for piece in data
        .iter()
        .flat_map(|d| d.chunks(crate::processes::MAX_STDIN_WRITE))
    {
        backend.write_process(&id, Some(piece.to_vec())).await?;
    }
    if body.close {
        backend.write_process(&id, None).await?;
    }
    Ok(StatusCode::NO_CONTENT)
}

pub(super) async fn signal(
    State(state): State<Shared>,
    Path((thread_id, id)): Path<(String, String)>,
    body: Result<Json<SignalBody>, JsonRejection>,
) -> ApiResult<StatusCode> {
    let Json(body) = body?;
    let id = process_id(&id)?;
    let signal: Signal = body.signal.parse()?;
    let backend = state.sandbox.get_thread_backend(&thread_id).await?;
    backend.signal_process(&id, signal).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub(super) async fn resize(
    State(state): State<Shared>,
    Path((thread_id, id)): Path<(String, String)>,
    body: Result<Json<TerminalSize>, JsonRejection>,
) -> ApiResult<StatusCode> {
    let Json(size) = body?;
    let id = process_id(&id)?;
    let backend = state.sandbox.get_thread_backend(&thread_id).await?;
    backend.resize_process(&id, size).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub(super) async fn remove(
    State(state): State<Shared>,
    Path((thread_id, id)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    let id = process_id(&id)?;
    let backend = state.sandbox.get_thread_backend(&thread_id).await?;
    backend.remove_process(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// A terminal in the thread's sandbox over a WebSocket: binary (or text)
/// messages from the client are typed into it, a text message
/// `{"type":"resize","rows":R,"cols":C}` resizes it; its output comes as
/// binary messages, and a last text message `{"type":"exit","exit_code":N}`
/// before the close. Closing the WebSocket ends the terminal's processes.
pub(super) async fn pty(
    State(state): State<Shared>,
    Path(thread_id): Path<String>,
    query: Result<Query<PtyQuery>, QueryRejection>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> ApiResult<Response> {
    let Query(query) = query?;
    let size = TerminalSize {
        rows: query.rows.unwrap_or(24),
        cols: query.cols.unwrap_or(80),
    };
    let command = query.command.unwrap_or_else(|| LOGIN_SHELL.to_owned());
    let backend = state.sandbox.get_thread_backend(&thread_id).await?;
    let upgrade = upgrade.map_err(|e| {
        ApiError::bad_request(format!("a terminal is a WebSocket: {}", e.body_text()))
    })?;
    // Started before the upgrade, so a refusal is an HTTP error.
    let options = ProcessOptions {
        terminal: Some(size),
        ..ProcessOptions::default()
    };
    let info = backend.start_process(&command, options).await?;
    let id = process_id(&info.id)?;
    // A client gone before the upgrade completed leaves no shell behind.
    let (failed_backend, failed_id) = (backend.clone(), id.clone());
    Ok(upgrade
        .on_failed_upgrade(move |e| {
            tracing::debug!(error = %e, process = %failed_id, "a terminal's upgrade failed");
            tokio::spawn(async move {
                let _ = failed_backend.remove_process(&failed_id).await;
            });
        })
        .on_upgrade(move |socket| terminal(backend, id, socket)))
}

/// What a terminal's client may say in a text message.
#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
enum TerminalMessage {
    Resize { rows: u16, cols: u16 },
    Input { data: String },
}

/// Carries one terminal session until the terminal ends or the client
/// goes; then the terminal's processes are ended and it is forgotten.
async fn terminal(backend: Backend, id: ProcessId, socket: WebSocket) {
    use futures_util::{SinkExt as _, StreamExt as _};
    let (mut to_client, mut from_client) = socket.split();
    let output = async {
        let mut offset = 0;
        loop {
            let read = backend
                .process_output(&id, (offset, 0), FOLLOW_WAIT)
                .await?;
            offset = read.next_offsets((offset, 0)).0;
            let drained = read.chunks.is_empty();
            // A quiet terminal pings its client: one that vanished is
            // noticed (its socket errors), and the terminal ends.
            if drained
                && read.info.running
                && to_client
                    .send(Message::Ping(Default::default()))
                    .await
                    .is_err()
            {
                return Ok(());
            }
            for chunk in read.chunks {
                if to_client
                    .send(Message::Binary(chunk.data.into()))
                    .await
                    .is_err()
                {
                    return Ok(());
                }
            }
            if drained && !read.info.running {
                let exit = serde_json::json!({"type": "exit", "exit_code": read.info.exit_code});
                let _ = to_client.send(Message::Text(exit.to_string().into())).await;
                let _ = to_client.close().await;
                return Ok::<(), crate::SandboxError>(());
            }
        }
    };
    let input = async {
        while let Some(Ok(message)) = from_client.next().await {
            let done = match message {
                Message::Binary(bytes) => write_chunks(&backend, &id, &bytes).await,
                Message::Text(text) => match serde_json::from_str::<TerminalMessage>(&text) {
                    Ok(TerminalMessage::Resize { rows, cols }) => {
                        backend
                            .resize_process(&id, TerminalSize { rows, cols })
                            .await
                    }
                    Ok(TerminalMessage::Input { data }) => {
                        write_chunks(&backend, &id, data.as_bytes()).await
                    }
                    // Plain text is typed.
                    Err(_) => write_chunks(&backend, &id, text.as_bytes()).await,
                },
                Message::Close(_) => return,
                Message::Ping(_) | Message::Pong(_) => Ok(()),
            };
            match done {
                // The terminal is gone (ended and forgotten, or its sandbox).
                Err(crate::SandboxError::NotFound(_)) => return,
                // A bad resize, a full input queue: said, the session goes on.
                Err(e) => tracing::debug!(error = %e, process = %id, "terminal input"),
                Ok(()) => {}
            }
        }
    };
    tokio::select! {
        r = output => {
            if let Err(e) = r {
                tracing::debug!(error = %e, "terminal output ended");
            }
        }
        () = input => {}
    }
    if let Err(e) = backend.remove_process(&id).await {
        tracing::debug!(error = %e, process = %id, "ending a terminal");
    }
}

/// Types `bytes` into the terminal (the backend waits, bounded, while its
/// input queue is full).
async fn write_chunks(backend: &Backend, id: &ProcessId, bytes: &[u8]) -> crate::Result<()> {
    for piece in bytes.chunks(crate::processes::MAX_STDIN_WRITE) {
        backend.write_process(id, Some(piece.to_vec())).await?;
    }
    Ok(())
}

//! Routes and handlers of `sandbox serve`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, MatchedPath, Path, Query, RawPathParams, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, RequestExt, Router};
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::auth::authenticate;
use super::error::{ApiError, ApiResult};
use super::metrics::Call;
use super::{AppState, Shared};
use crate::exec::{ExecOptions, ExecResponse, StreamKind};
use crate::files::{FileError, Upload};
use crate::{BackendView, PolicySource, SandboxError};

/// The OpenAPI document, checked into the repository.
pub const OPENAPI: &str = include_str!("../../openapi.json");

/// The API router: `serve` runs it, and the bench and the tests drive it
/// in process.
pub fn router(state: Shared, body_limit: usize) -> Router {
    Router::new()
        .route("/v1/threads/{thread_id}/exec", post(exec))
        .route("/v1/threads/{thread_id}/exec/stream", post(exec_stream))
        .route("/v1/threads/{thread_id}/files", get(download).put(upload))
        // One file, streamed both ways with no body limit but the file cap.
        .route(
            "/v1/threads/{thread_id}/files/raw",
            get(download_raw).put(upload_raw),
        )
        .route(
            "/v1/threads/{thread_id}",
            get(thread_backend).delete(destroy_thread),
        )
        .route("/v1/users/{user_id}", delete(destroy_user))
        .route("/v1/executions/{execution_id}", delete(cancel_execution))
        .route("/v1/backends", get(backends))
        .route("/v1/gc", post(gc))
        .route("/v1/policy", get(policy).post(swap_policy))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), authenticate))
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(middleware::from_fn(close_after_refused_body))
        // Outermost, so refused (401) and oversized (413) requests are logged too.
        .layer(middleware::from_fn(access_log))
        .with_state(state)
}

/// Target of the access log (`RUST_LOG=sandbox_host::serve::access=off`
/// silences it): one `info` event per request.
pub const ACCESS_LOG_TARGET: &str = "sandbox_host::serve::access";

/// Longest id or path written to the access log (valid thread ids are far
/// shorter; anything longer is hostile and cut).
const LOGGED_CHARS: usize = 256;

/// Logs one line per request: method, matched route template, status,
/// duration in ms (until the response head: a streaming exec goes on after
/// it), and the thread or user id of the route. Values come from end users;
/// the formatter writes them quoted and escaped.
async fn access_log(mut request: Request, next: Next) -> Response {
    let start = Instant::now();
    let method = request.method().clone();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned());
    // The raw path only when no route matched; otherwise the template says it.
    let path = route.is_none().then(|| clip(request.uri().path()));
    let (mut thread_id, mut user_id) = (None, None);
    if let Ok(params) = request.extract_parts::<RawPathParams>().await {
        for (key, value) in &params {
            match key {
                "thread_id" => thread_id = Some(clip(value)),
                "user_id" => user_id = Some(clip(value)),
                _ => {}
            }
        }
    }
    let response = next.run(request).await;
    tracing::info!(
        target: ACCESS_LOG_TARGET,
        method = %method,
        route = route.as_deref().unwrap_or("(none)"),
        path,
        status = response.status().as_u16(),
        duration_ms = start.elapsed().as_micros() as f64 / 1000.0,
        thread_id,
        user_id,
        "request"
    );
    response
}

/// Asks the client to close the connection after an error answer to a
/// request that carried a body: the server may not have read that body (a
/// 413, a 401 before the upload), and hyper then closes the connection
/// itself. Without the header a pooling client reuses the dead connection
/// and its next request fails with no answer.
async fn close_after_refused_body(request: Request, next: Next) -> Response {
    let has_body = request.headers().contains_key(header::TRANSFER_ENCODING)
        || request
            .headers()
            .get(header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() != b"0");
    let mut response = next.run(request).await;
    if has_body && (response.status().is_client_error() || response.status().is_server_error()) {
        response.headers_mut().insert(
            header::CONNECTION,
            axum::http::HeaderValue::from_static("close"),
        );
    }
    response
}

fn clip(s: &str) -> String {
    s.chars().take(LOGGED_CHARS).collect()
}

/// Resolves when the grace period after SIGTERM is over.
async fn shutdown_over(mut shutdown: tokio::sync::watch::Receiver<bool>) {
    if shutdown.wait_for(|over| *over).await.is_err() {
        // No server drives shutdown (an embedded router): never.
        std::future::pending::<()>().await;
    }
}

/// Counts and times one operation; errors are counted by kind.
async fn observed<T>(
    state: &AppState,
    op: &'static str,
    fut: impl std::future::Future<Output = ApiResult<T>>,
) -> ApiResult<T> {
    let call = Call::start(op);
    let result = fut.await;
    call.end(&state.metrics, result.as_ref().err().map(ApiError::kind));
    result
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExecBody {
    command: String,
    timeout_secs: Option<f64>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    workdir: Option<String>,
    stdin: Option<String>,
    /// stdin as base64, for bytes that are not UTF-8 text; not with `stdin`.
    stdin_b64: Option<String>,
    /// The caller's id for this execution, to cancel it by.
    execution_id: Option<String>,
    /// How output bytes are answered; text when absent.
    encoding: Option<Encoding>,
}

/// How an exec answers the bytes its command printed. Anything but these
/// two words is a 400, not a silent fallback.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Encoding {
    /// Text only (invalid UTF-8 replaced): `data`, `stdout`, `stderr`.
    #[default]
    Text,
    /// The text, plus the exact bytes in base64: `data_b64` instead of
    /// `data`, and `stdout_b64`, `stderr_b64` beside `stdout`, `stderr`.
    Base64,
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

impl ExecBody {
    fn options(&self) -> ApiResult<ExecOptions> {
        let timeout = match self.timeout_secs {
            Some(t) if t > 0.0 && t.is_finite() && t < 86_400.0 => Some(Duration::from_secs_f64(t)),
            Some(_) => return Err(ApiError::bad_request("timeout_secs must be in (0, 86400)")),
            None => None,
        };
        let stdin = match (&self.stdin, &self.stdin_b64) {
            (Some(_), Some(_)) => {
                return Err(ApiError::bad_request("give stdin or stdin_b64, not both"))
            }
            (Some(text), None) => Some(text.clone().into_bytes()),
            (None, Some(encoded)) => Some(
                base64::engine::general_purpose::STANDARD
                    .decode(encoded.as_bytes())
                    .map_err(|e| ApiError::bad_request(format!("stdin_b64: base64: {e}")))?,
            ),
            (None, None) => None,
        };
        Ok(ExecOptions {
            timeout,
            env: self
                .env
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            workdir: self.workdir.clone(),
            stdin,
            execution_id: self.execution_id.clone(),
        })
    }

    fn encoding(&self) -> Encoding {
        self.encoding.unwrap_or_default()
    }
}

/// An exec's answer on the wire: the response as the library gives it,
/// plus each stream's exact bytes in base64 when the request asked for
/// `"encoding": "base64"`.
#[derive(Serialize)]
struct ExecReply {
    #[serde(flatten)]
    response: ExecResponse,
    #[serde(skip_serializing_if = "Option::is_none")]
    stdout_b64: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stderr_b64: Option<String>,
}

impl ExecReply {
    fn new(response: ExecResponse, encoding: Encoding) -> Self {
        let (stdout_b64, stderr_b64) = match encoding {
            Encoding::Text => (None, None),
            Encoding::Base64 => (
                Some(b64(&response.stdout_bytes)),
                Some(b64(&response.stderr_bytes)),
            ),
        };
        ExecReply {
            response,
            stdout_b64,
            stderr_b64,
        }
    }
}

async fn exec(
    State(state): State<Shared>,
    Path(thread_id): Path<String>,
    body: Result<Json<ExecBody>, JsonRejection>,
) -> ApiResult<Json<ExecReply>> {
    observed(&state, "exec", async {
        let Json(body) = body?;
        let options = body.options()?;
        let encoding = body.encoding();
        let backend = state.sandbox.get_thread_backend(&thread_id).await?;
        // Past the shutdown grace period the call is dropped, which kills
        // its processes, and the client is told why.
        tokio::select! {
            r = backend.execute_with(&body.command, options) => {
                Ok(Json(ExecReply::new(r?, encoding)))
            }
            _ = shutdown_over(state.shutdown.clone()) => Err(ApiError::shutdown()),
        }
    })
    .await
}

/// One NDJSON line of the streaming exec.
#[derive(Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
enum StreamLine {
    /// First: the execution's id, to cancel it by (`DELETE /v1/executions/{id}`).
    Started {
        execution_id: String,
    },
    /// A chunk of live output: `data` as text, or `data_b64` in base64
    /// mode (exactly one of them).
    Output {
        stream: StreamKind,
        #[serde(skip_serializing_if = "Option::is_none")]
        data: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        data_b64: Option<String>,
    },
    Exit(ExecReply),
    Error {
        kind: &'static str,
        message: String,
    },
}

impl StreamLine {
    fn output(stream: StreamKind, bytes: &[u8], encoding: Encoding) -> Self {
        let (data, data_b64) = match encoding {
            Encoding::Text => (Some(String::from_utf8_lossy(bytes).into_owned()), None),
            Encoding::Base64 => (None, Some(b64(bytes))),
        };
        StreamLine::Output {
            stream,
            data,
            data_b64,
        }
    }
}

fn line(l: &StreamLine) -> Bytes {
    let mut v = serde_json::to_vec(l).unwrap_or_default();
    v.push(b'\n');
    Bytes::from(v)
}

async fn exec_stream(
    State(state): State<Shared>,
    Path(thread_id): Path<String>,
    body: Result<Json<ExecBody>, JsonRejection>,
) -> ApiResult<Response> {
    // Timed until the command ends (in the task below), not until the
    // response head: the latency of a streamed exec is its command's.
    let call = Call::start("exec-stream");
    // Resolve the backend first so id errors get a proper status.
    let ready = async {
        let Json(body) = body?;
        let mut options = body.options()?;
        let id = options
            .execution_id
            .get_or_insert_with(crate::exec::new_execution_id)
            .clone();
        crate::exec::check_execution_id(&id)?;
        let backend = state.sandbox.get_thread_backend(&thread_id).await?;
        Ok::<_, ApiError>((body, options, backend, id))
    };
    let (body, options, backend, execution_id) = match ready.await {
        Ok(ready) => ready,
        Err(e) => {
            call.end(&state.metrics, Some(e.kind()));
            return Err(e);
        }
    };
    // Bounded: a client that reads slowly loses live chunks (counted in a
    // final marker), never host memory; the final line has the capped output.
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(256);
    let shutdown = state.shutdown.clone();
    let _ = tx.try_send(line(&StreamLine::Started { execution_id }));
    tokio::spawn(async move {
        let mut dropped = 0usize;
        let live = tx.clone();
        let encoding = body.encoding();
        let run = backend.execute_streaming(&body.command, options, |stream, bytes| {
            let l = StreamLine::output(stream, bytes, encoding);
            if live.try_send(line(&l)).is_err() {
                dropped += bytes.len();
            }
        });
        // A client that goes away cancels its command (dropping the call
        // kills its processes); so does the end of the shutdown grace.
        let result = tokio::select! {
            r = run => r.map_err(ApiError::from),
            _ = tx.closed() => {
                tracing::info!("streaming client disconnected: command cancelled");
                // Counted and timed, but no error: nobody was told one.
                call.end(&state.metrics, None);
                return;
            }
            _ = shutdown_over(shutdown) => Err(ApiError::shutdown()),
        };
        // Before the last line is sent, so a client that has read the whole
        // stream finds the call in /metrics.
        call.end(&state.metrics, result.as_ref().err().map(ApiError::kind));
        if dropped > 0 {
            let note =
                format!("[sandbox: {dropped} bytes of live output dropped for a slow reader]\n");
            let note = StreamLine::output(StreamKind::Stderr, note.as_bytes(), encoding);
            let _ = tx.send(line(&note)).await;
        }
        let last = match result {
            Ok(r) => StreamLine::Exit(ExecReply::new(r, encoding)),
            Err(e) => {
                let (kind, message) = e.into_parts();
                StreamLine::Error { kind, message }
            }
        };
        let _ = tx.send(line(&last)).await;
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, std::convert::Infallible>(b), rx))
    });
    Ok((
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(stream),
    )
        .into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UploadBody {
    files: Vec<UploadFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UploadFile {
    path: String,
    content_b64: String,
    mode: Option<u32>,
}

async fn upload(
    State(state): State<Shared>,
    Path(thread_id): Path<String>,
    body: Result<Json<UploadBody>, JsonRejection>,
) -> ApiResult<Json<serde_json::Value>> {
    observed(&state, "upload", async {
        let Json(body) = body?;
        let mut uploads = Vec::with_capacity(body.files.len());
        for f in body.files {
            let content = base64::engine::general_purpose::STANDARD
                .decode(f.content_b64.as_bytes())
                .map_err(|e| ApiError::bad_request(format!("{}: base64: {e}", f.path)))?;
            uploads.push(Upload {
                path: f.path,
                content,
                mode: f.mode,
            });
        }
        let backend = state.sandbox.get_thread_backend(&thread_id).await?;
        let results = backend.upload_files(uploads).await?;
        Ok(Json(json!({ "results": results })))
    })
    .await
}

async fn download(
    State(state): State<Shared>,
    Path(thread_id): Path<String>,
    // `?path=a&path=b`: a repeated key, so pairs rather than a struct.
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> ApiResult<Json<serde_json::Value>> {
    observed(&state, "download", async {
        let Query(pairs) = query?;
        let paths: Vec<String> = pairs
            .into_iter()
            .filter(|(k, _)| k == "path")
            .map(|(_, v)| v)
            .collect();
        if paths.is_empty() {
            return Err(ApiError::bad_request("give one or more ?path="));
        }
        let backend = state.sandbox.get_thread_backend(&thread_id).await?;
        // The JSON copies of a batch cost ~3x its content: capped, so one
        // request stays within the server's memory budget. Larger files:
        // GET /files/raw.
        let mut limits = backend.file_limits();
        limits.max_batch_bytes = limits.max_batch_bytes.min(super::JSON_BATCH_BYTES);
        let results: Vec<serde_json::Value> = backend
            .download_files_with(&paths, &limits)
            .await?
            .into_iter()
            .map(|r| {
                json!({
                    "path": r.path,
                    "content_b64": r.content.map(|c| base64::engine::general_purpose::STANDARD.encode(c)),
                    "mode": r.mode,
                    "error": r.error,
                })
            })
            .collect();
        Ok(Json(json!({ "results": results })))
    })
    .await
}

/// The query of the raw file routes: exactly one `path`, and for an upload
/// optionally the file's `mode` in octal (`644`, `0o755`). Anything else,
/// a repeated key included, is refused rather than ignored.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OneFile {
    path: Option<String>,
    mode: Option<String>,
}

impl OneFile {
    fn parse(query: Result<Query<OneFile>, QueryRejection>) -> ApiResult<(String, Option<u32>)> {
        let Query(OneFile { path, mode }) = query?;
        let path = path.ok_or_else(|| ApiError::bad_request("give one ?path="))?;
        let mode = mode
            .map(|m| u32::from_str_radix(m.trim_start_matches("0o"), 8))
            .transpose()
            .map_err(|_| ApiError::bad_request("mode: octal bits"))?;
        Ok((path, mode))
    }
}

/// One file's bytes, streamed as they leave the container: the server holds
/// at most a 64 KiB pipe of it, whatever its size. Errors found before the
/// first byte (missing, too large...) get their status; a client that goes
/// away stops the transfer.
async fn download_raw(
    State(state): State<Shared>,
    Path(thread_id): Path<String>,
    query: Result<Query<OneFile>, QueryRejection>,
) -> ApiResult<Response> {
    let (path, backend) = observed(&state, "download-raw", async {
        let (path, _) = OneFile::parse(query)?;
        Ok((path, state.sandbox.get_thread_backend(&thread_id).await?))
    })
    .await?;
    let limits = backend.file_limits();
    let (mut writer, mut reader) = tokio::io::duplex(64 * 1024);
    let mut transfer = tokio::spawn(async move {
        let r = backend.download_to(&path, &mut writer, &limits).await;
        drop(writer);
        r
    });
    use futures_util::StreamExt;
    use tokio::io::AsyncReadExt;
    type Verdict = Result<
        Result<
            Result<crate::dataplane::files::FileInfo, crate::dataplane::files::FileError>,
            SandboxError,
        >,
        tokio::task::JoinError,
    >;
    let mut first = vec![0u8; 64 * 1024];
    // The transfer's verdict, once known (a JoinHandle is awaited once).
    let mut verdict: Option<Verdict> = None;
    let mut n = tokio::select! {
        n = reader.read(&mut first) => n.unwrap_or(0),
        done = &mut transfer => { verdict = Some(done); 0 }
    };
    if n == 0 {
        // EOF, or the transfer ended before a byte was read: its verdict
        // decides the status (a tiny file may still be in the pipe).
        let done = match verdict.take() {
            Some(done) => done,
            None => (&mut transfer).await,
        };
        match &done {
            Ok(Ok(Ok(_))) => n = reader.read(&mut first).await.unwrap_or(0),
            Ok(Ok(Err(e))) => return Err((*e).into()),
            Ok(Err(e)) => return Err(e.clone().into()),
            Err(e) => {
                return Err(ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "other",
                    e.to_string(),
                ))
            }
        }
        verdict = Some(done);
    }
    first.truncate(n);
    let head =
        futures_util::stream::once(async move { Ok::<_, std::io::Error>(Bytes::from(first)) });
    let rest = tokio_util::io::ReaderStream::new(reader);
    // The pipe's end is not success: the transfer's verdict is. A failure
    // midway (the file shrank, the engine failed) ends the body with an
    // error, so the client sees a broken transfer, never a short file.
    let tail = futures_util::stream::once(async move {
        let done = match verdict {
            Some(done) => done,
            None => transfer.await,
        };
        match done {
            Ok(Ok(Ok(_))) => None,
            Ok(Ok(Err(e))) => Some(Err(std::io::Error::other(format!("transfer failed: {e}")))),
            Ok(Err(e)) => Some(Err(std::io::Error::other(format!("transfer failed: {e}")))),
            Err(e) => Some(Err(std::io::Error::other(format!("transfer failed: {e}")))),
        }
    })
    .filter_map(|item| async move { item });
    Ok((
        [(header::CONTENT_TYPE, "application/octet-stream")],
        Body::from_stream(head.chain(rest).chain(tail)),
    )
        .into_response())
}

/// One file's bytes from the request body, streamed into the container:
/// needs Content-Length, bounded by the file cap, not by the JSON body limit.
async fn upload_raw(
    State(state): State<Shared>,
    Path(thread_id): Path<String>,
    query: Result<Query<OneFile>, QueryRejection>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Json<serde_json::Value>> {
    observed(&state, "upload-raw", async {
        let (path, mode) = OneFile::parse(query)?;
        let len: u64 = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::LENGTH_REQUIRED,
                    "bad-request",
                    "Content-Length is required",
                )
            })?;
        let backend = state.sandbox.get_thread_backend(&thread_id).await?;
        let limits = backend.file_limits();
        if len > limits.max_file_bytes {
            return Err(FileError::FileTooLarge.into());
        }
        use futures_util::TryStreamExt;
        let stream = body.into_data_stream().map_err(std::io::Error::other);
        let mut reader = tokio_util::io::StreamReader::new(stream);
        let result = backend
            .upload_from(&path, &mut reader, len, mode, &limits)
            .await?;
        match result.error {
            Some(e) => Err(e.into()),
            None => Ok(Json(json!({ "path": result.path, "size": len }))),
        }
    })
    .await
}

async fn thread_backend(
    State(state): State<Shared>,
    Path(thread_id): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    observed(&state, "thread-backend", async {
        // A GET has no side effects: no workspace, no container.
        let info = state.sandbox.describe_thread(&thread_id).await?;
        Ok(Json(serde_json::to_value(info).unwrap_or_default()))
    })
    .await
}

async fn gc(
    State(state): State<Shared>,
    // Pairs, not a struct: a repeated key is not an error here, and any
    // `dry_run=true` among them makes the run dry (the safe reading for a
    // route that removes containers). Only the exact text `true` counts.
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> ApiResult<Json<serde_json::Value>> {
    observed(&state, "gc", async {
        let Query(pairs) = query?;
        let dry_run = pairs.iter().any(|(k, v)| k == "dry_run" && v == "true");
        let entries = state.sandbox.gc(None, dry_run).await?;
        Ok(Json(json!({ "dry_run": dry_run, "containers": entries })))
    })
    .await
}

async fn destroy_thread(
    State(state): State<Shared>,
    Path(thread_id): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    observed(&state, "destroy-thread", async {
        let destroyed = state.sandbox.destroy_thread_backend(&thread_id).await?;
        Ok(Json(json!({ "destroyed": destroyed })))
    })
    .await
}

async fn destroy_user(
    State(state): State<Shared>,
    Path(user_id): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    observed(&state, "destroy-user", async {
        let destroyed = state.sandbox.destroy_user_backend(&user_id).await?;
        Ok(Json(json!({ "destroyed": destroyed })))
    })
    .await
}

/// Kills a running execution's process tree; it then answers (or its
/// stream ends) with exit 130 and reason `cancelled`.
async fn cancel_execution(
    State(state): State<Shared>,
    Path(execution_id): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    observed(&state, "cancel", async {
        crate::exec::check_execution_id(&execution_id)?;
        if state.sandbox.cancel(&execution_id) {
            Ok(Json(json!({ "cancelled": true })))
        } else {
            Err(ApiError::from(SandboxError::NotFound(format!(
                "no running execution {execution_id} on this server"
            ))))
        }
    })
    .await
}

async fn backends(State(state): State<Shared>) -> ApiResult<Json<serde_json::Value>> {
    observed(&state, "backends", async {
        let now = crate::engine::now_ms();
        let list: Vec<BackendView> = state
            .sandbox
            .list()
            .await?
            .into_iter()
            .map(|c| BackendView::new(c, now))
            .collect();
        Ok(Json(
            json!({ "policy": state.sandbox.policy_name(), "backends": list }),
        ))
    })
    .await
}

async fn policy(State(state): State<Shared>) -> Json<serde_json::Value> {
    Json(json!({ "policy": state.sandbox.policy_name() }))
}

/// Live swap: the body is a component (`application/wasm`). Compiled and
/// self-checked off the hot path; on any error the running policy stays.
async fn swap_policy(
    State(state): State<Shared>,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> ApiResult<Json<serde_json::Value>> {
    observed(&state, "swap-policy", async {
        // An oversized component is a JSON error like every other one.
        let body = body?;
        if state.token.is_none() {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "refused",
                "policy upload needs a server started with a bearer token",
            ));
        }
        let label = headers
            .get("x-policy-name")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("uploaded policy")
            .chars()
            .take(64)
            .collect::<String>();
        state
            .sandbox
            .swap_policy(PolicySource::Bytes {
                label,
                bytes: body.to_vec(),
            })
            .await?;
        state.metrics.policy_swaps.inc();
        Ok(Json(json!({ "policy": state.sandbox.policy_name() })))
    })
    .await
}

async fn healthz(State(state): State<Shared>) -> Response {
    let engine = state.sandbox.ping().await;
    let body = json!({
        "status": if engine.is_ok() { "ok" } else { "degraded" },
        "engine": engine.as_ref().map(|_| "ok".to_owned()).unwrap_or_else(|e| e.to_string()),
        "policy": state.sandbox.policy_name(),
    });
    let status = if engine.is_ok() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

async fn metrics(State(state): State<Shared>) -> Response {
    // One engine list per scrape; when the engine does not answer, the
    // gauges keep their last value and the counters are still served.
    let usage = state
        .sandbox
        .list()
        .await
        .ok()
        .map(|list| super::metrics::Usage {
            containers: list.len() as i64,
            in_flight: list.iter().map(|c| i64::from(c.in_flight)).sum(),
        });
    match state.metrics.render(&state.sandbox, usage) {
        Ok(text) => ([(header::CONTENT_TYPE, super::metrics::CONTENT_TYPE)], text).into_response(),
        Err(e) => {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "other", e.to_string()).into_response()
        }
    }
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method-not-allowed",
        "this route does not take that method (see /openapi.json)",
    )
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not-found", "no such route")
}

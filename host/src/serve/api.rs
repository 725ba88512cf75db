//! Routes and handlers of `sandbox serve`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, MatchedPath, Path, RawPathParams, RawQuery, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, RequestExt, Router};
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::AppState;
use crate::dataplane::exec::{ExecOptions, ExecResponse, StreamKind};
use crate::dataplane::files::Upload;
use crate::{BackendView, PolicySource, SandboxError};

type Shared = Arc<AppState>;

/// The OpenAPI document, checked into the repository.
pub const OPENAPI: &str = include_str!("../../openapi.json");

/// The API router (exposed for in-process tests).
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
        .route("/v1/backends", get(backends))
        .route("/v1/gc", post(gc))
        .route("/v1/policy", get(policy).post(swap_policy))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(state.clone(), authenticate))
        .layer(DefaultBodyLimit::max(body_limit))
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

fn clip(s: &str) -> String {
    s.chars().take(LOGGED_CHARS).collect()
}

/// An API error: a status and a JSON body `{"error": {"kind", "message"}}`.
pub struct ApiError {
    status: StatusCode,
    kind: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            kind,
            message: message.into(),
        }
    }
}

impl From<SandboxError> for ApiError {
    fn from(e: SandboxError) -> Self {
        let status = match &e {
            SandboxError::InvalidId(_) => StatusCode::BAD_REQUEST,
            SandboxError::Refused(_) => StatusCode::FORBIDDEN,
            SandboxError::NotFound(_) => StatusCode::NOT_FOUND,
            SandboxError::DockerUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            SandboxError::PolicyLoad(_) => StatusCode::UNPROCESSABLE_ENTITY,
            SandboxError::PolicyTrap(_) | SandboxError::Other(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        ApiError::new(status, e.kind(), e.to_string())
    }
}

impl From<JsonRejection> for ApiError {
    fn from(e: JsonRejection) -> Self {
        let status = match e.status() {
            StatusCode::PAYLOAD_TOO_LARGE => StatusCode::PAYLOAD_TOO_LARGE,
            StatusCode::UNSUPPORTED_MEDIA_TYPE => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            _ => StatusCode::BAD_REQUEST,
        };
        let kind = if status == StatusCode::PAYLOAD_TOO_LARGE {
            "body-too-large"
        } else {
            "bad-request"
        };
        ApiError::new(status, kind, e.body_text())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Json(json!({"error": {"kind": self.kind, "message": self.message}}));
        let mut response = (self.status, body).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                "Bearer".parse().expect("static header"),
            );
        }
        response
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// Bearer-token check (constant time over digests, so neither content nor
/// length leaks); `/healthz` stays open for probes.
async fn authenticate(State(state): State<Shared>, request: Request, next: Next) -> Response {
    let Some(expected) = state.token.as_deref() else {
        // No token: only requests addressed to an allowed name (loopback by
        // default) get in, so a DNS-rebinding page cannot reach the API.
        if request.uri().path() == "/healthz" || host_allowed(&request, &state.allowed_hosts) {
            return next.run(request).await;
        }
        state
            .metrics
            .errors
            .get_or_create(&kind_label("forbidden-host"))
            .inc();
        return ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden-host",
            "this server has no token and answers only requests addressed to its allowed \
             host names (loopback by default; see --allowed-host)",
        )
        .into_response();
    };
    if request.uri().path() == "/healthz" {
        return next.run(request).await;
    }
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    let ok: bool = Sha256::digest(given.as_bytes())
        .ct_eq(&Sha256::digest(expected.as_bytes()))
        .into();
    if ok {
        next.run(request).await
    } else {
        state
            .metrics
            .errors
            .get_or_create(&kind_label("unauthorized"))
            .inc();
        let message = if given.is_empty() {
            "missing bearer token"
        } else {
            "wrong bearer token"
        };
        ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message).into_response()
    }
}

/// Whether the request's Host (without its port) is on the allow-list.
fn host_allowed(request: &Request, allowed: &[String]) -> bool {
    let Some(host) = request
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let name = match host.rsplit_once(':') {
        // `[::1]:8765`, `127.0.0.1:8765`, `localhost:8765`; a bare `::1` has
        // colons but no port.
        Some((name, port)) if port.chars().all(|c| c.is_ascii_digit()) && !name.ends_with(':') => {
            name
        }
        _ => host,
    };
    allowed.iter().any(|a| a.eq_ignore_ascii_case(name))
}

/// Resolves when the grace period after SIGTERM is over.
async fn shutdown_over(mut shutdown: tokio::sync::watch::Receiver<bool>) {
    if shutdown.wait_for(|over| *over).await.is_err() {
        // No server drives shutdown (an embedded router): never.
        std::future::pending::<()>().await;
    }
}

fn shutdown_error() -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "shutdown",
        "the server shut down and its grace period ended: the command was killed",
    )
}

fn kind_label(kind: &str) -> Vec<(String, String)> {
    vec![("kind".to_owned(), kind.to_owned())]
}

/// Counts and times one operation; errors are counted by kind.
async fn observed<T>(
    state: &AppState,
    op: &'static str,
    fut: impl std::future::Future<Output = ApiResult<T>>,
) -> ApiResult<T> {
    let start = Instant::now();
    let result = fut.await;
    let labels = vec![("op".to_owned(), op.to_owned())];
    state.metrics.calls.get_or_create(&labels).inc();
    state
        .metrics
        .latency
        .get_or_create(&labels)
        .observe(start.elapsed().as_secs_f64());
    if let Err(e) = &result {
        state
            .metrics
            .errors
            .get_or_create(&kind_label(e.kind))
            .inc();
    }
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
}

impl ExecBody {
    fn options(&self) -> ApiResult<ExecOptions> {
        let timeout = match self.timeout_secs {
            Some(t) if t > 0.0 && t.is_finite() && t < 86_400.0 => Some(Duration::from_secs_f64(t)),
            Some(_) => {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "bad-request",
                    "timeout_secs must be in (0, 86400)",
                ))
            }
            None => None,
        };
        Ok(ExecOptions {
            timeout,
            env: self
                .env
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            workdir: self.workdir.clone(),
            stdin: self.stdin.as_ref().map(|s| s.clone().into_bytes()),
        })
    }
}

async fn exec(
    State(state): State<Shared>,
    Path(thread_id): Path<String>,
    body: Result<Json<ExecBody>, JsonRejection>,
) -> ApiResult<Json<ExecResponse>> {
    observed(&state, "exec", async {
        let Json(body) = body?;
        let options = body.options()?;
        let backend = state.sandbox.get_thread_backend(&thread_id).await?;
        // Past the shutdown grace period the call is dropped, which kills
        // its processes, and the client is told why.
        tokio::select! {
            r = backend.execute_with(&body.command, options) => Ok(Json(r?)),
            _ = shutdown_over(state.shutdown.clone()) => Err(shutdown_error()),
        }
    })
    .await
}

/// One NDJSON line of the streaming exec.
#[derive(Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
enum StreamLine {
    Output { stream: StreamKind, data: String },
    Exit(ExecResponse),
    Error { kind: &'static str, message: String },
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
    let Json(body) = body?;
    let options = body.options()?;
    // Resolve the backend first so id errors get a proper status.
    let backend = observed(&state, "exec-stream", async {
        Ok(state.sandbox.get_thread_backend(&thread_id).await?)
    })
    .await?;
    // Bounded: a client that reads slowly loses live chunks (counted in a
    // final marker), never host memory; the final line has the capped output.
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(256);
    let shutdown = state.shutdown.clone();
    tokio::spawn(async move {
        let mut dropped = 0usize;
        let live = tx.clone();
        let run = backend.execute_streaming(&body.command, options, |stream, bytes| {
            let l = StreamLine::Output {
                stream,
                data: String::from_utf8_lossy(bytes).into_owned(),
            };
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
                return;
            }
            _ = shutdown_over(shutdown) => Err(shutdown_error()),
        };
        if dropped > 0 {
            let note = StreamLine::Output {
                stream: StreamKind::Stderr,
                data: format!(
                    "[sandbox: {dropped} bytes of live output dropped for a slow reader]\n"
                ),
            };
            let _ = tx.send(line(&note)).await;
        }
        let last = match result {
            Ok(r) => StreamLine::Exit(r),
            Err(e) => StreamLine::Error {
                kind: e.kind,
                message: e.message,
            },
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
                .map_err(|e| {
                    ApiError::new(
                        StatusCode::BAD_REQUEST,
                        "bad-request",
                        format!("{}: base64: {e}", f.path),
                    )
                })?;
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
    RawQuery(query): RawQuery,
) -> ApiResult<Json<serde_json::Value>> {
    observed(&state, "download", async {
        let pairs: Vec<(String, String)> = serde_urlencoded::from_str(query.as_deref().unwrap_or(""))
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad-request", format!("query: {e}")))?;
        let paths: Vec<String> = pairs.into_iter().filter(|(k, _)| k == "path").map(|(_, v)| v).collect();
        if paths.is_empty() {
            return Err(ApiError::new(StatusCode::BAD_REQUEST, "bad-request", "give one or more ?path="));
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

fn one_path(query: Option<&str>) -> ApiResult<(String, Option<u32>)> {
    let pairs: Vec<(String, String)> =
        serde_urlencoded::from_str(query.unwrap_or("")).map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad-request",
                format!("query: {e}"),
            )
        })?;
    let mut path = None;
    let mut mode = None;
    for (k, v) in pairs {
        match k.as_str() {
            "path" if path.is_none() => path = Some(v),
            "mode" => {
                let bits = u32::from_str_radix(v.trim_start_matches("0o"), 8).map_err(|_| {
                    ApiError::new(StatusCode::BAD_REQUEST, "bad-request", "mode: octal bits")
                })?;
                mode = Some(bits);
            }
            _ => {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "bad-request",
                    "give exactly one ?path= (and optionally ?mode=)",
                ))
            }
        }
    }
    let path = path
        .ok_or_else(|| ApiError::new(StatusCode::BAD_REQUEST, "bad-request", "give one ?path="))?;
    Ok((path, mode))
}

/// The status of a per-file error on the raw routes.
fn file_status(error: crate::dataplane::files::FileError) -> ApiError {
    use crate::dataplane::files::FileError;
    let status = match error {
        FileError::FileNotFound => StatusCode::NOT_FOUND,
        FileError::PermissionDenied => StatusCode::FORBIDDEN,
        FileError::IsDirectory | FileError::InvalidPath => StatusCode::BAD_REQUEST,
        FileError::FileTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
    };
    let kind: &'static str = match error {
        FileError::FileNotFound => "file_not_found",
        FileError::PermissionDenied => "permission_denied",
        FileError::IsDirectory => "is_directory",
        FileError::InvalidPath => "invalid_path",
        FileError::FileTooLarge => "file_too_large",
    };
    ApiError::new(status, kind, error.to_string())
}

/// One file's bytes, streamed as they leave the container: the server holds
/// at most a 64 KiB pipe of it, whatever its size. Errors found before the
/// first byte (missing, too large...) get their status; a client that goes
/// away stops the transfer.
async fn download_raw(
    State(state): State<Shared>,
    Path(thread_id): Path<String>,
    RawQuery(query): RawQuery,
) -> ApiResult<Response> {
    let (path, _) = one_path(query.as_deref())?;
    let backend = observed(&state, "download-raw", async {
        Ok(state.sandbox.get_thread_backend(&thread_id).await?)
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
            Ok(Ok(Err(e))) => return Err(file_status(*e)),
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
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Json<serde_json::Value>> {
    observed(&state, "upload-raw", async {
        let (path, mode) = one_path(query.as_deref())?;
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
            return Err(file_status(
                crate::dataplane::files::FileError::FileTooLarge,
            ));
        }
        use futures_util::TryStreamExt;
        let stream = body.into_data_stream().map_err(std::io::Error::other);
        let mut reader = tokio_util::io::StreamReader::new(stream);
        let result = backend
            .upload_from(&path, &mut reader, len, mode, &limits)
            .await?;
        match result.error {
            Some(e) => Err(file_status(e)),
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
    RawQuery(query): RawQuery,
) -> ApiResult<Json<serde_json::Value>> {
    observed(&state, "gc", async {
        let pairs: Vec<(String, String)> =
            serde_urlencoded::from_str(query.as_deref().unwrap_or("")).map_err(|e| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "bad-request",
                    format!("query: {e}"),
                )
            })?;
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
    body: Bytes,
) -> ApiResult<Json<serde_json::Value>> {
    observed(&state, "swap-policy", async {
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
    match state.metrics.render(&state.sandbox) {
        Ok(text) => ([(header::CONTENT_TYPE, super::metrics::CONTENT_TYPE)], text).into_response(),
        Err(e) => {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "other", e.to_string()).into_response()
        }
    }
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not-found", "no such route")
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::{Arc, Mutex};

    use axum::body::Body;
    use axum::http::{header, Request, StatusCode};
    use tower::ServiceExt as _;
    use tracing_subscriber::layer::SubscriberExt as _;

    use super::{router, ACCESS_LOG_TARGET};
    use crate::config::{Config, UserIds};
    use crate::provider::memory::MemoryProvider;
    use crate::serve::{AppState, METRICS_CONTENT_TYPE};
    use crate::{PolicySource, Sandbox};

    const TOKEN: &str = "t0ken";

    /// The fields of every access-log event, with the thread that emitted it.
    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<(std::thread::ThreadId, Fields)>>>);

    impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Capture {
        fn on_event(
            &self,
            event: &tracing::Event<'_>,
            _: tracing_subscriber::layer::Context<'_, S>,
        ) {
            if event.metadata().target() != ACCESS_LOG_TARGET {
                return;
            }
            let mut fields = Fields::default();
            event.record(&mut fields);
            fields
                .0
                .insert("level".into(), event.metadata().level().as_str().to_owned());
            let thread = std::thread::current().id();
            self.0.lock().unwrap().push((thread, fields));
        }
    }

    impl Capture {
        /// Installed as the global subscriber: a thread-local one
        /// (`set_default`) misses events once another test thread, without
        /// it, has cached the callsite as uninteresting. Tests run on
        /// current-thread runtimes and read only their own thread's events.
        fn global() -> &'static Capture {
            static CAPTURE: std::sync::OnceLock<Capture> = std::sync::OnceLock::new();
            CAPTURE.get_or_init(|| {
                let capture = Capture::default();
                tracing::subscriber::set_global_default(
                    tracing_subscriber::registry().with(capture.clone()),
                )
                .expect("no other global subscriber in the library's tests");
                capture
            })
        }

        fn mine(&self) -> Vec<BTreeMap<String, String>> {
            let me = std::thread::current().id();
            self.0
                .lock()
                .unwrap()
                .iter()
                .filter(|(t, _)| *t == me)
                .map(|(_, f)| f.0.clone())
                .collect()
        }
    }

    #[derive(Default)]
    struct Fields(BTreeMap<String, String>);

    impl tracing::field::Visit for Fields {
        fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
            self.0.insert(field.name().to_owned(), value.to_owned());
        }
        fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
            self.0.insert(field.name().to_owned(), format!("{value:?}"));
        }
    }

    /// Every router test builds its app here, so the capturing subscriber
    /// is in place before any request of any test.
    async fn app(root: &std::path::Path) -> axum::Router {
        app_with_token(root, Some(TOKEN.into())).await
    }

    async fn app_with_token(root: &std::path::Path, token: Option<String>) -> axum::Router {
        Capture::global();
        let config = Config {
            workspace_root: root.to_owned(),
            sandbox_user: Some(UserIds {
                uid: nix::unistd::geteuid().as_raw(),
                gid: nix::unistd::getegid().as_raw(),
            }),
            component_cache_dir: None,
            ..Config::default()
        };
        let sandbox = Sandbox::with_provider(
            config,
            Arc::new(MemoryProvider::new()),
            PolicySource::Builtin("per-user".into()),
        )
        .await
        .expect("sandbox on the in-memory provider");
        let state = Arc::new(AppState::new(sandbox, token));
        router(state, 1 << 20)
    }

    fn request(method: &str, uri: &str, body: &str, token: bool) -> Request<Body> {
        let mut r = Request::builder()
            .method(method)
            .uri(uri)
            .header(header::CONTENT_TYPE, "application/json");
        if token {
            r = r.header(header::AUTHORIZATION, format!("Bearer {TOKEN}"));
        }
        r.body(Body::from(body.to_owned())).unwrap()
    }

    /// Issue 9: `sandbox serve` logged nothing per request, so an operator
    /// could not tell which route, thread or user failed or was slow.
    #[tokio::test]
    async fn every_request_is_logged_once_with_route_status_duration_and_id() {
        let capture = Capture::global();
        let root = tempfile::tempdir().unwrap();
        let app = app(root.path()).await;
        let cases = [
            (
                request(
                    "POST",
                    "/v1/threads/alice-1/exec",
                    r#"{"command":"echo hi"}"#,
                    true,
                ),
                200,
                "/v1/threads/{thread_id}/exec",
                Some(("thread_id", "alice-1")),
            ),
            (
                request("DELETE", "/v1/users/alice", "", true),
                200,
                "/v1/users/{user_id}",
                Some(("user_id", "alice")),
            ),
            (
                request("POST", "/v1/threads/alice-1/exec", "{}", false),
                401,
                "/v1/threads/{thread_id}/exec",
                Some(("thread_id", "alice-1")),
            ),
            (
                request("GET", "/v1/threads/..%2Fetc", "", true),
                400,
                "/v1/threads/{thread_id}",
                Some(("thread_id", "../etc")),
            ),
            (request("GET", "/healthz", "", false), 200, "/healthz", None),
            (
                request("GET", "/no/such/route", "", true),
                404,
                "(none)",
                None,
            ),
        ];
        for (req, status, route, id) in cases {
            let method = req.method().to_string();
            let before = capture.mine().len();
            let response = app.clone().oneshot(req).await.unwrap();
            assert_eq!(response.status().as_u16(), status, "{route}");
            let logged = capture.mine()[before..].to_vec();
            assert_eq!(
                logged.len(),
                1,
                "exactly one access line for {route}: {logged:?}"
            );
            let line = &logged[0];
            assert_eq!(line["level"], "INFO");
            assert_eq!(line["method"], method);
            assert_eq!(line["route"], route);
            assert_eq!(line["status"], status.to_string());
            let ms: f64 = line["duration_ms"]
                .parse()
                .expect("duration_ms is a number");
            assert!((0.0..60_000.0).contains(&ms), "{ms}");
            match id {
                Some((key, value)) => assert_eq!(line[key], value, "{line:?}"),
                None => assert!(
                    !line.contains_key("thread_id") && !line.contains_key("user_id"),
                    "{line:?}"
                ),
            }
            if route == "(none)" {
                assert_eq!(line["path"], "/no/such/route");
            } else {
                assert!(!line.contains_key("path"), "{line:?}");
            }
        }
    }

    /// Issue 9: `/metrics` was labelled `text/plain; version=0.0.4` while
    /// prometheus-client writes OpenMetrics text, so scrapers parsed it with
    /// the wrong grammar.
    #[tokio::test]
    async fn metrics_are_served_with_the_openmetrics_media_type() {
        let root = tempfile::tempdir().unwrap();
        let app = app(root.path()).await;
        let response = app
            .oneshot(request("GET", "/metrics", "", true))
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            response.headers()[header::CONTENT_TYPE],
            "application/openmetrics-text; version=1.0.0; charset=utf-8"
        );
        assert_eq!(
            response.headers()[header::CONTENT_TYPE],
            METRICS_CONTENT_TYPE
        );
        let body = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        let text = String::from_utf8(body.to_vec()).unwrap();
        assert!(
            text.ends_with("# EOF\n"),
            "OpenMetrics text ends with # EOF: {text}"
        );
        assert!(text.contains("sandbox_policy_swaps_total"), "{text}");
    }

    #[tokio::test]
    async fn without_a_token_only_loopback_host_names_get_in() {
        // The bug: a tokenless loopback serve answered any Host header, so a
        // DNS-rebinding page reached exec and DELETE.
        let root = tempfile::tempdir().unwrap();
        let app = app_with_token(root.path(), None).await;
        let with_host = |host: &str| {
            Request::builder()
                .method("GET")
                .uri("/v1/backends")
                .header(header::HOST, host)
                .body(Body::empty())
                .unwrap()
        };
        for evil in [
            "rebind.attacker.example",
            "rebind.attacker.example:8765",
            "127.0.0.1.nip.io",
        ] {
            let r = app.clone().oneshot(with_host(evil)).await.unwrap();
            assert_eq!(r.status(), StatusCode::FORBIDDEN, "{evil}");
        }
        for ok in [
            "localhost:8765",
            "127.0.0.1:8765",
            "[::1]:8765",
            "LOCALHOST",
        ] {
            let r = app.clone().oneshot(with_host(ok)).await.unwrap();
            assert_eq!(r.status(), StatusCode::OK, "{ok}");
        }
    }

    #[tokio::test]
    async fn get_thread_has_no_side_effects() {
        // The bug: 10,000 GETs left 10,000 workspace directories.
        let root = tempfile::tempdir().unwrap();
        let app = app(root.path()).await;
        for i in 0..20 {
            let r = app
                .clone()
                .oneshot(request("GET", &format!("/v1/threads/u{i}-1"), "", true))
                .await
                .unwrap();
            assert_eq!(r.status(), StatusCode::OK);
        }
        let r = app
            .oneshot(request("GET", "/v1/threads/u0-1", "", true))
            .await
            .unwrap();
        let body = axum::body::to_bytes(r.into_body(), usize::MAX)
            .await
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            (v["id"].as_str(), v["container"].is_null()),
            (Some("u0"), true)
        );
        let left: Vec<_> = std::fs::read_dir(root.path())
            .map(|d| d.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "nothing created: {left:?}");
    }
}

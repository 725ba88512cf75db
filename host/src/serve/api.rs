//! Routes and handlers of `sandbox serve`.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{
    DefaultBodyLimit, FromRequest, MatchedPath, Path, Query, RawPathParams, Request, State,
};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, delete, get, post};
use axum::{Json, RequestExt, Router};
use serde::Deserialize;
use tokio::io::DuplexStream;
use tokio::task::JoinHandle;

use super::auth::{authenticate, guard_tokenless};
use super::budget::Holding;
use super::error::{ApiError, ApiResult, ErrorKind};
use super::metrics::Call;
use super::replies::{
    Backends, Cancelled, Collected, Destroyed, Downloaded, DownloadedFile, ExecReply, Health,
    HealthStatus, PolicyName, StreamLine, Uploaded, Written,
};
use super::requests::{Encoding, ExecBody, GcBody, UploadBody, MAX_GC_AGE_SECS};
use super::stream;
use super::{AppState, Shared};
use crate::exec::{ExecOptions, StreamKind};
use crate::files::FileError;
use crate::{Backend, BackendView, PolicySource, SandboxError, Status, ThreadInfo};

/// The OpenAPI document, checked into the repository.
pub const OPENAPI: &str = include_str!("../../openapi.json");

/// The API router: `serve` runs it, and the bench and the tests drive it
/// in process.
pub fn router(state: Shared, body_limit: usize) -> Router {
    let routes = Router::new()
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
        .route(
            "/v1/threads/{thread_id}/ports/{port}",
            any(super::ports::preview),
        )
        .route(
            "/v1/threads/{thread_id}/ports/{port}/",
            any(super::ports::preview),
        )
        .route(
            "/v1/threads/{thread_id}/ports/{port}/{*path}",
            any(super::ports::preview),
        )
        .route(
            "/v1/threads/{thread_id}/processes",
            post(super::processes::start).get(super::processes::list),
        )
        .route(
            "/v1/threads/{thread_id}/processes/{process_id}",
            get(super::processes::output).delete(super::processes::remove),
        )
        .route(
            "/v1/threads/{thread_id}/processes/{process_id}/stdin",
            post(super::processes::write_stdin),
        )
        .route(
            "/v1/threads/{thread_id}/processes/{process_id}/signal",
            post(super::processes::signal),
        )
        .route(
            "/v1/threads/{thread_id}/processes/{process_id}/resize",
            post(super::processes::resize),
        )
        .route("/v1/threads/{thread_id}/pty", get(super::processes::pty))
        .route("/v1/previews", post(super::ports::create_link))
        .route("/v1/previews/{link}", any(super::ports::preview_link))
        .route("/v1/previews/{link}/", any(super::ports::preview_link))
        .route(
            "/v1/previews/{link}/{*path}",
            any(super::ports::preview_link),
        )
        .route(
            "/v1/threads/{thread_id}/executions/{execution_id}",
            delete(cancel_execution),
        )
        .route("/v1/executions/{execution_id}", delete(cancel_unscoped))
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
        // What the access log tells of the route, once routed.
        .layer(middleware::from_fn(note_route))
        .with_state(state.clone());
    // Before routing: what no route escapes, present or future, an upgrade
    // or an unknown path.
    Router::new()
        .fallback_service(routes)
        .layer(middleware::from_fn_with_state(
            state.clone(),
            guard_tokenless,
        ))
        .layer(middleware::from_fn_with_state(
            state,
            super::ports::refuse_opaque_origins,
        ))
        .layer(middleware::from_fn(close_after_refused_body))
        // Outermost, so every answer is logged, refusals (401, 403, 413)
        // included.
        .layer(middleware::from_fn(access_log))
}

/// Target of the access log (`RUST_LOG=sandbox_host::serve::access=off`
/// silences it): one `info` event per request.
pub const ACCESS_LOG_TARGET: &str = "sandbox_host::serve::access";

/// Longest id or path written to the access log (valid thread ids are far
/// shorter; anything longer is hostile and cut).
const LOGGED_CHARS: usize = 256;

/// What the access log tells of the route a request took, carried out in
/// its answer's extensions (the log runs before routing).
#[derive(Clone, Default)]
struct RouteInfo {
    route: Option<String>,
    thread_id: Option<String>,
    user_id: Option<String>,
}

/// Notes the matched route template and the thread or user id of the path
/// in the answer, for [`access_log`].
async fn note_route(mut request: Request, next: Next) -> Response {
    let mut info = RouteInfo {
        route: request
            .extensions()
            .get::<MatchedPath>()
            .map(|p| p.as_str().to_owned()),
        ..RouteInfo::default()
    };
    if let Ok(params) = request.extract_parts::<RawPathParams>().await {
        for (key, value) in &params {
            match key {
                "thread_id" => info.thread_id = Some(clip(value)),
                "user_id" => info.user_id = Some(clip(value)),
                _ => {}
            }
        }
    }
    let mut response = next.run(request).await;
    response.extensions_mut().insert(info);
    response
}

/// Logs one line per request: method, matched route template, status,
/// duration in ms (until the response head: a streaming exec goes on after
/// it), and the thread or user id of the route. A request refused before
/// routing (403 `forbidden-host`, `forbidden-origin`) has no route: its
/// path is logged instead. Values come from end users; the formatter
/// writes them quoted and escaped.
async fn access_log(request: Request, next: Next) -> Response {
    let start = Instant::now();
    let method = request.method().clone();
    let path = clip(request.uri().path());
    let response = next.run(request).await;
    let info = response
        .extensions()
        .get::<RouteInfo>()
        .cloned()
        .unwrap_or_default();
    // The raw path only when no route matched; otherwise the template says it.
    let path = info.route.is_none().then_some(path);
    tracing::info!(
        target: ACCESS_LOG_TARGET,
        method = %method,
        route = info.route.as_deref().unwrap_or("(none)"),
        path,
        status = response.status().as_u16(),
        duration_ms = start.elapsed().as_micros() as f64 / 1000.0,
        thread_id = info.thread_id,
        user_id = info.user_id,
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

/// Live output lines a streamed exec queues for its client at most.
const LIVE_LINES: usize = 256;

/// The command's output as NDJSON lines while it runs (`started`, then
/// `output` chunks, then `exit` or `error`). Errors found before it starts
/// (a bad body, an invalid id, a refused backend) are JSON errors with
/// their status, not a stream.
async fn exec_stream(
    State(state): State<Shared>,
    Path(thread_id): Path<String>,
    body: Result<Json<ExecBody>, JsonRejection>,
) -> ApiResult<Response> {
    // Timed until the command ends (in the task below), not until the
    // response head: the latency of a streamed exec is its command's.
    let call = Call::start("exec-stream");
    let streamed = match StreamedExec::prepare(&state, &thread_id, body).await {
        Ok(streamed) => streamed,
        Err(e) => {
            call.end(&state.metrics, Some(e.kind()));
            return Err(e);
        }
    };
    let (lines, response) = stream::ndjson(LIVE_LINES);
    lines.try_send(&StreamLine::Started {
        execution_id: streamed.execution_id.clone(),
    });
    tokio::spawn(streamed.run(state, lines, call));
    Ok(response)
}

/// A streamed exec whose request was checked and whose backend is ready.
struct StreamedExec {
    body: ExecBody,
    options: ExecOptions,
    backend: Backend,
    execution_id: String,
}

impl StreamedExec {
    /// Checks the body and resolves the backend, before any line is sent,
    /// so these errors get their own status. The execution gets an id now
    /// (a random one unless the body names it): the first line tells it.
    async fn prepare(
        state: &AppState,
        thread_id: &str,
        body: Result<Json<ExecBody>, JsonRejection>,
    ) -> ApiResult<Self> {
        let Json(body) = body?;
        let mut options = body.options()?;
        let execution_id = options
            .execution_id
            .get_or_insert_with(crate::exec::new_execution_id)
            .clone();
        crate::exec::check_execution_id(&execution_id)?;
        let backend = state.sandbox.get_thread_backend(thread_id).await?;
        Ok(StreamedExec {
            body,
            options,
            backend,
            execution_id,
        })
    }

    /// Runs the command, its output sent live while the queue has room (a
    /// slow reader loses chunks, counted in a note; never host memory),
    /// then the last line with the capped output. A client that goes away
    /// cancels the command (dropping the call kills its processes); so
    /// does the end of the shutdown grace.
    async fn run(self, state: Shared, lines: stream::NdjsonSender, call: Call) {
        let encoding = self.body.encoding();
        let mut dropped = 0usize;
        let run =
            self.backend
                .execute_streaming(&self.body.command, self.options, |stream, bytes| {
                    if !lines.try_send(&StreamLine::output(stream, bytes, encoding)) {
                        dropped += bytes.len();
                    }
                });
        let result = tokio::select! {
            r = run => r.map_err(ApiError::from),
            () = lines.closed() => {
                tracing::info!("streaming client disconnected: command cancelled");
                // Counted and timed, but no error: nobody was told one.
                call.end(&state.metrics, None);
                return;
            }
            () = shutdown_over(state.shutdown.clone()) => Err(ApiError::shutdown()),
        };
        // Before the last line is sent, so a client that has read the whole
        // stream finds the call in /metrics.
        call.end(&state.metrics, result.as_ref().err().map(ApiError::kind));
        if dropped > 0 {
            lines.send(&dropped_note(dropped, encoding)).await;
        }
        let last = match result {
            Ok(r) => StreamLine::Exit(ExecReply::new(r, encoding)),
            Err(e) => StreamLine::Error(e.into_detail()),
        };
        lines.send(&last).await;
    }
}

/// The stderr line that tells a slow reader how much live output it lost.
fn dropped_note(dropped: usize, encoding: Encoding) -> StreamLine {
    let note = format!("[sandbox: {dropped} bytes of live output dropped for a slow reader]\n");
    StreamLine::output(StreamKind::Stderr, note.as_bytes(), encoding)
}

/// A JSON batch upload, its content charged to the transfer budget as the
/// body arrives (refused with 503 past it, before the server holds it),
/// then exactly its decoded content until the files are written.
async fn upload(
    State(state): State<Shared>,
    Path(thread_id): Path<String>,
    request: Request,
) -> ApiResult<Json<Uploaded>> {
    observed(&state, "upload", async {
        let (parts, body) = request.into_parts();
        let (body, charge) = state.budget.charge_body(body);
        let request = Request::from_parts(parts, body);
        let Json(body) = Json::<UploadBody>::from_request(request, &state).await?;
        let uploads = body.into_uploads()?;
        let decoded = uploads.iter().map(|u| u.content.len() as u64).sum();
        charge.lock().unwrap().shrink_to(decoded);
        let backend = state.sandbox.get_thread_backend(&thread_id).await?;
        let results = backend.upload_files(uploads).await?;
        drop(charge);
        Ok(Json(Uploaded { results }))
    })
    .await
}

/// The thread's backend when its container runs now, for a GET or HEAD,
/// which creates nothing: no workspace, no container, and no re-created
/// one for a stopped container (the policy would re-create it). None
/// otherwise: there is then no file to read.
async fn running_backend(state: &AppState, thread_id: &str) -> ApiResult<Option<Backend>> {
    let described = state.sandbox.describe_thread(thread_id).await?;
    match described.container {
        Some(container) if container.status == Status::Running => {
            Ok(Some(state.sandbox.get_thread_backend(thread_id).await?))
        }
        _ => Ok(None),
    }
}

/// A JSON batch download: without a running container every path is
/// `file_not_found` (a GET creates nothing); with one, the batch's cap is
/// charged to the transfer budget before it starts (503 past it), then
/// exactly its content until the answer has been sent.
async fn download(
    State(state): State<Shared>,
    Path(thread_id): Path<String>,
    // `?path=a&path=b`: a repeated key, so pairs rather than a struct.
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> ApiResult<Response> {
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
        let Some(backend) = running_backend(&state, &thread_id).await? else {
            let results = paths.into_iter().map(DownloadedFile::not_found).collect();
            return Ok(Json(Downloaded { results }).into_response());
        };
        // The JSON copies of a batch cost ~3x its content: capped, so one
        // request stays within the server's memory budget. Larger files:
        // GET /files/raw.
        let mut limits = backend.file_limits();
        limits.max_batch_bytes = limits.max_batch_bytes.min(super::JSON_BATCH_BYTES);
        let mut reservation = state.budget.reserve(limits.max_batch_bytes)?;
        let results = backend.download_files_with(&paths, &limits).await?;
        let content = results
            .iter()
            .map(|r| r.content.as_ref().map_or(0, |c| c.len() as u64))
            .sum();
        reservation.shrink_to(content);
        let results = results.into_iter().map(DownloadedFile::from).collect();
        let response = Json(Downloaded { results }).into_response();
        Ok(response.map(|body| Holding::body(body, reservation)))
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
        // A GET creates nothing: without a running container, no file.
        match running_backend(&state, &thread_id).await? {
            Some(backend) => Ok((path, backend)),
            None => Err(FileError::FileNotFound.into()),
        }
    })
    .await?;
    let (pipe, transfer) = spawn_download(backend, path);
    let body = stream::first_chunk_decides(pipe, transfer).await?;
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], body).into_response())
}

/// Starts copying the file into a pipe of [`stream::PIPE_BYTES`]: its
/// reading end, and the transfer's task (its verdict).
fn spawn_download(backend: Backend, path: String) -> (DuplexStream, JoinHandle<ApiResult<()>>) {
    let limits = backend.file_limits();
    let (mut writer, reader) = tokio::io::duplex(stream::PIPE_BYTES);
    let transfer = tokio::spawn(async move {
        let delivered = backend.download_to(&path, &mut writer, &limits).await;
        // The reader's EOF.
        drop(writer);
        delivered??;
        Ok::<_, ApiError>(())
    });
    (reader, transfer)
}

/// One file's bytes from the request body, streamed into the container:
/// needs Content-Length, bounded by the file cap, not by the JSON body limit.
async fn upload_raw(
    State(state): State<Shared>,
    Path(thread_id): Path<String>,
    query: Result<Query<OneFile>, QueryRejection>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Json<Written>> {
    observed(&state, "upload-raw", async {
        let (path, mode) = OneFile::parse(query)?;
        let len: u64 = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::LENGTH_REQUIRED,
                    ErrorKind::BadRequest,
                    "Content-Length is required",
                )
            })?;
        let backend = state.sandbox.get_thread_backend(&thread_id).await?;
        let limits = backend.file_limits();
        if len > limits.max_file_bytes {
            return Err(FileError::FileTooLarge.into());
        }
        use futures_util::TryStreamExt;
        // A body that fails on the server's own terms (too slow) is
        // answered as such, whatever the transfer made of the broken read.
        let body_failed = Arc::new(Mutex::new(None::<ApiError>));
        let stream = body.into_data_stream().map_err({
            let body_failed = body_failed.clone();
            move |e| {
                if let Some(why) = ApiError::from_body_error(&e) {
                    *body_failed.lock().unwrap() = Some(why);
                }
                std::io::Error::other(e)
            }
        });
        let mut reader = tokio_util::io::StreamReader::new(stream);
        let result = backend
            .upload_from(&path, &mut reader, len, mode, &limits)
            .await;
        if let Some(why) = body_failed.lock().unwrap().take() {
            return Err(why);
        }
        let result = result?;
        match result.error {
            Some(e) => Err(e.into()),
            None => Ok(Json(Written {
                path: result.path,
                size: len,
            })),
        }
    })
    .await
}

async fn thread_backend(
    State(state): State<Shared>,
    Path(thread_id): Path<String>,
) -> ApiResult<Json<ThreadInfo>> {
    observed(&state, "thread-backend", async {
        // A GET has no side effects: no workspace, no container.
        Ok(Json(state.sandbox.describe_thread(&thread_id).await?))
    })
    .await
}

/// `dry_run` and `max_age_secs` come from the query or from an optional
/// JSON body (`GcRequest`): a body that is not exactly that is refused
/// (400, 415 without a JSON content type), so a gc never runs on a body it
/// did not read. Any `dry_run` that is `true`, in either, makes the run dry.
async fn gc(
    State(state): State<Shared>,
    // Pairs, not a struct: a repeated key is not an error here, and any
    // `dry_run=true` among them makes the run dry (the safe reading for a
    // route that removes containers). Only the exact text `true` counts.
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> ApiResult<Json<Collected>> {
    observed(&state, "gc", async {
        let Query(pairs) = query?;
        let body = gc_body(&headers, &body?)?;
        let dry_run =
            pairs.iter().any(|(k, v)| k == "dry_run" && v == "true") || body.dry_run == Some(true);
        let mut ages = pairs.iter().filter(|(k, _)| k == "max_age_secs");
        let queried =
            match (ages.next(), ages.next()) {
                (None, _) => None,
                (Some((_, v)), None) => Some(v.parse::<u64>().map_err(|_| {
                    ApiError::bad_request("max_age_secs: a whole number of seconds")
                })?),
                (Some(_), Some(_)) => return Err(ApiError::bad_request("give max_age_secs once")),
            };
        let max_age = match (queried, body.max_age_secs) {
            (Some(_), Some(_)) => {
                return Err(ApiError::bad_request(
                    "give max_age_secs in the query or in the body, not both",
                ))
            }
            (age, None) | (None, age) => age,
        };
        if max_age.is_some_and(|age| age > MAX_GC_AGE_SECS) {
            return Err(ApiError::bad_request(format!(
                "max_age_secs: at most {MAX_GC_AGE_SECS} (ten years)"
            )));
        }
        let max_age = max_age.map(std::time::Duration::from_secs);
        let containers = state.sandbox.gc(max_age, dry_run).await?;
        Ok(Json(Collected {
            dry_run,
            containers,
        }))
    })
    .await
}

/// The body of `POST /v1/gc`: empty (nothing but whitespace), or a JSON
/// `GcRequest` with a JSON content type.
fn gc_body(headers: &HeaderMap, body: &[u8]) -> ApiResult<GcBody> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(GcBody::default());
    }
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|mime| {
            let mime = mime.trim().to_ascii_lowercase();
            mime == "application/json"
                || (mime.starts_with("application/") && mime.ends_with("+json"))
        })
        .unwrap_or(false);
    if !json {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ErrorKind::BadRequest,
            "a body of POST /v1/gc must be JSON (Content-Type: application/json)",
        ));
    }
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("POST /v1/gc body: {e}")))
}

async fn destroy_thread(
    State(state): State<Shared>,
    Path(thread_id): Path<String>,
) -> ApiResult<Json<Destroyed>> {
    observed(&state, "destroy-thread", async {
        let destroyed = state.sandbox.destroy_thread_backend(&thread_id).await?;
        Ok(Json(Destroyed { destroyed }))
    })
    .await
}

async fn destroy_user(
    State(state): State<Shared>,
    Path(user_id): Path<String>,
) -> ApiResult<Json<Destroyed>> {
    observed(&state, "destroy-user", async {
        let destroyed = state.sandbox.destroy_user_backend(&user_id).await?;
        Ok(Json(Destroyed { destroyed }))
    })
    .await
}

/// Kills a running execution's process tree; it then answers (or its
/// stream ends) with exit 130 and reason `cancelled`. Execution ids are
/// scoped per user: any thread of the execution's user names it, and
/// another user's execution of the same id is neither cancelled nor told.
async fn cancel_execution(
    State(state): State<Shared>,
    Path((thread_id, execution_id)): Path<(String, String)>,
) -> ApiResult<Json<Cancelled>> {
    observed(&state, "cancel", async {
        crate::exec::check_execution_id(&execution_id)?;
        if state.sandbox.cancel(&thread_id, &execution_id)? {
            Ok(Json(Cancelled { cancelled: true }))
        } else {
            Err(ApiError::from(SandboxError::NotFound(format!(
                "no running execution {execution_id} of this thread's user on this server"
            ))))
        }
    })
    .await
}

/// The cancel route of before execution ids were scoped per user: 410,
/// naming the route that replaced it.
async fn cancel_unscoped(State(state): State<Shared>) -> ApiResult<Json<Cancelled>> {
    observed(&state, "cancel", async {
        Err(ApiError::new(
            StatusCode::GONE,
            ErrorKind::NotFound,
            "execution ids are scoped per user: cancel with \
             DELETE /v1/threads/{thread_id}/executions/{execution_id}",
        ))
    })
    .await
}

async fn backends(State(state): State<Shared>) -> ApiResult<Json<Backends>> {
    observed(&state, "backends", async {
        let now = crate::now_ms();
        let backends = state
            .sandbox
            .list()
            .await?
            .into_iter()
            .map(|c| BackendView::new(c, now))
            .collect();
        Ok(Json(Backends {
            policy: state.sandbox.policy_name(),
            backends,
        }))
    })
    .await
}

async fn policy(State(state): State<Shared>) -> Json<PolicyName> {
    Json(PolicyName {
        policy: state.sandbox.policy_name(),
    })
}

/// Live swap: the body is a component (`application/wasm`). Compiled and
/// self-checked off the hot path; on any error the running policy stays.
async fn swap_policy(
    State(state): State<Shared>,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> ApiResult<Json<PolicyName>> {
    observed(&state, "swap-policy", async {
        // An oversized component is a JSON error like every other one.
        let body = body?;
        if state.token.is_none() {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                ErrorKind::Refused,
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
        Ok(Json(PolicyName {
            policy: state.sandbox.policy_name(),
        }))
    })
    .await
}

async fn healthz(State(state): State<Shared>) -> Response {
    let engine = state.sandbox.ping().await;
    let (status, health, engine) = match engine {
        Ok(()) => (StatusCode::OK, HealthStatus::Ok, "ok".to_owned()),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            HealthStatus::Degraded,
            e.to_string(),
        ),
    };
    let body = Health {
        status: health,
        engine,
        policy: state.sandbox.policy_name(),
    };
    (status, Json(body)).into_response()
}

async fn metrics(State(state): State<Shared>) -> Response {
    state
        .metrics
        .transfer_bytes
        .set(state.budget.in_use() as i64);
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
        Err(e) => ApiError::internal(e.to_string()).into_response(),
    }
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        ErrorKind::MethodNotAllowed,
        "this route does not take that method (see /openapi.json)",
    )
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, ErrorKind::NotFound, "no such route")
}

//! Routes and handlers of `sandbox serve`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, Path, RawQuery, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::AppState;
use crate::exec::{ExecOptions, ExecResponse, StreamKind};
use crate::files::Upload;
use crate::{PolicySource, SandboxError};

type Shared = Arc<AppState>;

/// The OpenAPI document, checked into the repository.
pub const OPENAPI: &str = include_str!("../../openapi.json");

/// The API router (exposed for in-process tests).
pub fn router(state: Shared, body_limit: usize) -> Router {
    Router::new()
        .route("/v1/threads/{thread_id}/exec", post(exec))
        .route("/v1/threads/{thread_id}/exec/stream", post(exec_stream))
        .route("/v1/threads/{thread_id}/files", get(download).put(upload))
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
        .with_state(state)
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
        return next.run(request).await;
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
        Ok(Json(backend.execute_with(&body.command, options).await?))
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
    tokio::spawn(async move {
        let mut dropped = 0usize;
        let live = tx.clone();
        let result = backend
            .execute_streaming(&body.command, options, |stream, bytes| {
                let l = StreamLine::Output {
                    stream,
                    data: String::from_utf8_lossy(bytes).into_owned(),
                };
                if live.try_send(line(&l)).is_err() {
                    dropped += bytes.len();
                }
            })
            .await;
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
                kind: e.kind(),
                message: e.to_string(),
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
        let results: Vec<serde_json::Value> = backend
            .download_files(&paths)
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

async fn thread_backend(
    State(state): State<Shared>,
    Path(thread_id): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    observed(&state, "thread-backend", async {
        let b = state.sandbox.get_thread_backend(&thread_id).await?;
        Ok(Json(
            json!({ "id": b.id(), "user_id": b.user_id(), "workspace": b.workspace() }),
        ))
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
        let now = crate::capabilities::now_ms();
        let list: Vec<serde_json::Value> = state
            .sandbox
            .list()
            .await?
            .into_iter()
            .map(|c| {
                let idle = now.saturating_sub(c.last_used_ms) / 1000;
                let mut v = serde_json::to_value(c).unwrap_or_default();
                v["idle_secs"] = idle.into();
                v
            })
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
        Ok(text) => ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response(),
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

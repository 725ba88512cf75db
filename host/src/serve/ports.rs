//! `ANY /v1/threads/{thread_id}/ports/{port}/{path}`: a server the workload
//! runs in its sandbox (a dev server), previewed through `sandbox serve`.
//! Each request goes over one connection made inside the sandbox by the
//! sandbox user ([`Backend::connect_port`]), so the sandbox's network stays
//! `none`; the API's token is never passed on.
//!
//! A previewed page must not script the API that serves it (same origin):
//! every proxied answer carries `Content-Security-Policy: sandbox ...`,
//! which gives the page an opaque origin, and the API refuses requests
//! whose `Origin` is `null` on every route but this one
//! ([`refuse_opaque_origins`]).

use std::collections::HashMap;

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderValue, StatusCode, Uri};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hyper_util::rt::TokioIo;

use super::error::{ApiError, ApiResult, ErrorKind};
use super::Shared;
use crate::SandboxError;

/// The policy every proxied answer carries: scripts and forms run, in an
/// opaque origin (no cookie, storage or same-origin request of the API's).
pub const PREVIEW_CSP: &str = "sandbox allow-scripts allow-forms allow-popups";

/// How long a sandbox's server has to start its answer.
const ANSWER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);
/// An upgraded connection (a WebSocket) that moves nothing for this long
/// is closed.
const TUNNEL_IDLE: std::time::Duration = std::time::Duration::from_secs(600);
/// Answer headers of a sandbox's server that would act on the API's whole
/// origin: dropped.
const ORIGIN_WIDE_HEADERS: &[&str] = &[
    "set-cookie",
    "set-cookie2",
    "clear-site-data",
    "strict-transport-security",
    "alt-svc",
    "public-key-pins",
    "origin-agent-cluster",
    "service-worker-allowed",
];

/// Copies both ways until both sides end, or nothing moved for `idle`.
async fn join_until_idle<A, B>(a: A, b: B, idle: std::time::Duration)
where
    A: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    B: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut a_read, mut a_write) = tokio::io::split(a);
    let (mut b_read, mut b_write) = tokio::io::split(b);
    let (mut from_a, mut from_b) = (vec![0u8; 16 * 1024], vec![0u8; 16 * 1024]);
    let (mut a_open, mut b_open) = (true, true);
    while a_open || b_open {
        tokio::select! {
            r = a_read.read(&mut from_a), if a_open => match r {
                Ok(n) if n > 0 => {
                    if b_write.write_all(&from_a[..n]).await.is_err() {
                        return;
                    }
                }
                _ => {
                    a_open = false;
                    let _ = b_write.shutdown().await;
                }
            },
            r = b_read.read(&mut from_b), if b_open => match r {
                Ok(n) if n > 0 => {
                    if a_write.write_all(&from_b[..n]).await.is_err() {
                        return;
                    }
                }
                _ => {
                    b_open = false;
                    let _ = a_write.shutdown().await;
                }
            },
            () = tokio::time::sleep(idle) => return,
        }
    }
}

/// The path prefix of the preview route, for the origin guard.
const PORTS_SEGMENT: &str = "/ports/";

/// `/v1/threads/{thread_id}/ports/{port}` with or without a path.
pub(super) async fn preview(
    State(state): State<Shared>,
    Path(params): Path<HashMap<String, String>>,
    request: Request,
) -> ApiResult<Response> {
    let port: u16 = params
        .get("port")
        .and_then(|p| p.parse().ok())
        .filter(|p| *p > 0)
        .ok_or_else(bad_port)?;
    let thread_id = params.get("thread_id").cloned().unwrap_or_default();
    let path = raw_rest(request.uri().path(), "/ports/");
    proxy(&state, &thread_id, port, &path, request).await
}

/// `/v1/previews/{link}` with or without a path: what the link grants,
/// without the API's token (see `links.rs`).
pub(super) async fn preview_link(
    State(state): State<Shared>,
    Path(params): Path<HashMap<String, String>>,
    request: Request,
) -> ApiResult<Response> {
    let now = crate::now_ms() / 1000;
    let grant = params
        .get("link")
        .and_then(|link| state.links.verify(link, now))
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::FORBIDDEN,
                ErrorKind::Refused,
                "this preview link is invalid or has expired: ask POST /v1/previews for a new one",
            )
        })?;
    let path = raw_rest(request.uri().path(), "/v1/previews/");
    proxy(&state, &grant.thread_id, grant.port, &path, request).await
}

/// `POST /v1/previews`: a link to one thread's port that a browser can
/// open without the API's token, for `ttl_secs` (default an hour, at most
/// a day).
pub(super) async fn create_link(
    State(state): State<Shared>,
    body: Result<axum::Json<LinkBody>, axum::extract::rejection::JsonRejection>,
) -> ApiResult<axum::Json<LinkReply>> {
    let axum::Json(body) = body?;
    if body.port == 0 {
        return Err(bad_port());
    }
    // The thread must be a valid one of a user the policy maps.
    state.sandbox.backend_id(&body.thread_id).await?;
    let ttl = body.ttl_secs.unwrap_or(super::links::DEFAULT_LINK_SECS);
    if ttl == 0 || ttl > super::links::MAX_LINK_SECS {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            ErrorKind::BadRequest,
            format!("ttl_secs must be 1..={}", super::links::MAX_LINK_SECS),
        ));
    }
    let expires_at = crate::now_ms() / 1000 + ttl;
    let link = state.links.sign(&super::links::Grant {
        thread_id: body.thread_id,
        port: body.port,
        expires_at,
    });
    Ok(axum::Json(LinkReply {
        url: format!("/v1/previews/{link}/"),
        expires_at,
    }))
}

/// The body of `POST /v1/previews`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct LinkBody {
    thread_id: String,
    port: u16,
    ttl_secs: Option<u64>,
}

/// The answer of `POST /v1/previews`.
#[derive(serde::Serialize)]
pub(super) struct LinkReply {
    /// The path to open (on this server), ending in `/`.
    url: String,
    /// Unix seconds.
    expires_at: u64,
}

fn bad_port() -> ApiError {
    ApiError::new(
        StatusCode::BAD_REQUEST,
        ErrorKind::BadRequest,
        "the port must be 1..=65535",
    )
}

/// The path after `marker` and the segment that follows it (the port, or
/// the link), as the client sent it: not percent-decoded, so `%2F` and
/// `%3F` reach the server as they were written.
fn raw_rest(path: &str, marker: &str) -> String {
    let after = path.split_once(marker).map_or("", |(_, rest)| rest);
    let rest = after.split_once('/').map_or("", |(_, rest)| rest);
    rest.to_owned()
}

/// One request to `port` in `thread_id`'s sandbox, and its answer.
async fn proxy(
    state: &super::AppState,
    thread_id: &str,
    port: u16,
    path: &str,
    mut request: Request,
) -> ApiResult<Response> {
    // A WebSocket (any `Upgrade`): the two upgraded connections are joined
    // once the server answers 101.
    let upgrade = request.headers().get(header::UPGRADE).cloned();
    let client_upgrade = upgrade.is_some().then(|| hyper::upgrade::on(&mut request));
    // A preview creates nothing (a GET, from any page): the server runs in
    // a sandbox that is running already.
    let running = state
        .sandbox
        .describe_thread(thread_id)
        .await?
        .container
        .is_some_and(|c| c.status == crate::Status::Running);
    if !running {
        return Err(ApiError::new(
            StatusCode::BAD_GATEWAY,
            ErrorKind::NotFound,
            format!(
                "thread {thread_id} has no running sandbox: start its server with an execute first"
            ),
        ));
    }
    let backend = state.sandbox.get_thread_backend(thread_id).await?;
    let connection = backend.connect_port(port).await.map_err(|e| match e {
        SandboxError::NotFound(why) => {
            ApiError::new(StatusCode::BAD_GATEWAY, ErrorKind::NotFound, why)
        }
        other => other.into(),
    })?;
    let (mut parts, body) = request.into_parts();
    for_the_server(&mut parts, path, port)?;
    if let Some(upgrade) = upgrade {
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        parts.headers.insert(header::UPGRADE, upgrade);
    }
    let (mut sender, link) = hyper::client::conn::http1::handshake(TokioIo::new(connection))
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::BAD_GATEWAY,
                ErrorKind::Other,
                format!("port {port}: {e}"),
            )
        })?;
    tokio::spawn(async move {
        let _ = link.with_upgrades().await;
    });
    let answer = tokio::time::timeout(
        ANSWER_TIMEOUT,
        sender.send_request(axum::http::Request::from_parts(parts, body)),
    )
    .await
    .map_err(|_| {
        ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            ErrorKind::Other,
            format!(
                "port {port} did not answer within {} s",
                ANSWER_TIMEOUT.as_secs()
            ),
        )
    })?
    .map_err(|e| {
        ApiError::new(
            StatusCode::BAD_GATEWAY,
            ErrorKind::Other,
            format!("port {port} did not answer over HTTP: {e}"),
        )
    })?;
    let mut answer = answer;
    let switched = answer.status() == StatusCode::SWITCHING_PROTOCOLS;
    if let (true, Some(client_upgrade)) = (switched, client_upgrade) {
        let server_upgrade = hyper::upgrade::on(&mut answer);
        tokio::spawn(async move {
            if let (Ok(client), Ok(server)) = tokio::join!(client_upgrade, server_upgrade) {
                join_until_idle(TokioIo::new(client), TokioIo::new(server), TUNNEL_IDLE).await;
            }
        });
    }
    let (mut parts, body) = answer.into_parts();
    if !switched {
        hop_by_hop_removed(&mut parts.headers);
    }
    // What a sandbox's server may not set for the API's origin (and, for
    // cookies, every port of its host).
    for name in ORIGIN_WIDE_HEADERS {
        parts.headers.remove(*name);
    }
    let cors: Vec<_> = parts
        .headers
        .keys()
        .filter(|k| k.as_str().starts_with("access-control-"))
        .cloned()
        .collect();
    for name in cors {
        parts.headers.remove(name);
    }
    parts.headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(PREVIEW_CSP),
    );
    Ok(Response::from_parts(parts, Body::new(body)))
}

/// Turns the API's request into the server's: the path on the server (the
/// query kept), HTTP/1.1, no hop-by-hop headers, no `Authorization` (the
/// API's credentials stay here), and `Host: localhost:PORT` (dev servers
/// check it).
fn for_the_server(parts: &mut axum::http::request::Parts, path: &str, port: u16) -> ApiResult<()> {
    let target = match parts.uri.query() {
        Some(query) => format!("/{path}?{query}"),
        None => format!("/{path}"),
    };
    parts.uri = target.parse::<Uri>().map_err(|_| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            ErrorKind::BadRequest,
            "the path is not a valid request target",
        )
    })?;
    parts.version = axum::http::Version::HTTP_11;
    hop_by_hop_removed(&mut parts.headers);
    // The API's credentials, and the browser's cookies of this host (of
    // every port: other local apps' too), stay here.
    parts.headers.remove(header::AUTHORIZATION);
    parts.headers.remove(header::PROXY_AUTHORIZATION);
    parts.headers.remove(header::COOKIE);
    if let Ok(host) = HeaderValue::from_str(&format!("localhost:{port}")) {
        parts.headers.insert(header::HOST, host);
    }
    Ok(())
}

/// Removes the headers that belong to one connection (those `Connection`
/// names, and the standard ones): each side of the preview has its own.
fn hop_by_hop_removed(headers: &mut axum::http::HeaderMap) {
    let named: Vec<axum::http::HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| name.trim().parse().ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        "connection",
        "proxy-connection",
        "keep-alive",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    ] {
        headers.remove(name);
    }
}

/// Whether `path` is one of the preview routes' (by thread and port, or by
/// link).
pub(super) fn is_preview(path: &str) -> bool {
    if is_link(path) {
        return true;
    }
    let Some(rest) = path.strip_prefix("/v1/threads/") else {
        return false;
    };
    rest.split_once('/')
        .is_some_and(|(_, after)| after.starts_with(&PORTS_SEGMENT[1..]))
}

/// Whether `path` is a preview link's (its link is its credential: no
/// bearer token).
pub(super) fn is_link(path: &str) -> bool {
    path.strip_prefix("/v1/previews/")
        .is_some_and(|rest| !rest.is_empty())
}

/// Refuses (403) a request whose `Origin` is `null` (a sandboxed page, a
/// previewed one included), on every route but the preview route itself:
/// a previewed page must not call the API, token or none.
pub(super) async fn refuse_opaque_origins(
    State(state): State<Shared>,
    request: Request,
    next: Next,
) -> Response {
    let opaque = request
        .headers()
        .get(header::ORIGIN)
        .is_some_and(|o| o.as_bytes().eq_ignore_ascii_case(b"null"));
    if opaque && !is_preview(request.uri().path()) {
        state
            .metrics
            .count_error(ErrorKind::ForbiddenOrigin.as_str());
        return ApiError::new(
            StatusCode::FORBIDDEN,
            ErrorKind::ForbiddenOrigin,
            "requests from an opaque origin (Origin: null: a sandboxed or previewed page) \
             may not call the API",
        )
        .into_response();
    }
    next.run(request).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_server_gets_its_path_and_query_as_localhost_without_the_apis_token() {
        let request = axum::http::Request::builder()
            .uri("/v1/threads/alice-1/ports/5173/src/main.ts?t=1&x=%20")
            .header(header::AUTHORIZATION, "Bearer t0ken")
            .header(header::HOST, "sandbox.example:8765")
            .header(header::CONNECTION, "keep-alive, x-hop")
            .header("x-hop", "1")
            .header(header::COOKIE, "app=1")
            .body(())
            .unwrap();
        let (mut parts, ()) = request.into_parts();
        assert!(for_the_server(&mut parts, "src/main.ts", 5173).is_ok());
        assert_eq!(parts.uri, "/src/main.ts?t=1&x=%20");
        assert_eq!(parts.headers[header::HOST], "localhost:5173");
        assert!(parts.headers.get(header::AUTHORIZATION).is_none());
        assert!(parts.headers.get("x-hop").is_none());
        assert!(parts.headers.get(header::CONNECTION).is_none());
        assert!(parts.headers.get(header::COOKIE).is_none());
    }

    #[test]
    fn the_path_is_passed_on_as_written() {
        let cases = [
            ("/v1/threads/alice-1/ports/8080", "/ports/", ""),
            ("/v1/threads/alice-1/ports/8080/", "/ports/", ""),
            (
                "/v1/threads/alice-1/ports/8080/a%3Fb/c%2Fd",
                "/ports/",
                "a%3Fb/c%2Fd",
            ),
            ("/v1/previews/LINK.TAG/x/%20y", "/v1/previews/", "x/%20y"),
            ("/v1/previews/LINK.TAG", "/v1/previews/", ""),
        ];
        for (path, marker, rest) in cases {
            assert_eq!(raw_rest(path, marker), rest, "{path}");
        }
    }

    #[test]
    fn only_the_preview_routes_are_previews() {
        for path in [
            "/v1/threads/alice-1/ports/8080",
            "/v1/threads/alice-1/ports/8080/x",
        ] {
            assert!(is_preview(path), "{path}");
        }
        for path in [
            "/v1/backends",
            "/v1/threads/alice-1/exec",
            "/v1/threads/alice-1/files/raw",
            "/v1/threads/alice-1/exec/ports/1",
            "/ports/1",
        ] {
            assert!(!is_preview(path), "{path}");
        }
    }
}

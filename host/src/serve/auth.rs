//! Who may call the API. With a token, every request but `/healthz` must
//! carry it as `Authorization: Bearer`. Without one, the server answers
//! only requests addressed to an allowed host name (loopback by default),
//! so a web page that rebinds its own DNS name to 127.0.0.1 cannot reach
//! exec or DELETE through the visitor's browser.

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::error::{ApiError, ErrorKind};
use super::Shared;

/// Always open: liveness probes carry no credentials.
const OPEN_PATH: &str = "/healthz";

/// The middleware: lets a request through or answers 401/403 itself.
pub(super) async fn authenticate(
    State(state): State<Shared>,
    request: Request,
    next: Next,
) -> Response {
    if request.uri().path() == OPEN_PATH {
        return next.run(request).await;
    }
    let refusal = match state.token.as_deref() {
        None if host_allowed(&request, &state.allowed_hosts) => None,
        None => Some(ApiError::new(
            StatusCode::FORBIDDEN,
            ErrorKind::ForbiddenHost,
            "this server has no token and answers only requests addressed to its allowed \
             host names (loopback by default; see --allowed-host)",
        )),
        Some(expected) => {
            let given = bearer(&request).unwrap_or("");
            if token_matches(given, expected) {
                None
            } else if given.is_empty() {
                Some(unauthorized("missing bearer token"))
            } else {
                Some(unauthorized("wrong bearer token"))
            }
        }
    };
    match refusal {
        None => next.run(request).await,
        Some(error) => {
            state.metrics.count_error(error.kind());
            error.into_response()
        }
    }
}

fn unauthorized(message: &str) -> ApiError {
    ApiError::new(StatusCode::UNAUTHORIZED, ErrorKind::Unauthorized, message)
}

/// The credentials of `Authorization: Bearer <token>`, if the header has
/// that form. The scheme name is case-insensitive (RFC 9110 11.1): clients
/// that send `bearer` are not refused.
fn bearer(request: &Request) -> Option<&str> {
    let value = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then_some(token)
}

/// Compares digests in constant time, so neither the token's content nor
/// its length leaks through the response time.
fn token_matches(given: &str, expected: &str) -> bool {
    Sha256::digest(given.as_bytes())
        .ct_eq(&Sha256::digest(expected.as_bytes()))
        .into()
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

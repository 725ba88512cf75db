//! Who may call the API. With a token, every request but `/healthz` must
//! carry it as `Authorization: Bearer`. Without one, the server answers
//! only requests addressed to an allowed host name (loopback by default),
//! so a web page that rebinds its own DNS name to 127.0.0.1 cannot reach
//! exec or DELETE through the visitor's browser; and only requests whose
//! `Origin`, when a browser sent one, names an allowed host too, so a page
//! of another site cannot make the visitor's browser call it either (a
//! browser sends `Origin` on every cross-site POST, PUT and DELETE, on
//! `fetch` and on WebSocket upgrades).
//!
//! [`guard_tokenless`] runs before routing, so no route escapes it, present
//! or future, an upgrade or an unknown path; [`authenticate`] runs after
//! routing, so its refusals are logged with the route they were aimed at.
//! With a token, `Origin` is not checked: a page of another site cannot
//! make a browser send the `Authorization` header without a CORS preflight,
//! which this server never grants.

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::error::{ApiError, ErrorKind};
use super::Shared;

/// Always open: liveness probes carry no credentials, and address the
/// server by whatever name the orchestrator uses.
const OPEN_PATH: &str = "/healthz";

/// The pre-routing middleware of a server without a token: refuses (403)
/// a request whose `Host` is not an allowed name (`/healthz` excepted), or
/// that carries an `Origin` whose host is not one. With a token it lets
/// everything through to [`authenticate`].
pub(super) async fn guard_tokenless(
    State(state): State<Shared>,
    request: Request,
    next: Next,
) -> Response {
    if state.token.is_some() {
        return next.run(request).await;
    }
    let Some(refusal) = tokenless_refusal(&request, &state.allowed_hosts, state.listen_port) else {
        return next.run(request).await;
    };
    state.metrics.count_error(refusal.kind());
    refusal.into_response()
}

/// Why a server without a token refuses `request`, if it does.
fn tokenless_refusal(request: &Request, allowed: &[String], port: Option<u16>) -> Option<ApiError> {
    if request.uri().path() != OPEN_PATH && !host_allowed(request, allowed) {
        return Some(ApiError::new(
            StatusCode::FORBIDDEN,
            ErrorKind::ForbiddenHost,
            "this server has no token and answers only requests addressed to its allowed \
             host names (loopback by default; see --allowed-host)",
        ));
    }
    // A page opened through a preview link (`Origin: null`, see
    // `ports.rs`) may load its own module scripts and call its own server
    // through the link (its credential); nothing else.
    let through_link = request
        .headers()
        .get(header::ORIGIN)
        .is_some_and(|o| o.as_bytes().eq_ignore_ascii_case(b"null"))
        && super::ports::is_link(request.uri().path());
    if !through_link && !origin_allowed(request.headers().get(header::ORIGIN), allowed, port) {
        return Some(ApiError::new(
            StatusCode::FORBIDDEN,
            ErrorKind::ForbiddenOrigin,
            "this server has no token and refuses requests a web page of another site sent \
             (their Origin is not one of its allowed host names)",
        ));
    }
    None
}

/// The token check, after routing: lets a request through or answers 401
/// itself. Without a token, [`guard_tokenless`] has already decided.
pub(super) async fn authenticate(
    State(state): State<Shared>,
    request: Request,
    next: Next,
) -> Response {
    let Some(expected) = state.token.as_deref() else {
        return next.run(request).await;
    };
    // Liveness, and preview links (each is its own credential).
    if request.uri().path() == OPEN_PATH || super::ports::is_link(request.uri().path()) {
        return next.run(request).await;
    }
    let given = bearer(&request).unwrap_or("");
    if token_matches(given, expected) {
        return next.run(request).await;
    }
    let refusal = if given.is_empty() {
        unauthorized("missing bearer token")
    } else {
        unauthorized("wrong bearer token")
    };
    state.metrics.count_error(refusal.kind());
    refusal.into_response()
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
    name_allowed(host, allowed)
}

/// Whether an `Origin` (when there is one) names an allowed host:
/// `scheme://host[:port]`, nothing else. `null` (a sandboxed frame, a
/// `file:` page, a redirect across sites) and anything malformed are
/// refused. With `port` (the server's own, known when it listens), the
/// origin's port must be it: a page on another port of this machine may
/// be a sandbox's own (`sandbox port-forward`), not this server's.
fn origin_allowed(origin: Option<&HeaderValue>, allowed: &[String], port: Option<u16>) -> bool {
    let Some(origin) = origin else {
        return true;
    };
    let Some((scheme, authority)) = origin.to_str().ok().and_then(|o| o.split_once("://")) else {
        return false;
    };
    if authority.is_empty()
        || authority.contains(['/', '@', '?', '#'])
        || !name_allowed(authority, allowed)
    {
        return false;
    }
    let Some(port) = port else {
        return true;
    };
    let given = match authority.rsplit_once(':') {
        Some((name, p)) if !name.ends_with(':') && p.chars().all(|c| c.is_ascii_digit()) => {
            p.parse::<u16>().ok()
        }
        _ => match scheme {
            "http" => Some(80),
            "https" => Some(443),
            _ => None,
        },
    };
    given == Some(port)
}

/// Whether `host[:port]` names an allowed host.
fn name_allowed(authority: &str, allowed: &[String]) -> bool {
    let name = match authority.rsplit_once(':') {
        // `[::1]:8765`, `127.0.0.1:8765`, `localhost:8765`; a bare `::1` has
        // colons but no port.
        Some((name, port)) if port.chars().all(|c| c.is_ascii_digit()) && !name.ends_with(':') => {
            name
        }
        _ => authority,
    };
    allowed.iter().any(|a| a.eq_ignore_ascii_case(name))
}

#[cfg(test)]
mod origin_tests {
    use super::*;

    #[test]
    fn with_its_port_known_a_tokenless_server_takes_only_its_own_origin() {
        let allowed: Vec<String> = super::super::LOOPBACK_HOSTS
            .iter()
            .map(|h| h.to_string())
            .collect();
        let origin = |o: &str| HeaderValue::from_str(o).unwrap();
        for ok in [
            "http://localhost:8765",
            "http://127.0.0.1:8765",
            "http://[::1]:8765",
        ] {
            assert!(
                origin_allowed(Some(&origin(ok)), &allowed, Some(8765)),
                "{ok}"
            );
        }
        // A page `sandbox port-forward` serves on another local port is a
        // sandbox's, not this server's.
        for refused in [
            "http://localhost:9000",
            "http://127.0.0.1",
            "https://localhost",
            "http://localhost:87650",
            "null",
        ] {
            assert!(
                !origin_allowed(Some(&origin(refused)), &allowed, Some(8765)),
                "{refused}"
            );
        }
        assert!(origin_allowed(
            Some(&origin("http://localhost")),
            &allowed,
            Some(80)
        ));
        assert!(
            origin_allowed(None, &allowed, Some(8765)),
            "no Origin: not a page"
        );
    }
}

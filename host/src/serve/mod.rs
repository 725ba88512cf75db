//! `sandbox serve`: the library behind a JSON HTTP API for agent platforms
//! written in other languages, with live policy swap.
//!
//! Routes (see `host/openapi.json`): exec (plain and NDJSON streaming),
//! batch file upload/download, destroy per user and per thread, backends,
//! health, Prometheus metrics, policy swap. Errors are JSON
//! `{"error": {"kind", "message"}}` with a status that matches the kind.
//! Every request gets one access-log line ([`ACCESS_LOG_TARGET`]).
//!
//! Layout: `api` (routes, handlers, access log), `auth` (bearer token,
//! Host and Origin allow-lists), `conn` (the accept loop and the
//! connections' limits), `budget` (the memory budget of JSON transfers),
//! `error` (the JSON error shape), `requests` and `replies` (the JSON
//! bodies, one type per shape, whose JSON Schemas are `openapi.json`'s
//! components), `stream` (NDJSON and streamed transfer bodies), `metrics`;
//! `tests` drives the router in process, over the in-memory provider and,
//! for what only a container can show, the real Docker engine, serves it on
//! loopback for what only connections show, and checks `openapi.json`
//! against the types.

mod api;
mod auth;
mod budget;
mod conn;
mod error;
mod links;
mod metrics;
mod ports;
mod processes;
mod replies;
mod requests;
mod stream;
#[cfg(test)]
mod tests;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub use api::{router, ACCESS_LOG_TARGET};
pub use budget::{TransferBudget, DEFAULT_TRANSFER_BUDGET};
pub use conn::{
    ConnectionLimits, BODY_GRACE, BODY_MIN_RATE, CLOSING_LINGER, HEADER_READ_TIMEOUT,
    MAX_CONNECTIONS,
};
pub use metrics::{Metrics, CONTENT_TYPE as METRICS_CONTENT_TYPE};

use crate::{PolicySource, Sandbox};

/// Why `sandbox serve` could not start, or stopped serving.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A non-loopback address without a bearer token.
    #[error(
        "refusing to listen on {listen} without a bearer token: set --token or SANDBOX_TOKEN \
         (only loopback addresses may run without one)"
    )]
    TokenRequired {
        /// The address asked for.
        listen: SocketAddr,
    },
    /// The listening socket could not be bound.
    #[error("binding {listen}")]
    Bind {
        /// The address asked for.
        listen: SocketAddr,
        /// Why binding failed (in use, not permitted...).
        #[source]
        source: std::io::Error,
    },
    /// The SIGHUP handler (policy reload) could not be installed.
    #[error("installing the SIGHUP handler (policy reload)")]
    Signal(#[source] std::io::Error),
    /// The listening socket failed.
    #[error("serving")]
    Serve(#[source] std::io::Error),
    /// No key for the preview links (`/dev/urandom` unreadable).
    #[error("drawing the preview links' key from /dev/urandom")]
    LinkKey(#[source] std::io::Error),
}

/// How `sandbox serve` runs.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Address and port to listen on; anything but loopback needs a token.
    pub listen: SocketAddr,
    /// Required on every request when set; mandatory off loopback.
    pub token: Option<String>,
    /// Largest request body accepted (uploads included).
    pub body_limit_bytes: usize,
    /// Reloaded on SIGHUP; without it, SIGHUP reloads the configured
    /// policy (the embedded one by default).
    pub policy_path: Option<PathBuf>,
    /// Host header values (names, without port) accepted when no token is
    /// set: a browser page on another site that resolves its own name to
    /// 127.0.0.1 (DNS rebinding) sends its own name and is refused.
    pub allowed_hosts: Vec<String>,
    /// After SIGTERM, how long running commands get to finish before they
    /// are ended with the reason `shutdown`.
    pub grace: std::time::Duration,
}

/// The Host names accepted without a token by default: loopback only.
pub const LOOPBACK_HOSTS: [&str; 4] = ["localhost", "127.0.0.1", "::1", "[::1]"];

/// What the router's handlers and middleware hold.
type Shared = Arc<AppState>;

/// Shared by every handler.
pub struct AppState {
    /// The library every route calls into.
    pub sandbox: Sandbox,
    /// What `GET /metrics` reports; the handlers count into it.
    pub metrics: Metrics,
    /// Bearer token every request must carry, when set.
    pub token: Option<String>,
    /// Host header names accepted when no token is set
    /// ([`ServeOptions::allowed_hosts`]).
    pub allowed_hosts: Vec<String>,
    /// Turns true when the grace period after SIGTERM is over: running
    /// commands then end with the reason `shutdown`.
    pub shutdown: tokio::sync::watch::Receiver<bool>,
    /// The memory budget of the JSON file transfers in flight.
    pub budget: Arc<TransferBudget>,
    /// The key preview links are signed with (drawn at start).
    links: links::LinkKey,
    /// The port this server listens on, when it does (not embedded): the
    /// only port a tokenless server's browser `Origin` may name.
    pub listen_port: Option<u16>,
}

impl AppState {
    /// State for an embedded router (tests, the bench): loopback host
    /// names, and no shutdown sequence.
    pub fn new(sandbox: Sandbox, token: Option<String>) -> Self {
        AppState {
            sandbox,
            metrics: Metrics::new(),
            token,
            allowed_hosts: LOOPBACK_HOSTS.iter().map(|h| h.to_string()).collect(),
            shutdown: tokio::sync::watch::channel(false).1,
            budget: Arc::new(TransferBudget::new(DEFAULT_TRANSFER_BUDGET)),
            links: links::LinkKey::new().expect("/dev/urandom for the preview links' key"),
            listen_port: None,
        }
    }
}

impl ServeOptions {
    /// Refuses to listen off loopback without a (non-empty) token
    /// ([`ServeError::TokenRequired`]).
    pub fn check(&self) -> Result<(), ServeError> {
        if !self.listen.ip().is_loopback() && self.token.as_deref().is_none_or(str::is_empty) {
            return Err(ServeError::TokenRequired {
                listen: self.listen,
            });
        }
        Ok(())
    }
}

/// Serves until SIGTERM / ctrl-c. Then it accepts no new connection, lets
/// running requests finish for the grace period, ends the rest with the
/// reason `shutdown` (their commands are killed), and exits at most 2 s later.
/// SIGHUP reloads the policy, and never stops the server.
pub async fn serve(sandbox: Sandbox, options: ServeOptions) -> Result<(), ServeError> {
    options.check()?;
    // First, so a reload request never meets the signal's default action
    // (the end of the process) once serving has begun.
    let hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .map_err(ServeError::Signal)?;
    let listener = tokio::net::TcpListener::bind(options.listen)
        .await
        .map_err(|source| ServeError::Bind {
            listen: options.listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(ServeError::Serve)?;
    let (ended, shutdown) = tokio::sync::watch::channel(false);
    let mut allowed_hosts = options.allowed_hosts.clone();
    // The address it listens on names it too (without a token, a loopback
    // address: what a page of this very server sends as its Origin).
    if !addr.ip().is_unspecified() {
        allowed_hosts.push(addr.ip().to_string());
        if addr.is_ipv6() {
            allowed_hosts.push(format!("[{}]", addr.ip()));
        }
    }
    let state = Arc::new(AppState {
        sandbox: sandbox.clone(),
        metrics: Metrics::new(),
        token: options.token.clone(),
        allowed_hosts,
        shutdown,
        budget: Arc::new(TransferBudget::new(DEFAULT_TRANSFER_BUDGET)),
        links: links::LinkKey::new().map_err(ServeError::LinkKey)?,
        listen_port: Some(addr.port()),
    });
    let source = match &options.policy_path {
        Some(path) => PolicySource::File(path.clone()),
        None => PolicySource::from_config(sandbox.config()),
    };
    spawn_reload_on_sighup(state.clone(), source, hangups);
    tracing::info!(%addr, "sandbox serve listening");
    let app = router(state.clone(), options.body_limit_bytes);
    let server = Server {
        state,
        limits: ConnectionLimits::default(),
        grace: options.grace,
        ended,
    };
    server.run(listener, app, shutdown_signal()).await;
    sandbox.settle().await;
    tracing::info!("bye");
    Ok(())
}

/// A server's connections and its shutdown sequence.
struct Server {
    state: Shared,
    limits: ConnectionLimits,
    /// What running requests get after the signal.
    grace: Duration,
    /// Set when the grace is over: running commands end (`shutdown`).
    ended: tokio::sync::watch::Sender<bool>,
}

impl Server {
    /// Serves `app` on `listener` until `signal`, then shuts down: no new
    /// connection, running requests get the grace period, then end with
    /// the reason `shutdown`, and it returns at most
    /// [`SHUTDOWN_LINGER`] later.
    async fn run(self, listener: tokio::net::TcpListener, app: axum::Router, signal: impl Future) {
        let (stop, stopping) = tokio::sync::watch::channel(false);
        let connections =
            conn::serve_connections(listener, app, self.limits, self.state.clone(), stopping);
        tokio::pin!(connections);
        tokio::select! {
            () = &mut connections => return,
            _ = signal => {}
        }
        let _ = stop.send(true);
        let grace = self.grace;
        tracing::info!(
            grace_secs = grace.as_secs_f64(),
            "shutting down: no new connections; running requests get the grace period"
        );
        if tokio::time::timeout(grace, &mut connections).await.is_err() {
            tracing::warn!("grace period over: ending the running commands (reason: shutdown)");
            let _ = self.ended.send(true);
            if tokio::time::timeout(SHUTDOWN_LINGER, &mut connections)
                .await
                .is_err()
            {
                tracing::warn!("requests still open after the grace period; exiting anyway");
            }
        }
    }
}

/// How long after the grace period the server waits for ended requests to
/// answer before it exits regardless.
pub const SHUTDOWN_LINGER: std::time::Duration = std::time::Duration::from_secs(2);

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = term => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// On each SIGHUP, loads `source` afresh (a file read again, the embedded
/// policy compiled again) and swaps to it; a policy that fails to load or
/// self-check is refused and the running one stays. Logged either way.
fn spawn_reload_on_sighup(
    state: Shared,
    source: PolicySource,
    mut hangups: tokio::signal::unix::Signal,
) {
    let shown = match &source {
        PolicySource::Builtin(name) => format!("embedded {name}"),
        PolicySource::File(path) => path.display().to_string(),
        PolicySource::Bytes { label, .. } => label.clone(),
    };
    tokio::spawn(async move {
        while hangups.recv().await.is_some() {
            tracing::info!(source = %shown, "SIGHUP: reloading the policy");
            match state.sandbox.swap_policy(source.clone()).await {
                Ok(()) => {
                    state.metrics.policy_swaps.inc();
                    tracing::info!(
                        policy = state.sandbox.policy_name(),
                        source = %shown,
                        "SIGHUP: policy reloaded"
                    );
                }
                Err(e) => tracing::error!(
                    error = %e,
                    source = %shown,
                    "SIGHUP: reload refused; the running policy stays"
                ),
            }
        }
    });
}

/// The default body limit of the JSON routes: 24 MiB (a 16 MiB upload,
/// base64-encoded, fits), so a request costs the server a bounded amount of
/// memory. Larger files go through the streaming `/files/raw` routes.
pub const DEFAULT_BODY_LIMIT: usize = 24 * 1024 * 1024;

/// File content one JSON download batch holds: its base64 and JSON copies
/// stay within the server's per-request memory budget.
pub const JSON_BATCH_BYTES: u64 = 16 * 1024 * 1024;

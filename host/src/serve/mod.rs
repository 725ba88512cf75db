//! `sandbox serve`: the library behind a JSON HTTP API for agent platforms
//! written in other languages, with live policy swap.
//!
//! Routes (see `host/openapi.json`): exec (plain and NDJSON streaming),
//! batch file upload/download, destroy per user and per thread, backends,
//! health, Prometheus metrics, policy swap. Errors are JSON
//! `{"error": {"kind", "message"}}` with a status that matches the kind.
//! Every request gets one access-log line ([`ACCESS_LOG_TARGET`]).

mod api;
mod metrics;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context};

pub use api::{router, ACCESS_LOG_TARGET};
pub use metrics::{Metrics, CONTENT_TYPE as METRICS_CONTENT_TYPE};

use crate::{PolicySource, Sandbox};

/// How `sandbox serve` runs.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub listen: SocketAddr,
    /// Required on every request when set; mandatory off loopback.
    pub token: Option<String>,
    /// Largest request body accepted (uploads included).
    pub body_limit_bytes: usize,
    /// Reloaded on SIGHUP.
    pub policy_path: Option<PathBuf>,
}

/// Shared by every handler.
pub struct AppState {
    pub sandbox: Sandbox,
    pub metrics: Metrics,
    pub token: Option<String>,
}

impl ServeOptions {
    pub fn check(&self) -> anyhow::Result<()> {
        if !self.listen.ip().is_loopback() && self.token.as_deref().is_none_or(str::is_empty) {
            bail!(
                "refusing to listen on {} without a bearer token: set --token or SANDBOX_TOKEN \
                 (only loopback addresses may run without one)",
                self.listen
            );
        }
        Ok(())
    }
}

/// Serves until SIGTERM / ctrl-c, then finishes in-flight requests.
pub async fn serve(sandbox: Sandbox, options: ServeOptions) -> anyhow::Result<()> {
    options.check()?;
    let state = Arc::new(AppState {
        sandbox,
        metrics: Metrics::new(),
        token: options.token.clone(),
    });
    if let Some(path) = options.policy_path.clone() {
        spawn_reload_on_sighup(state.clone(), path)?;
    }
    let app = router(state, options.body_limit_bytes);
    let listener = tokio::net::TcpListener::bind(options.listen)
        .await
        .with_context(|| format!("binding {}", options.listen))?;
    tracing::info!(addr = %listener.local_addr()?, "sandbox serve listening");
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown_signal())
        .await
        .context("serving")?;
    tracing::info!("in-flight requests finished; bye");
    Ok(())
}

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
    tracing::info!("shutting down: no new connections, finishing in-flight requests");
}

fn spawn_reload_on_sighup(state: Arc<AppState>, path: PathBuf) -> anyhow::Result<()> {
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            match state
                .sandbox
                .swap_policy(PolicySource::File(path.clone()))
                .await
            {
                Ok(()) => {
                    state.metrics.policy_swaps.inc();
                    tracing::info!(policy = state.sandbox.policy_name(), path = %path.display(), "policy reloaded on SIGHUP");
                }
                Err(e) => {
                    tracing::error!(error = %e, "SIGHUP reload refused; the running policy stays")
                }
            }
        }
    });
    Ok(())
}

/// The default body limit: 96 MiB (a 50 MB upload, base64-encoded, fits).
pub const DEFAULT_BODY_LIMIT: usize = 96 * 1024 * 1024;

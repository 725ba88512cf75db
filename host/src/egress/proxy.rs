//! One connection from a sandbox to the egress proxy: HTTP/1 forward
//! requests (`GET http://host/path`) and `CONNECT host:port` tunnels (TLS
//! passes through untouched), served by hyper.
//!
//! hyper rather than a proxy daemon: the proxy needs the user a connection
//! came from (its socket says it), a decision per request by the host's
//! own rules, and the bytes counted per user; a daemon would need all three
//! fed to it. hyper parses both sides (requests from the sandbox, responses
//! from upstream), so nothing here reads HTTP by hand.
//!
//! Each destination is checked twice: the name (or address literal) must
//! be listed, then every address it resolves to must be one a name may use
//! (see [`Rules::admit_resolved`]); the socket connects to the address that
//! was checked, never to a name, so a second DNS answer cannot redirect it.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;

use super::meter::{Metered, UserMeter};
use super::rules::{Host, Refusal, Rules};

/// How long a sandbox has to send a request's head.
const HEADER_TIMEOUT: Duration = Duration::from_secs(30);
/// How long resolving a name and connecting to it may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A tunnel that moves no byte either way for this long is closed: idle
/// tunnels would otherwise hold the user's connection slots for ever.
const TUNNEL_IDLE: Duration = Duration::from_secs(300);
/// How often a tunnel's idleness is checked.
const IDLE_CHECK: Duration = Duration::from_secs(15);

type Body = BoxBody<Bytes, hyper::Error>;

/// What every connection of one user shares.
pub(super) struct Context {
    pub user: String,
    pub rules: Arc<Rules>,
    pub meter: Arc<UserMeter>,
}

/// The connection slots a connection holds (its user's, the process's):
/// released when the connection and any tunnel it became have ended.
pub(super) type Slots = Arc<(OwnedSemaphorePermit, OwnedSemaphorePermit)>;

/// Serves one accepted connection until the sandbox closes it.
pub(super) async fn serve_connection<S>(io: S, cx: Arc<Context>, slots: Slots)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req| {
        let (cx, slots) = (cx.clone(), slots.clone());
        async move { Ok::<_, Infallible>(handle(req, cx, slots).await) }
    });
    let served = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades()
        .await;
    if let Err(e) = served {
        tracing::debug!(error = %e, "egress connection ended");
    }
}

async fn handle(req: Request<Incoming>, cx: Arc<Context>, slots: Slots) -> Response<Body> {
    let started = Instant::now();
    let method = req.method().clone();
    let Some((host, port)) = destination(&req) else {
        return text(
            StatusCode::BAD_REQUEST,
            "this is the sandbox's egress proxy: send absolute http:// URLs or CONNECT \
             host:port (the HTTP_PROXY and HTTPS_PROXY variables do this)\n"
                .into(),
        );
    };
    let upstream = match open(&cx, &host, port).await {
        Ok(upstream) => upstream,
        Err(response) => {
            log(
                &cx,
                &method,
                &host,
                port,
                response.status(),
                started,
                (0, 0),
            );
            return response;
        }
    };
    if method == Method::CONNECT {
        tunnel(req, upstream, cx, host, port, started, slots)
    } else {
        forward(req, upstream, cx, host, port, started).await
    }
}

/// The destination of a CONNECT (`host:port`) or an absolute-form request
/// (`http://host[:port]/...`); `None` for anything else.
fn destination(req: &Request<Incoming>) -> Option<(Host, u16)> {
    let uri = req.uri();
    if req.method() == Method::CONNECT {
        let authority = uri.authority()?;
        return Some((Host::parse(authority.host()), authority.port_u16()?));
    }
    if uri.scheme_str() != Some("http") {
        return None;
    }
    Some((Host::parse(uri.host()?), uri.port_u16().unwrap_or(80)))
}

/// Checks the destination, resolves it and connects to the first address
/// that passes; the refusal or failure as the response otherwise.
async fn open(cx: &Context, host: &Host, port: u16) -> Result<Metered<TcpStream>, Response<Body>> {
    let refused = |refusal: Refusal| {
        cx.meter.refused();
        text(
            StatusCode::FORBIDDEN,
            format!("sandbox egress: {refusal}\n"),
        )
    };
    cx.rules.admit(host, port).map_err(refused)?;
    let addresses = resolve(&cx.rules, host, port).await.map_err(|why| {
        text(
            StatusCode::BAD_GATEWAY,
            format!("sandbox egress: cannot resolve {host}: {why}\n"),
        )
    })?;
    let mut last_refusal = None;
    let mut last_error = None;
    for address in addresses {
        if let Err(refusal) = cx.rules.admit_resolved(host, address) {
            last_refusal = Some(refusal);
            continue;
        }
        match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(address)).await {
            Ok(Ok(stream)) => {
                let _ = stream.set_nodelay(true);
                return Ok(Metered::new(stream, cx.meter.clone()));
            }
            Ok(Err(e)) => last_error = Some(format!("{address}: {e}")),
            Err(_) => last_error = Some(format!("{address}: no answer in {CONNECT_TIMEOUT:?}")),
        }
    }
    match (last_error, last_refusal) {
        (Some(error), _) => Err(text(
            StatusCode::BAD_GATEWAY,
            format!("sandbox egress: cannot connect to {host}:{port}: {error}\n"),
        )),
        (None, Some(refusal)) => Err(refused(refusal)),
        (None, None) => Err(text(
            StatusCode::BAD_GATEWAY,
            format!("sandbox egress: {host} has no address\n"),
        )),
    }
}

/// The addresses to try: the literal, the `hosts` pin, or DNS's answers.
async fn resolve(rules: &Rules, host: &Host, port: u16) -> Result<Vec<SocketAddr>, String> {
    match host {
        Host::Address(ip) => Ok(vec![SocketAddr::new(*ip, port)]),
        Host::Name(name) => {
            if let Some(ip) = rules.pinned(name) {
                return Ok(vec![SocketAddr::new(ip, port)]);
            }
            let lookup = tokio::net::lookup_host((name.as_str(), port));
            match tokio::time::timeout(CONNECT_TIMEOUT, lookup).await {
                Ok(Ok(found)) => Ok(found.collect()),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err(format!("no answer in {CONNECT_TIMEOUT:?}")),
            }
        }
    }
}

/// Answers a CONNECT with 200, then copies both ways until either side ends.
fn tunnel(
    req: Request<Incoming>,
    mut upstream: Metered<TcpStream>,
    cx: Arc<Context>,
    host: Host,
    port: u16,
    started: Instant,
    slots: Slots,
) -> Response<Body> {
    tokio::spawn(async move {
        // The tunnel outlives the connection's service: it holds the slots.
        let _slots = slots;
        match hyper::upgrade::on(req).await {
            Ok(upgraded) => {
                let mut client = TokioIo::new(upgraded);
                let counter = upstream.counter();
                tokio::select! {
                    _ = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {}
                    _ = idle(counter, TUNNEL_IDLE) => {
                        tracing::debug!(user = cx.user.as_str(), "egress tunnel idle: closed");
                    }
                }
            }
            Err(e) => tracing::debug!(error = %e, "egress tunnel not upgraded"),
        }
        let bytes = upstream.counted();
        log(
            &cx,
            &Method::CONNECT,
            &host,
            port,
            StatusCode::OK,
            started,
            bytes,
        );
    });
    Response::new(empty())
}

/// Sends the request on to upstream in origin form, hop-by-hop headers
/// removed, and streams the response back.
async fn forward(
    mut req: Request<Incoming>,
    upstream: Metered<TcpStream>,
    cx: Arc<Context>,
    host: Host,
    port: u16,
    started: Instant,
) -> Response<Body> {
    let method = req.method().clone();
    let origin_form = req
        .uri()
        .path_and_query()
        .map_or("/", |pq| pq.as_str())
        .parse()
        .unwrap_or_else(|_| hyper::Uri::from_static("/"));
    // Host and port only: never userinfo (`http://user:pw@host/`).
    let authority = req.uri().authority().map(|a| match a.port() {
        Some(port) => format!("{}:{}", a.host(), port.as_str()),
        None => a.host().to_owned(),
    });
    *req.uri_mut() = origin_form;
    strip_hop_by_hop(req.headers_mut());
    if let Some(authority) = authority {
        if let Ok(value) = HeaderValue::from_str(&authority) {
            req.headers_mut().insert(header::HOST, value);
        }
    }
    let counted = upstream.counter();
    let (mut sender, connection) =
        match hyper::client::conn::http1::handshake(TokioIo::new(upstream)).await {
            Ok(pair) => pair,
            Err(e) => {
                return text(
                    StatusCode::BAD_GATEWAY,
                    format!("sandbox egress: {host}:{port}: {e}\n"),
                )
            }
        };
    let log_cx = cx.clone();
    let log_method = method.clone();
    let (log_host, log_status) = (
        host.clone(),
        std::sync::Arc::new(std::sync::Mutex::new(StatusCode::BAD_GATEWAY)),
    );
    let status_slot = log_status.clone();
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "egress upstream connection ended");
        }
        let status = *log_status.lock().unwrap();
        log(
            &log_cx,
            &log_method,
            &log_host,
            port,
            status,
            started,
            counted.get(),
        );
    });
    match sender.send_request(req).await {
        Ok(mut response) => {
            *status_slot.lock().unwrap() = response.status();
            strip_hop_by_hop(response.headers_mut());
            response.map(|body| body.boxed())
        }
        Err(e) => text(
            StatusCode::BAD_GATEWAY,
            format!("sandbox egress: {host}:{port}: {e}\n"),
        ),
    }
}

/// Removes the headers that describe one connection, not the message
/// (RFC 9110 section 7.6.1), and the proxy's own.
fn strip_hop_by_hop(headers: &mut hyper::HeaderMap) {
    let named: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|name| name.trim().to_ascii_lowercase())
        .filter(|name| !name.is_empty())
        .collect();
    for name in named {
        headers.remove(name.as_str());
    }
    for name in [
        "connection",
        "proxy-connection",
        "keep-alive",
        "proxy-authorization",
        "proxy-authenticate",
        "te",
        "trailer",
        "upgrade",
    ] {
        headers.remove(name);
    }
}

/// Returns once `counter` stayed still for `limit`.
async fn idle(counter: super::meter::Counted, limit: Duration) {
    let mut last = counter.get();
    let mut still_since = Instant::now();
    loop {
        tokio::time::sleep(IDLE_CHECK.min(limit)).await;
        let now = counter.get();
        if now != last {
            last = now;
            still_since = Instant::now();
        } else if still_since.elapsed() >= limit {
            return;
        }
    }
}

fn log(
    cx: &Context,
    method: &Method,
    host: &Host,
    port: u16,
    status: StatusCode,
    started: Instant,
    (bytes_in, bytes_out): (u64, u64),
) {
    tracing::info!(
        target: "sandbox::egress",
        user = cx.user.as_str(),
        method = method.as_str(),
        destination = format!("{host}:{port}"),
        status = status.as_u16(),
        bytes_in,
        bytes_out,
        ms = started.elapsed().as_millis() as u64,
        "egress"
    );
}

fn empty() -> Body {
    Full::new(Bytes::new())
        .map_err(|never| match never {})
        .boxed()
}

fn text(status: StatusCode, body: String) -> Response<Body> {
    let mut response = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|never| match never {})
            .boxed(),
    );
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    #[tokio::test]
    async fn a_tunnel_is_idle_only_once_no_byte_moved_for_the_whole_limit() {
        let counter = super::super::meter::Counted::default();
        let limit = Duration::from_millis(200);
        let started = Instant::now();
        idle(counter.clone(), limit).await;
        assert!(started.elapsed() >= limit, "{:?}", started.elapsed());

        let busy = counter.clone();
        let mover = tokio::spawn(async move {
            for _ in 0..12 {
                busy.0 .0.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        let started = Instant::now();
        idle(counter, limit).await;
        assert!(
            started.elapsed() >= Duration::from_millis(600),
            "closed while bytes moved: {:?}",
            started.elapsed()
        );
        mover.await.unwrap();
    }
}

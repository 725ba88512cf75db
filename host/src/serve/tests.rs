//! The HTTP API driven in process through the router (`oneshot`), one
//! request at a time, over the in-memory provider: routing, statuses, JSON
//! shapes, error kinds, authentication, body limits, metrics and the
//! access log. Its exec answers exit 0 with no output and it stores no
//! files, so what needs a real container (command output, file contents,
//! streaming, shutdown of a running command) is in [`engine`].
//!
//! The Python client (`clients/python`) parses these statuses, field names
//! and kinds: a test that fails here is a broken client there.

mod connections;
mod engine;
mod schema;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderMap, Request, StatusCode};
use serde_json::{json, Value};
use tower::ServiceExt as _;
use tracing_subscriber::layer::SubscriberExt as _;

use super::{router, AppState, ACCESS_LOG_TARGET, METRICS_CONTENT_TYPE};
use crate::config::Config;
use crate::MemoryProvider;
use crate::{PolicySource, Sandbox};

const TOKEN: &str = "t0ken";

/// The JSON body limit of the test apps (small, so 413 is cheap to reach).
const BODY_LIMIT: usize = 1 << 20;

/// Every route the router serves, as `openapi.json` names it.
const ROUTES: [(&str, &str); 29] = [
    ("POST", "/v1/threads/{thread_id}/exec"),
    ("POST", "/v1/threads/{thread_id}/exec/stream"),
    ("PUT", "/v1/threads/{thread_id}/files"),
    ("GET", "/v1/threads/{thread_id}/files"),
    ("GET", "/v1/threads/{thread_id}/files/raw"),
    ("PUT", "/v1/threads/{thread_id}/files/raw"),
    ("GET", "/v1/threads/{thread_id}"),
    ("DELETE", "/v1/threads/{thread_id}"),
    ("DELETE", "/v1/users/{user_id}"),
    (
        "DELETE",
        "/v1/threads/{thread_id}/executions/{execution_id}",
    ),
    ("DELETE", "/v1/executions/{execution_id}"),
    ("GET", "/v1/backends"),
    ("POST", "/v1/gc"),
    ("GET", "/v1/policy"),
    ("POST", "/v1/policy"),
    ("GET", "/healthz"),
    ("GET", "/metrics"),
    ("GET", "/openapi.json"),
    ("GET", "/v1/threads/{thread_id}/ports/{port}/{path}"),
    ("POST", "/v1/previews"),
    ("GET", "/v1/previews/{link}/{path}"),
    ("POST", "/v1/threads/{thread_id}/processes"),
    ("GET", "/v1/threads/{thread_id}/processes"),
    ("GET", "/v1/threads/{thread_id}/processes/{process_id}"),
    ("DELETE", "/v1/threads/{thread_id}/processes/{process_id}"),
    (
        "POST",
        "/v1/threads/{thread_id}/processes/{process_id}/stdin",
    ),
    (
        "POST",
        "/v1/threads/{thread_id}/processes/{process_id}/signal",
    ),
    (
        "POST",
        "/v1/threads/{thread_id}/processes/{process_id}/resize",
    ),
    ("GET", "/v1/threads/{thread_id}/pty"),
];

// ---------------------------------------------------------------------------
// Access-log capture

/// The fields of every access-log event, with the thread that emitted it.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<(std::thread::ThreadId, Fields)>>>);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Capture {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
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

// ---------------------------------------------------------------------------
// Test apps, requests and replies

/// What differs between test apps; the default is a token, the small body
/// limit, loopback host names and no shutdown sequence.
struct Options {
    token: Option<String>,
    body_limit: usize,
    allowed_hosts: Option<Vec<String>>,
    shutdown: Option<tokio::sync::watch::Receiver<bool>>,
    /// The transfer budget in bytes (the server's default when absent).
    budget: Option<usize>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            token: Some(TOKEN.to_owned()),
            body_limit: BODY_LIMIT,
            allowed_hosts: None,
            shutdown: None,
            budget: None,
        }
    }
}

/// The default options without a token (loopback host names).
fn tokenless() -> Options {
    Options {
        token: None,
        ..Options::default()
    }
}

/// Where the test apps keep compiled policies: compiling the shipped
/// policy for each of dozens of apps would dominate the run, and the user's
/// own cache is not the tests' to fill. Entries are keyed by component and
/// engine, written atomically, and only read from a directory this user
/// alone can write (see `runtime::cache`), so runs can share it.
fn component_cache() -> std::path::PathBuf {
    std::env::temp_dir().join(format!(
        "sandbox-serve-tests-{}",
        nix::unistd::geteuid().as_raw()
    ))
}

/// A router around one sandbox, and the workspace root it owns.
struct App {
    router: axum::Router,
    state: Arc<AppState>,
    root: tempfile::TempDir,
}

impl App {
    /// The per-user policy over the in-memory provider, with a token.
    async fn memory() -> App {
        App::memory_with(Options::default(), |_| {}).await
    }

    async fn memory_with(options: Options, tweak: impl FnOnce(&mut Config)) -> App {
        // Before anything can log, so every test's events are captured.
        Capture::global();
        let root = tempfile::tempdir().expect("temp workspace root");
        let mut config = Config {
            workspace_root: root.path().to_owned(),
            // The host's ids, or 1000:1000 when the tests run as root (a root
            // sandbox user is refused).
            sandbox_user: Some(Config::default().sandbox_user()),
            component_cache_dir: Some(component_cache()),
            ..Config::default()
        };
        tweak(&mut config);
        let sandbox = Sandbox::with_provider(
            config,
            Arc::new(MemoryProvider::new()),
            PolicySource::Builtin("per-user".into()),
        )
        .await
        .expect("sandbox on the in-memory provider");
        App::around(sandbox, root, options)
    }

    fn around(sandbox: Sandbox, root: tempfile::TempDir, options: Options) -> App {
        Capture::global();
        let mut state = AppState::new(sandbox, options.token);
        if let Some(hosts) = options.allowed_hosts {
            state.allowed_hosts = hosts;
        }
        if let Some(shutdown) = options.shutdown {
            state.shutdown = shutdown;
        }
        if let Some(budget) = options.budget {
            state.budget = Arc::new(super::TransferBudget::new(budget));
        }
        let state = Arc::new(state);
        App {
            router: router(state.clone(), options.body_limit),
            state,
            root,
        }
    }

    async fn send(&self, request: Request<Body>) -> Reply {
        let response = self
            .router
            .clone()
            .oneshot(request)
            .await
            .expect("the router is infallible");
        let status = response.status();
        let headers = response.headers().clone();
        let body = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .expect("the whole body");
        Reply {
            status,
            headers,
            body,
        }
    }

    /// The sandbox's containers, straight from the library.
    async fn containers(&self) -> Vec<crate::ManagedContainer> {
        self.state.sandbox.list().await.expect("list")
    }

    /// `/metrics` as text (addressed to localhost, so tokenless apps
    /// answer too).
    async fn metrics(&self) -> String {
        let request = authed("GET", "/metrics")
            .header(header::HOST, "localhost")
            .body(Body::empty())
            .unwrap();
        let reply = self.send(request).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        reply.text()
    }
}

/// A whole response.
struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Reply {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }

    fn content_type(&self) -> &str {
        self.headers
            .get(header::CONTENT_TYPE)
            .map(|v| v.to_str().unwrap())
            .unwrap_or("")
    }

    /// The status and the kind of a JSON error `{"error": {"kind",
    /// "message"}}`, after checking that it has exactly that shape.
    fn error(&self) -> (u16, String) {
        let v = self.json();
        let error = v["error"]
            .as_object()
            .unwrap_or_else(|| panic!("an error body: {v}"));
        assert_eq!(error.keys().collect::<Vec<_>>(), ["kind", "message"], "{v}");
        assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()));
        (
            self.status.as_u16(),
            error["kind"].as_str().expect("a kind").to_owned(),
        )
    }

    /// The NDJSON lines of a streamed exec after its `started` line, with
    /// the execution id checked (the same on every line that carries it)
    /// and taken out, so tests compare the rest exactly.
    fn lines(&self) -> Vec<Value> {
        let mut lines: Vec<Value> = self
            .text()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect();
        let started = lines.remove(0);
        assert_eq!(started["type"], "started", "{}", self.text());
        let id = started["execution_id"].as_str().expect("an id").to_owned();
        for line in &mut lines {
            if let Some(own) = line.as_object_mut().unwrap().remove("execution_id") {
                assert_eq!(own, id.as_str(), "{}", self.text());
            }
        }
        lines
    }

    /// The JSON body of an exec, its (random) execution id checked and
    /// taken out.
    fn exec_json(&self) -> Value {
        let mut v = self.json();
        let id = v
            .as_object_mut()
            .unwrap()
            .remove("execution_id")
            .expect("an execution id");
        assert!(id.as_str().is_some_and(|id| id.len() >= 8), "{id}");
        v
    }
}

fn authed(method: &str, uri: &str) -> axum::http::request::Builder {
    Request::builder()
        .method(method)
        .uri(uri)
        .header(header::AUTHORIZATION, format!("Bearer {TOKEN}"))
}

fn get(uri: &str) -> Request<Body> {
    authed("GET", uri).body(Body::empty()).unwrap()
}

fn delete(uri: &str) -> Request<Body> {
    authed("DELETE", uri).body(Body::empty()).unwrap()
}

fn json_request(method: &str, uri: &str, body: impl Into<Body>) -> Request<Body> {
    authed(method, uri)
        .header(header::CONTENT_TYPE, "application/json")
        .body(body.into())
        .unwrap()
}

fn post_json(uri: &str, body: impl Into<Body>) -> Request<Body> {
    json_request("POST", uri, body)
}

/// A raw upload with its Content-Length, as any HTTP client sends it (the
/// router sees only the headers a request was built with).
fn put_raw(uri: &str, content: Vec<u8>) -> Request<Body> {
    authed("PUT", uri)
        .header(header::CONTENT_LENGTH, content.len())
        .body(Body::from(content))
        .unwrap()
}

fn exec(thread: &str, command: &str) -> Request<Body> {
    post_json(
        &format!("/v1/threads/{thread}/exec"),
        json!({ "command": command }).to_string(),
    )
}

/// A request to one of [`ROUTES`] that passes its body and query checks,
/// with `thread` and `user` as the path's ids.
fn sample(method: &str, route: &str, thread: &str, user: &str) -> Request<Body> {
    let uri = route
        .replace("{thread_id}", thread)
        .replace("{user_id}", user)
        .replace("{execution_id}", "no-such-execution")
        .replace("{port}", "8080")
        .replace("{link}", "no-such-link")
        .replace("{process_id}", "0123456789abcdef0123456789abcdef")
        .replace("{path}", "index.html");
    match (method, route) {
        ("POST", r) if r.ends_with("/exec") || r.ends_with("/exec/stream") => {
            json_request(method, &uri, r#"{"command":"true"}"#)
        }
        ("POST", r) if r.ends_with("/processes") => {
            json_request(method, &uri, r#"{"command":"true"}"#)
        }
        ("POST", r) if r.ends_with("/stdin") => json_request(method, &uri, r#"{"data":"x"}"#),
        ("POST", r) if r.ends_with("/signal") => json_request(method, &uri, r#"{"signal":"TERM"}"#),
        ("POST", r) if r.ends_with("/resize") => {
            json_request(method, &uri, r#"{"rows":24,"cols":80}"#)
        }
        ("PUT", r) if r.ends_with("/files") => json_request(method, &uri, r#"{"files":[]}"#),
        ("GET", r) if r.ends_with("/files") || r.ends_with("/files/raw") => {
            get(&format!("{uri}?path=a.txt"))
        }
        ("PUT", r) if r.ends_with("/files/raw") => put_raw(&format!("{uri}?path=a.txt"), vec![]),
        ("POST", "/v1/previews") => json_request(
            method,
            &uri,
            format!(r#"{{"thread_id":"{thread}","port":8080}}"#),
        ),
        ("POST", "/v1/policy") => authed(method, &uri)
            .header(header::CONTENT_TYPE, "application/wasm")
            .body(Body::from(&b"not a component"[..]))
            .unwrap(),
        _ => authed(method, &uri).body(Body::empty()).unwrap(),
    }
}

/// The value of one series (`name{labels}`) in OpenMetrics text.
fn series(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter_map(|l| l.split_once(' '))
        .find(|(n, _)| *n == name)
        .map(|(_, v)| v.parse().expect("a number"))
}

// ---------------------------------------------------------------------------
// Routing and the documentation

#[tokio::test]
async fn openapi_json_is_served_as_json_and_documents_exactly_the_routes_served() {
    let app = App::memory().await;
    let reply = app.send(get("/openapi.json")).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.content_type(), "application/json");
    let spec = reply.json();
    let documented: BTreeSet<(String, String)> = spec["paths"]
        .as_object()
        .expect("paths")
        .iter()
        .flat_map(|(path, ops)| {
            ops.as_object()
                .expect("operations")
                .keys()
                .filter(|m| ["get", "put", "post", "delete", "patch"].contains(&m.as_str()))
                .map(move |m| (m.to_uppercase(), path.clone()))
        })
        .collect();
    let tested: BTreeSet<(String, String)> = ROUTES
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    assert_eq!(documented, tested, "openapi.json and the tested routes");
    // And the router answers each of them (not the fallback, not 405).
    for (method, route) in ROUTES {
        let reply = app.send(sample(method, route, "alice-1", "alice")).await;
        assert_ne!(
            reply.status,
            StatusCode::METHOD_NOT_ALLOWED,
            "{method} {route}"
        );
        assert!(
            !reply.text().contains("no such route"),
            "{method} {route} is not routed: {}",
            reply.text()
        );
    }
}

#[tokio::test]
async fn an_unknown_route_is_404_not_found_in_the_json_error_shape() {
    let app = App::memory().await;
    for uri in [
        "/no/such/route",
        "/v1/threads",
        "/v1/threads/alice-1/nope",
        "/",
    ] {
        let reply = app.send(get(uri)).await;
        assert_eq!(reply.error(), (404, "not-found".into()), "{uri}");
    }
}

#[tokio::test]
async fn cancelling_an_unknown_execution_is_404_and_a_malformed_id_is_400() {
    let app = App::memory().await;
    let reply = app
        .send(delete("/v1/threads/alice-1/executions/no-such-execution"))
        .await;
    assert_eq!(reply.error(), (404, "not-found".into()));
    for bad in ["short", "has%20space", &"x".repeat(65)] {
        let uri = format!("/v1/threads/alice-1/executions/{bad}");
        let reply = app.send(delete(&uri)).await;
        assert_eq!(reply.error(), (400, "invalid-id".into()), "{bad}");
    }
    let reply = app
        .send(delete(
            "/v1/threads/has%20space-1/executions/no-such-execution",
        ))
        .await;
    assert_eq!(reply.error(), (400, "invalid-id".into()), "a bad thread id");
    // The route of before ids were scoped per user says where to go.
    let reply = app.send(delete("/v1/executions/no-such-execution")).await;
    assert_eq!(reply.error(), (410, "not-found".into()));
    assert!(reply.text().contains("/v1/threads/{thread_id}/executions/"));
}

#[tokio::test]
async fn an_exec_answers_its_execution_id_and_a_stream_opens_with_it() {
    let app = App::memory().await;
    let reply = app
        .send(post_json(
            "/v1/threads/alice-1/exec",
            json!({ "command": "true", "execution_id": "mine-000001" }).to_string(),
        ))
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.json()["execution_id"], "mine-000001");
    let reply = app
        .send(post_json(
            "/v1/threads/alice-1/exec/stream",
            json!({ "command": "true" }).to_string(),
        ))
        .await;
    let text = String::from_utf8(reply.body.to_vec()).unwrap();
    let first: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert_eq!(first["type"], "started", "{text}");
    let id = first["execution_id"].as_str().unwrap().to_owned();
    let last: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    assert_eq!(last["type"], "exit", "{text}");
    assert_eq!(last["execution_id"], id.as_str());
}

#[tokio::test]
async fn a_known_route_with_another_method_is_405() {
    let app = App::memory().await;
    for (method, uri) in [
        ("GET", "/v1/threads/alice-1/exec"),
        ("DELETE", "/v1/backends"),
        ("PUT", "/v1/policy"),
        ("POST", "/healthz"),
    ] {
        let reply = app
            .send(authed(method, uri).body(Body::empty()).unwrap())
            .await;
        assert_eq!(
            reply.error(),
            (405, "method-not-allowed".into()),
            "{method} {uri}"
        );
    }
}

// ---------------------------------------------------------------------------
// Authentication and the Host allow-list

#[tokio::test]
async fn with_a_token_every_route_but_healthz_answers_401_without_it() {
    let app = App::memory().await;
    // Not /healthz, nor a preview link (the link is its credential).
    let guarded = ROUTES
        .iter()
        .filter(|(_, r)| *r != "/healthz" && !r.starts_with("/v1/previews/"));
    for (method, route) in guarded {
        for (authorization, message) in [
            (None, "missing bearer token"),
            (Some("Bearer "), "missing bearer token"),
            (Some("Bearer wrong"), "wrong bearer token"),
            (Some("Bearer t0ken "), "wrong bearer token"),
            (Some("Bearer t0ke"), "wrong bearer token"),
            // The token alone, without the scheme, is not a bearer token.
            (Some(TOKEN), "missing bearer token"),
            (Some("Basic dDBrZW4="), "missing bearer token"),
        ] {
            let mut request = sample(method, route, "alice-1", "alice");
            request.headers_mut().remove(header::AUTHORIZATION);
            if let Some(value) = authorization {
                request
                    .headers_mut()
                    .insert(header::AUTHORIZATION, value.parse().unwrap());
            }
            let reply = app.send(request).await;
            let what = format!("{method} {route} with {authorization:?}");
            assert_eq!(reply.error(), (401, "unauthorized".into()), "{what}");
            assert_eq!(reply.json()["error"]["message"], message, "{what}");
            assert_eq!(reply.headers[header::WWW_AUTHENTICATE], "Bearer", "{what}");
        }
    }
    // Nothing ran: the refused exec and POST /v1/policy did nothing.
    assert!(app.containers().await.is_empty());
    assert_eq!(app.state.sandbox.policy_name(), "per-user");
}

#[tokio::test]
async fn the_bearer_scheme_name_is_case_insensitive() {
    let app = App::memory().await;
    for scheme in ["Bearer", "bearer", "BEARER"] {
        let request = Request::builder()
            .uri("/v1/backends")
            .header(header::AUTHORIZATION, format!("{scheme} {TOKEN}"))
            .body(Body::empty())
            .unwrap();
        assert_eq!(app.send(request).await.status, StatusCode::OK, "{scheme}");
    }
}

#[tokio::test]
async fn a_refused_delete_removes_nothing() {
    let app = App::memory().await;
    assert_eq!(
        app.send(exec("alice-1", "true")).await.status,
        StatusCode::OK
    );
    let anonymous = Request::builder()
        .method("DELETE")
        .uri("/v1/users/alice")
        .body(Body::empty())
        .unwrap();
    assert_eq!(app.send(anonymous).await.status, StatusCode::UNAUTHORIZED);
    assert_eq!(app.containers().await.len(), 1);
}

#[tokio::test]
async fn an_unknown_route_needs_the_token_too() {
    let app = App::memory().await;
    let request = Request::builder()
        .uri("/no/such/route")
        .body(Body::empty())
        .unwrap();
    assert_eq!(
        app.send(request).await.error(),
        (401, "unauthorized".into())
    );
}

#[tokio::test]
async fn with_a_token_the_host_name_does_not_matter() {
    let app = App::memory().await;
    let request = authed("GET", "/v1/backends")
        .header(header::HOST, "rebind.attacker.example")
        .body(Body::empty())
        .unwrap();
    assert_eq!(app.send(request).await.status, StatusCode::OK);
}

#[tokio::test]
async fn without_a_token_only_loopback_host_names_get_in() {
    // The bug: a tokenless loopback serve answered any Host header, so a
    // DNS-rebinding page reached exec and DELETE.
    let app = App::memory_with(
        Options {
            token: None,
            ..Options::default()
        },
        |_| {},
    )
    .await;
    let with_host = |host: Option<&str>| {
        let mut r = Request::builder().method("GET").uri("/v1/backends");
        if let Some(host) = host {
            r = r.header(header::HOST, host);
        }
        r.body(Body::empty()).unwrap()
    };
    for evil in [
        Some("rebind.attacker.example"),
        Some("rebind.attacker.example:8765"),
        Some("127.0.0.1.nip.io"),
        Some("localhost.attacker.example"),
        Some("localhost:notaport"),
        None,
    ] {
        let reply = app.send(with_host(evil)).await;
        assert_eq!(reply.error(), (403, "forbidden-host".into()), "{evil:?}");
    }
    for ok in [
        "localhost:8765",
        "127.0.0.1:8765",
        "[::1]:8765",
        "[::1]",
        "::1",
        "LOCALHOST",
        "localhost",
    ] {
        let reply = app.send(with_host(Some(ok))).await;
        assert_eq!(reply.status, StatusCode::OK, "{ok}");
    }
    let metrics = app.metrics().await;
    assert_eq!(
        series(&metrics, r#"sandbox_errors_total{kind="forbidden-host"}"#),
        Some(6.0),
        "{metrics}"
    );
}

#[tokio::test]
async fn an_operator_allow_list_replaces_the_loopback_names() {
    let app = App::memory_with(
        Options {
            token: None,
            allowed_hosts: Some(vec!["sandbox.internal".into()]),
            ..Options::default()
        },
        |_| {},
    )
    .await;
    let with_host = |host: &str| {
        Request::builder()
            .uri("/v1/policy")
            .header(header::HOST, host)
            .body(Body::empty())
            .unwrap()
    };
    let reply = app.send(with_host("sandbox.internal:8765")).await;
    assert_eq!(reply.status, StatusCode::OK);
    let reply = app.send(with_host("localhost:8765")).await;
    assert_eq!(reply.error(), (403, "forbidden-host".into()));
}

/// A request as a page of another site makes a browser send it: no
/// token, this server's Host, the page's Origin.
fn from_origin(mut request: Request<Body>, origin: &str) -> Request<Body> {
    let headers = request.headers_mut();
    headers.remove(header::AUTHORIZATION);
    headers.insert(header::HOST, "localhost:8765".parse().unwrap());
    headers.insert(header::ORIGIN, origin.parse().unwrap());
    request
}

/// A WebSocket upgrade request, as a browser sends it.
fn websocket_upgrade(uri: &str) -> Request<Body> {
    Request::builder()
        .uri(uri)
        .header(header::CONNECTION, "Upgrade")
        .header(header::UPGRADE, "websocket")
        .header(header::SEC_WEBSOCKET_VERSION, "13")
        .header(header::SEC_WEBSOCKET_KEY, "dGhlIHNhbXBsZSBub25jZQ==")
        .body(Body::empty())
        .unwrap()
}

/// Issue 21: with `Origin: https://evil.example`, a simple `POST /v1/gc`
/// ran gc on a tokenless server, and a page could reach every route.
#[tokio::test]
async fn without_a_token_a_request_from_another_sites_page_is_refused_before_routing() {
    let capture = Capture::global();
    let app = App::memory_with(tokenless(), |_| {}).await;
    let local = |mut r: Request<Body>| {
        r.headers_mut().remove(header::AUTHORIZATION);
        r.headers_mut()
            .insert(header::HOST, "localhost".parse().unwrap());
        r
    };
    assert_eq!(
        app.send(local(exec("alice-1", "true"))).await.status,
        StatusCode::OK
    );
    for origin in [
        "https://evil.example",
        "http://evil.example:8765",
        "null",
        "http://localhost.evil.example",
        "http://127.0.0.1.nip.io:8765",
        "http://user@localhost:8765",
        "http://localhost:8765/path",
        "file://",
        "localhost",
    ] {
        for (method, route) in ROUTES {
            let request = from_origin(sample(method, route, "alice-1", "alice"), origin);
            let reply = app.send(request).await;
            if origin == "null" && route.contains("{link}") {
                // A page opened through a preview link calls its own
                // server through the link (ports.rs).
                assert!(
                    !reply.text().contains("forbidden-origin"),
                    "{method} {route}: {}",
                    reply.text()
                );
                continue;
            }
            assert_eq!(
                reply.error(),
                (403, "forbidden-origin".into()),
                "{method} {route} from {origin}"
            );
        }
        // Before any route is looked up: unknown paths and WebSocket
        // upgrades (which no route serves yet) are refused the same way.
        for uri in [
            "/no/such/route",
            "/v1/ws",
            "/v1/threads/alice-1/exec/stream",
        ] {
            let reply = app.send(from_origin(websocket_upgrade(uri), origin)).await;
            assert_eq!(
                reply.error(),
                (403, "forbidden-origin".into()),
                "upgrade of {uri} from {origin}"
            );
        }
    }
    // Logged, with the path (no route was looked up).
    let line = capture.mine().into_iter().last().expect("an access line");
    assert_eq!(
        (line["status"].as_str(), line["route"].as_str()),
        ("403", "(none)")
    );
    assert_eq!(line["path"], "/v1/threads/alice-1/exec/stream");
    // Nothing ran: the container is there, the policy is the same, and no
    // gc, exec or destroy was even called.
    assert_eq!(app.containers().await.len(), 1);
    assert_eq!(app.state.sandbox.policy_name(), "per-user");
    let metrics = app.metrics().await;
    assert_eq!(series(&metrics, r#"sandbox_calls_total{op="gc"}"#), None);
    assert_eq!(
        series(&metrics, r#"sandbox_calls_total{op="exec"}"#),
        Some(1.0)
    );
    assert_eq!(
        series(&metrics, r#"sandbox_errors_total{kind="forbidden-origin"}"#),
        // The preview link's route from `null` went through.
        Some((9 * (ROUTES.len() + 3) - 1) as f64),
        "{metrics}"
    );
}

#[tokio::test]
async fn without_a_token_a_page_of_an_allowed_host_and_a_client_without_origin_get_in() {
    let app = App::memory_with(tokenless(), |_| {}).await;
    for origin in [
        None,
        Some("http://localhost:8765"),
        Some("http://localhost:3000"),
        Some("https://LOCALHOST"),
        Some("http://127.0.0.1:8765"),
        Some("http://[::1]:8765"),
    ] {
        let mut request = Request::builder()
            .uri("/v1/backends")
            .header(header::HOST, "localhost:8765");
        if let Some(origin) = origin {
            request = request.header(header::ORIGIN, origin);
        }
        let reply = app.send(request.body(Body::empty()).unwrap()).await;
        assert_eq!(reply.status, StatusCode::OK, "{origin:?}: {}", reply.text());
    }
}

#[tokio::test]
async fn with_a_token_the_origin_does_not_matter() {
    // A page of another site cannot add the token: the browser asks first
    // (CORS), and this server never says yes.
    let app = App::memory().await;
    let request = authed("GET", "/v1/backends")
        .header(header::ORIGIN, "https://evil.example")
        .body(Body::empty())
        .unwrap();
    assert_eq!(app.send(request).await.status, StatusCode::OK);
    let request = from_origin(get("/v1/backends"), "https://evil.example");
    assert_eq!(
        app.send(request).await.error(),
        (401, "unauthorized".into())
    );
}

// ---------------------------------------------------------------------------
// GET and HEAD create nothing

/// Issue 21: a plain `GET /v1/threads/{t}/files/raw` created a container
/// and a workspace for an arbitrary user.
#[tokio::test]
async fn a_download_for_a_user_without_a_container_creates_nothing() {
    let app = App::memory().await;
    let reply = app
        .send(get(
            "/v1/threads/alice-1/files?path=/workspace/a.txt&path=b.txt",
        ))
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let missing = |path: &str| json!({"path": path, "content_b64": null, "mode": null, "error": "file_not_found"});
    assert_eq!(
        reply.json(),
        json!({"results": [missing("/workspace/a.txt"), missing("b.txt")]})
    );
    let reply = app
        .send(get("/v1/threads/alice-1/files/raw?path=a.txt"))
        .await;
    assert_eq!(reply.error(), (404, "file_not_found".into()));
    for (uri, status) in [
        ("/v1/threads/bob-1/files?path=a.txt", StatusCode::OK),
        (
            "/v1/threads/bob-1/files/raw?path=a.txt",
            StatusCode::NOT_FOUND,
        ),
        ("/v1/threads/bob-1", StatusCode::OK),
    ] {
        let reply = app
            .send(authed("HEAD", uri).body(Body::empty()).unwrap())
            .await;
        assert_eq!(reply.status, status, "HEAD {uri}");
    }
    assert!(app.containers().await.is_empty());
    let left = workspaces(app.root.path());
    assert!(left.is_empty(), "no workspace: {left:?}");
    let metrics = app.metrics().await;
    assert_eq!(
        series(&metrics, "sandbox_container_creations_total"),
        Some(0.0)
    );
}

// ---------------------------------------------------------------------------
// /healthz

#[tokio::test]
async fn healthz_is_open_without_a_token_and_reports_engine_and_policy() {
    let app = App::memory().await;
    let anonymous = Request::builder()
        .uri("/healthz")
        .body(Body::empty())
        .unwrap();
    let reply = app.send(anonymous).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(
        reply.json(),
        json!({"status": "ok", "engine": "ok", "policy": "per-user"})
    );
}

#[tokio::test]
async fn healthz_is_open_to_any_host_name_without_a_token() {
    // Probes address the server by whatever name the orchestrator uses.
    let app = App::memory_with(
        Options {
            token: None,
            ..Options::default()
        },
        |_| {},
    )
    .await;
    let request = Request::builder()
        .uri("/healthz")
        .header(header::HOST, "10.0.0.7:8765")
        .body(Body::empty())
        .unwrap();
    assert_eq!(app.send(request).await.status, StatusCode::OK);
}

#[tokio::test]
async fn an_unreachable_engine_is_503_on_healthz_and_docker_unavailable_on_exec() {
    Capture::global();
    let root = tempfile::tempdir().unwrap();
    let config = Config {
        workspace_root: root.path().to_owned(),
        // A socket that cannot exist: every Docker call fails at once.
        docker_host: Some(format!(
            "unix://{}",
            root.path().join("no-engine.sock").display()
        )),
        docker_timeout_secs: 2.0,
        component_cache_dir: Some(component_cache()),
        ..Config::default()
    };
    let sandbox = Sandbox::new(config)
        .await
        .expect("a sandbox starts without an engine");
    let app = App::around(sandbox, root, Options::default());
    let reply = app.send(get("/healthz")).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    let health = reply.json();
    assert_eq!(health["status"], "degraded");
    assert_eq!(health["policy"], "per-user");
    assert!(
        health["engine"].as_str().is_some_and(|e| e != "ok"),
        "{health}"
    );
    let reply = app.send(exec("alice-1", "true")).await;
    assert_eq!(reply.error(), (503, "docker-unavailable".into()));
}

// ---------------------------------------------------------------------------
// /metrics

/// Issue 9: `/metrics` was labelled `text/plain; version=0.0.4` while
/// prometheus-client writes OpenMetrics text, so scrapers parsed it with
/// the wrong grammar.
#[tokio::test]
async fn metrics_are_served_with_the_openmetrics_media_type() {
    let app = App::memory().await;
    let reply = app.send(get("/metrics")).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(
        reply.content_type(),
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    assert_eq!(reply.content_type(), METRICS_CONTENT_TYPE);
    let text = reply.text();
    assert!(
        text.ends_with("# EOF\n"),
        "OpenMetrics text ends with # EOF: {text}"
    );
    assert!(text.contains("sandbox_policy_swaps_total"), "{text}");
}

#[tokio::test]
async fn metrics_count_calls_by_op_and_errors_by_kind() {
    let app = App::memory().await;
    assert_eq!(
        app.send(exec("alice-1", "true")).await.status,
        StatusCode::OK
    );
    assert_eq!(app.send(exec("Alice-1", "true")).await.status.as_u16(), 400);
    let anonymous = Request::builder()
        .uri("/v1/backends")
        .body(Body::empty())
        .unwrap();
    assert_eq!(app.send(anonymous).await.status.as_u16(), 401);
    let text = app.metrics().await;
    for (name, value) in [
        (r#"sandbox_calls_total{op="exec"}"#, 2.0),
        (r#"sandbox_call_duration_seconds_count{op="exec"}"#, 2.0),
        (r#"sandbox_errors_total{kind="invalid-id"}"#, 1.0),
        (r#"sandbox_errors_total{kind="unauthorized"}"#, 1.0),
        ("sandbox_container_creations_total", 1.0),
        ("sandbox_containers", 1.0),
        ("sandbox_in_flight", 0.0),
    ] {
        assert_eq!(series(&text, name), Some(value), "{name} in {text}");
    }
}

// ---------------------------------------------------------------------------
// Thread ids, bodies and limits

#[tokio::test]
async fn an_invalid_thread_id_is_400_invalid_id_on_every_thread_route() {
    let app = App::memory().await;
    let thread_routes = ROUTES.iter().filter(|(_, r)| r.contains("{thread_id}"));
    for (method, route) in thread_routes {
        for bad in [
            "Alice-1",
            "..%2Fetc-1",
            "alice-",
            "-1",
            "a%20b-1",
            &"a".repeat(300),
        ] {
            let reply = app.send(sample(method, route, bad, "alice")).await;
            assert_eq!(
                reply.error(),
                (400, "invalid-id".into()),
                "{method} {route} with {bad}"
            );
        }
    }
    assert!(app.containers().await.is_empty());
    let left = workspaces(app.root.path());
    assert!(left.is_empty(), "no workspace for an invalid id: {left:?}");
}

#[tokio::test]
async fn an_invalid_user_id_is_400_invalid_id() {
    let app = App::memory().await;
    for bad in ["a%2Fb", "Alice", "..", "alice-1"] {
        let reply = app.send(delete(&format!("/v1/users/{bad}"))).await;
        assert_eq!(reply.error(), (400, "invalid-id".into()), "{bad}");
    }
}

#[tokio::test]
async fn a_malformed_exec_body_is_400_bad_request_on_both_exec_routes() {
    let app = App::memory().await;
    for route in ["exec", "exec/stream"] {
        for body in [
            r#"{"command":"#,
            "",
            "[]",
            "{}",
            r#"{"cmd":"true"}"#,
            r#"{"command":"true","extra":1}"#,
            r#"{"command":7}"#,
            r#"{"command":"true","timeout_secs":0}"#,
            r#"{"command":"true","timeout_secs":-1}"#,
            r#"{"command":"true","timeout_secs":86400}"#,
            r#"{"command":"true","env":{"A":1}}"#,
            // Bug guard: an unknown encoding must not fall back to text.
            r#"{"command":"true","encoding":"hex"}"#,
            r#"{"command":"true","encoding":"BASE64"}"#,
            r#"{"command":"true","stdin":"a","stdin_b64":"YQ=="}"#,
            r#"{"command":"true","stdin_b64":"not base64!"}"#,
        ] {
            let reply = app
                .send(post_json(&format!("/v1/threads/alice-1/{route}"), body))
                .await;
            assert_eq!(reply.error(), (400, "bad-request".into()), "{route} {body}");
        }
    }
    assert!(app.containers().await.is_empty());
}

#[tokio::test]
async fn a_json_body_without_a_json_content_type_is_415() {
    let app = App::memory().await;
    for route in ["exec", "exec/stream", "files"] {
        let method = if route == "files" { "PUT" } else { "POST" };
        let request = authed(method, &format!("/v1/threads/alice-1/{route}"))
            .header(header::CONTENT_TYPE, "text/plain")
            .body(Body::from(r#"{"command":"true"}"#))
            .unwrap();
        let reply = app.send(request).await;
        assert_eq!(reply.error(), (415, "bad-request".into()), "{route}");
    }
}

#[tokio::test]
async fn an_exec_outside_the_workspace_or_with_a_bad_variable_is_403_refused() {
    let app = App::memory().await;
    for body in [
        json!({"command": "true", "workdir": "/etc"}),
        json!({"command": "true", "workdir": "../.."}),
        json!({"command": "true", "env": {"A=B": "x"}}),
        json!({"command": "true\u{0}"}),
    ] {
        let reply = app
            .send(post_json("/v1/threads/alice-1/exec", body.to_string()))
            .await;
        assert_eq!(reply.error(), (403, "refused".into()), "{body}");
    }
}

#[tokio::test]
async fn a_body_over_the_limit_is_413_body_too_large_and_the_next_request_works() {
    let app = App::memory().await;
    let big = "x".repeat(BODY_LIMIT + 1);
    let exec_body = json!({ "command": big }).to_string();
    let upload_body = json!({"files": [{"path": "big", "content_b64": big}]}).to_string();
    for (method, route, body) in [
        ("POST", "exec", exec_body.clone()),
        ("POST", "exec/stream", exec_body),
        ("PUT", "files", upload_body),
    ] {
        let mut request = json_request(method, &format!("/v1/threads/alice-1/{route}"), "");
        request
            .headers_mut()
            .insert(header::CONTENT_LENGTH, body.len().into());
        *request.body_mut() = Body::from(body);
        let reply = app.send(request).await;
        assert_eq!(reply.error(), (413, "body-too-large".into()), "{route}");
        // The unread body makes hyper drop the connection: a pooling client
        // told nothing reused it and lost its next request.
        assert_eq!(
            reply.headers.get(header::CONNECTION).map(|v| v.as_bytes()),
            Some(&b"close"[..]),
            "{route}"
        );
    }
    let reply = app.send(exec("alice-1", "true")).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(reply.headers.get(header::CONNECTION).is_none());
    let metrics = app.metrics().await;
    assert_eq!(
        series(&metrics, r#"sandbox_errors_total{kind="body-too-large"}"#),
        Some(3.0),
        "{metrics}"
    );
}

// ---------------------------------------------------------------------------
// Exec

#[tokio::test]
async fn an_exec_answers_output_exit_code_truncated_and_timed_out() {
    let app = App::memory().await;
    let reply = app.send(exec("alice-1", "true")).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.content_type(), "application/json");
    assert_eq!(
        reply.exec_json(),
        json!({"output": "", "stdout": "", "stderr": "", "exit_code": 0, "truncated": false, "timed_out": false})
    );
    // Base64 adds each stream's exact bytes.
    let reply = app
        .send(post_json(
            "/v1/threads/alice-1/exec",
            r#"{"command":"true","encoding":"base64","stdin_b64":"AP8="}"#,
        ))
        .await;
    assert_eq!(
        reply.exec_json(),
        json!({
            "output": "", "stdout": "", "stderr": "", "stdout_b64": "", "stderr_b64": "",
            "exit_code": 0, "truncated": false, "timed_out": false,
        })
    );
    // The options are accepted in range.
    let body = json!({
        "command": "true",
        "timeout_secs": 0.5,
        "env": {"X": "y"},
        "workdir": "sub/dir",
        "stdin": "in",
    });
    let reply = app
        .send(post_json("/v1/threads/alice-1/exec", body.to_string()))
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(app.containers().await.len(), 1);
}

#[tokio::test]
async fn a_streamed_exec_answers_ndjson_ending_with_the_exit_line() {
    let app = App::memory().await;
    let reply = app
        .send(post_json(
            "/v1/threads/alice-1/exec/stream",
            r#"{"command":"true"}"#,
        ))
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.content_type(), "application/x-ndjson");
    assert!(reply.text().ends_with('\n'), "{}", reply.text());
    assert_eq!(
        reply.lines(),
        [
            json!({"type": "exit", "output": "", "stdout": "", "stderr": "", "exit_code": 0, "truncated": false, "timed_out": false})
        ]
    );
}

#[tokio::test]
async fn a_streamed_exec_refused_before_it_starts_is_a_json_error_not_a_stream() {
    let app = App::memory().await;
    let reply = app
        .send(post_json(
            "/v1/threads/Alice-1/exec/stream",
            r#"{"command":"true"}"#,
        ))
        .await;
    assert_eq!(reply.content_type(), "application/json");
    assert_eq!(reply.error(), (400, "invalid-id".into()));
}

#[tokio::test]
async fn a_streamed_exec_the_host_refuses_ends_with_an_error_line() {
    // The options are checked when the command starts, after the 200.
    let app = App::memory().await;
    let reply = app
        .send(post_json(
            "/v1/threads/alice-1/exec/stream",
            r#"{"command":"true","workdir":"/etc"}"#,
        ))
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    let lines = reply.lines();
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["type"], "error");
    assert_eq!(lines[0]["kind"], "refused");
    assert!(lines[0]["message"]
        .as_str()
        .is_some_and(|m| m.contains("/etc")));
    // Counted as a failed exec-stream call by the time the stream ended.
    let metrics = app.metrics().await;
    for (name, value) in [
        (r#"sandbox_calls_total{op="exec-stream"}"#, 1.0),
        (r#"sandbox_errors_total{kind="refused"}"#, 1.0),
    ] {
        assert_eq!(series(&metrics, name), Some(value), "{name} in {metrics}");
    }
}

// ---------------------------------------------------------------------------
// Files: the checks made before any container is touched

#[tokio::test]
async fn an_upload_with_bad_base64_is_400_bad_request_naming_the_file() {
    let app = App::memory().await;
    let body = json!({"files": [{"path": "notes/a.txt", "content_b64": "not base64!"}]});
    let reply = app
        .send(json_request(
            "PUT",
            "/v1/threads/alice-1/files",
            body.to_string(),
        ))
        .await;
    assert_eq!(reply.error(), (400, "bad-request".into()));
    let message = reply.json()["error"]["message"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(message.starts_with("notes/a.txt: base64"), "{message}");
    for body in [
        json!({"files": [{"path": "a", "content": "eA=="}]}),
        json!({"files": [{"path": "a", "content_b64": "eA==", "mode": "644"}]}),
        json!({"file": []}),
    ] {
        let reply = app
            .send(json_request(
                "PUT",
                "/v1/threads/alice-1/files",
                body.to_string(),
            ))
            .await;
        assert_eq!(reply.error(), (400, "bad-request".into()), "{body}");
    }
    assert!(app.containers().await.is_empty());
}

#[tokio::test]
async fn a_json_download_needs_at_least_one_path() {
    let app = App::memory().await;
    for query in ["", "?", "?paths=a", "?other=x&more=y"] {
        let reply = app
            .send(get(&format!("/v1/threads/alice-1/files{query}")))
            .await;
        assert_eq!(reply.error(), (400, "bad-request".into()), "{query:?}");
    }
}

#[tokio::test]
async fn the_raw_file_routes_take_exactly_one_path_and_nothing_else() {
    let app = App::memory().await;
    for query in [
        "",
        "?mode=644",
        "?path=a&path=b",
        "?path=a&mode=644&mode=600",
        "?path=a&other=x",
        "?file=a",
    ] {
        let uri = format!("/v1/threads/alice-1/files/raw{query}");
        let reply = app.send(get(&uri)).await;
        assert_eq!(reply.error(), (400, "bad-request".into()), "GET {query:?}");
        let reply = app.send(put_raw(&uri, b"x".to_vec())).await;
        assert_eq!(reply.error(), (400, "bad-request".into()), "PUT {query:?}");
    }
    assert!(app.containers().await.is_empty());
}

#[tokio::test]
async fn a_raw_upload_mode_must_be_octal_bits() {
    let app = App::memory().await;
    for mode in ["9", "rwx", "0x1ff", "-1", "", "77777777777"] {
        let uri = format!("/v1/threads/alice-1/files/raw?path=a&mode={mode}");
        let reply = app.send(put_raw(&uri, b"x".to_vec())).await;
        assert_eq!(reply.error(), (400, "bad-request".into()), "{mode:?}");
    }
}

#[tokio::test]
async fn a_raw_upload_without_content_length_is_411() {
    let app = App::memory().await;
    let request = authed("PUT", "/v1/threads/alice-1/files/raw?path=a")
        .body(Body::from("data"))
        .unwrap();
    let reply = app.send(request).await;
    assert_eq!(reply.error(), (411, "bad-request".into()));
    assert!(app.containers().await.is_empty());
}

#[tokio::test]
async fn a_raw_upload_over_the_file_cap_is_413_file_too_large_before_a_container_exists() {
    let app = App::memory_with(Options::default(), |c| c.max_file_bytes = 1000).await;
    let reply = app
        .send(put_raw(
            "/v1/threads/alice-1/files/raw?path=a",
            vec![b'x'; 1001],
        ))
        .await;
    assert_eq!(reply.error(), (413, "file_too_large".into()));
    assert!(app.containers().await.is_empty());
}

// ---------------------------------------------------------------------------
// Threads, users, backends, gc

#[tokio::test]
async fn get_thread_has_no_side_effects() {
    // The bug: 10,000 GETs left 10,000 workspace directories.
    let app = App::memory().await;
    for i in 0..20 {
        let reply = app.send(get(&format!("/v1/threads/u{i}-1"))).await;
        assert_eq!(reply.status, StatusCode::OK);
    }
    let reply = app.send(get("/v1/threads/u0-1")).await;
    assert_eq!(
        reply.json(),
        json!({"id": "u0", "user_id": "u0", "workspace": "u0", "container": null})
    );
    let left = workspaces(app.root.path());
    assert!(left.is_empty(), "nothing created: {left:?}");
    assert!(app.containers().await.is_empty());
}

#[tokio::test]
async fn get_thread_shows_the_container_once_a_command_ran() {
    let app = App::memory().await;
    assert_eq!(
        app.send(exec("alice-1", "true")).await.status,
        StatusCode::OK
    );
    let v = app.send(get("/v1/threads/alice-9")).await.json();
    assert_eq!(
        (&v["id"], &v["user_id"]),
        (&json!("alice"), &json!("alice"))
    );
    let container = &v["container"];
    assert_eq!(container["backend_id"], "alice", "{v}");
    assert_eq!(container["status"], "running", "{v}");
    assert_eq!(container["policy"], "per-user", "{v}");
}

#[tokio::test]
async fn destroying_a_thread_backend_answers_true_then_false() {
    let app = App::memory().await;
    assert_eq!(app.send(exec("bob-1", "true")).await.status, StatusCode::OK);
    // Any thread of bob names the same per-user backend.
    let reply = app.send(delete("/v1/threads/bob-9")).await;
    assert_eq!(
        (reply.status, reply.json()),
        (StatusCode::OK, json!({"destroyed": true}))
    );
    assert!(app.containers().await.is_empty());
    let reply = app.send(delete("/v1/threads/bob-9")).await;
    assert_eq!(reply.json(), json!({"destroyed": false}));
}

#[tokio::test]
async fn destroying_a_user_answers_true_then_false_and_spares_other_users() {
    let app = App::memory().await;
    for thread in ["alice-1", "bob-1"] {
        assert_eq!(app.send(exec(thread, "true")).await.status, StatusCode::OK);
    }
    let reply = app.send(delete("/v1/users/alice")).await;
    assert_eq!(
        (reply.status, reply.json()),
        (StatusCode::OK, json!({"destroyed": true}))
    );
    let reply = app.send(delete("/v1/users/alice")).await;
    assert_eq!(reply.json(), json!({"destroyed": false}));
    let left: Vec<_> = app
        .containers()
        .await
        .into_iter()
        .map(|c| c.backend_id.clone())
        .collect();
    assert_eq!(left, ["bob"]);
}

#[tokio::test]
async fn backends_lists_each_container_with_its_idle_time_and_the_policy() {
    let app = App::memory().await;
    let reply = app.send(get("/v1/backends")).await;
    assert_eq!(reply.json(), json!({"policy": "per-user", "backends": []}));
    for thread in ["alice-1", "bob-1", "bob-2"] {
        assert_eq!(app.send(exec(thread, "true")).await.status, StatusCode::OK);
    }
    let v = app.send(get("/v1/backends")).await.json();
    let backends = v["backends"].as_array().expect("a list");
    let mut ids: Vec<_> = backends
        .iter()
        .map(|b| b["backend_id"].as_str().unwrap())
        .collect();
    ids.sort();
    assert_eq!(ids, ["alice", "bob"]);
    for b in backends {
        let mut keys: Vec<_> = b.as_object().unwrap().keys().map(String::as_str).collect();
        keys.sort();
        assert_eq!(
            keys,
            [
                "backend_id",
                "created",
                "id",
                "idle_secs",
                "in_flight",
                "last_used_ms",
                "name",
                "policy",
                "profile",
                "status",
                "threads",
                "workspace"
            ]
        );
        assert!(b["idle_secs"].as_u64().is_some_and(|s| s < 60), "{b}");
        assert_eq!(b["in_flight"], 0, "{b}");
    }
}

#[tokio::test]
async fn a_policy_swap_switches_routing_live_and_gc_then_removes_the_old_policys_containers() {
    let app = App::memory().await;
    assert_eq!(
        app.send(exec("alice-1", "true")).await.status,
        StatusCode::OK
    );
    let swap = |bytes: &'static [u8]| {
        authed("POST", "/v1/policy")
            .header(header::CONTENT_TYPE, "application/wasm")
            .header("x-policy-name", "test upload")
            .body(Body::from(bytes))
            .unwrap()
    };
    let reply = app.send(swap(crate::policies::PER_THREAD)).await;
    assert_eq!(
        (reply.status, reply.json()),
        (StatusCode::OK, json!({"policy": "per-thread"}))
    );
    let reply = app.send(get("/v1/policy")).await;
    assert_eq!(reply.json(), json!({"policy": "per-thread"}));
    // A thread is its own backend now.
    let reply = app.send(get("/v1/threads/bob-1")).await;
    assert_eq!(reply.json()["id"], "bob-1");
    assert_eq!(app.send(exec("bob-1", "true")).await.status, StatusCode::OK);
    let reply = app.send(swap(crate::policies::PER_USER)).await;
    assert_eq!(reply.json(), json!({"policy": "per-user"}));

    // The per-thread container is the old policy's: listed, kept on a dry run.
    let reply = app
        .send(
            authed("POST", "/v1/gc?dry_run=true")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    let v = reply.json();
    assert_eq!(v["dry_run"], true);
    let found = v["containers"].as_array().unwrap();
    assert_eq!(found.len(), 1, "{v}");
    assert_eq!(found[0]["container"]["backend_id"], "bob-1");
    assert_eq!(found[0]["removed"], false);
    assert!(
        found[0]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("per-thread")),
        "{v}"
    );
    assert_eq!(app.containers().await.len(), 2);

    // Only the exact text `true` is a dry run.
    let reply = app
        .send(
            authed("POST", "/v1/gc?dry_run=1")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    let v = reply.json();
    assert_eq!(v["dry_run"], false);
    assert_eq!(v["containers"][0]["removed"], true, "{v}");
    let left: Vec<_> = app
        .containers()
        .await
        .into_iter()
        .map(|c| c.backend_id.clone())
        .collect();
    assert_eq!(left, ["alice"]);

    let metrics = app.metrics().await;
    assert_eq!(
        series(&metrics, "sandbox_policy_swaps_total"),
        Some(2.0),
        "{metrics}"
    );
}

#[tokio::test]
async fn gc_with_nothing_to_collect_answers_an_empty_list() {
    let app = App::memory().await;
    assert_eq!(
        app.send(exec("alice-1", "true")).await.status,
        StatusCode::OK
    );
    for uri in [
        "/v1/gc",
        "/v1/gc?dry_run=false",
        "/v1/gc?dry_run=true&other=1",
        // Any `true` among repeated keys makes the run dry.
        "/v1/gc?dry_run=false&dry_run=true",
    ] {
        let reply = app
            .send(authed("POST", uri).body(Body::empty()).unwrap())
            .await;
        assert_eq!(reply.status, StatusCode::OK, "{uri}");
        assert_eq!(
            reply.json(),
            json!({"dry_run": uri.contains("dry_run=true"), "containers": []}),
            "{uri}"
        );
    }
    assert_eq!(app.containers().await.len(), 1);
}

/// Issue 21: `POST /v1/gc` with `{"dry_run": true}` in the body ran a real
/// gc (only the query string was read).
#[tokio::test]
async fn gc_reads_dry_run_and_max_age_secs_from_a_json_body_and_refuses_any_other_body() {
    let app = App::memory().await;
    assert_eq!(
        app.send(exec("alice-1", "true")).await.status,
        StatusCode::OK
    );
    let gc = |content_type: Option<&str>, body: &str, query: &str| {
        let mut request = authed("POST", &format!("/v1/gc{query}"));
        if let Some(content_type) = content_type {
            request = request.header(header::CONTENT_TYPE, content_type);
        }
        request.body(Body::from(body.to_owned())).unwrap()
    };
    const JSON: Option<&str> = Some("application/json");
    // `max_age_secs: 0` makes every container old enough: a real run would
    // remove alice's.
    for (content_type, body, query) in [
        (JSON, r#"{"dry_run": true, "max_age_secs": 0}"#, ""),
        (
            Some("application/json; charset=utf-8"),
            r#"{"max_age_secs": 0, "dry_run": true}"#,
            "",
        ),
        (JSON, r#"{"dry_run": true}"#, "?max_age_secs=0"),
        (JSON, r#"{"max_age_secs": 0}"#, "?dry_run=true"),
        (
            JSON,
            r#"{"dry_run": false, "max_age_secs": 0}"#,
            "?dry_run=true",
        ),
    ] {
        let what = format!("{body} {query}");
        let reply = app.send(gc(content_type, body, query)).await;
        assert_eq!(reply.status, StatusCode::OK, "{what}: {}", reply.text());
        let v = reply.json();
        assert_eq!(v["dry_run"], true, "{what}: {v}");
        let found = v["containers"].as_array().expect("a list");
        assert_eq!(found.len(), 1, "{what}: {v}");
        assert_eq!(found[0]["removed"], false, "{what}: {v}");
        assert_eq!(found[0]["container"]["backend_id"], "alice", "{what}: {v}");
        assert_eq!(app.containers().await.len(), 1, "{what}");
    }
    for (content_type, body, query, status) in [
        (JSON, r#"{"max_age_secs": 0, "force": true}"#, "", 400),
        (JSON, r#"{"max_age_secs": 0, "dry_run": "no"}"#, "", 400),
        (JSON, r#"{"dry-run": false, "max_age_secs": 0}"#, "", 400),
        (JSON, "[]", "", 400),
        (JSON, "true", "", 400),
        (JSON, r#"{"max_age_secs": -1}"#, "", 400),
        (JSON, r#"{"max_age_secs": 0.5}"#, "", 400),
        (JSON, r#"{"max_age_secs": 315360001}"#, "", 400),
        (JSON, r#"{"max_age_secs": 0}"#, "?max_age_secs=0", 400),
        (None, "", "?max_age_secs=abc", 400),
        (None, "", "?max_age_secs=0&max_age_secs=1", 400),
        (Some("text/plain"), r#"{"max_age_secs": 0}"#, "", 415),
        (
            Some("application/x-www-form-urlencoded"),
            "max_age_secs=0",
            "",
            415,
        ),
        (None, r#"{"max_age_secs": 0}"#, "", 415),
    ] {
        let reply = app.send(gc(content_type, body, query)).await;
        assert_eq!(
            reply.error(),
            (status, "bad-request".into()),
            "{content_type:?} {body} {query}"
        );
    }
    assert_eq!(app.containers().await.len(), 1, "nothing was removed");
    // Whitespace is no body; a body that says run, runs.
    for body in ["", " \n"] {
        let reply = app.send(gc(None, body, "")).await;
        assert_eq!(reply.json(), json!({"dry_run": false, "containers": []}));
    }
    let reply = app.send(gc(JSON, r#"{"max_age_secs": 0}"#, "")).await;
    let v = reply.json();
    assert_eq!(
        (&v["dry_run"], &v["containers"][0]["removed"]),
        (&json!(false), &json!(true)),
        "{v}"
    );
    assert!(app.containers().await.is_empty());
}

// ---------------------------------------------------------------------------
// Policy

#[tokio::test]
async fn a_broken_component_is_refused_422_and_the_running_policy_stays() {
    let app = App::memory().await;
    for bytes in [&b"\0asm\x01\0\0\0"[..], b"", b"not wasm at all"] {
        let request = authed("POST", "/v1/policy")
            .header(header::CONTENT_TYPE, "application/wasm")
            .body(Body::from(bytes))
            .unwrap();
        let reply = app.send(request).await;
        assert_eq!(reply.error(), (422, "policy-load".into()), "{bytes:?}");
    }
    let reply = app.send(get("/v1/policy")).await;
    assert_eq!(reply.json(), json!({"policy": "per-user"}));
    let metrics = app.metrics().await;
    assert_eq!(series(&metrics, "sandbox_policy_swaps_total"), Some(0.0));
}

#[tokio::test]
async fn a_policy_upload_needs_a_server_started_with_a_token() {
    let app = App::memory_with(
        Options {
            token: None,
            ..Options::default()
        },
        |_| {},
    )
    .await;
    let request = Request::builder()
        .method("POST")
        .uri("/v1/policy")
        .header(header::HOST, "localhost")
        .body(Body::from(crate::policies::PER_THREAD))
        .unwrap();
    let reply = app.send(request).await;
    assert_eq!(reply.error(), (403, "refused".into()));
    assert_eq!(app.state.sandbox.policy_name(), "per-user");
}

#[tokio::test]
async fn a_policy_upload_over_the_body_limit_is_413() {
    let app = App::memory_with(
        Options {
            body_limit: 1000,
            ..Options::default()
        },
        |_| {},
    )
    .await;
    let request = authed("POST", "/v1/policy")
        .header(header::CONTENT_TYPE, "application/wasm")
        .body(Body::from(crate::policies::PER_THREAD))
        .unwrap();
    let reply = app.send(request).await;
    // The JSON error shape, as every other error (it was axum's plain text).
    assert_eq!(reply.error(), (413, "body-too-large".into()));
    assert_eq!(app.state.sandbox.policy_name(), "per-user");
}

// ---------------------------------------------------------------------------
// The access log

/// Issue 9: `sandbox serve` logged nothing per request, so an operator
/// could not tell which route, thread or user failed or was slow.
#[tokio::test]
async fn every_request_is_logged_once_with_route_status_duration_and_id() {
    let capture = Capture::global();
    let app = App::memory().await;
    let anonymous = Request::builder()
        .method("POST")
        .uri("/v1/threads/alice-1/exec")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from("{}"))
        .unwrap();
    let healthz = Request::builder()
        .uri("/healthz")
        .body(Body::empty())
        .unwrap();
    let cases = [
        (
            exec("alice-1", "echo hi"),
            200,
            "/v1/threads/{thread_id}/exec",
            Some(("thread_id", "alice-1")),
        ),
        (
            delete("/v1/users/alice"),
            200,
            "/v1/users/{user_id}",
            Some(("user_id", "alice")),
        ),
        (
            anonymous,
            401,
            "/v1/threads/{thread_id}/exec",
            Some(("thread_id", "alice-1")),
        ),
        (
            get("/v1/threads/..%2Fetc"),
            400,
            "/v1/threads/{thread_id}",
            Some(("thread_id", "../etc")),
        ),
        (healthz, 200, "/healthz", None),
        (get("/no/such/route"), 404, "(none)", None),
    ];
    for (req, status, route, id) in cases {
        let method = req.method().to_string();
        let before = capture.mine().len();
        let reply = app.send(req).await;
        assert_eq!(reply.status.as_u16(), status, "{route}");
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

mod options {
    #[test]
    fn a_public_address_needs_a_token() {
        let options = |listen: &str, token: Option<&str>| super::super::ServeOptions {
            listen: listen.parse().unwrap(),
            token: token.map(str::to_owned),
            body_limit_bytes: super::super::DEFAULT_BODY_LIMIT,
            policy_path: None,
            allowed_hosts: Vec::new(),
            grace: std::time::Duration::from_secs(1),
        };
        let err = options("0.0.0.0:8765", Some("")).check().unwrap_err();
        assert!(
            matches!(err, super::super::ServeError::TokenRequired { .. }),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            "refusing to listen on 0.0.0.0:8765 without a bearer token: set --token or \
             SANDBOX_TOKEN (only loopback addresses may run without one)"
        );
        assert!(options("0.0.0.0:8765", Some("t")).check().is_ok());
        assert!(options("127.0.0.1:8765", None).check().is_ok());
        assert!(options("[::1]:8765", None).check().is_ok());
    }
}

/// The workspaces under `root` (the host's state directory, `.sandbox`,
/// made at start, is not one).
fn workspaces(root: &std::path::Path) -> Vec<std::ffi::OsString> {
    std::fs::read_dir(root)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name())
                .filter(|n| n != ".sandbox")
                .collect()
        })
        .unwrap_or_default()
}

//! The routes whose answer only a real container can give (command output,
//! exit codes, timeouts, streaming, file contents and modes, shutdown of a
//! running command), still driven in process through the router, against
//! the Docker engine. Each test has its own namespace and workspace root
//! and removes its containers when it ends, pass or fail. Without a
//! reachable engine these tests fail with the reason; they never skip.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Once;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use base64::Engine as _;
use serde_json::{json, Value};

use super::{delete, exec, get, json_request, post_json, put_raw, series, App, Capture, Options};
use crate::config::{Config, DEFAULT_IMAGE};
use crate::ContainerProvider as _;
use crate::DockerProvider;
use crate::Sandbox;
use tower::ServiceExt as _;

/// The image the containers run: the integration tests' choice, so one
/// image serves both suites.
fn image() -> String {
    std::env::var("SANDBOX_TEST_IMAGE").unwrap_or_else(|_| DEFAULT_IMAGE.to_owned())
}

/// Panics unless the engine answers and the image exists (pulled or built
/// from the recipe when missing), once per test binary.
fn require_engine() {
    static READY: Once = Once::new();
    READY.call_once(|| {
        // On a thread of its own: tests call this inside their runtime.
        let setup = std::thread::spawn(|| {
            let runtime = tokio::runtime::Runtime::new().expect("a runtime");
            runtime.block_on(async {
                let provider = DockerProvider::new(Duration::from_secs(10));
                if let Err(e) = provider.ping().await {
                    panic!(
                        "the serve engine tests need a reachable Docker engine \
                         (DOCKER_HOST or /var/run/docker.sock): {e}"
                    );
                }
                crate::image::ensure(&provider, &image())
                    .await
                    .unwrap_or_else(|e| panic!("the test image is not available: {e:#}"));
            })
        });
        if let Err(panic) = setup.join() {
            std::panic::resume_unwind(panic);
        }
    });
}

/// An app on the Docker engine, in a namespace of its own whose containers
/// are removed on drop.
struct EngineApp {
    app: App,
    namespace: String,
}

impl std::ops::Deref for EngineApp {
    type Target = App;
    fn deref(&self) -> &App {
        &self.app
    }
}

impl EngineApp {
    async fn start(options: Options, tweak: impl FnOnce(&mut Config)) -> EngineApp {
        Capture::global();
        require_engine();
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let namespace = format!("ut-http-{}-{n}", std::process::id() % 100_000);
        let root = tempfile::tempdir().expect("temp workspace root");
        let mut config = Config {
            workspace_root: root.path().to_owned(),
            namespace: namespace.clone(),
            image: image(),
            component_cache_dir: Some(super::component_cache()),
            ..Config::default()
        };
        tweak(&mut config);
        let sandbox = Sandbox::new(config).await.expect("a sandbox on Docker");
        EngineApp {
            app: App::around(sandbox, root, options),
            namespace,
        }
    }

    async fn default() -> EngineApp {
        EngineApp::start(Options::default(), |_| {}).await
    }

    /// The command lines running in `user`'s container.
    fn processes(&self, user: &str) -> String {
        let name = format!("sandbox.{}.{user}", self.namespace);
        let out = std::process::Command::new("docker")
            .args(["exec", &name, "ps", "-o", "args"])
            .output()
            .expect("the docker CLI");
        assert!(out.status.success(), "docker exec {name} ps failed");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Waits up to 10 s for `command` to stop running in `user`'s container.
    async fn wait_gone(&self, user: &str, command: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.processes(user).contains(command) {
            assert!(
                Instant::now() < deadline,
                "{command:?} still runs: {}",
                self.processes(user)
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Drop for EngineApp {
    fn drop(&mut self) {
        let filter = format!("label=sandbox.namespace={}", self.namespace);
        let listed = std::process::Command::new("docker")
            .args(["ps", "-aq", "--filter", &filter])
            .output();
        let ids = match listed {
            Ok(out) => String::from_utf8_lossy(&out.stdout).into_owned(),
            Err(e) => {
                eprintln!("cannot list the containers of {}: {e}", self.namespace);
                return;
            }
        };
        let ids: Vec<&str> = ids.split_whitespace().collect();
        if !ids.is_empty() {
            let _ = std::process::Command::new("docker")
                .args(["rm", "-f"])
                .args(&ids)
                .output();
        }
    }
}

fn exec_with(thread: &str, body: Value) -> Request<Body> {
    post_json(&format!("/v1/threads/{thread}/exec"), body.to_string())
}

fn stream(thread: &str, body: Value) -> Request<Body> {
    post_json(
        &format!("/v1/threads/{thread}/exec/stream"),
        body.to_string(),
    )
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// A shutdown sequence whose grace period ends `after` from now.
fn grace_ending_after(after: Duration) -> tokio::sync::watch::Receiver<bool> {
    let (ended, shutdown) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        tokio::time::sleep(after).await;
        let _ = ended.send(true);
    });
    shutdown
}

// ---------------------------------------------------------------------------
// Exec

#[tokio::test]
async fn an_exec_answers_the_commands_output_and_exit_code_with_its_options() {
    let app = EngineApp::default().await;
    let reply = app
        .send(exec_with(
            "alice-1",
            json!({
                "command": "echo \"$X\"; pwd; cat; exit 3",
                "env": {"X": "y"},
                "workdir": "sub",
                "stdin": "in",
            }),
        ))
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(
        reply.exec_json(),
        json!({
            "output": "y\n/workspace/sub\nin",
            "stdout": "y\n/workspace/sub\nin",
            "stderr": "",
            "exit_code": 3,
            "truncated": false,
            "timed_out": false,
        })
    );
}

/// Bug: stdout and stderr came back only mixed in `output`, and bytes that
/// are not UTF-8 were replaced, so a deepagents client could neither tell
/// the streams apart nor get a binary's output back.
#[tokio::test]
async fn a_base64_exec_answers_each_streams_exact_bytes_beside_the_text() {
    let app = EngineApp::default().await;
    let command = "printf '\\377'; head -c 1 /dev/zero; sleep 0.2; printf err >&2";
    let reply = app
        .send(exec_with(
            "alice-1",
            json!({"command": command, "encoding": "base64"}),
        ))
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(
        reply.exec_json(),
        json!({
            "output": "\u{fffd}\u{0}err",
            "stdout": "\u{fffd}\u{0}",
            "stderr": "err",
            "stdout_b64": b64(b"\xff\x00"),
            "stderr_b64": b64(b"err"),
            "exit_code": 0,
            "truncated": false,
            "timed_out": false,
        })
    );
    // Text, the default: the same streams, no base64.
    let v = app
        .send(exec_with("alice-1", json!({"command": command})))
        .await
        .exec_json();
    assert_eq!(
        (&v["stdout"], &v["stderr"]),
        (&json!("\u{fffd}\u{0}"), &json!("err"))
    );
    assert!(
        v.get("stdout_b64").is_none() && v.get("stderr_b64").is_none(),
        "{v}"
    );

    // Binary stdin, every byte value, round-trips through cat.
    let all: Vec<u8> = (0..=255u8).collect();
    let v = app
        .send(exec_with(
            "alice-1",
            json!({"command": "cat", "stdin_b64": b64(&all), "encoding": "base64"}),
        ))
        .await
        .exec_json();
    assert_eq!(v["stdout_b64"], b64(&all), "{v}");
    assert_eq!(v["stderr_b64"], "", "{v}");
}

#[tokio::test]
async fn a_base64_stream_sends_data_b64_chunks_and_the_exact_bytes_at_exit() {
    let app = EngineApp::default().await;
    let reply = app
        .send(stream(
            "alice-1",
            json!({
                "command": "cat; sleep 0.2; printf err >&2; exit 5",
                "stdin_b64": b64(b"\x00\xfe\xff"),
                "encoding": "base64",
            }),
        ))
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    let lines = reply.lines();
    let (last, chunks) = lines.split_last().expect("at least the exit line");
    let of = |stream: &str| -> Vec<u8> {
        chunks
            .iter()
            .filter(|l| l["type"] == "output" && l["stream"] == stream)
            .flat_map(|l| {
                assert!(l.get("data").is_none(), "{l}");
                base64::engine::general_purpose::STANDARD
                    .decode(l["data_b64"].as_str().expect("data_b64"))
                    .unwrap()
            })
            .collect()
    };
    assert_eq!(of("stdout"), b"\x00\xfe\xff", "{lines:?}");
    assert_eq!(of("stderr"), b"err", "{lines:?}");
    assert_eq!(last["type"], "exit", "{lines:?}");
    assert_eq!(last["exit_code"], 5);
    assert_eq!(last["stdout_b64"], b64(b"\x00\xfe\xff"));
    assert_eq!(last["stderr_b64"], b64(b"err"));
    assert_eq!(last["stderr"], "err");
}

#[tokio::test]
async fn an_exec_past_its_timeout_answers_timed_out_with_exit_code_124() {
    let app = EngineApp::default().await;
    let started = Instant::now();
    let reply = app
        .send(exec_with(
            "alice-1",
            json!({"command": "echo start; sleep 30", "timeout_secs": 1}),
        ))
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(
        reply.exec_json(),
        json!({
            "output": "start\n",
            "stdout": "start\n",
            "stderr": "",
            "exit_code": 124,
            "truncated": false,
            "timed_out": true,
            "reason": "timeout",
        })
    );
    assert!(started.elapsed() < Duration::from_secs(20));
    app.wait_gone("alice", "sleep 30").await;
}

#[tokio::test]
async fn a_streamed_exec_sends_each_streams_output_then_the_exit_line() {
    let app = EngineApp::default().await;
    let reply = app
        .send(stream(
            "alice-1",
            json!({"command": "echo out; sleep 0.3; echo err >&2; exit 4"}),
        ))
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.content_type(), "application/x-ndjson");
    let lines = reply.lines();
    let (last, chunks) = lines.split_last().expect("at least the exit line");
    let of = |stream: &str| -> String {
        chunks
            .iter()
            .filter(|l| l["type"] == "output" && l["stream"] == stream)
            .map(|l| l["data"].as_str().unwrap())
            .collect()
    };
    assert_eq!(of("stdout"), "out\n", "{lines:?}");
    assert_eq!(of("stderr"), "err\n", "{lines:?}");
    assert!(chunks.iter().all(|l| l["type"] == "output"), "{lines:?}");
    assert_eq!(last["type"], "exit", "{lines:?}");
    assert_eq!(last["exit_code"], 4);
    assert_eq!(last["output"], "out\nerr\n");
    assert_eq!(
        (&last["stdout"], &last["stderr"]),
        (&json!("out\n"), &json!("err\n"))
    );
    assert!(last.get("stdout_b64").is_none(), "text by default: {last}");
}

#[tokio::test]
async fn a_streamed_exec_is_timed_until_its_command_ends() {
    // The bug: the exec-stream latency measured only the backend lookup.
    let app = EngineApp::default().await;
    // The container first, so the timed call is the command alone.
    assert_eq!(
        app.send(exec("alice-1", "true")).await.status,
        StatusCode::OK
    );
    let reply = app
        .send(stream(
            "alice-1",
            json!({"command": "sleep 1.5; echo done"}),
        ))
        .await;
    assert_eq!(reply.lines().last().unwrap()["type"], "exit");
    let metrics = app.metrics().await;
    assert_eq!(
        series(&metrics, r#"sandbox_calls_total{op="exec-stream"}"#),
        Some(1.0),
        "{metrics}"
    );
    let seconds = series(
        &metrics,
        r#"sandbox_call_duration_seconds_sum{op="exec-stream"}"#,
    )
    .expect("the exec-stream latency");
    assert!(seconds >= 1.4, "exec-stream timed at {seconds} s");
}

#[tokio::test]
async fn past_the_shutdown_grace_an_exec_answers_503_shutdown_and_its_command_dies() {
    let shutdown = grace_ending_after(Duration::from_secs(2));
    let app = EngineApp::start(
        Options {
            shutdown: Some(shutdown),
            ..Options::default()
        },
        |_| {},
    )
    .await;
    let started = Instant::now();
    let reply = app.send(exec("alice-1", "sleep 60; echo never")).await;
    assert_eq!(reply.error(), (503, "shutdown".into()));
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
    app.wait_gone("alice", "sleep 60").await;
}

#[tokio::test]
async fn past_the_shutdown_grace_a_streamed_exec_ends_with_a_shutdown_error_line() {
    let shutdown = grace_ending_after(Duration::from_secs(2));
    let app = EngineApp::start(
        Options {
            shutdown: Some(shutdown),
            ..Options::default()
        },
        |_| {},
    )
    .await;
    let reply = app
        .send(stream(
            "alice-1",
            json!({"command": "echo started; sleep 60"}),
        ))
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    let lines = reply.lines();
    let last = lines.last().expect("a last line");
    assert_eq!(
        (&last["type"], &last["kind"]),
        (&json!("error"), &json!("shutdown")),
        "{lines:?}"
    );
    assert_eq!(lines[0]["data"], "started\n", "{lines:?}");
    app.wait_gone("alice", "sleep 60").await;
    let metrics = app.metrics().await;
    assert_eq!(
        series(&metrics, r#"sandbox_errors_total{kind="shutdown"}"#),
        Some(1.0),
        "{metrics}"
    );
}

// ---------------------------------------------------------------------------
// JSON file batches

#[tokio::test]
async fn json_files_round_trip_with_their_modes_and_per_file_errors() {
    let app = EngineApp::default().await;
    let upload = json!({"files": [
        {"path": "a.bin", "content_b64": b64(&[0, 1, 255]), "mode": 0o640},
        {"path": "../x", "content_b64": b64(b"no")},
        {"path": "notes/n.txt", "content_b64": b64(b"text")},
        {"path": "dir/", "content_b64": b64(b"no")},
        {"path": "/tmp/t/t.bin", "content_b64": b64(&[7, 0])},
    ]});
    let reply = app
        .send(json_request(
            "PUT",
            "/v1/threads/alice-1/files",
            upload.to_string(),
        ))
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(
        reply.json(),
        json!({"results": [
            {"path": "a.bin", "error": null},
            // `/x`: the root directory is not the sandbox user's to write.
            {"path": "../x", "error": "permission_denied"},
            {"path": "notes/n.txt", "error": null},
            {"path": "dir/", "error": "invalid_path"},
            {"path": "/tmp/t/t.bin", "error": null},
        ]})
    );
    let reply = app
        .send(get(
            "/v1/threads/alice-2/files?path=a.bin&path=missing&path=/tmp/t/t.bin&path=notes&path=notes/n.txt",
        ))
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(
        reply.json(),
        json!({"results": [
            {"path": "a.bin", "content_b64": b64(&[0, 1, 255]), "mode": 0o640, "error": null},
            {"path": "missing", "content_b64": null, "mode": null, "error": "file_not_found"},
            {"path": "/tmp/t/t.bin", "content_b64": b64(&[7, 0]), "mode": 0o644, "error": null},
            {"path": "notes", "content_b64": null, "mode": null, "error": "is_directory"},
            {"path": "notes/n.txt", "content_b64": b64(b"text"), "mode": 0o644, "error": null},
        ]})
    );
}

#[tokio::test]
async fn a_json_download_batch_over_its_cap_fails_the_file_that_passes_it() {
    let app = EngineApp::start(Options::default(), |c| c.max_batch_bytes = 1000).await;
    let upload = json!({"files": [
        {"path": "a", "content_b64": b64(&[b'a'; 600])},
        {"path": "b", "content_b64": b64(&[b'b'; 600])},
    ]});
    let reply = app
        .send(json_request(
            "PUT",
            "/v1/threads/alice-1/files",
            upload.to_string(),
        ))
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let v = app
        .send(get("/v1/threads/alice-1/files?path=a&path=b"))
        .await
        .json();
    assert_eq!(v["results"][0]["content_b64"], b64(&[b'a'; 600]), "{v}");
    assert_eq!(v["results"][1]["error"], "file_too_large", "{v}");
    assert_eq!(v["results"][1]["content_b64"], Value::Null, "{v}");
}

// ---------------------------------------------------------------------------
// Raw file routes

#[tokio::test]
async fn raw_files_stream_both_ways_and_keep_their_mode() {
    let app = EngineApp::default().await;
    let content = b"\x00\xffdata".to_vec();
    let reply = app
        .send(put_raw(
            "/v1/threads/alice-1/files/raw?path=up/x.bin&mode=750",
            content.clone(),
        ))
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.json(), json!({"path": "up/x.bin", "size": 6}));
    let reply = app
        .send(get("/v1/threads/alice-1/files/raw?path=up/x.bin"))
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.content_type(), "application/octet-stream");
    assert_eq!(reply.body.to_vec(), content);
    let v = app
        .send(get("/v1/threads/alice-1/files?path=up/x.bin"))
        .await
        .json();
    assert_eq!(v["results"][0]["mode"], 0o750, "{v}");
    // `0o` spells the same bits.
    let reply = app
        .send(put_raw(
            "/v1/threads/alice-1/files/raw?path=up/y&mode=0o600",
            vec![],
        ))
        .await;
    assert_eq!(reply.json(), json!({"path": "up/y", "size": 0}));
    let reply = app
        .send(get("/v1/threads/alice-1/files/raw?path=up/y"))
        .await;
    assert_eq!((reply.status, reply.body.len()), (StatusCode::OK, 0));
    let v = app
        .send(get("/v1/threads/alice-1/files?path=up/y"))
        .await
        .json();
    assert_eq!(v["results"][0]["mode"], 0o600, "{v}");
}

#[tokio::test]
async fn a_raw_upload_is_bound_by_the_file_cap_not_by_the_json_body_limit() {
    let app = EngineApp::start(
        Options {
            body_limit: 1024,
            ..Options::default()
        },
        |_| {},
    )
    .await;
    let content: Vec<u8> = (0..256 * 1024).map(|i| (i % 251) as u8).collect();
    let reply = app
        .send(put_raw(
            "/v1/threads/alice-1/files/raw?path=big",
            content.clone(),
        ))
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.json()["size"], content.len());
    let reply = app
        .send(get("/v1/threads/alice-1/files/raw?path=big"))
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(reply.body.to_vec() == content, "the same bytes back");
    // The JSON upload of the same server is held to the body limit.
    let upload = json!({"files": [{"path": "small", "content_b64": b64(&content[..2048])}]});
    let reply = app
        .send(json_request(
            "PUT",
            "/v1/threads/alice-1/files",
            upload.to_string(),
        ))
        .await;
    assert_eq!(reply.error(), (413, "body-too-large".into()));
}

#[tokio::test]
async fn the_raw_routes_answer_each_file_error_with_its_status() {
    let app = EngineApp::start(Options::default(), |c| c.max_file_bytes = 1 << 20).await;
    let setup = app
        .send(exec(
            "alice-1",
            "truncate -s 2M big && mkdir d && : > empty",
        ))
        .await;
    assert_eq!(setup.json()["exit_code"], 0, "{}", setup.text());
    for (path, status, kind) in [
        ("missing", 404, "file_not_found"),
        ("d", 400, "is_directory"),
        ("big", 413, "file_too_large"),
        ("x/", 400, "invalid_path"),
        ("/", 400, "invalid_path"),
        ("/dev/null", 400, "invalid_path"),
    ] {
        let reply = app
            .send(get(&format!("/v1/threads/alice-1/files/raw?path={path}")))
            .await;
        assert_eq!(reply.error(), (status, kind.to_owned()), "GET {path}");
    }
    let reply = app
        .send(get("/v1/threads/alice-1/files/raw?path=empty"))
        .await;
    assert_eq!((reply.status, reply.body.len()), (StatusCode::OK, 0));
    for (path, status, kind) in [
        ("d", 400, "is_directory"),
        ("x/", 400, "invalid_path"),
        ("/etc/x", 403, "permission_denied"),
    ] {
        let reply = app
            .send(put_raw(
                &format!("/v1/threads/alice-1/files/raw?path={path}"),
                b"x".to_vec(),
            ))
            .await;
        assert_eq!(reply.error(), (status, kind.to_owned()), "PUT {path}");
    }
}

#[tokio::test]
async fn a_cancelled_execution_answers_130_cancelled_and_its_processes_die() {
    let app = EngineApp::default().await;
    assert_eq!(
        app.send(exec("alice-1", "true")).await.status,
        StatusCode::OK
    );
    let running = {
        let router = app.router.clone();
        tokio::spawn(async move {
            router
                .oneshot(exec_with(
                    "alice-1",
                    json!({"command": "(env -i sleep 61 &); sleep 62", "execution_id": "http-cancel-1"}),
                ))
                .await
                .unwrap()
        })
    };
    // Cancel once it runs (404 until it is registered).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let reply = app
            .send(delete("/v1/threads/alice-2/executions/http-cancel-1"))
            .await;
        if reply.status == StatusCode::OK {
            assert_eq!(reply.json(), json!({"cancelled": true}));
            break;
        }
        assert!(Instant::now() < deadline, "never running: {}", reply.text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let response = running.await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap();
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["exit_code"], 130, "{v}");
    assert_eq!(v["reason"], "cancelled", "{v}");
    assert_eq!(v["execution_id"], "http-cancel-1");
    app.wait_gone("alice", "sleep 6").await;
}

// ---------------------------------------------------------------------------
// The transfer budget

/// Issue 21: 32 parallel JSON uploads left 663 MB resident: nothing bounded
/// the content all requests held at once. An upload is charged as its body
/// arrives.
#[tokio::test]
async fn a_json_upload_past_the_transfer_budget_is_refused_503_with_retry_after() {
    let budget = 100 * 1024;
    let app = EngineApp::start(
        Options {
            budget: Some(budget),
            ..Options::default()
        },
        |_| {},
    )
    .await;
    let upload = |content: &[u8]| {
        json!({"files": [{"path": "a.txt", "content_b64": b64(content)}]}).to_string()
    };
    // The first upload's body arrives in two parts: the server holds the
    // first (80 KiB) while it waits for the rest.
    let first = upload(&[b'x'; 60 * 1024]);
    let (head, tail) = first.split_at(first.len() - 10);
    let (parts, rx) = tokio::sync::mpsc::channel::<Result<axum::body::Bytes, std::io::Error>>(2);
    parts
        .send(Ok(axum::body::Bytes::from(head.to_owned())))
        .await
        .unwrap();
    let request = json_request(
        "PUT",
        "/v1/threads/alice-1/files",
        Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx)),
    );
    let router = app.router.clone();
    let first_upload = tokio::spawn(async move { router.oneshot(request).await });
    let deadline = Instant::now() + Duration::from_secs(10);
    while app.state.budget.in_use() < head.len() {
        assert!(Instant::now() < deadline, "the head was not read");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // A second one (40 KiB of body) does not fit beside it.
    let second = upload(&[b'y'; 30 * 1024]);
    let reply = app
        .send(json_request(
            "PUT",
            "/v1/threads/alice-1/files",
            second.clone(),
        ))
        .await;
    assert_eq!(
        reply.error(),
        (503, "overloaded".into()),
        "{}",
        reply.text()
    );
    assert_eq!(reply.headers[axum::http::header::RETRY_AFTER], "1");
    assert!(app.state.budget.in_use() <= budget);
    // The first completes, and gives its charge back.
    parts
        .send(Ok(axum::body::Bytes::from(tail.to_owned())))
        .await
        .unwrap();
    drop(parts);
    let response = first_upload.await.unwrap().unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(app.state.budget.in_use(), 0);
    let reply = app
        .send(json_request("PUT", "/v1/threads/alice-1/files", second))
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    // (Streamed: a JSON download's cap alone is more than this budget.)
    let reply = app
        .send(get("/v1/threads/alice-1/files/raw?path=a.txt"))
        .await;
    assert!(
        reply.body[..] == [b'y'; 30 * 1024],
        "the second upload's content"
    );
    // One larger than the whole budget never fits.
    let reply = app
        .send(json_request(
            "PUT",
            "/v1/threads/alice-1/files",
            upload(&[b'z'; 90 * 1024]),
        ))
        .await;
    assert_eq!(reply.error(), (503, "overloaded".into()));
    assert_eq!(app.state.budget.in_use(), 0);
    let metrics = app.metrics().await;
    assert_eq!(
        series(&metrics, r#"sandbox_errors_total{kind="overloaded"}"#),
        Some(2.0),
        "{metrics}"
    );
}

/// Issue 21: 64 parallel 16 MiB JSON downloads took serve to 1.5 GB. Each
/// download is charged its batch's cap (here 1 MiB) before it starts, then
/// its content (512 KiB) until its answer has been sent: in a 3 MiB budget
/// at most 5 answers are held at once, whatever the order.
#[tokio::test]
async fn parallel_json_downloads_stay_within_the_transfer_budget() {
    let budget = 3 * 1024 * 1024;
    let app = EngineApp::start(
        Options {
            budget: Some(budget),
            ..Options::default()
        },
        |c| c.max_batch_bytes = 1024 * 1024,
    )
    .await;
    let content: Vec<u8> = (0..512 * 1024).map(|i| (i % 251) as u8).collect();
    let reply = app
        .send(put_raw(
            "/v1/threads/alice-1/files/raw?path=big.bin",
            content.clone(),
        ))
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let peak = std::sync::Arc::new(AtomicUsize::new(0));
    let sampler = {
        let (peak, state) = (peak.clone(), app.state.clone());
        tokio::spawn(async move {
            loop {
                peak.fetch_max(state.budget.in_use(), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
    };
    let downloads: Vec<_> = (0..12)
        .map(|_| {
            let router = app.router.clone();
            tokio::spawn(async move {
                router
                    .oneshot(get("/v1/threads/alice-1/files?path=big.bin"))
                    .await
                    .unwrap()
            })
        })
        .collect();
    // The answers are held, unread, like slow clients' would be.
    let mut answered = Vec::new();
    for download in downloads {
        answered.push(download.await.unwrap());
    }
    sampler.abort();
    let (ok, refused): (Vec<_>, Vec<_>) = answered
        .into_iter()
        .partition(|r| r.status() == StatusCode::OK);
    assert!(
        (1..=5).contains(&ok.len()),
        "{} downloads answered at once in a 3 MiB budget",
        ok.len()
    );
    for r in &refused {
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers()[axum::http::header::RETRY_AFTER], "1");
    }
    assert!(peak.load(Ordering::Relaxed) <= budget, "peak {peak:?}");
    assert_eq!(app.state.budget.in_use(), ok.len() * content.len());
    for r in ok {
        let body = axum::body::to_bytes(r.into_body(), usize::MAX)
            .await
            .unwrap();
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert!(
            v["results"][0]["content_b64"] == b64(&content),
            "the content"
        );
    }
    for r in refused {
        let body = axum::body::to_bytes(r.into_body(), usize::MAX)
            .await
            .unwrap();
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"]["kind"], "overloaded", "{v}");
    }
    assert_eq!(app.state.budget.in_use(), 0, "every charge given back");
    let reply = app
        .send(get("/v1/threads/alice-1/files?path=big.bin"))
        .await;
    assert_eq!(reply.status, StatusCode::OK);
}

/// A GET goes through a container that runs, and never re-creates one
/// that stopped (the policy would): its files are `file_not_found` until
/// the next command brings the container back.
#[tokio::test]
async fn a_download_reads_through_a_running_container_and_never_restarts_a_stopped_one() {
    let app = EngineApp::default().await;
    let reply = app
        .send(exec_with(
            "alice-1",
            json!({"command": "echo hi > note.txt"}),
        ))
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let reply = app
        .send(get("/v1/threads/alice-2/files?path=note.txt"))
        .await;
    assert_eq!(reply.json()["results"][0]["content_b64"], b64(b"hi\n"));
    let reply = app
        .send(get("/v1/threads/alice-2/files/raw?path=note.txt"))
        .await;
    assert_eq!(
        (reply.status, reply.text()),
        (StatusCode::OK, "hi\n".into())
    );
    let name = format!("sandbox.{}.alice", app.namespace);
    let stopped = std::process::Command::new("docker")
        .args(["stop", "-t", "0", &name])
        .output()
        .expect("the docker CLI");
    assert!(stopped.status.success(), "docker stop {name}");
    let reply = app
        .send(get("/v1/threads/alice-2/files?path=note.txt"))
        .await;
    assert_eq!(reply.json()["results"][0]["error"], "file_not_found");
    let reply = app
        .send(get("/v1/threads/alice-2/files/raw?path=note.txt"))
        .await;
    assert_eq!(reply.error(), (404, "file_not_found".into()));
    let containers = app.containers().await;
    assert_eq!(containers.len(), 1);
    assert_ne!(
        containers[0].status,
        crate::Status::Running,
        "not restarted"
    );
}

/// A dev server in a sandbox whose network is `none`, previewed through
/// the ports route: its answer with the sandboxing CSP (what the server is
/// sent is `ports.rs`'s unit test); no server on the port is 502; a previewed page (`Origin: null`) may call
/// its own server but not the API.
#[tokio::test]
async fn a_dev_server_in_a_sandbox_is_previewed_through_the_ports_route() {
    let app = EngineApp::default().await;
    let started = app
        .send(exec(
            "alice-1",
            "mkdir -p www && echo hello-preview > www/index.html && \
             (httpd -f -p 127.0.0.1:8080 -h www >/dev/null 2>&1 &) && \
             sleep 0.3",
        ))
        .await;
    assert_eq!(started.status, StatusCode::OK, "{}", started.text());

    for uri in [
        "/v1/threads/alice-1/ports/8080/index.html",
        "/v1/threads/alice-1/ports/8080/",
        "/v1/threads/alice-2/ports/8080/index.html?x=1",
    ] {
        let reply = app.send(get(uri)).await;
        assert_eq!(reply.status, StatusCode::OK, "{uri}: {}", reply.text());
        assert_eq!(reply.text(), "hello-preview\n", "{uri}");
        assert_eq!(
            reply.headers["content-security-policy"],
            "sandbox allow-scripts allow-forms allow-popups",
            "{uri}"
        );
    }

    // A thread without a running sandbox: nothing is created for it.
    let reply = app.send(get("/v1/threads/carol-1/ports/8080/")).await;
    assert_eq!(reply.error().0, 502, "{}", reply.text());
    assert!(
        reply.text().contains("no running sandbox"),
        "{}",
        reply.text()
    );
    let reply = app.send(get("/v1/threads/alice-1/ports/9/")).await;
    assert_eq!(reply.error().0, 502, "{}", reply.text());
    assert!(reply.text().contains("port 9"), "{}", reply.text());
    let reply = app.send(get("/v1/threads/alice-1/ports/0/")).await;
    assert_eq!(reply.error(), (400, "bad-request".into()));

    let from_preview = |uri: &str| {
        let mut request = get(uri);
        request
            .headers_mut()
            .insert(axum::http::header::ORIGIN, "null".parse().unwrap());
        request
    };
    let reply = app.send(from_preview("/v1/backends")).await;
    assert_eq!(reply.error(), (403, "forbidden-origin".into()));
    let reply = app
        .send(from_preview("/v1/threads/alice-1/ports/8080/index.html"))
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());

    // A link a browser opens without the token, until it expires.
    let made = app
        .send(post_json(
            "/v1/previews",
            json!({"thread_id": "alice-1", "port": 8080, "ttl_secs": 2}).to_string(),
        ))
        .await;
    assert_eq!(made.status, StatusCode::OK, "{}", made.text());
    let url = made.json()["url"].as_str().unwrap().to_owned();
    assert!(
        url.starts_with("/v1/previews/") && url.ends_with('/'),
        "{url}"
    );
    let bare = |uri: &str| Request::builder().uri(uri).body(Body::empty()).unwrap();
    let reply = app.send(bare(&format!("{url}index.html"))).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.text(), "hello-preview\n");
    let tampered = url.replacen("/v1/previews/", "/v1/previews/x", 1);
    let reply = app.send(bare(&format!("{tampered}index.html"))).await;
    assert_eq!(reply.error().0, 403, "{}", reply.text());
    for (body, why) in [
        (json!({"thread_id": "alice-1", "port": 0}), "port"),
        (
            json!({"thread_id": "alice-1", "port": 80, "ttl_secs": 0}),
            "ttl",
        ),
        (json!({"thread_id": "Alice-1", "port": 80}), "thread"),
    ] {
        let reply = app.send(post_json("/v1/previews", body.to_string())).await;
        assert_eq!(reply.error().0, 400, "{why}: {}", reply.text());
    }
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let reply = app.send(bare(&format!("{url}index.html"))).await;
    assert_eq!(reply.error().0, 403, "expired: {}", reply.text());
}

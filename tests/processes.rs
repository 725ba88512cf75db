//! Background processes and terminals against the real engine: a server
//! started in the background is reached with network `none`; processes are
//! listed, followed, fed and killed (whole trees); output past the kept
//! head and tail says what it dropped; another user sees none of them; a
//! new host process finds them; a terminal has a real PTY (size, resize,
//! Ctrl-C, exit code); running processes spare an idle sandbox for the
//! keep-alive and no longer; a destroy gives them SIGTERM and its grace.

mod support;

use std::time::{Duration, Instant};

use sandbox_host::exec::StreamKind;
use sandbox_host::processes::{ProcessId, ProcessOptions, ProcessOutput, Signal, TerminalSize};
use sandbox_host::{Backend, SandboxError};
use support::Harness;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn id(info: &sandbox_host::processes::ProcessInfo) -> ProcessId {
    info.id.parse().unwrap()
}

/// Reads a process's output until `done(stdout so far)` or it ended, for
/// up to 20 s: the stdout and the last answer.
async fn read_until(
    backend: &Backend,
    id: &ProcessId,
    done: impl Fn(&str) -> bool,
) -> (String, ProcessOutput) {
    let mut offsets = (0, 0);
    let mut stdout = Vec::new();
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        let output = backend
            .process_output(id, offsets, Duration::from_secs(2))
            .await
            .unwrap();
        offsets = output.next_offsets(offsets);
        for chunk in &output.chunks {
            if chunk.stream == StreamKind::Stdout {
                stdout.extend_from_slice(&chunk.data);
            }
        }
        let text = String::from_utf8_lossy(&stdout).into_owned();
        if done(&text) || (output.chunks.is_empty() && !output.info.running) {
            return (text, output);
        }
        assert!(Instant::now() < until, "timed out; stdout so far: {text:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn background_processes_are_listed_followed_fed_and_killed() {
    let h = Harness::new("procs");
    let sandbox = h.sandbox().await;
    let alice = sandbox.get_thread_backend("alice-1").await.unwrap();
    let r = alice
        .execute("mkdir -p www && echo background-page > www/index.html")
        .await
        .unwrap();
    assert_eq!(r.exit_code, 0, "{r:?}");

    // A server that outlives its request, reached with network none.
    let httpd = alice
        .start_process(
            "busybox httpd -f -p 127.0.0.1:8080 -h www",
            ProcessOptions::default(),
        )
        .await
        .unwrap();
    assert!(httpd.running, "{httpd:?}");
    assert_eq!(httpd.id.len(), 32);
    let mut page = String::new();
    for _ in 0..50 {
        if let Ok(mut conn) = alice.connect_port(8080).await {
            conn.write_all(b"GET /index.html HTTP/1.0\r\n\r\n")
                .await
                .unwrap();
            page.clear();
            conn.read_to_string(&mut page).await.unwrap();
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(page.contains("background-page"), "{page}");

    // stdin: written, then closed; the output followed to the end.
    let cat = alice
        .start_process(
            "id -u; cat; echo done >&2; exit 3",
            ProcessOptions::default(),
        )
        .await
        .unwrap();
    let cat_id = id(&cat);
    alice
        .write_process(&cat_id, Some(b"hello\n".to_vec()))
        .await
        .unwrap();
    alice.write_process(&cat_id, None).await.unwrap();
    let (stdout, last) = read_until(&alice, &cat_id, |_| false).await;
    let mut lines = stdout.lines();
    let uid = lines.next().unwrap();
    assert_ne!(uid, "0", "processes run as the sandbox user");
    assert_eq!(lines.collect::<Vec<_>>(), ["hello"]);
    assert_eq!(last.info.exit_code, Some(3), "{last:?}");
    assert_eq!(last.info.stderr_bytes, 5);
    let err = alice
        .write_process(&cat_id, Some(b"late".to_vec()))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("has ended"), "{err}");

    // A long output keeps its head and tail, and says where it skipped.
    let long = alice
        .start_process(
            "head -c 1000000 /dev/zero | tr '\\0' x; echo; echo tail-mark",
            ProcessOptions::default(),
        )
        .await
        .unwrap();
    let long_id = id(&long);
    let (_, last) = read_until(&alice, &long_id, |_| false).await;
    assert_eq!(last.info.stdout_bytes, 1_000_011, "{:?}", last.info);
    // One read answers the head, then the tail where it starts.
    let read = alice
        .process_output(&long_id, (0, 0), Duration::ZERO)
        .await
        .unwrap();
    let head_end = read.chunks[0].offset + read.chunks[0].data.len() as u64;
    assert_eq!(
        (read.chunks[0].offset, head_end),
        (0, 16 * 1024),
        "the head"
    );
    assert_eq!(
        read.chunks[1].offset,
        1_000_011 - 256 * 1024,
        "the tail starts past the dropped middle"
    );
    let (tail, _) = read_until(&alice, &long_id, |_| false).await;
    assert!(
        tail.ends_with("x\ntail-mark\n"),
        "{}",
        &tail[tail.len() - 20..]
    );

    // A kill ends the whole tree, background children included.
    let tree = alice
        .start_process(
            "sleep 1001 & sleep 1002 & sleep 1003",
            ProcessOptions::default(),
        )
        .await
        .unwrap();
    let tree_id = id(&tree);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let listed = alice.processes().await.unwrap();
    let ids: Vec<&str> = listed.iter().map(|p| p.id.as_str()).collect();
    for p in [&httpd, &cat, &long, &tree] {
        assert!(ids.contains(&p.id.as_str()), "{ids:?}");
    }
    alice.signal_process(&tree_id, Signal::KILL).await.unwrap();
    let (_, last) = read_until(&alice, &tree_id, |_| false).await;
    assert_eq!(last.info.exit_code, Some(137));
    let r = alice
        .execute("ps -o args | grep -c '^sleep 100'")
        .await
        .unwrap();
    assert_eq!(r.output.trim(), "0", "no sleep left: {r:?}");

    // TERM reaches httpd, which ends.
    let httpd_id = id(&httpd);
    alice
        .signal_process(&httpd_id, "TERM".parse().unwrap())
        .await
        .unwrap();
    let (_, last) = read_until(&alice, &httpd_id, |_| false).await;
    assert!(!last.info.running, "{last:?}");

    // Another user sees none of them, and cannot name one.
    let bob = sandbox.get_thread_backend("bob-1").await.unwrap();
    bob.execute("true").await.unwrap();
    assert!(bob.processes().await.unwrap().is_empty());
    let err = bob
        .process_output(&cat_id, (0, 0), Duration::ZERO)
        .await
        .unwrap_err();
    assert!(matches!(err, SandboxError::NotFound(_)), "{err:?}");
    let err = bob.signal_process(&cat_id, Signal::KILL).await.unwrap_err();
    assert!(matches!(err, SandboxError::NotFound(_)), "{err:?}");

    // A process removed right after its start (a client gone at once)
    // takes its whole tree with it, though its children were starting.
    let quick = alice
        .start_process("sleep 2001 & sleep 2002", ProcessOptions::default())
        .await
        .unwrap();
    alice.remove_process(&id(&quick)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = alice
        .execute("ps -o args | grep -c '^sleep 200'")
        .await
        .unwrap();
    assert_eq!(r.output.trim(), "0", "no sleep left: {r:?}");

    // A new host process (a restarted server, another CLI) finds them.
    let again = h.sandbox().await;
    let alice_again = again.get_thread_backend("alice-2").await.unwrap();
    let listed = alice_again.processes().await.unwrap();
    assert!(listed.iter().any(|p| p.id == cat.id), "{listed:?}");
    alice_again.remove_process(&cat_id).await.unwrap();
    let listed = alice.processes().await.unwrap();
    assert!(!listed.iter().any(|p| p.id == cat.id), "{listed:?}");
    let err = alice.remove_process(&cat_id).await.unwrap_err();
    assert!(matches!(err, SandboxError::NotFound(_)), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_terminal_has_a_pty_that_resizes_and_takes_ctrl_c() {
    let h = Harness::new("pty");
    let sandbox = h.sandbox().await;
    let alice = sandbox.get_thread_backend("alice-1").await.unwrap();
    let options = ProcessOptions {
        terminal: Some(TerminalSize { rows: 24, cols: 80 }),
        ..ProcessOptions::default()
    };
    let shell = alice.start_process("sh -i", options).await.unwrap();
    assert!(shell.terminal);
    let shell_id = id(&shell);
    let typed = |text: &str| Some(text.as_bytes().to_vec());
    alice
        .write_process(&shell_id, typed("tty; stty size\n"))
        .await
        .unwrap();
    let (out, _) = read_until(&alice, &shell_id, |o| o.contains("24 80")).await;
    assert!(out.contains("/dev/pts/"), "{out}");
    alice
        .resize_process(
            &shell_id,
            TerminalSize {
                rows: 50,
                cols: 132,
            },
        )
        .await
        .unwrap();
    alice
        .write_process(&shell_id, typed("stty size\n"))
        .await
        .unwrap();
    read_until(&alice, &shell_id, |o| o.contains("50 132")).await;
    // Ctrl-C reaches the foreground process, not the shell.
    alice
        .write_process(&shell_id, typed("sleep 1000\n"))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // Keys as a person types them: Ctrl-C, then the next line. (gVisor's
    // terminal does not turn Ctrl-C into SIGINT for this shell: there the
    // signal goes through the API, as a client would send it.)
    if support::test_runtime().is_some() {
        alice
            .signal_process(&shell_id, "INT".parse().unwrap())
            .await
            .unwrap();
    } else {
        alice.write_process(&shell_id, typed("\x03")).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    alice
        .write_process(&shell_id, typed("echo after-$?\n"))
        .await
        .unwrap();
    let (out, last) = read_until(&alice, &shell_id, |o| o.contains("after-130")).await;
    assert!(out.contains("after-130"), "{out}");
    assert!(last.info.running, "the shell survived Ctrl-C");
    alice
        .write_process(&shell_id, typed("exit 7\n"))
        .await
        .unwrap();
    let (_, last) = read_until(&alice, &shell_id, |_| false).await;
    assert_eq!(last.info.exit_code, Some(7), "{last:?}");
    // A paste bigger than a terminal's input buffer, into a program busy
    // elsewhere: the write is queued, not waited for, and all of it arrives.
    let busy = alice
        .start_process(
            "stty -echo; sleep 2; head -c 100000 >/dev/null; echo got-all",
            ProcessOptions {
                terminal: Some(TerminalSize { rows: 24, cols: 80 }),
                ..ProcessOptions::default()
            },
        )
        .await
        .unwrap();
    let line = format!("{}\n", "p".repeat(999));
    let started = Instant::now();
    alice
        .write_process(&id(&busy), Some(line.repeat(100).into_bytes()))
        .await
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    let (out, last) = read_until(&alice, &id(&busy), |o| o.contains("got-all")).await;
    assert!(out.contains("got-all"), "{out}");
    assert!(!last.info.running || out.contains("got-all"));
    // Pipes cannot be resized.
    let plain = alice
        .start_process("sleep 5", ProcessOptions::default())
        .await
        .unwrap();
    let err = alice
        .resize_process(&id(&plain), TerminalSize { rows: 5, cols: 5 })
        .await
        .unwrap_err();
    assert!(err.to_string().contains("no terminal"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_running_process_spares_an_idle_sandbox_for_the_keep_alive_only() {
    let h = Harness::new("keepalive");
    let mut config = h.config();
    config
        .policy_config
        .insert("idle_ttl_secs".into(), "1".into());
    config.process_keep_alive_secs = 4.0;
    let sandbox = h.sandbox_of(config).await;
    let alice = sandbox.get_thread_backend("alice-1").await.unwrap();
    alice
        .start_process("sleep 1000", ProcessOptions::default())
        .await
        .unwrap();
    let bob = sandbox.get_thread_backend("bob-1").await.unwrap();
    bob.execute("true").await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // Both idle past the TTL: bob goes, alice's running process keeps hers.
    sandbox.maintain(false).await.unwrap();
    let names: Vec<String> = h.containers().into_iter().map(|c| c.0).collect();
    assert_eq!(names.len(), 1, "{names:?}");
    assert!(names[0].contains("alice"), "{names:?}");
    // Past the keep-alive after her last request, it goes too.
    tokio::time::sleep(Duration::from_secs(4)).await;
    sandbox.maintain(false).await.unwrap();
    assert!(h.containers().is_empty(), "{:?}", h.containers());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_destroy_sends_sigterm_and_gives_the_grace() {
    let h = Harness::new("procdestroy");
    let sandbox = h.sandbox().await;
    let alice = sandbox.get_thread_backend("alice-1").await.unwrap();
    alice
        .start_process(
            "trap 'echo got-term > /workspace/term.txt; exit 0' TERM; \
             while true; do sleep 0.1; done",
            ProcessOptions::default(),
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    assert!(sandbox.destroy_user_backend("alice").await.unwrap());
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "no full grace needed"
    );
    assert!(h.containers().is_empty());
    let file = h.root.path().join("alice").join("term.txt");
    let text = std::fs::read_to_string(&file).unwrap_or_default();
    assert_eq!(text.trim(), "got-term", "{}", file.display());
}

/// The HTTP face: start, list, follow (NDJSON) to the end, stdin; and a
/// terminal over the WebSocket route, with resize, Ctrl-C and exit code.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn processes_and_a_terminal_over_http() {
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::Message;

    let h = Harness::new("prochttp");
    let sandbox = h.sandbox().await;
    let state = std::sync::Arc::new(sandbox_host::serve::AppState::new(
        sandbox.clone(),
        Some("t0ken".into()),
    ));
    let app = sandbox_host::serve::router(state, 1 << 20);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let served = tokio::spawn(async move { axum::serve(listener, app).await });
    let base = format!("http://{address}/v1/threads/alice-1");
    let http = |method: &str, path: &str, body: Option<&str>| {
        let mut cmd = std::process::Command::new("curl");
        cmd.args([
            "-sS",
            "-N",
            "-X",
            method,
            "-H",
            "Authorization: Bearer t0ken",
        ]);
        cmd.args(["-w", "\n%{http_code}", &format!("{base}{path}")]);
        if let Some(body) = body {
            cmd.args(["-H", "Content-Type: application/json", "-d", body]);
        }
        let out = cmd.output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap();
        (code.to_owned(), body.to_owned())
    };
    let curl = |method: &'static str, path: String, body: Option<String>| {
        let http = &http;
        async move {
            let (p, b) = (path.clone(), body.clone());
            tokio::task::block_in_place(|| http(method, &p, b.as_deref()))
        }
    };
    let (code, body) = curl(
        "POST",
        "/processes".into(),
        Some(r#"{"command": "read line; echo got-$line; echo bye >&2"}"#.into()),
    )
    .await;
    assert_eq!(code, "201", "{body}");
    let started: serde_json::Value = serde_json::from_str(&body).unwrap();
    let pid = started["id"].as_str().unwrap().to_owned();
    let (code, body) = curl("GET", "/processes".into(), None).await;
    assert_eq!(code, "200", "{body}");
    assert!(body.contains(&pid), "{body}");
    let (code, body) = curl(
        "POST",
        format!("/processes/{pid}/stdin"),
        Some(r#"{"data": "x1\n", "close": true}"#.into()),
    )
    .await;
    assert_eq!(code, "204", "{body}");
    let (code, body) = curl("GET", format!("/processes/{pid}?follow=true"), None).await;
    assert_eq!(code, "200", "{body}");
    let lines: Vec<serde_json::Value> = body
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let text: String = lines
        .iter()
        .filter(|l| l["type"] == "output" && l["stream"] == "stdout")
        .map(|l| l["data"].as_str().unwrap())
        .collect();
    assert_eq!(text, "got-x1\n", "{body}");
    let last = lines.last().unwrap();
    assert_eq!(last["type"], "exit", "{body}");
    assert_eq!(last["process"]["exit_code"], 0, "{body}");
    assert_eq!(last["process"]["stderr_bytes"], 4, "{body}");
    let (code, _) = curl("DELETE", format!("/processes/{pid}"), None).await;
    assert_eq!(code, "204");
    let (code, body) = curl("GET", format!("/processes/{pid}"), None).await;
    assert_eq!(code, "404", "{body}");
    let (code, body) = curl("GET", "/processes/not-an-id".into(), None).await;
    assert_eq!(code, "400", "{body}");

    // A terminal over the WebSocket.
    let mut request =
        format!("ws://{address}/v1/threads/alice-1/pty?rows=30&cols=100&command=sh%20-i")
            .into_client_request()
            .unwrap();
    request
        .headers_mut()
        .insert("Authorization", "Bearer t0ken".parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    let mut screen = String::new();
    let mut exit = None;
    ws.send(Message::Binary(b"stty size\n".to_vec().into()))
        .await
        .unwrap();
    screen_until(&mut ws, &mut screen, "30 100").await;
    ws.send(Message::Text(
        r#"{"type":"resize","rows":40,"cols":120}"#.into(),
    ))
    .await
    .unwrap();
    ws.send(Message::Binary(b"stty size; sleep 1000\n".to_vec().into()))
        .await
        .unwrap();
    screen_until(&mut ws, &mut screen, "40 120").await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    if support::test_runtime().is_some() {
        // As above: under gVisor, the signal through the API.
        let alice = sandbox.get_thread_backend("alice-1").await.unwrap();
        let terminal = alice
            .processes()
            .await
            .unwrap()
            .into_iter()
            .find(|p| p.terminal && p.running)
            .unwrap();
        alice
            .signal_process(&terminal.id.parse().unwrap(), "INT".parse().unwrap())
            .await
            .unwrap();
    } else {
        ws.send(Message::Binary(b"\x03".to_vec().into()))
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    ws.send(Message::Binary(b"echo after-$?; exit 5\n".to_vec().into()))
        .await
        .unwrap();
    screen_until(&mut ws, &mut screen, "\"exit_code\":5").await;
    if screen.contains("after-130") {
        exit = Some(5);
    }
    assert_eq!(exit, Some(5), "{screen:?}");
    // The terminal is forgotten once its WebSocket ends.
    drop(ws);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let alice = sandbox.get_thread_backend("alice-1").await.unwrap();
    assert!(
        alice.processes().await.unwrap().iter().all(|p| !p.terminal),
        "{:?}",
        alice.processes().await
    );
    served.abort();
}

/// Reads a terminal WebSocket's messages into `screen` until it shows
/// `want` (20 s at most).
async fn screen_until<S>(ws: &mut S, screen: &mut String, want: &str)
where
    S: futures_util::Stream<
            Item = Result<
                tokio_tungstenite::tungstenite::Message,
                tokio_tungstenite::tungstenite::Error,
            >,
        > + Unpin,
{
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    let until = Instant::now() + Duration::from_secs(20);
    while !screen.contains(want) {
        let left = until.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, ws.next()).await {
            Ok(Some(Ok(Message::Binary(bytes)))) => {
                screen.push_str(&String::from_utf8_lossy(&bytes))
            }
            Ok(Some(Ok(Message::Text(text)))) => screen.push_str(&text),
            Ok(Some(Ok(_))) => {}
            other => panic!("waiting for {want:?}: {other:?}; screen: {screen:?}"),
        }
    }
}

/// `sandbox shell` under a real PTY (`script`): raw keys reach the
/// sandbox's terminal, its size is this terminal's, Ctrl-C ends the
/// sandbox's foreground command (not the CLI), and the exit code comes back.
#[test]
fn sandbox_shell_under_a_real_terminal() {
    let h = Harness::new("shellcli");
    let cli = format!(
        "stty rows 33 cols 111; exec {} --no-config --workspace-root {} --namespace {} --image {} \
         shell alice-1",
        env!("CARGO_BIN_EXE_sandbox"),
        h.root.path().display(),
        h.namespace,
        support::test_image(),
    );
    let mut child = std::process::Command::new("script")
        .args(["-qec", &cli, "/dev/null"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let typed = [
        "stty size\n",
        "sleep 1000\n",
        "\x03",
        "echo after-$?\n",
        "exit 3\n",
    ];
    for (i, keys) in typed.iter().enumerate() {
        // The first keys wait for the sandbox to start; then a beat each.
        std::thread::sleep(Duration::from_millis(if i == 0 { 3000 } else { 700 }));
        std::io::Write::write_all(&mut stdin, keys.as_bytes()).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    let screen = String::from_utf8_lossy(&out.stdout);
    assert!(screen.contains("33 111"), "{screen}");
    assert!(screen.contains("after-130"), "{screen}");
    assert_eq!(out.status.code(), Some(3), "{screen}");
    drop(stdin);
}

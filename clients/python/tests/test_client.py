"""The Python client against a real `sandbox serve` and Docker engine."""

import concurrent.futures
import os
import http.client
import json
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request

import pytest

from conftest import ROOT, Server, binary
import socket

from sandbox_client import SandboxClient, SandboxError


def test_threads_of_one_user_share_a_container(client, server):
    a = client.exec("alice-1", "echo one > f; hostname")
    b = client.exec("alice-2", "cat f; hostname")
    assert a["exit_code"] == 0
    assert b["output"].splitlines()[0] == "one"
    assert a["output"].splitlines()[-1] == b["output"].splitlines()[-1]
    c = client.exec("bob-1", "hostname")
    assert c["output"] != a["output"].splitlines()[-1] + "\n"
    assert len(server.containers()) == 2


def test_exec_options_and_timeout(client):
    r = client.exec("alice-1", 'echo "$X"; pwd; cat', env={"X": "y"}, workdir="/workspace", stdin="in")
    assert r["output"] == "y\n/workspace\nin"
    r = client.exec("alice-1", "echo start; sleep 100", timeout=1)
    assert r["timed_out"] and r["exit_code"] == 124 and r["output"] == "start\n"
    assert client.exec("alice-1", "exit 7")["exit_code"] == 7


def test_streaming_exec_yields_chunks_then_exit(client):
    lines = list(client.exec_stream("alice-1", "for i in 1 2 3; do echo $i; sleep 0.2; done"))
    outputs = [l["data"] for l in lines if l["type"] == "output"]
    assert "".join(outputs) == "1\n2\n3\n"
    assert lines[-1]["type"] == "exit" and lines[-1]["exit_code"] == 0


def test_files_round_trip_with_per_file_errors(client):
    # Relative paths land in /workspace; absolute ones go anywhere the
    # sandbox user may: its own rights, resolved in the container, decide.
    results = client.upload_files("alice-1", [("a.txt", b"\x00\x01bin"), ("/tmp/deep/t.bin", b"\xff"),
                                              ("/etc/x", b"no"), ("../x", b"no")])
    assert [r["error"] for r in results] == [None, None, "permission_denied", "permission_denied"]
    got = client.download_files("alice-1", ["a.txt", "/workspace/a.txt", "/tmp/deep/t.bin", "missing", "/tmp"])
    assert got[0]["content"] == got[1]["content"] == b"\x00\x01bin"
    assert got[2]["content"] == b"\xff"
    assert [r["error"] for r in got] == [None, None, None, "file_not_found", "is_directory"]


def test_exec_gives_stdout_and_stderr_apart_and_binary_safe(client):
    r = client.exec("alice-1", "printf 'a\\377\\000b'; echo err >&2", binary=True)
    assert (r.stdout, r.stderr, r.exit_code) == (b"a\xff\x00b", b"err\n", 0)
    # Combined in arrival order: two pipes, so either may come first.
    assert "err\n" in r.output and "a\ufffd" in r.output
    text = client.exec("alice-1", "echo out; echo err >&2")
    assert (text.stdout, text.stderr) == (b"out\n", b"err\n")
    assert client.exec("alice-1", "cat", stdin=b"\x00\xff\n", binary=True).stdout == b"\x00\xff\n"
    chunks = [l["data"] for l in client.exec_stream("alice-1", "printf '\\377'", binary=True) if l["type"] == "output"]
    assert b"".join(chunks) == b"\xff"


def test_transport_failures_are_sandbox_errors():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Nothing listens: unreachable, after the connection retries.
    with pytest.raises(SandboxError) as e:
        SandboxClient(f"http://127.0.0.1:{port}", retries=1, connect_timeout=2).health()
    assert (e.value.status, e.value.kind) == (0, "unreachable")
    assert f"127.0.0.1:{port}" in str(e.value) and "sandbox serve" in str(e.value), str(e.value)
    # It listens but never answers: a timeout, not a hang.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        slow = SandboxClient(f"http://127.0.0.1:{s.getsockname()[1]}", timeout=0.5)
        start = time.time()
        with pytest.raises(SandboxError) as e:
            slow.health()
        assert e.value.kind == "timeout" and time.time() - start < 10


def test_destroy_user_and_thread_answer_true_then_false(client, server):
    client.exec("alice-1", "true")
    assert client.destroy_user("alice") is True
    assert client.destroy_user("alice") is False
    client.exec("bob-1", "true")
    assert client.destroy_thread("bob-9") is True
    assert client.destroy_thread("bob-9") is False
    assert server.containers() == []


@pytest.mark.parametrize(
    "method,path,body,status,kind",
    [
        ("POST", "/v1/threads/Alice-1/exec", b'{"command":"true"}', 400, "invalid-id"),
        ("POST", "/v1/threads/..%2Fetc-1/exec", b'{"command":"true"}', 400, "invalid-id"),
        ("POST", "/v1/threads/alice-1/exec", b'{"command":', 400, "bad-request"),
        ("POST", "/v1/threads/alice-1/exec", b'{"cmd":"true"}', 400, "bad-request"),
        ("GET", "/v1/nope", None, 404, "not-found"),
        ("DELETE", "/v1/users/a%2Fb", None, 400, "invalid-id"),
    ],
)
def test_bad_requests_get_json_4xx(server, method, path, body, status, kind):
    req = urllib.request.Request(server.url + path, data=body, method=method)
    req.add_header("Authorization", f"Bearer {server.token}")
    if body is not None:
        req.add_header("Content-Type", "application/json")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    assert e.value.code == status
    assert json.loads(e.value.read())["error"]["kind"] == kind


def test_token_is_required_and_checked(server):
    for token in (None, "wrong"):
        with pytest.raises(SandboxError) as e:
            server.client(token=token).backends()
        assert e.value.status == 401 and e.value.kind == "unauthorized"
    assert server.client(token=None).health()["status"] == "ok"


def test_oversized_body_is_413_and_others_keep_working():
    s = Server(extra_args=["--body-limit-bytes", "100000"])
    try:
        c = s.client()
        with pytest.raises(SandboxError) as e:
            c.exec("alice-1", "true #" + "x" * 200_000)
        assert e.value.status == 413
        assert c.exec("alice-1", "echo ok")["output"] == "ok\n"
        # Files travel raw, streamed: the JSON body limit does not cap them.
        assert c.upload_files("alice-1", [("big", b"x" * 200_000)])[0]["error"] is None
        assert c.download_files("alice-1", ["big"])[0]["content"] == b"x" * 200_000
    finally:
        s.stop()


def test_non_loopback_without_token_is_refused():
    out = subprocess.run([str(binary()), "serve", "--listen", "0.0.0.0:0"], capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin", "SANDBOX_TOKEN": ""}, timeout=60)
    assert out.returncode != 0
    assert "token" in out.stderr


def test_metrics_and_openapi(client):
    client.exec("alice-1", "true")
    text = client.metrics()
    assert "sandbox_calls_total" in text and "sandbox_container_creations_total" in text
    spec = client.openapi()
    assert "/v1/threads/{thread_id}/exec" in spec["paths"]


def test_graceful_shutdown_finishes_in_flight_calls():
    s = Server()
    try:
        c = s.client()
        c.exec("alice-1", "true")
        result = {}
        t = threading.Thread(target=lambda: result.update(output=c.exec("alice-1", "sleep 2; echo done").output))
        t.start()
        time.sleep(0.7)
        s.proc.send_signal(signal.SIGTERM)
        t.join(timeout=30)
        assert result.get("output") == "done\n"
        assert s.proc.wait(timeout=30) == 0
    finally:
        s.stop()


def test_live_policy_swap_under_load(server, client, tmp_path):
    per_thread = tmp_path / "per-thread.wasm"
    per_user = tmp_path / "per-user.wasm"
    for name, path in (("per-thread", per_thread), ("per-user", per_user)):
        subprocess.run([str(binary()), "policy", "export", name, str(path)], check=True, capture_output=True)
    users = [f"u{i}" for i in range(20)]
    for u in users:
        client.exec(f"{u}-0", "true")
    stop = threading.Event()
    failures, done = [], [0]
    lock = threading.Lock()

    def worker(u):
        n = 0
        while not stop.is_set():
            try:
                r = client.exec(f"{u}-{n % 3}", "echo ok")
                assert r["output"] == "ok\n", r
                with lock:
                    done[0] += 1
            except Exception as e:  # noqa: BLE001
                failures.append(repr(e))
            n += 1

    with concurrent.futures.ThreadPoolExecutor(max_workers=20) as pool:
        futures = [pool.submit(worker, u) for u in users]
        time.sleep(1)
        assert client.swap_policy(per_thread.read_bytes(), name="per-thread") == "per-thread"
        time.sleep(2)
        # A new thread now gets a container of its own.
        client.exec("u0-fresh", "true")
        assert f"sandbox.{server.namespace}.u0-fresh" in server.containers()
        # A broken component is refused; the running policy stays.
        with pytest.raises(SandboxError) as e:
            client.swap_policy(b"\0asm\x01\0\0\0")
        assert e.value.status == 422 and client.policy() == "per-thread"
        assert client.swap_policy(per_user.read_bytes(), name="per-user") == "per-user"
        time.sleep(2)
        stop.set()
        for f in futures:
            f.result()
    assert failures == [], failures[:5]
    assert done[0] > 40
    names = server.containers()
    assert len(names) == len(set(names))
    # Per-user again: u0's threads share the adopted per-user container.
    a = client.exec("u0-5", "hostname")["output"]
    b = client.exec("u0-6", "hostname")["output"]
    assert a == b
    # The per-thread leftovers are orphans now; gc removes them, and only them.
    removed = client.gc()["containers"]
    assert removed and all("-" in c["container"]["backend_id"] for c in removed)
    left = server.containers()
    assert all(n.count("-") == 0 for n in (x.split(".", 2)[2] for x in left)), left
    assert f"sandbox.{server.namespace}.u0" in left


def _ps(server, user):
    return subprocess.run(["docker", "exec", f"sandbox.{server.namespace}.{user}", "ps", "-o", "args"],
                          capture_output=True, text=True).stdout


def _peak_rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def test_past_the_shutdown_grace_a_command_ends_with_the_reason_shutdown():
    s = Server(env={"SANDBOX_DESTROY_GRACE_SECS": "1"})
    try:
        c = s.client()
        c.exec("alice-1", "true")
        seen = {}

        def run():
            try:
                seen["result"] = c.exec("alice-1", "sleep 60; echo never")
            except SandboxError as e:
                seen["error"] = e

        t = threading.Thread(target=run)
        t.start()
        time.sleep(0.7)
        start = time.time()
        s.proc.send_signal(signal.SIGTERM)
        assert s.proc.wait(timeout=15) == 0
        took = time.time() - start
        t.join(timeout=10)
        assert "error" in seen, seen
        assert (seen["error"].status, seen["error"].kind) == (503, "shutdown")
        assert took < 1 + 2 + 1.5, took
        assert "sleep 60" not in _ps(s, "alice")
    finally:
        s.stop()


def test_a_streaming_client_that_disconnects_cancels_its_command(server, client):
    client.exec("alice-1", "true")
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("POST", "/v1/threads/alice-1/exec/stream",
                 body=json.dumps({"command": "echo started; sleep 300"}),
                 headers={"Authorization": f"Bearer {server.token}", "Content-Type": "application/json"})
    resp = conn.getresponse()
    assert b"started" in resp.readline()
    conn.close()
    deadline = time.time() + 10
    while "sleep 300" in _ps(server, "alice") and time.time() < deadline:
        time.sleep(0.2)
    assert "sleep 300" not in _ps(server, "alice")


def test_raw_file_routes_stream_big_files_in_bounded_server_memory(server, client):
    client.exec("alice-1", "truncate -s 200M big && truncate -s 4G huge && echo -n hi > small")
    auth = {"Authorization": f"Bearer {server.token}"}
    before = _peak_rss_kib(server.proc.pid)
    req = urllib.request.Request(server.url + "/v1/threads/alice-1/files/raw?path=big", headers=auth)
    total = 0
    with urllib.request.urlopen(req, timeout=120) as r:
        while chunk := r.read(1 << 20):
            total += len(chunk)
    assert total == 200 << 20
    growth_mib = (_peak_rss_kib(server.proc.pid) - before) / 1024
    assert growth_mib < 64, f"server peak RSS grew by {growth_mib:.0f} MiB"
    # Over the cap: refused by its apparent size before any byte.
    req = urllib.request.Request(server.url + "/v1/threads/alice-1/files/raw?path=huge", headers=auth)
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    assert e.value.code == 413
    # Upload, streamed, then read back.
    req = urllib.request.Request(server.url + "/v1/threads/alice-1/files/raw?path=up/x.bin&mode=644",
                                 data=b"\x00\xffdata", method="PUT", headers=auth)
    assert json.load(urllib.request.urlopen(req, timeout=30))["size"] == 6
    req = urllib.request.Request(server.url + "/v1/threads/alice-1/files/raw?path=up/x.bin", headers=auth)
    assert urllib.request.urlopen(req, timeout=30).read() == b"\x00\xffdata"
    req = urllib.request.Request(server.url + "/v1/threads/alice-1/files/raw?path=nope", headers=auth)
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    assert e.value.code == 404


def test_cancel_kills_a_running_execution_by_its_id(server, client):
    client.exec("alice-1", "true")
    result = {}
    worker = threading.Thread(target=lambda: result.update(vars(
        client.exec("alice-1", "(env -i sleep 401 &); sleep 402", execution_id="py-cancel-0001"))))
    worker.start()
    deadline = time.time() + 20
    while not client.cancel("alice-2", "py-cancel-0001"):
        assert time.time() < deadline, "the execution never ran"
        time.sleep(0.1)
    worker.join(30)
    assert result["exit_code"] == 130 and result["reason"] == "cancelled", result
    assert result["execution_id"] == "py-cancel-0001"
    assert client.cancel("alice-1", "py-cancel-0001") is False
    assert client.cancel("bob-1", "py-cancel-0001") is False
    deadline = time.time() + 10
    while "sleep 40" in _ps(server, "alice") and time.time() < deadline:
        time.sleep(0.2)
    assert "sleep 40" not in _ps(server, "alice")
    lines = list(client.exec_stream("alice-1", "echo hi", env={"X": "1"}))
    assert lines[0]["type"] == "started" and lines[-1]["execution_id"] == lines[0]["execution_id"]


def python_policy():
    path = os.environ.get("SANDBOX_PYTHON_POLICY", str(ROOT / "target" / "policies" / "python-per-user.wasm"))
    if not os.path.exists(path):
        pytest.fail(f"{path} is missing: `cargo test-all` builds it (or set SANDBOX_PYTHON_POLICY)")
    return path


def test_live_swap_from_rust_to_python_per_user_under_load_fails_no_request(server, client):
    users = [f"s{i}" for i in range(10)]
    for u in users:
        client.exec(f"{u}-0", "echo warm > /workspace/mark")
    stop = threading.Event()
    failures, done = [], [0]
    lock = threading.Lock()

    def worker(u):
        n = 0
        while not stop.is_set():
            try:
                r = client.exec(f"{u}-{n % 3}", "cat /workspace/mark")
                assert (r.exit_code, r.output) == (0, "warm\n"), r
                with lock:
                    done[0] += 1
            except Exception as e:  # noqa: BLE001
                failures.append(repr(e))
            n += 1

    with open(python_policy(), "rb") as f:
        component = f.read()
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(users)) as pool:
        futures = [pool.submit(worker, u) for u in users]
        time.sleep(1)
        assert client.swap_policy(component, name="python-per-user") == "python-per-user"
        before = done[0]
        time.sleep(3)
        stop.set()
        for f in futures:
            f.result()
    assert failures == [], failures[:5]
    assert done[0] > before, "no request was served after the swap"
    # The Python policy adopted every user's container: still one per user.
    names = server.containers()
    assert sorted(names) == sorted(f"sandbox.{server.namespace}.{u}" for u in users), names


def test_the_client_reads_its_address_and_token_from_the_environment(monkeypatch):
    monkeypatch.setenv("SANDBOX_URL", "http://127.0.0.1:9/")
    monkeypatch.setenv("SANDBOX_TOKEN", "from-env")
    client = SandboxClient()
    assert (client.base_url, client.token) == ("http://127.0.0.1:9", "from-env")
    explicit = SandboxClient("http://127.0.0.1:10", token="given")
    assert (explicit.base_url, explicit.token) == ("http://127.0.0.1:10", "given")
    monkeypatch.delenv("SANDBOX_URL")
    monkeypatch.delenv("SANDBOX_TOKEN")
    assert (SandboxClient().base_url, SandboxClient().token) == ("http://127.0.0.1:8765", None)


def test_a_dev_server_in_a_sandbox_is_previewed_and_linked_for_a_browser(client, server):
    started = client.exec(
        "alice-1",
        "mkdir -p www && echo hello-preview > www/index.html && "
        "(httpd -f -p 127.0.0.1:8080 -h www >/dev/null 2>&1 &) && sleep 0.3",
    )
    assert started.exit_code == 0, started
    assert client.preview("alice-1", 8080, "index.html") == "hello-preview\n"
    link = client.preview_link("alice-1", 8080, ttl_secs=60)
    assert link["url"].startswith("/v1/previews/") and link["url"].endswith("/"), link
    assert link["expires_at"] > time.time()
    # As a browser opens it: no token.
    with urllib.request.urlopen(server.url + link["url"] + "index.html") as page:
        assert page.status == 200
        assert page.read() == b"hello-preview\n"
        assert page.headers["Content-Security-Policy"].startswith("sandbox ")
    with pytest.raises(SandboxError) as nothing:
        client.preview("alice-1", 9)
    assert (nothing.value.status, nothing.value.kind) == (502, "not-found")


def test_background_processes_run_on_after_their_request(client):
    started = client.start_process("alice-1", "mkdir -p www && echo bg-page > www/index.html && "
                                              "exec httpd -f -v -p 127.0.0.1:8082 -h www")
    pid = started["id"]
    assert len(pid) == 32 and started["running"], started
    for _ in range(50):
        try:
            assert client.preview("alice-1", 8082, "index.html") == "bg-page\n"
            break
        except SandboxError:
            time.sleep(0.1)
    else:
        pytest.fail("the background server never answered")
    assert pid in [p["id"] for p in client.processes("alice-1")]
    # Its access log (busybox httpd -v logs each answer to stderr).
    out = client.process_output("alice-1", pid, wait=5)
    assert any(c["stream"] == "stderr" and b"response:200" in c["data"] for c in out["chunks"]), out
    assert out["stderr_offset"] == out["process"]["stderr_bytes"]
    client.signal_process("alice-1", pid, "TERM")
    lines = list(client.follow_process("alice-1", pid, out["stdout_offset"], out["stderr_offset"]))
    assert lines[-1]["type"] == "exit" and not lines[-1]["process"]["running"], lines
    # stdin, and the whole output followed from the start.
    cat = client.start_process("alice-1", "tr a-z A-Z")
    client.write_process("alice-1", cat["id"], b"shout\n", close=True)
    lines = list(client.follow_process("alice-1", cat["id"]))
    assert b"".join(l["data"] for l in lines if l["type"] == "output") == b"SHOUT\n"
    assert lines[-1]["process"]["exit_code"] == 0
    client.remove_process("alice-1", cat["id"])
    with pytest.raises(SandboxError) as gone:
        client.process_output("alice-1", cat["id"])
    assert (gone.value.status, gone.value.kind) == (404, "not-found")
    # Another user's sandbox has none of them.
    assert client.processes("bob-1") == []
    with pytest.raises(SandboxError) as other:
        client.signal_process("bob-1", pid, "KILL")
    assert other.value.status == 404

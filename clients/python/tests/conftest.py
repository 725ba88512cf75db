"""Starts a real `sandbox serve` (the debug build of this repository) against
the real Docker engine for the tests, in a namespace of its own, and removes
every container of that namespace afterwards."""

import os
import pathlib
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "clients" / "python"))

from sandbox_client import AsyncSandboxClient, SandboxClient  # noqa: E402

TOKEN = "test-token-" + str(os.getpid())

#: The standard suite's tests that assert deepagents 0.6's BaseSandbox
#: (test_standard_suite.py): strict expected failures under 0.7.
CHANGED_IN_DEEPAGENTS_07 = {
    "test_write_existing_file_fails",
    "test_glob",
    "test_glob_basic_pattern",
    "test_glob_with_directories",
    "test_glob_hidden_files_explicitly",
    "test_glob_with_character_class",
    "test_glob_with_question_mark",
}


def pytest_collection_modifyitems(items):
    """Marks the 7 as strict expected failures under deepagents 0.7, so the
    run goes red the day upstream's suite catches up."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        minor = int(version("deepagents").split(".")[1])
    except (PackageNotFoundError, ValueError, IndexError):
        return
    if minor < 7:
        return
    for item in items:
        if item.fspath.basename == "test_standard_suite.py" and item.name.split("[")[0] in CHANGED_IN_DEEPAGENTS_07:
            item.add_marker(pytest.mark.xfail(
                strict=True,
                reason="deepagents 0.7 changed write/glob; langchain-tests 1.1.9 asserts 0.6 "
                       "(langchain issue 39948, PR 40283)"))


def binary() -> pathlib.Path:
    path = pathlib.Path(os.environ.get("SANDBOX_BIN", ROOT / "target" / "debug" / "sandbox"))
    if not path.exists():
        pytest.fail(f"{path} is missing: run `cargo build --bins` first (or set SANDBOX_BIN)")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, extra_args=(), token=TOKEN, env=None):
        self.namespace = f"py-{os.getpid()}-{free_port()}"
        self.root = tempfile.mkdtemp(prefix="sandbox-py-")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.token = token
        env = dict(os.environ, SANDBOX_NAMESPACE=self.namespace, SANDBOX_WORKSPACE_ROOT=self.root, RUST_LOG="warn",
                   **(env or {}))
        args = [str(binary()), "serve", "--listen", f"127.0.0.1:{self.port}", *extra_args]
        if token:
            args += ["--token", token]
        self.proc = subprocess.Popen(args, env=env)
        deadline = time.time() + 60
        while time.time() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"sandbox serve exited with {self.proc.returncode}")
            try:
                urllib.request.urlopen(self.url + "/healthz", timeout=2).read()
                return
            except Exception:
                time.sleep(0.1)
        self.stop()
        pytest.fail("sandbox serve did not come up (is the Docker engine reachable?)")

    def client(self, token="default") -> SandboxClient:
        return SandboxClient(self.url, token=self.token if token == "default" else token, timeout=120)

    def async_client(self) -> AsyncSandboxClient:
        return AsyncSandboxClient(self.url, token=self.token, timeout=120)

    def containers(self):
        out = subprocess.run(
            ["docker", "ps", "-a", "--filter", f"label=sandbox.namespace={self.namespace}", "--format", "{{.Names}}"],
            check=True, capture_output=True, text=True).stdout
        return sorted(out.split())

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        ids = subprocess.run(
            ["docker", "ps", "-aq", "--filter", f"label=sandbox.namespace={self.namespace}"],
            capture_output=True, text=True).stdout.split()
        if ids:
            subprocess.run(["docker", "rm", "-f", *ids], capture_output=True)


@pytest.fixture
def server():
    s = Server()
    yield s
    s.stop()


@pytest.fixture
def client(server):
    return server.client()


def python_image() -> str:
    """The Python-ready image deepagents' file tools need (`cargo test-all`
    builds it with `sandbox image build --python`)."""
    image = os.environ.get("SANDBOX_PYTHON_IMAGE", "sandbox-python:latest")
    found = subprocess.run(["docker", "image", "inspect", image], capture_output=True)
    if found.returncode != 0:
        pytest.fail(f"image {image} is missing: run `sandbox image build --python` (or set SANDBOX_PYTHON_IMAGE)")
    return image


@pytest.fixture(scope="session")
def python_server():
    """One server for the deepagents suites, running the Python-ready image."""
    s = Server(env={"SANDBOX_IMAGE": python_image()})
    yield s
    s.stop()

"""deepagents (the current release) on a real `sandbox serve` running the
Python-ready image: the module-level functions of the seed, the async
methods, and a whole agent run with a scripted model in two threads of one
user. The standard suite is in test_standard_suite.py."""

import pathlib
import sys
import threading

import pytest

from sandbox_client import deepagents as sd
from sandbox_client.deepagents import SandboxBackend

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture
def configured(python_server):
    sd.configure(python_server.url, python_server.token, timeout=120)
    yield python_server
    sd._clients = None


def test_the_seed_functions_share_one_sandbox_per_user(configured):
    a, b = sd.get_thread_backend("dana-1"), sd.get_thread_backend("dana-2")
    assert (a.id, b.id) == ("dana", "dana")
    assert a.upload_files([("/workspace/shared.txt", b"from dana-1")])[0].error is None
    assert b.execute("cat /workspace/shared.txt").output == "from dana-1"
    assert sd.get_thread_backend("erin-1").execute("cat /workspace/shared.txt").exit_code != 0
    assert sd.destroy_thread_backend("dana-2") is True
    assert sd.destroy_user_backend("dana") is False
    # The workspace outlives the container; the next command re-creates it.
    assert a.execute("cat /workspace/shared.txt").output == "from dana-1"
    assert sd.destroy_user_backend("dana") is True
    sd.destroy_user_backend("erin")


def test_relative_paths_are_invalid_without_a_request(configured):
    backend = sd.get_thread_backend("dana-1")
    assert backend.upload_files([("rel.txt", b"x")])[0].error == "invalid_path"
    got = backend.download_files(["rel.txt", "/nope/missing"])
    assert [r.error for r in got] == ["invalid_path", "file_not_found"]
    sd.destroy_user_backend("dana")


async def test_async_methods_use_no_threads(configured):
    backend = sd.get_thread_backend("fay-1")
    await backend.aexecute("true")
    before = threading.active_count()
    result = await backend.aexecute("echo hi")
    up = await backend.aupload_files([("/tmp/a.bin", b"\x00\xff")])
    down = await backend.adownload_files(["/tmp/a.bin"])
    assert (result.output, up[0].error, down[0].content) == ("hi\n", None, b"\x00\xff")
    assert threading.active_count() == before
    assert (await backend.adelete("/tmp/a.bin")).error is None
    assert (await backend.adelete("/tmp/a.bin")).error is not None
    sd.destroy_user_backend("fay")


def test_a_deep_agent_in_two_threads_of_one_user(configured):
    sys.path.insert(0, str(EXAMPLES))
    try:
        import deepagents_two_threads as example
    finally:
        sys.path.remove(str(EXAMPLES))
    results = example.main()
    first, second = results["alice-1"], results["alice-2"]
    assert [t["tool"] for t in first] == ["write_file", "execute", "read_file"]
    assert "hello from /workspace as uid" in first[1]["result"]
    assert "hello from /workspace" in first[2]["result"]
    # The second thread sees the first one's files: one workspace per user.
    assert "hello.py" in second[0]["result"] and "out.txt" in second[0]["result"]
    assert "hello from /workspace" in second[1]["result"]
    assert "hello from" in second[2]["result"]
    sd.destroy_user_backend("alice")


def test_a_missing_python3_says_which_image_to_use(configured):
    # As on the busybox image, where deepagents' file tools fail with only
    # "python3: not found".
    backend = sd.get_thread_backend("dana-1")
    response = backend.execute("PATH=/nonexistent python3 -c 'print(1)'")
    assert response.exit_code == 127
    assert "sandbox-python:latest" in response.output and "sandbox image build --python" in response.output
    assert "python3" not in backend.execute("echo fine").output
    sd.destroy_user_backend("dana")

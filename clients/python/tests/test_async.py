"""The async client against a real `sandbox serve`."""

import asyncio
import threading
import time

import pytest

from sandbox_client import SandboxError


async def test_async_calls_run_concurrently_on_one_loop(server):
    c = server.async_client()
    await c.exec("alice-1", "true")
    threads = threading.active_count()
    start = time.time()
    results = await asyncio.gather(*[c.exec("alice-1", 'sleep 1; echo "$X"', env={"X": str(i)}) for i in range(5)])
    took = time.time() - start
    assert [r.stdout for r in results] == [f"{i}\n".encode() for i in range(5)]
    assert took < 4, f"5 one-second commands took {took:.1f}s: they did not run concurrently"
    assert threading.active_count() == threads
    lines = [line async for line in c.exec_stream("alice-1", "echo a; echo b >&2", env={"X": "1"})]
    assert lines[0]["type"] == "started" and lines[-1]["type"] == "exit"
    assert lines[-1]["result"].stdout == b"a\n" and lines[-1]["result"].stderr == b"b\n"
    assert await c.upload_file("alice-1", "/tmp/x.bin", b"\x00\xff") is None
    got = await c.download_files("alice-1", ["/tmp/x.bin", "/nope"])
    assert [(r["content"], r["error"]) for r in got] == [(b"\x00\xff", None), (None, "file_not_found")]
    with pytest.raises(SandboxError) as e:
        await c.exec("Bad-1", "true")
    assert (e.value.status, e.value.kind) == (400, "invalid-id")
    await c.aclose()


def test_one_async_client_serves_several_event_loops_and_forgets_closed_ones(server):
    c = server.async_client()
    for _ in range(3):
        assert asyncio.run(c.exec("alice-1", "echo ok")).output == "ok\n"
    # One client per loop, and those of closed loops are let go.
    assert len(c._clients) == 1


async def test_async_preview_and_link(server):
    c = server.async_client()
    await c.exec(
        "alice-1",
        "mkdir -p www && echo hi > www/index.html && "
        "(httpd -f -p 127.0.0.1:8081 -h www >/dev/null 2>&1 &) && sleep 0.3",
    )
    assert await c.preview("alice-1", 8081, "/index.html") == "hi\n"
    link = await c.preview_link("alice-1", 8081)
    assert link["url"].startswith("/v1/previews/")
    with pytest.raises(SandboxError) as e:
        await c.preview_link("alice-1", 0)
    assert (e.value.status, e.value.kind) == (400, "bad-request")


async def test_async_background_process_and_terminal(server):
    c = server.async_client()
    shell = await c.start_process("alice-1", "sh -i", terminal=(30, 100))
    assert shell["terminal"], shell
    await c.write_process("alice-1", shell["id"], "stty size; exit 4\n")
    seen = b""
    async for line in c.follow_process("alice-1", shell["id"]):
        if line["type"] == "output":
            seen += line["data"]
        else:
            last = line
    assert b"30 100" in seen, seen
    assert last["type"] == "exit" and last["process"]["exit_code"] == 4, last
    assert any(p["id"] == shell["id"] for p in await c.processes("alice-1"))
    await c.remove_process("alice-1", shell["id"])

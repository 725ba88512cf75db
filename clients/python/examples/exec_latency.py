"""Warm exec latency of the Python clients against the HTTP route called with curl.

Against a running ``sandbox serve``, for one warm thread: ``rounds`` rounds,
each timing ``curl`` (its own ``time_total``, a new connection per call), the
sync client and the async client (both warm, pooled), interleaved so all
three see the same machine. Prints the medians and the ratios to curl::

    SANDBOX_TOKEN=s3cret sandbox serve --listen 127.0.0.1:8765 &
    SANDBOX_TOKEN=s3cret python examples/exec_latency.py --rounds 40
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import time

from sandbox_client import AsyncSandboxClient, SandboxClient


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=os.environ.get("SANDBOX_URL", "http://127.0.0.1:8765"))
    parser.add_argument("--token", default=os.environ.get("SANDBOX_TOKEN"))
    parser.add_argument("--thread", default="latency-1")
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args()

    body = json.dumps({"command": "true"})
    curl = ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code} %{time_total}",
            "-H", "content-type: application/json", "-d", body,
            f"{args.url}/v1/threads/{args.thread}/exec"]
    if args.token:
        curl[1:1] = ["-H", f"Authorization: Bearer {args.token}"]

    def by_curl() -> float:
        status, seconds = subprocess.run(curl, check=True, capture_output=True, text=True).stdout.split()
        if status != "200":
            raise SystemExit(f"curl: HTTP {status}")
        return float(seconds)

    sync = SandboxClient(args.url, args.token)
    loop = asyncio.new_event_loop()
    asynchronous = AsyncSandboxClient(args.url, args.token)

    def by_sync() -> float:
        start = time.perf_counter()
        assert sync.exec(args.thread, "true").exit_code == 0
        return time.perf_counter() - start

    def by_async() -> float:
        async def one() -> float:
            start = time.perf_counter()
            assert (await asynchronous.exec(args.thread, "true")).exit_code == 0
            return time.perf_counter() - start
        return loop.run_until_complete(one())

    contenders = {"curl": by_curl, "sync client": by_sync, "async client": by_async}
    for measure in contenders.values():  # warm: container, connections, policy
        measure()
    times = {name: [] for name in contenders}
    for _ in range(args.rounds):
        for name, measure in contenders.items():
            times[name].append(measure())
    base = statistics.median(times["curl"])
    for name, samples in times.items():
        median = statistics.median(samples)
        print(f"{name:13} median {median * 1000:7.2f} ms  ratio to curl {median / base:.2f}  ({args.rounds} rounds)")
    sync.close()
    loop.run_until_complete(asynchronous.aclose())
    loop.close()


if __name__ == "__main__":
    main()
